"""The continuous-batching engine: each request's tokens are what `generate` gives it alone (float64: token
for token; float32: except at near-ties), whatever joins, leaves or is cancelled around it; per-request
controls, limits, errors that stay with their request, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.pipelines import ChatPipeline
from idefics2.serving import (
    Engine,
    EngineClosedError,
    EngineOverloadedError,
    RequestFailedError,
    RequestTooLargeError,
)
from oracle_model import build_reference_checkpoint
from oracle_processing import build_reference_processor

END_OF_UTTERANCE = 32002
SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    build_reference_checkpoint(folder, seed=5)
    build_reference_processor(
        folder, image_seq_len=4, do_image_splitting=True, longest_edge=70, shortest_edge=28
    )
    return folder


@pytest.fixture(scope="module")
def processor(checkpoint):
    return Idefics2Processor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def model64(checkpoint):
    return Idefics2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def model32(checkpoint):
    return Idefics2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def picture(seed: int, size=(40, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


PICTURES = [picture(i, size) for i, size in enumerate([(40, 60), (70, 30), (28, 28), (56, 66)])]
# (prompt, image indices, controls): 0-3 images, prompts of different lengths, different lengths to generate
REQUESTS = [
    ("Describe this picture in detail, please.", [0], {"max_new_tokens": 9}),
    ("Hi", [], {"max_new_tokens": 4}),
    ("Compare the two pictures and say which one is brighter and why.", [1, 2], {"max_new_tokens": 12}),
    ("Three at once: first, second, third.", [3, 0, 1], {"max_new_tokens": 6}),
    ("The same picture again.", [0], {"max_new_tokens": 11, "repetition_penalty": 1.3}),
    ("A long text-only prompt " + "with many words " * 12, [], {"max_new_tokens": 7, "min_new_tokens": 7}),
    ("Bad words banned here.", [2], {"max_new_tokens": 8, "bad_words_ids": [[5], [7, 9]]}),
    ("Last one, short.", [3], {"max_new_tokens": 3}),
]


def solo_tokens(model, processor, prompt, images, controls) -> tuple[list[int], torch.Tensor]:
    """What `generate` gives the request alone: its new tokens up to and including an end token, and the
    prompt's input ids."""
    inputs = ChatPipeline(model, processor).prepare(prompt, images)
    out = model.generate(**inputs, tokenizer=processor, **controls)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    ends = [i for i, t in enumerate(new) if t in (2, END_OF_UTTERANCE)]
    return (new[: ends[0] + 1] if ends else new), inputs


def run_mixed_traffic(engine: Engine) -> dict[int, object]:
    """Submit REQUESTS while others decode: 3 at once, the rest as earlier ones produce tokens; cancel one
    after its first token. Returns {request index: Completion}."""
    handles = {}
    for i in range(3):
        prompt, images, controls = REQUESTS[i]
        handles[i] = engine.submit(prompt, images=[PICTURES[k] for k in images], **controls)
    next(iter(handles[0]))  # the first request is decoding
    for i in range(3, len(REQUESTS)):
        prompt, images, controls = REQUESTS[i]
        handles[i] = engine.submit(prompt, images=[PICTURES[k] for k in images], **controls)
        time.sleep(0.01)
    cancelled = engine.submit("Cancel me after one token.", images=[PICTURES[1]], max_new_tokens=30)
    next(iter(cancelled))
    cancelled.cancel()
    results = {i: handle.result(timeout=120) for i, handle in handles.items()}
    results["cancelled"] = cancelled.result(timeout=120)
    return results


@pytest.mark.parametrize("prefill_chunk", [16, 512])  # prompts in chunks; whole prompts batched together
def test_float64_tokens_equal_generate_alone_under_mixed_traffic(model64, processor, prefill_chunk):
    with Engine(model64, processor, max_batch=3, prefill_chunk=prefill_chunk) as engine:
        results = run_mixed_traffic(engine)
    stats = engine.stats()  # once closed: every finished request has left its row
    for i, (prompt, images, controls) in enumerate(REQUESTS):
        expected, _ = solo_tokens(model64, processor, prompt, [PICTURES[k] for k in images], controls)
        assert results[i].token_ids == expected, (i, prompt)
        assert results[i].finish_reason == ("stop" if expected[-1] in (2, END_OF_UTTERANCE) else "length")
    cancelled = results["cancelled"]
    assert cancelled.finish_reason == "cancelled" and 1 <= cancelled.completion_tokens < 30
    assert stats["image_cache_hits"] >= 3  # pictures 0, 1, 2 and 3 are each sent more than once
    assert stats["running"] == stats["waiting"] == 0


def test_float32_tokens_equal_generate_alone_except_near_ties(model32, processor):
    with Engine(model32, processor, max_batch=4, prefill_chunk=24) as engine:
        results = run_mixed_traffic(engine)
    for i, (prompt, images, controls) in enumerate(REQUESTS):
        pictures = [PICTURES[k] for k in images]
        expected, inputs = solo_tokens(model32, processor, prompt, pictures, controls)
        got = results[i].token_ids
        if got == expected:
            continue
        first = next(k for k, (a, b) in enumerate(zip(got, expected)) if a != b)
        ids = torch.cat([inputs["input_ids"], torch.tensor([expected[:first]])], dim=1)
        with torch.no_grad():
            logits = model32(
                input_ids=ids,
                pixel_values=inputs.get("pixel_values"),
                pixel_attention_mask=inputs.get("pixel_attention_mask"),
            ).logits[0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) <= 1e-4, (i, first)


def test_greedy_float32_requests_read_the_heads_int8_copy_and_get_the_same_tokens(model32, processor):
    """Where a float32 decode step runs as one C call, a batch of greedy requests (a minimum length among
    them) gets its tokens from the head's int8 copy (ckernels.HeadScreen): the same tokens as the logits
    give; a request that asks for log-probabilities reads the logits."""
    from idefics2.modeling import ckernels, kernels

    if not kernels.c_kernels():
        pytest.skip("no C compiler here")
    routes = dict.fromkeys(("linear", "attention", "rms_norm", "gated", "rope", "decoder_step"), "c")
    requests = [REQUESTS[i] for i in (0, 1, 5)]  # greedy; short; a minimum length holding the ends back

    def run() -> list[list[int]]:
        with Engine(model32, processor, max_batch=3) as engine:
            handles = [
                engine.submit(prompt, images=[PICTURES[k] for k in images], **controls)
                for prompt, images, controls in requests
            ]
            return [handle.result(timeout=120).token_ids for handle in handles]

    with kernels.force(**routes, greedy_screen=False):
        want = run()
    before = ckernels.screen_counts()[0]
    with kernels.force(**routes):
        assert run() == want
        assert ckernels.screen_counts()[0] > before
        before = ckernels.screen_counts()[0]
        with Engine(model32, processor, max_batch=3) as engine:
            done = engine.submit("Hi", max_new_tokens=4, logprobs=True).result(timeout=120)
        assert ckernels.screen_counts()[0] == before and len(done.logprobs) == done.completion_tokens


def test_text_deltas_concatenate_to_the_pipelines_reply(model32, processor):
    chat = ChatPipeline(model32, processor)
    with Engine(model32, processor, max_batch=2) as engine:
        handle = engine.submit("Say something.", images=[PICTURES[0]], max_new_tokens=10)
        events = list(handle)
        completion = handle.result()
    assert "".join(e.text for e in events) == completion.text
    assert completion.text == chat.chat("Say something.", images=[PICTURES[0]], max_new_tokens=10)
    assert [t for e in events for t in e.token_ids] == completion.token_ids
    assert events[-1].finish_reason == completion.finish_reason
    assert events[-1].completion_tokens == len(completion.token_ids)
    assert events[-1].prompt_tokens == completion.prompt_tokens > 0
    assert completion.time_to_first_token is not None and completion.time_to_first_token >= 0


def test_stop_strings_and_eos_ids_per_request(model32, processor):
    with Engine(model32, processor, max_batch=2) as engine:
        free = engine.submit("Say something.", max_new_tokens=10).result()
        token = free.token_ids[3]
        by_eos = engine.submit("Say something.", max_new_tokens=10, eos_token_id=token).result()
        stop = free.text[len(free.text) // 2 :][:3]
        by_stop = engine.submit("Say something.", max_new_tokens=10, stop_strings=[stop]).result()
    assert by_eos.token_ids == free.token_ids[: free.token_ids.index(token) + 1]
    assert by_eos.finish_reason == "stop"
    assert stop not in by_stop.text and free.text.startswith(by_stop.text)
    assert by_stop.finish_reason == "stop"


def test_min_new_tokens_holds_back_the_end_tokens_of_greedy_rows(model64, processor):
    """Greedy rows are chosen together, with one argmax; a row under its min_new_tokens has its end tokens
    forbidden there, as `generate` does, while the row next to it may end."""
    free, _ = solo_tokens(model64, processor, "Say something.", [], {"max_new_tokens": 10})
    end = free[1]  # an end token that the free answer reaches at its second token
    controls = {"max_new_tokens": 10, "eos_token_id": [end]}
    held_back = {**controls, "min_new_tokens": 6}
    expected, _ = solo_tokens(model64, processor, "Say something.", [], held_back)
    with Engine(model64, processor, max_batch=2) as engine:
        rows = [engine.submit("Say something.", **c) for c in (held_back, controls)]
        long, short = (row.result(timeout=120) for row in rows)
    assert long.token_ids == expected and len(expected) >= 6 and end not in expected[:5]
    assert short.token_ids == free[:2] and short.finish_reason == "stop"


def test_seeded_sampling_is_the_same_whatever_else_runs(model64, processor):
    controls = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "seed": 7}
    with Engine(model64, processor, max_batch=4) as engine:
        alone = engine.submit("Tell a story.", **controls).result()
        others = [engine.submit(f"Busy {i}", images=[PICTURES[i]], max_new_tokens=6) for i in range(3)]
        crowded = engine.submit("Tell a story.", **controls).result()
        differently_seeded = engine.submit("Tell a story.", **{**controls, "seed": 8}).result()
        for handle in others:
            handle.result()
    assert alone.token_ids == crowded.token_ids
    assert differently_seeded.token_ids != alone.token_ids
    # the same decode core and logits chain: generate with the seed draws the same tokens
    assert alone.token_ids == solo_tokens(model64, processor, "Tell a story.", [], controls)[0]


def test_limits_and_bad_requests_fail_at_submit(model32, processor):
    with Engine(model32, processor, max_batch=1, max_queue=1, max_length=64) as engine:
        with pytest.raises(RequestTooLargeError, match=r"needs \d+ positions .* max_new_tokens 60"):
            engine.submit("Hello there", max_new_tokens=60)
        with pytest.raises(ValueError, match="unsupported generation argument"):
            engine.submit("Hello", num_beams=2)
        with pytest.raises(ValueError, match="cannot be set per request"):
            engine.submit("Hello", streamer=print)
        with pytest.raises(ValueError, match="image 0"):
            engine.submit("Look", images=[b"not an image"])
        with pytest.raises(ValueError, match="1 image part"):
            engine.submit([{"role": "user", "content": "Look at <image>"}])
        with pytest.raises(ValueError):
            engine.submit([{"role": "user"}])
        running = engine.submit("Keep the only row busy.", max_new_tokens=20)
        next(iter(running))
        waiting = engine.submit("Wait for a row.", max_new_tokens=2)  # fills the queue of one
        with pytest.raises(EngineOverloadedError, match="max_queue=1"):
            engine.submit("One too many.", max_new_tokens=2)
        assert running.result().completion_tokens == 20 and waiting.result().completion_tokens == 2


def test_cancelling_frees_the_row_for_a_waiting_request(model32, processor):
    with Engine(model32, processor, max_batch=1) as engine:
        long = engine.submit("A long answer.", max_new_tokens=200, min_new_tokens=200)
        next(iter(long))
        queued = engine.submit("Next.", max_new_tokens=3)
        assert not queued.done
        long.cancel()
        assert queued.result(timeout=30).completion_tokens == 3
        assert long.result().finish_reason == "cancelled" and long.result().completion_tokens < 200


def test_a_failing_row_fails_alone(model32, processor, monkeypatch):
    """A decode step that raises whenever one poisoned request is in the batch: it is retried row by row,
    and only the poisoned request gets an error."""
    with Engine(model32, processor, max_batch=4) as engine:
        real_decode = engine.runner.decode
        poisoned: set[int] = set()

        def decode(tokens, positions, start=0):
            rows = engine.scheduler.running[start : start + len(tokens)]
            if any(seq.handle.id in poisoned for seq in rows):
                raise RuntimeError("poisoned row")
            return real_decode(tokens, positions, start)

        monkeypatch.setattr(engine.runner, "decode", decode)
        good = [engine.submit(f"Good {i}", max_new_tokens=6) for i in range(3)]
        bad = engine.submit("Bad", max_new_tokens=6)
        poisoned.add(bad.id)
        with pytest.raises(RequestFailedError, match="poisoned row"):
            bad.result(timeout=60)
        assert all(h.result(timeout=60).completion_tokens == 6 for h in good)
        with pytest.raises(RequestFailedError):
            list(bad)
        assert engine.submit("Still serving", max_new_tokens=2).result(timeout=60).completion_tokens == 2


def test_asyncio_streaming(model32, processor):
    async def main(engine):
        handle = engine.submit("Stream it.", max_new_tokens=5)
        return [event async for event in handle], handle.result()

    with Engine(model32, processor) as engine:
        events, completion = asyncio.run(main(engine))
    assert "".join(e.text for e in events) == completion.text and events[-1].finish_reason == "length"


def test_submitting_from_many_threads(model32, processor):
    with Engine(model32, processor, max_batch=3) as engine:
        results = {}

        def client(i):
            results[i] = engine.submit(f"Client {i}", max_new_tokens=3 + i % 3).result(timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(results) == list(range(8))
    assert all(results[i].completion_tokens == 3 + i % 3 for i in range(8))


def test_close_drains_then_refuses(model32, processor):
    engine = Engine(model32, processor, max_batch=2)
    handles = [engine.submit(f"Drain {i}", max_new_tokens=5) for i in range(3)]
    engine.close()
    assert all(h.result().completion_tokens == 5 for h in handles)
    with pytest.raises(EngineClosedError):
        engine.submit("Too late")


def test_close_with_a_deadline_cancels_what_is_left(model32, processor):
    engine = Engine(model32, processor, max_batch=1)
    slow = engine.submit("Never ends in time.", max_new_tokens=400, min_new_tokens=400)
    next(iter(slow))
    engine.close(timeout=0.05)
    assert slow.result().finish_reason == "cancelled"


def test_graph_step_with_placeholder_rows_and_a_length_bucket_matches_eager_decode(model64):
    """What a CUDA graph captures (rows padded to the batch bucket with placeholders, attention over the
    length bucket's slots) gives the eager step's logits for the real rows; checked eagerly on the CPU."""
    from idefics2.decoding.graphs import DecodeGraphs
    from idefics2.decoding.runner import ModelRunner

    runner = ModelRunner(model64, rows=4, length=600)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 32000, (n,)).tolist() for n in (7, 12)]
    for row, ids in enumerate(prompts):
        runner.prefill(row, runner.embed_prompt(ids, None), 0, want_logits=False)
    tokens, positions = [11, 17], [7, 12]
    twin = [t.clone() for t in (*runner.cache.cache.keys, *runner.cache.cache.values)]
    with torch.no_grad():
        eager = runner.decode(tokens, positions)
        for buffer, saved in zip((*runner.cache.cache.keys, *runner.cache.cache.values), twin):
            buffer.copy_(saved)
        graphs = DecodeGraphs(model64, runner.decode_step, rows=4, length=600)
        batch, n_keys = graphs.bucket(3, 13)
        assert (batch, n_keys) == (4, 512)
        assert graphs.bucket(5, 513) == (4, 600)  # capped at the engine's rows and length
        padded = torch.tensor([[11], [17], [0], [0]]), torch.tensor([7, 12, 0, 0])
        bucketed = runner.decode_step(*padded, n_keys)
    assert torch.allclose(bucketed[:2], eager, rtol=0, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_cuda_graph_engine_tokens_equal_generate_alone(checkpoint, processor):
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, device="cuda").eval()
    with Engine(model, processor, max_batch=4) as engine:
        handles = [
            engine.submit(prompt, images=[PICTURES[k] for k in images], **controls)
            for prompt, images, controls in REQUESTS[:4]
        ]
        results = [h.result(timeout=120) for h in handles]
        assert engine.runner.graphs is not None and engine.runner.graphs.graphs
    for (prompt, images, controls), result in zip(REQUESTS, results):
        expected, _ = solo_tokens(model, processor, prompt, [PICTURES[k] for k in images], controls)
        assert result.token_ids == expected


def test_raw_prompts_logprobs_stop_kinds_and_the_default_length(model64, processor):
    with Engine(model64, processor, max_batch=2, max_length=64) as engine:
        raw = engine.submit_prompt(
            "<image>Raw text, no template", [PICTURES[2]], max_new_tokens=4, logprobs=True
        )
        completion = raw.result()
        end = completion.token_ids[1]
        by_eos = engine.submit_prompt("<image>Raw text, no template", [PICTURES[2]], max_new_tokens=6,
                                      eos_token_id=end).result()  # fmt: skip
        default = engine.submit_prompt("A prompt without max_new_tokens")
        with pytest.raises(ValueError, match="0 <image> marker"):
            engine.submit_prompt("no marker", [PICTURES[0]])
        with pytest.raises(TypeError, match="prompt must be a str"):
            engine.submit_prompt(["not", "text"])
    inputs = processor(text="<image>Raw text, no template", images=[[PICTURES[2]]], return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([completion.token_ids[:3]])], dim=1)
    with torch.no_grad():
        logits = model64(input_ids=ids, pixel_values=inputs["pixel_values"].double(),
                         pixel_attention_mask=inputs["pixel_attention_mask"]).logits[0]  # fmt: skip
    positions = range(inputs["input_ids"].shape[1] - 1, ids.shape[1])
    expected = [float(logits[p].log_softmax(-1)[t]) for p, t in zip(positions, completion.token_ids)]
    assert completion.logprobs == pytest.approx(expected, abs=1e-5)  # logits come back as float32
    assert by_eos.finish_reason == "stop" and by_eos.stopped_by == "eos_token"
    result = default.result()  # generate's default of 20 new tokens fits in 64 slots with this prompt
    assert result.completion_tokens == min(20, 64 - result.prompt_tokens)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_a_quantized_model_serves_the_same_answers_as_its_pipeline(bits):
    from idefics2 import pipeline

    chat = pipeline(quantize=bits, dtype=torch.float32)
    questions = ["What color is the circle?", "How many squares are there?", "What shape is the purple one?"]
    with Engine(chat.model, chat.processor, max_batch=3) as engine:
        handles = [engine.submit(q, images=[SHAPES], max_new_tokens=8) for q in questions]
        served = [h.result().text for h in handles]
    assert served == [chat.chat(q, images=[SHAPES], max_new_tokens=8) for q in questions]
    assert served[0] == "green"


def test_structured_output_per_request_equals_generate_alone(model64, processor):
    """Rows with a JSON schema, a regex or nothing, decoded together: each gives `generate`'s tokens alone
    and a complete, valid answer."""
    import json
    import re

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
              "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["name", "n"],
              "additionalProperties": False}  # fmt: skip
    requests = [
        ("Fill in the form.", {"max_new_tokens": 40, "json_schema": schema}),
        ("Three digits and two letters.", {"max_new_tokens": 12, "regex": r"[0-9]{3}-[a-z]{2}"}),
        ("Say anything.", {"max_new_tokens": 6}),
    ]
    with Engine(model64, processor, max_batch=3) as engine:
        handles = [engine.submit(prompt, **controls) for prompt, controls in requests]
        results = [h.result() for h in handles]
        with pytest.raises(ValueError, match="invalid"):
            engine.submit("Bad schema", json_schema={"type": "no-such-type"})
    for (prompt, controls), result in zip(requests, results):
        assert result.token_ids == solo_tokens(model64, processor, prompt, [], controls)[0]
    answer = json.loads(results[0].text)
    assert results[0].finish_reason == "stop" and 0 <= answer["n"] <= 9 and len(answer["name"]) <= 6
    assert results[1].finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", results[1].text.strip())


def test_the_image_cache_counts_each_image_of_a_request_once(model32, processor):
    """Two new pictures are two misses (not one per look the engine takes on its way to encoding them);
    the same request again is two hits."""
    with Engine(model32, processor, max_batch=2) as engine:
        engine.submit("Two pictures.", images=PICTURES[:2], max_new_tokens=2).result(timeout=60)
        first = engine.stats()
        engine.submit("Two pictures.", images=PICTURES[:2], max_new_tokens=2).result(timeout=60)
        second = engine.stats()
    assert (first["image_cache_misses"], first["image_cache_hits"]) == (2, 0)
    assert (second["image_cache_misses"], second["image_cache_hits"]) == (2, 2)
