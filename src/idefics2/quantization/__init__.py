"""Weight-only quantization: int8 per output channel and int4 in groups, on torch's kernels where the device
has them (see idefics2.quantization.layer), saved in compressed-tensors' pack-quantized form (which
transformers and vLLM read; idefics2.quantization.formats), and AutoAWQ "GEMM" checkpoints read into the same
int4 layers.

    model = Idefics2ForConditionalGeneration.from_pretrained(path, quantize="int4", group_size=128)
    model.quantize("int8")   # an already loaded float model, in place
"""

from idefics2.quantization.convert import (
    DEFAULT_PARTS,
    MODES,
    PARTS,
    QuantizationSpec,
    StoredQuantization,
    config_entry,
    quantize_model,
    quantized_layers,
    stored_quantization,
    target_layers,
)
from idefics2.quantization.layer import QuantizedLinear

__all__ = [
    "DEFAULT_PARTS",
    "MODES",
    "PARTS",
    "QuantizationSpec",
    "QuantizedLinear",
    "StoredQuantization",
    "config_entry",
    "quantize_model",
    "quantized_layers",
    "stored_quantization",
    "target_layers",
]
