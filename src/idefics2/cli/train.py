"""`idefics2 train`: fine-tune on a JSONL file of chat examples (LoRA adapter or full weights), or tune on
preference pairs with DPO (`--method dpo`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from idefics2.cli.common import UserError, add_data_options, add_quantize_option, announce_rows, open_rows
from idefics2.settings import model_folder, non_negative_int, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model on chat examples (LoRA adapter or full weights)",
        description="Fine-tune Idefics2 on chat examples: a JSONL file, each line "
        '{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, '
        '{"role": "assistant", "content": "..."}], "images": ["path.jpg"]}; or a Parquet file / folder / '
        "glob, `datasets` folder or hub dataset in a layout idefics2 recognises (messages, the cauldron's "
        "texts, question/answer columns) or names with --columns, its images read as batches are built. "
        "Only assistant turns are learned. With --method dpo each row is a preference pair in TRL's layout: "
        '{"images": ["path.jpg"], "prompt": "...", "chosen": "...", "rejected": "..."}. '
        "Runs data-parallel under `torchrun --nproc_per_node N`.",
    )
    p.add_argument(
        "--model",
        metavar="DIR_OR_REPO",
        help="checkpoint folder or hub repo id (default: the built-in shapes-world model)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="training examples: JSONL, Parquet file / folder / glob, `datasets` folder or hub dataset id",
    )
    p.add_argument(
        "--eval-data",
        help="evaluation examples (the same kinds of input); the loss (and DPO's rewards, margin, accuracy) "
        "every --eval-steps",
    )
    add_data_options(p)
    p.add_argument("--eval-split", metavar="NAME", help="the split of --eval-data (default: --split)")
    p.add_argument(
        "--method",
        choices=["sft", "dpo"],
        default="sft",
        help="sft: learn the assistant turns (default); dpo: direct preference optimization on pairs",
    )
    p.add_argument("--beta", type=float, help="DPO: strength of the pull towards the reference (default 0.1)")
    p.add_argument(
        "--label-smoothing",
        type=float,
        help="DPO: assumed fraction of pairs whose preference is wrong, in [0, 0.5) (conservative DPO; "
        "default 0)",
    )
    p.add_argument(
        "--precompute-ref",
        action="store_true",
        help="DPO: compute the reference log-probabilities once before training (one forward per step "
        "instead of two; with --full no frozen copy of the model is kept)",
    )
    p.add_argument("--output", required=True, help="folder for the adapter (or full model) and checkpoints")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank (default: 8)")
    mode.add_argument(
        "--full", action="store_true", help="train all (unfrozen) weights instead of a LoRA adapter"
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument(
        "--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default: 0.05)"
    )
    p.add_argument(
        "--lora-targets",
        default=None,
        help="regex matched against full module names (default: every projection of the decoder "
        "and the connector)",
    )
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps (default: --epochs over the data)")
    p.add_argument(
        "--epochs", type=positive_int, default=1, help="passes over the data when --max-steps is unset"
    )
    p.add_argument("--batch-size", type=positive_int, default=1, help="examples per micro-batch per process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default: 1e-4 LoRA, 1e-5 full)"
    )
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--scheduler", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    p.add_argument(
        "--max-length",
        type=positive_int,
        help="cut longer examples to this many tokens (never through an image: such examples are "
        "dropped with a warning)",
    )
    p.add_argument(
        "--packing",
        action="store_true",
        help="pack several short examples into each row (up to --max-length tokens, default the longest "
        "example's length), each attending only to itself: no compute goes to padding",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "no"],
        default="auto",
        help="bf16 autocast: auto = on GPUs that support it",
    )
    p.add_argument(
        "--matmul-precision",
        choices=["highest", "high"],
        default="highest",
        help="float32 products: highest = IEEE float32; high = torch's setting of that name, each operand "
        "as two bfloat16 halves on CPUs where that is measured faster (Intel AMX), TF32 on NVIDIA GPUs",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "checkpoint"],
        default="float32",
        help="dtype of the loaded weights (default: float32; checkpoint: the checkpoint's own)",
    )
    add_quantize_option(p)
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="trade compute for activation memory"
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model across processes (FSDP) instead of DDP",
    )
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    p.add_argument("--freeze-connector", action="store_true", help="do not train the connector (perceiver)")
    p.add_argument("--freeze-decoder", action="store_true", help="do not train the text decoder and lm_head")
    p.add_argument("--eval-steps", type=positive_int, help="evaluate every N steps (default: at the end)")
    p.add_argument(
        "--save-steps",
        type=positive_int,
        help="write a resumable checkpoint (output/checkpoint-N) every N steps and at the end; "
        "without it only the final weights are saved",
    )
    p.add_argument("--logging-steps", type=positive_int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save-total-limit",
        type=non_negative_int,
        default=2,
        metavar="N",
        help="keep only the newest N checkpoint-N folders, deleting older ones (default: 2; 0 keeps all)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --output folder that holds a previous run: its checkpoints and weights "
        "are deleted first (without --resume or --overwrite such a folder is refused)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    # warnings (dropped examples, a warmup longer than the run) are one line each on stderr
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _print_warning
        return _run(args)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    import torch

    from idefics2.lora import DEFAULT_TARGET_MODULES
    from idefics2.training import (
        ChatCollator,
        LoraConfig,
        PackedDataset,
        PreferenceDataset,
        TrainingArguments,
        add_lora,
        freeze,
        frozen_copy,
        mark_only_lora_trainable,
        train,
        train_dpo,
    )
    from idefics2.training.checkpoint import latest_checkpoint, previous_run
    from idefics2.training.trainer import distributed_context, previous_run_message

    if args.full and args.lora_alpha is not None:
        raise UserError("--lora-alpha has no effect with --full")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.full and args.quantize:
        raise UserError("--quantize trains LoRA adapters on a frozen quantized model (QLoRA), not --full")
    dpo = args.method == "dpo"
    if not dpo:
        given = [
            flag
            for flag, value in (
                ("--beta", args.beta),
                ("--label-smoothing", args.label_smoothing),
                ("--precompute-ref", args.precompute_ref or None),
            )
            if value is not None
        ]
        if given:
            raise UserError(f"{given[0]} applies to --method dpo")
    elif args.packing:
        raise UserError("--packing applies to --method sft (DPO rows keep each pair's answers apart)")
    beta = 0.1 if args.beta is None else args.beta
    label_smoothing = args.label_smoothing or 0.0
    if not beta > 0:
        raise UserError(f"--beta must be positive, got {args.beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")

    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --output, --overwrite deletes it: choose one")
    output = Path(args.output).expanduser()
    if args.resume and latest_checkpoint(output) is None:
        raise UserError(f"--resume: no checkpoint to resume from in {args.output}")
    previous = previous_run(output)
    if previous and not args.resume and not args.overwrite:
        raise UserError(previous_run_message(output, previous))
    # a bad JSONL line, an unreadable input or unknown layout stops everything here, before any model loads
    if dpo:
        train_pairs = _preference_pairs(args, args.data, "--data", None)
        eval_pairs = (
            _preference_pairs(args, args.eval_data, "--eval-data", args.eval_split)
            if args.eval_data
            else None
        )
    else:
        train_rows = open_rows(args, args.data, "--data", announce=False, decode_images=False)
        eval_rows = None
        if args.eval_data:
            eval_rows = open_rows(
                args,
                args.eval_data,
                "--eval-data",
                split=args.eval_split,
                announce=False,
                decode_images=False,
            )
        train_examples = _jsonl_examples(train_rows, args.columns)
        eval_examples = _jsonl_examples(eval_rows, args.columns) if eval_rows is not None else None
    folder = model_folder(args.model)  # a hub id is downloaded here, once the data is known to be good
    if output.resolve() == folder.resolve():
        raise UserError(f"--output {args.output} is the --model folder: choose another output folder")

    from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor

    processor = Idefics2Processor.from_pretrained(folder)
    collator = ChatCollator(processor, max_length=args.max_length)
    if dpo:
        train_data = PreferenceDataset(train_pairs, collator)
        eval_data = PreferenceDataset(eval_pairs, collator) if eval_pairs else None
    else:
        train_data = _dataset(train_rows, train_examples, collator)
        eval_data = _dataset(eval_rows, eval_examples, collator) if eval_rows is not None else None
    if args.packing:
        packed = PackedDataset(train_data, args.max_length)
        if distributed_context()[0] == 0:
            print(
                f"packed {packed.num_examples} examples into {len(packed)} rows of up to {packed.capacity} "
                "tokens",
                file=sys.stderr,
            )
        train_data = packed

    training_args = TrainingArguments(
        output_dir=str(output),
        max_steps=args.max_steps,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr or (1e-5 if args.full else 1e-4),
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        mixed_precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        fsdp=args.fsdp,
        seed=args.seed,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit or None,
        overwrite_output_dir=args.overwrite,
        logging_steps=args.logging_steps,
        progress=not args.no_progress,
    )
    dtype = "auto" if args.dtype == "checkpoint" else getattr(torch, args.dtype)
    torch.set_float32_matmul_precision(args.matmul_precision)
    torch.manual_seed(args.seed)
    model = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, quantize=args.quantize)
    lora_config = None
    if not args.full:
        lora_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_targets or DEFAULT_TARGET_MODULES,
            base_model_name_or_path=str(args.model or folder),
        )
        add_lora(model, lora_config)
        mark_only_lora_trainable(model)
    freeze(model, vision=args.freeze_vision, connector=args.freeze_connector, decoder=args.freeze_decoder)

    common = dict(eval_data=eval_data, lora_config=lora_config, resume_from=args.resume or None,
                  processor=processor if args.full else None)  # fmt: skip
    if dpo:
        reference = frozen_copy(model) if args.full and not args.precompute_ref else None
        result = train_dpo(
            model,
            train_data,
            collator,
            training_args,
            beta=beta,
            label_smoothing=label_smoothing,
            reference=reference,
            precompute=args.precompute_ref,
            **common,
        )
    else:
        result = train(model, train_data, collator, training_args, **common)
    if distributed_context()[0] == 0:
        last = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
        if result.metrics and result.metrics[-1]:
            last += "".join(f", {name} {value:.4f}" for name, value in result.metrics[-1].items())
        what = "model" if args.full else "LoRA adapter"
        print(f"saved the {what} to {args.output} after {result.step} steps{last}", file=sys.stderr)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _jsonl_examples(rows, columns: str | None) -> list[dict] | None:
    """Our JSONL chat files are read as they always were: every line checked (image headers too) before any
    model loads, the first bad one stopping the run. Other inputs: None (read as rows when the processor is
    loaded, see _dataset)."""
    from idefics2.training import read_jsonl

    ours = rows.layout.startswith("messages") or not rows.recognised
    if rows.source.kind == "jsonl" and ours and not columns:
        return read_jsonl(rows.source.path)
    return None


def _dataset(rows, examples: list[dict] | None, collator):
    from idefics2.training import ChatDataset, DataError, RowsDataset

    if examples is not None:
        return ChatDataset(examples, collator)
    try:
        dataset = RowsDataset(rows, collator)
    except DataError as error:
        raise DataError(f"{error} (reading {rows.description} as layout {rows.layout})") from None
    announce_rows(rows)
    return dataset


def _preference_pairs(args, source: str, what: str, split: str | None) -> list[tuple[dict, dict]]:
    """The (chosen, rejected) chat examples of a preference input: our JSONL reader for a JSONL file (every
    line and image checked), idefics2.data's rows (TRL's preference layout, or named with --columns) for
    the rest."""
    from idefics2.training import DataError
    from idefics2.training.dpo import preference_examples, read_preferences

    if Path(source).suffix == ".jsonl" and Path(source).is_file() and not args.columns:
        return read_preferences(source)
    rows = open_rows(args, source, what, split=split)
    if not rows.layout.startswith("preference"):
        raise UserError(
            f"{what}: {source} is read as layout {rows.layout}, DPO needs prompt, chosen, rejected"
        )
    pairs = []
    for row in rows:
        if row.error is not None:
            raise DataError(row.error)
        fields = {
            "images": row.images,
            "prompt": row.messages,
            "chosen": row.chosen,
            "rejected": row.rejected,
        }
        try:
            pairs.append(preference_examples(fields))
        except DataError as error:
            raise DataError(f"{row.where}: {error}") from None
    return pairs
