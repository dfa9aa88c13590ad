"""SigLIP-style vision encoder for images of any size up to `image_size` (NaViT-style position buckets)."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from idefics2.config import Idefics2VisionConfig
from idefics2.modeling.attention import activation, attention, key_padding_mask


def patch_mask_from_pixels(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, H, W) pixel mask -> bool (N, H // p, W // p): a patch is real only when all its pixels are."""
    n, h, w = pixel_attention_mask.shape
    gh, gw = h // patch_size, w // patch_size
    mask = pixel_attention_mask[:, : gh * patch_size, : gw * patch_size].bool()
    return mask.reshape(n, gh, patch_size, gw, patch_size).all(dim=4).all(dim=2)


def bucketed_position_ids(patch_mask: torch.Tensor, num_patches_per_side: int) -> torch.Tensor:
    """Position ids (N, gh * gw) of each patch, from its fractional coordinate in the image's own real grid.

    An image with nh x nw real patches spreads them over the full num_patches_per_side^2 position table: row i
    falls in the bucket of i / nh among the boundaries 1/n, 2/n, ... (and likewise for columns). Padding
    patches get position 0.
    """
    n, gh, gw = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side, device=device)
    rows_real = patch_mask[:, :, 0].sum(dim=1)  # (N,) real patch rows of each image
    cols_real = patch_mask[:, 0, :].sum(dim=1)

    def buckets(count: int, real: torch.Tensor) -> torch.Tensor:
        coords = torch.arange(count, device=device, dtype=torch.float32)[None, :] * (1.0 / real)[:, None]
        return torch.bucketize(coords.clamp(max=1.0 - 1e-6), boundaries, right=True)  # (N, count)

    row_bucket, col_bucket = buckets(gh, rows_real), buckets(gw, cols_real)
    ids = row_bucket[:, :, None] * num_patches_per_side + col_bucket[:, None, :]  # (N, gh, gw)
    return torch.where(patch_mask, ids, torch.zeros_like(ids)).reshape(n, gh * gw)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.num_patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )
        num_positions = self.num_patches_per_side**2  # weight left uninitialised here: see init_weights
        self.position_embedding = nn.Embedding(
            num_positions, config.hidden_size, _weight=torch.empty(num_positions, config.hidden_size)
        )

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, gh * gw, hidden)
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        position_ids = bucketed_position_ids(patch_mask, self.num_patches_per_side)
        return patches + self.position_embedding(position_ids)


class VisionAttention(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        out = attention(
            heads(self.q_proj),
            heads(self.k_proj),
            heads(self.v_proj),
            mask,
            scale=self.head_dim**-0.5,
            impl=self.attn_implementation,
            dropout=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


class Idefics2VisionTransformer(nn.Module):
    """Patch embedding + encoder + final LayerNorm; padding patches are masked out as keys."""

    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, H, W), patch_mask bool (N, H // p, W // p) -> (N, gh * gw, hidden)."""
        x = self.embeddings(pixel_values, patch_mask)
        x = self.encoder(x, key_padding_mask(patch_mask.flatten(1)))
        return self.post_layernorm(x)
