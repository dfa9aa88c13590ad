"""SigLIP-style vision encoder for images of any size up to `image_size` (NaViT-style position buckets)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from idefics2.config import Idefics2VisionConfig
from idefics2.modeling.attention import Linear, activation, attention, linear


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


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, gh * gw, C * p * p): each patch's pixels in (channel, row, column) order."""
    n, c, h, w = pixel_values.shape
    gh, gw = h // patch_size, w // patch_size
    x = pixel_values[:, :, : gh * patch_size, : gw * patch_size]
    x = x.reshape(n, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, gh * gw, c * patch_size * patch_size)


@dataclass
class PackedLayout:
    """The real patches of N images packed along one token axis, in the encoder's order: images of one size
    next to each other (in the order each size first appears), so that attention runs batched over each
    such run of images, never across images, on views of the axis.

    `groups` lists (patches per image, the rows of the images of that size). `order` gives for each row of the
    encoder's axis its row in image order (image 0's patches, then image 1's, ...), and `restore` the inverse;
    both None when the two orders are the same.
    """

    lengths: list[int]
    groups: list[tuple[int, slice]]
    order: torch.Tensor | None
    restore: torch.Tensor | None

    @classmethod
    def from_patch_mask(cls, patch_mask: torch.Tensor) -> PackedLayout:
        """patch_mask bool (N, gh, gw) or (N, P) -> layout of its True patches."""
        lengths = patch_mask.flatten(1).sum(dim=1).tolist()
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        by_length: dict[int, list[int]] = {}
        for image, length in enumerate(lengths):
            by_length.setdefault(length, []).append(image)
        groups: list[tuple[int, slice]] = []
        first = 0
        for length, images in by_length.items():
            groups.append((length, slice(first, first + length * len(images))))
            first += length * len(images)
        encoder_images = [image for images in by_length.values() for image in images]
        if encoder_images == sorted(encoder_images):
            return cls(lengths, groups, None, None)
        order = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in encoder_images])
        order = order.to(patch_mask.device)
        return cls(lengths, groups, order, torch.argsort(order))


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
        """(N, C, H, W), patch_mask (N, gh, gw) -> (n_real_patches, hidden), only the real patches, packed.

        The patch convolution is a matmul over the real patches' pixels (stride == kernel size).
        """
        real = patch_mask.flatten(1)
        patches = patchify(pixel_values, self.patch_size)[real]  # (T, C * p * p)
        weight = self.patch_embedding.weight
        x = linear(patches, weight.reshape(weight.shape[0], -1), self.patch_embedding.bias)
        position_ids = bucketed_position_ids(patch_mask, self.num_patches_per_side)[real]
        return x + self.position_embedding(position_ids)


class VisionAttention(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.q_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """x (T, dim), the packed patches of several images in `layout`'s encoder order; each image attends to
        its own patches only."""
        q, k, v = (
            proj(x).view(-1, self.num_heads, self.head_dim)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        outs = []
        for length, rows in layout.groups:  # images of one size at once: (n, heads, length, head_dim)
            qi, ki, vi = (
                t[rows].view(-1, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)
            )
            out = attention(
                qi,
                ki,
                vi,
                None,
                scale=self.head_dim**-0.5,
                impl=self.attn_implementation,
                dropout=self.dropout if self.training else 0.0,
            )  # (n, length, heads * head_dim)
            outs.append(out.reshape(-1, out.shape[-1]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.act = config.hidden_act
        activation(self.act)  # unsupported names fail here, at construction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1.forward_activated(x, self.act))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), layout)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, layout, use_reentrant=False)
            else:
                x = layer(x, layout)
        return x


class Idefics2VisionTransformer(nn.Module):
    """Patch embedding + encoder + final LayerNorm over the real patches only (packed, no padding work)."""

    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, H, W), patch_mask bool (N, H // p, W // p) -> (n_real_patches, hidden).

        The real patches of image 0, then of image 1, ...: the same features as encoding the padded images
        with padding patches masked out as keys, at the cost of the real pixels only.
        """
        layout = PackedLayout.from_patch_mask(patch_mask)
        x = self.embeddings(pixel_values, patch_mask)  # (T, hidden) in image order
        if layout.order is not None:
            x = x[layout.order]
        x = self.post_layernorm(self.encoder(x, layout))
        return x if layout.restore is None else x[layout.restore]
