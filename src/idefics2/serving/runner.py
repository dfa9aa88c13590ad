"""Model calls of the engine: image features, prompt chunks into one cache row, decode steps over many rows.

Everything here runs on the engine's thread, under inference mode. Logits come back as float32 (the
sampling controls work in float32 whatever the model dtype, as `generate` does).
"""

from __future__ import annotations

import warnings

import torch

from idefics2.modeling import cuda_graphs
from idefics2.serving.kv_rows import RowKVCache

# decode graphs are captured per batch-size bucket (powers of two up to the engine's rows) and per length
# bucket (a multiple of this many cache slots): a step attends over its bucket's slots, not the whole cache
LENGTH_BUCKET = 512


class ModelRunner:
    def __init__(self, model: torch.nn.Module, rows: int, length: int) -> None:
        self.model = model
        self.device = model.lm_head.weight.device
        self.cache = RowKVCache(model, rows, length)
        self.window = model.config.text_config.sliding_window
        use_graphs = self.device.type == "cuda" and getattr(model, "cuda_graphs", False)
        self.graphs = DecodeGraphs(self, rows, length) if use_graphs else None

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

    def decode(self, tokens: list[int], positions: list[int], start: int = 0) -> torch.Tensor:
        """One new token for each of rows [start, start + B) at its own slot; logits (B, V).

        On CUDA (with model.cuda_graphs) rows [0, B) replay a captured graph for their batch-size and
        length bucket."""
        if self.graphs is not None and start == 0:
            logits = self.graphs(tokens, positions)
            if logits is not None:
                return logits
        token_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        slots = torch.tensor(positions, dtype=torch.long, device=self.device)  # (B,)
        return self.decode_step(token_ids, slots, max(positions) + 1, start)

    def decode_step(self, token_ids: torch.Tensor, slots: torch.Tensor, n_keys: int, start: int = 0):
        """The decode computation on tensors: token_ids (B, 1), slots (B,), attending over cache slots
        [0, n_keys) of rows [start, start + B), each row masked to its own slots; logits (B, V) float32."""
        keys = torch.arange(n_keys, device=self.device)
        allowed = keys[None, :] <= slots[:, None]  # (B, S): a row sees its own slots up to its new one
        if self.window is not None:
            allowed &= keys[None, :] > slots[:, None] - self.window
        view = self.cache.decode_view(start, start + token_ids.shape[0])
        logits = self.model.decode_logits(token_ids, slots[:, None], allowed[:, None, None, :], view, slots)
        return logits[:, -1].float()

    def move_row(self, source: int, target: int, filled: int) -> None:
        self.cache.move_row(source, target, filled)


class DecodeGraphs:
    """CUDA graphs of the decode step, one per (batch-size bucket, length bucket), captured on first use (on
    the engine's thread, which does all of the engine's torch work) and replayed after; rows beyond the batch
    in its bucket are placeholders (token 0 at slot 0 of free rows). All are dropped when the model's
    weights_version moves (they would replay the old weights). The logits returned are a copy of the graph's
    output. Capture failure turns graphs off with one warning (the runner then decodes eagerly)."""

    def __init__(self, runner: ModelRunner, rows: int, length: int) -> None:
        self.runner, self.rows, self.length = runner, rows, length
        self.graphs: dict[tuple[int, int], CapturedStep] = {}
        self.pool = None
        self.weights_version = runner.model.weights_version
        self.failed = False

    def bucket(self, batch: int, n_keys: int) -> tuple[int, int]:
        size = 1
        while size < batch:
            size *= 2
        slots = -(-n_keys // LENGTH_BUCKET) * LENGTH_BUCKET
        return min(size, self.rows), min(slots, self.length)

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor | None:
        if self.failed:
            return None
        if self.runner.model.weights_version != self.weights_version:
            self.graphs, self.pool = {}, None
            self.weights_version = self.runner.model.weights_version
        key = self.bucket(len(tokens), max(positions) + 1)
        step = self.graphs.get(key)
        if step is None:
            step = CapturedStep(*key, self.runner.device)
        step.load(tokens, positions)
        if key not in self.graphs:
            try:  # the warm-up steps write the same keys and values the replay writes
                step.capture(self.runner, self.pool)
            except RuntimeError as error:
                self.failed = True
                warnings.warn(f"CUDA graph decoding disabled, running eagerly: {error}", stacklevel=2)
                return None
            self.graphs[key], self.pool = step, step.graph.pool()
        step.graph.replay()
        return step.logits[: len(tokens)].clone()


class CapturedStep:
    """Static inputs (token ids, slots), the captured graph and its output logits, for one bucket."""

    def __init__(self, batch: int, n_keys: int, device: torch.device) -> None:
        self.n_keys = n_keys
        self.token_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slots = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def load(self, tokens: list[int], positions: list[int]) -> None:
        """The batch's tokens and slots; placeholder rows feed token 0 at slot 0 (of free cache rows)."""
        batch = len(tokens)
        self.token_ids.zero_()
        self.slots.zero_()
        self.token_ids[:batch, 0].copy_(torch.tensor(tokens))
        self.slots[:batch].copy_(torch.tensor(positions))

    def capture(self, runner: ModelRunner, pool) -> None:
        run = lambda: runner.decode_step(self.token_ids, self.slots, self.n_keys)  # noqa: E731
        self.graph, self.logits = cuda_graphs.capture(run, pool)
