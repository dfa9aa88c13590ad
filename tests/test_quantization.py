"""Weight-only quantization: formats, every compute route against the dequantized float computation, saving
and reloading, AutoAWQ checkpoints against AutoAWQ's own unpacking, and accuracy on random and trained models.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
from idefics2.loading import write_safetensors
from idefics2.modeling import kernels
from idefics2.quantization import QuantizedLinear, quantized_layers
from idefics2.quantization import layer as layer_module
from idefics2.quantization.formats import (
    AWQ_ORDER,
    awq_to_int4,
    dequantize_int4,
    from_compressed,
    group_size_for,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    to_compressed,
    unpack_nibbles,
)
from oracle_model import build_batch, build_reference_checkpoint, rel_diff, write_legacy_quantized_checkpoint

REPO = Path(__file__).resolve().parents[1]


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


# ---- formats ----------------------------------------------------------------------------------------------


def test_int8_is_within_half_a_step_per_channel():
    w = weight(96, 160)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    error = (q.float() * scales[:, None] - w).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-9).all())
    relative = (error.norm() / w.norm()).item()
    assert relative < 0.012, relative  # ~0.9% on N(0, 0.02) weights


def test_int4_is_within_half_a_step_per_group_and_packs_two_per_byte():
    w = weight(64, 256, seed=1)
    w[0, :64] = w[0, :64].abs() + 0.01  # a group of positive weights: the grid -8..7 still covers it
    q, scales = quantize_int4(w, 64)
    assert (q.dtype, q.shape, scales.shape, scales.dtype) == (torch.uint8, (64, 128), (64, 4), torch.bfloat16)
    values = unpack_nibbles(q)
    assert int(values.max()) <= 15 and torch.equal(pack_nibbles(values), q)
    assert torch.equal(values[:, 0], q[:, 0] >> 4) and torch.equal(values[:, 1], q[:, 0] & 15)  # even: high
    back = dequantize_int4(q, scales, None, torch.float32)
    expected = (values.double() - 8) * scales.double().repeat_interleave(64, dim=1)  # no zero points
    assert torch.equal(back.double(), expected)  # exact in float32
    step = scales.float().repeat_interleave(64, dim=1)
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())
    for group, bound in ((32, 0.09), (128, 0.12)):
        qq, ss = quantize_int4(w, group)
        relative = ((dequantize_int4(qq, ss, None, torch.float32) - w).norm() / w.norm()).item()
        assert relative < bound, (group, relative)


@pytest.mark.parametrize("bits, k", [(8, 160), (8, 90), (4, 160), (4, 90)])
def test_compressed_tensors_packing_is_theirs(bits, k):
    """to_compressed gives compressed-tensors' own packing of the same integers (widths that are not a whole
    number of int32 words included), and from_compressed reads it back."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    w = weight(24, k, seed=bits)
    qweight = quantize_int8(w)[0] if bits == 8 else quantize_int4(w, k)[0]
    signed = qweight if bits == 8 else (unpack_nibbles(qweight).to(torch.int8) - 8)
    packed = to_compressed(qweight, bits)
    assert packed.dtype == torch.int32 and torch.equal(packed, pack_to_int32(signed, bits))
    assert torch.equal(from_compressed(packed, bits, k), qweight)


def test_group_size_falls_back_to_a_divisor_of_the_width():
    assert group_size_for(4096, 128) == 128
    assert group_size_for(160, 128) == 32
    assert group_size_for(384, 256) == 128
    assert group_size_for(72, 128) == 72  # no kernel group divides it: one group per row


# ---- compute routes ---------------------------------------------------------------------------------------


def quantized(
    bits: int, n: int = 200, k: int = 256, bias: bool = True, dtype=torch.float32
) -> QuantizedLinear:
    b = torch.randn(n) * 0.1 if bias else None
    return QuantizedLinear.from_float(
        weight(n, k, seed=bits).to(dtype), b if b is None else b.to(dtype), bits, 64
    )


def expected(layer: QuantizedLinear, x: torch.Tensor, act=None) -> torch.Tensor:
    out = F.linear(
        x.double(),
        layer.dequantized_weight(torch.float64),
        None if layer.bias is None else layer.bias.double(),
    )
    return out if act is None else F.silu(out)


def ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


KERNEL_OPS = {8: "aten::_weight_int8pack_mm", 4: "aten::_weight_int4pack_mm_for_cpu"}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("route", ["kernel", "dequantize"])
def test_every_route_equals_the_dequantized_float_product(bits, rows, route):
    layer = quantized(bits)
    has_kernel = kernels.int8_weight_kernel("cpu") if bits == 8 else layer.packing is not None
    if route == "kernel" and not has_kernel:
        pytest.skip(f"no int{bits} kernel on this CPU (the dequantize route is tested)")
    x = torch.randn(rows, 256)
    off = {} if route == "kernel" else {"int8_weight_kernel": False, "int4_weight_kernel": False}
    off["native_bfloat16"] = False  # the dequantize route in float32 (its bfloat16 variant: below)
    with torch.no_grad(), kernels.force(**off):
        got = layer(x)
        activated = layer.forward_activated(x, "silu")
        names = ops_called(lambda: layer(x))
    takes_kernel = route == "kernel" and rows <= kernels.QUANTIZED_KERNEL_MAX_ROWS[bits]
    assert (KERNEL_OPS[bits] in names) == takes_kernel, names
    tolerance = 1.5e-2 if takes_kernel else 1e-5  # the kernels take bfloat16 activations
    assert rel_diff(got.double(), expected(layer, x)) <= tolerance
    assert rel_diff(activated.double(), expected(layer, x, "silu")) <= tolerance


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_route_in_slices_of_rows_and_in_bfloat16(bits, monkeypatch):
    layer = quantized(bits, n=300)  # not a multiple of the 64-row blocks
    x = torch.randn(2, 20, 256)
    want = expected(layer, x)
    no_kernel = {"int8_weight_kernel": False, "int4_weight_kernel": False}
    with torch.no_grad():
        with kernels.force(native_bfloat16=False, **no_kernel):
            whole = layer(x)
            monkeypatch.setattr(layer_module, "WORKSPACE_BYTES", 64 * 256 * 4)  # 64 rows at a time
            sliced = layer(x)
        with kernels.force(native_bfloat16=True, **no_kernel):
            bf16_product = layer(x)  # float32 in and out, the product in bfloat16
        with kernels.force(**no_kernel):
            low = layer.to(torch.bfloat16)(x.bfloat16())  # .to() converts the layer in place
    assert torch.allclose(sliced, whole, atol=1e-6)
    assert rel_diff(whole.double(), want) <= 1e-5
    assert bf16_product.dtype == torch.float32 and rel_diff(bf16_product.double(), want) <= 2e-2
    assert low.dtype == torch.bfloat16 and rel_diff(low.double(), want) <= 2e-2
    assert layer.scales.dtype == (torch.float32 if bits == 8 else torch.bfloat16)  # .to() keeps the scales


@pytest.mark.parametrize("bits", [8, 4])
def test_gradients_flow_through_the_dequantized_weight(bits):
    layer = quantized(bits)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 256, dtype=torch.float64, requires_grad=True)
    dense = nn.Linear(256, 200, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight(torch.float64))
        dense.bias.copy_(layer.bias)
    out = layer(x.float())
    out.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    dense(x2).pow(2).sum().backward()
    assert rel_diff(x.grad, x2.grad) <= 1e-5
    assert rel_diff(layer.bias.grad.double(), dense.bias.grad) <= 1e-5


def test_cpu_packed_layout_is_read_back_exactly():
    layer = quantized(4, n=130)  # padded to 192 packed rows
    if layer.packing is None:
        pytest.skip("no int4 kernel on this CPU: weights stay in the portable layout")
    portable = QuantizedLinear.from_float(weight(130, 256, seed=4), None, 4, 64)
    with kernels.force(int4_weight_kernel=False):
        reference = QuantizedLinear.from_float(weight(130, 256, seed=4), None, 4, 64)
    assert reference.packing is None and portable.packing is not None
    assert torch.equal(portable.nibbles(), unpack_nibbles(reference.qweight))
    assert torch.equal(portable.nibbles(70, 130), unpack_nibbles(reference.qweight[70:130]))
    via_kernel = portable._nibbles_from_kernel()[:130]  # the read-back used for CUDA's tinygemm layout
    assert torch.equal(via_kernel, unpack_nibbles(reference.qweight))
    assert torch.equal(portable.state_dict()["qweight"], reference.qweight)


# ---- models -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_reference_checkpoint(tmp_path_factory.mktemp("float_checkpoint"))


def batch() -> dict:
    samples = [{"text": [5, 6], "images": [(56, 56)]}, {"text": [3, 4], "images": []}]
    return build_batch(samples, n_latents=4)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_default_quantizes_the_decoder_only(checkpoint):
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize="int4", group_size=32)
    names = set(quantized_layers(model))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "lm_head" in names and "model.text_model.layers.1.mlp.down_proj" in names
    assert all(n.startswith("model.text_model.") or n == "lm_head" for n in names)
    assert not any(n.startswith("model.text_model.") for n in linears)
    entry = model.config.extra["quantization_config"]  # compressed-tensors', what save_pretrained writes
    assert (entry["quant_method"], entry["format"]) == ("compressed-tensors", "pack-quantized")
    [group] = entry["config_groups"].values()
    scheme = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    assert group["weights"] == {**scheme, "dynamic": False}
    from compressed_tensors.utils import match_named_modules  # its own reading of targets and ignore

    assert {name for name, _ in match_named_modules(model, group["targets"], entry["ignore"])} == names
    assert {name for name, _ in match_named_modules(model, entry["ignore"])} == linears
    everything = Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint, quantize="int8", quantize_modules=("decoder", "connector", "perceiver", "vision")
    )
    assert not [n for n, m in everything.named_modules() if isinstance(m, nn.Linear)]
    assert model.dtype == torch.float32 and model.device.type == "cpu"  # the lm_head's stand-in


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("kernel", ["kernel", "dequantize_bfloat16", "dequantize"])
def test_every_int4_kernel_is_exact_to_the_format(checkpoint, group_size, kernel):
    """Each kernel of an int4 model (forced, prefill rows included) gives the logits of a float32 model
    holding its int4 weights dequantized, within 2e-2: what is left of int4's error is the format's
    rounding, not a kernel's."""
    model = Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint, quantize="int4", group_size=group_size
    )
    layers = quantized_layers(model)
    if kernel == "kernel" and next(iter(layers.values())).packing is None:
        pytest.skip("no int4 kernel on this CPU")
    if kernel == "dequantize_bfloat16" and not kernels.native_bfloat16():
        pytest.skip("no bfloat16 instructions here: float32 inputs are not rounded to bfloat16")
    twin = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    with torch.no_grad():
        for name, layer in layers.items():
            twin.get_submodule(name).weight.copy_(layer.dequantized_weight(torch.float32))
    inputs = batch()
    with kernels.force(int4=kernel):
        got = logits(model, inputs)
    assert rel_diff(got, logits(twin, inputs)) <= 2e-2
    assert rel_diff(got, logits(Idefics2ForConditionalGeneration.from_pretrained(checkpoint), inputs)) > 1e-3


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_quantized_checkpoint_reloads_without_float_weights(checkpoint, tmp_path, mode):
    inputs = batch()
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize=mode, group_size=32)
    before = logits(model, inputs)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    [group] = config["config_groups"].values()
    assert group["weights"]["num_bits"] == {"int8": 8, "int4": 4}[mode]
    from idefics2.loading import read_safetensors

    stored = read_safetensors(tmp_path / "model.safetensors")
    prefix = "model.text_model.layers.0.self_attn.q_proj"
    assert f"{prefix}.weight" not in stored
    packed, scale = stored[f"{prefix}.weight_packed"], stored[f"{prefix}.weight_scale"]
    assert packed.dtype == torch.int32 and packed.shape == ((64, 16) if mode == "int8" else (64, 8))
    assert scale.shape == ((64, 1) if mode == "int8" else (64, 2))
    assert stored[f"{prefix}.weight_shape"].tolist() == [64, 64]
    reloaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, inputs), before)
    again = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantize=mode)  # asking again is fine
    assert torch.equal(logits(again, inputs), before)
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(ValueError, match=f"cannot be loaded as {other}"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantize=other)


@pytest.mark.parametrize("bits", [8, 4])
def test_checkpoints_in_the_older_idefics2_format_still_load(checkpoint, tmp_path, bits):
    """Folders saved before compressed-tensors (quant_method "idefics2", int4 with zero points) load with
    the weights they stand for; saved again, int8 stays quantized and int4 with zero points becomes float
    weights (with a warning), both giving the same logits."""
    dequantized = write_legacy_quantized_checkpoint(checkpoint, tmp_path / "legacy", bits)
    model = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "legacy")
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(name.removesuffix(".weight") for name in dequantized)
    for name, layer in layers.items():
        assert rel_diff(layer.dequantized_weight(torch.float32), dequantized[f"{name}.weight"]) <= 1e-6
    assert all((layer.zeros is not None) == (bits == 4) for layer in layers.values())
    inputs = batch()
    float32_route = {"int8": "dequantize", "int4": "dequantize"}
    with kernels.force(**float32_route):
        before = logits(model, inputs)
    if bits == 4:
        with pytest.warns(UserWarning, match="saved as float weights"):
            model.save_pretrained(tmp_path / "saved")
    else:
        model.save_pretrained(tmp_path / "saved")
    reloaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert bool(quantized_layers(reloaded)) == (bits == 8)
    assert ("quantization_config" in json.loads((tmp_path / "saved" / "config.json").read_text())) == (
        bits == 8
    )
    with kernels.force(**float32_route):
        assert rel_diff(logits(reloaded, inputs), before) <= 1e-5


def test_quantize_in_place_equals_quantizing_while_loading(checkpoint):
    inputs = batch()
    loaded = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize="int8")
    in_place = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).quantize("int8")
    assert torch.equal(logits(loaded, inputs), logits(in_place, inputs))
    with pytest.raises(ValueError, match="already quantized"):
        in_place.quantize("int4")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"quantize": "int3"}, "quantize must be one of"),
        ({"quantize": "int4", "group_size": 100}, "group_size must be one of"),
        ({"quantize": "int8", "quantize_modules": ("decoder", "eyes")}, "modules must be among"),
    ],
)
def test_bad_quantization_arguments_are_value_errors(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint, **kwargs)


def test_tied_lm_head_stays_float(tmp_path):
    folder = build_reference_checkpoint(tmp_path, tie_word_embeddings=True)
    model = Idefics2ForConditionalGeneration.from_pretrained(folder, quantize="int8")
    assert (
        isinstance(model.lm_head, nn.Linear)
        and model.lm_head.weight is model.model.text_model.embed_tokens.weight
    )


def with_outlier_channels(checkpoint) -> Idefics2ForConditionalGeneration:
    """The float test model with a few input channels of every decoder norm 8x larger, as trained language
    models have (random weights alone give every channel the same size, and nothing to calibrate)."""
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("model.text_model.") and name.endswith("norm"):
                module.weight[torch.arange(3, module.weight.numel(), 17)] *= 8.0
    return model


def calibration_batches() -> list[dict]:
    samples = [
        [{"text": [40, 30], "images": [(56, 56)]}, {"text": [50, 25], "images": []}],
        [{"text": [30, 45], "images": [(42, 70)]}, {"text": [38, 40], "images": []}],
    ]
    return [build_batch(sample, n_latents=4, seed=1 + i) for i, sample in enumerate(samples)]


def test_calibration_folds_scales_without_changing_the_float_model(checkpoint):
    """The activation-aware scales alone (no quantization) leave the float model's logits as they were, and
    do change its weights (the norms' and the projections')."""
    from idefics2.quantization.calibration import calibrate
    from idefics2.quantization.convert import target_layers

    model, inputs = with_outlier_channels(checkpoint), batch()
    before = logits(model, inputs)
    norm = model.model.text_model.layers[0].input_layernorm.weight.clone()
    calibrate(model, target_layers(model, ("decoder",), False), 4, 32, calibration_batches())
    assert rel_diff(logits(model, inputs), before) <= 1e-5
    assert not torch.allclose(model.model.text_model.layers[0].input_layernorm.weight, norm)


def test_calibrated_int4_is_closer_to_float32_and_saves_and_reloads(tmp_path):
    """On the built-in (trained) model, int4 g128 calibrated on four shapes questions has a logits error
    against float32 on four others (mean over the prompts of max |diff| / max |logit|) at least 5% below plain
    int4's; the calibrated model saves in the usual format and reloads to the same logits."""
    from idefics2 import Idefics2Processor
    from idefics2.assets import builtin_model_dir
    from idefics2.shapes import make_dataset

    folder = builtin_model_dir()
    processor = Idefics2Processor.from_pretrained(folder)

    def inputs(example) -> dict:
        prompt = processor.apply_chat_template(example.messages(), add_generation_prompt=True)
        return dict(processor(text=prompt, images=[example.images()], return_tensors="pt"))

    calibration = [inputs(example) for example in make_dataset(1, seed=1)[:4]]
    prompts = [inputs(example) for example in make_dataset(1, seed=7)[:4]]
    reference = Idefics2ForConditionalGeneration.from_pretrained(folder)
    plain = Idefics2ForConditionalGeneration.from_pretrained(folder, quantize="int4")
    calibrated = Idefics2ForConditionalGeneration.from_pretrained(folder).quantize(
        "int4", calibration=calibration
    )

    def mean_error(model) -> float:
        return sum(rel_diff(logits(model, p), logits(reference, p)) for p in prompts) / len(prompts)

    plain_error, calibrated_error = mean_error(plain), mean_error(calibrated)
    assert calibrated_error < 0.95 * plain_error, (calibrated_error, plain_error)
    calibrated.save_pretrained(tmp_path)
    reloaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, prompts[0]), logits(calibrated, prompts[0]))


def test_calibration_needs_batches_and_the_decoder(checkpoint):
    with pytest.raises(ValueError, match="no batches"):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint).quantize("int4", calibration=[])
    with pytest.raises(ValueError, match="quantize the decoder to calibrate"):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint).quantize(
            "int4", modules=("connector",), calibration=calibration_batches()
        )


def test_generation_runs_quantized(checkpoint):
    inputs = batch()
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize="int8")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    prompt = inputs["input_ids"].shape[1]
    assert out.shape == (2, prompt + 6)
    # each decode step of the quantized model picks the token its own full forward over the same tokens
    # (images included) ranks first, by a margin larger than the two routes' rounding
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 6, dtype=inputs["attention_mask"].dtype)], 1)
    with torch.no_grad():
        full = model(input_ids=out[:, :-1], attention_mask=mask[:, :-1], pixel_values=inputs["pixel_values"],
                     pixel_attention_mask=inputs["pixel_attention_mask"]).logits[:, prompt - 1 :]  # fmt: skip
    assert torch.equal(full.argmax(-1), out[:, prompt:])
    top2 = full.topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-4


def test_mid_config_int8_logits_within_3e_2_of_float32():
    """The benchmark's "mid" config (246M parameters, random weights): prefill (the dequantize route) and a
    decode step (the kernel route) within 3e-2 (max |diff| / max |logit|) of float32."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_generation import MID_CONFIG

    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(MID_CONFIG))).eval()
    ids = torch.randint(3, 32000, (1, 24))

    def prefill_and_step():
        with torch.no_grad():
            full = model(ids).logits
            cache = model.new_kv_cache(1, 24)
            model(ids[:, :23], kv_cache=cache, cache_position=torch.arange(23))
            mask = torch.ones(1, 24, dtype=torch.long)
            step = model(ids[:, 23:], mask, kv_cache=cache, cache_position=torch.tensor([23])).logits
        return full, step

    references = prefill_and_step()
    model.quantize("int8")
    for got, want in zip(prefill_and_step(), references, strict=True):
        diff = ((got - want).abs().max() / want.abs().max()).item()
        assert diff <= 3e-2, diff


# ---- AutoAWQ checkpoints ----------------------------------------------------------------------------------


def awq_oracle():
    """AutoAWQ's own unpacking (awq/utils/packing_utils.py, read without importing the awq package, whose
    __init__ needs a GPU stack and other transformers versions)."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("autoawq is not installed (pip install --no-deps autoawq==0.2.9)")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "packing_utils.py"
    module_spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """uint [R, C] in 0..15 -> int32 [R, C/8], written from the format's description: nibble i (bits 4i..4i+3)
    of each int32 holds column AWQ_ORDER[i] of its group of 8."""
    r, c = values.shape
    v = values.to(torch.int64).reshape(r, c // 8, 8)
    packed = torch.zeros(r, c // 8, dtype=torch.int64)
    for i, column in enumerate(AWQ_ORDER):
        packed |= v[..., column] << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def awq_layer(n: int, k: int, group: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.randint(0, 16, (k // group, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.004 + 0.001).half()
    return {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": scales}


def test_awq_unpacking_matches_autoawq():
    oracle = awq_oracle()
    layer = awq_layer(48, 128, 32, seed=0)
    expected_weight = oracle.dequantize_gemm(
        layer["qweight"], layer["qzeros"], layer["scales"], 4, 32
    )  # [K, N]
    qweight, scales, zeros = awq_to_int4(layer["qweight"], layer["qzeros"], layer["scales"])
    ours = dequantize_int4(qweight, scales, zeros, torch.float32)
    assert rel_diff(ours.double(), expected_weight.t().double()) <= 2e-3  # AutoAWQ dequantizes in float16


@pytest.fixture(scope="module")
def awq_checkpoint(checkpoint, tmp_path_factory):
    """The float checkpoint rewritten as AutoAWQ would save it: decoder projections as GEMM int4 (group 32),
    everything else float16, and the float twin those int4 weights stand for (AutoAWQ's dequantization)."""
    oracle = awq_oracle()
    from idefics2.loading import read_safetensors

    folder = tmp_path_factory.mktemp("awq_checkpoint")
    twin_folder = tmp_path_factory.mktemp("awq_twin")
    tensors = {k: v.clone() for k, v in read_safetensors(checkpoint / "model.safetensors").items()}
    awq, twin = {}, {}
    for i, (name, tensor) in enumerate(sorted(tensors.items())):
        if name.startswith("model.text_model.layers.") and name.endswith("_proj.weight"):
            n, k = tensor.shape
            layer = awq_layer(n, k, 32, seed=i)
            prefix = name.removesuffix(".weight")
            awq.update({f"{prefix}.{key}": value for key, value in layer.items()})
            dense = oracle.dequantize_gemm(layer["qweight"], layer["qzeros"], layer["scales"], 4, 32)
            twin[name] = dense.t().float().contiguous()
        else:
            awq[name] = tensor.half()
            twin[name] = tensor.half().float()
    write_safetensors(folder / "model.safetensors", awq)
    write_safetensors(twin_folder / "model.safetensors", twin)
    config = json.loads((checkpoint / "config.json").read_text())
    for target in (folder, twin_folder):
        (target / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "version": "gemm",
        "zero_point": True,
        "modules_to_not_convert": ["vision_model", "connector", "lm_head"],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, twin_folder


@pytest.mark.parametrize("route", ["kernel", "dequantize"])
def test_awq_checkpoint_runs_on_the_int4_path(awq_checkpoint, route):
    folder, twin_folder = awq_checkpoint
    model = Idefics2ForConditionalGeneration.from_pretrained(folder)
    twin = Idefics2ForConditionalGeneration.from_pretrained(twin_folder)
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7 and all(
        layer.bits == 4 and layer.group_size == 32 for layer in layers.values()
    )
    assert isinstance(model.lm_head, nn.Linear)
    inputs = batch()
    if route == "kernel":
        if next(iter(layers.values())).packing is None:
            pytest.skip("no int4 kernel on this CPU (the dequantize route is tested)")
        steps = {"input_ids": inputs["input_ids"][:, :1]}  # one row per sample: the kernel route
        tolerance = 3e-2
    else:
        steps, tolerance = inputs, 2e-3
    with kernels.force(
        **({} if route == "kernel" else {"int4_weight_kernel": False, "native_bfloat16": False})
    ):
        got = logits(model, steps)
    assert rel_diff(got.double(), logits(twin, steps).double()) <= tolerance


def test_a_model_loaded_from_awq_saves_float_weights(awq_checkpoint, tmp_path):
    folder, twin_folder = awq_checkpoint
    model = Idefics2ForConditionalGeneration.from_pretrained(folder)
    with pytest.warns(UserWarning, match="14 int4 layers with zero points"):
        model.save_pretrained(tmp_path)
    saved = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert not quantized_layers(saved) and "quantization_config" not in saved.config.extra
    twin = Idefics2ForConditionalGeneration.from_pretrained(twin_folder)
    inputs = batch()
    assert rel_diff(logits(saved, inputs).double(), logits(twin, inputs).double()) <= 2e-3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"symmetric": False}, "symmetric"),
        ({"num_bits": 2}, "int8 weights per output"),
        ({"num_bits": 8, "strategy": "group"}, "'strategy': 'group'"),
        ({"type": "float"}, "'type': 'float'"),
    ],
)
def test_unsupported_compressed_tensors_schemes_are_refused(checkpoint, tmp_path, change, message):
    Idefics2ForConditionalGeneration.from_pretrained(checkpoint, quantize="int4").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)


def test_unsupported_awq_variants_are_refused(awq_checkpoint, tmp_path):
    folder, _ = awq_checkpoint
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(folder / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="only AutoAWQ GEMM"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)


# ---- other CPUs -------------------------------------------------------------------------------------------

ON_AVX2_ONLY = """
import torch
from idefics2.modeling import kernels
from idefics2.quantization import QuantizedLinear
torch.manual_seed(0)
w, x = torch.randn(96, 128) * 0.02, torch.randn(2, 128)
layers = {bits: QuantizedLinear.from_float(w, None, bits, 64) for bits in (8, 4)}
with torch.no_grad():
    diffs = [(l(x).double() - x.double() @ l.dequantized_weight(torch.float64).t()).abs().max().item()
             for l in layers.values()]
print(kernels.int8_weight_kernel("cpu"), kernels.int4_weight_layout("cpu"), layers[4].packing,
      max(diffs) < 1e-2 * (x @ w.t()).abs().max().item())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets only")
def test_int4_kernel_layout_on_a_cpu_limited_to_avx2():
    """AVX2 only (as on AMD Zen3): the int4 kernel packs rows in blocks of 32, found by the probe."""
    run = subprocess.run(
        [sys.executable, "-c", ON_AVX2_ONLY],
        env={**os.environ, **kernels.AVX2_ONLY_ENV},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["True", "cpu32", "cpu32", "True"]


def test_loading_and_quantization_import_one_way():
    """idefics2.loading and idefics2.quantization build on the model's leaf modules, never on the model
    (which imports them): importing them first works and leaves the model unimported."""
    code = (
        "import sys, idefics2.quantization, idefics2.loading; print('idefics2.modeling.model' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"


def test_merging_an_adapter_happens_before_quantizing(checkpoint, tmp_path):
    from idefics2.training import LoraConfig, add_lora, save_adapter

    donor = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    config = LoraConfig(r=2, target_modules=["q_proj", "down_proj"])
    add_lora(donor, config)
    with torch.no_grad():
        for name, param in donor.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    save_adapter(donor, config, tmp_path)
    inputs = batch()
    merged_float = Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint, adapter=tmp_path, merge_adapter=True
    )
    merged = Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint, adapter=tmp_path, merge_adapter=True, quantize="int8"
    )
    assert not [n for n in merged.state_dict() if "lora_" in n] and quantized_layers(merged)
    assert rel_diff(logits(merged, inputs).double(), logits(merged_float, inputs).double()) <= 2e-2
    unmerged = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, adapter=tmp_path, quantize="int8")
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into quantized weights"):
        from idefics2.training import merge_lora

        merge_lora(unmerged)


def test_bfloat16_autocast_training_step_through_a_quantized_layer():
    layer = quantized(4)
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert rel_diff(x.grad.double(), layer.dequantized_weight(torch.float64).sum(0).expand(4, -1)) <= 2e-2


def test_calibrate_flag_quantizes_with_scales_or_is_one_line(tmp_path, capsys):
    """`--calibrate N` with `--quantize` calibrates on N shapes questions; without `--quantize` it is one
    line on stderr and exit code 2."""
    from idefics2.cli import main
    from idefics2.shapes import make_dataset

    image = tmp_path / "shape.png"
    make_dataset(1, seed=3)[0].images()[0].save(image)
    common = ["generate", "--prompt", "How many shapes?", "--image", str(image), "--max-new-tokens", "3"]
    assert main([*common, "--calibrate", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calibrate N needs --quantize" in err[0], err
    assert main([*common, "--calibrate", "1", "--quantize", "int4"]) == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_the_dequantizing_route_runs_inside_and_outside_inference_mode(bits):
    """The buffer the dequantized product reuses is an ordinary tensor: made inside inference mode (a
    generation) it is still written by a later call under no_grad (an evaluation) on the same thread."""
    layer_module._workspaces.__dict__.pop("buffers", None)
    linear = QuantizedLinear.from_float(torch.randn(64, 128) * 0.02, None, bits, 32)
    x = torch.randn(40, 128)
    want = x @ linear.dequantized_weight(torch.float32).T
    with torch.inference_mode():
        first = linear.dequantized_product(x)
    with torch.no_grad():
        second = linear.dequantized_product(x)
    assert torch.allclose(first, want, atol=1e-5) and torch.allclose(second, want, atol=1e-5)
