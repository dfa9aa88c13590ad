"""Preference tuning with DPO (Rafailov et al. 2023, "Direct Preference Optimization").

Data is TRL's preference layout: one row per prompt with the answer to prefer and the one to avoid,
`{"images": [...], "prompt": ..., "chosen": ..., "rejected": ...}`. The prompt is the user's text (the images
come before it in the user turn) or a conversation (a list of chat messages ending with a user turn); each
answer is a string or a list holding one assistant message.

Per pair, with log p(answer | prompt) summed over the answer's tokens (its text and `<end_of_utterance>`; the
prompt, the images and the padding never count) under the trained model (policy) and the reference model:

    z = beta * ((log p_policy(chosen) - log p_ref(chosen)) - (log p_policy(rejected) - log p_ref(rejected)))
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)      (eps: label smoothing, "cDPO")

The rewards are beta times each answer's log-ratio; the margin is chosen minus rejected reward and the
accuracy how often it is positive. The reference is the same model with its LoRA adapters switched off, a
frozen copy given as `reference` (full fine-tuning), or log-probabilities computed once before training
(`precompute_reference`), which needs neither.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from idefics2 import lora
from idefics2.training.data import ChatCollator, DataError, EncodedExample, normalize_example, parse_json_line
from idefics2.training.trainer import (
    Objective,
    TrainingArguments,
    TrainResult,
    autocast_context,
    evaluate_objective,
    learned_positions,
    learned_token_logprobs,
    train,
)

if TYPE_CHECKING:
    from idefics2.processing import Idefics2Processor

METRICS = ("reward_chosen", "reward_rejected", "margin", "accuracy")


# ----------------------------------------------------------------------------------------------- data
def preference_examples(row: Any, base_dir: Path | None = None) -> tuple[dict, dict]:
    """A row of TRL's preference layout -> the two chat examples (prompt + chosen, prompt + rejected),
    normalized as training examples. Raises DataError naming the problem."""
    if not isinstance(row, dict):
        raise DataError(f"a preference row must be a JSON object, got {type(row).__name__}")
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
    if missing:
        raise DataError(f"a preference row needs prompt, chosen and rejected; missing: {', '.join(missing)}")
    images = row.get("images") or []
    if not isinstance(images, list):
        raise DataError('"images" must be a list')
    prompt = row["prompt"]
    if isinstance(prompt, str):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
    elif isinstance(prompt, list) and prompt:
        messages = prompt
        if not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
            raise DataError("a conversation prompt must end with a user message")
    else:
        raise DataError("prompt must be a string or a non-empty list of chat messages")
    pair = []
    for key in ("chosen", "rejected"):
        answer = row[key]
        if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict):
            if answer[0].get("role") != "assistant":
                raise DataError(f"{key}: the answer's message must have the role assistant")
            answer = answer[0].get("content")
        if not (isinstance(answer, str) and answer.strip()) and not (isinstance(answer, list) and answer):
            raise DataError(f"{key} must be a non-empty string or a list holding one assistant message")
        example = {"messages": [*messages, {"role": "assistant", "content": answer}], "images": images}
        try:
            pair.append(normalize_example(example, base_dir=base_dir))
        except DataError as error:
            raise DataError(f"{key}: {error}") from None
    return pair[0], pair[1]


def read_preferences(path: str | os.PathLike) -> list[tuple[dict, dict]]:
    """Read and validate a JSONL file of preference rows (image paths relative to the file's folder); the
    first bad line raises DataError with its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    pairs = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            row = parse_json_line(raw, lambda message, n=number: DataError(message, path=path, line=n))
            if row is None:
                continue
            try:
                pairs.append(preference_examples(row, base_dir=path.parent))
            except DataError as error:
                raise DataError(str(error), path=path, line=number) from None
    if not pairs:
        raise DataError(f"{path} holds no preference rows")
    return pairs


@dataclass
class PreferencePair:
    chosen: EncodedExample
    rejected: EncodedExample
    # log p_ref(chosen), log p_ref(rejected) when computed once before training (precompute_reference)
    reference: tuple[float, float] | None = None


def _final_answer_only(encoded: EncodedExample) -> EncodedExample:
    """Labels of the last assistant turn only: earlier assistant turns of a conversation prompt are part of
    the prompt, not of the answer whose probability DPO compares."""
    labels = list(encoded.labels)
    last = max(k for k, label in enumerate(labels) if label != -100)
    start = last
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    labels[:start] = [-100] * start
    return EncodedExample(encoded.input_ids, labels, encoded.images)


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs encoded once. A pair loses nothing to truncation silently: when either answer is
    dropped by `collator.max_length` (it would cut an image, or leave nothing to learn) the pair is dropped,
    with the collator's warning."""

    def __init__(self, pairs: Sequence[tuple[dict, dict]], collator: ChatCollator):
        self.pairs: list[PreferencePair] = []
        for chosen, rejected in pairs:
            encoded = [collator.encode(normalize_example(e)) for e in (chosen, rejected)]
            if all(e is not None for e in encoded):
                self.pairs.append(PreferencePair(*(_final_answer_only(e) for e in encoded)))
        self.dropped = len(pairs) - len(self.pairs)
        if not self.pairs:
            raise ValueError("no preference pair is left: every one is longer than max_length")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.pairs[index]


class PreferenceCollator:
    """Pairs -> one batch of 2B rows: the B chosen answers, then the B rejected ones (each with its prompt and
    images), plus `reference_logps` (2B,) when every pair carries precomputed reference log-probabilities."""

    def __init__(self, collator: ChatCollator):
        self.collator = collator

    def __call__(self, pairs: Sequence[PreferencePair]) -> dict[str, torch.Tensor]:
        batch = self.collator([p.chosen for p in pairs] + [p.rejected for p in pairs])
        if all(p.reference is not None for p in pairs):
            values = [p.reference[0] for p in pairs] + [p.reference[1] for p in pairs]
            batch["reference_logps"] = torch.tensor(values, dtype=torch.float64)
        return batch


# ----------------------------------------------------------------------------------------------- the loss
def sequence_logprobs(
    model: nn.Module,
    batch: dict,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """(rows,) the log-probability of each row's learned tokens, summed; computed in float32 or wider."""
    inputs = {k: v for k, v in batch.items() if k != "reference_logps"}
    token_logprobs = learned_token_logprobs(model, inputs, device, autocast or contextlib.nullcontext())
    rows = learned_positions(batch["labels"]).nonzero()[:, 0].to(token_logprobs.device)  # (N,)
    out = token_logprobs.new_zeros(batch["labels"].shape[0])
    return out.index_add(0, rows, token_logprobs)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair (B,): the sigmoid DPO loss, the chosen and the rejected rewards (detached)."""
    chosen_ratio = policy_chosen - reference_chosen.to(policy_chosen)
    rejected_ratio = policy_rejected - reference_rejected.to(policy_rejected)
    z = beta * (chosen_ratio - rejected_ratio)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPOLoss(Objective):
    """The DPO objective over preference batches (see PreferenceCollator); its unit is the pair.

    The reference log-probabilities come from the batch (precomputed), else from `reference` (a frozen
    model), else from the trained model with its LoRA adapters switched off."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, reference: nn.Module | None = None):
        if not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"beta must be a positive number, got {beta!r}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
        self.beta, self.label_smoothing, self.reference = beta, label_smoothing, reference

    def units(self, batch: dict, keep: torch.Tensor | None = None) -> int:
        pairs = batch["labels"].shape[0] // 2
        return pairs if keep is None else int(keep.sum())

    def summed(self, model, batch, device, autocast, keep=None):
        pairs = batch["labels"].shape[0] // 2
        policy = sequence_logprobs(model, batch, device, autocast)
        if "reference_logps" in batch:
            reference = batch["reference_logps"].to(device)
        else:
            reference = self.reference_logprobs(model, batch, device, autocast)
        losses, chosen, rejected = dpo_loss(
            policy[:pairs],
            policy[pairs:],
            reference[:pairs],
            reference[pairs:],
            self.beta,
            self.label_smoothing,
        )
        weights = torch.ones(pairs, device=device) if keep is None else keep.to(device).float()
        metrics = {
            "reward_chosen": chosen,
            "reward_rejected": rejected,
            "margin": chosen - rejected,
            "accuracy": (chosen > rejected).float(),
        }
        sums = {name: float((value.double() * weights).sum()) for name, value in metrics.items()}
        return (losses * weights.to(losses)).sum(), sums

    @torch.no_grad()
    def reference_logprobs(self, model, batch, device, autocast) -> torch.Tensor:
        if self.reference is not None:
            self.reference.to(device)
            return sequence_logprobs(self.reference, batch, device, autocast)
        base = getattr(model, "module", model)  # the model inside DDP
        if not lora.lora_modules(base):
            raise ValueError(
                "DPO needs a reference: train LoRA adapters (the base model is the reference), pass a frozen "
                "copy as `reference`, or precompute the reference log-probabilities"
            )
        with lora.adapters_disabled(base):
            return sequence_logprobs(base, batch, device, autocast)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode: the reference for full fine-tuning (twice the weights' memory;
    precompute_reference avoids it)."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def precompute_reference(
    model: nn.Module,
    data: PreferenceDataset,
    collator: ChatCollator,
    args: TrainingArguments,
    device: str | torch.device | None = None,
    reference: nn.Module | None = None,
) -> None:
    """Compute every pair's reference log-probabilities once (in eval mode, `args.batch_size` pairs at a
    time) and store them in the pairs: training then runs one model forward per batch instead of two."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scorer = reference if reference is not None else model
    was_training = scorer.training
    scorer.to(device).eval()
    collate = PreferenceCollator(collator)
    disabled = lora.adapters_disabled(scorer) if lora.lora_modules(scorer) else contextlib.nullcontext()
    with disabled:
        for start in range(0, len(data), args.batch_size):
            pairs = [data[i] for i in range(start, min(start + args.batch_size, len(data)))]
            logps = sequence_logprobs(scorer, collate(pairs), device, autocast_context(args, device)).tolist()
            for k, pair in enumerate(pairs):
                pair.reference = (logps[k], logps[len(pairs) + k])
    scorer.train(was_training)


# ----------------------------------------------------------------------------------------------- entry points
def train_dpo(
    model: nn.Module,
    train_data: PreferenceDataset,
    collator: ChatCollator,
    args: TrainingArguments,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference: nn.Module | None = None,
    precompute: bool = False,
    eval_data: PreferenceDataset | None = None,
    lora_config: lora.LoraConfig | None = None,
    resume_from: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = None,
    processor: Idefics2Processor | None = None,
) -> TrainResult:
    """DPO on preference pairs with the training loop of `train` (same arguments, checkpoints, resume, DDP).

    `model` is set up as for `train` (LoRA added, parts frozen). Without LoRA pass `reference` (e.g.
    `frozen_copy(model)` before training) or `precompute=True`. The result's `metrics` and `eval_metrics`
    hold the rewards, margin and accuracy (means over pairs) next to the losses.
    """
    objective = DPOLoss(beta, label_smoothing, reference)
    if precompute:
        for data in (train_data, eval_data):
            if data is not None:
                precompute_reference(model, data, collator, args, device, reference)
        objective.reference = None
    elif reference is None and not lora.lora_modules(model):
        raise ValueError(
            "DPO without LoRA needs a reference: pass reference=frozen_copy(model) or precompute=True"
        )
    return train(
        model,
        train_data,
        PreferenceCollator(collator),
        args,
        eval_data=eval_data,
        lora_config=lora_config,
        resume_from=resume_from,
        device=device,
        objective=objective,
        processor=processor,
    )


def evaluate_dpo(
    model: nn.Module,
    data: PreferenceDataset,
    collator: ChatCollator,
    args: TrainingArguments,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean DPO loss, rewards, margin and accuracy of `model` on `data` (the reference as in train_dpo)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    objective = DPOLoss(beta, label_smoothing, reference)
    return evaluate_objective(model, data, PreferenceCollator(collator), args, device, objective=objective)
