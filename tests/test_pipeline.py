"""idefics2.pipeline: chat template + processor + generate + decode, against transformers doing the same."""

import numpy as np
import pytest
import torch
from PIL import Image

import idefics2
from oracle_model import build_reference_checkpoint
from oracle_processing import build_reference_processor

END_OF_UTTERANCE = 32002


def picture(seed, size=(40, 52)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_ckpt")
    build_reference_checkpoint(folder, seed=5)
    build_reference_processor(folder, image_seq_len=4, longest_edge=56, shortest_edge=28)
    return folder


@pytest.fixture(scope="module")
def chat(folder):
    return idefics2.pipeline(folder, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoProcessor, Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float64).eval()
    return model, AutoProcessor.from_pretrained(folder)


def reference_reply(reference, messages, images, **kwargs):
    model, processor = reference
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[images] if images else None, return_tensors="pt")
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **kwargs)
    return out[0, inputs["input_ids"].shape[1] :], processor


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Two shapes."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And here?"}]},
]


def test_chat_matches_transformers_generate_and_decode(chat, reference):
    images = [picture(0), picture(1, (60, 30))]
    tokens, processor = reference_reply(
        reference, CONVERSATION, images, max_new_tokens=30, eos_token_id=[2, 32002]
    )
    expected = processor.decode(tokens, skip_special_tokens=True).lstrip()
    assert len(expected) > 20
    assert chat.chat(CONVERSATION, images=images, max_new_tokens=30) == expected


def test_plain_prompt_with_images_and_inline_images(chat):
    image = picture(2)
    as_text = chat.chat("Describe it.", images=[image], max_new_tokens=12)
    inline = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}],
        }
    ]
    assert chat.chat(inline, max_new_tokens=12) == as_text
    assert chat.chat("Describe it.", images=image, max_new_tokens=12) == as_text


def test_stream_concatenates_to_chat(chat):
    images = [picture(3), picture(4)]
    deltas = list(chat.stream(CONVERSATION, images=images, max_new_tokens=25))
    assert len(deltas) > 3 and all(deltas)
    assert "".join(deltas) == chat.chat(CONVERSATION, images=images, max_new_tokens=25)


def test_sampling_controls_pass_through(chat):
    a = chat.chat("Hi", max_new_tokens=15, do_sample=True, temperature=0.8, top_p=0.9, seed=1)
    assert a == chat.chat("Hi", max_new_tokens=15, do_sample=True, temperature=0.8, top_p=0.9, seed=1)
    greedy = chat.chat("Hi", max_new_tokens=15)
    assert chat.chat("Hi", max_new_tokens=15, do_sample=True, top_k=1, seed=4) == greedy


def test_stop_strings_stop_and_trim(chat):
    full = chat.chat("Tell me more", max_new_tokens=30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    expected = full[: full.index(stop)].lstrip()
    assert chat.chat("Tell me more", max_new_tokens=30, stop_strings=[stop]) == expected
    assert "".join(chat.stream("Tell me more", max_new_tokens=30, stop_strings=stop)) == expected


def test_default_end_ids_add_end_of_utterance_from_the_chat_template(chat):
    assert idefics2.generation.default_eos_token_ids(chat.model, chat.processor) == [2, END_OF_UTTERANCE]
    assert idefics2.generation.default_eos_token_ids(chat.model, chat.processor.tokenizer) == [2]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.chat("Hi", images=[picture(0)], streamer=print), "set by the pipeline"),
        (lambda c: c.chat([{"role": "user"}]), "'role' and 'content'"),
        (lambda c: c.chat([{"role": "user", "content": [{"type": "video"}]}]), "content parts"),
        (lambda c: c.chat(CONVERSATION, images=[picture(0)]), r"2 image part\(s\) .* but 1 image"),
        (lambda c: c.chat("Hi", max_new_tokens=3, num_beams=2), "unsupported generation argument"),
    ],
)
def test_bad_requests_give_clear_errors(chat, call, message):
    with pytest.raises(ValueError, match=message):
        call(chat)
