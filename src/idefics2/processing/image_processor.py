"""Idefics2 image processor: resize, optional 2x2 splitting, rescale, normalize, pad.

Two backends share one interface:
- "pil": Pillow resampling and the same float arithmetic as transformers' Idefics2ImageProcessorPil,
  so results match it bit for bit;
- "torch": batched tensor ops (antialiased bilinear `interpolate`), optionally on a GPU.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .batch import BatchFeature
from .images import DEFAULT_MAX_PIXELS, ImageLike, is_image_like, to_pixel_array

# Options saved in preprocessor_config.json / the image_processor section of processor_config.json.
DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 378, "longest_edge": 980},
    "resample": PIL.Image.Resampling.BILINEAR.value,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_pad": True,
    "do_image_splitting": False,
}
RUNTIME_OPTIONS = ("backend", "device", "max_pixels")
RESAMPLE_FILTERS = tuple(int(f) for f in PIL.Image.Resampling)
MAX_EDGE = 8192  # a larger resize target per side is refused: its float32 batch alone would pass 800 MB
TORCH_MODES = {PIL.Image.Resampling.BILINEAR.value: "bilinear", PIL.Image.Resampling.BICUBIC.value: "bicubic"}


def resize_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """Target (height, width): cap the longer edge at `longest_edge` keeping the aspect ratio (rounded
    down), then raise each edge to at least `shortest_edge`. Or the explicit `height`/`width`."""
    if size.get("shortest_edge") and size.get("longest_edge"):
        shortest, longest = size["shortest_edge"], size["longest_edge"]
        aspect = width / height
        if width >= height and width > longest:
            width, height = longest, int(longest / aspect)
        elif height > width and height > longest:
            height, width = longest, int(longest * aspect)
        return max(height, shortest), max(width, shortest)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(
        f"size must hold 'shortest_edge' and 'longest_edge', or 'height' and 'width'; got {size}"
    )


def split_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of the 4 quadrants (row by row) followed by the whole image."""
    mid_h, mid_w = height // 2, width // 2
    return [
        (0, mid_h, 0, mid_w),
        (0, mid_h, mid_w, width),
        (mid_h, height, 0, mid_w),
        (mid_h, height, mid_w, width),
        (0, height, 0, width),
    ]


def nest_images(images: Any) -> list[list[ImageLike]]:
    """One list of images per sample from: one image, a flat list (one sample) or one list per sample."""
    if is_image_like(images):
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return [list(images)]
        return [[images]]
    if isinstance(images, (list, tuple)) and images:
        if all(isinstance(sample, (list, tuple)) for sample in images):
            nested = [list(sample) for sample in images]
        elif all(is_image_like(image) for image in images):
            nested = [list(images)]
        else:
            nested = None
        if nested is not None and all(is_image_like(image) for sample in nested for image in sample):
            return nested
    got = type(images).__name__
    if isinstance(images, (list, tuple)):
        items = [i for sample in images for i in (sample if isinstance(sample, (list, tuple)) else [sample])]
        odd = [type(i).__name__ for i in items if not is_image_like(i)]
        got = f"a {got} holding {', '.join(dict.fromkeys(odd))}" if odd else f"an empty or mixed {got}"
    raise ValueError(
        "images must be one image (PIL image, numpy array, torch tensor, file path or bytes), a list of "
        f"images, or one list of images per sample; got {got}"
    )


@dataclass
class _Crop:
    """One image to produce: where it comes from and where it goes in the padded batch."""

    sample: int
    slot: int
    pixels: np.ndarray  # (h, w, C) uint8 or float view
    # a float input in [0, 1]: already scaled, so do_rescale leaves it alone; when resized, its pixels were
    # quantized to uint8 levels (value * 255) for Pillow and are divided by 255 afterwards
    prescaled: bool
    out_size: tuple[int, int]


def _in_unit_range(pixels: np.ndarray) -> bool:
    """A float image already scaled to [0, 1], by transformers' rule for float arrays: not every value a whole
    number, and all of them in [0, 1]."""
    return (
        np.issubdtype(pixels.dtype, np.floating)
        and not np.allclose(pixels, pixels.astype(int))
        and bool(pixels.min() >= 0 and pixels.max() <= 1)
    )


def _quantize_for_resize(pixels: np.ndarray) -> tuple[np.ndarray, bool]:
    """uint8 pixels for Pillow resampling, as the reference converts float arrays before resizing; True
    when the input was a float image in [0, 1] (quantized as value * 255)."""
    if pixels.dtype == np.uint8:
        return pixels, False
    if _in_unit_range(pixels):
        return (pixels.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True
    if np.allclose(pixels, pixels.astype(int)):
        if pixels.min() >= 0 and pixels.max() <= 255:
            return pixels.astype(np.uint8), False
        raise ValueError(f"image values must lie in [0, 255], got [{pixels.min()}, {pixels.max()}]")
    raise ValueError(
        f"float image values must lie in [0, 1] or be whole numbers in [0, 255], got "
        f"[{pixels.min()}, {pixels.max()}]"
    )


def check_options(options: dict[str, Any]) -> None:
    """Every image option has a usable value (they come from checkpoint files and from callers)."""
    for name in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize", "do_pad", "do_image_splitting"):
        if not isinstance(options[name], bool):
            raise ValueError(f"{name} must be true or false, got {options[name]!r}")
    size = options["size"]
    if not isinstance(size, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_EDGE for v in size.values()
    ):
        raise ValueError(f"size must hold edge lengths in pixels (integers in [1, {MAX_EDGE}]), got {size!r}")
    resize_output_size(1, 1, size)  # has the keys of one of the two forms
    if options["resample"] not in RESAMPLE_FILTERS:
        raise ValueError(
            f"resample must be one of Pillow's filters {RESAMPLE_FILTERS}, got {options['resample']!r}"
        )
    for name in ("rescale_factor", "image_mean", "image_std"):
        values = options[name] if isinstance(options[name], (list, tuple)) else [options[name]]
        if not values or not all(_finite_number(v) for v in values) or (name == "image_std" and 0 in values):
            nonzero = " (not 0)" if name == "image_std" else ""
            raise ValueError(
                f"{name} must be a finite number or a list of them{nonzero}, got {options[name]!r}"
            )


def _check_device(device: Any) -> Any:
    if device is None or isinstance(device, torch.device):
        return device
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch device or its name (e.g. 'cuda'), got {device!r}") from None
    return device


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Idefics2ImageProcessor:
    """Turns images into `pixel_values` (batch, images, 3, H, W) float32 and `pixel_attention_mask`
    (batch, images, H, W) int64, padding every image to the batch's largest height and width and every
    sample to the batch's largest image count (with all-zero images)."""

    def __init__(
        self,
        *,
        backend: str = "pil",
        device: str | torch.device | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        **options: Any,
    ) -> None:
        unknown = set(options) - set(DEFAULTS) - {"image_processor_type", "processor_class"}
        if unknown:
            raise ValueError(f"unknown image processor option(s): {sorted(unknown)}")
        self.options = {key: options.get(key, value) for key, value in DEFAULTS.items()}
        if isinstance(self.options["size"], dict):
            self.options["size"] = dict(self.options["size"])
        if max_pixels is not None and (
            not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1
        ):
            raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
        self.backend, self.device, self.max_pixels = backend, _check_device(device), max_pixels
        self._check(self.options, backend)

    # Options are also attributes: `image_processor.do_image_splitting = False` changes the option.
    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in DEFAULTS:
            options = {**self.options, name: value}
            self._check(options, self.backend)
            self.options = options
        else:
            super().__setattr__(name, value)

    @staticmethod
    def _check(options: dict[str, Any], backend: str) -> None:
        if backend not in ("pil", "torch"):
            raise ValueError(f"backend must be 'pil' or 'torch', got {backend!r}")
        check_options(options)
        if backend == "torch" and options["do_resize"] and options["resample"] not in TORCH_MODES:
            raise ValueError(
                f"the torch backend supports resample in {sorted(TORCH_MODES)}, got {options['resample']}"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> Idefics2ImageProcessor:
        options = {key: value for key, value in config.items() if key in DEFAULTS}
        options.update(overrides)
        return cls(**options)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> Idefics2ImageProcessor:
        """Read `preprocessor_config.json` or the `image_processor` section of `processor_config.json`."""
        from ..hub import resolve_checkpoint

        return cls.from_dict(read_image_processor_config(resolve_checkpoint(folder)), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {**self.options, "image_processor_type": "Idefics2ImageProcessor"}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        (path / "preprocessor_config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def __repr__(self) -> str:
        return f"Idefics2ImageProcessor(backend={self.backend!r}, {self.options})"

    def __call__(
        self,
        images: Any,
        *,
        return_tensors: str | None = "pt",
        backend: str | None = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        unknown = set(overrides) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown image processor option(s): {sorted(unknown)}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        opts = {**self.options, **overrides}
        backend = backend or self.backend
        device = _check_device(device) if device is not None else self.device
        self._check(opts, backend)
        if backend == "pil" and device is not None and torch.device(device).type != "cpu":
            raise ValueError("the pil backend runs on the CPU; use backend='torch' for device=" + str(device))

        crops = self._plan(nest_images(images), opts)
        if backend == "pil":
            values, masks = self._run_pil(crops, opts)
        else:
            values, masks = self._run_torch(crops, opts, torch.device(device or "cpu"))
        if not opts["do_pad"]:
            return BatchFeature(pixel_values=_unpadded(values, crops, return_tensors))
        if return_tensors != "pt":
            values, masks = values.cpu().numpy(), masks.cpu().numpy()
        return BatchFeature(pixel_values=values, pixel_attention_mask=masks)

    # ---- planning: what every output image is made from and its size --------------------------------
    def _plan(self, samples: list[list[ImageLike]], opts: dict[str, Any]) -> list[list[_Crop]]:
        planned = []
        for s, sample in enumerate(samples):
            crops: list[_Crop] = []
            for k, image in enumerate(sample):
                try:
                    pixels = to_pixel_array(
                        image, convert_rgb=opts["do_convert_rgb"], max_pixels=self.max_pixels
                    )
                except ValueError as error:
                    raise ValueError(f"sample {s}, image {k}: {error}") from error
                height, width = pixels.shape[:2]
                if opts["do_image_splitting"]:
                    if height < 2 or width < 2:
                        raise ValueError(
                            f"sample {s}, image {k}: a {width}x{height} image cannot be split into 4 crops "
                            "(do_image_splitting needs at least 2x2 pixels)"
                        )
                    parts = [
                        pixels[top:bottom, left:right]
                        for top, bottom, left, right in split_boxes(height, width)
                    ]
                else:
                    parts = [pixels]
                for part in parts:
                    if opts["do_resize"]:
                        try:
                            part, prescaled = _quantize_for_resize(part)
                        except ValueError as error:
                            raise ValueError(f"sample {s}, image {k}: {error}") from error
                        out_size = resize_output_size(part.shape[0], part.shape[1], opts["size"])
                    else:
                        prescaled, out_size = _in_unit_range(part), (part.shape[0], part.shape[1])
                    crops.append(_Crop(s, len(crops), part, prescaled, out_size))
            planned.append(crops)
        return planned

    @staticmethod
    def _allocate(crops: list[list[_Crop]], channels: int, device: torch.device):
        """Zeroed output buffers with the mask filled in. On the CPU they come from numpy, whose large
        zeroed allocations are lazily mapped (and backed by huge pages where the kernel allows): several
        times cheaper than writing zeros into fresh memory."""
        n_images = max((len(sample) for sample in crops), default=0)
        sizes = [crop.out_size for sample in crops for crop in sample]
        if not sizes:
            raise ValueError("no images to process")
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        values_shape = (len(crops), n_images, channels, height, width)
        masks_shape = (len(crops), n_images, height, width)
        if device.type == "cpu":
            values = torch.from_numpy(np.zeros(values_shape, dtype=np.float32))
            masks = torch.from_numpy(np.zeros(masks_shape, dtype=np.int64))
        else:
            values = torch.zeros(values_shape, dtype=torch.float32, device=device)
            masks = torch.zeros(masks_shape, dtype=torch.int64, device=device)
        for sample in crops:
            for crop in sample:
                masks[crop.sample, crop.slot, : crop.out_size[0], : crop.out_size[1]] = 1
        return values, masks

    # ---- pil backend: bit-exact with the reference ---------------------------------------------------
    def _run_pil(self, crops: list[list[_Crop]], opts: dict[str, Any]):
        channels = _channel_count(crops)
        values, masks = self._allocate(crops, channels, torch.device("cpu"))
        out = values.numpy()
        luts = {prescaled: _lookup_table(opts, channels, prescaled) for prescaled in (False, True)}

        def run(crop: _Crop) -> None:
            h, w = crop.out_size
            pixels = crop.pixels
            if opts["do_resize"]:
                image = PIL.Image.fromarray(np.ascontiguousarray(pixels[..., 0] if channels == 1 else pixels))
                pixels = np.asarray(image.resize((w, h), resample=opts["resample"])).reshape(h, w, channels)
            dst = out[crop.sample, crop.slot, :, :h, :w]
            if pixels.dtype == np.uint8:
                _apply_lookup(luts[crop.prescaled], pixels, dst)
            else:
                dst[:] = _float_pixels(np.moveaxis(pixels, -1, 0), opts, crop.prescaled)

        _run_in_threads(run, [crop for sample in crops for crop in sample])
        return values, masks

    # ---- torch backend: batched tensor ops, CPU or GPU -----------------------------------------------
    def _run_torch(self, crops: list[list[_Crop]], opts: dict[str, Any], device: torch.device):
        channels = _channel_count(crops)
        values, masks = self._allocate(crops, channels, device)
        on_cpu = device.type == "cpu"
        luts = {prescaled: _lookup_table(opts, channels, prescaled) for prescaled in (False, True)}
        # Crops of the same source size and output size are resized together.
        groups: dict[tuple, list[_Crop]] = {}
        for sample in crops:
            for crop in sample:
                key = (crop.pixels.shape, crop.pixels.dtype, crop.out_size, crop.prescaled)
                groups.setdefault(key, []).append(crop)

        def run(members: list[_Crop]) -> None:
            (h, w), prescaled = members[0].out_size, members[0].prescaled
            batch = _stack(members, device)  # (n, C, h0, w0), channels-last memory
            if opts["do_resize"]:
                batch = _torch_resize(batch, (h, w), TORCH_MODES[opts["resample"]])
            scale, shift = _affine(opts, channels, prescaled, device)
            for i, crop in enumerate(members):
                dst = values[crop.sample, crop.slot, :, :h, :w]
                if batch.dtype != torch.uint8:
                    dst.copy_(_float_pixels_torch(batch[i], opts, device, prescaled))
                elif on_cpu:  # a table lookup is the cheapest way from uint8 levels to floats on a CPU
                    _apply_lookup(luts[prescaled], batch[i].permute(1, 2, 0).numpy(), dst.numpy())
                else:
                    dst.copy_(batch[i])
                    dst.mul_(scale).add_(shift)

        if on_cpu:
            _run_in_threads(run, list(groups.values()))
        else:
            for members in groups.values():
                run(members)
        return values, masks


def _run_in_threads(fn, items: list) -> None:
    """fn over items on as many threads as torch may use (Pillow, numpy and torch release the GIL)."""
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fn, items):
            pass


def _stack(members: list[_Crop], device: torch.device) -> torch.Tensor:
    """(n, C, h, w) tensor on `device` of equal-shape crops (a view of the pixels for one whole image)."""
    if len(members) == 1 and members[0].pixels.flags.c_contiguous and members[0].pixels.flags.writeable:
        batch = torch.from_numpy(members[0].pixels)[None]
    else:
        batch = torch.empty(
            (len(members), *members[0].pixels.shape), dtype=_torch_dtype(members[0].pixels.dtype)
        )
        staging = batch.numpy()
        for i, crop in enumerate(members):
            staging[i] = crop.pixels
    return batch.to(device).permute(0, 3, 1, 2)


def _apply_lookup(lut: np.ndarray, pixels: np.ndarray, dst: np.ndarray) -> None:
    """dst[c] = lut[c][pixels[..., c]] for (h, w, C) uint8 pixels and a (C, h, w) float32 destination."""
    for c in range(lut.shape[0]):
        np.take(lut[c], pixels[..., c], out=dst[c], mode="clip")


def _channel_count(crops: list[list[_Crop]]) -> int:
    counts = {crop.pixels.shape[-1] for sample in crops for crop in sample}
    if len(counts) > 1:
        raise ValueError(f"all images must have the same number of channels, got {sorted(counts)}")
    return counts.pop() if counts else 3


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}.get(
        np.dtype(dtype), torch.float64
    )


def _per_channel(value: float | Sequence[float], channels: int, name: str) -> np.ndarray:
    values = [value] * channels if isinstance(value, (int, float)) else list(value)
    if len(values) != channels:
        raise ValueError(f"{name} needs {channels} values (one per channel), got {len(values)}")
    return np.asarray(values, dtype=np.float64)


def _lookup_table(opts: dict[str, Any], channels: int, prescaled: bool) -> np.ndarray:
    """(C, 256) float32: the value each uint8 level ends up as, computed with the reference's dtypes
    (rescale in float64 then float32, normalize in float32)."""
    levels = np.arange(256, dtype=np.float64)
    x = (levels * (1 / 255)).astype(np.float32) if prescaled else levels.astype(np.float32)
    if opts["do_rescale"] and not prescaled:
        x = (x.astype(np.float64) * opts["rescale_factor"]).astype(np.float32)
    x = np.broadcast_to(x, (channels, 256))
    if opts["do_normalize"]:
        mean = _per_channel(opts["image_mean"], channels, "image_mean").astype(np.float32)
        std = _per_channel(opts["image_std"], channels, "image_std").astype(np.float32)
        x = (x - mean[:, None]) / std[:, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def _float_pixels(pixels: np.ndarray, opts: dict[str, Any], prescaled: bool) -> np.ndarray:
    """(C, h, w) float pixels (no resize happened) rescaled (unless already in [0, 1]) and normalized like
    the reference."""
    x = pixels
    if opts["do_rescale"] and not prescaled:
        x = (x.astype(np.float64) * opts["rescale_factor"]).astype(np.float32)
    if opts["do_normalize"]:
        channels = x.shape[0]
        mean = _per_channel(opts["image_mean"], channels, "image_mean").astype(x.dtype)
        std = _per_channel(opts["image_std"], channels, "image_std").astype(x.dtype)
        x = (x - mean[:, None, None]) / std[:, None, None]
    return x


def _float_pixels_torch(
    pixels: torch.Tensor, opts: dict[str, Any], device: torch.device, prescaled: bool
) -> torch.Tensor:
    x = pixels.to(torch.float32)
    channels = x.shape[0]
    if opts["do_rescale"] and not prescaled:
        x = x * opts["rescale_factor"]
    if opts["do_normalize"]:
        mean = torch.tensor(_per_channel(opts["image_mean"], channels, "image_mean"), dtype=torch.float32)
        std = torch.tensor(_per_channel(opts["image_std"], channels, "image_std"), dtype=torch.float32)
        x = (x - mean.to(device)[:, None, None]) / std.to(device)[:, None, None]
    return x


def _affine(opts: dict[str, Any], channels: int, prescaled: bool, device: torch.device):
    """(C, 1, 1) scale and shift turning uint8 levels into normalized values (level * scale + shift)."""
    scale = np.full(channels, 1 / 255 if prescaled else 1.0)
    shift = np.zeros(channels)
    if opts["do_rescale"] and not prescaled:
        scale = scale * opts["rescale_factor"]
    if opts["do_normalize"]:
        mean = _per_channel(opts["image_mean"], channels, "image_mean")
        std = _per_channel(opts["image_std"], channels, "image_std")
        scale, shift = scale / std, -mean / std
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32, device=device)[:, None, None]
    return as_tensor(scale), as_tensor(shift)


def _torch_resize(batch: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Antialiased resize of (n, C, h, w) to `size`, returning uint8 levels like Pillow does.
    CPU uint8 tensors are resized directly; elsewhere the resize runs in float32 and is rounded."""
    if batch.dtype == torch.uint8 and batch.device.type == "cpu" and mode == "bilinear":
        return F.interpolate(batch, size=size, mode=mode, antialias=True, align_corners=False)
    resized = F.interpolate(batch.float(), size=size, mode=mode, antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8) if batch.dtype == torch.uint8 else resized


def _unpadded(values: torch.Tensor, crops: list[list[_Crop]], return_tensors: str | None):
    """do_pad=False: one list per sample of (C, h, w) images at their own size."""
    nested = [
        [values[c.sample, c.slot, :, : c.out_size[0], : c.out_size[1]] for c in sample] for sample in crops
    ]
    if return_tensors == "pt":
        return nested
    return [[image.cpu().numpy() for image in sample] for sample in nested]


def read_image_processor_config(folder: Path) -> dict[str, Any]:
    """Image options from a checkpoint folder (hub layout or transformers-5 layout); {} if none."""
    from ..hub import CheckpointError, read_json

    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        return read_json(preprocessor, what="image processor config")
    processor = folder / "processor_config.json"
    section = read_json(processor, what="processor config").get("image_processor", {})
    if not isinstance(section, dict):
        raise CheckpointError(f"{processor}: image_processor must be an object, got {type(section).__name__}")
    return section
