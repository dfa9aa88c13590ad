"""CUDA-graph decode steps: one token per row replayed from a captured graph, with no host synchronisation.

A decode step of a large model launches hundreds of small kernels; replaying them as one CUDA graph removes
the launch cost. The graph reads its inputs from static buffers (token, slot, key-padding mask over the
whole cache) and attends over every slot of the cache, masked by slot, so one capture serves every step of
a generation. One graph is captured per KV cache (the graph writes into that cache's buffers); `generate`
takes its caches from a small pool, so later generations of the same batch size and length bucket replay the
graph captured by the first one.

`generate` calls the graphs itself (the model's forward never does): `model.decode_graphs()`. A graph replays
the kernels and the memory it was captured with, so every graph and compiled step is dropped at its next use
once the model's `weights_version` has moved (LoRA adapters added, loaded or merged, quantization,
load_state_dict, dtype or device moves; see `Idefics2ForConditionalGeneration.weights_changed`). The logits
handed back are a copy, never the graph's output buffer that the next replay overwrites.

With `compile=True` the step is first compiled with torch.compile (its many small element-wise kernels fused),
then captured: measured on one H100 with the idefics2-8b shapes, 6.5 ms a step instead of 8.7 ms, for a
one-time compile of about a minute per batch size and length bucket.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from idefics2.modeling.attention import causal_mask
from idefics2.modeling.text import KVCache


def capture(run: Callable[[], torch.Tensor], pool: Any = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture `run` (a step on static buffers) as a CUDA graph, after two warm-up runs on a side stream
    (compilation, kernel choice and workspaces happen outside the graph): (graph, its output buffer). Graphs
    given the same `pool` (an earlier graph's `pool()`) share their memory. Other threads may keep working
    meanwhile (thread-local capture mode). The one place graphs are captured; tests replace it on the CPU."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = run()
    return graph, output


class GraphedDecodeStep:
    """Replays `lm_head(decoder(embed(token)))` for one new token per row, writing into one KV cache.

    The cache is passed on every call (not kept here, so that it can be freed with its registry entry); the
    graph captured on the first call reads and writes that cache's buffers.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_length: int, compile: bool = False) -> None:
        self.model = model
        self.run = torch.compile(self.step, dynamic=False) if compile else self.step
        device = model.lm_head.weight.device
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def step(self, cache: KVCache) -> torch.Tensor:
        """The decode step on the static buffers (what the graph captures); logits (B, 1, vocab)."""
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, max_length)
        position_ids = positions.index_select(1, self.slot)  # (B, 1)
        mask = causal_mask(self.mask, self.slot, self.model.config.text_config.sliding_window)  # (B, 1, 1, L)
        return self.model.decode_logits(self.tokens, position_ids, mask, cache, self.slot)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache_position: torch.Tensor,
        cache: KVCache,
    ) -> torch.Tensor:
        """input_ids (B, 1), attention_mask (B, S) (slots [0, S)), cache_position (1,) -> logits (B, 1, V),
        a copy of the graph's output."""
        length = attention_mask.shape[1]
        self.tokens.copy_(input_ids)
        self.slot.copy_(cache_position)
        self.mask[:, :length].copy_(attention_mask)
        self.mask[:, length:].zero_()
        if self.graph is None:
            # the warm-up steps write this slot's key and value too: the same values the replay writes
            self.graph, self.logits = capture(lambda: self.run(cache))
        self.graph.replay()
        return self.logits.clone()


class CudaGraphDecoder:
    """One model's graphed decode steps, one per live KV cache and `compile` setting (the model's
    `compile_decode`), all dropped when the model's weights_version moves; falls back (once, with a warning)
    to the ordinary forward when capture fails."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps: weakref.WeakKeyDictionary[KVCache, dict[bool, GraphedDecodeStep]] = (
            weakref.WeakKeyDictionary()
        )
        self.weights_version = model.weights_version
        self.failed = False

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache_position: torch.Tensor,
        kv_cache: KVCache,
    ) -> torch.Tensor | None:
        """One decode step: input_ids (B, 1), attention_mask (B, S), cache_position (1,) -> logits (B, 1, V)
        from the graph, or None when graphs are off for this model (capture failed: run eagerly)."""
        if self.failed:
            return None
        if self.model.weights_version != self.weights_version:  # the graphs replay the old weights
            self.steps = weakref.WeakKeyDictionary()
            self.weights_version = self.model.weights_version
        compile = bool(getattr(self.model, "compile_decode", False))
        steps = self.steps.setdefault(kv_cache, {})
        if compile not in steps:
            steps[compile] = GraphedDecodeStep(self.model, kv_cache.batch_size, kv_cache.max_length, compile)
        try:
            return steps[compile](input_ids, attention_mask.to(torch.long), cache_position, kv_cache)
        except RuntimeError as error:  # e.g. an operation that cannot be captured on this setup
            self.failed = True
            self.steps.pop(kv_cache, None)
            warnings.warn(f"CUDA graph decoding disabled, running eagerly: {error}", stacklevel=3)
            return None


class DecodeCachePool:
    """KV caches kept between generations, so that a cache's captured (and compiled) decode graph is reused.

    `take` hands out an idle cache of the same batch size, dtype, device and length bucket (the length rounded
    up to a multiple of `bucket`), zeroed, or a new one; `give_back` returns it. A cache is never handed out
    twice at once, so concurrent generations on one model get separate caches. At most `size` idle caches are
    kept (the most recently returned).
    """

    def __init__(self, bucket: int = 256, size: int = 4) -> None:
        self.bucket, self.size = bucket, size
        self.idle: list[KVCache] = []
        self.lock = threading.Lock()

    def take(self, model, batch_size: int, length: int, device: torch.device) -> KVCache:
        slots = -(-length // self.bucket) * self.bucket
        with self.lock:
            for i, cache in enumerate(self.idle):
                if (
                    cache.batch_size == batch_size
                    and cache.max_length == slots
                    and cache.keys[0].dtype == model.dtype
                    and cache.keys[0].device == device
                ):
                    del self.idle[i]
                    break
            else:
                cache = None
        if cache is None:
            return model.new_kv_cache(batch_size, slots, device=device)
        for buffer in (*cache.keys, *cache.values):  # no values of an earlier generation stay behind
            buffer.zero_()
        return cache

    def give_back(self, cache: KVCache) -> None:
        with self.lock:
            self.idle.append(cache)
            del self.idle[: -self.size]
