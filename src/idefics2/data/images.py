"""One image of a row, as datasets hold them: a file path, encoded bytes, a `{"bytes", "path"}` struct (the
`datasets` Image feature, as Parquet stores it), or a PIL image; decoded to an upright RGB PIL image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_image(value: Any, base_dir: str | os.PathLike | None = None):
    """The RGB PIL image of `value`; a relative path is read from `base_dir`. ValueError saying what is
    wrong (a missing file, a folder, bytes that are no image, a value that is no image at all)."""
    import PIL.Image

    from idefics2.processing.images import load_rgb

    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError('an image struct holds neither "bytes" nor "path"')
    if isinstance(value, (str, os.PathLike)):
        return load_rgb(image_file(value, base_dir))
    if isinstance(value, (bytes, bytearray, PIL.Image.Image)):
        return load_rgb(value)
    raise ValueError(
        f'an image must be a file path, encoded bytes, a {{"bytes", "path"}} struct or a PIL image, '
        f"got {type(value).__name__}"
    )


def image_file(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> Path:
    """The image file's path (`~` expanded, relative to `base_dir`), checked to be an existing file."""
    path = Path(path).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    try:
        folder, found = path.is_dir(), path.is_file()
    except OSError as error:  # e.g. a name longer than the file system allows
        raise ValueError(f"cannot open image {path}: {error.strerror}") from None
    if folder:
        raise ValueError(f"{path} is a folder, not an image file")
    if not found:
        raise ValueError(f"image not found: {path}")
    return path
