"""Kernel routes chosen by measured speed (idefics2.modeling.kernels.choose): the fastest kernel that passes
its probe and agrees with the portable one is kept, remembered in a file keyed by the machine, and forced
routes win over measurements. Timings come from a fake timer, so the choices are deterministic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from idefics2.modeling import attention, kernels
from idefics2.modeling.attention import linear
from idefics2.modeling.cpu import cpu_description
from idefics2.quantization import QuantizedLinear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


class FakeClock:
    """Seconds per call of each kernel, by name: a sample is for the first kernel the timed call runs (the
    `run` functions of kernels.fastest run one named kernel, which may run a product of its own)."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds, self.samples, self.last = seconds, [], None

    def __call__(self, call) -> float:
        self.last = None
        call()
        self.samples.append(self.last)
        return self.seconds[self.last]


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Measuring on, into a file under tmp_path; yields a function installing a fake clock."""
    monkeypatch.setenv("IDEFICS2_KERNEL_TUNING", "1")
    monkeypatch.setenv("IDEFICS2_KERNELS_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv("IDEFICS2_KERNELS", raising=False)
    # torch's kernels only: the fake clocks below name them (tests/test_ckernels.py races our C kernels)
    monkeypatch.setattr(kernels, "c_kernels", lambda: False)
    kernels.forget_choices()

    def install(seconds: dict[str, float]) -> FakeClock:
        clock = FakeClock(seconds)
        linear_with, product_with = attention.linear_with, QuantizedLinear.product_with
        attention_with = attention.attention_with

        def named_linear(kernel, *args):
            clock.last = clock.last or kernel
            return linear_with(kernel, *args)

        def named_product(self, kernel, *args, **kw):
            clock.last = clock.last or kernel
            return product_with(self, kernel, *args, **kw)

        def named_attention(kernel, *args):
            clock.last = clock.last or kernel
            return attention_with(kernel, *args)

        monkeypatch.setattr(attention, "linear_with", named_linear)
        monkeypatch.setattr(attention, "attention_with", named_attention)
        monkeypatch.setattr(QuantizedLinear, "product_with", named_product)
        monkeypatch.setattr(kernels, "measure", clock)
        return clock

    yield install
    kernels.forget_choices()


def test_fastest_keeps_only_kernels_that_run_and_agree():
    outputs = {"good": torch.ones(3), "wrong": torch.full((3,), 2.0), "reference": torch.ones(3)}

    def run(name):
        if name == "crashes":
            raise RuntimeError("could not create a primitive descriptor")
        return outputs[name]

    clock = {"good": 1.0, "wrong": 0.1, "reference": 3.0}
    times = kernels.fastest(
        ["wrong", "crashes", "good", "reference"], run, lambda call: clock[call_name(call)], "reference"
    )
    assert times == {"good": 1.0, "reference": 3.0}


def test_fastest_stops_timing_a_kernel_that_cannot_win():
    # on idefics2-8b's shapes a dequantized int4 product at one row takes ~80x the int4 kernel's time: its
    # later samples would cost seconds of the measuring budget and could not change the choice
    clock = {"fast": 1.0, "close": 2.9, "hopeless": 3.1}
    samples = []

    def timer(call):
        samples.append(call_name(call))
        return clock[call_name(call)]

    times = kernels.fastest(list(clock), lambda name: torch.ones(3), timer, "fast")
    assert times == clock
    assert samples.count("hopeless") == 1
    assert samples.count("fast") == samples.count("close") == kernels.TIMING_ROUNDS


def test_the_reference_runs_once_for_the_agreement_checks():
    """The reference kernel's output is what the others are checked against; it is not run again to check
    it against itself (it is often the slowest: a dequantized product at one row takes 50-80x the int4
    kernels' time)."""
    runs = []

    def run(name):
        runs.append(name)
        return torch.ones(3)

    times = kernels.fastest(["fast", "reference"], run, lambda call: 1.0, "reference")
    assert times == {"fast": 1.0, "reference": 1.0}
    assert sorted(runs) == ["fast", "reference"]  # the timer above calls nothing


def call_name(call) -> str:
    return call.__defaults__[0]  # the kernel's name, bound by kernels.fastest's lambda


def test_row_classes():
    rows = (1, 2, 8, 9, 32, 33, 512, 513, 4000)
    classes = ["1", "2-8", "2-8", "9-32", "9-32", "prefill", "prefill", "long", "long"]
    assert [kernels.row_class(r) for r in rows] == classes
    # each class is timed at rows of its own class
    assert all(kernels.row_class(kernels.class_rows(name)) == name for name in classes)


def test_the_fastest_measured_kernel_runs_and_is_remembered(tuning, tmp_path):
    if not kernels.onednn_linear(torch.float32):
        pytest.skip("no oneDNN float32 linear kernel here: one kernel, nothing to choose")
    w, x = torch.randn(48, 32), torch.randn(1, 32)
    clock = tuning({"onednn": 2e-6, "aten": 1e-6})
    with torch.no_grad():
        got = linear(x, w)
        names = ops_called(lambda: linear(x, w))
    assert "mkldnn::_linear_pointwise" not in names  # aten measured faster
    assert torch.allclose(got, x @ w.t(), atol=1e-5)
    assert sorted(set(clock.samples)) == ["aten", "onednn"]
    assert len(clock.samples) == 2 * kernels.TIMING_ROUNDS
    with torch.no_grad():
        linear(torch.randn(2, 32), w)  # another class of rows: measured again
        linear(torch.randn(1, 32), w)  # the same: not
    assert len(clock.samples) == 4 * kernels.TIMING_ROUNDS

    saved = json.loads((tmp_path / "kernels.json").read_text())
    machine = kernels.machine_key()
    assert list(saved) == [machine]
    assert saved[machine]["linear|float32|48|32|False|None|1"] == {
        "kernel": "aten",
        "seconds": {"onednn": 2e-6, "aten": 1e-6},
        "candidates": ["aten", "onednn"],
    }
    # a new process: read from the file, nothing measured, even if the kernels' speeds changed
    kernels.forget_choices()
    clock = tuning({"onednn": 1e-6, "aten": 2e-6})
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in ops_called(lambda: linear(x, w))
    assert clock.samples == []
    # other thread counts are other machines: measured again, and now oneDNN wins
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with torch.no_grad():
            assert "mkldnn::_linear_pointwise" in ops_called(lambda: linear(x, w))
    finally:
        torch.set_num_threads(threads)
    assert len(clock.samples) == 2 * kernels.TIMING_ROUNDS
    assert len(json.loads((tmp_path / "kernels.json").read_text())) == 2


def test_training_products_are_raced_per_layout_and_row_class(tuning):
    """A LoRA layer's training step (forward and hand-written backward, no autograd inside) takes the
    measured kernel for its base product, its transposed weight (the backward's grad @ W) measured apart,
    and long rows (a training batch) apart from prefill rows; the gradients stay exact."""
    if not kernels.onednn_linear(torch.float32):
        pytest.skip("no oneDNN float32 linear kernel here: one kernel, nothing to choose")
    from idefics2.lora import LoraConfig, add_lora

    torch.manual_seed(0)
    model = torch.nn.Sequential(attention.Linear(32, 48, bias=False))
    add_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0"]))
    torch.nn.init.normal_(model[0].lora_B.weight)
    model[0].weight.requires_grad_(False)
    clock = tuning({"onednn": 2e-6, "aten": 1e-6})
    x = torch.randn(600, 32, requires_grad=True)
    model(x).square().sum().backward()
    made = {
        (key[1][1:3], key[1][5:], key[2]): made
        for key, made in kernels.choices().items()
        if key[0] == "linear"
    }
    for key in (
        ((48, 32), (), "long"),  # x @ W.T
        ((32, 48), ("transposed",), "long"),  # grad @ W
        ((4, 32), (), "long"),  # x @ A.T
        ((4, 48), ("transposed",), "long"),  # grad @ B
    ):
        kernel, times = made[key]
        assert kernel == "aten" and set(times) == {"aten", "onednn"}, (key, made[key])
    assert clock.samples
    expected_x = x.detach().requires_grad_(True)
    layer = model[0]
    a, b, scaling = layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.lora_scaling
    (expected_x @ layer.weight.t() + scaling * (expected_x @ a.t()) @ b.t()).square().sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-4, atol=1e-4)


def test_machine_key_names_cpu_torch_and_threads():
    key = kernels.machine_key(3)
    cpu = cpu_description()
    assert key.startswith(str(cpu["model"])) and key.endswith("| 3 threads")
    assert f"torch {torch.__version__}" in key and cpu["capability"] in key
    assert kernels.machine_key(3) != kernels.machine_key(4)


def test_forced_routes_win_and_measure_nothing(tuning, monkeypatch):
    if not kernels.onednn_linear(torch.float32):
        pytest.skip("no oneDNN float32 linear kernel here")
    w, x = torch.randn(48, 32), torch.randn(1, 32)
    clock = tuning({"onednn": 2e-6, "aten": 1e-6})
    with torch.no_grad(), kernels.force(linear="onednn"):
        assert "mkldnn::_linear_pointwise" in ops_called(lambda: linear(x, w))
    monkeypatch.setenv("IDEFICS2_KERNELS", "linear=onednn")
    kernels.forget_choices()
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in ops_called(lambda: linear(x, w))
    assert clock.samples == []
    # a forced kernel whose probe fails is not run: the next preferred one is
    with torch.no_grad(), kernels.force(onednn_linear=False):
        assert "mkldnn::_linear_pointwise" not in ops_called(lambda: linear(x, w))


@pytest.mark.parametrize("setting", ["linear=fast", "linear", "attention=aten", "native_bfloat16=True"])
def test_bad_forced_routes_are_one_clear_error(monkeypatch, setting):
    monkeypatch.setenv("IDEFICS2_KERNELS", setting)
    kernels.forget_choices()
    try:
        with pytest.raises(ValueError, match="IDEFICS2_KERNELS|unknown kernel"), torch.no_grad():
            linear(torch.randn(1, 8), torch.randn(4, 8))
    finally:
        monkeypatch.delenv("IDEFICS2_KERNELS")
        kernels.forget_choices()
    with pytest.raises(ValueError, match="unknown kernel"), kernels.force(int8="fast"):
        pass


def test_quantized_layers_take_the_measured_kernel(tuning):
    layer = QuantizedLinear.from_float(torch.randn(64, 128) * 0.02, None, 8)
    if not kernels.int8_weight_kernel("cpu"):
        pytest.skip("no int8 kernel here")
    x = torch.randn(1, 128)
    tuning({"kernel": 3e-6, "dequantize_bfloat16": 2e-6, "dequantize": 1e-6, "aten": 1e-6, "onednn": 2e-6})
    with torch.no_grad():
        got = layer(x)
        names = ops_called(lambda: layer(x))
    assert "aten::_weight_int8pack_mm" not in names  # measured slower than the dequantized product
    want = x.double() @ layer.dequantized_weight(torch.float64).t()
    assert torch.allclose(got.double(), want, atol=1e-4)


@pytest.mark.parametrize("fastest", ["grouped", "sdpa"])
def test_decode_attention_takes_the_measured_kernel(tuning, fastest):
    clock = tuning({"grouped": 1e-6 if fastest == "grouped" else 3e-6, "sdpa": 2e-6})
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 1, 16), torch.randn(1, 2, 600, 16), torch.randn(1, 2, 600, 16)
    mask = torch.rand(1, 1, 1, 600) > 0.1
    with torch.no_grad():
        got = attention.attention(q, k, v, mask, scale=0.25)
        names = ops_called(lambda: attention.attention(q, k, v, mask, scale=0.25))
    assert set(clock.samples) == {"grouped", "sdpa"}  # both timed, once, for this class of keys
    assert ("aten::scaled_dot_product_attention" in names) == (fastest == "sdpa")
    (key,) = [key for key in kernels.choices() if key[0] == "attention"]
    assert key[1] == (torch.float32, 8, 2, 16, "keys<=2048") and kernels.choices()[key][0] == fastest
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert torch.allclose(got, want.transpose(1, 2).reshape(1, 1, 128), atol=1e-5)


def test_measuring_stops_at_the_budget(tuning, monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "TUNING_BUDGET_S", 0.0)
    clock = tuning({"onednn": 2e-6, "aten": 1e-6})
    with torch.no_grad():
        linear(torch.randn(1, 32), torch.randn(48, 32))
    assert clock.samples == [] and not (tmp_path / "kernels.json").exists()


def test_a_spent_prefill_budget_leaves_decode_rows_measured(tuning, monkeypatch):
    """Decode rows' shapes and prefill rows' have a budget each: a large model's prefill, which runs (and is
    measured) first, cannot leave its decode steps on unmeasured kernels."""
    if not kernels.onednn_linear(torch.float32):
        pytest.skip("no oneDNN float32 linear kernel here: one kernel, nothing to choose")
    clock = tuning({"onednn": 2e-6, "aten": 1e-6})
    w = torch.randn(48, 32)
    kernels._spent[("prefill", "float32")] = kernels.TUNING_BUDGET_S
    with torch.no_grad():
        linear(torch.randn(300, 32), w)  # prefill rows: their budget is spent
        assert clock.samples == []
        linear(torch.randn(1, 32), w)  # a decode row: measured
    assert sorted(set(clock.samples)) == ["aten", "onednn"]
    assert kernels.measuring_seconds() > kernels.TUNING_BUDGET_S


def test_a_spent_float32_budget_leaves_a_quantized_copy_measured(tuning):
    """Each kind of weights has its own budgets: a float model measured first (e.g. in a benchmark that also
    runs its quantized copies) cannot leave the int8 model's decode steps on unmeasured kernels."""
    layer = QuantizedLinear.from_float(torch.randn(64, 128) * 0.02, None, 8)
    if not kernels.int8_weight_kernel("cpu"):
        pytest.skip("no int8 kernel here: one kernel, nothing to choose")
    clock = tuning({"kernel": 3e-6, "dequantize_bfloat16": 2e-6, "dequantize": 1e-6})
    kernels._spent[("decode", "float32")] = kernels.TUNING_BUDGET_S
    with torch.no_grad():
        layer(torch.randn(1, 128))
    assert "dequantize" in clock.samples  # measured, though float32's decode budget is spent
    kernels._spent[("decode", "int8")] = kernels.TUNING_BUDGET_S
    before = len(clock.samples)
    with torch.no_grad():
        layer(torch.randn(2, 128))  # another class of decode rows: int8's budget is spent now
    assert len(clock.samples) == before


def test_the_budget_counts_each_kind_of_weights_apart():
    f32, bf16 = torch.float32, torch.bfloat16
    assert kernels._weights_of("linear", (bf16, 64, 32, False, None)) == "bfloat16"
    assert kernels._weights_of("int8", (f32, 64, 32, None)) == "int8"
    assert kernels._weights_of("int4", (bf16, 64, 32, 128)) == "int4"
    assert kernels._weights_of("gated", (f32, torch.uint8, 64, 32, "silu")) == "int4"
    assert kernels._weights_of("gated", (f32, torch.int8, 64, 32, "silu")) == "int8"
    assert kernels._weights_of("decoder_step", (f32, 1024, 2560, 16, 8, "int4g128")) == "int4"
    assert kernels._weights_of("decoder_step", (bf16, 1024, 2560, 16, 8, "bfloat16")) == "bfloat16"
    assert kernels._weights_of("attention", (bf16, 16, 4, 64, "keys<=512")) == "bfloat16"


def test_kernels_command_prints_features_bandwidth_and_choices(tmp_path):
    env = {
        **os.environ,
        "IDEFICS2_KERNEL_TUNING": "1",
        "IDEFICS2_KERNELS_CACHE": str(tmp_path / "kernels.json"),
        "PYTHONPATH": os.path.join(REPO, "src"),
    }
    command = [sys.executable, "-m", "idefics2.cli", "kernels", "--threads", "1", "--bandwidth-mib", "64"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("cpu: ") and lines[1].startswith("features: ")
    assert float(lines[3].split()[2]) > 0  # read bandwidth: N GB/s
    # how the C kernels came: built now (and kept), loaded from the cache, or why not
    how = ("built in ", "loaded from ", "unavailable: ")
    assert lines[4].startswith(tuple(f"C kernels: {way}" for way in how))
    rows = [line.split() for line in lines if line.startswith("linear ")]
    classes = {row[row.index("us") - 3] for row in rows}  # op, weights, rows class, kernel, time, us, ...
    assert classes == {"1", "2-8", "9-32", "prefill", "long"}  # decode classes: the decoder's layers only
    assert all(row[row.index("us") - 2] in ("onednn_fused", "onednn", "c", "aten") for row in rows)
    # a LoRA backward pass's grad @ W (the decoder's, the connector's, the head's weights), long rows only
    backward = [row for row in rows if "transposed" in row]
    assert backward and {row[row.index("us") - 3] for row in backward} == {"long"}
    attention_rows = [line.split() for line in lines if line.startswith("attention ")]
    assert {row[3] for row in attention_rows} == {"keys<=512", "keys<=2048", "keys>2048"}, attention_rows
    assert all(row[5] in ("grouped", "c", "sdpa") for row in attention_rows)
    step_rows = [line.split() for line in lines if line.startswith(("decoder_step ", "rope "))]
    # a whole decode step: the rotary-and-cache write and the one-call decoder step, for 1 and 2-8 rows
    assert {(row[0], row[row.index("us") - 3]) for row in step_rows} == {
        (op, rows) for op in ("decoder_step", "rope") for rows in ("1", "2-8")
    }, step_rows
    assert all(row[row.index("us") - 2] in ("c", "layers", "torch") for row in step_rows)
    routes = [line.partition(": ") for line in lines if line.startswith("decode step, ")]
    assert [route[0] for route in routes] == ["decode step, 1 row", "decode step, 2-8 rows"]
    assert all(route[2].startswith(("one C call from token ids", "calls from Python")) for route in routes)
    assert (tmp_path / "kernels.json").exists()


def test_a_bad_forced_route_is_one_line_on_the_command_line(monkeypatch, capsys):
    from idefics2.cli import main

    monkeypatch.setenv("IDEFICS2_KERNELS", "linear=fastest")
    kernels.forget_choices()
    try:
        assert main(["kernels", "--bandwidth-mib", "16"]) == 2
    finally:
        monkeypatch.delenv("IDEFICS2_KERNELS")
        kernels.forget_choices()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown kernel 'fastest' for linear" in err[0], err
