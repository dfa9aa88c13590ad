"""Connector: project patch features to the text width, then resample them to a fixed number of latents."""

from __future__ import annotations

import torch
from torch import nn

from idefics2.config import Idefics2Config, Idefics2PerceiverConfig
from idefics2.modeling.attention import GatedMLP, Linear, RMSNorm, attention, key_padding_mask


class PerceiverAttention(nn.Module):
    """Latents (queries) attend over [context; latents] with grouped kv heads and no positions."""

    def __init__(self, config: Idefics2PerceiverConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.resampler_n_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resampler_head_dim
        self.dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        self.q_proj = Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, dim, bias=False)

    def forward(
        self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, n_lat, _ = latents.shape
        kv_input = torch.cat([context, latents], dim=1)  # (B, P + L, dim)
        s = kv_input.shape[1]
        q = self.q_proj(latents).view(b, n_lat, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv_input).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv_input).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = attention(
            q,
            k,
            v,
            mask,
            scale=self.head_dim**-0.5,
            impl=self.attn_implementation,
            dropout=self.dropout if self.training else 0.0,
        )
        return self.o_proj(out)


class PerceiverLayer(nn.Module):
    def __init__(self, config: Idefics2PerceiverConfig) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.input_latents_norm = RMSNorm(dim, eps)
        self.input_context_norm = RMSNorm(dim, eps)
        self.self_attn = PerceiverAttention(config)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = GatedMLP(dim, 4 * dim, dim, config.hidden_act)

    def forward(
        self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        latents = latents + self.self_attn(
            self.input_latents_norm(latents), self.input_context_norm(context), mask
        )
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, config: Idefics2PerceiverConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.empty(config.resampler_n_latents, config.hidden_size))
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(config.resampler_depth))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, context: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """context (N, P, dim), patch_mask bool (N, P) -> (N, n_latents, dim)."""
        n = context.shape[0]
        latents = self.latents[None].expand(n, -1, -1)
        # the latents are always visible keys, so only padding patches can be masked
        keys_mask = torch.cat([patch_mask, patch_mask.new_ones(n, latents.shape[1])], dim=1)
        mask = key_padding_mask(keys_mask)
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.norm(latents)


class Idefics2Connector(nn.Module):
    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        text = config.text_config
        self.modality_projection = GatedMLP(
            config.vision_config.hidden_size, text.intermediate_size, text.hidden_size, text.hidden_act
        )
        self.perceiver_resampler = PerceiverResampler(config.perceiver_config)

    def forward(self, image_features: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """image_features (n_real_patches, vision hidden), the real patches of each image packed in order (as
        the vision encoder returns them), patch_mask bool (N, P) -> (N, n_latents, text hidden)."""
        projected = self.modality_projection(image_features)  # (T, text hidden), real patches only
        context = projected.new_zeros(*patch_mask.shape, projected.shape[-1])
        context[patch_mask] = projected
        return self.perceiver_resampler(context, patch_mask)
