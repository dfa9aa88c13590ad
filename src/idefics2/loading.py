"""Checkpoint loading and saving: safetensors only, memory-mapped, strict about names and shapes.

Loading builds the module on the meta device (no allocation), memory-maps each safetensors file
copy-on-write and assigns the mapped tensors as parameters, so weights are read from disk only when used
and peak memory stays near the size of the weights. Pickle-based checkpoints are refused, never unpickled.

Quantized loading: layers stored quantized (compressed-tensors' pack-quantized, which save_pretrained
writes; AutoAWQ's; our older "idefics2" format) get their tensors converted to the portable form (the older
format's as they are); float layers chosen for quantization are quantized one tensor at a time, each float
tensor's pages dropped right after, so peak memory stays near the quantized size.

This module builds on idefics2.config, idefics2.hub and idefics2.quantization, never on the model: the
model class passes itself in (`Idefics2ForConditionalGeneration.from_pretrained` calls load_pretrained).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idefics2.config import Idefics2Config
from idefics2.hub import CheckpointError, read_json, resolve_checkpoint
from idefics2.quantization import (
    PARTS,
    QuantizationSpec,
    QuantizedLinear,
    config_entry,
    quantized_layers,
    stored_quantization,
    target_layers,
)
from idefics2.quantization.convert import (
    COMPRESSED_TENSORS,
    LEGACY_FORMAT,
    StoredQuantization,
    empty_quantized,
    replace_module,
    saved_quantized,
    saved_tensors,
)
from idefics2.quantization.formats import awq_to_int4, from_compressed, quantize_int4, quantize_int8

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# the safetensors header's dtype names, as torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_CHUNK_BYTES = 16 * 2**20  # conversion granularity when loading with another dtype or device
_EXTRA_LAYERS_REPORTED = 64  # missing layers beyond this many are refused before the model is built


# ---- reading ---------------------------------------------------------------------------------------------


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class MappedSafetensors:
    """A safetensors file memory-mapped copy-on-write; `.tensors` are views of the mapping (nothing is read).

    Every header entry is validated (dtype, shape, offsets inside the file and tiling the data exactly), so a
    truncated or corrupted file gives a CheckpointError naming the file instead of garbage or a crash.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        size = path.stat().st_size

        def corrupted(why: str) -> CheckpointError:
            return CheckpointError(
                f"{path} is not a valid safetensors file ({why}); the file may be corrupted or "
                f"truncated: download or save it again"
            )

        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise corrupted(f"only {size} bytes")
            header_len = int.from_bytes(prefix, "little")
            # a zip (torch.save) or a pickle; a safetensors header length can start with these bytes too, but
            # its header then starts with "{"
            if (prefix[:2] == b"PK" or prefix[:1] == b"\x80") and not (
                header_len <= size - 8 and f.read(1) == b"{"
            ):
                raise CheckpointError(f"{path} is a pickle/PyTorch file renamed as safetensors; refusing it")
            f.seek(8)
            if header_len > size - 8:
                raise corrupted(f"header length {header_len} exceeds the file size {size}")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise corrupted(f"unreadable header: {error}") from None
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if not isinstance(header, dict):
            raise corrupted("header is not a JSON object")
        header.pop("__metadata__", None)
        data_start, data_len = 8 + header_len, size - 8 - header_len

        entries = []
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise corrupted(f"bad header entry for {name!r}: {info!r}") from None
            if any(d < 0 for d in shape) or not 0 <= start <= end <= data_len:
                raise corrupted(f"tensor {name!r} lies outside the data (bytes {start}..{end} of {data_len})")
            if end - start != math.prod(shape) * _itemsize(dtype):
                raise corrupted(f"tensor {name!r} of shape {shape} ({info['dtype']}) has {end - start} bytes")
            entries.append((data_start + start, data_start + end, name, dtype, shape))
        entries.sort()
        position = data_start
        for start, end, name, _, _ in entries:
            if start != position:
                raise corrupted(f"tensor {name!r} starts at byte {start}, expected {position}")
            position = end
        if position != size:
            raise corrupted(f"the tensors end at byte {position} of {size}")

        raw = torch.frombuffer(self._mmap, dtype=torch.uint8)  # the whole file, shares the mapping
        self.tensors: dict[str, torch.Tensor] = {}
        self._spans: dict[str, tuple[int, int]] = {}
        for start, end, name, dtype, shape in entries:
            chunk = raw[start:end]
            if start % _itemsize(dtype):  # misaligned for its dtype (the format allows it): copy it
                chunk = chunk.clone()
            self.tensors[name] = chunk.view(dtype).reshape(shape)
            self._spans[name] = (start, end)

    def converted(self, name: str, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        """Tensor `name` as `dtype` on `device`: the mapped view itself when nothing changes, otherwise a copy
        made in chunks whose mapped pages are dropped as soon as they are copied (peak memory ~ one copy).
        """
        tensor = self.tensors[name]
        out_device = tensor.device if device is None else torch.device(device)
        if tensor.dtype == dtype and tensor.device == out_device:
            return tensor
        out = torch.empty(tensor.shape, dtype=dtype, device=out_device)
        src, dst = tensor.reshape(-1), out.view(-1)
        step = max(1, _CHUNK_BYTES // tensor.element_size())
        start = self._spans[name][0]
        for i in range(0, src.numel(), step):
            dst[i : i + step].copy_(src[i : i + step])
            chunk_start = start + i * tensor.element_size()
            self._release(chunk_start, chunk_start + min(step, src.numel() - i) * tensor.element_size())
        return out

    def release(self, name: str) -> None:
        """Drop the resident pages of tensor `name` (once it has been copied or quantized)."""
        self._release(*self._spans[name])

    def _release(self, start: int, end: int) -> None:
        """Drop the resident pages lying wholly inside bytes [start, end) of the file.

        The mapping is private and these pages unmodified, so this only frees memory: reading them again
        would fetch them from the file.
        """
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, memory-mapped (see MappedSafetensors)."""
    return MappedSafetensors(path).tensors


def checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, for sharded checkpoints, the index's weight map."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path, what="safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(shard, str) and shard and Path(shard).name == shard for shard in weight_map.values()
        ):
            raise CheckpointError(
                f"{index_path} is not a valid safetensors index: its weight_map must map tensor names to "
                "shard file names in the same folder"
            )
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index_path} lists shard files that are missing from {folder}: {missing}")
        return [folder / s for s in shards], weight_map
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], None
    pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise CheckpointError(
            f"{folder} only has pickle-based weights ({', '.join(pickled)}). Pickle files can run arbitrary "
            f"code when loaded, so they are refused and never unpickled; convert the checkpoint to "
            f"safetensors ({SINGLE_FILE} or sharded with {INDEX_FILE})"
        )
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def _describe(problems: list[str], title: str, limit: int = 25) -> list[str]:
    if not problems:
        return []
    shown = problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
    return [f"{title} ({len(problems)}):"] + [f"  {p}" for p in shown]


def resolve_dtype(dtype: torch.dtype | str | None, config: Idefics2Config) -> torch.dtype:
    """None -> float32; "auto" -> the config's torch_dtype (float32 when unset); names like "bfloat16"."""
    if dtype is None:
        return torch.float32
    given = dtype
    if isinstance(dtype, str) and dtype == "auto":
        dtype = given = config.torch_dtype or "float32"
        if not isinstance(getattr(torch, given.removeprefix("torch."), None), torch.dtype):
            raise ValueError(f"config.json's torch_dtype {given!r} is not a torch dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, its name, or 'auto'; got {given!r}")
    return dtype


def check_device(device: torch.device | str | None) -> None:
    """A ValueError naming the problem for a device that is misspelled or absent from this machine."""
    if device is None:
        return
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device torch knows ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: no CUDA GPU is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )


def load_pretrained(
    build: Callable[[Idefics2Config], nn.Module],
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    quantization: QuantizationSpec | None = None,
) -> nn.Module:
    """`build(config)` on the meta device, given the checkpoint's memory-mapped tensors.

    `quantization`: quantize these parts of a float checkpoint while loading. A checkpoint stored quantized
    (config.json's `quantization_config`: compressed-tensors pack-quantized, AutoAWQ GEMM, or our older
    format) loads quantized whatever is asked, as long as the bits agree.
    """
    check_device(device)
    folder = resolve_checkpoint(path_or_repo_id, revision=revision)
    config = Idefics2Config.from_pretrained(folder)
    target_dtype = resolve_dtype(dtype, config)
    stored = stored_quantization(config.extra.get("quantization_config"))
    if stored is not None and quantization is not None and stored.bits != quantization.bits:
        raise ValueError(
            f"the checkpoint in {folder} holds int{stored.bits} weights and cannot be loaded as "
            f"int{quantization.bits}; load its float checkpoint to quantize it another way"
        )
    files, weight_map = checkpoint_files(folder)

    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, MappedSafetensors] = {}
    problems_dup, problems_index = [], []
    for file in files:
        mapped = MappedSafetensors(file)
        for name, tensor in mapped.tensors.items():
            if name in tensors:
                problems_dup.append(f"{name} (again in {file.name})")
            tensors[name], source[name] = tensor, mapped
            if weight_map is not None and weight_map.get(name) not in (None, file.name):
                problems_index.append(f"{name}: index says {weight_map[name]}, found in {file.name}")
    if weight_map is not None:
        problems_index += [
            f"{name}: listed in {INDEX_FILE} but not in {shard}"
            for name, shard in weight_map.items()
            if name not in tensors
        ]

    _check_layer_counts(config, tensors, folder)
    try:
        with torch.device("meta"):
            model = build(config)
    except (RuntimeError, OverflowError, TypeError) as error:  # sizes whose products overflow int64
        raise CheckpointError(
            f"the model config.json in {folder} describes cannot be built: its sizes make a tensor too large "
            f"({type(error).__name__})"
        ) from None
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()

    # the layers that end up quantized, and the names and shapes the checkpoint must have for them
    if stored is not None:
        suffix = ".weight_packed" if stored.method == COMPRESSED_TENSORS else ".qweight"
        layers = sorted({name.removesuffix(suffix) for name in tensors if name.endswith(suffix)})
        spec = QuantizationSpec(stored.bits, stored.group_size or 128, _parts_of(layers))
    elif quantization is not None:
        layers, spec = target_layers(model, quantization.parts, config.tie_word_embeddings), quantization
    else:
        layers, spec = [], None
    float_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    modules = dict(model.named_modules())
    not_linear = [name for name in layers if not isinstance(modules.get(name), nn.Linear)]
    if not_linear:
        raise CheckpointError(
            f"the checkpoint in {folder} has quantized tensors for {', '.join(not_linear[:5])}, but the "
            f"model its config.json describes has no linear layer there"
        )
    scale_dtype = torch.float16 if stored is not None and stored.method == "awq" else torch.bfloat16
    zero_points = stored is not None and stored.method != COMPRESSED_TENSORS and stored.bits == 4
    expected = dict(float_shapes)
    for name in layers:
        linear, group = modules[name], None
        if stored is not None and stored.method == COMPRESSED_TENSORS:
            group, scale_dtype = _compressed_group(linear, tensors.get(f"{name}.weight_scale"))
        layer = empty_quantized(
            linear, spec, group, dtype=target_dtype, scale_dtype=scale_dtype, zero_points=zero_points
        )
        replace_module(model, name, layer)
        del expected[f"{name}.weight"]
        expected.update({f"{name}.{key}": shape for key, shape in _stored_shapes(layer, stored).items()})

    missing = sorted(n for n in expected if n not in tensors and n not in optional)
    unexpected = sorted(n for n in tensors if n not in expected)
    mismatched = sorted(
        f"{n}: checkpoint {tuple(tensors[n].shape)}, model {expected[n]}"
        for n in expected
        if n in tensors and tuple(tensors[n].shape) != expected[n]
    )
    not_float = sorted(  # the float model's tensors; quantized layers hold integer tensors on purpose
        f"{n}: {str(tensors[n].dtype).removeprefix('torch.')}"
        for n in expected
        if n in tensors and n in float_shapes and not tensors[n].dtype.is_floating_point
    )
    lines = (
        _describe(missing, "missing tensors")
        + _describe(unexpected, "unexpected tensors")
        + _describe(mismatched, "shape mismatches")
        + _describe(not_float, "weights that are not floating point")
        + _describe(problems_dup, "duplicated tensors")
        + _describe(problems_index, "index inconsistencies")
    )
    if lines:
        raise CheckpointError(
            f"the checkpoint in {folder} does not match the model its config.json describes:\n"
            + "\n".join(lines)
        )

    layer_set = set(layers)
    for name in layers:  # one layer at a time: each float weight is dropped once quantized
        _fill_quantized(model.get_submodule(name), name, tensors, source, stored, device, target_dtype)
        if stored is None:
            _return_freed_memory()
    quantized_names = {f"{n}.{key}" for n in layers for key in ("qweight", "scales", "zeros")}
    state = {}
    for name in expected:
        tensor = tensors.get(name)
        if tensor is None or name.rpartition(".")[0] in layer_set and not name.endswith(".bias"):
            continue  # tied lm_head absent from the checkpoint, or a quantized layer's tensor (done above)
        state[name] = source[name].converted(name, target_dtype, device)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.text_model.embed_tokens.weight"]
    result = model.load_state_dict(state, strict=False, assign=True)
    left = set(result.missing_keys) - quantized_names
    if left or result.unexpected_keys:  # the checks above make this impossible; never load half a model
        raise CheckpointError(f"loading {folder} left {sorted(left)} unset, {result.unexpected_keys} unused")
    model.tie_weights()
    del tensors, source, state

    model.config.extra.pop("quantization_config", None)
    entry = config_entry(model)
    if entry is not None:
        model.config.extra["quantization_config"] = entry
    model.config.torch_dtype = str(target_dtype).removeprefix("torch.")
    model.generation_config = _read_generation_config(folder)
    model.checkpoint_dir = folder
    return model.eval()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_memory() -> None:
    """Give the pages of freed heap blocks back to the system (glibc): quantizing leaves many freed
    temporaries between the small quantized tensors, which would otherwise stay resident."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _parts_of(layers: list[str]) -> tuple[str, ...]:
    """The model parts (idefics2.quantization.PARTS) that hold these layers."""
    parts = [
        p for p, prefixes in PARTS.items() if any(n.startswith(prefixes) or n in prefixes for n in layers)
    ]
    return tuple(parts)


def _compressed_group(linear: nn.Linear, scale: torch.Tensor | None) -> tuple[int, torch.dtype]:
    """The int4 group size and the scales' dtype of a compressed-tensors layer, read from its weight_scale
    [N, K/g] (one that is missing or misshapen is reported with the other mismatches)."""
    k = linear.in_features
    if scale is None or scale.dim() != 2 or not 0 < scale.shape[1] <= k or k % scale.shape[1]:
        return k, torch.bfloat16
    return k // scale.shape[1], scale.dtype if scale.dtype.is_floating_point else torch.bfloat16


def _stored_shapes(layer: QuantizedLinear, stored: StoredQuantization | None) -> dict[str, tuple[int, ...]]:
    """The tensors (names within the layer, shapes) a checkpoint holds for this layer."""
    n, k = layer.out_features, layer.in_features
    shapes: dict[str, tuple[int, ...]] = {"bias": (n,)} if layer.bias is not None else {}
    if stored is None:
        shapes["weight"] = (n, k)
    elif stored.method == COMPRESSED_TENSORS:
        words = -(-k * layer.bits // 32)
        scale_columns = 1 if layer.bits == 8 else k // layer.group_size
        shapes.update(weight_packed=(n, words), weight_scale=(n, scale_columns), weight_shape=(2,))
    elif stored.method == "awq":
        groups = k // layer.group_size
        shapes.update(qweight=(k, n // 8), qzeros=(groups, n // 8), scales=(groups, n))
    else:
        shapes.update({key: tuple(getattr(layer, key).shape) for key in ("qweight", "scales", "zeros")
                       if getattr(layer, key) is not None})  # fmt: skip
    return shapes


def _fill_quantized(
    layer: QuantizedLinear,
    name: str,
    tensors: dict[str, torch.Tensor],
    source: dict[str, MappedSafetensors],
    stored: StoredQuantization | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> None:
    """Give one quantized layer its values: quantize the float weight, convert AWQ's tensors, or take ours."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if stored is None:
        key = f"{name}.weight"
        weight = source[key].converted(key, torch.float32, device)
        quantized = quantize_int8(weight) if layer.bits == 8 else quantize_int4(weight, layer.group_size)
        values = dict(zip(("qweight", "scales"), quantized, strict=True))
        used = [key]
    elif stored.method == COMPRESSED_TENSORS:
        used = [f"{name}.{key}" for key in ("weight_packed", "weight_scale", "weight_shape")]
        packed, scales, shape = (tensors[key] for key in used)
        n, k = layer.out_features, layer.in_features
        if packed.dtype != torch.int32 or shape.tolist() != [n, k] or not scales.dtype.is_floating_point:
            raise CheckpointError(
                f"{name}: compressed-tensors stores weight_packed as int32 (got {packed.dtype}), a floating "
                f"weight_scale (got {scales.dtype}) and weight_shape [{n}, {k}] (got {shape.tolist()})"
            )
        scales = scales.reshape(n).to(torch.float32) if layer.bits == 8 else scales
        values = {"qweight": from_compressed(packed, layer.bits, k).to(device), "scales": scales.to(device)}
    elif stored.method == "awq":
        used = [f"{name}.{key}" for key in ("qweight", "qzeros", "scales")]
        qweight, scales, zeros = awq_to_int4(*(tensors[key] for key in used))
        values = {"qweight": qweight.to(device), "scales": scales.to(device), "zeros": zeros.to(device)}
    else:
        used = [f"{name}.{key}" for key in ("qweight", "scales", "zeros") if f"{name}.{key}" in tensors]
        values = {key.rpartition(".")[2]: tensors[key].to(device) for key in used}
    layer.set_tensors(values, dtype=dtype)
    if layer.packing is not None or device.type != "cpu" or stored is None or stored.method != LEGACY_FORMAT:
        for key in used:  # the mapped pages were copied or quantized: drop them
            source[key].release(key)


def _check_layer_counts(config: Idefics2Config, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """A config.json asking for far more layers than the checkpoint has weights for is refused before the
    layers are built: millions of layers would take that long to build, only to be reported missing. A few
    extra layers are cheap to build and reported with the other mismatches, tensor by tensor."""
    stacks = (
        ("model.vision_model.encoder.layers.", "vision_config", "num_hidden_layers"),
        ("model.connector.perceiver_resampler.layers.", "perceiver_config", "resampler_depth"),
        ("model.text_model.layers.", "text_config", "num_hidden_layers"),
    )
    for prefix, section, key in stacks:
        wanted = getattr(getattr(config, section), key)
        indices = [name[len(prefix) :].split(".", 1)[0] for name in tensors if name.startswith(prefix)]
        held = max((int(i) + 1 for i in indices if i.isdigit()), default=0)
        if wanted > held + _EXTRA_LAYERS_REPORTED:
            raise CheckpointError(
                f"{folder}/config.json asks for {section}.{key} = {wanted} layers but the checkpoint holds "
                f"weights for {held}"
            )


def _read_generation_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / "generation_config.json", what="generation config")


# ---- writing ---------------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read the size {size!r}; use bytes or a string like '5GB'")
    unit = match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** "BKMGT".index(unit[0]))


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as safetensors, streaming one tensor at a time (atomic: temp file, then rename)."""
    # widest dtypes first keeps every tensor aligned to its item size
    names = sorted(tensors, key=lambda n: -tensors[n].element_size())
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)  # a model memory-mapping the old file keeps reading the old data


def save_pretrained(
    model: nn.Module, folder: str | os.PathLike, *, max_shard_size: int | str = "5GB"
) -> Path:
    """config.json (+ generation_config.json) and weights as model.safetensors, or shards + index.

    Quantized layers are written in compressed-tensors' pack-quantized form with its `quantization_config`
    (transformers and vLLM load the folder as it is); int4 layers with zero points (read from AWQ or older
    checkpoints), which transformers cannot load so, are written as float weights, with a warning."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    layers = quantized_layers(model)
    for name, layer in layers.items():  # the portable tensors, one layer at a time, become the stored ones
        portable = {key: state.pop(f"{name}.{key}") for key in ("qweight", "scales", "zeros")
                    if f"{name}.{key}" in state}  # fmt: skip
        state.update({f"{name}.{key}": tensor for key, tensor in saved_tensors(layer, portable).items()})
    as_float = [name for name, layer in layers.items() if not saved_quantized(layer)]
    if as_float:
        warnings.warn(
            f"{len(as_float)} int4 layers with zero points (from an AutoAWQ or older idefics2 checkpoint, "
            f"e.g. {as_float[0]}) are saved as float weights: no format that transformers loads on a CPU "
            f"holds int4 zero points. Quantize the float folder again with quantize='int4' to save int4",
            stacklevel=3,
        )

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += nbytes

    if len(shards) == 1:
        written = {SINGLE_FILE}
        write_safetensors(folder / SINGLE_FILE, shards[0])
    else:
        weight_map, written = {}, {INDEX_FILE}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / file, shard)
            weight_map.update(dict.fromkeys(shard, file))
            written.add(file)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for stale in folder.glob("model*.safetensors*"):  # weights of an earlier save in the same folder
        if stale.name not in written and re.fullmatch(
            r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", stale.name
        ):
            stale.unlink()

    config = model.config
    config.torch_dtype = str(model.dtype).removeprefix("torch.")
    config.extra.pop("quantization_config", None)
    entry = config_entry(model)
    if entry is not None:
        config.extra["quantization_config"] = entry
    config.save_pretrained(folder)
    if model.generation_config:
        (folder / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2) + "\n")
    return folder
