"""Images named in requests: `data:` URLs (always), `file://` URLs (only under the allowed folder) and
http(s) URLs (only when remote images are allowed, through remote.py's guarded fetch). A request's images
are loaded concurrently, a few at a time."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from idefics2.server.errors import APIError
from idefics2.server.remote import RemoteImageError, RemotePolicy, fetch_remote, for_log

# the one answer to any remote image that failed: which of refused, unreachable, closed, slow or not an image
# it was stays in the log, or a client could map the server's network with it
UNUSABLE_URL = "the image URL could not be used"
LOADS_AT_ONCE = 4  # per request
_B64_SLICE = 2**20  # base64 characters decoded per call (a multiple of 4)
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,")
log = logging.getLogger("idefics2.server")


@dataclass
class MediaPolicy:
    allowed_local_path: Path | None = None  # file:// URLs must resolve inside this folder
    remote: RemotePolicy | None = None  # None: http(s) URLs are refused


async def load_images(
    urls: list[tuple[str, str]],
    policy: MediaPolicy,
    on_remote_failure: Callable[[str], None],
    threads: anyio.CapacityLimiter | None = None,
) -> list[bytes]:
    """The encoded image bytes of each (URL, the request field that named it), in order, at most
    LOADS_AT_ONCE loading at a time; the first failure as APIError(400, param=...), the others cancelled.
    `on_remote_failure` is told the reason (remote.REASONS) of a remote image that failed; `threads` bounds
    the worker threads that decode data: URLs and read files (the server's preparation slots)."""
    slots = asyncio.Semaphore(LOADS_AT_ONCE)

    async def load(url: str, param: str) -> bytes:
        async with slots:
            return await load_image(url, policy, param, on_remote_failure, threads)

    tasks = [asyncio.ensure_future(load(url, param)) for url, param in urls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def load_image(
    url: str,
    policy: MediaPolicy,
    param: str,
    on_remote_failure: Callable[[str], None],
    threads: anyio.CapacityLimiter | None = None,
) -> bytes:
    """The encoded image bytes an image URL names; APIError(400, param=...) when it cannot be used."""
    if not isinstance(url, str) or not url:
        raise APIError(400, "an image URL must be a non-empty string", param=param)
    if url.startswith("data:"):
        return await anyio.to_thread.run_sync(_data_url, url, param, limiter=threads)
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "file":
        return await anyio.to_thread.run_sync(_local_file, url, policy, param, limiter=threads)
    if scheme not in ("http", "https"):
        raise APIError(400, f"unsupported image URL scheme {scheme or url[:16]!r}: use data:, file:// or "
                       "http(s)", param=param)  # fmt: skip
    if policy.remote is None:
        message = "remote image URLs are off on this server (--allow-remote-images); send a data: URL"
        raise APIError(400, message, param=param, code="remote_images_disabled")
    try:
        return await fetch_remote(url, policy.remote)
    except RemoteImageError as error:
        log.warning("image URL %s (%s) refused: %s: %s", for_log(url), param, error.reason, error.detail)
        on_remote_failure(error.reason)
        raise APIError(400, UNUSABLE_URL, param=param, code="image_url_unusable") from None


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
    try:
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
    except ValueError:
        raise APIError(400, "not a valid file:// URL", param=param) from None
    root = policy.allowed_local_path.resolve()
    if not path.is_relative_to(root):
        raise APIError(
            400, f"file:// image URLs must point inside {root}", param=param, code="forbidden_path"
        )
    if not path.is_file():
        raise APIError(400, f"no such image file: {path}", param=param)
    return path.read_bytes()
