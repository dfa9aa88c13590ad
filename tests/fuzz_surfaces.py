"""Fuzzing surfaces shared by the test suite (tests/test_fuzz_*.py) and the long campaigns (scripts/fuzz.py).

A surface is a hypothesis strategy of cases (good and bad inputs) and a runner that feeds one case to the
package and says how each input ended:

- "ok": accepted (a result, an answer, a loaded model);
- "rejected": a ValueError or TypeError raised on purpose by idefics2 — by a `raise` statement in the
  package, with a message — or, for the commands, exit code 2 with one line on stderr (`train`) and one
  `{"id": ..., "error": ...}` line per bad input line (`batch`);
- "undocumented": anything else: another exception type, a ValueError/TypeError raised by a dependency or by
  Python itself (even when it passes through our code, or is re-raised with only a location prefix), a
  traceback, a missing or malformed output line.

Cases are plain data (tuples, dicts, strings, numbers), so a case's repr is its reproducer:
`SURFACES[name].run(case)` rebuilds the objects (images, arrays, files, checkpoints) and runs it again.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import io
import json
import linecache
import math
import random
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

import idefics2
from idefics2.cli.common import UserError
from idefics2.loading import SAFETENSORS_DTYPES

PACKAGE_DIR = Path(idefics2.__file__).resolve().parent

# ------------------------------------------------------------------------------------------ outcomes


@dataclass
class Outcome:
    kind: str  # "ok" | "rejected" | "undocumented"
    error: BaseException | None = None
    problem: str = ""  # for an outcome that is not an exception (a command's output): what kind of problem
    detail: str = ""  # and the particulars

    @property
    def signature(self) -> str:
        """What tells two undocumented outcomes apart: the error type and where it was raised."""
        if self.error is None:
            return self.problem
        return f"{type(self.error).__name__} at {_where(self.error)}"

    def describe(self) -> str:
        if self.error is None:
            return f"{self.problem}: {_short(self.detail, 300)}"
        return f"{type(self.error).__module__}.{type(self.error).__name__}: {_short(str(self.error), 300)}"


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frames(error: BaseException) -> list[tuple[str, int]]:
    frames, tb = [], error.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return frames


def _where(error: BaseException) -> str:
    """The innermost frame, and the innermost frame inside the package when that is another one."""
    frames = _frames(error)
    if not frames:
        return "?"
    ours = [f for f in frames if _in_package(f[0])]
    show = [frames[-1]] + ([ours[-1]] if ours and ours[-1] != frames[-1] else [])
    return " via ".join(f"{_relative(file)}:{line}" for file, line in show)


def _in_package(file: str) -> bool:
    return Path(file).resolve().is_relative_to(PACKAGE_DIR)


def _relative(file: str) -> str:
    path = Path(file).resolve()
    if path.is_relative_to(PACKAGE_DIR):
        return "idefics2/" + str(path.relative_to(PACKAGE_DIR))
    parts = path.parts
    return "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else str(path)


def is_deliberate(error: BaseException) -> bool:
    """A ValueError/TypeError (or the CLI's UserError) with a message, raised by a `raise` statement of the
    package. An exception that only puts a location (at most four words, e.g. "sample 0, image 1:") before the
    message of a plain ValueError/TypeError it caught is judged by that one: its message is still the one of
    whoever raised it (a dependency, or Python itself)."""
    if not isinstance(error, (ValueError, TypeError, UserError)) or not str(error).strip():
        return False
    frames = _frames(error)
    if not frames or not _in_package(frames[-1][0]):
        return False
    if not linecache.getline(frames[-1][0], frames[-1][1]).lstrip().startswith("raise"):
        return False
    inner = error.__cause__ or error.__context__
    if type(inner) in (ValueError, TypeError) and str(inner) and str(inner) in str(error):
        if len(str(error).replace(str(inner), "").split()) <= 4:
            return is_deliberate(inner)
    return True


def classify(call: Callable[[], Any]) -> Outcome:
    """Run `call`: ok, rejected (a deliberate ValueError/TypeError) or undocumented."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except Exception as error:  # everything is judged, nothing is let through
        return Outcome("rejected" if is_deliberate(error) else "undocumented", error)
    return Outcome("ok")


def first_failure(*calls: Callable[[], Any]) -> Outcome:
    """The calls in order (each may use the previous one's work); the first one that raises decides."""
    for call in calls:
        outcome = classify(call)
        if outcome.kind != "ok":
            return outcome
    return Outcome("ok")


# ------------------------------------------------------------------------------------------ shared resources
@functools.cache
def work_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="idefics2-fuzz-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def fresh_dir(name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=name + "-", dir=work_dir()))
    return folder


@functools.cache
def builtin_processor():
    from idefics2 import Idefics2Processor
    from idefics2.assets import builtin_model_dir

    return Idefics2Processor.from_pretrained(builtin_model_dir())


@functools.cache
def builtin_pipeline():
    return idefics2.pipeline(dtype=torch.float32, device="cpu")


# ------------------------------------------------------------------------------------------ text
SPECIAL_TEXT = (
    "<image>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
    "User:",
    "Assistant:",
    "{{ messages }}",
    "{% raw %}",
    "\\",
    "\x00",
    "e\u0301",
)
CONTROL_CHARS = [chr(c) for c in range(32)] + ["\x7f", "\x85", "\u2028", "\u2029", "\ufeff", "\u200b"]
ODD_CHARS = ["\ufffd", "\uffff", "\U0010ffff", "\U0001f600", "\u0301", "\u0663", "\u202e"]


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """A strategy drawing from each choice with its weight. (`one_of` flattens nested alternatives and merges
    repeated ones, so repeating a strategy in it does not weigh it.)"""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


surrogates = st.integers(0xD800, 0xDFFF).map(chr)
characters = st.one_of(
    st.characters(exclude_categories=()),  # every code point, surrogates included
    surrogates,
    st.sampled_from(CONTROL_CHARS + ODD_CHARS),
)
valid_characters = st.one_of(st.characters(codec="utf-8"), st.sampled_from(CONTROL_CHARS + ODD_CHARS))
text_pieces = weighted(  # about a sixth of the pieces hold surrogates
    (3, st.text(valid_characters, max_size=12)),
    (1, st.text(characters, max_size=12)),
    (2, st.sampled_from(SPECIAL_TEXT)),
)
short_text = st.lists(text_pieces, max_size=6).map("".join)


def _long_text(spec: tuple[str, int]) -> str:
    piece, length = spec
    return (piece * (length // len(piece) + 1))[:length]


long_text = st.tuples(
    st.lists(text_pieces, min_size=1, max_size=3).map("".join).filter(bool),
    st.sampled_from([512, 4096, 100_000]) | st.integers(1, 100_000),
).map(_long_text)
texts = weighted((4, short_text), (1, long_text))  # mostly short: long ones are slow
# Valid text: every character but surrogates, and the markers a real prompt may hold.
plain_text = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.lists(
        st.sampled_from(["What", " color", "?", "<end_of_utterance>", "<s>", "</s>", "\n", "User:", " "]),
        max_size=6,
    ).map("".join),
)
not_text = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.binary(max_size=8),
    st.lists(st.one_of(st.none(), st.integers(), short_text), max_size=3),
    st.dictionaries(short_text, short_text, max_size=2),
)

# JSON-like junk: what a user's data file or a hand-written structure may hold where something else belongs.
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    short_text,
    st.sampled_from(SPECIAL_TEXT),
)
json_junk = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=8,
)


def nested(depth: int, leaf: Any) -> Any:
    """`leaf` inside `depth` lists (built when a case runs: a deep structure is not kept in the case)."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# ------------------------------------------------------------------------------------------ images
# Every format Pillow can write; a few of them (PDF, EPS, ...) Pillow cannot read back without extra tools.
WRITE_FORMATS = tuple(
    "PNG JPEG GIF WEBP BMP TIFF PPM ICO TGA PCX SGI IM QOI JPEG2000 DDS BLP MSP XBM SPIDER PALM ICNS AVIF "
    "PDF EPS DIB MPO".split()
)
PIL_MODES = tuple("1 L P RGB RGBA CMYK YCbCr LAB HSV I F LA La PA RGBX RGBa I;16 I;16B I;16L I;16N".split())
MAGIC = (
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"P6\n",
    b"qoif",
    b"\x00\x00\x01\x00",
    b"\x00\x00\x00\x0cjP  ",
)
NUMPY_DTYPES = tuple(
    "uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 float32 float64 longdouble bool complex64 "
    "object <U1 |S2 datetime64[s]".split()
)
TORCH_DTYPES = tuple(
    "uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 bfloat16 float32 float64 bool complex64 "
    "float8_e4m3fn float8_e5m2".split()
)
JUNK_IMAGES = tuple(
    "none int float dict missing_path folder empty_bytes bytearray memoryview nested_list pathlib".split()
)
FILL_VALUES = (0, 1, 255, 256, -1, 0.5, 1.5, -0.0, 65535, 2**40, 1e308, math.nan, math.inf, -math.inf)


def _random_image(mode: str, width: int, height: int, seed: int):
    import PIL.Image

    size = len(PIL.Image.new(mode, (width, height)).tobytes())
    data = random.Random(seed).randbytes(size)
    return PIL.Image.frombytes(mode, (width, height), data)


def encode_image(fmt: str, mode: str, width: int, height: int, seed: int) -> bytes:
    """The image written in `fmt`; modes the format cannot hold are converted to RGB, L or 1 first."""
    image = _random_image(mode, width, height, seed)
    for candidate in (image, "RGB", "L", "1"):
        try:
            picture = candidate if not isinstance(candidate, str) else image.convert(candidate)
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt)
            return buffer.getvalue()
        except Exception:  # this mode is not writable in this format: try the next one
            continue
    return b""  # nothing writes it (an empty image): an empty file


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the header of a PNG, GIF, BMP or JPEG so it claims another size (a decompression bomb when
    large): the pixels that follow stay those of the small image."""
    if data.startswith(b"\x89PNG") and len(data) >= 33:
        ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
        return data[:8] + _png_chunk(b"IHDR", ihdr) + data[33:]
    w, h = width % 65536, height % 65536
    if data.startswith(b"GIF") and len(data) >= 10:
        data = data[:6] + w.to_bytes(2, "little") + h.to_bytes(2, "little") + data[10:]
        at = data.find(b"\x2c", 13)  # the first image descriptor
        if at > 0 and len(data) >= at + 9:
            data = data[: at + 5] + w.to_bytes(2, "little") + h.to_bytes(2, "little") + data[at + 9 :]
        return data
    if data.startswith(b"BM") and len(data) >= 26:
        return (
            data[:18]
            + (width % 2**31).to_bytes(4, "little")
            + (height % 2**31).to_bytes(4, "little")
            + data[26:]
        )
    if data.startswith(b"\xff\xd8"):
        at = data.find(b"\xff\xc0")
        if at > 0 and len(data) >= at + 9:
            return data[: at + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[at + 9 :]
    return data


def mutate(data: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind == "truncate":  # keep the first fraction of the bytes
        return data[: int(len(data) * mutation[1])]
    if kind == "flip":  # overwrite bytes at fractions of the length (the headers are near the start)
        out = bytearray(data)
        for where, value in mutation[1]:
            if out:
                out[min(int(len(out) * where), len(out) - 1)] = value
        return bytes(out)
    if kind == "claim_size":
        return claim_size(data, mutation[1], mutation[2])
    if kind == "append":
        return data + mutation[1]
    return data


@functools.cache
def real_bomb_png() -> bytes:
    """A real 9600x9600 (92 MP, above Pillow's 89 MP limit) one-bit PNG: 11 MB of pixels in a few KB."""
    rows = b"\x00" + bytes(9600 // 8)
    compressed = zlib.compress(rows * 9600, 9)
    ihdr = (9600).to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", compressed)
        + _png_chunk(b"IEND", b"")
    )


sizes = st.integers(1, 48) | st.sampled_from([0, 1, 2, 127, 300])
mutations = weighted(
    (5, st.just(("none",))),
    (
        5,
        st.one_of(
            st.tuples(st.just("truncate"), st.floats(0, 1)),
            st.tuples(
                st.just("flip"),
                st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4),
            ),
            st.tuples(st.just("claim_size"), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
            st.tuples(
                st.just("claim_size"),
                st.sampled_from([0, 1, 9600, 65535, 100_000]),
                st.sampled_from([0, 9600, 65535]),
            ),
            st.tuples(st.just("append"), st.binary(max_size=16)),
        ),
    ),
)
encoded_files = st.tuples(
    st.just("file"),
    st.sampled_from(WRITE_FORMATS),
    st.sampled_from(PIL_MODES),
    sizes,
    sizes,
    st.integers(0, 2**16),
    mutations,
)
delivery = st.sampled_from(["bytes", "path", "pil_lazy", "pil_loaded"])
array_shapes = weighted(
    (2, st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4])).map(list)),  # HWC
    (1, st.tuples(st.sampled_from([1, 3, 4]), st.integers(1, 40), st.integers(1, 40)).map(list)),  # CHW
    (1, st.tuples(st.integers(1, 40), st.integers(1, 40)).map(list)),  # HW
    (2, st.lists(st.integers(0, 24) | st.sampled_from([1, 3, 4]), max_size=5)),
)
array_fills = st.one_of(
    st.tuples(st.just("random"), st.integers(0, 2**16)),
    st.tuples(st.just("const"), st.sampled_from(FILL_VALUES)),
)
image_specs = weighted(
    (
        1,
        st.tuples(st.just("bytes"), st.tuples(st.sampled_from(MAGIC), st.binary(max_size=300)).map(b"".join)),
    ),
    (4, st.tuples(st.just("encoded"), encoded_files, delivery)),
    (1, st.tuples(st.just("bomb"), st.sampled_from(["bytes", "path", "pil_lazy"]))),
    (
        2,
        st.tuples(
            st.just("pil"),
            st.sampled_from(PIL_MODES),
            sizes,
            sizes,
            st.integers(0, 2**16),
            st.sampled_from(
                [
                    None,
                    ("exif", 1),
                    ("exif", 6),
                    ("exif", 8),
                    ("exif", 99),
                    ("transparency", 0),
                    ("transparency", 300),
                    ("transparency", b"\x00\xff"),
                    ("transparency", (1, 2, 3)),
                ]
            ),
        ),
    ),
    (
        2,
        st.tuples(
            st.just("numpy"),
            weighted((2, st.sampled_from(["uint8", "float32"])), (1, st.sampled_from(NUMPY_DTYPES))),
            array_shapes,
            array_fills,
            st.sampled_from(["c", "fortran", "strided", "reversed", "readonly", "broadcast"]),
        ),
    ),
    (
        2,
        st.tuples(
            st.just("torch"),
            weighted((2, st.sampled_from(["uint8", "float32"])), (1, st.sampled_from(TORCH_DTYPES))),
            array_shapes,
            array_fills,
            st.sampled_from(["contiguous", "permuted", "meta", "requires_grad", "sparse", "expanded"]),
        ),
    ),
    (
        1,
        st.tuples(
            st.just("junk"),
            st.sampled_from(JUNK_IMAGES),
        ),
    ),
)


def _fill(shape: tuple[int, ...], fill: tuple, numpy_dtype: str) -> np.ndarray:
    if fill[0] == "const":
        base = np.full(shape, fill[1], dtype=np.float64)
    else:
        rng = np.random.default_rng(fill[1])
        scale = rng.choice([1.0, 255.0, 65535.0, 2.0**40])
        base = rng.random(shape) * scale - (scale / 2 if rng.random() < 0.2 else 0)
        if rng.random() < 0.5:
            base = np.round(base)
    base = np.asarray(base)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return base.astype(numpy_dtype)
        except (ValueError, TypeError, OverflowError):  # e.g. NaN into datetime: use zeros of that dtype
            return np.zeros(shape, dtype=numpy_dtype)


def build_image(spec: tuple) -> Any:
    """The image object (or junk) a spec describes."""
    kind = spec[0]
    if kind == "bytes":
        return spec[1]
    if kind == "encoded":
        (_, fmt, mode, width, height, seed, mutation), how = spec[1], spec[2]
        return _deliver(mutate(encode_image(fmt, mode, width, height, seed), mutation), how, fmt)
    if kind == "bomb":
        return _deliver(real_bomb_png(), spec[1], "png")
    if kind == "pil":
        _, mode, width, height, seed, extra = spec
        image = _random_image(mode, width, height, seed)
        if extra and extra[0] == "exif":
            exif = image.getexif()
            exif[0x0112] = extra[1]
            image.info["exif"] = exif.tobytes()
        elif extra:
            image.info["transparency"] = extra[1]
        return image
    if kind == "numpy":
        _, dtype, shape, fill, layout = spec
        array = _fill(tuple(shape), fill, dtype)
        return _numpy_layout(array, layout)
    if kind == "torch":
        _, dtype, shape, fill, layout = spec
        return _torch_tensor(dtype, tuple(shape), fill, layout)
    return {
        "none": None,
        "int": 5,
        "float": 0.5,
        "dict": {"image": "x.png"},
        "missing_path": str(work_dir() / "missing.png"),
        "folder": str(work_dir()),
        "empty_bytes": b"",
        "bytearray": bytearray(b"\x89PNG\r\n\x1a\n"),
        "memoryview": memoryview(b"\x89PNG\r\n\x1a\n"),
        "nested_list": [[[]]],
        "pathlib": work_dir() / "missing.png",
    }[spec[1]]


def _deliver(data: bytes, how: str, fmt: str) -> Any:
    import PIL.Image

    if how == "path":
        path = fresh_dir("image") / f"image.{fmt.lower()}"
        path.write_bytes(data)
        return str(path)
    if how in ("pil_lazy", "pil_loaded"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = PIL.Image.open(io.BytesIO(data))
                if how == "pil_loaded":
                    image.load()
            return image
        except Exception:  # Pillow cannot open it: the user would not have a PIL image, give the bytes
            return data
    return data


def _numpy_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "strided" and array.ndim:
        return np.repeat(array, 2, axis=0)[::2]
    if layout == "reversed" and array.ndim:
        return array[::-1]
    if layout == "readonly":
        array.flags.writeable = False
        return array
    if layout == "broadcast" and array.ndim:
        return np.broadcast_to(array[:1], array.shape)
    return array


def _torch_tensor(dtype: str, shape: tuple[int, ...], fill: tuple, layout: str) -> torch.Tensor:
    values = torch.from_numpy(_fill(shape, fill, "float64"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensor = values.to(getattr(torch, dtype))
    if layout == "permuted" and tensor.ndim >= 2:
        return tensor.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "meta":
        return tensor.to("meta")
    if layout == "requires_grad" and (tensor.is_floating_point() or tensor.is_complex()):
        return tensor.requires_grad_()
    if layout == "sparse" and tensor.ndim >= 1:
        try:
            return tensor.to_sparse()
        except (RuntimeError, NotImplementedError):  # torch has no sparse tensors of this dtype
            return tensor
    if layout == "expanded" and tensor.ndim >= 1:
        return tensor[:1].expand(tensor.shape)
    return tensor


# ------------------------------------------------------------------------------------------ surface: images
image_options = st.fixed_dictionaries(
    {},
    optional={
        "do_image_splitting": st.booleans(),
        "backend": st.sampled_from(["pil", "torch"]),
        "do_convert_rgb": st.booleans(),
        "do_resize": st.booleans(),
        "do_pad": st.booleans(),
        "do_rescale": st.booleans(),
        "do_normalize": st.booleans(),
    },
)
image_cases = weighted(
    # (route, how the images are grouped, the image specs, marker counts that may not match, options)
    (
        4,
        st.tuples(
            st.sampled_from(["processor", "processor", "processor", "image_processor", "images_only"]),
            st.sampled_from(["single", "flat", "nested"]),
            st.lists(image_specs, min_size=1, max_size=3),
            weighted((4, st.none()), (1, st.integers(0, 4))),
            image_options,
        ),
    ),
    (
        1,
        st.tuples(
            st.just("chat"),
            st.just("flat"),
            st.lists(image_specs, min_size=1, max_size=1),
            st.none(),
            st.just({}),
        ),
    ),
)


def run_image_case(case: tuple) -> list[Outcome]:
    route, grouping, specs, markers, options = case
    processor = builtin_processor()

    def call() -> None:
        images = [build_image(spec) for spec in specs]
        count = len(images) if markers is None else markers
        if route == "chat":
            builtin_pipeline().chat("What color is the circle?", images=images, max_new_tokens=2)
            return
        given: Any = images[0] if grouping == "single" else [images] if grouping == "nested" else images
        if route == "image_processor":
            processor.image_processor(given, **options)
        elif route == "images_only":
            processor(images=given, **options)
        else:
            processor(text="<image>" * count + "What is it?", images=given, return_tensors="pt", **options)

    return [classify(call)]


# ------------------------------------------------------------------------------------------ surface: text
id_values = st.one_of(
    st.integers(0, 400),
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 382, 511, 512, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, -(2**63)]),
    st.booleans(),
    st.floats(),
    short_text,
    st.none(),
)
id_payloads = st.one_of(
    st.tuples(st.just("list"), st.lists(id_values, max_size=6)),
    st.tuples(st.just("nested"), st.lists(st.lists(id_values, max_size=4), max_size=3)),
    st.tuples(st.just("int"), id_values),
    st.tuples(
        st.just("tensor"),
        st.sampled_from(["int64", "int32", "uint8", "float32", "bool", "bfloat16"]),
        st.lists(st.lists(st.integers(-3, 600), min_size=2, max_size=2), max_size=3)
        | st.lists(st.integers(-3, 600), max_size=4),
    ),
    st.tuples(
        st.just("ndarray"),
        st.sampled_from(["int64", "uint32", "int8", "float64", "bool", "object"]),
        st.lists(st.lists(st.integers(-3, 600), min_size=2, max_size=2), max_size=3)
        | st.lists(st.integers(-3, 600), max_size=4),
    ),
    st.tuples(st.just("junk"), not_text),
)
tokenizer_options = st.fixed_dictionaries(
    {},
    optional={
        "padding": st.sampled_from([True, False, "longest", "max_length", "do_not_pad"])
        | st.sampled_from(["sideways", 3, None]),
        "truncation": st.sampled_from([True, False, None, "longest_first", "only_first"])
        | st.sampled_from(["middle", 1]),
        "max_length": st.none() | st.integers(0, 40) | st.integers(-5, 2**40) | st.sampled_from(["8", 2.5]),
        "return_tensors": st.sampled_from([None, "pt", "np"]) | st.sampled_from(["tf", 1]),
        "padding_side": st.sampled_from([None, "left", "right"]) | st.just("up"),
        "add_special_tokens": st.booleans(),
    },
)
text_or_junk = weighted((3, texts), (1, not_text))
text_lists = weighted(
    (3, st.lists(texts, min_size=1, max_size=3)), (1, st.lists(text_or_junk, max_size=3)), (1, text_or_junk)
)
decode_options = st.fixed_dictionaries({}, optional={"skip_special_tokens": st.booleans()})
TEXT_OPERATIONS = {  # operation: (payload, options)
    "encode": (text_or_junk, st.just({})),
    "tokenize": (text_or_junk, st.just({})),
    "processor": (text_or_junk, st.just({})),
    "chat_template": (text_or_junk, st.just({})),
    "chat_template_tokenized": (text_or_junk, st.just({})),
    "tokenizer": (text_lists, tokenizer_options),
    "processor_batch": (text_lists, tokenizer_options),
    "decode": (id_payloads, decode_options),
    "batch_decode": (id_payloads, decode_options),
    "convert_ids_to_tokens": (id_payloads, decode_options),
    "chat": (weighted((3, short_text), (1, not_text)), st.just({})),  # generates: short texts only
}
text_cases = weighted(
    *((1, st.tuples(st.just(op), payload, options)) for op, (payload, options) in TEXT_OPERATIONS.items())
)


def build_ids(payload: tuple) -> Any:
    kind = payload[0]
    if kind == "tensor":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.tensor(payload[2], dtype=torch.float64).to(getattr(torch, payload[1]))
    if kind == "ndarray":
        return np.array(payload[2], dtype=np.float64).astype(payload[1])
    return payload[1]


def run_text_case(case: tuple) -> list[Outcome]:
    op, payload, options = case
    processor = builtin_processor()
    tokenizer = processor.tokenizer

    def call() -> None:
        if op == "encode":
            tokenizer.encode(payload)
        elif op == "tokenize":
            tokenizer.tokenize(payload)
        elif op == "processor":
            processor(text=payload)
        elif op in ("chat_template", "chat_template_tokenized"):
            messages = [{"role": "user", "content": payload}]
            processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=op == "chat_template_tokenized"
            )
        elif op == "tokenizer":
            tokenizer(payload, **options)
        elif op == "processor_batch":
            processor(text=payload, **options)
        elif op == "decode":
            tokenizer.decode(build_ids(payload), **options)
        elif op == "batch_decode":
            processor.batch_decode(build_ids(payload), **options)
        elif op == "convert_ids_to_tokens":
            tokenizer.convert_ids_to_tokens(build_ids(payload), **options)
        elif op == "chat":
            builtin_pipeline().chat(payload, max_new_tokens=2)

    return [classify(call)]


# ------------------------------------------------------------------------------------------ surface: chat
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "", "USER", "wizard"]), json_junk)
image_refs = st.one_of(st.none(), st.integers(0, 2).map(lambda k: ("pool", k)), json_junk)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text_or_junk}),
    st.fixed_dictionaries({"type": st.just("image")}, optional={"image": image_refs, "path": image_refs}),
    st.dictionaries(
        st.sampled_from(["type", "text", "image", "path", "url"]),
        json_junk | st.sampled_from(["text", "image", "video"]),
        max_size=3,
    ),
    json_junk,
)
contents = st.one_of(short_text, st.lists(parts, max_size=4), st.lists(parts, max_size=4), json_junk)
messages_one = st.one_of(
    st.fixed_dictionaries(
        {"role": roles, "content": contents}, optional={"name": json_junk, "tool_calls": json_junk}
    ),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": contents}),
    st.dictionaries(st.sampled_from(["role", "content", "type", "text"]), json_junk, max_size=3),
    json_junk,
)
conversations = st.one_of(
    st.lists(messages_one, max_size=4),
    st.lists(st.lists(messages_one, min_size=1, max_size=3), min_size=1, max_size=2),
    st.tuples(st.just("deep"), st.integers(1, 5000)),
    json_junk,
)


def _conversation(turns: list[tuple]) -> list[dict]:
    """Alternating user/assistant turns; a user turn's images are inline pool references."""
    messages = []
    for k, (images, text) in enumerate(turns):
        if k % 2:
            messages.append({"role": "assistant", "content": text})
        else:
            parts = [{"type": "image", "image": ("pool", i)} for i in images]
            messages.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})
    return messages


valid_conversations = st.lists(
    st.tuples(st.lists(st.integers(0, 2), max_size=2), plain_text), min_size=1, max_size=4
).map(_conversation)
chat_cases = st.tuples(
    st.sampled_from(["template", "template_tokenized", "template_dict", "prepare", "chat", "train_example"]),
    weighted((1, conversations), (1, valid_conversations)),
    st.booleans(),  # add_generation_prompt
    st.none() | st.lists(st.integers(0, 2), max_size=3),  # images= for the pipeline, from the pool
)
POOL_IMAGES = (
    ("numpy", "uint8", [12, 16, 3], ("random", 1), "c"),
    ("pil", "RGB", 9, 7, 2, None),
    ("encoded", ("file", "PNG", "RGB", 10, 10, 3, ("none",)), "path"),
)


def _resolve_refs(value: Any) -> Any:
    """Image references ("pool", k) inside a conversation become pool images."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "pool":
        return build_image(POOL_IMAGES[value[1]])
    if isinstance(value, list):
        return [_resolve_refs(v) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_refs(v) for k, v in value.items()}
    return value


def run_chat_case(case: tuple) -> list[Outcome]:
    op, conversation, generation_prompt, pool = case
    processor = builtin_processor()

    def call() -> None:
        if isinstance(conversation, tuple) and conversation[0] == "deep":
            messages = nested(conversation[1], {"role": "user", "content": "hi"})
        else:
            messages = _resolve_refs(copy.deepcopy(conversation))
        images = None if pool is None else [build_image(POOL_IMAGES[k]) for k in pool]
        if op.startswith("template"):
            processor.apply_chat_template(
                messages,
                add_generation_prompt=generation_prompt,
                tokenize=op != "template",
                return_dict=op == "template_dict",
            )
        elif op == "prepare":
            builtin_pipeline().prepare(messages, images)
        elif op == "chat":
            builtin_pipeline().chat(messages, images, max_new_tokens=2)
        else:
            from idefics2.training.data import ChatCollator, normalize_example

            example = normalize_example({"messages": messages, "images": images or []})
            ChatCollator(processor).encode(example)

    return [classify(call)]


# ------------------------------------------------------------------------------------------ commands
@dataclass
class CommandRun:
    code: int | None
    stdout: str
    stderr: str
    crash: BaseException | None  # an exception that escaped main()
    raised: list[BaseException]  # exceptions that went through the command's run()


def run_command(argv: list[str], watch: dict[str, Callable] | None = None) -> CommandRun:
    """`idefics2.cli.main(argv)` in this process, with stdout/stderr captured; `watch` patches attributes
    ("module:name" -> wrapper factory) for the duration of the call."""
    import importlib

    from idefics2.cli import main

    out, err = io.StringIO(), io.StringIO()
    raised: list[BaseException] = []
    patches = []
    for target, factory in (watch or {}).items():
        module_name, path = target.split(":")
        owner = importlib.import_module(module_name)
        *parents, attribute = path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        patches.append((owner, attribute, vars(owner)[attribute]))  # a classmethod stays a classmethod
        setattr(owner, attribute, factory(getattr(owner, attribute), raised))
    code, crash = None, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException as error:  # noqa: BLE001 - whatever escapes main() is a finding
        if isinstance(error, KeyboardInterrupt):
            raise
        crash = error
    finally:
        for owner, attribute, original in reversed(patches):
            setattr(owner, attribute, original)
    return CommandRun(code, out.getvalue(), err.getvalue(), crash, raised)


def recording(original: Callable, raised: list[BaseException]) -> Callable:
    """A wrapper of `original` that notes every exception going through it."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except BaseException as error:
            raised.append(error)
            raise

    return wrapper


def noting_argument(original: Callable, raised: list[BaseException]) -> Callable:
    """A wrapper of `original(error, ...)` that notes the exception it is handed."""

    @functools.wraps(original)
    def wrapper(error, *args, **kwargs):
        raised.append(error)
        return original(error, *args, **kwargs)

    return wrapper


def one_line_error(run: CommandRun, command: str) -> Outcome:
    """A command's contract for a bad input: exit code 2, one line on stderr, no traceback, the error
    raised on purpose."""
    lines = run.stderr.splitlines()
    if run.crash is not None:
        return Outcome("undocumented", run.crash)
    if run.code == 0:
        return Outcome("ok")
    cause = run.raised[-1] if run.raised else None
    if run.code != 2 or len(lines) != 1 or not lines[0].startswith(f"idefics2 {command}: error: "):
        return Outcome(
            "undocumented", cause, "not one error line", f"exit code {run.code}, stderr {run.stderr!r}"
        )
    if cause is not None and not is_deliberate(cause):
        return Outcome("undocumented", cause)
    return Outcome("rejected", cause)


# ------------------------------------------------------------------------------------------ pool of files
POOL_FILES = tuple(
    "good.png good.jpg tiny.png truncated.png garbage.png empty.png folder.png bomb.png missing.png "
    "claims_huge.gif pixel.gif la.png".split()
)


@functools.cache
def file_pool() -> Path:
    """Image files that data lines refer to by name: good, broken and hostile ones."""
    folder = fresh_dir("pool")
    png = encode_image("PNG", "RGB", 20, 16, 0)
    (folder / "good.png").write_bytes(png)
    (folder / "good.jpg").write_bytes(encode_image("JPEG", "RGB", 17, 23, 1))
    (folder / "tiny.png").write_bytes(encode_image("PNG", "L", 1, 1, 2))
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (folder / "empty.png").write_bytes(b"")
    (folder / "folder.png").mkdir()
    (folder / "bomb.png").write_bytes(real_bomb_png())
    (folder / "claims_huge.gif").write_bytes(claim_size(encode_image("GIF", "P", 8, 8, 3), 65535, 65535))
    (folder / "pixel.gif").write_bytes(encode_image("GIF", "P", 1, 1, 4))
    (folder / "la.png").write_bytes(encode_image("PNG", "LA", 6, 6, 5))
    return folder


image_names = st.one_of(
    st.sampled_from(POOL_FILES),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "/",
            "/dev/null",
            "/proc/self/mem",
            "good.png\x00",
            "a" * 300,
            "\ud800.png",
            "~/good.png",
            "good.png/",
        ]
    ),
    json_junk,
)


def _json_line(value: Any, ensure_ascii: bool) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=ensure_ascii)
    except (ValueError, TypeError):
        text = repr(value)
    return text.encode("utf-8", "surrogatepass")


def render_line(spec: tuple) -> bytes:
    """One JSONL line of a data file from its spec."""
    kind = spec[0]
    if kind == "raw":
        return spec[1].encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return spec[1].replace(b"\n", b" ")
    if kind == "deep":
        return b"[" * spec[1] + b"]" * spec[1]
    if kind == "big_number":
        return b'{"id": ' + b"9" * spec[1] + b', "prompt": "hi"}'
    return _json_line(spec[1], ensure_ascii=spec[2]).replace(b"\n", b"\\n")


def _line_specs(records: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("record"), records, st.booleans()),
        st.tuples(st.just("record"), records, st.booleans()),
        st.tuples(st.just("record"), records, st.booleans()),
        st.tuples(st.just("raw"), short_text.map(lambda t: t.replace("\n", " "))),
        st.tuples(st.just("bytes"), st.binary(max_size=40)),
        st.tuples(st.just("deep"), st.integers(1, 100_000)),
        st.tuples(st.just("big_number"), st.integers(1, 10_000)),
        st.tuples(st.just("record"), json_junk, st.booleans()),
    )


# ------------------------------------------------------------------------------------------ surface: batch
batch_prompts = st.one_of(
    short_text,
    st.lists(
        st.sampled_from(["<image>", "What color is the circle?", " ", "\ud800", "<end_of_utterance>"]),
        max_size=4,
    ).map("".join),
    not_text,
)
batch_records = st.fixed_dictionaries(
    {"prompt": batch_prompts},
    optional={"id": json_junk, "images": st.lists(image_names, max_size=3) | json_junk, "extra": json_junk},
)
batch_cases = st.lists(_line_specs(batch_records), min_size=1, max_size=6)


def _expected_id(line: bytes) -> tuple[bool, Any]:
    """(whether the output line must echo an id, that id) for one input line."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return False, None
    return isinstance(record, dict), record.get("id") if isinstance(record, dict) else None


def run_batch_case(case: list) -> list[Outcome]:
    folder = fresh_dir("batch")
    lines = [render_line(spec) for spec in case]
    pool = file_pool()
    for name in POOL_FILES:
        if (pool / name).exists():
            (folder / name).symlink_to(pool / name)
    source, target = folder / "in.jsonl", folder / "out.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    pipe = builtin_pipeline()  # loaded once: the lines are under test, not the loading
    argv = [
        "batch",
        "--input",
        str(source),
        "--output",
        str(target),
        "--no-progress",
        "--max-new-tokens",
        "2",
    ]
    import idefics2.cli.batch as command
    import idefics2.serving.batch as answering

    watch = {
        "idefics2.cli.batch:load_pipeline": lambda original, raised: lambda args: pipe,
        "idefics2.data.rows:load_image": recording,
    }
    # Where a line's failure while it is answered shows: raised out of the batched answering, or handed to
    # the function that turns it into the line's message.
    if hasattr(command, "_answer_batch"):
        watch["idefics2.cli.batch:_answer_batch"] = recording
    if hasattr(answering, "_message"):
        watch["idefics2.serving.batch:_message"] = noting_argument
    run = run_command(argv, watch=watch)
    counted = [line for line in lines if line.decode("utf-8", "replace").strip()]
    if not counted:  # a file of blank lines: the command's one-line error
        return [one_line_error(run, "batch")]
    if run.crash is not None or run.code != 0:
        return [
            Outcome("undocumented", run.crash, "run failed", f"exit code {run.code}: {run.stderr}")
        ] * len(counted)
    written = target.read_bytes().split(b"\n")[:-1] if target.is_file() else []
    if len(written) != len(counted):
        detail = f"{len(counted)} input lines but {len(written)} output lines"
        return [Outcome("undocumented", None, "line count", detail)] * len(counted)
    # Errors that went through the answering or image loading, by the message the output line carries.
    hidden = {}
    for error in run.raised:
        inner = error.__context__ if isinstance(error, UserError) and error.__context__ is not None else error
        if not is_deliberate(inner):
            hidden[" ".join(str(error).split())] = inner
    return [_batch_line_outcome(line, out, hidden) for line, out in zip(counted, written)]


def _batch_line_outcome(line: bytes, out: bytes, hidden: dict[str, BaseException]) -> Outcome:
    try:
        result = json.loads(out.decode("utf-8"))
    except ValueError as error:
        return Outcome("undocumented", error, "output not JSON", repr(out[:200]))
    keys = set(result) if isinstance(result, dict) else set()
    if "id" not in keys or ("text" in keys) == ("error" in keys):  # other keys may come along
        return Outcome("undocumented", None, "output keys", repr(out[:200]))
    must_echo, expected = _expected_id(line)
    if must_echo and json.dumps(result["id"]) != json.dumps(expected):
        return Outcome(
            "undocumented", None, "wrong id", f"output id {result['id']!r} for input id {expected!r}"
        )
    if "text" in result:
        return (
            Outcome("ok")
            if isinstance(result["text"], str)
            else Outcome("undocumented", None, "text not str")
        )
    message = result["error"]
    if not isinstance(message, str) or not message.strip():
        return Outcome("undocumented", None, "empty error", repr(out[:200]))
    for raised_message, error in hidden.items():
        if message.endswith(raised_message):
            return Outcome("undocumented", error)
    return Outcome("rejected")


# ------------------------------------------------------------------------------------------ surface: train
train_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text_or_junk}),
    st.just({"type": "image"}),
    st.dictionaries(
        st.sampled_from(["type", "text"]), json_junk | st.sampled_from(["text", "image"]), max_size=2
    ),
    json_junk,
)
train_messages = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]) | roles,
            "content": short_text | st.lists(train_parts, max_size=3) | json_junk,
        }
    ),
    json_junk,
)
train_records = st.one_of(
    st.fixed_dictionaries(
        {"messages": st.lists(train_messages, max_size=4) | json_junk},
        optional={"images": st.lists(image_names, max_size=3) | json_junk, "extra": json_junk},
    ),
    st.fixed_dictionaries(  # likelier to be valid: a user turn (maybe with an image) and an answer
        {
            "messages": st.tuples(
                st.fixed_dictionaries(
                    {"role": st.just("user"), "content": st.lists(train_parts, min_size=1, max_size=2)}
                ),
                st.fixed_dictionaries({"role": st.just("assistant"), "content": short_text}),
            ).map(list),
            "images": st.lists(st.sampled_from(POOL_FILES), max_size=1),
        }
    ),
)


def _example(spec: tuple) -> dict:
    images, question, answer, system = spec
    user = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    system_turn = [{"role": "system", "content": system}] if system is not None else []
    return {
        "messages": [
            *system_turn,
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
        "images": list(images),
    }


valid_examples = st.tuples(
    st.lists(st.sampled_from(POOL_FILES), max_size=2), plain_text, plain_text, st.none() | plain_text
).map(_example)
train_cases = st.one_of(
    st.lists(_line_specs(train_records), min_size=1, max_size=4),
    st.lists(st.tuples(st.just("record"), valid_examples, st.booleans()), min_size=1, max_size=3),
)


class _DataAccepted(BaseException):
    """Raised in place of loading the model: `train` accepted the data file."""


def _refuse_to_load(original, raised):
    def stop(*args, **kwargs):
        raise _DataAccepted

    return stop


def run_train_case(case: list) -> list[Outcome]:
    from idefics2.assets import builtin_model_dir

    folder = fresh_dir("train")
    pool = file_pool()
    for name in POOL_FILES:
        if (pool / name).exists():
            (folder / name).symlink_to(pool / name)
    data = folder / "train.jsonl"
    data.write_bytes(b"\n".join(render_line(spec) for spec in case) + b"\n")
    argv = [
        "train",
        "--model",
        str(builtin_model_dir()),
        "--data",
        str(data),
        "--output",
        str(folder / "out"),
        "--no-progress",
    ]
    run = run_command(
        argv,
        watch={
            "idefics2.cli.train:run": recording,
            "idefics2.modeling.model:Idefics2ForConditionalGeneration.from_pretrained": _refuse_to_load,
        },
    )
    if isinstance(run.crash, _DataAccepted):  # the data was read and encoded: now build its batches
        return [first_failure(lambda: _collate_all(data))]
    return [one_line_error(run, "train")]


def _collate_all(data: Path) -> None:
    """What training does with the examples once the model is loaded: a batch of each (images read)."""
    from idefics2.training import ChatCollator, read_jsonl

    collator = ChatCollator(builtin_processor())
    for example in read_jsonl(data):
        try:
            collator([example])
        except ValueError as error:
            if "dropped" not in str(error):  # an example longer than max_length: not the case here
                raise


# ------------------------------------------------------------------------------------- surface: checkpoints
TINY_CONFIG = {
    "model_type": "idefics2",
    "image_token_id": 5,
    "tie_word_embeddings": False,
    "vision_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 128,
        "patch_size": 8,
    },
    "perceiver_config": {
        "resampler_n_latents": 16,
        "resampler_depth": 1,
        "resampler_n_heads": 2,
        "resampler_head_dim": 8,
        "num_key_value_heads": 1,
    },
    "text_config": {
        "vocab_size": 400,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "pad_token_id": 3,
        "sliding_window": None,
    },
}
PROCESSOR_FILES = tuple(
    "tokenizer.json tokenizer_config.json special_tokens_map.json processor_config.json chat_template.jinja "
    "generation_config.json".split()
)
SAFETENSORS_FILES = ("model.safetensors", "adapter/adapter_model.safetensors")
CHECKPOINT_FILES = (*SAFETENSORS_FILES, "config.json", "adapter/adapter_config.json", *PROCESSOR_FILES)
JSON_FILES = tuple(
    "config.json adapter/adapter_config.json tokenizer_config.json special_tokens_map.json "
    "processor_config.json generation_config.json model.safetensors.index.json".split()
)
SECTION_KEYS = {
    "vision_config": "hidden_size intermediate_size num_hidden_layers num_attention_heads num_channels "
    "image_size patch_size hidden_act layer_norm_eps attention_dropout",
    "perceiver_config": "hidden_size resampler_n_latents resampler_depth resampler_n_heads "
    "resampler_head_dim num_key_value_heads hidden_act rms_norm_eps attention_dropout",
    "text_config": "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
    "num_key_value_heads head_dim hidden_act max_position_embeddings rms_norm_eps pad_token_id bos_token_id "
    "eos_token_id rope_theta sliding_window attention_dropout rope_parameters rope_scaling model_type",
}
CONFIG_KEYS = (  # key paths in config.json
    *((section, key) for section, keys in SECTION_KEYS.items() for key in keys.split()),
    *((section,) for section in SECTION_KEYS),
    *((key,) for key in "image_token_id tie_word_embeddings use_cache dtype torch_dtype model_type".split()),
)
OTHER_JSON_KEYS = tuple(  # key paths in the other JSON files ("/" between levels)
    tuple(path.split("/"))
    for path in (
        "r lora_alpha lora_dropout target_modules use_rslora rank_pattern alpha_pattern peft_type use_dora "
        "bias padding_side model_max_length bos_token eos_token pad_token unk_token add_bos_token "
        "add_eos_token additional_special_tokens added_tokens_decoder truncation_side image_seq_len "
        "chat_template max_new_tokens eos_token_id weight_map weight_map/lm_head.weight image_processor "
        "image_processor/size image_processor/resample image_processor/image_mean image_processor/image_std "
        "image_processor/rescale_factor image_processor/do_resize image_processor/do_image_splitting"
    ).split()
)
config_values = st.one_of(
    st.integers(-2, 9),
    st.sampled_from(
        [
            0,
            -1,
            2**31 - 1,
            2**31,
            2**63,
            10**30,
            0.5,
            1.5,
            -0.5,
            math.nan,
            math.inf,
            "x",
            "",
            "silu",
            "gelu",
            "float16",
            "int8",
            "default",
            "linear",
            None,
            [],
            [2, 2],
            [8, 16],
            {},
            True,
            False,
            {"rope_type": "default", "rope_theta": "x"},
            {"rope_type": "yarn"},
            {"height": 8, "width": -8},
            {"shortest_edge": 8},
            {"longest_edge": 16, "shortest_edge": 8},
        ]
    ),
    json_junk,
)
DTYPE_NAMES = (*"F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL F8_E4M3 F8_E5M2 U64 F4 X".split(), 7)
checkpoint_mutations = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(CHECKPOINT_FILES), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.sampled_from(CHECKPOINT_FILES), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(
        st.just("flip_header"), st.sampled_from(SAFETENSORS_FILES), st.floats(0, 1), st.integers(0, 255)
    ),
    st.tuples(
        st.just("header_length"),
        st.sampled_from(SAFETENSORS_FILES),
        st.integers(0, 2**64 - 1) | st.integers(0, 4096),
    ),
    st.tuples(
        st.just("entry"),
        st.sampled_from(SAFETENSORS_FILES),
        st.integers(0, 10**6),
        st.sampled_from(["dtype", "shape", "data_offsets"]),
        st.sampled_from(DTYPE_NAMES) | st.lists(st.integers(-3, 2**62), max_size=4) | json_junk,
    ),
    st.tuples(
        st.just("retype"),
        st.sampled_from(SAFETENSORS_FILES),
        st.integers(0, 10**6),
        st.sampled_from(DTYPE_NAMES[:12]),
    ),
    st.tuples(
        st.just("reshape"),
        st.sampled_from(SAFETENSORS_FILES),
        st.integers(0, 10**6),
        st.lists(st.integers(0, 40), max_size=3),
    ),
    st.tuples(st.just("drop"), st.sampled_from(SAFETENSORS_FILES), st.integers(0, 10**6)),
    st.tuples(st.just("rename"), st.sampled_from(SAFETENSORS_FILES), st.integers(0, 10**6), short_text),
    st.tuples(st.just("metadata"), st.sampled_from(SAFETENSORS_FILES), json_junk),
    st.tuples(st.just("config"), st.sampled_from(CONFIG_KEYS), config_values),
    st.tuples(st.just("json"), st.sampled_from(JSON_FILES), st.sampled_from(OTHER_JSON_KEYS), config_values),
    st.tuples(st.just("replace"), st.sampled_from(CHECKPOINT_FILES), st.binary(max_size=64) | short_text),
    st.tuples(st.just("delete"), st.sampled_from(CHECKPOINT_FILES)),
)
checkpoint_cases = st.tuples(
    st.lists(checkpoint_mutations, min_size=1, max_size=3),
    st.booleans(),  # with the adapter
    st.sampled_from([None, "auto", "bfloat16", "float16"]),  # dtype=
)


@functools.cache
def base_checkpoint() -> Path:
    """A tiny random checkpoint (config, weights, the built-in model's processor files) and a LoRA adapter."""
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
    from idefics2.assets import builtin_model_dir
    from idefics2.lora import LoraConfig, add_lora, save_adapter

    folder = fresh_dir("checkpoint")
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(TINY_CONFIG)))
    model.save_pretrained(folder)
    for name in PROCESSOR_FILES:
        shutil.copy(builtin_model_dir() / name, folder / name)
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0)
    add_lora(model, config)
    save_adapter(model, config, folder / "adapter")
    return folder


def _read_safetensors(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


_ITEM_SIZES = {name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}


def _rebuild(header: dict, body: bytes, change: Callable[[dict, dict[str, bytes]], None]) -> bytes:
    """Rewrite a safetensors file consistently (offsets tiling the data) after `change` edited its tensors."""
    tensors = {
        name: body[info["data_offsets"][0] : info["data_offsets"][1]]
        for name, info in header.items()
        if name != "__metadata__"
    }
    infos = {name: dict(info) for name, info in header.items() if name != "__metadata__"}
    change(infos, tensors)
    out, offset = {"__metadata__": header.get("__metadata__", {})}, 0
    chunks = []
    for name, info in infos.items():
        data = tensors[name]
        out[name] = {**info, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    return _write_safetensors(out, b"".join(chunks))


def _mutate_safetensors(data: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind == "flip_header":
        length = min(int.from_bytes(data[:8], "little"), len(data) - 8)
        out = bytearray(data)
        out[8 + int(length * mutation[2]) % max(length, 1)] = mutation[3]
        return bytes(out)
    if kind == "header_length":
        return mutation[2].to_bytes(8, "little") + data[8:]
    header, body = _read_safetensors(data)
    names = [name for name in header if name != "__metadata__"]
    name = names[mutation[2] % len(names)] if kind != "metadata" else None
    if kind == "entry":
        header[name][mutation[3]] = mutation[4]
        return _write_safetensors(header, body)
    if kind == "metadata":
        header["__metadata__"] = mutation[2]
        return _write_safetensors(header, body)

    def change(infos: dict, tensors: dict) -> None:
        if kind == "retype":  # the same values in another dtype: a consistent file of the wrong dtype
            values = np.frombuffer(tensors[name], dtype=np.float32) if infos[name]["dtype"] == "F32" else None
            dtype = mutation[3]
            if values is not None and dtype in _ITEM_SIZES:
                as_torch = torch.from_numpy(values.copy())
                target = SAFETENSORS_DTYPES[dtype]
                tensors[name] = as_torch.to(target).view(torch.uint8).numpy().tobytes()
                infos[name]["dtype"] = dtype
        elif kind == "reshape":  # another shape, with data to match
            shape = mutation[3]
            infos[name]["shape"] = shape
            tensors[name] = bytes(math.prod(shape) * _ITEM_SIZES.get(infos[name]["dtype"], 4))
        elif kind == "drop":
            del infos[name], tensors[name]
        elif kind == "rename":
            infos[mutation[3]] = infos.pop(name)
            tensors[mutation[3]] = tensors.pop(name)

    return _rebuild(header, body, change)


def _set_path(document: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    if not isinstance(document, dict):
        document = {}
    document[path[0]] = _set_path(document.get(path[0]), path[1:], value)
    return document


def apply_checkpoint_mutation(folder: Path, mutation: tuple) -> None:
    kind = mutation[0]
    if kind == "config":
        kind, mutation = "json", ("json", "config.json", mutation[1], mutation[2])
    path = folder / mutation[1]
    if kind == "delete":
        path.unlink(missing_ok=True)
    elif kind == "replace":
        path.write_bytes(
            mutation[2] if isinstance(mutation[2], bytes) else mutation[2].encode("utf-8", "surrogatepass")
        )
    elif kind == "json":
        try:
            document = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:  # an earlier mutation broke it
            document = {}
        document = _set_path(document, mutation[2], mutation[3])
        path.write_text(json.dumps(document))
    elif path.is_file():
        data = path.read_bytes()
        if kind == "truncate":
            data = data[: int(len(data) * mutation[2])]
        elif kind == "flip" and data:
            out = bytearray(data)
            out[min(int(len(data) * mutation[2]), len(data) - 1)] = mutation[3]
            data = bytes(out)
        else:
            try:
                data = _mutate_safetensors(data, mutation)
            except (
                ValueError,
                KeyError,
                TypeError,
                IndexError,
                ZeroDivisionError,
            ):  # broken by an earlier one
                pass
        path.write_bytes(data)


def run_checkpoint_case(case: tuple) -> list[Outcome]:
    from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor

    mutations_list, with_adapter, dtype = case
    folder = fresh_dir("corrupted")
    shutil.copytree(base_checkpoint(), folder, dirs_exist_ok=True)
    for mutation in mutations_list:
        apply_checkpoint_mutation(folder, mutation)
    state: dict[str, Any] = {}

    def load_processor() -> None:
        state["processor"] = Idefics2Processor.from_pretrained(folder)

    def load_model() -> None:
        state["model"] = Idefics2ForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, adapter=folder / "adapter" if with_adapter else None
        )

    def run_model() -> None:  # a loaded model must also work: one prompt with an image, and a training step
        processor, model = state["processor"], state["model"]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
            add_generation_prompt=True,
        )
        inputs = processor(text=prompt, images=[np.full((20, 24, 3), 200, np.uint8)], return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.lm_head.weight.dtype)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, tokenizer=processor)
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()

    return [first_failure(load_processor, load_model, run_model)]


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Surface:
    name: str
    strategy: st.SearchStrategy
    run: Callable[[Any], list[Outcome]]
    about: str


SURFACES = {
    surface.name: surface
    for surface in (
        Surface(
            "images",
            image_cases,
            run_image_case,
            "random bytes, every format Pillow writes (truncated, garbled, claiming huge sizes), a real "
            "92 MP bomb, every PIL mode, numpy/torch arrays of odd shapes, dtypes and values (NaN, inf), "
            "through the processor, the image processor and pipeline().chat",
        ),
        Surface(
            "text",
            text_cases,
            run_text_case,
            "surrogates, control characters, special tokens as text, up to 100,000 characters, non-str "
            "text; ids out of range, negative, of the wrong type; through the tokenizer, the processor, "
            "the chat template, decode/batch_decode and pipeline().chat",
        ),
        Surface(
            "chat",
            chat_cases,
            run_chat_case,
            "conversations of wrong types, missing keys, unknown roles, nested junk, deep nesting, through "
            "apply_chat_template, the pipeline (prepare and chat) and the training example reader",
        ),
        Surface(
            "batch",
            batch_cases,
            run_batch_case,
            "JSONL lines for `idefics2 batch` (one case per line): broken JSON, invalid UTF-8, wrong types, "
            "surrogates, deep nesting, huge numbers, missing/broken/hostile image files",
        ),
        Surface(
            "train",
            train_cases,
            run_train_case,
            "JSONL files for `idefics2 train` (one case per file), then a batch of each accepted example",
        ),
        Surface(
            "checkpoint",
            checkpoint_cases,
            run_checkpoint_case,
            "truncated or garbled safetensors files and headers, wrong shapes and dtypes, bad config.json, "
            "processor and adapter values, missing files; loaded, then run (generate and a training step)",
        ),
    )
}
