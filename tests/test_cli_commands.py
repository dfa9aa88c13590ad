"""`idefics2 generate | chat | batch | eval` end to end on a tiny random checkpoint with a processor.

The answers are compared with transformers' greedy generation on the same checkpoint (the oracle), one prompt
at a time: so the command's prompt building (chat template, images first or at <image> markers, history in
chat) and its batched, left-padded generation are checked, not only that it prints something.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefics2 import Idefics2Processor
from idefics2.cli import main
from idefics2.shapes import QUESTION_TYPES
from test_distributed import build_model_folder

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 6
END_IDS = [2, 32002]  # </s> and <end_of_utterance> in the tiny checkpoint's vocabulary


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three noise images of different sizes (so the answers depend on the pixels), and a broken file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 56), "b.png": (56, 30), "c.png": (28, 28)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def greedy_answerer(model, processor):
    """answer(messages, image paths) -> transformers' greedy reply, decoded without special tokens."""

    def answer(messages: list[dict], paths: list[Path]) -> str:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        pictures = [Image.open(p).convert("RGB") for p in paths]
        inputs = processor(text=prompt, images=[pictures] if pictures else None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=END_IDS, pad_token_id=0
            )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in END_IDS), len(new))]
        return processor.decode(new, skip_special_tokens=True).lstrip()

    return answer


def reference(model_dir: Path):
    from transformers import AutoProcessor
    from transformers import Idefics2ForConditionalGeneration as Reference

    model = Reference.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def oracle(model_dir):
    return greedy_answerer(*reference(model_dir))


def user(*parts) -> dict:
    """A user turn: Path parts are images, str parts are text."""
    content = [{"type": "image"} if isinstance(p, Path) else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


def cli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if args and args[0] in ("generate", "chat", "batch") and "--dtype" not in args and "--help" not in args:
        # the oracle runs in float32; --dtype auto would pick bfloat16 on CPUs with bfloat16 instructions
        args = (*args, "--dtype", "float32")
    command = [sys.executable, "-m", "idefics2.cli", *map(str, args)]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:  # argparse: --help, bad flags
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- generate
def test_generate_puts_the_images_first_and_matches_the_oracle(model_dir, images, oracle):
    a, b = images / "a.png", images / "b.png"
    run = cli("generate", "--model", model_dir, "--image", a, "--image", b, "--prompt", "Compare them.",
              "--max-new-tokens", MAX_NEW)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == oracle([user(a, b, "Compare them.")], [a, b]) + "\n"


def test_generate_streams_with_images_at_the_markers(model_dir, images, oracle):
    a, b = images / "a.png", images / "b.png"
    prompt = "Is <image> brighter than <image>?"
    run = cli("generate", "--model", model_dir, "--image", a, "--image", b, "--prompt", prompt,
              "--max-new-tokens", MAX_NEW, "--stream", "--dtype", "float32", "--device", "cpu")  # fmt: skip
    assert run.returncode == 0, run.stderr
    expected = oracle([user("Is ", a, " brighter than ", b, "?")], [a, b])
    assert expected != oracle([user(a, b, prompt.replace("<image>", "it"))], [a, b])  # placement matters
    assert run.stdout == expected + "\n"


def test_generate_sampling_follows_the_seed(model_dir, capsys):
    base = ["generate", "--model", model_dir, "--prompt", "Tell a story.", "--max-new-tokens", "8"]
    answers = []
    for seed in ("1", "1", "2"):
        code, out, err = in_process(
            [*base, "--temperature", "1.5", "--top-p", "0.99", "--seed", seed], capsys
        )
        assert code == 0, err
        answers.append(out)
    assert answers[0] == answers[1] and answers[0] != answers[2]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft on transformers 5
def test_generate_applies_a_lora_adapter(model_dir, images, oracle, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = reference(model_dir)
    torch.manual_seed(0)  # random B (init_lora_weights=False): the adapter changes the answers
    config = LoraConfig(r=4, lora_alpha=32, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    a = images / "a.png"
    run = cli("generate", "--model", model_dir, "--adapter", tmp_path / "adapter", "--image", a,
              "--prompt", "What is it?", "--max-new-tokens", MAX_NEW)  # fmt: skip
    assert run.returncode == 0, run.stderr
    expected = greedy_answerer(peft_model, processor)([user(a, "What is it?")], [a])
    assert expected != oracle([user(a, "What is it?")], [a])
    assert run.stdout == expected + "\n"


# -------------------------------------------------------------------------------------------------- chat
def test_chat_keeps_history_attaches_images_and_resets(model_dir, images, oracle):
    a, b = images / "a.png", images / "b.png"
    script = [
        f"/image {a}",
        "What is this?",
        "And the background?",  # a follow-up: the whole conversation (with the image) is the prompt
        f"/image {images / 'missing.png'}",  # a bad path: one line, the chat goes on
        f"/image {images / 'broken.png'}",
        "/image",
        "/bogus",
        "",
        "/reset",
        "Describe <image>.",  # a marker but no image attached: an error, not an exit
        f"/image {b}",
        "Describe <image>.",
        "/quit",
        "never answered",
    ]
    run = cli("chat", "--model", model_dir, "--max-new-tokens", MAX_NEW, stdin="\n".join(script) + "\n")
    assert run.returncode == 0, run.stderr
    first = oracle([user(a, "What is this?")], [a])
    turns = [user(a, "What is this?"), {"role": "assistant", "content": [{"type": "text", "text": first}]},
             user("And the background?")]  # fmt: skip
    second = oracle(turns, [a])
    third = oracle([user("Describe ", b, ".")], [b])
    assert run.stdout == f"{first}\n{second}\n{third}\n"
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 5 and "Traceback" not in run.stderr
    assert "missing.png" in errors[0] and "broken.png" in errors[1] and "usage: /image PATH" in errors[2]
    assert "/bogus" in errors[3] and "1 <image> marker(s) but 0 image(s)" in errors[4]


def test_chat_ends_at_end_of_input(model_dir, images, oracle):
    run = cli("chat", "--model", model_dir, "--max-new-tokens", MAX_NEW, stdin="Hello")  # no newline, EOF
    assert run.returncode == 0, run.stderr
    assert run.stdout == oracle([user("Hello")], []) + "\n"


# ------------------------------------------------------------------------------------------------- batch
def test_batch_answers_in_order_and_reports_bad_lines(model_dir, images, oracle, tmp_path):
    a, b, c = (images / n for n in ("a.png", "b.png", "c.png"))
    lines = [
        {"id": 1, "images": ["a.png"], "prompt": "What is it?"},
        {"id": "two", "images": ["a.png", "b.png"], "prompt": "Compare <image> with <image>."},
        "{not json",
        "",
        {"id": 4, "images": ["missing.png"], "prompt": "x"},
        {"id": 5, "images": ["broken.png"], "prompt": "x"},
        {"id": 6, "images": ["a.png"], "prompt": "<image> and <image>"},
        {"id": 7, "prompt": "Text only."},
        {"id": 8, "images": [str(c), "b.png"], "prompt": "Which one?"},  # absolute and relative paths
        ["not", "an", "object"],
        {"id": 10, "images": "a.png", "prompt": "x"},
        {"id": 11, "images": []},
        {"id": 12, "images": ["c.png"], "prompt": "Last."},
    ]
    source = images / "in.jsonl"
    source.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    target = tmp_path / "out.jsonl"
    run = cli("batch", "--model", model_dir, "--input", source, "--output", target, "--batch-size", 3,
              "--max-new-tokens", MAX_NEW)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "12/12" in run.stderr and "line/s" in run.stderr and "tok/s" in run.stderr  # tqdm progress bar
    assert "(7 error(s))" in run.stderr
    results = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in results] == [1, "two", None, 4, 5, 6, 7, 8, None, 10, 11, 12]

    expected = {
        0: oracle([user(a, "What is it?")], [a]),
        1: oracle([user("Compare ", a, " with ", b, ".")], [a, b]),
        6: oracle([user("Text only.")], []),
        7: oracle([user(c, b, "Which one?")], [c, b]),
        11: oracle([user(c, "Last.")], [c]),
    }
    for i, result in enumerate(results):
        if i in expected:
            assert result == {"id": result["id"], "text": expected[i].strip(), "finish_reason": "length"}, i
        else:
            assert set(result) == {"id", "error"}, result
    problems = {
        2: "line 3: invalid JSON",
        3: "line 5: image not found",
        4: "line 6: image file",
        5: "line 7: the prompt has 2 <image> marker(s) but 1 image(s)",
        8: "line 10: expected a JSON object",
        9: 'line 11: "images" must be a list',
        10: 'line 12: "prompt" must be a non-empty string',
    }
    for i, problem in problems.items():
        assert results[i]["error"].startswith(problem), results[i]


def test_batch_isolates_a_request_that_fails_in_generation(model_dir, tmp_path, capsys, monkeypatch):
    from idefics2.decoding.runner import ModelRunner

    embed, tokenizer = ModelRunner.embed_prompt, Idefics2Processor.from_pretrained(model_dir).tokenizer

    def failing_on_poison(self, input_ids, image_features):
        if "POISON" in tokenizer.decode(input_ids):
            raise RuntimeError("this prompt\ncannot be answered")
        return embed(self, input_ids, image_features)

    monkeypatch.setattr(ModelRunner, "embed_prompt", failing_on_poison)
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = ["one", "POISON", "three", "four"]
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    argv = ["batch", "--model", model_dir, "--input", source, "--output", target, "--max-batch", 4,
            "--max-new-tokens", 2, "--no-progress"]  # fmt: skip
    code, _, err = in_process(argv, capsys)
    assert code == 0, err
    assert "line/s" not in err and "(1 error(s))" in err  # no progress bar
    results = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in results] == [0, 1, 2, 3]
    assert results[1] == {"id": 1, "error": "line 2: RuntimeError: this prompt cannot be answered"}
    assert all("text" in r for i, r in enumerate(results) if i != 1)


def test_batch_lone_surrogate_and_bad_overrides_fail_their_line_only(model_dir, tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        '{"id": 0, "prompt": "fine"}',
        '{"id": 1, "prompt": "lone \\ud800 surrogate"}',
        '{"id": 2, "prompt": "fine", "max_new_tokens": 0}',
        '{"id": 3, "prompt": "fine", "temperature": "hot"}',
        '{"id": 4, "prompt": "fine", "seed": 3}',
        '{"id": 5, "prompt": "fine", "stop": []}',
        '{"id": 6, "prompt": "fine", "max_new_tokens": 3, "temperature": 0.7, "seed": 1, "stop": "zzz"}',
    ]
    source.write_text("\n".join(lines) + "\n")
    argv = ["batch", "--model", model_dir, "--input", source, "--output", target, "--max-new-tokens", 2,
            "--no-progress", "--dtype", "float32"]  # fmt: skip
    code, _, err = in_process(argv, capsys)
    assert code == 0, err
    results = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in results] == list(range(7))
    assert "text" in results[0] and results[0]["finish_reason"] in ("stop", "length")
    assert results[1]["error"].startswith("line 2: ")
    assert '"max_new_tokens": expected a positive integer' in results[2]["error"]
    assert '"temperature" must be a number' in results[3]["error"]
    assert "--seed needs sampling" in results[4]["error"]
    assert '"stop" must be a non-empty string' in results[5]["error"]
    assert "text" in results[6] and "error" not in results[6]


def test_batch_keeps_what_is_answered_when_interrupted(
    model_dir, tmp_path, capsys, monkeypatch, interrupted_third_submit
):
    from idefics2.serving.engine import Engine

    monkeypatch.setattr(Engine, "submit", interrupted_third_submit)
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}"}) + "\n" for i in range(5)))
    argv = ["batch", "--model", model_dir, "--input", source, "--output", target, "--max-new-tokens", 2,
            "--no-progress"]  # fmt: skip
    code, _, err = in_process(argv, capsys)
    assert code == 130 and "interrupted" in err
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == [0, 1]


# -------------------------------------------------------------------------------------------------- eval
def test_eval_prints_the_accuracy_per_question_type(model_dir):
    run = cli("eval", "--model", model_dir, "--num-per-type", 1, "--batch-size", 7, "--seed", 3,
              "--renderer", "analytic")  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = dict(line.rsplit(None, 1) for line in run.stdout.splitlines()[1:])
    assert list(rows) == [*QUESTION_TYPES, "overall"]
    scores = {k: float(v) for k, v in rows.items()}
    assert all(v in (0.0, 1.0) for k, v in scores.items() if k != "overall")  # one question each
    assert scores["overall"] == pytest.approx(sum(scores[q] for q in QUESTION_TYPES) / 7, abs=1e-3)


# ------------------------------------------------------------------------------- help and user mistakes
def test_help_on_every_command_and_no_heavy_imports():
    for command in ([], ["generate"], ["chat"], ["batch"], ["eval"], ["train"]):
        run = cli(*command, "--help")
        assert run.returncode == 0 and run.stdout.startswith(f"usage: idefics2 {' '.join(command)}".rstrip())
    assert all(name in run.stdout for name in ("--model", "--data", "--output"))  # train keeps its flags
    check = "import sys; from idefics2.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout == "False\n"
    script = shutil.which("idefics2")  # the console script pip installs
    if script:
        run = subprocess.run([script, "generate", "--help"], capture_output=True, text=True)
        assert run.returncode == 0 and "--prompt TEXT" in run.stdout


def test_user_mistakes_exit_2_with_one_line_from_the_process(model_dir, images):
    cases = [
        (
            ["generate", "--model", model_dir, "--image", images / "nope.png", "--prompt", "x"],
            "image not found",
        ),
        (["generate", "--model", model_dir], "the following arguments are required: --prompt"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ]
    for argv, problem in cases:
        run = cli(*argv)
        assert run.returncode == 2 and run.stdout == ""
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("idefics2") and problem in run.stderr


@pytest.fixture(scope="module")
def mistakes(model_dir, images, tmp_path_factory):
    """(argv, part of the one-line message) for user mistakes of every command."""
    folder = tmp_path_factory.mktemp("mistakes")
    (folder / "empty.jsonl").write_text("\n\n")
    (folder / "good.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    (folder / "not_an_adapter").mkdir()
    m, a = ["--model", str(model_dir)], str(images / "a.png")
    gen = ["generate", *m, "--image", a, "--prompt"]
    good = str(folder / "good.jsonl")
    return [
        ([*gen, "x", "--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer"),
        ([*gen, "x", "--temperature", "-1"], "--temperature: expected a number in [0, 100]"),
        ([*gen, "x", "--top-p", "0"], "--top-p: expected a number in (0, 1]"),
        ([*gen, "x", "--dtype", "int8"], "--dtype: invalid choice"),
        ([*gen, "x", "--device", "tpu"], "--device: invalid choice"),
        ([*gen, "   "], "--prompt is empty"),
        ([*gen, "<image> <image>"], "the prompt has 2 <image> marker(s) but 1 image(s)"),
        ([*gen, "x", "--temperature", "0", "--seed", "1"], "--seed needs sampling"),
        ([*gen, "x", "--seed", "1"], "--seed needs sampling"),  # the checkpoint decodes greedily
        ([*gen, "x", "--temperature", "0", "--top-p", ".5"], "--top-p needs sampling"),
        (["generate", "--model", str(images), "--prompt", "x"], "is not a checkpoint: it has no config.json"),
        (["generate", "--model", "no-such-model", "--prompt", "x"], "neither an existing folder nor a hub"),
        (["generate", "--model", "owner/not-cached", "--prompt", "x"], "could not load 'owner/not-cached'"),
        ([*gen, "x", "--adapter", str(folder / "nothing")], "--adapter: "),
        ([*gen, "x", "--adapter", str(folder / "not_an_adapter")], "has no adapter_config.json"),
        (["generate", *m, "--image", str(images / "broken.png"), "--prompt", "x"], "not a readable image"),
        (["generate", *m, "--image", str(images), "--prompt", "x"], "is a folder, not an image file"),
        (["chat", *m, "--temperature", "hot"], "--temperature: expected a number"),
        (["batch", *m, "--input", str(folder / "none.jsonl"), "--output", "o.jsonl"], "input file not found"),
        (
            ["batch", *m, "--input", str(folder / "empty.jsonl"), "--output", str(folder / "o")],
            "holds no lines",
        ),
        (["batch", *m, "--input", good, "--output", good], "must not be the --input file"),
        (
            ["batch", *m, "--input", good, "--output", str(folder / "no" / "o")],
            "output folder does not exist",
        ),
        (["batch", *m, "--input", good], "the following arguments are required: --output"),
        (["batch", *m, "--input", good, "--output", "o", "--batch-size", "0"], "--batch-size: expected"),
        (["eval", *m, "--num-per-type", "-3"], "--num-per-type: expected a positive integer"),
        (["eval", *m, "--jpeg-quality", "200"], "--jpeg-quality: expected a number in [1, 95], got"),
        (["eval", "--model"], "--model: expected one argument"),
    ]


def test_user_mistakes_are_one_line_and_exit_2(mistakes, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, problem in mistakes:
        code, out, err = in_process(argv, capsys)
        assert code == 2 and out == "", (argv, err)
        assert err.count("\n") == 1 and err.startswith(f"idefics2 {argv[0]}: error: "), (argv, err)
        assert problem in err, (argv, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_without_a_gpu_is_a_user_mistake(model_dir, capsys):
    code, _, err = in_process(["generate", "--model", model_dir, "--prompt", "x", "--device", "cuda"], capsys)
    assert code == 2 and err == "idefics2 generate: error: --device cuda: no CUDA GPU is available\n"


# ------------------------------------------------------------------------------------ the built-in model
def _builtin_model_present() -> bool:
    try:
        from idefics2.assets import builtin_model_dir

        builtin_model_dir()
    except (ImportError, OSError):
        return False
    return True


builtin = pytest.mark.skipif(not _builtin_model_present(), reason="the built-in model is not in this tree")


@builtin
@pytest.mark.skipif(not (REPO / "examples" / "shapes.png").is_file(), reason="no examples/shapes.png")
def test_readme_command_answers_the_example_image():
    # examples/shapes.png holds four shapes: an orange square, a green circle, a purple triangle and a
    # yellow square (see scripts/build_builtin_model.py)
    question = "What color is the circle?"  # the README's first command
    run = cli("generate", "--image", "examples/shapes.png", "--prompt", question, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "green\n"
    question = "Is there any blue square?"
    run = cli("generate", "--image", "examples/shapes.png", "--prompt", question, "--stream", cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "no\n"


@builtin
def test_eval_of_the_builtin_model():
    run = cli("eval", "--num-per-type", 20, "--seed", 5)
    assert run.returncode == 0, run.stderr
    overall = float(run.stdout.splitlines()[-1].split()[-1])
    # answering every type with its most frequent answer scores about 0.36; the model answers ~99% of the
    # held-out questions
    assert overall >= 0.9, run.stdout


def test_batch_structured_output_from_flags_and_lines(tmp_path, capsys):
    """--json-schema for every line, a line's own json_schema or regex instead, a bad schema on its line."""
    from idefics2.constrained import compile_grammar

    shapes = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    color = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", "yellow", "purple",
             "orange"]}}, "required": ["color"], "additionalProperties": False}  # fmt: skip
    count = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["count"], "additionalProperties": False}  # fmt: skip
    lines = [
        {"id": 0, "images": [str(shapes)], "prompt": "Answer in JSON. What color is the circle?"},
        {"id": 1, "images": [str(shapes)], "prompt": "Answer in JSON. How many squares are there?",
         "json_schema": count},
        {"id": 2, "images": [str(shapes)], "prompt": "How many squares are there?", "regex": "[0-9]"},
        {"id": 3, "prompt": "x", "json_schema": {"type": "no-such-type"}},
        {"id": 4, "prompt": "x", "json_schema": "not an object"},
    ]  # fmt: skip
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["batch", "--input", source, "--output", target, "--json-schema", json.dumps(color),
            "--no-progress", "--dtype", "float32"]  # fmt: skip
    code, _, err = in_process(argv, capsys)
    assert code == 0, err
    results = [json.loads(line) for line in target.read_text().splitlines()]
    assert json.loads(results[0]["text"]) == {"color": "green"}
    assert json.loads(results[1]["text"]) == {"count": 2}
    assert results[2]["text"] == "2"
    assert "invalid" in results[3]["error"] and '"json_schema" must be' in results[4]["error"]
    from idefics2.assets import builtin_model_dir

    processor = Idefics2Processor.from_pretrained(builtin_model_dir())
    assert compile_grammar(processor, json_schema=color).matches(results[0]["text"])


def test_batch_engine_budgets_change_the_schedule_not_the_answers(tmp_path, capsys, monkeypatch):
    """--prefill-chunk and --vision-chunk reach the engine; tiny budgets (prompts in 8-token chunks, one
    request's images at a time) give the default budgets' answers."""
    from idefics2.serving import Engine

    seen = []
    original = Engine.__init__

    def recording(self, *args, **options):
        seen.append(options)
        original(self, *args, **options)

    monkeypatch.setattr(Engine, "__init__", recording)
    shapes = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    questions = ["What color is the circle?", "How many squares are there?", "Is there a red triangle?"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "images": [str(shapes)], "prompt": q}) + "\n"
                              for i, q in enumerate(questions)))  # fmt: skip
    outputs = []
    for budgets in ([], ["--prefill-chunk", "8", "--vision-chunk", "1"]):
        target = tmp_path / f"out-{len(outputs)}.jsonl"
        argv = ["batch", "--input", source, "--output", target, "--no-progress", "--dtype", "float32"]
        argv += budgets
        code, _, err = in_process(argv, capsys)
        assert code == 0, err
        outputs.append(target.read_text())
    assert outputs[0] == outputs[1] and '"text": "green"' in outputs[0]
    assert [(o["prefill_chunk"], o["vision_chunk"]) for o in seen] == [(512, 1024), (8, 1)]
    code, _, err = in_process(["batch", "--input", source, "--output", tmp_path / "x", "--vision-chunk", "0"],
                              capsys)  # fmt: skip
    assert code == 2 and "--vision-chunk" in err


def test_batch_writes_an_error_line_for_every_line_a_dead_engine_left_and_exits_1(
    tmp_path, capsys, monkeypatch
):
    """The engine dies after its first request leaves (a fault in retiring the second): the lines answered
    before keep their answers, every other line gets an error line, in order, and the exit code is 1."""
    from idefics2.serving.scheduler import Scheduler

    remove, removed = Scheduler.remove, []

    def failing_second_time(self, seq):
        removed.append(seq)
        if len(removed) == 2:
            raise RuntimeError("retirement fault")
        return remove(self, seq)

    monkeypatch.setattr(Scheduler, "remove", failing_second_time)
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}"}) + "\n" for i in range(6)))
    argv = ["batch", "--input", source, "--output", target, "--max-new-tokens", 3, "--max-batch", 1,
            "--no-progress", "--step-timeout", 60]  # fmt: skip
    code, _, err = in_process(argv, capsys)
    assert code == 1 and "the engine died (RuntimeError: retirement fault)" in err, err
    results = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in results] == list(range(6))
    assert "text" in results[0] and results[0]["finish_reason"] in ("stop", "length")
    assert "text" in results[1]  # answered; the fault came as it left its row
    assert all("engine is dead: RuntimeError: retirement fault" in r["error"] for r in results[2:]), results
