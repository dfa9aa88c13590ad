"""Sequence packing: several examples per row, each attending only to itself, with its images; the loss and
gradients of a packed batch equal those of the same examples unpacked."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from idefics2.cli import main
from idefics2.training import (
    ChatCollator,
    ChatDataset,
    LoraConfig,
    PackedDataset,
    TokenLoss,
    add_lora,
    mark_only_lora_trainable,
    pack_lengths,
)
from test_training import color_examples, fresh_model, tiny_processor  # noqa: F401  (fixture)

CPU = torch.device("cpu")


def test_first_fit_decreasing_keeps_every_example_once():
    lengths = [5, 3, 8, 2, 6, 1, 4]
    rows = pack_lengths(lengths, capacity=9)
    assert all(sum(lengths[i] for i in row) <= 9 for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert len(rows) == 4  # 29 tokens in rows of 9: the fewest possible
    assert pack_lengths([12, 3], capacity=9) == [[0], [1]]  # too long: a row of its own


def test_packed_rows_attend_within_their_example():
    model = fresh_model()
    segments = torch.tensor([[1, 1, 1, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]])
    mask, positions = model.model._packed_inputs(segments, None, None, None, 2, 7)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for a, b in ((0, 3), (3, 5), (5, 6)):
        expected[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    expected[6, 6] = True  # a padding query sees only itself
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], torch.ones(7, 7, dtype=torch.bool).tril())


def lora_model():
    """A fresh tiny model with rank-4 LoRA adapters, their B matrices random (non-zero gradients upstream)."""
    model = fresh_model()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def test_packed_loss_and_gradients_equal_unpacked(tiny_processor):  # noqa: F811
    collator = ChatCollator(tiny_processor)
    data = ChatDataset(color_examples(), collator)  # 6 examples with an image each, 1 or 2 turns
    packed = PackedDataset(data, capacity=2 * max(len(e.input_ids) for e in data.examples))
    assert len(packed) < len(data)
    assert max(len(packed[i].parts) for i in range(len(packed))) >= 2

    model = lora_model()
    objective = TokenLoss()

    def loss_and_grads(batch):
        model.zero_grad()
        loss, _ = objective.summed(model, batch, CPU, contextlib.nullcontext())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), objective.units(batch), grads

    unpacked_batch = collator([data[i] for i in range(len(data))])
    packed_batch = collator([packed[i] for i in range(len(packed))])
    assert len(packed_batch["input_ids"]) < len(unpacked_batch["input_ids"])
    assert packed_batch["pixel_values"].shape[1] >= 2  # a packed row carries the images of its examples
    loss, units, grads = loss_and_grads(unpacked_batch)
    packed_loss, packed_units, packed_grads = loss_and_grads(packed_batch)
    assert packed_units == units
    print(f"mean loss unpacked {loss / units:.7f}, packed {packed_loss / packed_units:.7f}")
    assert abs(packed_loss / packed_units - loss / units) <= 1e-5 * max(1.0, loss / units)
    assert grads.keys() == packed_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


def test_cli_packing(tmp_path, capsys):
    shutil.copy(SHAPES, tmp_path / "shapes.png")
    user = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}],
    }
    lines = [
        {"messages": [user, {"role": "assistant", "content": answer}], "images": ["shapes.png"]}
        for answer in ("green", "The circle is green.", "It is green, like grass in spring.")
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["train", "--data", tmp_path / "train.jsonl", "--output", tmp_path / "out", "--no-progress"]
    assert main([str(a) for a in [*argv, "--packing", "--max-steps", "1", "--max-length", "400"]]) == 0
    err = capsys.readouterr().err
    assert "packed 3 examples into" in err
    try:
        code = main([str(a) for a in [*argv, "--packing", "--method", "dpo", "--overwrite"]])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2 and "--packing applies to --method sft" in capsys.readouterr().err


def test_cli_packing_of_parquet_rows(tmp_path, capsys):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images = []
    for colour in ((220, 30, 30), (30, 30, 220), (30, 200, 30)):
        out = io.BytesIO()
        Image.new("RGB", (40, 32), colour).save(out, "PNG")
        images.append({"bytes": out.getvalue(), "path": None})
    table = pa.table(
        {"img": images, "q": ["What colour?"] * 3, "a": ["red", "It is blue.", "green, I think"]}
    )
    pq.write_table(table, tmp_path / "qa.parquet")
    argv = ["train", "--data", tmp_path / "qa.parquet", "--columns", "prompt=q,answer=a,image=img"]
    argv += [
        "--output",
        tmp_path / "out",
        "--no-progress",
        "--packing",
        "--max-length",
        "400",
        "--max-steps",
        "1",
    ]
    assert main([str(a) for a in argv]) == 0
    assert "packed 3 examples into" in capsys.readouterr().err


def test_real_tokens_form_one_sequence_per_row_or_segment():
    model = fresh_model()
    layout = model.model._unpadded_layout
    wanted = torch.ones(2, 6, dtype=torch.bool)
    right, left = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert layout(right, None, None, wanted & right.bool())[1] == [4, 6]
    assert layout(left, None, None, left.bool())[1] == [4]
    packed = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0]])
    real, lengths = layout(None, packed, None, packed > 0)
    assert lengths == [2, 3, 3] and torch.equal(real, packed > 0)
    assert (
        layout(None, torch.tensor([[1, 1, 2, 1]]), None, torch.ones(1, 4, dtype=torch.bool)) is None
    )  # split
    assert layout(right, None, None, wanted) is None  # hidden states wanted at padding
    assert layout(torch.ones(2, 6, dtype=torch.long), None, None, wanted) is None  # no padding


def test_logits_at_learned_positions_equal_the_full_forward(tiny_processor):  # noqa: F811
    """logits_at runs the real tokens alone (no padding, one causal sequence per row or packed segment), the
    last layer only at the kept positions: the same logits, and gradients, as the full padded forward."""
    collator = ChatCollator(tiny_processor)
    data = ChatDataset(color_examples(), collator)
    packed = PackedDataset(data, capacity=2 * max(len(e.input_ids) for e in data.examples))
    model = lora_model()
    right = collator([data[i] for i in range(4)])
    left = {**right}
    for key in ("input_ids", "attention_mask", "labels"):  # the same rows, padding moved to the left
        left[key] = torch.stack(
            [
                row.roll(int((row_mask == 0).sum()))
                for row, row_mask in zip(right[key], right["attention_mask"], strict=True)
            ]
        )
    for batch in (right, left, collator([packed[i] for i in range(len(packed))])):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        at = batch["labels"] != -100
        assert bool((batch["attention_mask"] == 0).any())  # padding to leave out
        results = []
        for logits_at in (at, None):
            model.zero_grad()
            logits = model(**inputs, logits_at=logits_at).logits
            logits = logits if logits_at is not None else logits[at]
            (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((logits.detach(), grads))
        (fast, fast_grads), (full, full_grads) = results
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
        assert fast_grads.keys() == full_grads.keys() and fast_grads
        for name, grad in full_grads.items():
            scale = float(grad.abs().max())
            torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
