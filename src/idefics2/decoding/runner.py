"""The model calls of the decode core: image features, prompts into cache rows (whole or in chunks), and
decode steps over many rows, each at its own cache slot; `generate` and the serving engine both run on it.

A runner owns one row KV cache (see kv_rows.py) and, on CUDA, its captured decode graphs (see graphs.py).
Everything runs on the thread that owns the runner, under no_grad / inference mode. Logits come back as
float32: the sampling controls work in float32 whatever the model dtype.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from idefics2.decoding.graphs import LENGTH_BUCKET, DecodeGraphs
from idefics2.decoding.kv_rows import RowKVCache


class ModelRunner:
    def __init__(self, model: torch.nn.Module, rows: int, length: int) -> None:
        self.model = model
        self.device = model.lm_head.weight.device
        self.cache = RowKVCache(model, rows, length)
        self.window = model.config.text_config.sliding_window
        self.rows, self.length = rows, length
        self.slot_numbers = torch.arange(length, device=self.device)  # read by every decode step's mask
        use_graphs = self.device.type == "cuda" and getattr(model, "cuda_graphs", False)
        self.graphs = DecodeGraphs(model, self.decode_step, rows, length) if use_graphs else None

    def image_features(self, images: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Processed images, each (pixel_values (1, N, C, H, W), pixel_attention_mask (1, N, H, W)), encoded
        in one call (crops padded to the largest, padding masked) -> features (N, n_latents, hidden) each."""
        height = max(pixels.shape[-2] for pixels, _ in images)
        width = max(pixels.shape[-1] for pixels, _ in images)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]))
        pixel_values = torch.cat([pad(pixels) for pixels, _ in images], dim=1)
        pixel_mask = torch.cat([pad(mask) for _, mask in images], dim=1)
        features = self.model.get_image_features(
            pixel_values.to(device=self.device, dtype=self.model.dtype), pixel_mask.to(self.device)
        )
        parts = features.split([pixels.shape[1] for pixels, _ in images])
        # copies, so that a cached image's features do not keep the whole batch's tensor alive
        return [part.clone() for part in parts] if len(parts) > 1 else list(parts)

    def embed_prompt(self, input_ids: list[int], image_features: torch.Tensor | None) -> torch.Tensor:
        """Prompt embeddings (1, P, hidden) with the image features at the `<image>` tokens."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        return self.model.embed_inputs(ids, image_features)

    def prefill(self, row: int, embeds: torch.Tensor, start: int, want_logits: bool) -> torch.Tensor | None:
        """Write prompt positions [start, start + T) of `row` from embeds (1, T, hidden); the last position's
        logits (V,) when `want_logits`."""
        stop = start + embeds.shape[1]
        slots = torch.arange(start, stop, device=self.device)
        # a whole prompt from slot 0 is plain causal attention (no mask), exactly as `generate`'s prefill
        mask = None if start == 0 else torch.ones(1, stop, dtype=torch.long, device=self.device)
        hidden = self.model.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            kv_cache=self.cache.prefill_view(row, row + 1),
            cache_position=slots,
        ).last_hidden_state
        if not want_logits:
            return None
        return self.model.lm_head(hidden[0, -1:]).float()[0]

    def prefill_whole(self, first_row: int, embeds: list[torch.Tensor]) -> torch.Tensor:
        """Whole prompts, embeds[i] (1, P_i, hidden), into rows first_row + i, as one right-padded batch:
        plain causal attention, so a real position never sees the padding after it (padding positions write
        slots the request overwrites before it reads them). The logits (B, V) of each last real position."""
        lengths = [e.shape[1] for e in embeds]
        longest = max(lengths)
        batch = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])) for e in embeds])
        hidden = self.model.model(
            inputs_embeds=batch,
            kv_cache=self.cache.prefill_view(first_row, first_row + len(embeds)),
            cache_position=torch.arange(longest, device=self.device),
        ).last_hidden_state
        last = hidden[torch.arange(len(embeds)), torch.tensor(lengths) - 1]  # (B, hidden)
        return self.model.lm_head(last).float()

    def decode(
        self, tokens: torch.Tensor | list[int], positions: torch.Tensor | list[int], start: int = 0
    ) -> torch.Tensor:
        """One new token for each of rows [start, start + B) at its own slot: tokens (B,), positions (B,)
        (tensors or lists); logits (B, V) float32.

        On CPU the step runs as one C call where the model allows (model.c_decode_logits); on CUDA (with
        model.cuda_graphs) rows [0, B) replay a captured graph for their batch-size and length bucket."""
        if self.device.type == "cpu":  # the whole step in one C call where it runs (little Python per token)
            token_list = tokens if isinstance(tokens, list) else tokens.tolist()
            position_list = positions if isinstance(positions, list) else positions.tolist()
            view = self.cache.decode_view(start, start + len(token_list))
            logits = self.model.c_decode_logits(token_list, position_list, view)
            if logits is not None:
                return logits
        # the slots to attend over, read where the positions are known (a list: no device read)
        n_keys = (max(positions) if isinstance(positions, list) else int(positions.max())) + 1
        token_ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device)  # (B,)
        slots = torch.as_tensor(positions, dtype=torch.long, device=self.device)  # (B,)
        if self.graphs is not None and start == 0:
            logits = self.graphs(token_ids, slots, n_keys)
            if logits is not None:
                return logits
        return self.decode_step(token_ids[:, None], slots, n_keys, start)

    def decode_greedy(
        self, tokens: list[int], positions: list[int], start: int = 0, excluded: list[list[int]] | None = None
    ) -> list[int] | None:
        """The same step as `decode`, giving each row's greedy token (its logits' first largest, row b's
        `excluded[b]` ids left out: sampler.greedy_exclusions) instead of its logits, where that is cheaper:
        on CPU, a step in one C call picks the tokens itself (no logits back to Python), and with a float32
        or bfloat16 head reads the head's int8 copy and computes only the logits that could be the largest
        (model.c_decode_greedy). None elsewhere, and nothing run: then `decode` and the sampler."""
        if self.device.type != "cpu":
            return None
        view = self.cache.decode_view(start, start + len(tokens))
        return self.model.c_decode_greedy(tokens, positions, view, excluded)

    def decode_step(self, token_ids: torch.Tensor, slots: torch.Tensor, n_keys: int, start: int = 0):
        """The decode computation on tensors: token_ids (B, 1), slots (B,), attending over cache slots
        [0, n_keys) of rows [start, start + B), each row masked to its own slots; logits (B, V) float32."""
        keys = self.slot_numbers[:n_keys]
        allowed = keys[None, :] <= slots[:, None]  # (B, S): a row sees its own slots up to its new one
        if self.window is not None:
            allowed &= keys[None, :] > slots[:, None] - self.window
        view = self.cache.decode_view(start, start + token_ids.shape[0])
        logits = self.model.decode_logits(token_ids, slots[:, None], allowed[:, None, None, :], view, slots)
        return logits[:, -1].float()

    def move_row(self, source: int, target: int, filled: int) -> None:
        self.cache.move_row(source, target, filled)


class RunnerPool:
    """Runners kept between `generate` calls on CUDA, so that their captured decode graphs are replayed by
    later calls instead of captured again. `borrow` hands out an idle runner of the same model, rows, dtype,
    device and length bucket (the slots asked, rounded up to a multiple of LENGTH_BUCKET), or a new one; a
    runner is never lent twice at once, so concurrent calls on one model get separate runners. At most
    `size` idle runners are kept (the most recently returned)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.idle: list[ModelRunner] = []
        self.lock = threading.Lock()

    @contextmanager
    def borrow(self, model: torch.nn.Module, rows: int, length: int) -> Iterator[ModelRunner]:
        slots = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
        with self.lock:
            runner = next((r for r in self.idle if _fits(r, model, rows, slots)), None)
            if runner is not None:
                self.idle.remove(runner)
        runner = runner or ModelRunner(model, rows, slots)
        try:
            yield runner
        finally:
            with self.lock:
                self.idle.append(runner)
                del self.idle[: -self.size]


def _fits(runner: ModelRunner, model: torch.nn.Module, rows: int, slots: int) -> bool:
    keys = runner.cache.cache.keys[0]
    return (
        runner.model is model
        and runner.rows == rows
        and runner.length == slots
        and keys.dtype == model.dtype
        and keys.device == model.device
    )


_pools: weakref.WeakKeyDictionary[torch.nn.Module, RunnerPool] = weakref.WeakKeyDictionary()
_pools_lock = threading.Lock()


@contextmanager
def borrow_runner(model: torch.nn.Module, rows: int, length: int) -> Iterator[ModelRunner]:
    """A runner of `rows` cache rows of at least `length` slots for one `generate` call: on CUDA with
    model.cuda_graphs, from the model's pool (its graphs are reused by later calls); elsewhere a new one,
    freed with the call."""
    device = model.lm_head.weight.device
    if device.type != "cuda" or not getattr(model, "cuda_graphs", False):
        yield ModelRunner(model, rows, length)
        return
    with _pools_lock:
        pool = _pools.setdefault(model, RunnerPool())
    with pool.borrow(model, rows, length) as runner:
        yield runner
