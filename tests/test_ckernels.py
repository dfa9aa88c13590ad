"""Our C kernels for decode steps (idefics2.modeling.ckernels): every product, the gated MLP, RMSNorm and
decode attention against float64 computations, on this CPU's instruction set and on the AVX2 and plain
x86-64 builds of the same source; a model decodes the same tokens on them as on torch's kernels; the
measured routes take them where they are fastest; and without a compiler nothing changes but the speed."""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
from idefics2.modeling import attention, ckernels, kernels
from idefics2.modeling.attention import GatedMLP, RMSNorm, grouped_matmul_attention
from idefics2.quantization import QuantizedLinear
from oracle_model import rel_diff, tiny_config_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not ckernels.available(), reason="no C compiler here: torch's kernels run")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bfloat16: the output's rounding (2^-8)
# int8 and int4 weights multiply activations rounded to 16 bits (per block of 256 columns, or per group;
# torch's kernels take them in bfloat16, 8 bits): about 5e-5 of the largest output here
INT8_TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 1e-2}


def int8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", ["float", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("shape", [(64, 96), (13, 40)])  # (N, K): whole vectors and blocks; ragged tails
def test_products_match_float64(dtype, weights, rows, shape):
    torch.manual_seed(rows)
    n, k = shape
    x, bias = torch.randn(rows, k).to(dtype), torch.randn(n).to(dtype)
    if weights == "float":
        weight, scales = torch.randn(n, k).to(dtype), None
        exact = weight.double()
    else:
        weight, scales = int8_weight(n, k)
        exact = weight.double() * scales.double()[:, None]
    for act in (None, "silu"):
        got = ckernels.linear(x, weight, scales, bias, act)
        want = F.linear(x.double(), exact, bias.double())
        want = F.silu(want) if act else want
        assert got.dtype == dtype and got.shape == (rows, n)
        tolerance = (TOLERANCE if weights == "float" else INT8_TOLERANCE)[dtype]
        assert rel_diff(got.double(), want) <= tolerance, act


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", ["float", "int8", "int4"])
def test_gated_product_matches_float64(dtype, weights):
    torch.manual_seed(0)
    for rows, n, k in ((1, 64, 96), (3, 13, 40), (8, 5, 32)):
        x = torch.randn(rows, k).to(dtype)
        if weights == "int4":
            layers = [QuantizedLinear.from_float(torch.randn(n, 256) * 0.02, None, 4, 128) for _ in range(2)]
            x = torch.randn(rows, 256).to(dtype)
            with torch.no_grad():
                for layer in layers:
                    layer.product_with("c", x)  # into the portable layout
            (gate, gate_scales), (up, up_scales) = (layer.c_operands(dtype) for layer in layers)
            exact = [layer.dequantized_weight(torch.float64) for layer in layers]
        elif weights == "float":
            (gate, up), gate_scales, up_scales = (torch.randn(n, k).to(dtype) for _ in range(2)), None, None
            exact = gate.double(), up.double()
        else:
            (gate, gate_scales), (up, up_scales) = int8_weight(n, k), int8_weight(n, k)
            exact = gate.double() * gate_scales.double()[:, None], up.double() * up_scales.double()[:, None]
        got = ckernels.gated(x, gate, up, "silu", gate_scales, up_scales)
        want = F.silu(x.double() @ exact[0].T) * (x.double() @ exact[1].T)
        tolerance = (TOLERANCE if weights == "float" else INT8_TOLERANCE)[dtype]
        assert rel_diff(got.double(), want) <= tolerance, (rows, n, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_module(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(37, eps=1e-5)
    norm.weight.data.normal_()
    norm = norm.to(dtype)
    x = (torch.randn(3, 2, 37) * 4).to(dtype)
    with torch.no_grad():
        want = norm._torch_forward(x)
    got = ckernels.rms_norm(x, norm.weight, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    # the same rounding steps: float32 to 1e-6, bfloat16 at most one unit in the last place apart
    assert rel_diff(got.double(), want.double()) <= (1e-6 if dtype == torch.float32 else 2**-7)


def test_operands_converted_for_a_call_live_until_it_returns():
    """An operand of another dtype or layout is copied for the call; the copy is held by what is passed, so
    C never reads freed memory (an address alone let the copy go before the call)."""
    bias = torch.arange(32, dtype=torch.float64)
    operand = ckernels._pointer(bias, torch.float32)
    gc.collect()
    assert list((ctypes.c_float * 32).from_address(operand._as_parameter_.value)) == list(range(32))
    x, w = torch.randn(2, 64), torch.randn(64, 32).T  # a transposed weight: a contiguous copy
    norm = torch.randn(128)[::2]  # every other value: a copy too
    assert torch.allclose(ckernels.linear(x, w, None, bias), x @ w.T + bias.float(), atol=1e-5)
    assert torch.allclose(ckernels.rms_norm(x, norm, 1e-5), RMSNorm(64)._torch_forward(x) * norm, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_float64_on_cache_views(dtype):
    torch.manual_seed(0)
    for b, heads, kv_heads, t, s, d in ((1, 16, 4, 1, 300, 64), (3, 8, 8, 2, 37, 20), (2, 4, 1, 1, 5, 16)):
        q = torch.randn(b, heads, t, d).to(dtype)
        k = torch.randn(b + 1, kv_heads, s + 7, d).to(dtype)[:b, :, :s]  # a view of a longer cache
        v = torch.randn(b, s, kv_heads, d).to(dtype).transpose(1, 2)  # keys strided, heads not contiguous
        mask = torch.rand(b, 1, t, s) > 0.3
        mask[..., 0] = True
        if b > 1:
            mask[1] = False  # a row that may attend to nothing: the uniform average, as the float path
        want = grouped_matmul_attention(q.double(), k.double(), v.double(), mask, scale=d**-0.5)
        got = ckernels.attention(q, k, v, mask, d**-0.5)
        assert got.shape == q.shape and got.dtype == dtype
        assert rel_diff(got.double(), want) <= TOLERANCE[dtype], (b, heads, kv_heads, t, s, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 2])
def test_attention_over_rows_of_different_lengths_within_their_windows(dtype, queries):
    """Masks as a decode step of a batch gives them: each row attends to its own slots up to its position
    and within a sliding window (keys are read only over that span); the slots outside hold garbage (NaN)
    that never reaches the output."""
    torch.manual_seed(0)
    b, heads, kv_heads, s, d, window = 4, 8, 2, 200, 64, 64
    ends = torch.tensor([199, 40, 120, 7])[:, None] - torch.arange(queries - 1, -1, -1)  # (b, T) positions
    slots = torch.arange(s)
    mask = (slots <= ends[..., None]) & (slots > ends[..., None] - window)  # (b, T, s)
    q = torch.randn(b, heads, queries, d).to(dtype)
    k, v = torch.randn(b, kv_heads, s, d).to(dtype), torch.randn(b, kv_heads, s, d).to(dtype)
    want = grouped_matmul_attention(q.double(), k.double(), v.double(), mask[:, None], scale=d**-0.5)
    unread = ~mask.any(dim=1)[:, None, :, None].expand(b, kv_heads, s, d)
    k, v = k.masked_fill(unread, float("nan")), v.masked_fill(unread, float("nan"))
    got = ckernels.attention(q, k, v, mask[:, None], d**-0.5)
    assert rel_diff(got.double(), want) <= TOLERANCE[dtype]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])  # the AVX2 code, and the plain C loops
def test_every_instruction_set_builds_and_agrees(march):
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from idefics2.modeling import ckernels
        torch.manual_seed(0)
        worst = 0.0
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(3, 40).to(dtype), torch.randn(13, 40).to(dtype)
            q, s = torch.randint(-127, 128, (13, 40), dtype=torch.int8), torch.rand(13)
            xw = x.double() @ w.double().T
            # 11 rows of 2,100 columns: passes of rows over column chunks, bit for bit each row alone
            xl, wl = torch.randn(11, 2100).to(dtype), (torch.randn(13, 2100) / 50).to(dtype)
            ql = torch.randint(-127, 128, (13, 2100), dtype=torch.int8)
            for product in (lambda r: ckernels.linear(r, wl), lambda r: ckernels.linear(r, ql, s),
                            lambda r: ckernels.gated(r, wl, wl, "silu")):
                together = product(xl)
                assert all(torch.equal(together[i], product(xl[i : i + 1])[0]) for i in range(11))
            pairs = [
                (ckernels.linear(x, w, act="silu"), F.silu(xw)),
                (ckernels.linear(x, q, s), (x.double() @ q.double().T) * s.double()),
                (ckernels.gated(x, w, w, "silu"), F.silu(xw) * xw),
                (ckernels.linear(xl, wl), xl.double() @ wl.double().T),
            ]
            qa, ka = torch.randn(1, 4, 1, 24).to(dtype), torch.randn(1, 2, 50, 24).to(dtype)
            mask = torch.ones(1, 1, 1, 50, dtype=torch.bool)
            scores = (qa.double().view(2, 2, 24) @ ka.double()[0].transpose(1, 2) / 24**0.5).softmax(-1)
            want = (scores @ ka.double()[0]).view(1, 4, 1, 24)
            pairs.append((ckernels.attention(qa, ka, ka, mask, 24**-0.5), want))
            for got, want in pairs:
                worst = max(worst, float((got.double() - want).abs().max() / want.abs().max()))
        print(worst)
        """
    )
    env = {**os.environ, "IDEFICS2_C_KERNELS_MARCH": march, "PYTHONPATH": os.path.join(REPO, "src")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.strip().splitlines()[-1]) <= 1e-2


@pytest.mark.skipif(shutil.which("gcc") is None, reason="GCC's x86 header guard")
def test_the_plain_c_loops_build_without_the_x86_header():
    """A CPU without x86's vector instructions (ARM: Graviton, Ampere, Apple) builds the plain C loops: with
    GCC's x86 intrinsics header made empty, nothing outside the vector paths may need it (a prefetch there
    once did, and ARM machines fell back to torch's kernels for want of a header)."""
    command = ["gcc", "-fsyntax-only", "-std=gnu11", "-fopenmp", "-march=x86-64", "-D_IMMINTRIN_H_INCLUDED"]
    command += ["-Werror=implicit-function-declaration", str(ckernels.SOURCE)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


ROUTES = dict.fromkeys(("linear", "int8", "int4", "attention", "rms_norm", "gated", "rope"), "c")


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "int8", "int4"])
def test_a_model_decodes_the_same_on_c_kernels(mode):
    """A tiny random model's prefill and decode steps (two cache rows at different positions, fixed tokens)
    give the same logits with every decode op on our C kernels as on torch's, to the rounding of the routes
    (torch's int8 / int4 kernels take bfloat16 activations); in float32 greedy decoding gives the same
    tokens."""
    from idefics2.decoding.runner import ModelRunner

    torch.manual_seed(0)
    config = Idefics2Config.from_dict(tiny_config_dict(text_config={"intermediate_size": 96}))
    model = Idefics2ForConditionalGeneration(config).eval()
    if mode == "bfloat16":
        model = model.to(torch.bfloat16)
    elif mode in ("int8", "int4"):
        model = model.quantize(mode, group_size=32) if mode == "int4" else model.quantize(mode)
    prompts = [torch.randint(3, 32000, (n,)).tolist() for n in (9, 5)]

    def steps() -> torch.Tensor:
        runner = ModelRunner(model, 2, 64)
        with torch.inference_mode():
            for row, prompt in enumerate(prompts):
                runner.prefill(row, runner.embed_prompt(prompt, None), 0, False)
            return torch.stack([runner.decode([7 + i, 11 + i], [9 + i, 5 + i]) for i in range(4)])

    with kernels.force(c_kernels=False):
        torch_logits = steps()
    with kernels.force(**ROUTES):
        c_logits = steps()
        made = kernels.choices()
    tolerance = {"float32": 1e-5, "bfloat16": 3e-2}.get(mode, 3e-2)
    assert rel_diff(c_logits.double(), torch_logits.double()) <= tolerance
    chosen = {key[0] for key, (kernel, _) in made.items() if kernel == "c"}
    # int8 / int4: the decoder's products (the language-model head included) are all quantized layers
    want = {"attention", "rms_norm", "rope", "gated"} | ({mode} if mode in ("int8", "int4") else {"linear"})
    assert want <= chosen, chosen
    if mode == "float32":
        ids = torch.tensor([prompts[0]])
        greedy = lambda: model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with kernels.force(c_kernels=False):
            want_tokens = greedy()
        with kernels.force(**ROUTES):
            assert torch.equal(greedy(), want_tokens)


def test_layers_offer_their_operands_only_where_the_c_kernels_compute_them():
    layer = QuantizedLinear.from_float(torch.randn(16, 32), None, 8)
    assert layer.c_operands(torch.float32)[0].dtype == torch.int8
    int4 = QuantizedLinear.from_float(torch.randn(16, 64), None, 4, 32)
    if int4.packing is not None:  # in the device kernel's layout: not before its own C product moved it
        assert int4.c_operands(torch.float32) is None
    with torch.no_grad():
        int4.product_with("c", torch.randn(1, 64))
    nibbles, scales = int4.c_operands(torch.float32)
    assert nibbles.shape == (16, 32) and scales.dtype == torch.float32
    mlp = GatedMLP(32, 16, 32, "silu")
    assert mlp.gate_proj.c_operands(torch.float32) is not None
    assert mlp.gate_proj.c_operands(torch.bfloat16) is None  # float32 weights, bfloat16 inputs
    handle = mlp.up_proj.register_forward_hook(lambda *args: None)  # e.g. a LoRA adapter's
    with torch.no_grad():
        assert not mlp._c_gated(torch.randn(1, 32))
    handle.remove()
    with torch.no_grad():
        assert mlp._c_gated(torch.randn(1, 32))
        assert not mlp._c_gated(torch.randn(33, 32))  # more rows than a decode step: torch's kernels
    assert not mlp._c_gated(torch.randn(1, 32))  # autograd on (training)


def test_the_measured_route_takes_the_c_kernel_and_a_new_candidate_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("IDEFICS2_KERNEL_TUNING", "1")
    monkeypatch.setenv("IDEFICS2_KERNELS_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv("IDEFICS2_KERNELS", raising=False)
    kernels.forget_choices()
    seconds = {"c": 1e-6, "onednn_fused": 2e-6, "onednn": 2e-6, "aten": 3e-6}
    timed: list[str] = []

    def clock(call) -> float:
        name = call.__defaults__[0]  # the kernel's name, bound by kernels.fastest's lambda
        timed.append(name)
        call()
        return seconds[name]

    monkeypatch.setattr(kernels, "measure", clock)
    w, x = torch.randn(48, 32), torch.randn(1, 32)
    try:
        with torch.no_grad():
            got = attention.linear(x, w)
        assert "c" in timed
        (key,) = [key for key in kernels.choices() if key[0] == "linear"]
        assert kernels.choices()[key][0] == "c"
        assert torch.allclose(got, x @ w.T, atol=1e-5)
        # a file written before the C kernels existed (one candidate less): measured again, not trusted
        data = json.loads((tmp_path / "kernels.json").read_text())
        for entry in next(iter(data.values())).values():
            entry["kernel"], entry["candidates"] = "aten", sorted(set(entry["candidates"]) - {"c"})
        (tmp_path / "kernels.json").write_text(json.dumps(data))
        kernels.forget_choices()
        timed.clear()
        with torch.no_grad():
            attention.linear(x, w)
        assert "c" in timed and kernels.choices()[key][0] == "c"
    finally:
        kernels.forget_choices()


@pytest.mark.parametrize("setting", [{"IDEFICS2_C_KERNELS": "0"}, {"CC": "no-such-compiler-here"}])
def test_without_a_compiler_torch_kernels_run(setting):
    script = (
        "import torch; from idefics2.modeling import ckernels, kernels; "
        "from idefics2.modeling.attention import linear_kernels; "
        "print(ckernels.available(), kernels.c_kernels(), 'c' in linear_kernels(torch.float32, None, 1))"
    )
    env = {**os.environ, **setting, "PYTHONPATH": os.path.join(REPO, "src")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False", "False"]


def test_built_library_is_kept_for_the_next_process_and_loaded_only_from_private_files(tmp_path):
    """The first process compiles into the cache folder; the next loads that library without compiling; a
    folder or file that others may write, another user's file, or a damaged file is never loaded."""
    log, refuse = tmp_path / "compiler.log", tmp_path / "refuse"
    compiler = tmp_path / "cc"  # the system compiler, logging each call, refusing while `refuse` exists
    compiler.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n[ -e {refuse} ] && exit 1\nexec {shutil.which("cc")} "$@"\n'
    )
    compiler.chmod(0o755)
    folder = tmp_path / "cache"
    env = {
        **os.environ,
        "CC": str(compiler),
        "IDEFICS2_C_KERNELS_CACHE": str(folder),
        "PYTHONPATH": os.path.join(REPO, "src"),
    }
    script = "from idefics2.modeling import ckernels; print(ckernels.available()); print(ckernels.origin())"
    origins = []

    def available() -> tuple[bool, str]:
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr
        works, origin = run.stdout.splitlines()
        origins.append(origin)
        return works == "True", run.stderr

    def compiles() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    # two processes at once: one builds, the other waits for it and loads its library
    both = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    firsts = sorted(process.communicate(timeout=300)[0] for process in both)
    assert all(process.returncode == 0 for process in both) and compiles() == 1
    (library,) = folder.glob("ckernels-*.so")
    assert folder.stat().st_mode & 0o777 == 0o700 and library.stat().st_mode & 0o077 == 0
    assert firsts[0].startswith("True\nbuilt in ") and firsts[0].endswith(f"kept in {library}\n")
    assert firsts[1] == f"True\nloaded from {library}\n"
    refuse.touch()
    assert available() == (True, "") and compiles() == 1  # loaded, not compiled again
    assert origins[0] == f"loaded from {library}"

    folder.chmod(0o777)  # anyone may swap the file: not loaded, a private build is tried (and refused)
    works, errors = available()
    assert not works and "not this user's alone" in errors and compiles() == 2 and library.exists()
    assert origins[1].startswith("unavailable: ") and "failed" in origins[1]
    folder.chmod(0o700)
    kept = library.read_bytes()
    library.chmod(0o766)  # the file writable by others: deleted, never loaded
    assert available() == (False, "") and compiles() == 3 and not library.exists()
    library.write_bytes(b"not a library")  # damaged (a private file): deleted, built again
    library.chmod(0o700)
    assert available() == (False, "") and compiles() == 4 and not library.exists()
    if os.getuid() == 0:  # another user's file
        library.write_bytes(kept)
        library.chmod(0o700)
        os.chown(library, 65534, -1)
        assert available() == (False, "") and compiles() == 5 and not library.exists()
    library.write_bytes(kept)  # restored as it was written: loaded again without the compiler
    library.chmod(0o700)
    assert available() == (True, "")


@pytest.fixture
def kept_cache(tmp_path, monkeypatch):
    """A cache folder of this process's own holding the library this run built (IDEFICS2_C_KERNELS_CACHE)."""
    session = ckernels.cache_folder()
    if session is None or not list(session.glob("ckernels-*.so")):
        pytest.skip("this run keeps no built library")
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    for built in session.glob("ckernels-*.so"):
        shutil.copy2(built, folder)
    monkeypatch.setenv("IDEFICS2_C_KERNELS_CACHE", str(folder))
    return folder


def test_a_cache_folder_that_may_not_map_code_loads_a_private_copy(kept_cache, monkeypatch):
    """A cache on a noexec mount: the kept library is loaded from a private copy, not built again or lost."""
    folder = kept_cache
    real, loaded = ctypes.CDLL, []

    def noexec(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(f"{path}: failed to map segment from shared object")
        loaded.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", noexec)
    lib, how = ckernels._loaded.__wrapped__()  # as a new process would, without building anything
    (kept,) = [path for path in folder.glob("ckernels-*.so") if how == f"loaded from {path}"]
    assert lib is not None and kept.exists() and len(loaded) == 1
    assert not str(loaded[0]).startswith(str(folder)) and os.path.basename(loaded[0]) == kept.name


def test_a_read_only_cache_folder_still_serves_its_library(kept_cache, monkeypatch):
    """No lock file and no last-use time can be written: the kept library loads all the same."""

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(os, "utime", read_only)
    monkeypatch.setattr(ckernels, "open", read_only, raising=False)  # the lock file
    lib, how = ckernels._loaded.__wrapped__()
    assert lib is not None and how.startswith(f"loaded from {kept_cache}")
    assert not (kept_cache / ".lock").exists()


def test_a_stuck_holder_of_the_build_lock_delays_a_process_but_never_hangs_it(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setattr(ckernels, "LOCK_WAIT_S", 0.3)
    outcome = {}

    def take() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.monotonic()
            with ckernels._locked(tmp_path):
                outcome["waited"] = time.monotonic() - start
        outcome["warnings"] = [str(warning.message) for warning in caught]

    with open(tmp_path / ".lock", "a") as held:  # another open file: flock treats it as another holder
        fcntl.flock(held, fcntl.LOCK_EX)
        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        taker.join(timeout=20)
        assert not taker.is_alive(), "a held lock made the process wait without end"
    assert 0.3 <= outcome["waited"] < 5
    assert any("building without waiting" in message for message in outcome["warnings"])
    with ckernels._locked(tmp_path):  # released: taken at once
        pass


def test_a_file_system_without_locks_builds_without_one(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")

    def no_locks(*args):
        raise OSError(37, "No locks available")  # ENOLCK, as on a network mount without a lock daemon

    monkeypatch.setattr(fcntl, "flock", no_locks)
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: no one else holds anything
        with ckernels._locked(tmp_path):
            pass
    assert time.monotonic() - start < 1


def test_pruning_keeps_the_most_recently_used_libraries_and_drops_unfinished_builds(tmp_path):
    now = time.time()
    libraries = [tmp_path / f"ckernels-{i:032x}.so" for i in range(12)]
    for age, library_file in enumerate(libraries):  # libraries[0] used last, libraries[11] longest ago
        library_file.write_bytes(b"")
        os.utime(library_file, (now - 60 * age, now - 60 * age))
    killed, running = tmp_path / ".building-old.so", tmp_path / ".building-new.so"
    for building, age in ((killed, 3600), (running, 10)):
        building.write_bytes(b"")
        os.utime(building, (now - age, now - age))
    ckernels._prune(tmp_path, keep=libraries[11], most=4)
    assert sorted(tmp_path.glob("ckernels-*.so")) == sorted([*libraries[:3], libraries[11]])
    assert running.exists() and not killed.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_equals_rotary_then_cache_write(dtype):
    from idefics2.modeling.text import RotaryTable, apply_rotary

    torch.manual_seed(0)
    b, heads, kv_heads, d = 3, 8, 2, 16
    q, k, v = (torch.randn(b, 1, n * d).to(dtype) for n in (heads, kv_heads, kv_heads))
    slots = torch.tensor([5, 0, 11])
    cos, sin = RotaryTable(d, 10000.0)(slots[:, None], dtype)  # (B, 1, D), sin's first half negated
    cache = [torch.randn(b + 1, kv_heads, 12, d).to(dtype) for _ in range(2)]
    keys, values = (t[1:] for t in cache)  # rows [1, 4) of a longer cache, as the runner's views
    want_keys, want_values = keys.clone(), values.clone()
    want_q = apply_rotary(q.view(b, 1, heads, d).transpose(1, 2), cos, sin)
    rotated_k = apply_rotary(k.view(b, 1, kv_heads, d).transpose(1, 2), cos, sin)
    want_keys[torch.arange(b), :, slots] = rotated_k[:, :, 0]
    want_values[torch.arange(b), :, slots] = v.view(b, kv_heads, d)
    got_q = ckernels.rope_store(q, k, v, cos, sin, keys, values, slots)
    assert got_q.shape == (b, heads, 1, d)
    assert torch.equal(values, want_values)  # copied as they are
    # the same rounding steps in float32 arithmetic: equal, or one unit in the last place where the
    # compiler fused the product and the sum
    for got, want in ((got_q, want_q), (keys, want_keys)):
        assert rel_diff(got.double(), want.double()) <= (1e-6 if dtype == torch.float32 else 2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_layers_on_the_c_kernel_equal_the_dequantized_product(dtype, group_size):
    """The C int4 product reads the portable layout (the layer moves there from the device kernel's on its
    first call) and equals the product with the dequantized weight; the layer's other routes still run."""
    torch.manual_seed(0)
    layer = QuantizedLinear.from_float(torch.randn(40, 256) * 0.02, torch.randn(40) * 0.1, 4, group_size)
    layer = layer.to(dtype)
    x = torch.randn(3, 256).to(dtype)
    want = F.silu(x.double() @ layer.dequantized_weight(torch.float64).T + layer.bias.double())
    with torch.no_grad():
        got = layer.product_with("c", x, "silu")
        assert layer.packing is None  # portable now
        again = layer.product_with("kernel", x, "silu")  # the device kernel's choice: the C kernel now
    assert rel_diff(got.double(), want) <= INT8_TOLERANCE[dtype]
    assert rel_diff(again.double(), want) <= 2e-2
    state = layer.state_dict()  # still the portable form, saved and reloaded as before
    assert state["qweight"].shape == (40, 128) and state["qweight"].dtype == torch.uint8


def passes_and_alone(x, product) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`product` of all rows of x at once, and of each row alone."""
    return product(x), [product(x[i : i + 1])[0] for i in range(x.shape[0])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_rows_taken_in_column_chunks_equal_rows_taken_alone(dtype):
    """Float products of more activation rows than one pass sums (4, a gated block's 2) go through each weight
    row in column chunks, every pass over a chunk before the next: each row's output, plain or gated, with
    columns past the last whole vector, a short last block of weight rows and 11 rows (8 together, then 3),
    is bit for bit what that row gives alone, and matches float64."""
    generator = torch.Generator().manual_seed(0)
    n, k = 42, 2100  # several chunks of 2 KiB of each row, whole vectors, then a tail
    w = [(torch.randn(n, k, generator=generator) / k**0.5).to(dtype) for _ in range(2)]
    x = torch.randn(11, k, generator=generator).to(dtype)
    together, alone = passes_and_alone(x, lambda rows: ckernels.linear(rows, w[0], act="silu"))
    for i in range(11):
        assert torch.equal(together[i], alone[i]), i
    want = F.silu(x.double() @ w[0].double().T)
    assert rel_diff(together.double(), want) <= TOLERANCE[dtype]
    together, alone = passes_and_alone(x, lambda rows: ckernels.gated(rows, w[0][:41], w[1][:41], "silu"))
    for i in range(11):
        assert torch.equal(together[i], alone[i]), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_rows_taken_in_pairs_equal_rows_taken_alone(dtype):
    """Activation rows go through an int4 product two at a time (each weight vector unpacked once for both):
    every row's output, plain or gated, with a block of fewer weight rows at the end, is bit for bit what
    that row gives alone."""
    generator = torch.Generator().manual_seed(0)
    n, k, group = 42, 256, 64  # 42 rows: blocks of 4, then one of 2
    nibbles = [torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator) for _ in range(2)]
    scales = [torch.rand(n, k // group, generator=generator) * 0.01 for _ in range(2)]
    x = torch.randn(5, k, generator=generator).to(dtype)  # two pairs and one row alone
    together = ckernels.linear_int4(x, nibbles[0], scales[0], group, act="silu")
    gated = ckernels.gated(x, nibbles[0][:41], nibbles[1][:41], "silu", scales[0][:41], scales[1][:41])
    for i in range(5):
        assert torch.equal(
            together[i], ckernels.linear_int4(x[i : i + 1], nibbles[0], scales[0], group, act="silu")[0]
        )
        assert torch.equal(
            gated[i],
            ckernels.gated(
                x[i : i + 1], nibbles[0][:41], nibbles[1][:41], "silu", scales[0][:41], scales[1][:41]
            )[0],
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_taken_in_pairs_equal_rows_taken_alone(dtype):
    """int8 products take activation rows two at a time as well (each weight vector widened once for both):
    every row's output, plain or gated, with columns past the last whole vector and a short last block of
    weight rows, is bit for bit what that row gives alone."""
    generator = torch.Generator().manual_seed(0)
    n, k = 42, 300  # 300 columns: whole vectors, then a float tail
    q = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator) for _ in range(2)]
    s = [torch.rand(n, generator=generator) * 0.01 for _ in range(2)]
    x = torch.randn(5, k, generator=generator).to(dtype)
    together = ckernels.linear(x, q[0], s[0], act="silu")
    gated = ckernels.gated(x, q[0][:41], q[1][:41], "silu", s[0][:41], s[1][:41])
    for i in range(5):
        row = x[i : i + 1]
        assert torch.equal(together[i], ckernels.linear(row, q[0], s[0], act="silu")[0])
        assert torch.equal(
            gated[i], ckernels.gated(row, q[0][:41], q[1][:41], "silu", s[0][:41], s[1][:41])[0]
        )


def dequantize_mismatches() -> list[tuple]:
    """The cases where the C int4 dequantizer's weight is not, bit for bit, formats.dequantize_int4's: group
    sizes down to one vector step and a whole row, zero points or none, bfloat16 and float32 scales."""
    from idefics2.quantization.formats import dequantize_int4

    generator = torch.Generator().manual_seed(0)
    wrong = []
    for n, k, group, zeros, scale_dtype in [
        (37, 256, 32, False, torch.bfloat16),
        (8, 384, 128, True, torch.float32),
        (3, 96, 96, True, torch.bfloat16),
        (5, 1024, 256, False, torch.float32),
    ]:
        nibbles = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
        scales = (torch.rand(n, k // group, generator=generator) * 0.05 + 1e-3).to(scale_dtype)
        zero_points = torch.randn(n, k // group, generator=generator) * 0.01 if zeros else None
        zero_points = None if zero_points is None else zero_points.to(scale_dtype)
        for dtype in (torch.float32, torch.bfloat16):
            got = ckernels.dequantize_int4(nibbles, scales, zero_points, torch.empty(n, k, dtype=dtype))
            if not torch.equal(got, dequantize_int4(nibbles, scales, zero_points, dtype)):
                wrong.append((n, k, group, zeros, scale_dtype, dtype))
    return wrong


def test_int4_weights_dequantize_in_c_bit_for_bit():
    """A prefill's int4 product dequantizes the weight for a float product: in C (one pass from the portable
    layout, ~10x the torch ops' speed on idefics2-8b's 14336x4096) the same numbers as the reference
    formula, no multiply-add fused where the formula rounds twice."""
    assert dequantize_mismatches() == []
    with pytest.raises(ValueError, match="contiguous"):
        ckernels.dequantize_int4(
            torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1), None, torch.empty(32, 4).t()
        )


@pytest.mark.parametrize("c_kernels", [True, False])
@pytest.mark.parametrize("zero_points", [False, True])
def test_int4_prefill_products_dequantize_as_the_reference(c_kernels, zero_points):
    """The dequantized product (prefill rows) equals x @ dequantized_weight().T on either dequantizer (C, or
    torch's ops where the C kernels are off), in both layouts, with and without zero points."""
    torch.manual_seed(0)
    layer = QuantizedLinear.from_float(torch.randn(48, 128) * 0.02, None, 4, 32)
    if zero_points:
        layer.zeros = torch.randn_like(layer.scales.float()) * 1e-3
    x = torch.randn(40, 128)
    want = x @ layer.dequantized_weight(torch.float32).T
    with torch.no_grad(), kernels.force(c_kernels=c_kernels):
        got = [layer.dequantized_product(x)]
        layer._unpack()  # the portable layout (a no-op where the layer holds it already)
        got.append(layer.dequantized_product(x))
    for product in got:
        assert torch.allclose(product, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decode_kernel", ["c", "kernel"])
def test_an_int4_prefill_moves_the_layer_where_its_decode_steps_will(decode_kernel):
    """A packed int4 layer's first prefill product moves it to the portable layout (where the C kernels
    dequantize it) when its decode steps take the C product, which would move it at the first step anyway;
    when they take torch's int4 kernel, the layer keeps that kernel's layout."""
    layer = QuantizedLinear.from_float(torch.randn(64, 128) * 0.02, None, 4, 32)
    held = layer.packing
    if held is None:
        pytest.skip("torch has no int4 CPU layout here: every int4 layer is portable")
    x = torch.randn(80, 128)  # past QUANTIZED_KERNEL_MAX_ROWS: the dequantized product, forced or measured
    want = x @ layer.dequantized_weight(torch.float32).T
    with torch.no_grad(), kernels.force(int4=decode_kernel):
        got = layer(x)
    assert layer.packing == (None if decode_kernel == "c" else held)
    assert rel_diff(got.double(), want.double()) <= 1e-2  # (in bfloat16 where the CPU has it)


def test_a_measured_int4_prefill_measures_its_decode_rows_once_not_inside_the_race(monkeypatch, tmp_path):
    """A packed int4 layer's prefill asks which kernel its decode rows take (that decides its layout) before
    its own race, never inside it: the race runs copies of the layer, and a copy asking again started a race
    of its own on copies of its own (measurements nested without end; on idefics2-8b's shapes, 15 GB)."""
    monkeypatch.setenv("IDEFICS2_KERNEL_TUNING", "1")
    monkeypatch.setenv("IDEFICS2_KERNELS_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv("IDEFICS2_KERNELS", raising=False)
    kernels.forget_choices()
    measure_choice, depth, classes = kernels._measure_choice, [0], []

    def watched(key, *args):  # (a dequantized product's own float product is measured inside: that one ends)
        if key[0] != "int4":
            return measure_choice(key, *args)
        if depth[0]:
            raise AssertionError(f"a measurement of {key} inside another one")
        depth[0] += 1
        classes.append(key[2])
        try:
            return measure_choice(key, *args)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(kernels, "_measure_choice", watched)
    layer = QuantizedLinear.from_float(torch.randn(64, 128) * 0.02, None, 4, 32)
    held = layer.packing
    x = torch.randn(80, 128)
    try:
        with torch.no_grad():
            got = layer(x)
    finally:
        kernels.forget_choices()
    assert rel_diff(got.double(), (x @ layer.dequantized_weight(torch.float32).T).double()) <= 1e-2
    # in the device kernel's layout, decode rows first (they decide the layout), then the prefill's race
    assert classes[0] == ("1" if held is not None else "prefill")


def test_an_int4_race_moves_one_copy_to_the_portable_layout(monkeypatch, tmp_path):
    """The C kernel's streaming copies of an int4 layer held in torch's layout are clones of one copy moved to
    the portable layout: one move per race (each took 0.12 s for one of idefics2-8b's 14336x4096 weights,
    eight of them most of its race), the layer itself left in its layout."""
    layer = QuantizedLinear.from_float(torch.randn(64, 256) * 0.02, None, 4, 128)
    if layer.packing is None:
        pytest.skip("no int4 kernel layout here: nothing to move")
    monkeypatch.setenv("IDEFICS2_KERNEL_TUNING", "1")
    monkeypatch.setenv("IDEFICS2_KERNELS_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv("IDEFICS2_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "streaming_copies", lambda nbytes, rows: 4)
    kernels.forget_choices()
    moves, unpack = [], QuantizedLinear._unpack

    def counted(self):
        moves.extend([1] if self.packing is not None else [])
        return unpack(self)

    monkeypatch.setattr(QuantizedLinear, "_unpack", counted)
    try:
        chosen = layer._cpu_kernel(torch.float32, 1)
        key = ("int4", layer._kernel_shape(torch.float32), "1", torch.get_num_threads())
        timed = kernels.choices()[key][1]
    finally:
        kernels.forget_choices()
    assert "c" in timed and chosen in timed
    assert len(moves) == 1 and layer.packing is not None


def decoder_model(mode: str, layers: int = 2, window: int | None = None) -> Idefics2ForConditionalGeneration:
    torch.manual_seed(0)
    text = {"intermediate_size": 96, "num_hidden_layers": layers, "sliding_window": window}
    model = Idefics2ForConditionalGeneration(
        Idefics2Config.from_dict(tiny_config_dict(text_config=text))
    ).eval()
    if mode == "bfloat16":
        return model.to(torch.bfloat16)
    if mode in ("int8", "int4"):
        return model.quantize(mode, group_size=32) if mode == "int4" else model.quantize(mode)
    return model


def decode_logits(model, steps: int = 4) -> torch.Tensor:
    """Logits of `steps` decode steps of two cache rows at different positions (the shorter row's unused
    slots masked), after prefilling fixed prompts."""
    from idefics2.decoding.runner import ModelRunner

    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 32000, (n,), generator=generator).tolist() for n in (9, 5)]
    runner = ModelRunner(model, 2, 64)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            runner.prefill(row, runner.embed_prompt(prompt, None), 0, False)
        return torch.stack([runner.decode([7 + i, 11 + i], [9 + i, 5 + i]) for i in range(steps)])


def count_calls(monkeypatch, module, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def count_steps(monkeypatch) -> CountedTogether:
    """Calls of the one-call decoder step, alone or inside the whole step from tokens to logits."""
    calls = count_calls(monkeypatch, ckernels, "decoder_step")
    calls_whole = count_calls(monkeypatch, ckernels.DecodeCall, "__call__")
    return CountedTogether(calls, calls_whole)


class CountedTogether:
    def __init__(self, *counts: list[int]) -> None:
        self.counts = counts

    def __len__(self) -> int:
        return sum(map(len, self.counts))


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "int8", "int4"])
def test_the_decoder_step_in_one_call_equals_the_layers_on_c_kernels(mode, monkeypatch):
    """Every decoder layer of a decode step in one C call computes what the layers compute op by op on the
    same C kernels, in the same order and with the same roundings: the logits are identical, bit for bit,
    with two rows at different positions."""
    assert_one_call_equals_the_ops(decoder_model(mode), monkeypatch)


def assert_one_call_equals_the_ops(model, monkeypatch) -> None:
    """Four decode steps of `model` in one C call each give the logits of its layers run op by op on the C
    kernels, bit for bit."""
    with kernels.force(**ROUTES):
        by_ops = decode_logits(model)
    calls = count_steps(monkeypatch)
    with kernels.force(**ROUTES, decoder_step="c"):
        in_one_call = decode_logits(model)
    assert len(calls) == 4
    assert torch.equal(in_one_call, by_ops)


@pytest.mark.parametrize("float_projection", ["q_proj", "k_proj", "v_proj"])
def test_the_decoder_step_takes_projections_of_mixed_kinds(float_projection, monkeypatch):
    """A layer's q, k and v products share one pass of the threads where they are of one kind; where one of
    them is a float layer beside int8 ones (a checkpoint that left it unquantized), each run of one kind gets
    its own pass: the logits still equal those of the layers op by op, bit for bit."""
    model = decoder_model("int8")
    attn = model.model.text_model.layers[0].self_attn
    quantized = getattr(attn, float_projection)
    plain = attention.Linear(quantized.in_features, quantized.out_features, bias=False)
    with torch.no_grad():
        plain.weight.copy_(quantized.dequantized_weight(torch.float32))
    setattr(attn, float_projection, plain)
    assert_one_call_equals_the_ops(model, monkeypatch)


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("window", [None, 6])
def test_the_whole_step_from_tokens_to_logits_equals_its_parts(mode, window, monkeypatch):
    """Where the one-call decoder step and the head's C product are the kernels chosen, a decode step runs
    as one C call from token ids to float32 logits (embedding, rotary rows, each row's mask within the
    sliding window, the layers, the final norm, the head): the logits equal, bit for bit, those of the same
    kernels called one by one, with two rows at different positions (past the window where there is one)."""
    model = decoder_model(mode, window=window)
    whole = count_calls(monkeypatch, ckernels.DecodeCall, "__call__")
    with kernels.force(**ROUTES, decoder_step="c"):
        in_one_call = decode_logits(model, steps=6)
        assert len(whole) == 6
        monkeypatch.setattr(model, "c_decode_logits", lambda *args: None)
        by_parts = decode_logits(model, steps=6)
    assert len(whole) == 6 and in_one_call.dtype == torch.float32
    assert torch.equal(in_one_call, by_parts)
    with kernels.force(**ROUTES):
        assert torch.equal(by_parts, decode_logits(model, steps=6))  # (and the layers' own ops)
    if window is not None:  # the window hides slots here: the same weights without it decode otherwise
        with kernels.force(**ROUTES, decoder_step="c"):
            assert not torch.equal(decode_logits(decoder_model(mode), steps=6), in_one_call)


def test_the_whole_step_leaves_other_heads_to_their_own_calls(monkeypatch):
    """The head runs as its own call where its C product is not the one chosen, where a hook watches it (or
    the embedding, or the final norm), or where it has a bias; a token outside the vocabulary is an
    IndexError, as the embedding's."""
    model = decoder_model("float32")
    whole = count_calls(monkeypatch, ckernels.DecodeCall, "__call__")
    with kernels.force(**ROUTES, decoder_step="c"):
        want = decode_logits(model, steps=2)
    assert len(whole) == 2
    with kernels.force(**{**ROUTES, "linear": "aten"}, decoder_step="c"):
        other_head = decode_logits(model, steps=2)
    assert len(whole) == 2 and rel_diff(other_head.double(), want.double()) <= 1e-5
    seen: list[int] = []
    decoder = model.model.text_model
    for module in (model.lm_head, decoder.embed_tokens, decoder.norm):
        handle = module.register_forward_hook(lambda *args: seen.append(1))
        with kernels.force(**ROUTES, decoder_step="c"):
            assert torch.equal(decode_logits(model, steps=2), want)
        handle.remove()
    assert len(whole) == 2 and len(seen) >= 3 * 2
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    with kernels.force(**ROUTES, decoder_step="c"):
        assert torch.equal(decode_logits(model, steps=2), want)
    assert len(whole) == 2
    model.lm_head.bias = None
    from idefics2.decoding.runner import ModelRunner

    runner = ModelRunner(model, 1, 16)
    with kernels.force(**ROUTES, decoder_step="c"), torch.inference_mode():
        runner.prefill(0, runner.embed_prompt([5, 6, 7], None), 0, False)
        with pytest.raises(IndexError):
            runner.decode([model.config.text_config.vocab_size], [3])
    assert len(whole) == 3


@pytest.mark.parametrize("mode", ["float32", "int8"])
def test_the_head_joins_the_whole_step_where_its_c_product_was_measured_nearly_the_fastest(
    mode, monkeypatch, tmp_path
):
    """Measured (fake times): every op's C kernel the fastest but the head's product, whose winner beats the
    C product by 3% (the head's C product joins the one-call step: it saves the head's own call) or by 20%
    (the head runs as its own call, with the winner); a float head whose greedy steps the call screens
    (kernels.greedy_screen) joins up to 25% (at 20% it joins, at 40% not; at 20% without the screen, not).
    The logits agree either way."""
    monkeypatch.setenv("IDEFICS2_KERNEL_TUNING", "1")
    monkeypatch.delenv("IDEFICS2_KERNELS", raising=False)
    model = decoder_model(mode)
    vocab = model.lm_head.out_features
    head_winner = "aten" if mode == "float32" else "dequantize"
    whole = count_calls(monkeypatch, ckernels.DecodeCall, "__call__")
    screen = kernels.greedy_screen
    # (the C head's time over the winner's, screen route on) -> whether the head joins
    cases = {(1.03, True): True, (1.2, True): mode == "float32", (1.4, True): False, (1.2, False): False}
    logits = {}
    for (c_over_winner, screened), joins in cases.items():
        monkeypatch.setenv("IDEFICS2_KERNELS_CACHE", str(tmp_path / f"kernels-{c_over_winner}.json"))
        monkeypatch.setattr(kernels, "greedy_screen", screen if screened else lambda: False)

        def fake_fastest(names, run, timer, reference, c_over_winner=c_over_winner):
            head = run(reference).shape[-1] == vocab  # the only product with the vocabulary's columns
            times = dict.fromkeys(names, 2.0)
            if head and head_winner in names:
                times[head_winner], times["c"] = 1.0, c_over_winner
            elif "c" in names:
                times["c"] = 1.0
            return times

        monkeypatch.setattr(kernels, "fastest", fake_fastest)
        kernels.forget_choices()
        whole.clear()
        logits[c_over_winner, screened] = decode_logits(model, steps=2)
        assert len(whole) == (2 if joins else 0), (c_over_winner, screened)
    kernels.forget_choices()
    for got in logits.values():
        assert rel_diff(got.double(), logits[1.03, True].double()) <= (1e-5 if mode == "float32" else 3e-2)


def test_the_kept_whole_step_call_follows_the_model_between_steps(monkeypatch):
    """The whole step's call is prepared once per cache view and reused by the next steps of the same rows;
    a hook on the head or other kernels forced are seen at the very next step, a weight given new storage at
    the first step after a prefill (until then the call reads, and holds, the storage it began with); a copy
    of the model keeps none of the calls (they hold the original's addresses)."""
    from idefics2.decoding.runner import ModelRunner

    model = decoder_model("float32")
    whole = count_calls(monkeypatch, ckernels.DecodeCall, "__call__")
    prepared = count_calls(monkeypatch, ckernels.DecodeCall, "__init__")
    runner = ModelRunner(model, 2, 64)
    step = lambda i: runner.decode([7 + i, 11 + i], [9 + i, 5 + i])  # noqa: E731
    seen: list[int] = []
    prompts = ([3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16])
    with kernels.force(**ROUTES, decoder_step="c"), torch.inference_mode():
        for row, prompt in enumerate(prompts):
            runner.prefill(row, runner.embed_prompt(prompt, None), 0, False)
        step(0), step(1)
        assert (len(whole), len(prepared)) == (2, 1)
        handle = model.lm_head.register_forward_hook(lambda *args: seen.append(1))
        step(2)
        assert (len(whole), len(seen)) == (2, 1)
        handle.remove()
        before = step(3)
        assert (len(whole), len(prepared)) == (3, 2)
        norm = model.model.text_model.norm
        address = norm.weight.data_ptr()
        norm.weight.data = norm.weight.data * 2  # new storage: the final norm of this step's logits
        gc.collect()
        # the same step again (the same cache slots, written with the same values), mid-generation: the
        # storage it began with, still held by the call
        assert torch.equal(step(3), before) and (len(whole), len(prepared)) == (4, 2)
        call = next(iter(model.model.text_model._decode_calls.values())).call
        assert any(isinstance(t, torch.Tensor) and t.data_ptr() == address for t in call.kept)
        runner.prefill(0, runner.embed_prompt(prompts[0], None), 0, False)  # the same slots, the same values
        doubled = step(3)
        assert (len(whole), len(prepared)) == (5, 3) and not torch.equal(doubled, before)
        with kernels.force(**{**ROUTES, "linear": "aten"}, decoder_step="c"):
            step(3)
        assert len(whole) == 5
        assert torch.equal(step(3), doubled) and len(whole) == 6
        twin = copy.deepcopy(model)
        assert len(model.model.text_model._decode_calls) == 1 and not twin.model.text_model._decode_calls
        assert not pickle.loads(pickle.dumps(model.model.text_model._decode_calls))
        monkeypatch.setattr(model, "c_decode_logits", lambda *args: None)
        assert torch.equal(step(3), doubled)  # what the step's parts give
    runner.cache.decode_views.clear()
    gc.collect()
    assert not model.model.text_model._decode_calls  # dropped with the cache's view


def prefilled_runner(model):
    """A ModelRunner of two rows, fixed prompts of 9 and 5 tokens prefilled."""
    from idefics2.decoding.runner import ModelRunner

    runner = ModelRunner(model, 2, 64)
    with torch.inference_mode():
        for row, prompt in enumerate(([3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16])):
            runner.prefill(row, runner.embed_prompt(prompt, None), 0, False)
    return runner


def greedy_steps(model, steps: int = 4, excluded=None, logits_out=None) -> tuple[list, list]:
    """(each step's tokens from ModelRunner.decode_greedy, the first largest of the same step's logits) over
    `steps` decode steps of two rows at different positions, each step run both ways (the same cache slots,
    written with the same values), the rows going on with the greedy tokens; `excluded[b]`: ids row b may
    not take (-inf in its logits); each step's logits appended to `logits_out` where given."""
    from idefics2.decoding.sampler import first_largest

    runner = prefilled_runner(model)
    got, want = [], []
    with torch.inference_mode():
        tokens = [7, 11]
        for i in range(steps):
            positions = [9 + i, 5 + i]
            got.append(runner.decode_greedy(tokens, positions, excluded=excluded))
            logits = runner.decode(tokens, positions)
            for row, ids in enumerate(excluded or []):
                logits[row, ids] = float("-inf")
            want.append(first_largest(logits).tolist())
            if logits_out is not None:
                logits_out.append(logits)
            tokens = want[-1]
    return got, want


@pytest.mark.parametrize("mode", ["float32", "bfloat16"])
def test_greedy_steps_read_the_heads_int8_copy_and_pick_the_whole_heads_tokens(mode):
    """A greedy step in one C call finds each row's token from the head's int8 copy and the few logits it
    cannot rule out: the tokens equal the first largest of the whole head's logits, with ids held back, the
    first of equal logits included (two rows of the head made equal; in bfloat16 also two rows whose sums
    differ but round to the same logit), and a row with NaN activations (the whole head decides: its first
    NaN, as argmax). A changed head (even in place through `.data`) gets a new copy at the next prepared
    call; a head given new storage mid-generation is not screened from it (the call reads the storage it
    began with). With the route off, and for a quantized head, the same call picks the tokens from the
    whole logits (no screen)."""
    from idefics2.decoding.sampler import first_largest

    model = decoder_model(mode)
    with kernels.force(**ROUTES, decoder_step="c"):
        before = ckernels.screen_counts()
        got, want = greedy_steps(model)
        screened, candidates, whole = (a - b for a, b in zip(ckernels.screen_counts(), before, strict=True))
        assert got == want
        assert screened == 8 and whole == 0 and 8 <= candidates <= 8 * 16  # a few rows each
        first = want[0]
        got, want = greedy_steps(model, steps=2, excluded=[[first[0], 2], []])  # as a minimum length does
        assert got == want and want[0][0] != first[0] and want[0][1] == first[1]
        head = model.lm_head.weight
        best = first[0]
        head.data[best // 2] = head.data[best]  # an equal logit at a lower index: the first one wins
        got, want = greedy_steps(model, steps=1)
        assert want[0][0] == best // 2 and got == want
        if mode == "bfloat16":  # a sum a little off the largest, rounded to the same logit, at a lower index
            head.data[best // 3] = head.data[best]
            smallest = head.data[best].abs().argmin()
            head.data[best // 3, smallest] = -head.data[best, smallest]
            logits = []
            got, want = greedy_steps(model, steps=1, logits_out=logits)
            assert logits[0][0, best // 3] == logits[0][0, best] and want[0][0] == best // 3 and got == want
        embedding = model.model.text_model.embed_tokens.weight
        embedding.data[7] = float("nan")  # row 0's first step: NaN activations, NaN logits
        before = ckernels.screen_counts()
        got, want = greedy_steps(model, steps=1)
        assert got == want == [[0, want[0][1]]] and ckernels.screen_counts()[2] == before[2] + 1
        # the call prepared by a step that reads the logits, then its head given new storage mid-generation
        # (no prefill since): the greedy step reads the storage the call began with, and no screen of the new
        # one (whose tokens would differ: the head negated)
        runner = prefilled_runner(model)
        with torch.inference_mode():
            logits = runner.decode([8, 11], [9, 5])
            head.data = head.data * -1
            before = ckernels.screen_counts()
            assert runner.decode_greedy([8, 11], [9, 5]) == first_largest(logits).tolist()
            assert ckernels.screen_counts() == before
        with kernels.force(greedy_screen=False):  # picked in C from the whole logits
            before = ckernels.screen_counts()
            got, want = greedy_steps(model, steps=2, excluded=[[first[0]], []])
            assert got == want and None not in got and ckernels.screen_counts() == before
        quantized = decoder_model("int8")  # its head too: no screen, the whole logits in C
        first = greedy_steps(quantized, steps=1)[1][0]
        before = ckernels.screen_counts()
        got, want = greedy_steps(quantized, steps=2, excluded=[[first[0], 2], [first[1]]])
        assert got == want and want[0][0] != first[0] and want[0][1] != first[1]
        assert ckernels.screen_counts() == before
        # the same step with other ids held back from one call to the next (the call keeps the last table)
        runner = prefilled_runner(quantized)
        with torch.inference_mode():
            logits = runner.decode([7, 11], [9, 5])
            top = first_largest(logits).tolist()
            for held in ([[top[0]], []], None, [[], [top[1], 5]], [[top[0]], []], [], [[top[0]], [top[1]]]):
                masked = logits.clone()
                for row, ids in enumerate(held or []):
                    masked[row, ids] = float("-inf")
                assert runner.decode_greedy([7, 11], [9, 5], excluded=held) == first_largest(masked).tolist()
            with pytest.raises(ValueError, match="1 lists of held-back ids for 2 rows"):
                runner.decode_greedy([7, 11], [9, 5], excluded=[[top[0]]])  # one list short: never read past


def test_a_head_screen_bounds_its_int8_products_and_is_dropped_with_its_head():
    """The screen's bounds hold: for random activations, |S_n - l_n| stays below the bound the C code uses
    (|x| |w - s q| + ...), and the int8 copy is a quarter of the head's bytes; the kept screen goes with
    the weight it was made from."""
    from idefics2.modeling import text

    torch.manual_seed(0)
    weight = torch.randn(300, 96) * 0.02
    screen = ckernels.HeadScreen(weight)
    assert screen.q.numel() * screen.q.element_size() * 4 == weight.numel() * weight.element_size()
    x = torch.randn(5, 96, dtype=torch.float64)
    exact = x @ weight.double().T
    approx = x @ (screen.scales.double()[:, None] * screen.q.double()).T
    bound = x.norm(dim=1, keepdim=True) * screen.bounds[:, 0].double()
    assert ((approx - exact).abs() <= bound).all() and bound.max() < exact.abs().max() / 4
    assert (screen.bounds[:, 2].double() >= weight.double().norm(dim=1)).all()
    held = text._head_screen(weight)
    assert text._head_screen(weight) is held  # the same bytes: kept
    weight.data[3, 5] += 1.0  # in place, through .data: seen
    assert text._head_screen(weight) is not held
    del weight
    gc.collect()
    assert not text._screens


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_generation_of_a_quantized_model_picks_its_tokens_in_the_call(monkeypatch, mode):
    """A quantized head's greedy steps take their tokens from the one C call (no logits back to Python):
    every decode step of `generate` is an argmax call, and the tokens are those that the same call's logits
    give through the sampler, with and without a minimum length holding the end token back."""
    model = decoder_model(mode)
    ids = torch.randint(3, 32000, (2, 7), generator=torch.Generator().manual_seed(2))
    runs = [dict(max_new_tokens=6), dict(max_new_tokens=6, min_new_tokens=6, eos_token_id=[5, 9])]
    with kernels.force(**ROUTES, decoder_step="c"):
        picked = count_calls(monkeypatch, ckernels.DecodeCall, "argmax")
        got = [model.generate(ids, do_sample=False, pad_token_id=0, **run) for run in runs]
        assert len(picked) == 2 * 5  # every decode step of both generations
        monkeypatch.setattr(model, "c_decode_greedy", lambda *args: None)  # the logits, then the sampler
        want = [model.generate(ids, do_sample=False, pad_token_id=0, **run) for run in runs]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_greedy_generation_takes_the_screened_steps_and_decodes_the_same_tokens():
    model = decoder_model("float32")
    ids = torch.randint(3, 32000, (2, 7), generator=torch.Generator().manual_seed(2))
    greedy = lambda: model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)  # noqa: E731
    with kernels.force(**ROUTES, decoder_step="c", greedy_screen=False):
        want = greedy()
    before = ckernels.screen_counts()[0]
    with kernels.force(**ROUTES, decoder_step="c"):
        assert torch.equal(greedy(), want)
        assert ckernels.screen_counts()[0] == before + 2 * 5  # every decode step of both rows
        end = [want[0, -1].item()]  # row 0's last token ends it: held back by a minimum length instead
        kept_going = dict(max_new_tokens=6, min_new_tokens=6, eos_token_id=end, pad_token_id=0)
        with kernels.force(greedy_screen=False):
            held_back = model.generate(ids, **kept_going)
        assert torch.equal(model.generate(ids, **kept_going), held_back)
        assert ckernels.screen_counts()[0] == before + 4 * 5
        sampled = model.generate(ids, max_new_tokens=6, do_sample=True, pad_token_id=0)
        penalized = model.generate(ids, max_new_tokens=6, repetition_penalty=1.3, pad_token_id=0)
        assert ckernels.screen_counts()[0] == before + 4 * 5  # they read the logits
    assert sampled.shape == penalized.shape == want.shape


def test_the_decoder_step_decodes_the_tokens_of_torch_kernels():
    model = decoder_model("float32")
    ids = torch.randint(3, 32000, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    greedy = lambda: model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    with kernels.force(c_kernels=False):
        want = greedy()
    with kernels.force(decoder_step="c"):
        assert torch.equal(greedy(), want)
        assert rel_diff(decode_logits(model).double(), want_logits(model).double()) <= 1e-5


def want_logits(model) -> torch.Tensor:
    with kernels.force(c_kernels=False):
        return decode_logits(model)


def test_the_decoder_step_moves_int4_weights_from_torch_layout_when_it_runs(monkeypatch):
    """An int4 decoder still in torch's kernel layout takes the one-call step once that step is chosen:
    its weights move to the portable layout then (not before), and the layers' own route still runs after."""
    model = decoder_model("int4")
    decoder = model.model.text_model
    projections = [m for m in decoder.layers.modules() if isinstance(m, QuantizedLinear)]
    with kernels.force(c_kernels=False):
        want = decode_logits(model)
    if projections[0].packing is None:
        pytest.skip("torch's int4 kernel has no layout here: the layers start portable")
    assert decoder._c_layers(torch.float32) is None  # held in torch's layout: not computable as held
    copy = decoder._c_layers(torch.float32, layout="copy")
    assert copy is not None and all(m.packing is not None for m in projections)  # copies leave the layers
    calls = count_steps(monkeypatch)
    with kernels.force(decoder_step="c"):
        stepped = decode_logits(model)
    assert calls and all(m.packing is None for m in projections)
    assert rel_diff(stepped.double(), want.double()) <= 3e-2  # activations rounded to 16 bits vs bfloat16
    # the prompts' products on the C kernel too, now; the layers' ops on the C kernels the step calls (not
    # on whichever kernels this machine's race picks for them: sdpa's attention on an AVX2-only CPU)
    with kernels.force(**ROUTES, decoder_step="c"):
        stepped = decode_logits(model)
    with kernels.force(**ROUTES, decoder_step="layers"):
        assert rel_diff(decode_logits(model).double(), stepped.double()) <= 1e-5


def test_the_decoder_step_leaves_hooked_or_changed_layers_to_their_ops(monkeypatch):
    """A hook on any module of a layer (a LoRA adapter's, a user's probe) sends the step back to the layers'
    ops, so the hook runs; a weight replaced by a new tensor, or given new storage, is read from its new
    place; a copy of the model reads its own weights."""
    model = decoder_model("float32")
    decoder = model.model.text_model
    calls = count_steps(monkeypatch)
    seen: list[int] = []
    handle = decoder.layers[1].post_attention_layernorm.register_forward_hook(lambda *args: seen.append(1))
    with kernels.force(decoder_step="c"):
        decode_logits(model, steps=2)
    assert not calls and len(seen) == 2 + 2  # the two prefills and the two decode steps
    handle.remove()
    with torch.no_grad():
        down = decoder.layers[0].mlp.down_proj
        down.weight = torch.nn.Parameter(down.weight * 2)
        norm = decoder.layers[1].input_layernorm
        norm.weight.data = norm.weight.data * 3  # the same parameter on new storage (as .to() does)
    with kernels.force(**ROUTES, decoder_step="c"):
        stepped = decode_logits(model)
    assert calls
    with kernels.force(**ROUTES):
        assert torch.equal(stepped, decode_logits(model))
    twin = copy.deepcopy(model)  # the kept layers (memory addresses) are not copied: the twin reads its own
    with torch.no_grad():
        model.model.text_model.layers[0].mlp.down_proj.weight.mul_(0)
    with kernels.force(**ROUTES, decoder_step="c"):
        assert torch.equal(decode_logits(twin), stepped)
        assert pickle.loads(pickle.dumps(model.model.text_model._c_layers_cache)) == {}
    swapped = attention.Linear(64, 64, bias=False)  # a submodule replaced
    decoder.layers[1].self_attn.o_proj = swapped
    with kernels.force(**ROUTES, decoder_step="c"):
        stepped = decode_logits(model)
    with kernels.force(**ROUTES):
        assert torch.equal(stepped, decode_logits(model))


@pytest.mark.parametrize("mode", ["float32", "int8"])
def test_layers_with_lora_adapters_never_take_the_kernels_that_read_weights_alone(mode):
    """An unmerged LoRA adapter gives its layer its own forward: the C decode step, the gated product and the
    whole step from tokens to logits read weights directly, so they leave such a layer (and the step it is
    in) to its forward, and the adapters count (an adapter on gate_proj once went unseen on the gated
    product, with the measured routes)."""
    from idefics2.lora import LoraConfig, adapters_disabled, add_lora

    model = decoder_model(mode)
    add_lora(model, LoraConfig(target_modules=["q_proj", "v_proj", "gate_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.eval()
    with kernels.force(c_kernels=False):
        want = decode_logits(model)
        with adapters_disabled(model):
            assert rel_diff(decode_logits(model).double(), want.double()) > 0.1  # the adapters count
    tolerance = 1e-5 if mode == "float32" else 1e-2  # int8: activations rounded otherwise than torch's kernel
    with kernels.force(**ROUTES, decoder_step="c"):
        assert rel_diff(decode_logits(model).double(), want.double()) <= tolerance


@pytest.mark.parametrize("winner", ["layers", "c"])
def test_the_decoder_step_race_times_both_routes_and_keeps_the_faster(winner, monkeypatch, tmp_path):
    """Measured, the one-call step and the layers' ops (each op on its own measured kernel) are timed on the
    decoder's own weights; the faster runs. Timing an int4 decoder in torch's layout leaves it there."""
    monkeypatch.setenv("IDEFICS2_KERNEL_TUNING", "1")
    monkeypatch.setenv("IDEFICS2_KERNELS_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv("IDEFICS2_KERNELS", raising=False)
    # the races run for real (only their clock is stubbed): a busy machine must not run out of budget first
    monkeypatch.setattr(kernels, "TUNING_BUDGET_S", float("inf"))
    kernels.forget_choices()
    timed: list[str] = []

    def clock(call) -> float:  # "layers" is the decoder step's alone; every other op keeps its first kernel
        name = call.__defaults__[0]
        timed.append(name)
        call()
        return 1e-6 if name == "layers" and winner == "layers" else 1e-6 if name == winner == "c" else 2e-6

    monkeypatch.setattr(kernels, "measure", clock)
    model = decoder_model("int4")
    projections = [m for m in model.model.text_model.layers.modules() if isinstance(m, QuantizedLinear)]
    held = projections[0].packing
    calls = count_steps(monkeypatch)
    try:
        decode_logits(model, steps=2)
        (key,) = [key for key in kernels.choices() if key[0] == "decoder_step"]
        kernel, seconds = kernels.choices()[key]
    finally:
        kernels.forget_choices()
    assert kernel == winner and set(seconds) == {"layers", "c"}
    assert key[1][-1] == "int4g32"
    # the race itself ran the step (the agreement check and the timings); decoding took it only if it won
    assert len(calls) == 1 + kernels.TIMING_ROUNDS + (2 if winner == "c" else 0)
    if winner == "layers" and held is not None:
        assert all(m.packing == held for m in projections)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_the_decoder_step_equals_the_layers_on_every_instruction_set(march):
    script = textwrap.dedent(
        """
        import torch
        from idefics2.modeling import kernels
        from test_ckernels import ROUTES, decode_logits, decoder_model, dequantize_mismatches, greedy_steps
        assert dequantize_mismatches() == []
        for mode in ("float32", "bfloat16", "int8", "int4"):
            model = decoder_model(mode)
            with kernels.force(**ROUTES):
                by_ops = decode_logits(model, steps=2)
            with kernels.force(**ROUTES, decoder_step="c"):
                assert torch.equal(decode_logits(model, steps=2), by_ops), mode
        for mode in ("float32", "bfloat16"):
            with kernels.force(**ROUTES, decoder_step="c"):
                got, want = greedy_steps(decoder_model(mode))
                assert got == want, (mode, got, want)
        print("equal")
        """
    )
    path = os.pathsep.join([os.path.join(REPO, "src"), os.path.join(REPO, "tests")])
    env = {**os.environ, "IDEFICS2_C_KERNELS_MARCH": march, "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "equal"
