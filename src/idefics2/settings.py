"""The settings a user names, checked, and what they become: the model to load (--model, --adapter, --device,
--dtype, --quantize) as a ChatPipeline, and the generation settings (--max-new-tokens, --temperature, --top-p,
--seed, --json-schema / --regex) as generation controls.

The CLI's flags, the rows of `idefics2 batch` (idefics2.serving.batch) and the Ray Predictor's arguments
(idefics2.integrations.ray) go through these, so a mistake reads the same wherever it is made: a ValueError
whose message names the setting as the CLI spells it. The number checks take text and raise
argparse.ArgumentTypeError, so they also serve as argparse types. Nothing heavy is imported here until a
function needs it (the CLI's --help stays instant).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

DEFAULT_MAX_NEW_TOKENS = 256  # when neither --max-new-tokens nor the checkpoint's generation_config sets one


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "a non-negative integer")


def _whole_number(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def number_in(low: float, high: float, *, low_open: bool = False, cast=float):
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


def constraint_controls(args: argparse.Namespace) -> dict[str, Any]:
    """json_schema= or regex= for generation from --json-schema / --regex, read and checked without the
    model (so a bad schema or regex is reported before anything loads)."""
    from idefics2.constrained import validate

    if getattr(args, "json_schema", None) is not None:
        schema = read_json_schema(args.json_schema, "--json-schema")
        try:
            validate(json_schema=schema)
        except ValueError as error:
            raise ValueError(f"--json-schema: {error}") from None
        return {"json_schema": schema}
    if getattr(args, "regex", None) is not None:
        try:
            validate(regex=args.regex)
        except ValueError as error:
            raise ValueError(f"--regex: {error}") from None
        return {"regex": args.regex}
    return {}


def read_json_schema(file_or_json: str, what: str) -> dict[str, Any]:
    """A JSON schema given inline (text starting with "{") or as a file path; ValueError naming `what`."""
    text = file_or_json
    if not file_or_json.lstrip().startswith("{"):
        path = Path(file_or_json)
        if not path.is_file():
            raise ValueError(f"{what}: {file_or_json} is neither a file nor a JSON object")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{what}: cannot read {file_or_json}: {error}") from None
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{what}: not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{what}: a JSON schema must be a JSON object, got {type(schema).__name__}")
    return schema


def model_folder(name: str | None) -> Path:
    from idefics2.hub import resolve_checkpoint

    if name is None:
        try:
            from idefics2.assets import builtin_model_dir
        except ImportError:
            raise ValueError("this install has no built-in model: name a checkpoint with --model") from None
        return builtin_model_dir()
    folder = resolve_checkpoint(name)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{name} is not a checkpoint: it has no config.json")
    return folder


def adapter_folder(name: str) -> Path:
    from idefics2.hub import CheckpointNotFoundError, resolve_checkpoint

    local = Path(name).expanduser()
    parent = local.parent
    # A name whose first part is a local folder, or that ends in a training checkpoint's folder name, is a
    # mistyped local path, not a hub repo id: say so instead of trying the hub.
    looks_local = (parent != Path(".") and parent.is_dir()) or re.fullmatch(r"checkpoint-\d+", local.name)
    if not local.exists() and looks_local:
        if parent.is_dir():
            inside = sorted(p.name for p in parent.iterdir() if (p / "adapter_config.json").is_file())
            hint = f"; {parent} holds: {', '.join(inside)}" if inside else f"; {parent} holds no adapter"
        else:
            hint = f"; there is no folder {parent} either"
        raise ValueError(f"--adapter: no such folder: {name}{hint}")
    try:
        folder = resolve_checkpoint(name)
    except CheckpointNotFoundError as error:
        raise ValueError(f"--adapter: {error}") from None
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"--adapter: {name} is not a LoRA adapter: it has no adapter_config.json")
    return folder


def load_pipeline(args: argparse.Namespace):
    """The ChatPipeline for --model (or the built-in model), --adapter, --device, --dtype, --quantize and
    --calibrate (N built-in shapes questions for activation-aware quantization scales)."""
    import torch

    from idefics2.pipelines import pipeline

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = weights_dtype(args.dtype, device)
    folder = model_folder(args.model)
    adapter = adapter_folder(args.adapter) if args.adapter else None
    if not getattr(args, "calibrate", None):
        return pipeline(folder, dtype=dtype, device=device, adapter=adapter, quantize=args.quantize)
    if not args.quantize:
        raise ValueError("--calibrate N needs --quantize int8|int4")
    pipe = pipeline(folder, dtype=dtype, device=device, adapter=adapter)
    try:
        pipe.model.quantize(args.quantize, calibration=shapes_calibration(pipe.processor, args.calibrate))
    except ValueError as error:  # e.g. a checkpoint saved quantized
        raise ValueError(f"--calibrate: {error}") from None
    return pipe


def shapes_calibration(processor, count: int) -> list[dict]:
    """`count` built-in shapes questions (image and question, chat template applied) as model inputs."""
    from idefics2.shapes import QUESTION_TYPES, make_dataset

    batches = []
    for example in make_dataset(-(-count // len(QUESTION_TYPES)), seed=0)[:count]:
        prompt = processor.apply_chat_template(example.messages(), add_generation_prompt=True)
        batches.append(dict(processor(text=prompt, images=[example.images()], return_tensors="pt")))
    return batches


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The mistakes visible before the model loads."""
    if args.temperature == 0 and args.top_p is not None:
        raise ValueError("--top-p needs sampling, but --temperature 0 asks for greedy decoding")
    if args.temperature == 0 and args.seed is not None:
        raise ValueError("--seed needs sampling, but --temperature 0 asks for greedy decoding")


def generation_controls(args: argparse.Namespace, model) -> dict[str, Any]:
    """Generation controls from the flags; unset ones follow the checkpoint's generation_config. With
    --json-schema or --regex the grammar ends the answer, so the default limit is DEFAULT_MAX_NEW_TOKENS
    rather than the checkpoint's (the built-in model's 8 suits one-word answers, not JSON)."""
    controls: dict[str, Any] = {}
    constrained = getattr(args, "json_schema", None) is not None or getattr(args, "regex", None) is not None
    if args.max_new_tokens is not None:
        controls["max_new_tokens"] = args.max_new_tokens
    elif constrained or not model.generation_config.get("max_new_tokens"):
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
            raise ValueError("--seed needs sampling: add --temperature (above 0) or --top-p")
        controls["seed"] = args.seed
    return controls


def weights_dtype(choice: str, device: str):
    """The --dtype choice as what from_pretrained takes: "auto" is the fastest dtype on the device,
    "checkpoint" the checkpoint's own."""
    import torch

    from idefics2.modeling.kernels import fastest_dtype

    if choice == "auto":
        return fastest_dtype(device)
    return "auto" if choice == "checkpoint" else getattr(torch, choice)
