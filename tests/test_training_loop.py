"""The training machinery on a small stand-in module: schedule, accumulation, exact resume, file formats."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from idefics2.training import TrainingArguments, train
from idefics2.training.trainer import lr_factor, rank_micro_batches

VOCAB = 16


class ToyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.dropout = nn.Dropout(0.2)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.norm(self.dropout(self.embed(input_ids)))))


def toy_data(n=12):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (3 + i % 4,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def collate(examples):
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return ToyLM()


def test_lr_schedule_hand_values():
    # warmup 2 of 10 steps: 0, 1/2, then decay over the remaining 8 steps
    assert [lr_factor(s, "linear", 2, 10) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5)
    assert lr_factor(2, "cosine", 2, 10) == pytest.approx(1.0)
    assert lr_factor(10, "cosine", 2, 10) == pytest.approx(0.0)
    assert lr_factor(7, "constant", 2, 10) == 1.0


def test_ranks_get_disjoint_equal_shards():
    shards = [rank_micro_batches(10, 2, rank, 3, seed=0, epoch=0, shuffle=True) for rank in range(3)]
    flat = [sorted(i for batch in shard for i in batch) for shard in shards]
    assert all(len(f) == 4 for f in flat)  # ceil(10 / 3) each, padded by wrapping around
    assert set().union(*map(set, flat)) == set(range(10))


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    data = toy_data(8)
    common = dict(max_steps=3, lr=0.05, shuffle=False, progress=False, max_grad_norm=None)
    big = fresh_model()
    big.dropout.p = 0.0
    train(big, data, collate, TrainingArguments(output_dir=str(tmp_path / "a"), batch_size=4, **common))
    small = fresh_model()
    small.dropout.p = 0.0
    train(
        small,
        data,
        collate,
        TrainingArguments(output_dir=str(tmp_path / "b"), batch_size=2, grad_accum=2, **common),
    )
    for (name, p), q in zip(big.named_parameters(), small.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_continues_exactly(tmp_path):
    data = toy_data()
    args = dict(
        max_steps=6,
        batch_size=2,
        grad_accum=2,
        lr=0.05,
        warmup_steps=2,
        scheduler="cosine",
        max_grad_norm=0.5,
        weight_decay=0.1,
        save_steps=3,
        save_total_limit=None,
        progress=False,
    )
    full = fresh_model()
    result = train(full, data, collate, TrainingArguments(output_dir=str(tmp_path / "full"), **args))
    assert result.step == 6 and len(result.losses) == 6

    # A second run: different initial weights and RNG, resumed from the step-3 checkpoint of the first.
    resumed = fresh_model(seed=123)
    torch.manual_seed(999)
    ckpt = tmp_path / "full" / "checkpoint-3"
    result2 = train(
        resumed,
        data,
        collate,
        TrainingArguments(output_dir=str(tmp_path / "resumed"), **args),
        resume_from=ckpt,
    )
    assert result2.losses == pytest.approx(result.losses[3:], abs=1e-6)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert (p - q).abs().max() <= 1e-6, name

    # Safetensors and JSON only: nothing pickled.
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng_state_0.json",
        "rng_state_0.safetensors",
        "trainer_state.json",
    ]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3


def test_resume_refuses_other_batch_size(tmp_path):
    data = toy_data()
    train(
        fresh_model(),
        data,
        collate,
        TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=2, progress=False),
    )
    with pytest.raises(ValueError, match="batch_size"):
        train(
            fresh_model(),
            data,
            collate,
            TrainingArguments(output_dir=str(tmp_path), max_steps=4, batch_size=2, progress=False),
            resume_from=True,
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainingArguments(output_dir="x", grad_accum=0)
    with pytest.raises(ValueError, match="scheduler"):
        TrainingArguments(output_dir="x", scheduler="step")


def test_progress_line_on_stderr(tmp_path, capsys):
    train(
        fresh_model(),
        toy_data(4),
        collate,
        TrainingArguments(output_dir=str(tmp_path), max_steps=2, logging_steps=1),
    )
    err = capsys.readouterr().err
    assert "step 2/2" in err and "loss" in err and "tok/s" in err


def test_a_fresh_run_never_mixes_with_an_old_one(tmp_path):
    data = toy_data()
    args = dict(output_dir=str(tmp_path), save_steps=1, progress=False)
    train(fresh_model(), data, collate, TrainingArguments(max_steps=3, **args))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match=r"a previous run \(checkpoint-2, checkpoint-3, model.safetensors\)"):
        train(fresh_model(), data, collate, TrainingArguments(max_steps=1, **args))
    train(fresh_model(), data, collate, TrainingArguments(max_steps=1, overwrite_output_dir=True, **args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "model.safetensors", "notes.txt"]


def test_a_warmup_longer_than_the_run_warns(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, warmup_steps=4, progress=False)
    with pytest.warns(UserWarning, match=r"warmup_steps \(4\) is not shorter than the run \(4 steps\)"):
        train(fresh_model(), toy_data(), collate, args)
