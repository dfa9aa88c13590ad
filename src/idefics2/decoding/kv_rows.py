"""The decode core's KV cache: `rows` x `length` slots per layer, one row per running request (the engine) or
per prompt of the batch (`generate`).

Running requests always hold rows [0, n): when one leaves, the request in the last row moves into its row
(only the slots it has filled are copied), so a decode step reads the cache as one contiguous view, never
gathering rows. A request's tokens sit at slots 0, 1, 2, ... of its row, so a slot is also its position.

Two views implement the `update` that the decoder's attention layers call (see modeling/text.py):
- `PrefillView`: rows [start, stop), each writing the same consecutive slots (cache_position (T,));
- `DecodeView`: rows [start, stop), one new token each, at each row's own slot (cache_position (B,)).
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVCache(Protocol):
    """What the model's `new_kv_cache` returns (modeling.text.KVCache): one key and one value buffer per
    layer, each (rows, n_kv_heads, max_length, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    max_length: int


class RowKVCache:
    def __init__(self, model: torch.nn.Module, rows: int, length: int) -> None:
        self.cache: KVCache = model.new_kv_cache(rows, length)
        self.rows, self.length = rows, length
        self.decode_views: dict[tuple[int, int], DecodeView] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.cache.keys, *self.cache.values))

    def move_row(self, source: int, target: int, filled: int) -> None:
        """Copy the first `filled` slots of row `source` into row `target`."""
        for buffer in (*self.cache.keys, *self.cache.values):
            buffer[target, :, :filled].copy_(buffer[source, :, :filled])

    def prefill_view(self, start: int, stop: int) -> PrefillView:
        return PrefillView(self.cache, start, stop)

    def decode_view(self, start: int, stop: int) -> DecodeView:
        """Rows [start, stop) for a decode step (kept: every step of the same rows reuses it)."""
        view = self.decode_views.get((start, stop))
        if view is None:
            view = self.decode_views[start, stop] = DecodeView(self.cache, start, stop)
        return view


class PrefillView:
    """Rows [start, stop) of the cache as a KVCache, every row writing the same slots."""

    def __init__(self, cache: KVCache, start: int, stop: int) -> None:
        self.keys = [k[start:stop] for k in cache.keys]
        self.values = [v[start:stop] for v in cache.values]
        self.batch_size = stop - start
        self.max_length = cache.max_length

    def update(self, layer: int, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int):
        """k, v (B, Hkv, T, D) written at slots cache_position (T,); returns slots [0, length)."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, cache_position, k.to(keys.dtype))
        values.index_copy_(2, cache_position, v.to(values.dtype))
        return keys[:, :, :length], values[:, :, :length]


class DecodeView:
    """Rows [start, stop) of the cache, each writing its one new token at its own slot."""

    def __init__(self, cache: KVCache, start: int, stop: int) -> None:
        self.keys = [k[start:stop] for k in cache.keys]
        self.values = [v[start:stop] for v in cache.values]
        self.batch_size = stop - start
        self.rows = torch.arange(stop - start, device=cache.keys[0].device)

    def row_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values (B, Hkv, max_length, D), for a caller that writes each row's new token
        at its slot itself (the decoder's fused rotary-and-store on CPU)."""
        return self.keys[layer], self.values[layer]

    def update(self, layer: int, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int):
        """k, v (B, Hkv, 1, D) written at slot cache_position[b] of row b; returns slots [0, length)."""
        keys, values = self.keys[layer], self.values[layer]
        keys[self.rows, :, cache_position] = k[:, :, 0].to(keys.dtype)
        values[self.rows, :, cache_position] = v[:, :, 0].to(values.dtype)
        return keys[:, :, :length], values[:, :, :length]
