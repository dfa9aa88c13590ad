"""The training loop: AdamW, warmup + linear/cosine decay, gradient accumulation and clipping, bf16 autocast,
gradient checkpointing, periodic evaluation, exact save/resume, and data parallel under torchrun (DDP, or
FSDP2 sharding)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from idefics2 import lora
from idefics2.training import checkpoint as ckpt
from idefics2.training.loss import target_logprobs

if TYPE_CHECKING:
    from idefics2.processing import Idefics2Processor

SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "no")


@dataclass
class TrainingArguments:
    output_dir: str
    max_steps: int | None = None  # optimizer steps; None: `num_epochs` passes over the data
    num_epochs: int = 1
    batch_size: int = 1  # examples per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    scheduler: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # "auto": bf16 autocast on GPUs that support it; "bf16"; "no"
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP
    shuffle: bool = True
    seed: int = 0
    eval_steps: int | None = None  # evaluate every N steps (and at the end) when eval data is given
    save_steps: int | None = None  # write output_dir/checkpoint-N every N steps (and at the end)
    save_total_limit: int | None = 2  # keep only the newest N checkpoints; None keeps them all
    # a fresh run (no resume) into a folder holding a previous run's checkpoints or weights removes them
    # first; without it such a folder is refused, so that two runs never mix
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    progress: bool = True

    def __post_init__(self):
        positive = {
            "num_epochs": self.num_epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "logging_steps": self.logging_steps,
        }
        for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}"
            )
        self.adam_betas = tuple(self.adam_betas)


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # training loss of each optimizer step run here
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    # the objective's metrics (e.g. DPO's rewards and accuracy), means over each step / each evaluation
    metrics: list[dict[str, float]] = field(default_factory=list)
    eval_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)


# --- setup helpers
def freeze(model: nn.Module, *, vision: bool = False, connector: bool = False, decoder: bool = False) -> None:
    """Stop gradients into the vision tower, the connector and/or the decoder (text model + lm_head)."""
    prefixes = [
        p
        for p, on in (
            ("model.vision_model.", vision),
            ("model.connector.", connector),
            ("model.text_model.", decoder),
            ("lm_head.", decoder),
        )
        if on
    ]
    for name, param in model.named_parameters():
        if name.startswith(tuple(prefixes)):
            param.requires_grad_(False)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer layer's activations in the backward pass; returns how many were wrapped."""
    wrapped = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            for layer in module:
                layer.forward = functools.partial(_checkpointed, layer.forward)
                wrapped += 1
    return wrapped


def _checkpointed(forward: Callable, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for the update made at `step` (0-based)."""
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, args: TrainingArguments
) -> tuple[torch.optim.Optimizer, dict[int, str]]:
    """AdamW over the trainable parameters; biases and norm weights (1-D) get no weight decay."""
    decay, no_decay, names = [], [], {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
            names[id(param)] = name
    if not names:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # torch's fused AdamW (one kernel per parameter instead of a dozen) where it runs: plain tensors (not
    # FSDP's sharded ones) on CPU or CUDA
    params = decay + no_decay
    fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(
        groups, lr=args.lr, betas=args.adam_betas, eps=args.adam_eps, fused=fused or None
    )
    return optimizer, names


# --- distributed
def shard_model(model: nn.Module) -> None:
    """FSDP2 in place: every layer of every `layers` list is one unit, the rest belongs to the root."""
    from torch.distributed.fsdp import fully_shard

    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            for layer in module:
                fully_shard(layer)
    fully_shard(model)


def distributed_context() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --- data order
def rank_micro_batches(
    n_examples: int, batch_size: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool
) -> list[list[int]]:
    """This rank's micro-batches (example indices) for one epoch. Every rank gets the same number: the
    epoch's order is padded by wrapping around, as torch's DistributedSampler does."""
    if shuffle:
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n_examples))
    per_rank = math.ceil(n_examples / world)
    while len(order) < per_rank * world:
        order += order[: per_rank * world - len(order)]
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def _micro_batch_stream(
    n_examples: int, args: TrainingArguments, rank: int, world: int, start: int
) -> Iterator[list[int]]:
    """Micro-batches from global position `start` on, epoch after epoch (deterministic, so resumable)."""
    n_micro = math.ceil(math.ceil(n_examples / world) / args.batch_size)
    position = start
    epoch, cached = -1, []
    while True:
        e, i = divmod(position, n_micro)
        if e != epoch:
            epoch, cached = (
                e,
                rank_micro_batches(n_examples, args.batch_size, rank, world, args.seed, e, args.shuffle),
            )
        yield cached[i]
        position += 1


def steps_for(n_examples: int, args: TrainingArguments, world: int) -> int:
    if args.max_steps is not None:
        return args.max_steps
    n_micro = math.ceil(math.ceil(n_examples / world) / args.batch_size)
    return args.num_epochs * math.ceil(n_micro / args.grad_accum)


# --- loss
class Objective:
    """What training minimises: a sum over the units of a batch (learned tokens, preference pairs, ...),
    averaged over the units of the whole optimizer step. Subclasses define both; `metrics` are sums over the
    same units, reported as means next to the loss."""

    def units(self, batch: dict, keep: torch.Tensor | None = None) -> int:
        """How many units `batch` holds; `keep` (bool, one per example) leaves examples out."""
        raise NotImplementedError

    def summed(
        self,
        model: nn.Module,
        batch: dict,
        device: torch.device,
        autocast: contextlib.AbstractContextManager,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss summed over the batch's units (a scalar with a graph) and the metrics' sums."""
        raise NotImplementedError


def learned_positions(labels: torch.Tensor) -> torch.Tensor:
    """bool (B, T): the positions whose next token is learned (label != -100 one step later)."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != -100
    return positions


def learned_token_logprobs(
    model: nn.Module,
    batch: dict,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    *,
    summed: bool = False,
) -> torch.Tensor:
    """log p (N,) of the N learned tokens under `model` (float32 or wider), in the row-major order of
    `learned_positions`; with `summed`, their sum.

    Every tensor of `batch` but the labels is a model input. A model whose forward takes `logits_at` and
    `head` (as Idefics2's does) runs its language-model head only at the positions whose next token is
    learned, chunk by chunk (idefics2.training.loss): prompts, images and padding get no logits, and the
    learned positions' (N, vocab) logits are never held whole. Other models' full logits are indexed."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and torch.is_tensor(v)}
    labels = batch["labels"].to(device)
    positions = learned_positions(labels)
    targets = labels[:, 1:][labels[:, 1:] != -100]  # (N,) in the row-major order of `positions`
    with autocast:
        parameters = inspect.signature(getattr(model, "module", model).forward).parameters
        if "logits_at" in parameters and "head" in parameters:
            head = functools.partial(target_logprobs, targets=targets, summed=summed)
            return model(**inputs, logits_at=positions, head=head).head_output
        logits = model(**inputs).logits[positions]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    return logprobs.sum() if summed else logprobs


class TokenLoss(Objective):
    """Next-token cross-entropy over the learned tokens (supervised fine-tuning)."""

    def units(self, batch: dict, keep: torch.Tensor | None = None) -> int:
        return int(_kept_labels(batch["labels"], keep)[:, 1:].ne(-100).sum())

    def summed(self, model, batch, device, autocast, keep=None):
        batch = {**batch, "labels": _kept_labels(batch["labels"], keep)}
        return -learned_token_logprobs(model, batch, device, autocast, summed=True), {}


def _kept_labels(labels: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return labels if keep is None else labels.masked_fill(~keep.to(labels.device)[:, None], -100)


@torch.no_grad()
def evaluate_objective(
    model: nn.Module,
    data: Sequence,
    collate: Callable[[list], dict],
    args: TrainingArguments,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    objective: Objective | None = None,
) -> dict[str, float]:
    """The objective's mean loss (key "loss") and mean metrics over `data`, each rank taking its share.

    Every rank runs the same number of batches (a sharded model needs all ranks in each forward): the shares
    are padded by wrapping around, and the repeated examples are left out.
    """
    objective = objective or TokenLoss()
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {"loss": 0.0}
    count = 0
    per_rank = math.ceil(len(data) / world)
    positions = list(range(rank, per_rank * world, world))
    for i in range(0, len(positions), args.batch_size):
        chunk = positions[i : i + args.batch_size]
        batch = collate([data[p % len(data)] for p in chunk])
        keep = torch.tensor([p < len(data) for p in chunk])
        loss, metrics = objective.summed(model, batch, device, autocast_context(args, device), keep)
        for name, value in {"loss": float(loss), **metrics}.items():
            sums[name] = sums.get(name, 0.0) + value
        count += objective.units(batch, keep)
    names = list(sums)
    totals = _all_reduce_sum([sums[n] for n in names] + [float(count)], device, world)
    model.train(was_training)
    return {n: total / max(totals[-1], 1.0) for n, total in zip(names, totals[:-1], strict=True)}


def evaluate(
    model: nn.Module,
    data: Sequence,
    collate: Callable[[list], dict],
    args: TrainingArguments,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> float:
    """Token-weighted mean loss over `data` (see evaluate_objective)."""
    return evaluate_objective(model, data, collate, args, device, rank, world)["loss"]


def autocast_context(args: TrainingArguments, device: torch.device) -> contextlib.AbstractContextManager:
    use_bf16 = args.mixed_precision == "bf16" or (
        args.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --- progress
class Progress:
    """One status line on stderr: redrawn in place on a terminal, printed every `every` steps otherwise."""

    def __init__(self, total: int, start: int, enabled: bool, every: int):
        self.total, self.start, self.enabled, self.every = total, start, enabled, every
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.tokens = self.samples = 0

    def update(
        self, step: int, loss: float, lr: float, tokens: int, samples: int, metrics: dict[str, float]
    ) -> None:
        self.tokens += tokens
        self.samples += samples
        if not self.enabled or not (self.tty or step % self.every == 0 or step == self.total):
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        done = step - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        line = (
            f"step {step}/{self.total} | loss {loss:.4f} | {format_metrics(metrics)}lr {lr:.2e} | "
            f"{self.tokens / elapsed:.0f} tok/s | "
            f"{self.samples / elapsed:.2f} samples/s | eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


def format_metrics(metrics: dict[str, float]) -> str:
    return "".join(f"{name} {value:.4f} | " for name, value in metrics.items())


# --- checkpoints
def save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    names: dict[int, str],
    args: TrainingArguments,
    step: int,
    world: int,
    rank: int,
    lora_config: lora.LoraConfig | None,
    sharded: bool = False,
    processor: Idefics2Processor | None = None,
) -> Path:
    folder = Path(args.output_dir) / f"checkpoint-{step}"
    weights = ckpt.model_state(model, sharded)  # collective calls when sharded: every rank takes part
    optimizer_state = ckpt.optimizer_state(model, optimizer, names, sharded)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        ckpt.save_model_weights(model, weights, folder, lora_config, processor)
        ckpt.save_optimizer_state(optimizer_state, folder)
        state = {
            "step": step,
            "world_size": world,
            "scheduler": scheduler.state_dict(),
            "args": asdict(args),
            "lora": lora_config is not None,
        }
        (folder / ckpt.TRAINER_STATE).write_text(json.dumps(state, indent=1))
    if world > 1:
        dist.barrier()
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save_rng(folder, rank)
    if world > 1:
        dist.barrier()
    if rank == 0 and args.save_total_limit is not None:
        older = sorted(
            (int(p.name.split("-")[1]), p)
            for p in Path(args.output_dir).glob("checkpoint-*")
            if p.name.split("-")[1].isdigit() and int(p.name.split("-")[1]) < step
        )
        for _, path in older[: max(0, len(older) + 1 - args.save_total_limit)]:
            shutil.rmtree(path)
    return folder


def _load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    names: dict[int, str],
    args: TrainingArguments,
    world: int,
    rank: int,
    sharded: bool,
    lora_config: lora.LoraConfig | None,
) -> int:
    state = json.loads((folder / ckpt.TRAINER_STATE).read_text())
    saved = state["args"]
    if bool(state.get("lora")) != (lora_config is not None):
        saved_kind, this_kind = ("a LoRA run", "all weights") if state.get("lora") else ("a full run", "LoRA")
        raise ValueError(
            f"cannot resume from {folder}: it is {saved_kind}, this run trains {this_kind}; resume with the "
            "original run's setting (LoRA or full)"
        )
    for key in ("batch_size", "grad_accum", "seed", "shuffle"):
        if saved.get(key) != getattr(args, key):
            raise ValueError(
                f"cannot resume exactly from {folder}: it was trained with {key}={saved.get(key)!r}, "
                f"this run has {key}={getattr(args, key)!r}"
            )
    if state["world_size"] != world:
        raise ValueError(
            f"cannot resume exactly from {folder}: it was trained on {state['world_size']} "
            f"process(es), this run has {world}"
        )
    ckpt.load_trainable_weights(model, ckpt.read_trainable_weights(folder), sharded)
    ckpt.load_optimizer_state(model, optimizer, names, ckpt.read_optimizer_state(folder), sharded)
    scheduler.load_state_dict(state["scheduler"])
    ckpt.load_rng(folder, rank)
    return int(state["step"])


def previous_run_message(output_dir: Path, previous: list[Path]) -> str:
    names = ", ".join(p.name for p in previous[:6]) + (", ..." if len(previous) > 6 else "")
    return (
        f"{output_dir} holds a previous run ({names}): resume it (resume_from / --resume), replace it "
        "(overwrite_output_dir / --overwrite: its checkpoints and weights are deleted first) or choose "
        "another output folder"
    )


# --- the loop
def train(
    model: nn.Module,
    train_data: Sequence,
    collate: Callable[[list], dict],
    args: TrainingArguments,
    *,
    eval_data: Sequence | None = None,
    lora_config: lora.LoraConfig | None = None,
    resume_from: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = None,
    processor: Idefics2Processor | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train `model` (already set up: LoRA added, parts frozen) on `train_data` and save the result.

    `collate(list_of_examples)` must return a dict of tensors with `labels` (-100 = not learned) and the
    model's inputs. Under torchrun each rank reads its own shard of the data and gradients are averaged with
    DDP, or with `args.fsdp` the model is sharded across the ranks (FSDP2: each decoder, vision and perceiver
    layer is one unit).
    `resume_from`: a checkpoint folder, or True for the newest one in `args.output_dir`. With LoRA the output
    folder receives the PEFT adapter; otherwise the full model (`save_pretrained`), with `processor`'s files
    when one is given (in every checkpoint-N too), so that each such folder is a complete checkpoint that
    idefics2 and transformers load alike. `objective`: what is minimised (default: TokenLoss, the
    cross-entropy of the learned tokens; DPO's objective lives in idefics2.training.dpo).
    """
    objective = objective or TokenLoss()
    if len(train_data) == 0:
        raise ValueError("the training data is empty")
    rank, world, local_rank = distributed_context()
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    output_dir = Path(args.output_dir)
    if not resume_from:
        previous = ckpt.previous_run(output_dir)
        if previous and not args.overwrite_output_dir:
            raise ValueError(previous_run_message(output_dir, previous))
        if previous and rank == 0:
            ckpt.remove_previous_run(output_dir)
        if world > 1:
            dist.barrier()
    output_dir.mkdir(parents=True, exist_ok=True)

    model.to(device)
    model.train()
    if args.gradient_checkpointing:
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        else:
            enable_gradient_checkpointing(model)
    sharded = args.fsdp and world > 1
    if sharded:
        shard_model(model)
    optimizer, names = build_optimizer(model, args)
    total = steps_for(len(train_data), args, world)
    if args.warmup_steps >= total and args.warmup_steps > 0 and rank == 0:
        last = args.lr * lr_factor(total - 1, args.scheduler, args.warmup_steps, total)
        warnings.warn(
            f"warmup_steps ({args.warmup_steps}) is not shorter than the run ({total} steps): the learning "
            f"rate never reaches lr={args.lr:g} (the last step uses {last:.2e}); lower warmup_steps",
            stacklevel=2,
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, kind=args.scheduler, warmup=args.warmup_steps, total=total)
    )

    step = 0
    if resume_from:
        folder = ckpt.latest_checkpoint(output_dir) if resume_from is True else Path(resume_from)
        if folder is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {output_dir}")
        step = _load_checkpoint(
            folder, model, optimizer, scheduler, names, args, world, rank, sharded, lora_config
        )

    ddp_model = model
    if world > 1 and not sharded:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult(step=step)
    progress = Progress(total, step, args.progress and rank == 0, args.logging_steps)
    stream = _micro_batch_stream(len(train_data), args, rank, world, start=step * args.grad_accum)

    while step < total:
        batches = [collate([train_data[i] for i in next(stream)]) for _ in range(args.grad_accum)]
        # Normalise by the learned tokens of the whole step on all ranks, so that accumulation and DDP give
        # the gradient of one big batch. DDP and FSDP average over ranks, hence the factor `world`.
        local = [float(objective.units(b)) for b in batches]
        n_units = _all_reduce_sum([sum(local)], device, world)[0]
        loss_sum, metric_sums = 0.0, {}
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1 or world == 1
            if sharded:
                model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or sharded else ddp_model.no_sync():
                loss, metrics = objective.summed(ddp_model, batch, device, autocast_context(args, device))
                (loss * world / max(n_units, 1.0)).backward()
            loss_sum += loss.detach().item()
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value
        if args.max_grad_norm is not None:
            # foreach: one norm over all gradients instead of one per tensor (FSDP's sharded ones: torch's
            # default)
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm, foreach=None if sharded else True)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        metric_names = list(metric_sums)
        totals = _all_reduce_sum([loss_sum] + [metric_sums[n] for n in metric_names], device, world)
        step_loss = totals[0] / max(n_units, 1.0)
        step_metrics = {n: t / max(n_units, 1.0) for n, t in zip(metric_names, totals[1:], strict=True)}
        result.losses.append(step_loss)
        result.metrics.append(step_metrics)
        input_tokens = _all_reduce_sum(
            [
                float(sum(int(b["attention_mask"].sum()) for b in batches)),
                float(sum(len(b["input_ids"]) for b in batches)),
            ],
            device,
            world,
        )
        progress.update(step, step_loss, lr, int(input_tokens[0]), int(input_tokens[1]), step_metrics)

        if eval_data is not None and args.eval_steps and (step % args.eval_steps == 0 or step == total):
            _record_evaluation(model, eval_data, collate, args, device, rank, world, objective, step, result)
            progress.message(_evaluation_line(result))
        if args.save_steps and (step % args.save_steps == 0 or step == total):
            save_checkpoint(
                model, optimizer, scheduler, names, args, step, world, rank, lora_config, sharded, processor
            )
    progress.close()

    if eval_data is not None and not args.eval_steps:
        _record_evaluation(model, eval_data, collate, args, device, rank, world, objective, step, result)
        progress.message(_evaluation_line(result))
    weights = ckpt.model_state(model, sharded)
    if rank == 0:
        ckpt.save_model_weights(model, weights, output_dir, lora_config, processor)
    if world > 1:
        dist.barrier()
    result.step = step
    return result


def _record_evaluation(model, data, collate, args, device, rank, world, objective, step, result) -> None:
    scores = evaluate_objective(model, data, collate, args, device, rank, world, objective)
    loss = scores.pop("loss")
    result.eval_losses.append((step, loss))
    result.eval_metrics.append((step, scores))


def _evaluation_line(result: TrainResult) -> str:
    (step, loss), (_, metrics) = result.eval_losses[-1], result.eval_metrics[-1]
    return f"step {step}: eval loss {loss:.4f}" + "".join(f" | {n} {v:.4f}" for n, v in metrics.items())
