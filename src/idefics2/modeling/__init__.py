"""The Idefics2 model: vision encoder, perceiver connector, Mistral decoder and LM head."""

from idefics2.modeling.model import (
    Idefics2ForConditionalGeneration,
    Idefics2Model,
    Idefics2ModelOutput,
    Idefics2Output,
)
from idefics2.modeling.text import KVCache

__all__ = [
    "Idefics2ForConditionalGeneration",
    "Idefics2Model",
    "Idefics2ModelOutput",
    "Idefics2Output",
    "KVCache",
]
