"""What the fuzzing campaign found, one test per finding: each input used to end in a dependency's error (or a
crash of the whole command) and now gives a ValueError/TypeError naming the problem, or works.

Also checks the campaign's judge (`is_deliberate`): a test that cannot fail is worth nothing.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from fuzz_surfaces import base_checkpoint, builtin_pipeline, builtin_processor, encode_image, is_deliberate
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.cli import main
from idefics2.hub import CheckpointError, CheckpointNotFoundError
from idefics2.lora import LoraConfig
from idefics2.training.data import DataError, normalize_example, read_jsonl


def test_the_judge_tells_our_errors_from_a_dependencys():
    tokenizer = builtin_processor().tokenizer
    with pytest.raises(TypeError) as raw:
        tokenizer.backend.encode("a\ud800")  # tokenizers' own TypeError
    assert not is_deliberate(raw.value)
    with pytest.raises(ValueError) as ours:
        tokenizer.encode("a\ud800")
    assert is_deliberate(ours.value)
    try:  # a dependency's ValueError under a location prefix is still the dependency's
        try:
            int("x")
        except ValueError as error:
            raise ValueError(f"sample 0, image 0: {error}") from error
    except ValueError as wrapped:
        assert not is_deliberate(wrapped)


# ---- text --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.tokenizer.encode("ab\ud800c"),
        lambda p: p.tokenizer.tokenize("ab\ud800c"),
        lambda p: p.tokenizer(["fine", "ab\ud800c"]),
        lambda p: p(text="ab\ud800c"),
        lambda p: p.apply_chat_template([{"role": "user", "content": "ab\ud800c"}], tokenize=True),
    ],
)
def test_a_lone_surrogate_is_rejected_with_its_position(call):
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at position 2"):
        call(builtin_processor())


def test_decode_rejects_negative_and_non_integer_ids_and_drops_ids_beyond_the_vocabulary():
    processor = builtin_processor()
    tokenizer = processor.tokenizer
    with pytest.raises(ValueError, match="must not be negative, got -1 at position 0"):
        processor.batch_decode([[-1]])  # was tokenizers' OverflowError
    with pytest.raises(ValueError, match="negative"):
        tokenizer.convert_ids_to_tokens(-1)
    with pytest.raises(TypeError, match="must be integers"):
        tokenizer.decode([1.5])
    with pytest.raises(TypeError, match="must be integers"):
        tokenizer.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="batch_decode takes several"):
        tokenizer.decode(np.array([[1, 2]]))
    with pytest.raises(TypeError, match="list of id sequences"):
        processor.batch_decode(None)
    ids = tokenizer.encode("red circle", add_special_tokens=False)
    # The built-in model has 512 embedding rows for 382 tokens: sampling can pick the extra ones.
    beyond = [len(tokenizer), 511, 2**32, 2**70]
    assert tokenizer.decode(ids + beyond) == tokenizer.decode(ids) == "red circle"
    assert tokenizer.convert_ids_to_tokens([len(tokenizer)]) == [None]


# ---- images ------------------------------------------------------------------------------------------------
def pixels(image, **options):
    return builtin_processor().image_processor([image], **options)["pixel_values"]


def test_premultiplied_alpha_la_images_convert_like_la():
    la = PIL.Image.merge("LA", [PIL.Image.new("L", (6, 5), 90), PIL.Image.new("L", (6, 5), 255)])
    assert torch.equal(pixels(la.convert("La")), pixels(la))  # was Pillow's "conversion not supported"


def test_a_lazily_opened_truncated_file_is_a_clear_error():
    data = encode_image("PNG", "RGB", 40, 30, 0)
    image = PIL.Image.open(io.BytesIO(data[: len(data) // 2]))  # opens: only the header is read
    with pytest.raises(ValueError, match="could not be decoded .truncated or corrupt"):
        pixels(image)  # was Pillow's OSError


@pytest.mark.parametrize("data", [b"P6\n" + b"\x8a" * 8, b"P6", b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00MM"])
def test_corrupt_headers_are_clear_errors(data):
    with pytest.raises(ValueError, match="image bytes (could not be decoded|is not a readable image)"):
        pixels(data)  # was Pillow's ValueError / SyntaxError


def test_tensors_of_any_dtype_or_layout():
    base = torch.randint(0, 256, (3, 12, 10)).float()  # levels that bfloat16 holds exactly
    reference = pixels(base)
    for tensor in (base.to(torch.bfloat16), base.to_sparse(), base[:, :1].expand(3, 12, 10).clone()):
        assert torch.equal(pixels(tensor), pixels(tensor.to_dense() if tensor.is_sparse else tensor.float()))
    assert torch.equal(pixels(base.to(torch.bfloat16)), reference)  # was "unsupported ScalarType BFloat16"
    assert torch.equal(pixels(base.to_sparse()), reference)  # was "can't convert Sparse layout tensor"
    with pytest.raises(ValueError, match="meta device"):
        pixels(base.to("meta"))  # was NotImplementedError
    with pytest.raises(ValueError, match="complex"):
        pixels(base.to(torch.complex64))


# ---- chat messages -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"role": 5, "content": "hi"}], "role must be a non-empty str"),  # was jinja's "no attribute"
        ([{"role": "user", "content": [{"type": "video"}]}], "content parts"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "the text must be a str"),
        ([[[[{"role": "user", "content": "hi"}] * 2]]], "message 0 must be a dict"),
    ],
)
def test_bad_messages_name_the_problem(messages, problem):
    with pytest.raises(ValueError, match=problem):
        builtin_processor().apply_chat_template(messages)


def test_deeply_nested_messages_are_a_clear_error():
    deep = {"role": "user", "content": "hi"}
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match=r"message 0 must be a dict .*got \[\[\[\[\.\.\.\]\]\]\]$"):
        builtin_pipeline().prepare(deep)  # was a RecursionError while writing the message


def test_a_failing_chat_template_is_a_value_error():
    processor = builtin_processor()
    with pytest.raises(ValueError, match="the chat template failed: ZeroDivisionError"):
        processor.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ 1 / 0 }}")


# ---- checkpoints -------------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(base_checkpoint(), folder)
    return folder


def edit_config(folder, section, key, value):
    config = json.loads((folder / "config.json").read_text())
    (config[section] if section else config)[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "section, key, value, problem",
    [
        ("text_config", "rope_parameters", "x", "rope_parameters must be an object"),  # was AttributeError
        ("text_config", "pad_token_id", "x", "pad_token_id must be a non-negative token id"),  # was TypeError
        ("text_config", "rms_norm_eps", "x", "rms_norm_eps must be a finite number"),  # failed in forward
        ("vision_config", "attention_dropout", 1.5, r"attention_dropout must be a finite number \[0, 1\)"),
        ("text_config", "hidden_size", 2**40, "at most 2147483647"),  # was an overflow in torch
        (
            "vision_config",
            "num_attention_heads",
            3,
            "hidden_size 16 is not divisible by num_attention_heads 3",
        ),
        (None, "image_token_id", -1, "image_token_id must be a non-negative token id"),
        (None, "tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ],
)
def test_bad_config_values_name_the_key(checkpoint, section, key, value, problem):
    edit_config(checkpoint, section, key, value)
    with pytest.raises(ValueError, match=problem) as error:
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    assert "config.json" in str(error.value)


def test_absurd_layer_counts_are_refused_before_building(checkpoint):
    edit_config(checkpoint, "text_config", "num_hidden_layers", 2**31 - 1)
    with pytest.raises(
        CheckpointError, match="num_hidden_layers = 2147483647 layers but the checkpoint holds"
    ):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint)  # used to build them first


def test_sizes_whose_tensors_overflow_are_refused(checkpoint):
    edit_config(checkpoint, "vision_config", "image_size", 2**31 - 1)
    edit_config(checkpoint, "vision_config", "patch_size", 1)
    with pytest.raises(CheckpointError, match="cannot be built"):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint)


def test_integer_weights_are_refused(checkpoint):
    from idefics2.loading import read_safetensors, write_safetensors

    tensors = dict(read_safetensors(checkpoint / "model.safetensors"))
    name = "model.text_model.norm.weight"
    tensors[name] = tensors[name].to(torch.int64)  # used to be converted to float silently
    write_safetensors(checkpoint / "model.safetensors", {k: v.clone() for k, v in tensors.items()})
    with pytest.raises(CheckpointError, match=rf"not floating point \(1\):\n  {name}: int64"):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint)


@pytest.mark.parametrize(
    "file, content, problem",
    [
        ("config.json", "[" * 100_000, "model config: JSON nested too deeply"),  # was RecursionError
        ("processor_config.json", b"\xff\xfe", "processor config: not UTF-8 text"),  # was UnicodeDecodeError
        ("tokenizer.json", "{}", "not a valid tokenizer file"),  # was tokenizers' bare Exception
        (
            "tokenizer_config.json",
            '{"model_max_length": "long"}',
            "model_max_length must be a positive number",
        ),
        (
            "processor_config.json",
            '{"image_processor": {"size": {"height": -8, "width": 8}}}',
            "size must hold",
        ),
        ("chat_template.jinja", b"\x80", "not UTF-8 text"),
    ],
)
def test_corrupt_processor_and_config_files(checkpoint, file, content, problem):
    path = checkpoint / file
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    load = Idefics2Processor if file != "config.json" else Idefics2Config
    with pytest.raises(ValueError, match=problem):
        load.from_pretrained(checkpoint)


def test_a_missing_file_is_both_file_not_found_and_value_error(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="no config.json") as error:
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("eos_token_id", 2**64, "eos_token_id must be a token id"),  # was torch's overflow while generating
        ("max_length", "long", "max_length must be an integer"),  # was Python's TypeError
    ],
)
def test_bad_generation_config_values(checkpoint, key, value, problem):
    path = checkpoint / "generation_config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k != "max_new_tokens"}
    path.write_text(json.dumps({**config, key: value}))
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    processor = Idefics2Processor.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match=problem):
        model.generate(**processor(text="Hi", return_tensors="pt"), tokenizer=processor)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda c: c.update(r="8"), "rank r"),  # was int("8") passing, or a TypeError
        (lambda c: c.update(lora_dropout="x"), "LoRA dropout"),
        (lambda c: c.update(target_modules=5), "target_modules must be"),
        (lambda c: c.update(rank_pattern=[1]), "rank_pattern must map"),
    ],
)
def test_bad_adapter_configs(checkpoint, change, problem):
    path = checkpoint / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=problem):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint, adapter=checkpoint / "adapter")


def test_adapter_tensors_must_be_matrices(checkpoint):
    from safetensors.torch import load_file, save_file

    path = checkpoint / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[next(iter(tensors))] = torch.zeros(())  # was an IndexError
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="must be a 2-D floating-point matrix"):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint, adapter=checkpoint / "adapter")


def test_lora_config_checks_its_types():
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(r="8")
    with pytest.raises(ValueError, match="alpha"):
        LoraConfig(lora_alpha=float("nan"))


# ---- training data -----------------------------------------------------------------------------------------
def test_training_data_lines_are_read_one_by_one(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = tmp_path / "train.jsonl"
    for bad, problem in [
        (b"\xff\xfe{}", "train.jsonl:2: not UTF-8 text"),  # was a UnicodeDecodeError without a line
        (b"[" * 100_000, "train.jsonl:2: invalid JSON: nested too deeply"),  # was a RecursionError
        (b'{"a": ' + b"9" * 5000 + b"}", "train.jsonl:2: invalid JSON: a number with too many digits"),
    ]:
        path.write_bytes(json.dumps(good).encode() + b"\n" + bad + b"\n")
        with pytest.raises(DataError, match=problem):
            read_jsonl(path)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a\ud800", "lone surrogate"),  # was accepted, then tokenizers' TypeError while encoding
        ("look: <image>", "put images in"),  # was accepted, then a count mismatch in the middle of training
    ],
)
def test_training_text_is_checked_when_read(text, problem):
    example = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=f"messages\\[0\\].content\\[0\\]: .*{problem}"):
        normalize_example(example)


def test_train_reports_an_invalid_utf8_line_on_one_line(tmp_path, capsys):
    from idefics2.assets import builtin_model_dir

    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"messages": []}\xff\n')
    argv = [
        "train",
        "--model",
        str(builtin_model_dir()),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.jsonl:1: not UTF-8 text" in err


# ---- idefics2 batch ----------------------------------------------------------------------------------------
def test_batch_answers_each_line_whatever_the_others_hold(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(encode_image("PNG", "RGB", 30, 20, 1))
    lines = [
        json.dumps({"id": 1, "prompt": "What color is the circle?", "images": ["a.png"]}).encode(),
        b'{"id": 2, "prompt": "\xff"}',  # not UTF-8: used to stop the whole run
        json.dumps({"id": 3, "prompt": "a\u2028b"}, ensure_ascii=False).encode(),  # one line, not two
        b"[" * 50_000,  # used to crash the run with a RecursionError
        json.dumps({"id": "\ud800", "prompt": "\ud800"}).encode(),  # valid JSON: used to crash the writer
        json.dumps({"id": 6, "prompt": "x", "images": ["a" * 5000 + ".png"]}).encode(),  # name too long
        json.dumps({"id": 7, "prompt": "Is there any red circle?"}).encode(),
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    argv = [
        "batch",
        "--input",
        str(source),
        "--output",
        str(target),
        "--no-progress",
        "--max-new-tokens",
        "3",
    ]
    assert main(argv) == 0
    out = [json.loads(line) for line in target.read_text(encoding="utf-8").split("\n") if line]
    assert [r["id"] for r in out] == [1, None, 3, None, "\ud800", 6, 7]
    answered, failed = ["finish_reason", "id", "text"], ["error", "id"]
    assert [sorted(r) for r in out] == [answered, failed, answered, failed, failed, failed, answered]
    assert (
        "line 2: not UTF-8" in out[1]["error"]
        and "line 4: invalid JSON: nested too deeply" in out[3]["error"]
    )
    assert "lone surrogate" in out[4]["error"] and "File name too long" in out[5]["error"]
