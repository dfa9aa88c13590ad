"""The Idefics2 model: vision encoder, perceiver connector, Mistral decoder and LM head.

The names below are imported on first use, so that importing a leaf module (`idefics2.modeling.kernels`,
`idefics2.modeling.attention`) never imports the whole model: idefics2.quantization and idefics2.loading
build on those leaves, and the model builds on them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Idefics2ForConditionalGeneration": "idefics2.modeling.model",
    "Idefics2Model": "idefics2.modeling.model",
    "Idefics2ModelOutput": "idefics2.modeling.model",
    "Idefics2Output": "idefics2.modeling.model",
    "KVCache": "idefics2.modeling.text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'idefics2.modeling' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
