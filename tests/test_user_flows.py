"""What a new user meets in the README's flows, on the built-in model: prompts longer than the context,
`<image>` markers in Python prompts, images given as file objects or float arrays, mistyped paths, and the
one-line errors that replace crashes and silent garbage."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import idefics2
from idefics2.cli import main
from idefics2.generation import ContextLengthError

REPO = Path(__file__).resolve().parents[1]
# an orange square, a green circle, a purple triangle and a yellow square
SHAPES = REPO / "examples" / "shapes.png"
QUESTION = "What color is the circle?"

pytestmark = pytest.mark.skipif(not SHAPES.is_file(), reason="no examples/shapes.png")


@pytest.fixture(scope="module")
def chat():
    return idefics2.pipeline()  # the built-in model: context of 512 tokens


def in_process(argv: list, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------- context length
def test_a_prompt_beyond_the_context_is_refused_with_the_numbers(chat):
    long_prompt = " ".join(["circle"] * 5000) + " " + QUESTION
    with pytest.raises(ContextLengthError) as caught:
        chat.chat(long_prompt, images=[SHAPES])
    message = str(caught.value)
    assert "context of 512 tokens" in message and "max_position_embeddings" in message
    assert caught.value.prompt_length > 5000
    assert f"the prompt has {caught.value.prompt_length} tokens" in message
    with pytest.raises(ValueError, match="context of 512 tokens"):
        next(chat.stream(long_prompt, images=[SHAPES]))
    # room for the prompt but not for max_new_tokens: the largest allowed value is named
    prompt_length = chat.prepare(QUESTION, [SHAPES])["input_ids"].shape[1]
    with pytest.raises(ValueError, match=f"lower max_new_tokens to at most {512 - prompt_length}"):
        chat.chat(QUESTION, images=[SHAPES], max_new_tokens=512)


def test_generate_command_says_so_in_one_line(capsys):
    prompt = " ".join(["circle"] * 600)
    code, out, err = in_process(["generate", "--image", SHAPES, "--prompt", prompt], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("idefics2 generate: error: the prompt has ")
    assert "context of 512 tokens" in err


def test_chat_drops_the_oldest_exchanges_when_the_history_outgrows_the_context(capsys, monkeypatch):
    from idefics2.pipelines import ChatPipeline

    calls = []  # the conversations the chat asked the model to continue, and their images
    original = ChatPipeline.stream

    def spy(self, messages, images=None, **controls):
        calls.append((messages, list(images)))
        return original(self, messages, images, **controls)

    monkeypatch.setattr(ChatPipeline, "stream", spy)
    long_message = " ".join(["circle"] * 100)  # 103 tokens: five of them outgrow 512 tokens
    lines = [f"/image {SHAPES}", QUESTION] + [long_message] * 6 + [f"/image {SHAPES}", QUESTION]
    code, out, err = in_process(["chat"], capsys, stdin="\n".join(lines) + "\n", monkeypatch=monkeypatch)
    assert code == 0 and "error" not in err
    answers = out.splitlines()
    assert len(answers) == 8 and answers[0] == "green"  # (a long history of nonsense confuses the tiny model)
    notices = [line for line in err.splitlines() if "outgrew the model's context of 512 tokens" in line]
    assert notices and all("/reset" in line for line in notices)
    answered = calls[-1][0]
    # the last call holds the newest exchanges only, starting with a user turn, with only its own image
    assert answered[0]["role"] == "user" and len(answered) < 2 * 8
    assert sum(p["type"] == "image" for m in answered for p in m["content"]) == len(calls[-1][1]) == 1
    assert chat_prompt_fits(calls[-1])


def chat_prompt_fits(call) -> bool:
    pipe = idefics2.pipeline()
    return pipe.prepare(*call)["input_ids"].shape[1] + 8 <= 512


def test_chat_says_when_one_message_alone_is_too_long_and_goes_on(capsys, monkeypatch):
    lines = [" ".join(["circle"] * 600), QUESTION]
    code, out, err = in_process(["chat"], capsys, stdin="\n".join(lines) + "\n", monkeypatch=monkeypatch)
    assert code == 0 and out.splitlines() == [out.splitlines()[0]]  # the second message is answered
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "context of 512 tokens" in errors[0]


def test_drop_oldest_exchange_takes_its_images_along():
    from idefics2.cli.chat import drop_oldest_exchange

    image, text = {"type": "image"}, {"type": "text", "text": "x"}
    turns = [
        {"role": "user", "content": [image, image, text]},
        {"role": "assistant", "content": [text]},
        {"role": "user", "content": [image, text]},
    ]
    rest, images = drop_oldest_exchange(turns, ["a", "b", "c"])
    assert rest == turns[2:] and images == ["c"]


# ---------------------------------------------------------------------------------- prompts and images
def test_image_markers_in_a_python_prompt_place_the_images(chat):
    assert chat.chat("<image>" + QUESTION, images=[SHAPES]) == "green"
    assert chat.chat(QUESTION + "<image>", images=[SHAPES]) == chat.chat(
        [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}], [SHAPES]
    )
    with pytest.raises(ValueError, match=r"the prompt has 2 <image> marker\(s\) but 1 image\(s\)"):
        chat.chat("<image><image>" + QUESTION, images=[SHAPES])
    # a marker inside a conversation's text is an image place too, and is counted as the user wrote it
    conversation = [{"role": "user", "content": [{"type": "text", "text": "<image>" + QUESTION}]}]
    assert chat.chat(conversation, images=[SHAPES]) == "green"
    with pytest.raises(ValueError, match=r"have 1 image part\(s\) \(counting <image> markers.*but 2 image"):
        chat.chat(conversation, images=[SHAPES, SHAPES])


def test_file_objects_are_images(chat, tmp_path):
    raw = SHAPES.read_bytes()
    assert chat.chat(QUESTION, images=[io.BytesIO(raw)]) == "green"
    with open(SHAPES, "rb") as file:
        assert chat.chat(QUESTION, images=file) == "green"
    with pytest.raises(ValueError, match="StringIO gave str, not bytes: open the file in binary mode"):
        chat.chat(QUESTION, images=[io.StringIO("text")])
    with pytest.raises(ValueError, match="image file object BytesIO is not a readable image"):
        chat.chat(QUESTION, images=[io.BytesIO(b"not an image")])


def test_float_arrays_in_the_unit_range_are_read_as_images(chat):
    pixels = np.asarray(Image.open(SHAPES).convert("RGB"))
    assert chat.chat(QUESTION, images=[pixels]) == "green"
    assert chat.chat(QUESTION, images=[pixels / 255.0]) == "green"
    assert chat.chat(QUESTION, images=[torch.from_numpy(pixels / 255.0).float()]) == "green"
    assert chat.chat(QUESTION, images=[pixels.astype(np.float32)]) == "green"  # whole numbers: 0-255


def test_an_unpadded_batch_reports_the_image_count_first(chat):
    prompts = ["<image>a", "b b b b <image>", "c"]
    with pytest.raises(ValueError, match=r"the prompts hold 2 <image> token\(s\) in all \(\[1, 1, 0\] per"):
        chat.processor(text=prompts, images=[SHAPES], return_tensors="pt")


def test_image_paths_in_chat_expand_the_home_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.png").write_bytes(SHAPES.read_bytes())
    lines = ["/image ~/x.png", QUESTION]
    code, out, err = in_process(["chat"], capsys, stdin="\n".join(lines) + "\n", monkeypatch=monkeypatch)
    assert code == 0 and "error" not in err and out == "green\n"


def test_a_mistyped_adapter_folder_is_named_without_trying_the_hub(capsys, monkeypatch, tmp_path):
    (tmp_path / "ad2" / "checkpoint-10").mkdir(parents=True)
    (tmp_path / "ad2" / "checkpoint-10" / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    for name, hint in [
        ("ad3/checkpoint-20", "there is no folder ad3 either"),
        ("ad2/checkpoint-20", "ad2 holds: checkpoint-10"),
    ]:
        code, out, err = in_process(["generate", "--prompt", "x", "--adapter", name], capsys)
        assert code == 2 and err == f"idefics2 generate: error: --adapter: no such folder: {name}; {hint}\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_loading_on_cuda_without_a_gpu_is_one_line():
    from idefics2 import Idefics2ForConditionalGeneration

    with pytest.raises(ValueError, match="^device='cuda': no CUDA GPU is available on this machine$"):
        Idefics2ForConditionalGeneration.from_pretrained(idefics2.assets.builtin_model_dir(), device="cuda")
    with pytest.raises(ValueError, match="device='tpu' is not a device torch knows"):
        idefics2.pipeline(device="tpu")


def test_assets_is_reachable_after_a_plain_import():
    check = "import idefics2; print(idefics2.assets.builtin_model_dir().name)"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "builtin\n", run.stderr
