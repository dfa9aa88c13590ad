"""Decode-step matrix products in C (ckernels.c), built by this machine's C compiler and kept for this user.

torch's matrix-vector kernels read a decode step's weights well below the memory's rate on some CPUs (its
bfloat16 product widens every weight one at a time; its int8 kernel wants bfloat16 activations and a second
pass for float32 scales). ckernels.c streams each weight row once for all activation rows, in float32,
bfloat16 (AVX512-BF16 pairs where the CPU has them) or int8 with float32 scales, with SiLU and the gated
MLP's product fused in; with RMSNorm, rotary and cache write, and decode attention beside them, it also
runs every decoder layer of a decode step in one call (`decoder_step`), or the whole step from token ids to
logits (`DecodeCall`: a step then crosses from Python into C once). It is only a candidate:
idefics2.modeling.kernels times it against torch's kernels on each weights shape (the one-call step against
the layers' own ops) and keeps it only where it is faster and agrees with them.

The library is compiled with `$CC` (default `cc`) at `-O3 -march=native -fno-math-errno -fopenmp` (~5 s on
a 2-core Xeon) the first time it is needed, into this user's cache folder (`cache_folder()`, created 0700),
named by the SHA-256 of all that goes into it (source, command, the compiler's file, CPU, torch version), so
later processes load it at once. A library is loaded only from a folder and a file that are this user's and
writable by nobody else; otherwise, or with IDEFICS2_C_KERNELS_CACHE=0, each process builds its own in a
private temporary folder. Without a compiler (or with `IDEFICS2_C_KERNELS=0`) `available()` is False and
torch's kernels run. The OpenMP runtime is the one torch already loaded (the same soname), so its threads are
torch's threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from idefics2.modeling.cpu import cpu_description

SOURCE = Path(__file__).with_name("ckernels.c")
MAX_ROWS = 32  # decode steps of up to this many rows (on the Zen 4 the C products lead up to 16, tie at 32)
DTYPES = (torch.float32, torch.bfloat16)  # of activations (and float weights)
_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
ACTIVATIONS = {None: 0, "silu": 1, "swish": 1}  # fused into the kernels
CACHED_LIBRARIES = 8  # kept in the cache folder, the most recently used (other sources, compilers, CPUs)
LOCK_WAIT_S = 180.0  # at most this long for another process's build (which gives up after 120 s)


class CKernelsUnavailable(RuntimeError):
    """The C kernels cannot be built or loaded here."""


def library() -> ctypes.CDLL:
    """The compiled kernels (built, or taken from this user's cache, on the first call of the process);
    raises CKernelsUnavailable (each call, without trying again)."""
    lib, how = _loaded()
    if lib is None:
        raise CKernelsUnavailable(how.removeprefix("unavailable: "))
    return lib


def origin() -> str:
    """How this process got the kernels (built now, in how long, and where kept; or loaded from the cache), or
    why it has none: what `idefics2 kernels` prints."""
    return _loaded()[1]


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    """The library and how it was got, or None and why not: tried once per process."""
    if os.environ.get("IDEFICS2_C_KERNELS", "1") == "0":
        return None, "unavailable: IDEFICS2_C_KERNELS=0"
    compiler = os.environ.get("CC", "cc")
    found = shutil.which(compiler)
    if found is None:
        return None, f"unavailable: no C compiler ({compiler!r} not found)"
    # IDEFICS2_C_KERNELS_MARCH: another instruction set than this CPU's (tests build the AVX2 and the plain
    # x86-64 code on any x86 machine)
    march = os.environ.get("IDEFICS2_C_KERNELS_MARCH", "native")
    # -fno-math-errno: lrintf / expf set no errno, so the loops that round or exponentiate vectorize
    command = [
        compiler,
        "-O3",
        f"-march={march}",
        "-fno-math-errno",
        "-fopenmp",
        "-std=gnu11",
        "-shared",
        "-fPIC",
    ]
    folder = cache_folder()
    try:
        if folder is None:
            lib, how = _build_privately(command)
        else:
            lib, how = _cached(folder, command, _build_digest(command, found))
    except (CKernelsUnavailable, OSError) as error:  # OSError: the cache folder, past what _cached handles
        return None, f"unavailable: {error}"
    _declare(lib)
    return lib, how


def cache_folder() -> Path | None:
    """Where built libraries are kept: IDEFICS2_C_KERNELS_CACHE, else $XDG_CACHE_HOME/idefics2/ckernels
    (~/.cache/...); None with IDEFICS2_C_KERNELS_CACHE=0, without a home folder or on a system without
    POSIX owners (every process then builds its own)."""
    setting = os.environ.get("IDEFICS2_C_KERNELS_CACHE", "")
    if setting == "0" or not hasattr(os, "getuid"):  # (no owners to check: Windows)
        return None
    if setting:
        return Path(setting)
    home = os.path.expanduser("~")
    base = os.environ.get("XDG_CACHE_HOME") or (None if home == "~" else os.path.join(home, ".cache"))
    return None if base is None else Path(base) / "idefics2" / "ckernels"


def _build_digest(command: list[str], compiler_path: str) -> str:
    """SHA-256 of everything the library depends on: the C source, the command, the compiler's file (a new
    version is another file), this CPU (-march=native), torch's version (its OpenMP runtime)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    real = os.path.realpath(compiler_path)
    status = os.stat(real)
    cpu = cpu_description()
    for part in (*command, real, status.st_size, status.st_mtime_ns, cpu["model"], *cpu["flags"]):
        digest.update(f"\0{part}".encode())
    digest.update(f"\0torch {torch.__version__}".encode())
    return digest.hexdigest()


def _private(path: Path, kind: int) -> bool:
    """Whether `path` is of `kind` (stat.S_IFDIR, stat.S_IFREG), not a link, this user's, and writable by
    nobody else."""
    try:
        status = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_IFMT(status.st_mode) == kind
        and status.st_uid == os.getuid()
        and not status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _cached(folder: Path, command: list[str], digest: str) -> tuple[ctypes.CDLL, str]:
    """The library of `digest` from `folder`, built there first if missing (or unloadable), and how it was
    got. Nothing is loaded from a folder or file that another user owns or may write: then the library is
    built privately. One process builds at a time (the others wait, then load what it built)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: only costs the build in every process
        return _build_privately(command)
    if not _private(folder, stat.S_IFDIR):
        warnings.warn(
            f"C kernels: the cache folder {folder} is not this user's alone (owner or write permissions); "
            "nothing is loaded from it: building privately",
            stacklevel=2,
        )
        return _build_privately(command)
    target = folder / f"ckernels-{digest[:32]}.so"
    with _locked(folder):
        if _private(target, stat.S_IFREG):
            try:
                lib = _load(target)
            except OSError:  # damaged: built again below
                pass
            else:
                with contextlib.suppress(OSError):  # (a read-only cache keeps its order)
                    os.utime(target)  # last use: the pruning below keeps the libraries in use
                return lib, f"loaded from {target}"
        try:
            seconds = _build_into(command, target)
        except OSError:  # a cache that cannot be written (read-only): this process builds its own
            return _build_privately(command)
        _prune(folder, keep=target)
    try:
        return _load(target), f"built in {seconds:.1f} s, kept in {target}"
    except OSError as error:
        raise CKernelsUnavailable(f"{target}: {error}") from error


def _build_into(command: list[str], target: Path) -> float:
    """Build the library at `target`, in its folder, replacing what is there (damaged, another owner's or
    writable by others: never loaded); the seconds the build took."""
    target.unlink(missing_ok=True)
    handle, building = tempfile.mkstemp(dir=target.parent, prefix=".building-", suffix=".so")
    os.close(handle)
    try:
        seconds = _compile(command, building)
        os.chmod(building, 0o700)
        os.replace(building, target)  # whole or absent
    finally:
        Path(building).unlink(missing_ok=True)
    return seconds


def _load(path: Path) -> ctypes.CDLL:
    """The library at `path`; where its folder may not map code (a noexec mount), a private temporary copy
    of it (raises OSError when that fails too: the file itself is bad)."""
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        folder = tempfile.mkdtemp(prefix="idefics2-ckernels-")
        try:
            return ctypes.CDLL(shutil.copy(path, folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the loaded library stays mapped


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` between processes, waited for at most LOCK_WAIT_S (none where fcntl is
    missing, the folder is read-only or its file system has no locks)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        lock = open(folder / ".lock", "a")  # held open while the caller's block runs
    except OSError:  # a read-only folder: nothing is built there
        yield
        return
    with lock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:  # its holder is stuck (stopped, hung): go on without it
                    warnings.warn(
                        f"C kernels: waited {LOCK_WAIT_S:.0f} s for another process's build in {folder}; "
                        "building without waiting",
                        stacklevel=3,
                    )
                    break
                time.sleep(0.05)
            except OSError:  # no locks on this file system (some network mounts): go on without
                break
        yield


def _prune(folder: Path, keep: Path, most: int = CACHED_LIBRARIES) -> None:
    """Delete all but the `most` most recently used libraries of `folder` (`keep` stays), and the leftovers of
    builds that a process did not finish (killed while compiling) once they are older than any build runs."""
    used, stale = {}, time.time() - 2 * LOCK_WAIT_S
    for library_file in folder.glob("ckernels-*.so"):
        with contextlib.suppress(OSError):
            used[library_file] = library_file.stat().st_mtime
    leftovers = []
    for building in folder.glob(".building-*.so"):
        with contextlib.suppress(OSError):
            if building.stat().st_mtime < stale:
                leftovers.append(building)
    for old in [p for p in sorted(used, key=used.get, reverse=True) if p != keep][most - 1 :] + leftovers:
        with contextlib.suppress(OSError):
            old.unlink()


def _build_privately(command: list[str]) -> tuple[ctypes.CDLL, str]:
    """Compile into a temporary folder of this process's own, load, delete the folder."""
    folder = tempfile.mkdtemp(prefix="idefics2-ckernels-")
    target = os.path.join(folder, "ckernels.so")
    try:
        seconds = _compile(command, target)
        return ctypes.CDLL(target), f"built in {seconds:.1f} s for this process only (no cache)"
    except OSError as error:
        raise CKernelsUnavailable(f"{command[0]}: {error}") from error
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the loaded library stays mapped


def _compile(command: list[str], target: str) -> float:
    """Build the library at `target`; the seconds it took."""
    start = time.perf_counter()
    try:
        built = subprocess.run(
            [*command, str(SOURCE), "-o", target, "-lm"], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise CKernelsUnavailable(f"{command[0]}: {error}") from error
    if built.returncode != 0:
        raise CKernelsUnavailable(f"{command[0]} failed: {built.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def _declare(lib: ctypes.CDLL) -> None:
    """The argument types of the library's functions."""
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.idefics2_linear.argtypes = [pointer] * 5 + [size] * 3 + [flag] * 4
    lib.idefics2_gated.argtypes = [pointer] * 6 + [size] * 3 + [flag] * 4
    lib.idefics2_rms_norm.argtypes = [pointer] * 3 + [size] * 2 + [ctypes.c_float, flag]
    lib.idefics2_attention.argtypes = [pointer] * 5 + [size] * 12 + [ctypes.c_float, flag, flag]
    lib.idefics2_rope_store.argtypes = [pointer] * 9 + [size] * 10 + [flag]
    lib.idefics2_linear_int4.argtypes = [pointer] * 5 + [size] * 4 + [flag] * 3
    lib.idefics2_gated_int4.argtypes = [pointer] * 6 + [size] * 4 + [flag] * 3
    lib.idefics2_dequantize_int4.argtypes = [pointer] * 4 + [size] * 3 + [flag] * 2
    lib.idefics2_decoder_step.argtypes = (
        [pointer, size, pointer]
        + [size] * 6
        + [pointer] * 6
        + [size] * 7
        + [pointer]
        + [ctypes.c_float] * 2
        + [flag] * 3
    )
    lib.idefics2_decode_tokens.argtypes = [pointer] * 3 + [size] + [pointer] * 3 + [size, pointer, flag]
    lib.idefics2_step_clock.argtypes = [pointer]
    lib.idefics2_screen_counts.argtypes = [pointer]
    lib.idefics2_split_bf16.argtypes = [pointer] * 3 + [size, flag]
    lib.idefics2_fingerprint.argtypes = [pointer, size, flag]
    lib.idefics2_fingerprint.restype = ctypes.c_uint64


def available() -> bool:
    """Whether the kernels build and load here."""
    return _loaded()[0] is not None


def supports(x: torch.Tensor, weight: torch.Tensor, act: str | None) -> bool:
    """Whether `linear` / `gated` compute this product: CPU tensors, float32 or bfloat16 activations with
    weights of the same dtype, int8 or int4 (uint8, `gated` only), a fusable activation, at most MAX_ROWS
    rows."""
    return (
        x.is_cpu
        and x.dtype in DTYPES
        and weight.dtype in (x.dtype, torch.int8, torch.uint8)
        and act in ACTIVATIONS
        and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
    )


class _Address:
    """A tensor passed to a C function by address (ctypes reads `_as_parameter_`): it holds the tensor it
    points into, so a converted or contiguous copy lives until the call returns (an address alone would let
    the copy be freed before C reads it)."""

    __slots__ = ("_as_parameter_", "tensor")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self._as_parameter_ = ctypes.c_void_p(tensor.data_ptr())


def _pointer(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> _Address | None:
    """t's data for a C call's argument, made contiguous (and of `dtype`) first where it is not: weights and
    scales already are, so a call copies nothing but what a caller passed in another layout."""
    if t is None:
        return None
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return _Address(t if t.is_contiguous() else t.contiguous())


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    act: str | None = None,
) -> torch.Tensor:
    """act(x @ weight.T * scales + bias): x (..., K) float32 or bfloat16, weight (N, K) in x's dtype or int8
    (then with float32 scales (N)), bias (N) in x's dtype -> (..., N) in x's dtype."""
    n, k = weight.shape
    x = x if x.is_contiguous() else x.contiguous()
    out = x.new_empty((*x.shape[:-1], n))
    library().idefics2_linear(
        x.data_ptr(), _pointer(weight), _pointer(scales, torch.float32), _pointer(bias, x.dtype),
        out.data_ptr(), x.numel() // k, n, k, _TYPES[x.dtype], _TYPES[weight.dtype], ACTIVATIONS[act],
        torch.get_num_threads(),
    )  # fmt: skip
    return out


INT4_GROUP_MULTIPLE = 32  # int4 groups whole vector steps of the widest build (2 x 16 columns)


def linear_int4(
    x: torch.Tensor,
    nibbles: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    act: str | None = None,
) -> torch.Tensor:
    """act(x @ W.T + bias) for an int4 weight W (N, K) in the portable layout: nibbles (N, K / 2) uint8 (even
    columns in the high nibble, value q - 8), scales (N, K / group_size) float32, group_size a multiple of
    INT4_GROUP_MULTIPLE; x (..., K) float32 or bfloat16 -> (..., N) in x's dtype."""
    n, k = nibbles.shape[0], nibbles.shape[1] * 2
    x = x if x.is_contiguous() else x.contiguous()
    out = x.new_empty((*x.shape[:-1], n))
    failed = library().idefics2_linear_int4(
        x.data_ptr(), _pointer(nibbles), _pointer(scales, torch.float32), _pointer(bias, x.dtype),
        out.data_ptr(), x.numel() // k, n, k, group_size, _TYPES[x.dtype], ACTIVATIONS[act],
        torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("C int4 product: out of memory for its activation buffer")
    return out


def dequantize_int4(
    nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """The float weight (N, K) of int4 rows into `out` (float32 or bfloat16, contiguous): nibbles (N, K / 2)
    uint8 in the portable layout, scales and zeros (None: none) (N, groups), any float dtype (read as
    float32); (q - 8) * scale + zero, each step in float32, as quantization.formats.dequantize_int4."""
    n, k = nibbles.shape[0], nibbles.shape[1] * 2
    if out.shape != (n, k) or not out.is_contiguous() or out.dtype not in DTYPES:
        raise ValueError(f"dequantize_int4: out must be contiguous ({n}, {k}) float32 or bfloat16")
    library().idefics2_dequantize_int4(
        _pointer(nibbles), _pointer(scales, torch.float32), _pointer(zeros, torch.float32), out.data_ptr(),
        n, k, k // scales.shape[1], _TYPES[out.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return out


def gated(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: str,
    gate_scales: torch.Tensor | None = None,
    up_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x @ gate.T * gate_scales) * (x @ up.T * up_scales), both weights (N, K) of one dtype: float, int8
    (float32 scales (N)) or int4 (uint8 (N, K / 2) in the portable layout, float32 scales (N, groups))."""
    n = gate.shape[0]
    x = x if x.is_contiguous() else x.contiguous()
    out = x.new_empty((*x.shape[:-1], n))
    k = x.shape[-1]
    if gate.dtype == torch.uint8:  # int4: the group size follows from the scales' shape
        failed = library().idefics2_gated_int4(
            x.data_ptr(), _pointer(gate), _pointer(gate_scales, torch.float32), _pointer(up),
            _pointer(up_scales, torch.float32), out.data_ptr(), x.numel() // k, n, k,
            k // gate_scales.shape[1], _TYPES[x.dtype], ACTIVATIONS[act], torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError("C int4 product: out of memory for its activation buffer")
        return out
    library().idefics2_gated(
        x.data_ptr(), _pointer(gate), _pointer(gate_scales, torch.float32), _pointer(up),
        _pointer(up_scales, torch.float32), out.data_ptr(), x.numel() // k, n, k, _TYPES[x.dtype],
        _TYPES[gate.dtype], ACTIVATIONS[act], torch.get_num_threads(),
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last axis, the normalized x rounded to x's dtype before the weight
    multiplies it (RMSNorm's order): x (..., D) and weight (D) float32 or bfloat16 of one dtype."""
    x = x if x.is_contiguous() else x.contiguous()
    out = torch.empty_like(x)
    width = x.shape[-1]
    library().idefics2_rms_norm(
        x.data_ptr(), _pointer(weight), out.data_ptr(), x.numel() // width, width, eps, _TYPES[x.dtype]
    )
    return out


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys the mask allows, with grouped kv heads: q (B, H, T, D); k, v
    (B, Hkv, S, D), any strides but a contiguous last axis (cache views); mask bool, broadcastable to
    (B, 1, T, S). Returns (B, H, T, D) (a transposed view of a (B, T, H, D) tensor)."""
    b, h, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    queries = q.contiguous()
    allowed = mask.expand(b, 1, t, s).to(torch.uint8).contiguous()
    out = torch.empty(b, t, h, d, dtype=q.dtype)
    failed = library().idefics2_attention(
        queries.data_ptr(), k.data_ptr(), v.data_ptr(), allowed.data_ptr(), out.data_ptr(), b, h, kv_heads, t,
        s, d, *k.stride()[:3], *v.stride()[:3], scale, _TYPES[q.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("C attention: out of memory for its score buffers")
    return out.transpose(1, 2)


def rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """A decode step's rotary embedding and cache write (one token per row): q (B, 1, H * D), k and v
    (B, 1, Hkv * D) as the projections give them; cos and signed_sin (B, 1, D) (modeling.text.RotaryTable);
    keys and values (B, Hkv, L, D) cache buffers whose row b takes its token at slots[b]. Writes the rotated
    keys and the values there; returns the rotated queries (B, H, 1, D)."""
    b, kv_heads, _, d = keys.shape
    heads = q.shape[-1] // d
    q, k, v, cos, signed_sin = (t.contiguous() for t in (q, k, v, cos, signed_sin))  # views: no copies
    slots = slots.to(torch.int64)
    slots = slots if slots.is_contiguous() else slots.contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("rope_store writes cache buffers whose last axis is contiguous")
    out = q.new_empty((b, heads, 1, d))
    library().idefics2_rope_store(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(),
        keys.data_ptr(), values.data_ptr(), slots.data_ptr(), b, heads, kv_heads, d, *keys.stride()[:3],
        *values.stride()[:3], _TYPES[q.dtype],
    )  # fmt: skip
    return out


class _Weight(ctypes.Structure):  # weight_ref in ckernels.c
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("type", ctypes.c_int64),
        ("group", ctypes.c_int64),
    ]


def _point(ref: _Weight, weight: torch.Tensor, scales: torch.Tensor | None) -> None:
    """Point `ref` at a contiguous weight and its float32 scales (or None), which must outlive it."""
    ref.data, ref.scales = weight.data_ptr(), None if scales is None else scales.data_ptr()
    if weight.dtype == torch.uint8:  # int4: the group size follows from the scales' shape
        ref.type, ref.group = 3, weight.shape[1] * 2 // scales.shape[1]
    else:
        ref.type, ref.group = _TYPES[weight.dtype], 0


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # a decoder layer's weights, in layer_ref's order


class _Layer(ctypes.Structure):  # layer_ref in ckernels.c
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        *((name, _Weight) for name in PROJECTIONS),
    ]


Operands = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]  # a norm weight, or (weight, scales)


class DecoderLayers:
    """The decoder layers' weights as `decoder_step` reads them: per layer its two norm weights and, for each
    of PROJECTIONS, the operands that `linear` / `linear_int4` take ((weight, None) for float weights of the
    activations' dtype, (int8 weight, float32 scales (N)), or (int4 nibbles (N, K / 2) in the portable
    layout, float32 scales (N, groups))). Keeps their storages alive while it lives."""

    def __init__(self, layers: list[dict[str, Operands]], key: tuple = ()) -> None:
        self.tensors: list[torch.Tensor] = []  # what the C step reads (contiguous, scales in float32)
        given = (t for layer in layers for v in layer.values() for t in (v if isinstance(v, tuple) else (v,)))
        self.sources = [t for t in given if t is not None]  # as given (kept ones can be copies): to watch
        self.array = (_Layer * len(layers))()
        self.inner = layers[0]["gate"][0].shape[0] if layers else 0  # the MLP's inner width
        for entry, layer in zip(self.array, layers, strict=True):
            entry.input_norm = self._keep(layer["input_norm"]).data_ptr()
            entry.post_norm = self._keep(layer["post_norm"]).data_ptr()
            for name in PROJECTIONS:
                weight, scales = layer[name]
                _point(getattr(entry, name), self._keep(weight), self._keep(scales, torch.float32))
        kinds = sorted({kind(*layer[name]) for layer in layers for name in PROJECTIONS})
        self.key = (*key, len(layers), *kinds)  # for kernels.choose: the shapes and weight formats

    def _keep(self, t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.to(dtype or t.dtype).contiguous().detach()  # holds this storage, whatever `.data = ` does later
        self.tensors.append(t)
        return t

    def __len__(self) -> int:
        return len(self.array)


def kind(weight: torch.Tensor, scales: torch.Tensor | None = None) -> str:
    """A weight's format as DecoderLayers.key names it: "float32", "bfloat16", "int8" or "int4g<group>"."""
    if weight.dtype == torch.uint8:
        return f"int4g{weight.shape[1] * 2 // scales.shape[1]}"
    return str(weight.dtype).removeprefix("torch.")


def decoder_step(
    layers: DecoderLayers,
    x: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    heads: int,
    eps: float,
    act: str,
    final_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every decoder layer of a decode step (one token per row) in one call: x (B, 1, D) float32 or bfloat16
    -> (B, 1, D), the layers' output. cos and signed_sin (B, 1, hd) (modeling.text.RotaryTable); slots (B) the
    cache slot each row's token goes to; mask bool (B, 1, 1, S) over the slots attention reads; keys[l] and
    values[l] the layer's cache buffers (B, Hkv, L >= S, hd), all with the same strides, written at the
    slots. The weights are `layers`' (dtype: x's for float weights). `final_norm` (D) in x's dtype: the
    decoder's last RMSNorm weight, applied to the output (with `eps`) in the same call."""
    b, _, dim = x.shape
    kv_heads, head_dim = keys[0].shape[1], keys[0].shape[3]
    if len(keys) != len(layers) or len(values) != len(layers):
        raise ValueError(f"decoder_step: {len(layers)} layers, {len(keys)} keys, {len(values)} values")
    if any(t.stride() != keys[0].stride() for t in (*keys, *values)) or keys[0].stride(-1) != 1:
        raise ValueError("decoder_step: every cache buffer has one layout with its last axis contiguous")
    allowed = mask.reshape(b, -1).contiguous().view(torch.uint8)  # bool: one byte each, 0 or 1
    if allowed.shape[1] > keys[0].shape[2] or b > keys[0].shape[0]:
        raise ValueError(f"decoder_step: {b} rows, {allowed.shape[1]} slots; cache {tuple(keys[0].shape)}")
    out = x.contiguous().clone()
    cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
    slots = slots.to(torch.int64).contiguous()
    key_pointers = (ctypes.c_void_p * len(keys))(*(t.data_ptr() for t in keys))
    value_pointers = (ctypes.c_void_p * len(values))(*(t.data_ptr() for t in values))
    failed = library().idefics2_decoder_step(
        ctypes.addressof(layers.array), len(layers), out.data_ptr(), b, dim, heads, kv_heads, head_dim,
        layers.inner, cos.data_ptr(), signed_sin.data_ptr(), slots.data_ptr(), allowed.data_ptr(),
        key_pointers, value_pointers, allowed.shape[1], *keys[0].stride()[:3], *values[0].stride()[:3],
        _pointer(final_norm, x.dtype), eps, head_dim**-0.5, _TYPES[x.dtype], ACTIVATIONS[act],
        torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("C decoder step: out of memory for its buffers")
    return out


class _DecodeModel(ctypes.Structure):  # decode_model in ckernels.c
    _fields_ = [
        ("layers", ctypes.c_void_p),
        ("n_layers", ctypes.c_int64),
        ("embedding", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("vocab_in", "D", "H", "Hkv", "hd", "I")),
        ("cos_table", ctypes.c_void_p),
        ("sin_table", ctypes.c_void_p),
        ("window", ctypes.c_int64),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("key_batch", "key_head", "key_slot")),
        *((name, ctypes.c_int64) for name in ("value_batch", "value_head", "value_slot")),
        ("final_norm", ctypes.c_void_p),
        ("head", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("vocab", "io_type", "act")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class _Screen(ctypes.Structure):  # head_screen in ckernels.c
    _fields_ = [
        ("q", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("bounds", ctypes.c_void_p),
        ("most", ctypes.c_int64),
    ]


SCREEN_MOST = 1024  # candidates a row may have before the whole head decides its greedy token


class HeadScreen:
    """What a greedy decode step reads instead of a float head (V, D), float32 or bfloat16: an int8 copy
    (each row rounded to nearest on its own scale, max |w| / 127) and, per row, |w - s q|, s |q| and |w|
    (2-norms, computed in float64, rounded up to float32), from which `DecodeCall.argmax` bounds how far the
    int8 product can be from the float one (ckernels.c, screened_argmax). A quarter of a float32 head's
    bytes, half a bfloat16 one's."""

    def __init__(self, weight: torch.Tensor, most: int = SCREEN_MOST) -> None:
        vocab, dim = weight.shape
        self.q = torch.empty(vocab, dim, dtype=torch.int8)
        self.scales = torch.empty(vocab, dtype=torch.float32)
        self.bounds = torch.empty(vocab, 3, dtype=torch.float32)
        block = max(1, 2**20 // max(dim, 1))  # rows at a time: float64 copies of 8 MiB each
        for start in range(0, vocab, block):
            rows = slice(start, start + block)
            w = weight[rows].double()
            scales = (w.abs().amax(dim=1) / 127).float()
            scales = torch.where((scales > 0) & scales.isfinite(), scales, torch.ones_like(scales))
            q = torch.round(w.nan_to_num() / scales.double()[:, None]).clamp_(-127, 127)
            error = w - scales.double()[:, None] * q  # NaN or inf where w is: such a head is never screened
            self.q[rows] = q.to(torch.int8)
            self.scales[rows] = scales
            norms = torch.stack(
                [error.norm(dim=1), scales.double() * q.norm(dim=1), w.norm(dim=1)], dim=1
            )  # (rows, 3)
            self.bounds[rows] = _rounded_up(norms)
        self.ref = _Screen(self.q.data_ptr(), self.scales.data_ptr(), self.bounds.data_ptr(), most)


def _rounded_up(t: torch.Tensor) -> torch.Tensor:
    """float64 -> the float32 values at or above it (NaN stays NaN)."""
    low = t.float()
    return torch.where(low.double() < t, torch.nextafter(low, torch.tensor(float("inf"))), low)


def fingerprint(t: torch.Tensor) -> int:
    """A 64-bit hash of a contiguous CPU tensor's bytes (order matters: rows swapped give another hash), read
    at the memory's rate."""
    flat = t.contiguous().view(-1).view(torch.uint8)
    return int(library().idefics2_fingerprint(flat.data_ptr(), flat.numel(), torch.get_num_threads()))


def screen_counts() -> tuple[int, int, int]:
    """Rows whose greedy token `DecodeCall.argmax` screened, the candidates it then computed in all, and the
    rows whose whole head product decided (no finite bound, or too many candidates), since the library
    loaded."""
    counts = (ctypes.c_int64 * 3)()
    library().idefics2_screen_counts(counts)
    return counts[0], counts[1], counts[2]


class DecodeCall:
    """A whole decode step in one C call, token ids to logits, prepared once for one set of cache rows:
    `call(tokens, positions)` gives row b's token tokens[b] at position positions[b] (also its cache slot),
    attending over its slots up to it (the last `window` of them when window is set), and returns the logits
    (B, V) float32: what `decoder_step`, the final norm and `linear` / `linear_int4` by the head give,
    widened. Everything but the tokens and positions is checked and converted here, so a call costs little
    Python. `embedding` (V_in, D), the rotary tables (cos, signed sin (T, hd), as modeling.text.RotaryTable
    holds them) and `final_norm` (D) are in the activations' dtype (float32 or bfloat16); `layers`, `keys`,
    `values` as `decoder_step` takes them (a call gives one token for each of their B rows); `head` the
    head's operands ((V, D) weight in the activations' dtype, int8 with scales, or int4 in the portable
    layout). Keeps the storages it reads alive."""

    def __init__(
        self,
        layers: DecoderLayers,
        embedding: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        window: int | None,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        heads: int,
        eps: float,
        act: str,
        final_norm: torch.Tensor,
        head: tuple[torch.Tensor, torch.Tensor | None],
    ) -> None:
        dtype, (vocab_in, dim) = embedding.dtype, embedding.shape
        cos, sin = rotary
        rows, kv_heads, length, head_dim = keys[0].shape
        if not len(keys) == len(values) == len(layers):
            raise ValueError(f"DecodeCall: {len(layers)} layers, {len(keys)} keys, {len(values)} values")
        if any(t.stride() != keys[0].stride() for t in (*keys, *values)) or keys[0].stride(-1) != 1:
            raise ValueError("DecodeCall: every cache buffer has one layout with its last axis contiguous")
        weights = (embedding, cos, sin, final_norm)
        if any(t.dtype != dtype or not t.is_contiguous() for t in weights) or dtype not in DTYPES:
            raise ValueError("DecodeCall: embedding, rotary tables and final norm contiguous, of one dtype")
        head_weight = head[0].contiguous()
        head_scales = None if head[1] is None else head[1].float().contiguous()
        self.head_ref = _Weight()
        _point(self.head_ref, head_weight, head_scales)
        # the storages read, held (detached: a parameter given new storage later leaves this one alive)
        read = (*weights, head_weight, head_scales, *keys, *values)
        self.kept = (layers, *(t.detach() for t in read if t is not None))
        self.dtype, self.head_weight = dtype, head_weight  # (argmax screens float heads of this dtype)
        self.rows, self.vocab, self.vocab_in = rows, head_weight.shape[0], vocab_in
        self.positions = min(cos.shape[0], length)  # a row's position is below this
        self.key_pointers = (ctypes.c_void_p * len(keys))(*(t.data_ptr() for t in keys))
        self.value_pointers = (ctypes.c_void_p * len(values))(*(t.data_ptr() for t in values))
        self.plan = _DecodeModel(
            ctypes.addressof(layers.array), len(layers), embedding.data_ptr(), vocab_in, dim, heads, kv_heads,
            head_dim, layers.inner, cos.data_ptr(), sin.data_ptr(), window or 0,
            ctypes.addressof(self.key_pointers), ctypes.addressof(self.value_pointers),
            *keys[0].stride()[:3], *values[0].stride()[:3], final_norm.data_ptr(),
            ctypes.addressof(self.head_ref), self.vocab, _TYPES[dtype], ACTIVATIONS[act], eps, head_dim**-0.5,
        )  # fmt: skip
        self.plan_address = ctypes.addressof(self.plan)
        # what every call passes, made once: the rows' tokens, positions and greedy tokens, and argmax's
        # logits without a screen (made at its first such call)
        self.tokens, self.slots, self.chosen = ((ctypes.c_int64 * rows)() for _ in range(3))
        self.greedy_logits: torch.Tensor | None = None
        self.excluded: tuple = (None, None, 0)  # argmax's last excluded ids, as given and as its C table
        self.function = library().idefics2_decode_tokens

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        logits = torch.empty(len(tokens), self.vocab)
        self._run(tokens, positions, logits.data_ptr())
        return logits

    def argmax(
        self,
        tokens: list[int],
        positions: list[int],
        screen: HeadScreen | None,
        excluded: list[list[int]] | None = None,
    ) -> list[int]:
        """The same step's greedy tokens: for each row the index of its largest logit (the first of equal
        ones; the first NaN where the logits hold one), as `first_largest` of `call(tokens, positions)` gives
        with row b's `excluded[b]` ids set to -inf (a minimum length's end tokens). Given a `screen` (the
        head's int8 copy; a float head of the activations' dtype), found by reading it and computing exactly
        only the logits that could be the largest; without one, picked in C from the whole logits (any head),
        so that no logits come back to Python."""
        if excluded and len(excluded) != len(tokens):
            raise ValueError(
                f"DecodeCall.argmax: {len(excluded)} lists of held-back ids for {len(tokens)} rows"
            )
        if excluded != self.excluded[0]:  # (the same ids step after step, as a minimum length holds them)
            width = max(map(len, excluded)) if excluded else 0
            flat = [i for ids in (excluded if width else ()) for i in (*ids, *[-1] * (width - len(ids)))]
            table = (ctypes.c_int64 * len(flat))(*flat) if flat else None  # (B, width), -1: no id
            self.excluded = ([list(ids) for ids in excluded] if excluded else excluded, table, width)
        _, table, width = self.excluded
        if screen is None:
            if self.greedy_logits is None:
                self.greedy_logits = torch.empty(self.rows, self.vocab)
            self._run(tokens, positions, self.greedy_logits.data_ptr(), None, table, width, self.chosen)
        else:
            self._run(tokens, positions, None, ctypes.addressof(screen.ref), table, width, self.chosen)
        return self.chosen[:]

    def _run(self, tokens, positions, logits, screen=None, excluded=None, width=0, chosen=None) -> None:
        b = len(tokens)
        if b != self.rows or len(positions) != b or min(positions) < 0 or max(positions) >= self.positions:
            raise ValueError(f"DecodeCall: {b} rows at {positions}: outside the cache or the rotary table")
        self.tokens[:], self.slots[:] = tokens, positions
        threads = torch.get_num_threads()
        failed = self.function(self.plan_address, self.tokens, self.slots, b, logits, screen, excluded, width,
                               chosen, threads)  # fmt: skip
        if failed == 2:
            raise IndexError(f"DecodeCall: a token id of {tokens} is outside the embedding's {self.vocab_in}")
        if failed == 3:
            raise ValueError("DecodeCall.argmax: a screen needs a float head of the activations' dtype")
        if failed:
            raise MemoryError("C decode step: out of memory for its buffers")


def step_clock() -> tuple[float, float]:
    """Seconds that `decoder_step` calls of this process spent in weight products and in attention, in all
    (what a profiler cannot see inside the call; the decode overhead benchmark reads it)."""
    seconds = (ctypes.c_double * 2)()
    library().idefics2_step_clock(seconds)
    return seconds[0], seconds[1]
