"""Model calls of the engine: image features, prompt chunks into one cache row, decode steps over many rows.

Everything here runs on the engine's thread, under inference mode. Logits come back as float32 (the
sampling controls work in float32 whatever the model dtype, as `generate` does).
"""

from __future__ import annotations

import torch

from idefics2.serving.kv_rows import RowKVCache


class ModelRunner:
    def __init__(self, model: torch.nn.Module, rows: int, length: int) -> None:
        self.model = model
        self.device = model.lm_head.weight.device
        self.cache = RowKVCache(model, rows, length)
        self.window = model.config.text_config.sliding_window

    def image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
        """One image's processed crops (1, N, C, H, W) -> features (N, n_latents, hidden)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.model.dtype)
        return self.model.get_image_features(pixel_values, pixel_attention_mask.to(self.device))

    def embed_prompt(self, input_ids: list[int], image_features: torch.Tensor | None) -> torch.Tensor:
        """Prompt embeddings (1, P, hidden) with the image features at the `<image>` tokens."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        return self.model.model.embed_inputs(ids, image_features)

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
            kv_cache=self.cache.prefill_view(row),
            cache_position=slots,
        ).last_hidden_state
        if not want_logits:
            return None
        return self.model.lm_head(hidden[0, -1:]).float()[0]

    def decode(self, tokens: list[int], positions: list[int], start: int = 0) -> torch.Tensor:
        """One new token for each of rows [start, start + B) at its own slot; logits (B, V)."""
        text = self.model.model.text_model
        token_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        slots = torch.tensor(positions, dtype=torch.long, device=self.device)  # (B,)
        keys = torch.arange(max(positions) + 1, device=self.device)
        allowed = keys[None, :] <= slots[:, None]  # (B, S): a row sees its own slots up to its new one
        if self.window is not None:
            allowed &= keys[None, :] > slots[:, None] - self.window
        hidden = text(
            text.embed_tokens(token_ids),
            slots[:, None],
            allowed[:, None, None, :],
            self.cache.decode_view(start, start + len(tokens)),
            slots,
        )
        return self.model.lm_head(hidden[:, -1]).float()

    def move_row(self, source: int, target: int, filled: int) -> None:
        self.cache.move_row(source, target, filled)
