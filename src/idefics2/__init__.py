"""idefics2: a standalone, fast PyTorch implementation of the Idefics2 vision-language model."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so `import idefics2` stays cheap.
_EXPORTS = {
    "Idefics2Config": "idefics2.config",
    "Idefics2VisionConfig": "idefics2.config",
    "Idefics2PerceiverConfig": "idefics2.config",
    "Idefics2TextConfig": "idefics2.config",
    "Idefics2Model": "idefics2.modeling",
    "Idefics2ForConditionalGeneration": "idefics2.modeling",
    "Idefics2ImageProcessor": "idefics2.processing",
    "Idefics2Tokenizer": "idefics2.processing",
    "Idefics2Processor": "idefics2.processing",
    "pipeline": "idefics2.pipelines",
    "ChatPipeline": "idefics2.pipelines",
}

# Submodules reachable as attributes after a plain `import idefics2` (`idefics2.assets.builtin_model_dir()`).
_SUBMODULES = ("assets",)

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"idefics2.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'idefics2' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
