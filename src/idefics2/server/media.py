"""Images named in requests: `data:` URLs (always), `file://` URLs (only under the allowed folder) and
http(s) URLs (only when remote images are allowed; with a byte cap, a timeout and a content-type check)."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from idefics2.server.errors import APIError

_B64_SLICE = 2**20  # base64 characters decoded per call (a multiple of 4)
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,")


@dataclass
class MediaPolicy:
    allowed_local_path: Path | None = None  # file:// URLs must resolve inside this folder
    allow_remote: bool = False
    remote_max_bytes: int = 20 * 2**20
    remote_timeout_s: float = 10.0


def fetch_image(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The encoded image bytes an image URL names; APIError(400, param=...) when it cannot be used."""
    if not isinstance(url, str) or not url:
        raise APIError(400, "an image URL must be a non-empty string", param=param)
    if url.startswith("data:"):
        return _data_url(url, param)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        return _local_file(url, policy, param)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            message = "remote image URLs are off on this server (--allow-remote-images); send a data: URL"
            raise APIError(400, message, param=param, code="remote_images_disabled")
        return _remote(url, policy, param)
    raise APIError(400, f"unsupported image URL scheme {scheme or url[:16]!r}: use data:, file:// or http(s)",
                   param=param)  # fmt: skip


def _data_url(url: str, param: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise APIError(400, "a data: image URL must be data:image/<type>;base64,<data>", param=param)
    if match.group("type") and not match.group("type").startswith("image/"):
        raise APIError(400, f"the data: URL holds {match.group('type')}, not an image", param=param)
    payload = url[match.end() :]
    try:
        # in slices, each holding the GIL a few ms: a large image never stalls the event loop for long
        slices = [payload[i : i + _B64_SLICE] for i in range(0, len(payload), _B64_SLICE)]
        if any("=" in part for part in slices[:-1]):
            raise ValueError("padding before the end")
        return b"".join(base64.b64decode(part, validate=True) for part in slices)
    except (binascii.Error, ValueError):
        raise APIError(400, "the data: URL's base64 payload is not valid base64", param=param) from None


def _local_file(url: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.allowed_local_path is None:
        message = "file:// image URLs are off on this server (--allowed-local-media-path DIR)"
        raise APIError(400, message, param=param, code="local_media_disabled")
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
    root = policy.allowed_local_path.resolve()
    if not path.is_relative_to(root):
        raise APIError(
            400, f"file:// image URLs must point inside {root}", param=param, code="forbidden_path"
        )
    if not path.is_file():
        raise APIError(400, f"no such image file: {path}", param=param)
    return path.read_bytes()


def _remote(url: str, policy: MediaPolicy, param: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "idefics2-server"})
    try:
        with urllib.request.urlopen(request, timeout=policy.remote_timeout_s) as response:
            kind = response.headers.get_content_type()
            if not kind.startswith("image/"):
                raise APIError(400, f"{url} answered with content type {kind}, not an image", param=param)
            data = response.read(policy.remote_max_bytes + 1)
    except APIError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise APIError(400, f"could not fetch the image {url}: {reason}", param=param) from None
    if len(data) > policy.remote_max_bytes:
        raise APIError(400, f"the image at {url} is larger than {policy.remote_max_bytes} bytes", param=param)
    return data
