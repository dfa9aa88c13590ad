"""Checkpoint loading and saving: safetensors only, memory-mapped, strict about names and shapes.

Loading builds the module on the meta device (no allocation), memory-maps each safetensors file
copy-on-write and assigns the mapped tensors as parameters, so weights are read from disk only when used
and peak memory stays near the size of the weights. Pickle-based checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from idefics2.config import Idefics2Config
from idefics2.hub import CheckpointError, read_json, resolve_checkpoint

if TYPE_CHECKING:
    from idefics2.modeling.model import Idefics2ForConditionalGeneration

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_DTYPES = {
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
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
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
            if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
                raise CheckpointError(f"{path} is a pickle/PyTorch file renamed as safetensors; refusing it")
            header_len = int.from_bytes(prefix, "little")
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
                dtype = _DTYPES[info["dtype"]]
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


def load_pretrained(
    cls: type[Idefics2ForConditionalGeneration],
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
) -> Idefics2ForConditionalGeneration:
    """Build `cls` on the meta device and assign the checkpoint's memory-mapped tensors to it."""
    folder = resolve_checkpoint(path_or_repo_id, revision=revision)
    config = Idefics2Config.from_pretrained(folder)
    target_dtype = resolve_dtype(dtype, config)
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
            model = cls(config)
    except (RuntimeError, OverflowError, TypeError) as error:  # sizes whose products overflow int64
        raise CheckpointError(
            f"the model config.json in {folder} describes cannot be built: its sizes make a tensor too large "
            f"({type(error).__name__})"
        ) from None
    model.set_attn_implementation(attn_implementation)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()

    missing = sorted(n for n in expected if n not in tensors and n not in optional)
    unexpected = sorted(n for n in tensors if n not in expected)
    mismatched = sorted(
        f"{n}: checkpoint {tuple(tensors[n].shape)}, model {expected[n]}"
        for n in expected
        if n in tensors and tuple(tensors[n].shape) != expected[n]
    )
    not_float = sorted(
        f"{n}: {str(tensors[n].dtype).removeprefix('torch.')}"
        for n in expected
        if n in tensors and not tensors[n].dtype.is_floating_point
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

    state = {}
    for name in expected:
        tensor = tensors.get(name)
        if tensor is None:  # tied lm_head absent from the checkpoint
            continue
        state[name] = source[name].converted(name, target_dtype, device)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.text_model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    del tensors, source, state

    model.config.torch_dtype = str(target_dtype).removeprefix("torch.")
    model.generation_config = _read_generation_config(folder)
    model.checkpoint_dir = folder
    return model.eval()


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
    model: Idefics2ForConditionalGeneration, folder: str | os.PathLike, *, max_shard_size: int | str = "5GB"
) -> Path:
    """config.json (+ generation_config.json) and weights as model.safetensors, or shards + index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")

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
    config.save_pretrained(folder)
    if model.generation_config:
        (folder / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2) + "\n")
    return folder
