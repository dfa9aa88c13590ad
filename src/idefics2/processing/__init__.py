"""Idefics2 input processing: images, tokenizer, chat template and the combined processor."""

from .batch import BatchFeature
from .image_processor import Idefics2ImageProcessor
from .images import DEFAULT_MAX_PIXELS, load_rgb, open_image
from .processor import Idefics2Processor
from .tokenizer import Idefics2Tokenizer

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BatchFeature",
    "Idefics2ImageProcessor",
    "Idefics2Processor",
    "Idefics2Tokenizer",
    "load_rgb",
    "open_image",
]
