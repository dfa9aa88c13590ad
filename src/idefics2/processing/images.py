"""Image inputs: loading from files or bytes, validation, and conversion to RGB pixel arrays."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

ImageLike = PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes | io.IOBase

# The default pixel limit follows Pillow's decompression-bomb threshold (warning level).
DEFAULT_MAX_PIXELS: int = PIL.Image.MAX_IMAGE_PIXELS or 89_478_485


def is_image_like(obj: Any) -> bool:
    """True for one image: a PIL image, array, tensor, file path, encoded bytes or a binary file object."""
    return isinstance(
        obj, (PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike, bytes, bytearray)
    ) or is_file_object(obj)


def is_file_object(obj: Any) -> bool:
    """An open binary file or stream (io.BytesIO, open(path, "rb"), an HTTP response...): it has read()."""
    return callable(getattr(obj, "read", None)) and not isinstance(obj, PIL.Image.Image)


def check_pixel_count(height: int, width: int, max_pixels: int | None, what: str = "image") -> None:
    if height <= 0 or width <= 0:
        raise ValueError(
            f"{what} has zero size ({width}x{height} pixels); every image needs at least 1x1 pixels"
        )
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(
            f"{what} has {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
            "(a possible decompression bomb); raise `max_pixels` if the image is trusted"
        )


def open_image(
    source: str | os.PathLike | bytes | bytearray | io.IOBase, max_pixels: int | None = DEFAULT_MAX_PIXELS
):
    """Decode an image file (path), encoded bytes or a binary file object (read from its current position)
    into a fully loaded PIL image, with clear errors."""
    if is_file_object(source):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(
                f"image file object {type(source).__name__} gave {type(data).__name__}, not bytes: "
                "open the file in binary mode ('rb')"
            )
        name, stream = f"image file object {type(source).__name__}", io.BytesIO(bytes(data))
    elif isinstance(source, (bytes, bytearray)):
        name, stream = "image bytes", io.BytesIO(bytes(source))
    else:
        path = Path(source)
        name = f"image file {str(path)!r}"
        try:
            found = path.is_file()
        except OSError as error:  # e.g. a name longer than the file system allows
            raise ValueError(f"{name} cannot be opened: {error.strerror}") from None
        if not found:
            raise ValueError(f"{name} does not exist (images given as str must be paths to local files)")
        stream = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(stream)
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"{name} is too large to decode safely: {error}") from error
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{name} is not a readable image (unknown or unsupported format)") from error
    except Exception as error:  # a corrupt header: Pillow's format plugins raise all sorts of exceptions
        raise _undecodable(name, error) from error
    check_pixel_count(image.height, image.width, max_pixels, name)
    return decoded(image, name)


def _undecodable(name: str, error: Exception) -> ValueError:
    """The error for an image whose data Pillow cannot decode; Pillow's own message is kept as a detail."""
    return ValueError(
        f"{name} could not be decoded (truncated or corrupt file?): {type(error).__name__}: {error}"
    )


def decoded(image: PIL.Image.Image, name: str = "PIL image") -> PIL.Image.Image:
    """The image with its pixels decoded: a PIL image opened from a file decodes them lazily, and a truncated
    or corrupt file only fails then. Its EXIF orientation is read here too (a corrupt EXIF block fails)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image.load()
            image.getexif()
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"{name} is too large to decode safely: {error}") from error
    except Exception as error:  # Pillow's decoders and plugins raise all sorts of exceptions on corrupt data
        raise _undecodable(name, error) from error
    return image


def load_rgb(source: ImageLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageLike:
    """What the processor does to each input: files, bytes and file objects are decoded, PIL images are
    turned upright (EXIF orientation) and converted to RGB with Pillow's own conversion (alpha dropped, not
    composited); arrays and tensors pass through unchanged."""
    if isinstance(source, (str, os.PathLike, bytes, bytearray)) or is_file_object(source):
        source = open_image(source, max_pixels)
    if not isinstance(source, PIL.Image.Image):
        return source
    check_pixel_count(source.height, source.width, max_pixels)
    source = decoded(source)
    if source.getexif().get(0x0112, 1) != 1:  # EXIF orientation tag
        try:
            source = PIL.ImageOps.exif_transpose(source)
        except Exception as error:  # an orientation Pillow cannot apply (a corrupt EXIF block)
            raise ValueError(
                f"the image's EXIF orientation cannot be applied: {type(error).__name__}"
            ) from error
    if source.mode == "RGB" and "transparency" not in source.info:
        return source  # converting again would only copy it
    return _converted(source, "RGB")


def _converted(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """Pillow's conversion to `mode`, with a clear error. Premultiplied "La", which Pillow converts to "LA"
    only, goes through "LA"."""
    try:
        if image.mode == "La" and mode != "LA":
            image = image.convert("LA")
        return image.convert(mode)
    except Exception as error:  # e.g. a "transparency" entry Pillow cannot apply
        raise ValueError(
            f"a {image.mode} image cannot be converted to {mode}: {type(error).__name__}"
        ) from error


def _rgb_from_pil(image: PIL.Image.Image) -> np.ndarray:
    """(H, W, 3) uint8; transparency is composited on a white background."""
    if image.mode == "La":  # its alpha band is "a": make it "A"
        image = _converted(image, "LA")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = _converted(image, "RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, rgba)
    if image.mode != "RGB":
        image = _converted(image, "RGB")
    return np.asarray(image)


def _channels_last(array: np.ndarray) -> np.ndarray:
    """(H, W, C) view of a 2-D or 3-D array; channels-first wins when both ends could be channels."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(
            f"an image array must have 2 or 3 dimensions (HW, HWC or CHW), got shape {array.shape}"
        )
    if array.shape[0] in (1, 3, 4):
        if array.shape[-1] in (1, 3, 4):
            warnings.warn(
                f"image array of shape {array.shape} could be channels-first or channels-last; "
                "reading it as channels-first (C, H, W)",
                stacklevel=3,
            )
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] in (1, 3, 4):
        return array
    raise ValueError(
        f"cannot tell the channel axis of image array with shape {array.shape} (need 1, 3 or 4 channels)"
    )


def _array_from_tensor(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy array of an image tensor; dtypes numpy lacks (bfloat16, float8) become float32."""
    if tensor.is_meta:
        raise ValueError("an image tensor on the meta device has no data")
    if tensor.is_complex():
        raise ValueError(f"unsupported image tensor dtype {tensor.dtype} (complex)")
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.float()
    try:
        return tensor.detach().cpu().numpy()
    except TypeError as error:  # a dtype numpy has no equivalent for
        raise ValueError(f"unsupported image tensor dtype {tensor.dtype}") from error


def _as_pixel_dtype(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating):
        return array
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"integer image values must lie in [0, 255], got [{array.min()}, {array.max()}]")
        return array.astype(np.uint8)
    raise ValueError(f"unsupported image array dtype {array.dtype}")


def _rgb_from_array(array: np.ndarray) -> np.ndarray:
    """(H, W, 3) array of the same dtype; 1 channel is repeated, 4 channels are composited on white."""
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        integer = array.dtype == np.uint8
        if not integer and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"a float RGBA image must lie in [0, 1], got [{array.min()}, {array.max()}]")
        white = 255 if integer else 1.0
        alpha = array[..., 3:4] / white
        blended = alpha * array[..., :3] + (1 - alpha) * white
        return (np.round(blended) if integer else blended).astype(array.dtype)
    return array


def to_pixel_array(
    image: ImageLike, *, convert_rgb: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """One image as an (H, W, C) array, uint8 or float (C = 3 when `convert_rgb`)."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray)) or is_file_object(image):
        image = load_rgb(image, max_pixels)
    if isinstance(image, PIL.Image.Image):
        check_pixel_count(image.height, image.width, max_pixels)
        image = decoded(image)
        if convert_rgb:
            return _rgb_from_pil(image)
        array = np.asarray(image)
        return array[:, :, None] if array.ndim == 2 else array
    if isinstance(image, torch.Tensor):
        image = _array_from_tensor(image)
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"unsupported image type {type(image).__name__}: expected a PIL image, numpy array, torch "
            "tensor, file path, encoded bytes or a binary file object"
        )
    array = _as_pixel_dtype(_channels_last(image))
    check_pixel_count(array.shape[0], array.shape[1], max_pixels)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError("image array contains NaN or infinite values")
    return _rgb_from_array(array) if convert_rgb else array
