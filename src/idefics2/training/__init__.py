"""Fine-tuning: chat collator with label masking, training loop (DDP under torchrun), LoRA in PEFT format,
preference tuning (DPO)."""

from idefics2.training.data import (
    ChatCollator,
    ChatDataset,
    DataError,
    EncodedExample,
    normalize_example,
    read_jsonl,
)
from idefics2.training.dpo import (
    DPOLoss,
    PreferenceCollator,
    PreferenceDataset,
    evaluate_dpo,
    frozen_copy,
    read_preferences,
    train_dpo,
)
from idefics2.training.lora import (
    LoraConfig,
    adapters_disabled,
    add_lora,
    load_adapter,
    mark_only_lora_trainable,
    merge_lora,
    save_adapter,
)
from idefics2.training.trainer import (
    Objective,
    TokenLoss,
    TrainingArguments,
    TrainResult,
    evaluate,
    freeze,
    train,
)

__all__ = [
    "ChatCollator",
    "DPOLoss",
    "ChatDataset",
    "DataError",
    "EncodedExample",
    "LoraConfig",
    "Objective",
    "PreferenceCollator",
    "PreferenceDataset",
    "TokenLoss",
    "TrainResult",
    "TrainingArguments",
    "adapters_disabled",
    "add_lora",
    "evaluate",
    "evaluate_dpo",
    "freeze",
    "frozen_copy",
    "load_adapter",
    "mark_only_lora_trainable",
    "merge_lora",
    "normalize_example",
    "read_jsonl",
    "read_preferences",
    "save_adapter",
    "train",
    "train_dpo",
]
