"""Float32 products as three bfloat16 products (idefics2.modeling.bf16x3): the split is exact to its
definition, the product is within ~1e-5 of float64 (a single bfloat16 product is not), and `linear` offers
the kernel only while torch's float32 matmul precision allows it, where a LoRA layer's training pass then
runs it, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from idefics2.lora import LoraConfig, add_lora, mark_only_lora_trainable
from idefics2.modeling import bf16x3, ckernels, kernels
from idefics2.modeling.attention import Linear, _linear_shape, linear, linear_kernels
from oracle_model import rel_diff

pytestmark = pytest.mark.skipif(
    not bf16x3.available(), reason="this torch has no MKL bfloat16 product or no C compiler is at hand"
)


@pytest.fixture
def high_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    kernels.forget_choices()
    yield
    torch.set_float32_matmul_precision(before)
    kernels.forget_choices()


def test_split_is_two_roundings_to_bfloat16():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(5000) * 10.0 ** torch.randint(-30, 30, (5000,)), torch.tensor([0.0, -0.0])])
    hi, lo = bf16x3.split(x)
    expected_hi = x.bfloat16()
    assert torch.equal(hi.view(torch.int16), expected_hi.view(torch.int16))
    assert torch.equal(lo.view(torch.int16), (x - expected_hi.float()).bfloat16().view(torch.int16))
    rest = (x.double() - hi.double() - lo.double()).abs()
    assert (rest <= x.double().abs() * 2.0**-16).all()


def test_split_keeps_infinities_and_nan_in_the_high_half():
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.5])
    hi, lo = bf16x3.split(x)
    assert hi[0] == float("inf") and hi[1] == float("-inf") and hi[2].isnan() and hi[3] == 1.5
    assert torch.equal(lo, torch.zeros(4, dtype=torch.bfloat16))


@pytest.mark.parametrize("layout", ["plain", "transposed"])
@pytest.mark.parametrize("bias", [False, True])
def test_product_is_within_1e_5_of_float64(layout, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 37, 96)
    w = torch.randn(80, 96) * 0.05 if layout == "plain" else (torch.randn(96, 80) * 0.05).t()
    b = torch.randn(80) if bias else None
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    got = bf16x3.linear(x, w, b)
    assert got.shape == (3, 37, 80) and got.dtype == torch.float32
    assert rel_diff(got.double(), expected) <= 2e-5
    single = torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).double()  # one bfloat16 product
    assert rel_diff(single + (0 if b is None else b.double()), expected) > 1e-3


def test_empty_products_and_wrong_dtypes():
    assert bf16x3.linear(torch.randn(0, 8), torch.randn(4, 8)).shape == (0, 4)
    assert torch.equal(bf16x3.linear(torch.randn(3, 0), torch.randn(4, 0), torch.ones(4)), torch.ones(3, 4))
    with pytest.raises(ValueError, match="float32"):
        bf16x3.linear(torch.randn(3, 8).bfloat16(), torch.randn(4, 8).bfloat16())


def test_offered_only_below_the_highest_precision_and_past_decode_rows(high_precision):
    """...and chosen under keys of its own there, while decode rows keep theirs (nothing to measure again)."""
    w = torch.randn(16, 8)
    with kernels.force(native_bfloat16=True):
        assert "bf16x3" in linear_kernels(torch.float32, None, rows=ckernels.MAX_ROWS + 1)
        assert "bf16x3" not in linear_kernels(torch.float32, None, rows=ckernels.MAX_ROWS)
        assert "bf16x3" not in linear_kernels(torch.bfloat16, None, rows=1000)
        high = [_linear_shape(torch.float32, w, None, None, rows) for rows in (1, 1000)]
        torch.set_float32_matmul_precision("highest")
        assert "bf16x3" not in linear_kernels(torch.float32, None, rows=1000)
        highest = [_linear_shape(torch.float32, w, None, None, rows) for rows in (1, 1000)]
    assert high[0] == highest[0] and high[1] != highest[1]
    torch.set_float32_matmul_precision("high")
    with kernels.force(native_bfloat16=False):  # no bfloat16 units: never worth measuring
        assert "bf16x3" not in linear_kernels(torch.float32, None, rows=1000)


def test_a_lora_layer_trains_through_it(high_precision):
    """Forced, the fused LoRA layer's forward and its input's gradient run the three bfloat16 products: the
    same numbers as float64 to ~1e-5, where the plain float32 route is ~1e-6."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = Linear(128, 192)
    add_lora(holder, LoraConfig(r=4, lora_dropout=0.0, target_modules=["proj"]))
    mark_only_lora_trainable(holder)
    layer = holder.proj
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 40, 128, requires_grad=True)  # 80 rows: past the decode rows
    grad = torch.randn(2, 40, 192)
    plain = x.double() @ layer.weight.double().t() + layer.bias.double()
    a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    plain = plain + layer.lora_scaling * (x.double() @ a.t()) @ b.t()
    expected_grad = torch.autograd.grad(plain, x, grad.double())[0]
    calls = []
    real = bf16x3.linear
    with kernels.force(native_bfloat16=True, linear="bf16x3"):
        bf16x3.linear = lambda *args: calls.append(args[1].shape) or real(*args)
        try:
            out = layer(x)
            got_grad = torch.autograd.grad(out, x, grad)[0]
        finally:
            bf16x3.linear = real
    assert (192, 128) in calls and (128, 192) in calls  # x @ W.T forward, grad @ W backward
    assert rel_diff(out.double(), plain) <= 2e-5
    assert rel_diff(got_grad.double(), expected_grad) <= 2e-5


def test_linear_races_it_and_agrees(high_precision):
    """Under "high" the race measures it beside the float32 kernels (where this CPU has bfloat16 units) and
    whichever wins gives the float32 product to ~1e-5."""
    torch.manual_seed(0)
    x, w = torch.randn(600, 64), torch.randn(48, 64)
    with torch.no_grad():
        got = linear(x, w)
    assert rel_diff(got.double(), x.double() @ w.double().t()) <= 2e-5
    timed = [times for (op, shape, *_), (_, times) in kernels.choices().items() if shape[1:3] == (48, 64)]
    if kernels.native_bfloat16() and kernels.tuning_enabled():
        assert timed and "bf16x3" in timed[0]
