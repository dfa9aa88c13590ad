"""Fine-tuning: chat collator with label masking, training loop (DDP under torchrun), LoRA in PEFT format."""

from idefics2.training.data import (
    ChatCollator,
    ChatDataset,
    DataError,
    EncodedExample,
    RowsDataset,
    normalize_example,
    read_jsonl,
)
from idefics2.training.lora import (
    LoraConfig,
    add_lora,
    load_adapter,
    mark_only_lora_trainable,
    merge_lora,
    save_adapter,
)
from idefics2.training.trainer import TrainingArguments, TrainResult, evaluate, freeze, train

__all__ = [
    "ChatCollator",
    "ChatDataset",
    "DataError",
    "EncodedExample",
    "LoraConfig",
    "RowsDataset",
    "TrainResult",
    "TrainingArguments",
    "add_lora",
    "evaluate",
    "freeze",
    "load_adapter",
    "mark_only_lora_trainable",
    "merge_lora",
    "normalize_example",
    "read_jsonl",
    "save_adapter",
    "train",
]
