"""DPO: the loss and rewards against the formula computed by hand from per-token log-probabilities, what
enters those log-probabilities, the reference (adapters off, frozen copy, precomputed), training raising the
held-out preference accuracy on the built-in model, PEFT loading of the adapter, and the CLI."""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from idefics2 import Idefics2ForConditionalGeneration
from idefics2.cli import main
from idefics2.training import (
    ChatCollator,
    DPOLoss,
    LoraConfig,
    PreferenceCollator,
    PreferenceDataset,
    TrainingArguments,
    add_lora,
    evaluate_dpo,
    frozen_copy,
    mark_only_lora_trainable,
    read_preferences,
    train_dpo,
)
from idefics2.training.data import DataError
from idefics2.training.dpo import dpo_loss, precompute_reference, preference_examples, sequence_logprobs
from test_lora import base_dir, logits, reference_base  # noqa: F401  (fixture)
from test_training import COLORS, fresh_model, tiny_processor  # noqa: F401  (fixture)

CPU = torch.device("cpu")
BETA, SMOOTHING = 0.3, 0.1


def color_rows() -> list[dict]:
    """Prefer the one-word colour; the rejected answers start with another word and are longer."""
    from PIL import Image

    rows = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        rows.append(
            {
                "images": [Image.new("RGB", (28 + 4 * i, 28), rgb)],
                "prompt": "What color is this?",
                "chosen": name.capitalize() + ".",
                "rejected": "It looks " + "very " * i + f"{name}, I think.",
            }
        )
    return rows


def lora_policy(dtype=torch.float64):
    """The tiny model with a random (non-zero) adapter, so that policy and reference differ."""
    model = fresh_model().to(dtype)
    torch.manual_seed(1)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    return model.eval()


def answer_logprob(model, single: dict, answer_start: int, eou: int) -> float:
    """Oracle: sum over the answer's tokens (first differing token through <end_of_utterance>) of the
    log-softmax of the full logits of the unpadded row."""
    with torch.no_grad():
        out = model(**{k: v for k, v in single.items() if k != "labels"}).logits[0].double()
    ids = single["input_ids"][0].tolist()
    end = ids.index(eou, answer_start)
    logprobs = torch.log_softmax(out, dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(answer_start, end + 1))


def test_loss_and_rewards_equal_the_formula(tiny_processor):  # noqa: F811
    collator = ChatCollator(tiny_processor)
    data = PreferenceDataset([preference_examples(r) for r in color_rows()[:3]], collator)
    policy = lora_policy()
    reference = fresh_model().to(torch.float64).eval()  # the same base weights, no adapter at all
    batch = PreferenceCollator(collator)([data[i] for i in range(3)])  # 6 rows, padded to the longest
    assert bool((batch["attention_mask"] == 0).any())  # padding is present

    eou = tiny_processor.tokenizer.end_of_utterance_token_id
    expected_losses, expected_chosen, expected_rejected = [], [], []
    for pair in (data[i] for i in range(3)):
        values = {}
        a, b = pair.chosen.input_ids, pair.rejected.input_ids
        start = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])  # the prompt is the shared prefix
        for side in ("chosen", "rejected"):
            single = collator([getattr(pair, side)])  # alone: no padding
            values[side] = [answer_logprob(m, single, start, eou) for m in (policy, reference)]
        z = BETA * (
            (values["chosen"][0] - values["chosen"][1]) - (values["rejected"][0] - values["rejected"][1])
        )
        sigmoid = 1 / (1 + math.exp(-z))
        expected_losses.append(-(1 - SMOOTHING) * math.log(sigmoid) - SMOOTHING * math.log(1 - sigmoid))
        expected_chosen.append(BETA * (values["chosen"][0] - values["chosen"][1]))
        expected_rejected.append(BETA * (values["rejected"][0] - values["rejected"][1]))

    objective = DPOLoss(BETA, SMOOTHING)  # reference: the policy with its adapters switched off
    logps = sequence_logprobs(policy, batch, CPU)
    reference_logps = objective.reference_logprobs(policy, batch, CPU, contextlib.nullcontext())
    losses, chosen, rejected = dpo_loss(
        logps[:3], logps[3:], reference_logps[:3], reference_logps[3:], BETA, SMOOTHING
    )
    torch.testing.assert_close(losses, torch.tensor(expected_losses, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen, torch.tensor(expected_chosen, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        rejected, torch.tensor(expected_rejected, dtype=torch.float64), rtol=0, atol=1e-6
    )
    assert min(abs(c) for c in expected_chosen) > 1e-3  # the adapter makes a difference

    total, sums = objective.summed(policy, batch, CPU, contextlib.nullcontext())
    assert abs(total.item() - sum(expected_losses)) < 1e-6
    margins = [c - r for c, r in zip(expected_chosen, expected_rejected, strict=True)]
    assert abs(sums["margin"] - sum(margins)) < 1e-6
    assert sums["accuracy"] == sum(m > 0 for m in margins)
    assert objective.units(batch) == 3


def test_only_the_final_answer_is_learned(tiny_processor):  # noqa: F811
    collator = ChatCollator(tiny_processor)
    row = color_rows()[0]
    row["prompt"] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "What color is this?"},
    ]
    pair = PreferenceDataset([preference_examples(row)], collator)[0]
    tokenizer = tiny_processor.tokenizer
    for encoded, answer in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
        learned = [label for label in encoded.labels if label != -100]
        assert tokenizer.decode(learned).strip() == answer + "<end_of_utterance>"


def test_references_agree_adapters_off_frozen_copy_and_precomputed(tiny_processor):  # noqa: F811
    collator = ChatCollator(tiny_processor)
    data = PreferenceDataset([preference_examples(r) for r in color_rows()[:4]], collator)
    policy = lora_policy(torch.float32)
    batch = PreferenceCollator(collator)([data[i] for i in range(4)])
    objective = DPOLoss()
    adapters_off = objective.reference_logprobs(policy, batch, CPU, contextlib.nullcontext())
    copy = fresh_model().eval()
    from_copy = DPOLoss(reference=copy).reference_logprobs(policy, batch, CPU, contextlib.nullcontext())
    torch.testing.assert_close(adapters_off, from_copy, rtol=0, atol=1e-5)
    precompute_reference(policy, data, collator, TrainingArguments(output_dir="unused", batch_size=3), CPU)
    stored = PreferenceCollator(collator)([data[i] for i in range(4)])["reference_logps"]
    torch.testing.assert_close(stored, adapters_off.double(), rtol=0, atol=1e-5)
    assert policy.training is False  # precomputing leaves the mode as it was
    with pytest.raises(ValueError, match="needs a reference"):
        DPOLoss().reference_logprobs(copy, batch, CPU, contextlib.nullcontext())


def shapes_rows(count: int, seed: int) -> list[dict]:
    """Built-in world: prefer the answer in a sentence ("The circle is green.") over the bare word."""
    from idefics2.shapes import make_example

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        example = make_example(rng, "color_of_kind")
        shape = example.question.split()[-1].rstrip("?")
        rows.append(
            {
                "images": example.images(),
                "prompt": example.question,
                "chosen": f"The {shape} is {example.answer}.",
                "rejected": example.answer,
            }
        )
    return rows


def test_a_few_steps_raise_held_out_accuracy_and_margin(tmp_path):
    from idefics2 import Idefics2Processor
    from idefics2.assets import builtin_model_dir

    folder = builtin_model_dir()
    collator = ChatCollator(Idefics2Processor.from_pretrained(folder))
    train_data = PreferenceDataset([preference_examples(r) for r in shapes_rows(8, seed=1)], collator)
    held_out = PreferenceDataset([preference_examples(r) for r in shapes_rows(4, seed=2)], collator)
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration.from_pretrained(folder)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0)
    add_lora(model, config)
    mark_only_lora_trainable(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, batch_size=2, lr=2e-3, progress=False)
    before = evaluate_dpo(model, held_out, collator, args)
    result = train_dpo(model, train_data, collator, args, eval_data=held_out, lora_config=config)
    after = result.eval_metrics[-1][1]
    print(f"held-out before {before}, after {after} (loss {result.eval_losses[-1][1]:.4f})")
    assert before["margin"] == 0 and before["accuracy"] == 0  # the reference is the policy at the start
    assert after["accuracy"] >= 3 / 4 and after["margin"] > 0.5
    assert result.eval_losses[-1][1] < before["loss"] - 0.2
    assert result.metrics[0].keys() == {"reward_chosen", "reward_rejected", "margin", "accuracy"}
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_the_dpo_adapter_loads_in_peft(base_dir, tiny_processor, tmp_path):  # noqa: F811
    from peft import PeftModel

    model = Idefics2ForConditionalGeneration.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    add_lora(model, config)
    mark_only_lora_trainable(model)
    collator = ChatCollator(tiny_processor)
    data = PreferenceDataset([preference_examples(r) for r in color_rows()], collator)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, batch_size=3, lr=1e-2, progress=False)
    train_dpo(model, data, collator, args, lora_config=config, precompute=True)
    expected = logits(PeftModel.from_pretrained(reference_base(base_dir), tmp_path))
    base = logits(Idefics2ForConditionalGeneration.from_pretrained(base_dir))
    ours = logits(model)
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (base - expected).abs().max() > 1e-3 * expected.abs().max()  # the adapter changed the outputs


def test_full_dpo_needs_a_reference(tiny_processor, tmp_path):  # noqa: F811
    collator = ChatCollator(tiny_processor)
    data = PreferenceDataset([preference_examples(r) for r in color_rows()[:2]], collator)
    model = fresh_model()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="needs a reference"):
        train_dpo(model, data, collator, args)
    result = train_dpo(model, data, collator, args, reference=frozen_copy(model))
    assert abs(result.losses[0] - math.log(2)) < 1e-5  # policy == reference at the first step


def test_bad_preference_rows_are_clear_errors(tmp_path):
    rows = [{"prompt": "Hi", "chosen": "A", "rejected": "B"}, {"prompt": "Hi", "chosen": "A"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"prefs.jsonl:2: .*missing: rejected"):
        read_preferences(path)
    for row, message in [
        ({"prompt": 3, "chosen": "A", "rejected": "B"}, "prompt must be"),
        ({"prompt": "Hi", "chosen": "", "rejected": "B"}, "chosen must be"),
        ({"prompt": "Hi", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"}, "role assistant"),
        ({"prompt": "Hi", "chosen": "A", "rejected": "B", "images": ["missing.png"]}, "file not found"),
        (
            {"prompt": [{"role": "assistant", "content": "A"}], "chosen": "A", "rejected": "B"},
            "end with a user",
        ),
    ]:
        with pytest.raises(DataError, match=message):
            preference_examples(row, base_dir=tmp_path)


SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.mark.skipif(not SHAPES.is_file(), reason="no examples/shapes.png")
def test_cli_dpo(tmp_path, capsys):
    shutil.copy(SHAPES, tmp_path / "shapes.png")
    row = {"images": ["shapes.png"], "prompt": "What color is the circle?", "chosen": "The circle is green."}
    lines = [{**row, "rejected": "green"}, {**row, "rejected": "It is green."}]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = [
        "train",
        "--method",
        "dpo",
        "--data",
        tmp_path / "prefs.jsonl",
        "--no-progress",
        "--max-steps",
        "1",
    ]
    code, err = run_cli(capsys, *common, "--output", tmp_path / "a", "--eval-data", tmp_path / "prefs.jsonl")
    assert code == 0, err
    assert "final loss 0.6931" in err and "margin" in err and "accuracy" in err  # policy == reference
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    code, err = run_cli(
        capsys, *common, "--output", tmp_path / "b", "--full", "--precompute-ref", "--beta", "0.5"
    )
    assert code == 0, err
    assert (tmp_path / "b" / "model.safetensors").is_file()

    code, err = run_cli(
        capsys, "train", "--data", tmp_path / "prefs.jsonl", "--output", tmp_path / "c", "--beta", "1"
    )
    assert code == 2 and err.count("\n") == 1 and "--beta applies to --method dpo" in err
    code, err = run_cli(capsys, *common, "--output", tmp_path / "c", "--label-smoothing", "0.5")
    assert code == 2 and err.count("\n") == 1 and "[0, 0.5)" in err
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
    code, err = run_cli(
        capsys, "train", "--method", "dpo", "--data", tmp_path / "bad.jsonl", "--output", tmp_path / "c"
    )
    assert code == 2 and err.count("\n") == 1 and "bad.jsonl:1" in err and "rejected" in err


def test_parquet_preferences_give_the_pairs_of_the_same_jsonl(tmp_path, capsys):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from idefics2 import Idefics2Processor
    from idefics2.assets import builtin_model_dir

    colours, images = [(220, 30, 30), (30, 30, 220)], []
    for k, colour in enumerate(colours):
        out = io.BytesIO()
        Image.new("RGB", (40, 32), colour).save(out, "PNG")
        images.append(out.getvalue())
        (tmp_path / f"{k}.png").write_bytes(out.getvalue())
    answers = [("It is red.", "blue"), ("It is blue.", "red")]
    table = pa.table({
        "images": [[{"bytes": b, "path": None}] for b in images],
        "prompt": ["What colour is it?"] * 2,
        "chosen": [c for c, _ in answers],
        "rejected": [r for _, r in answers],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "prefs.parquet")
    lines = [
        {"images": [f"{k}.png"], "prompt": "What colour is it?", "chosen": c, "rejected": r}
        for k, (c, r) in enumerate(answers)
    ]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    from idefics2.cli.train import _preference_pairs

    class Flags:  # the data options of `idefics2 train`, unset
        columns = subset = split = None

    collator = ChatCollator(Idefics2Processor.from_pretrained(builtin_model_dir()))
    from_parquet = PreferenceDataset(
        _preference_pairs(Flags, str(tmp_path / "prefs.parquet"), "--data", None), collator
    )
    from_jsonl = PreferenceDataset(read_preferences(tmp_path / "prefs.jsonl"), collator)
    a, b = (PreferenceCollator(collator)(list(d.pairs)) for d in (from_parquet, from_jsonl))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    flags = ["--output", tmp_path / "out", "--max-steps", "1", "--no-progress"]
    code, err = run_cli(capsys, "train", "--method", "dpo", "--data", tmp_path / "prefs.parquet", *flags)
    assert code == 0, err
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
