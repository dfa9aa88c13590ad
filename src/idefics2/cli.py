"""The `idefics2` command line: one subcommand per task.

`generate` answers one prompt about images, `chat` holds a conversation on stdin/stdout, `batch` answers a
JSONL file of prompts, `eval` scores a model on the shapes world, `train` fine-tunes. Heavy modules (torch,
the model) are imported inside the commands, so `idefics2 --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in the command's arguments or inputs: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _number_in(low: float, high: float, *, low_open: bool = False, cast=float):
    """An argparse type: a number (`cast`: float or int) in [low, high] ((low, high] with low_open)."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            what = "an integer" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text!r}")
        return value

    return parse


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model on chat examples (LoRA adapter or full weights)",
        description="Fine-tune Idefics2 on a JSONL file of chat examples. Each line: "
        '{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, '
        '{"role": "assistant", "content": "..."}], "images": ["path.jpg"]}. Only assistant turns are '
        "learned. Runs data-parallel under `torchrun --nproc_per_node N`.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder or hub repo id")
    p.add_argument("--data", required=True, help="training examples (JSONL)")
    p.add_argument("--eval-data", help="evaluation examples (JSONL); the loss is reported every --eval-steps")
    p.add_argument("--output", required=True, help="folder for the adapter (or full model) and checkpoints")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora-rank", type=_positive_int, default=8, help="LoRA rank (default: 8)")
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
    p.add_argument(
        "--max-steps", type=_positive_int, help="optimizer steps (default: --epochs over the data)"
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=1, help="passes over the data when --max-steps is unset"
    )
    p.add_argument("--batch-size", type=_positive_int, default=1, help="examples per micro-batch per process")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default: 1e-4 LoRA, 1e-5 full)"
    )
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--scheduler", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    p.add_argument(
        "--max-length",
        type=_positive_int,
        help="cut longer examples to this many tokens (never through an image: such examples are "
        "dropped with a warning)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "no"],
        default="auto",
        help="bf16 autocast: auto = on GPUs that support it",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        default="float32",
        help="dtype of the loaded weights (default: float32)",
    )
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
    p.add_argument("--eval-steps", type=_positive_int, help="evaluate every N steps (default: at the end)")
    p.add_argument(
        "--save-steps",
        type=_positive_int,
        help="write a resumable checkpoint (output/checkpoint-N) every N steps and at the end; "
        "without it only the final weights are saved",
    )
    p.add_argument("--logging-steps", type=_positive_int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from idefics2.training import (
        ChatCollator,
        ChatDataset,
        LoraConfig,
        TrainingArguments,
        add_lora,
        freeze,
        mark_only_lora_trainable,
        read_jsonl,
        train,
    )
    from idefics2.training.checkpoint import latest_checkpoint
    from idefics2.training.lora import DEFAULT_TARGET_MODULES
    from idefics2.training.trainer import distributed_context

    if args.full and args.lora_alpha is not None:
        raise UserError("--lora-alpha has no effect with --full")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")

    if args.resume and latest_checkpoint(Path(args.output)) is None:
        raise UserError(f"--resume: no checkpoint to resume from in {args.output}")
    train_examples = read_jsonl(args.data)  # a bad line stops everything here, before any model loads
    eval_examples = read_jsonl(args.eval_data) if args.eval_data else None

    from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor

    processor = Idefics2Processor.from_pretrained(args.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collator = ChatCollator(processor, max_length=args.max_length)
        train_data = ChatDataset(train_examples, collator)
        eval_data = ChatDataset(eval_examples, collator) if eval_examples else None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)

    training_args = TrainingArguments(
        output_dir=args.output,
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
        logging_steps=args.logging_steps,
        progress=not args.no_progress,
    )
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = Idefics2ForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    lora_config = None
    if not args.full:
        lora_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_targets or DEFAULT_TARGET_MODULES,
            base_model_name_or_path=str(args.model),
        )
        add_lora(model, lora_config)
        mark_only_lora_trainable(model)
    freeze(model, vision=args.freeze_vision, connector=args.freeze_connector, decoder=args.freeze_decoder)

    result = train(
        model,
        train_data,
        collator,
        training_args,
        eval_data=eval_data,
        lora_config=lora_config,
        resume_from=args.resume or None,
    )
    if distributed_context()[0] == 0:
        if args.full:
            processor.save_pretrained(args.output)
        last = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
        what = "model" if args.full else "LoRA adapter"
        print(f"saved the {what} to {args.output} after {result.step} steps{last}", file=sys.stderr)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------- model commands
DEFAULT_MAX_NEW_TOKENS = 256  # when neither --max-new-tokens nor the checkpoint's generation_config sets one
IMAGE_MARKER = "<image>"


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="DIR_OR_REPO",
        help="checkpoint folder or hub repo id (default: the built-in shapes-world model)",
    )
    p.add_argument(
        "--adapter", metavar="DIR", help="LoRA adapter (PEFT format, e.g. from `idefics2 train`) to apply"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is available")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: bfloat16 on GPUs that support it, else float32; "
        "auto: the checkpoint's)",
    )


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        metavar="N",
        help=f"most tokens per answer (default: the checkpoint's, else {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument(
        "--temperature",
        type=_number_in(0.0, 100.0),
        metavar="T",
        help="sample at this temperature; 0 = greedy (default: the checkpoint's setting, usually greedy)",
    )
    p.add_argument(
        "--top-p",
        type=_number_in(0.0, 1.0, low_open=True),
        metavar="P",
        help="nucleus sampling: keep the likeliest tokens up to this total probability (implies sampling)",
    )
    p.add_argument(
        "--seed", type=_non_negative_int, metavar="S", help="random seed for sampling (reproducible answers)"
    )


def _add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answer one prompt about images",
        description="Answer one prompt about zero or more images and print the answer. The prompt becomes "
        "one user turn of the checkpoint's chat template with the images first, unless it holds <image> "
        "markers that place them (one per image).",
    )
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image file (repeat for several)"
    )
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction")
    _add_model_options(p)
    _add_sampling_options(p)
    p.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    p.set_defaults(func=_generate)


def _add_chat_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="interactive multi-turn conversation",
        description="A conversation on stdin/stdout: each line is a user message, each answer is printed as "
        "it is generated. /image PATH attaches an image to the next message, /reset starts over, /quit "
        "(or end of input) leaves.",
    )
    _add_model_options(p)
    _add_sampling_options(p)
    p.set_defaults(func=_chat)


def _add_batch_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="answer a JSONL file of prompts",
        description='Answer every line of a JSONL file: {"id": ..., "images": ["a.png", ...], "prompt": '
        '"..."} (image paths relative to the input file\'s folder). Writes {"id": ..., "text": "..."} '
        'lines in input order; a bad line becomes {"id": ..., "error": "..."} and the run goes on.',
    )
    p.add_argument("--input", required=True, metavar="IN.jsonl", help="JSONL file of prompts")
    p.add_argument(
        "--output", required=True, metavar="OUT.jsonl", help="JSONL file for the answers (overwritten)"
    )
    _add_model_options(p)
    _add_sampling_options(p)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        metavar="N",
        help="prompts per generation batch (default: 8)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_batch)


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy on the shapes world",
        description="Ask a model freshly drawn shapes-world questions (seeded) and print its exact-match "
        "accuracy (greedy answers) per question type and overall.",
    )
    _add_model_options(p)
    p.add_argument(
        "--num-per-type",
        type=_positive_int,
        default=100,
        metavar="N",
        help="questions per type (default: 100)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the questions (default: 0)")
    p.add_argument(
        "--batch-size", type=_positive_int, default=32, metavar="N", help="questions per batch (default: 32)"
    )
    p.add_argument(
        "--supersample",
        type=_positive_int,
        default=1,
        metavar="N",
        help="draw the images N times larger and reduce them (anti-aliased edges)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=_number_in(1, 95, cast=int),
        metavar="Q",
        help="pass the images through JPEG at this quality (1-95)",
    )
    p.add_argument(
        "--renderer",
        choices=("pil", "analytic"),
        default="pil",
        help="how the shapes are drawn: PIL (default), or a second, independent renderer with soft edges",
    )
    p.set_defaults(func=_eval)


def _model_folder(name: str | None) -> Path:
    from idefics2.hub import resolve_checkpoint

    if name is None:
        try:
            from idefics2.assets import builtin_model_dir
        except ImportError:
            raise UserError("this install has no built-in model: name a checkpoint with --model") from None
        return builtin_model_dir()
    folder = resolve_checkpoint(name)
    if not (folder / "config.json").is_file():
        raise UserError(f"{name} is not a checkpoint: it has no config.json")
    return folder


def _adapter_folder(name: str) -> Path:
    from idefics2.hub import CheckpointNotFoundError, resolve_checkpoint

    try:
        folder = resolve_checkpoint(name)
    except CheckpointNotFoundError as error:
        raise UserError(f"--adapter: {error}") from None
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"--adapter: {name} is not a LoRA adapter: it has no adapter_config.json")
    return folder


def _load_pipeline(args: argparse.Namespace):
    """The ChatPipeline for --model (or the built-in model), --adapter, --device and --dtype."""
    import torch

    from idefics2.pipelines import pipeline

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is None:
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    folder = _model_folder(args.model)
    adapter = _adapter_folder(args.adapter) if args.adapter else None
    return pipeline(folder, dtype=dtype, device=device, adapter=adapter)


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """The mistakes visible before the model loads."""
    if args.temperature == 0 and args.top_p is not None:
        raise UserError("--top-p needs sampling, but --temperature 0 asks for greedy decoding")
    if args.temperature == 0 and args.seed is not None:
        raise UserError("--seed needs sampling, but --temperature 0 asks for greedy decoding")


def _controls(args: argparse.Namespace, model) -> dict[str, Any]:
    """Generation controls from the flags; unset ones follow the checkpoint's generation_config."""
    controls: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        controls["max_new_tokens"] = args.max_new_tokens
    elif not model.generation_config.get("max_new_tokens"):
        controls["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    if args.temperature == 0:
        controls["do_sample"] = False
    elif args.temperature is not None or args.top_p is not None:
        controls["do_sample"] = True
        if args.temperature is not None:
            controls["temperature"] = args.temperature
        if args.top_p is not None:
            controls["top_p"] = args.top_p
    if args.seed is not None:
        if not controls.get("do_sample", bool(model.generation_config.get("do_sample"))):
            raise UserError("--seed needs sampling: add --temperature (above 0) or --top-p")
        controls["seed"] = args.seed
    return controls


def _open_image(path: str | os.PathLike):
    """The image file as an RGB PIL image; UserError naming the file when it is missing or unreadable."""
    from idefics2.processing.images import load_rgb

    if Path(path).is_dir():
        raise UserError(f"{path} is a folder, not an image file")
    if not Path(path).is_file():
        raise UserError(f"image not found: {path}")
    try:
        return load_rgb(path)
    except ValueError as error:
        raise UserError(str(error)) from None


def _user_message(prompt: str, num_images: int) -> dict[str, Any]:
    """One user turn: the images first, then the prompt; or the images where the prompt's <image> markers
    are (one marker per image)."""
    pieces = prompt.split(IMAGE_MARKER)
    if len(pieces) == 1:
        return {
            "role": "user",
            "content": [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}],
        }
    if len(pieces) - 1 != num_images:
        raise UserError(
            f"the prompt has {len(pieces) - 1} {IMAGE_MARKER} marker(s) but {num_images} image(s)"
        )
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return {"role": "user", "content": content}


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    _check_sampling_flags(args)
    images = [_open_image(path) for path in args.image]  # bad files fail before the model loads
    message = _user_message(args.prompt, len(images))
    pipe = _load_pipeline(args)
    controls = _controls(args, pipe.model)
    if args.stream:
        for piece in pipe.stream([message], images, **controls):
            print(piece, end="", flush=True)
        print()
    else:
        print(pipe.chat([message], images, **controls))
    return 0


CHAT_HELP = "/image PATH attaches an image to your next message; /reset starts over; /quit leaves"


def _chat(args: argparse.Namespace) -> int:
    _check_sampling_flags(args)
    pipe = _load_pipeline(args)
    controls = _controls(args, pipe.model)
    interactive = sys.stdin.isatty()

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        note(f"idefics2 chat: {CHAT_HELP}")
    history: list[dict[str, Any]] = []  # the conversation so far, with its images in order
    images: list[Any] = []
    pending: list[Any] = []  # images attached to the next message
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            break
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                history, images, pending = [], [], []
                note("(conversation cleared)")
            elif command == "/image":
                path = rest.strip().strip("'\"")  # a path pasted with quotes around it
                try:
                    if not path:
                        raise UserError("usage: /image PATH")
                    pending.append(_open_image(path))
                    note(f"(image {path} attached to your next message)")
                except UserError as error:
                    note(f"error: {error}")
            elif command == "/help":
                note(CHAT_HELP)
            else:
                note(f"error: unknown command {line!r}: {CHAT_HELP}")
            continue
        reply: list[str] = []
        try:
            turns = history + [_user_message(line, len(pending))]
            for piece in pipe.stream(turns, images + pending, **controls):
                print(piece, end="", flush=True)
                reply.append(piece)
            print(flush=True)
        except (UserError, ValueError) as error:
            if reply:
                print(flush=True)
            note(f"error: {' '.join(str(error).split())}")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat; the turn is forgotten
            print(flush=True)
            note("(interrupted)")
            continue
        history = turns + [{"role": "assistant", "content": [{"type": "text", "text": "".join(reply)}]}]
        images, pending = images + pending, []
    return 0


class _Progress:
    """A one-line progress bar on stderr: [#####.....] done/total, elapsed seconds."""

    def __init__(self, total: int, what: str, enabled: bool = True, width: int = 30):
        import time

        self.total, self.what, self.enabled, self.width = total, what, enabled, width
        self.done, self.clock, self.start = 0, time.monotonic, time.monotonic()
        self._draw()

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def _draw(self) -> None:
        if self.enabled:
            filled = self.width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            elapsed = self.clock() - self.start
            sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {self.what} {elapsed:.0f}s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class _BadLine(Exception):
    """An input line of `batch` that cannot be answered; `request_id` is its "id" when it has one."""

    def __init__(self, message: str, request_id: Any = None):
        super().__init__(message)
        self.request_id = request_id


def _read_request(number: int, line: str, base: Path) -> tuple[Any, dict[str, Any], list[Any]]:
    """(id, user message, images) of one input line of `batch`; _BadLine for a bad one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise _BadLine(f"line {number}: invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(record, dict):
        raise _BadLine(f"line {number}: expected a JSON object, got {type(record).__name__}")
    request_id, prompt, paths = record.get("id"), record.get("prompt"), record.get("images", [])
    try:
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError('"prompt" must be a non-empty string')
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise UserError('"images" must be a list of image file paths')
        images = [_open_image(base / path) for path in paths]
        return request_id, _user_message(prompt, len(images)), images
    except UserError as error:
        raise _BadLine(f"line {number}: {error}", request_id) from None


def _prompt_text(processor, message: dict[str, Any]) -> str:
    if processor.chat_template:
        return processor.apply_chat_template([message], add_generation_prompt=True)
    return "".join(p["text"] if p["type"] == "text" else IMAGE_MARKER for p in message["content"])


def _answer_batch(pipe, messages: list[dict], images: list[list], controls: dict[str, Any]) -> list[str]:
    """Greedy or sampled answers to one user turn each, generated together (prompts left-padded)."""
    import torch

    from idefics2.generation import default_eos_token_ids

    model, processor = pipe.model, pipe.processor
    prompts = [_prompt_text(processor, m) for m in messages]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = processor(
            text=prompts, images=images if any(images) else None, padding=True, return_tensors="pt"
        )
    finally:
        tokenizer.padding_side = side
    weight = model.lm_head.weight
    inputs = {k: v.to(weight.device) for k, v in batch.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(weight.dtype)
    with torch.no_grad():
        out = model.generate(**inputs, tokenizer=processor, **controls)
    ends = set(default_eos_token_ids(model, processor))
    answers = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        row = row[: next((i for i, t in enumerate(row) if t in ends), len(row))]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def _answer_requests(pipe, ready: list[tuple], controls: dict[str, Any]) -> list[dict[str, str]]:
    """{"text": ...} for each (line number, message, images), generated together; when that fails, one at a
    time, so that a request that fails alone gets {"error": ...} and the others their answers."""
    if not ready:
        return []
    try:
        texts = _answer_batch(pipe, [r[1] for r in ready], [r[2] for r in ready], controls)
        return [{"text": text} for text in texts]
    except ValueError:
        outcomes = []
        for number, message, images in ready:
            try:
                outcomes.append({"text": _answer_batch(pipe, [message], [images], controls)[0]})
            except ValueError as error:
                outcomes.append({"error": f"line {number}: {' '.join(str(error).split())}"})
        return outcomes


def _batch(args: argparse.Namespace) -> int:
    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise UserError(f"input file not found: {source}")
    if target.exists() and target.resolve() == source.resolve():
        raise UserError("--output must not be the --input file")
    if not target.parent.is_dir():
        raise UserError(f"output folder does not exist: {target.parent}")
    _check_sampling_flags(args)
    lines = [(n, line) for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise UserError(f"{source} holds no lines")
    pipe = _load_pipeline(args)
    controls = _controls(args, pipe.model)

    progress = _Progress(len(lines), "lines", enabled=not args.no_progress)
    n_errors = 0
    with target.open("w", encoding="utf-8") as out:
        for start in range(0, len(lines), args.batch_size):
            results: list[dict[str, Any]] = []
            ready = []  # (line number, message, images) of the good lines
            for number, line in lines[start : start + args.batch_size]:
                try:
                    request_id, message, images = _read_request(number, line, source.parent)
                except _BadLine as error:
                    results.append({"id": error.request_id, "error": str(error)})
                    continue
                ready.append((number, message, images))
                results.append({"id": request_id})
            outcomes = iter(_answer_requests(pipe, ready, controls))
            for result in results:
                if "error" not in result:
                    result.update(next(outcomes))
            for result in results:
                n_errors += "error" in result
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            progress.advance(len(results))
    progress.close()
    print(f"wrote {len(lines)} results to {target} ({n_errors} error(s))", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from idefics2.shapes import QUESTION_TYPES, evaluate, make_dataset

    pipe = _load_pipeline(args)
    examples = make_dataset(args.num_per_type, args.seed)
    print(f"asking {len(examples)} questions (seed {args.seed})...", file=sys.stderr, flush=True)
    scores = evaluate(
        pipe,
        examples=examples,
        batch_size=args.batch_size,
        supersample=args.supersample,
        jpeg_quality=args.jpeg_quality,
        renderer=args.renderer,
    )
    print(f"{'question type':<16}{'accuracy':>9}")
    for qtype in [*QUESTION_TYPES, "overall"]:
        if qtype in scores:
            print(f"{qtype:<16}{scores[qtype]:>9.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="idefics2", description="Idefics2 vision-language model tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_generate_parser(subparsers)
    _add_chat_parser(subparsers)
    _add_batch_parser(subparsers)
    _add_eval_parser(subparsers)
    _add_train_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from idefics2.hub import CheckpointNotFoundError
    from idefics2.training.data import DataError

    try:
        return args.func(args)
    except (UserError, DataError, CheckpointNotFoundError, OSError, ValueError) as error:
        message = " ".join(str(error).split())
        print(f"idefics2 {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"idefics2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
