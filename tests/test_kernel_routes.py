"""Kernel routes chosen by capability (idefics2.modeling.kernels): each route, native and fallback, gives the
right numbers on any machine, and a CPU without bfloat16 instructions runs bfloat16 models."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from idefics2.modeling import kernels
from idefics2.modeling.attention import attention, linear
from idefics2.modeling.kernels import fastest_dtype
from oracle_model import rel_diff

ACTIVATIONS = {
    None: lambda x: x,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # never fused: applied after the kernel
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def test_probe_agrees_with_calling_the_kernel_and_never_raises():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w = torch.randn(3, 32, dtype=dtype), torch.randn(16, 32, dtype=dtype)
        try:
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            works = True
        except RuntimeError:
            works = False
        assert kernels.onednn_linear(dtype) == works, dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("route", ["native", "fallback"])
def test_linear_routes_match_float64(dtype, act, route):
    if route == "native" and not kernels.onednn_linear(dtype):
        pytest.skip(f"this CPU has no oneDNN {dtype} linear kernel (the fallback route is tested)")
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 48), torch.randn(40, 48) / 7, torch.randn(40)
    expected = ACTIVATIONS[act](F.linear(x.double(), w.double(), b.double()))
    off = {} if route == "native" else {"onednn_linear": False}
    with torch.no_grad(), kernels.force(**off):
        args = (x.to(dtype), w.to(dtype), b.to(dtype))
        got = linear(*args, act=act)
        names = ops_called(lambda: linear(*args, act=act))
    assert got.dtype == dtype
    assert rel_diff(got.double(), expected) <= TOLERANCE[dtype]
    assert ("mkldnn::_linear_pointwise" in names) == (route == "native"), names


def test_fused_activation_can_be_turned_off_alone():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with torch.no_grad(), kernels.force(onednn_fused_activation=False):
        got = linear(x, w, act="silu")
    assert torch.allclose(got, F.silu(F.linear(x, w)), atol=1e-6)
    if kernels.onednn_linear(torch.float32):  # the product still runs on oneDNN, the activation after it
        with torch.no_grad(), kernels.force(onednn_fused_activation=False):
            assert "mkldnn::_linear_pointwise" in ops_called(lambda: linear(x, w, act="silu"))


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_attention_routes(native):
    """With bfloat16 instructions: per-head full attention and grouped decode attention; without: sdpa,
    exactly. Both close to float32."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 30, 16) for _ in range(3))
    qd, kd, vd, mask = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16), None
    mask = torch.rand(2, 1, 1, 40) > 0.2
    low = [t.bfloat16() for t in (q, k, v)]
    low_decode = [t.bfloat16() for t in (qd, kd, vd)]
    with torch.no_grad(), kernels.force(native_bfloat16=native):
        full = attention(*low, None, scale=0.25)
        decode = attention(*low_decode, mask, scale=0.25)
    sdpa_full = F.scaled_dot_product_attention(*low, scale=0.25).transpose(1, 2).reshape(2, 30, 64)
    sdpa_decode = F.scaled_dot_product_attention(*low_decode, attn_mask=mask, scale=0.25, enable_gqa=True)
    sdpa_decode = sdpa_decode.transpose(1, 2).reshape(2, 1, 128)
    assert torch.equal(full, sdpa_full) != native
    assert torch.equal(decode, sdpa_decode) != native
    exact = F.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2).reshape(2, 30, 64)
    assert rel_diff(full.float(), exact) <= 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["grouped", "sdpa"])
def test_decode_attention_kernels_match_float64(dtype, kernel):
    """Each decode attention kernel, forced, runs and gives the float64 softmax(q k^T) v over the keys the
    mask allows (one and three queries, grouped kv heads)."""
    torch.manual_seed(0)
    for queries in (1, 3):
        q, k, v = torch.randn(2, 8, queries, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
        mask = torch.rand(2, 1, queries, 40) > 0.2
        scores = q.double() @ k.double().repeat_interleave(4, dim=1).transpose(-1, -2) * 0.25
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        expected = (probs @ v.double().repeat_interleave(4, dim=1)).transpose(1, 2).reshape(2, queries, 128)
        args = (q.to(dtype), k.to(dtype), v.to(dtype), mask)
        with torch.no_grad(), kernels.force(attention=kernel):
            got = attention(*args, scale=0.25)
            names = ops_called(lambda args=args: attention(*args, scale=0.25))
        assert ("aten::scaled_dot_product_attention" in names) == (kernel == "sdpa")
        assert rel_diff(got.double(), expected) <= TOLERANCE[dtype] * 10


def test_fastest_dtype_follows_the_bfloat16_instructions():
    with kernels.force(native_bfloat16=True):
        assert fastest_dtype("cpu") == torch.bfloat16
    with kernels.force(native_bfloat16=False):
        assert fastest_dtype("cpu") == torch.float32


def test_force_rejects_unknown_routes_and_restores():
    with pytest.raises(ValueError, match="unknown kernel route"):
        with kernels.force(avx9000=True):
            pass
    before = kernels.native_bfloat16()
    with kernels.force(native_bfloat16=not before):
        assert kernels.native_bfloat16() == (not before)
    assert kernels.native_bfloat16() == before


ON_AVX2_ONLY = """
import torch
from idefics2 import pipeline
from idefics2.modeling import kernels
print(kernels.native_bfloat16(), kernels.onednn_linear(torch.bfloat16), kernels.fastest_dtype("cpu"))
chat = pipeline(dtype=torch.bfloat16)
print(chat.chat("What color is the circle?", images=["examples/shapes.png"], max_new_tokens=4))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets only")
def test_bfloat16_runs_on_a_cpu_limited_to_avx2():
    """oneDNN and ATen limited to AVX2 (as on AMD Zen3): no bfloat16 instructions, so every bfloat16 route
    falls back, and the built-in model still answers in bfloat16."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", ON_AVX2_ONLY],
        env={**os.environ, **kernels.AVX2_ONLY_ENV},
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    routes, answer = run.stdout.splitlines()[:2]
    assert routes == "False False torch.float32"
    assert answer == "green"


def test_cli_dtype_auto_is_the_fastest_and_checkpoint_keeps_the_checkpoints():
    from idefics2.settings import weights_dtype

    with kernels.force(native_bfloat16=True):
        assert weights_dtype("auto", "cpu") == torch.bfloat16
    with kernels.force(native_bfloat16=False):
        assert weights_dtype("auto", "cpu") == torch.float32
    assert weights_dtype("checkpoint", "cpu") == "auto"  # from_pretrained's name for the checkpoint's dtype
    assert weights_dtype("float16", "cpu") == torch.float16
