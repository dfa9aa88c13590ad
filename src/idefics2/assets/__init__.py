"""Files shipped inside the package: the built-in demo model, a small Idefics2 trained on the shapes world."""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def builtin_model_dir() -> Path:
    """The folder of the built-in model: a complete checkpoint (config, safetensors weights, tokenizer,
    processor settings, chat template) that `Idefics2ForConditionalGeneration.from_pretrained` and
    `Idefics2Processor.from_pretrained` load offline."""
    if not (BUILTIN_DIR / "config.json").is_file() or not (BUILTIN_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the built-in model is missing from {BUILTIN_DIR}; regenerate it with "
            "scripts/build_builtin_model.py or reinstall the package"
        )
    return BUILTIN_DIR
