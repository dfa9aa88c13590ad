"""Image features (vision tower + connector output) kept by the image's content, least recently used first
out, within a byte budget: a conversation that sends its image again every turn skips the vision tower."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import PIL.Image
import torch


def image_key(image: PIL.Image.Image, settings: str) -> str:
    """A digest of the decoded pixels (mode, size, bytes) and of the processing settings that shape the
    features (e.g. image splitting): equal pixels give equal keys whatever file or format they came from."""
    digest = hashlib.sha256()
    digest.update(f"{settings}|{image.mode}|{image.size}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Thread-safe LRU map: image key -> features (n_crops, n_latents, hidden), at most `max_bytes` in all.

    A tensor larger than the whole budget is not kept. `hits` and `misses` count the lookups made with
    `get(key)`; `get(key, count=False)` looks again without counting (the engine counts each image of a
    request once, when it is submitted, and looks again later in case another request has encoded it since).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the image feature cache needs a budget >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, count: bool = True) -> torch.Tensor | None:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += count
                return None
            self._entries.move_to_end(key)
            self.hits += count
            return features

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._entries[key] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()
