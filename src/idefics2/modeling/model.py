"""The full model: vision encoder + connector + Mistral decoder, and the language-modelling head."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from idefics2 import generation, loading, lora
from idefics2.config import Idefics2Config
from idefics2.modeling.attention import Linear, RMSNorm, causal_mask, check_attn_implementation
from idefics2.modeling.connector import Idefics2Connector, PerceiverResampler
from idefics2.modeling.text import KVCache, MistralDecoder
from idefics2.modeling.vision import Idefics2VisionTransformer, patch_mask_from_pixels
from idefics2.quantization import (
    DEFAULT_PARTS,
    QuantizationSpec,
    config_entry,
    quantize_model,
    quantized_layers,
)


@dataclass
class Idefics2ModelOutput:
    last_hidden_state: torch.Tensor  # (B, T, hidden)
    image_hidden_states: torch.Tensor | None = None  # (n_real_images, n_latents, hidden)


@dataclass
class Idefics2Output:
    logits: torch.Tensor | None  # (B, T or kept positions, vocab); None when a `head` replaced lm_head
    loss: torch.Tensor | None = None
    image_hidden_states: torch.Tensor | None = None  # (n_real_images, n_latents, hidden)
    head_output: torch.Tensor | None = None  # what `head` returned


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t predicting labels[t + 1]; label -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the logits' {tuple(logits.shape[:2])}"
        )
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def init_module_weights(root: nn.Module, config: Idefics2Config) -> None:
    """Normal weights (std initializer_range), zero biases, unit norms, small random perceiver latents.

    Skipped on the meta device, where `from_pretrained` builds the modules before assigning the weights.
    """
    if any(p.is_meta for p in root.parameters()):
        return
    text_std = config.text_config.initializer_range
    vision_std = config.vision_config.initializer_range
    for name, module in root.named_modules():
        std = vision_std if "vision_model" in name else text_std
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, PerceiverResampler):
            module.latents.normal_(0.0, std)


def _set_attn_implementation(module: nn.Module, name: str) -> None:
    check_attn_implementation(name)
    for sub in module.modules():
        if hasattr(sub, "attn_implementation"):
            sub.attn_implementation = name


class Idefics2Model(nn.Module):
    """Vision encoder + connector + decoder; returns the decoder's last hidden states."""

    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        self.config = config
        self.vision_model = Idefics2VisionTransformer(config.vision_config)
        self.connector = Idefics2Connector(config)
        self.text_model = MistralDecoder(config.text_config)
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation for training from scratch (normal weights, zero biases, unit norms)."""
        init_module_weights(self, self.config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embed_tokens

    def get_image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pixel_values (B, N, C, H, W) [or (N, C, H, W)] -> (n_real_images, n_latents, hidden).

        All-zero images (the processor's padding images) are skipped; pixel_attention_mask (B, N, H, W) marks
        real pixels, and a patch is real only when all of its pixels are.
        """
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[:, None]
            pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask[:, None]
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values must be (batch, images, channels, height, width), "
                f"got shape {tuple(pixel_values.shape)}"
            )
        b, n, c, h, w = pixel_values.shape
        vision = self.config.vision_config
        if c != vision.num_channels:
            raise ValueError(
                f"pixel_values have {c} channels, the vision encoder expects {vision.num_channels}"
            )
        if h < vision.patch_size or w < vision.patch_size:
            raise ValueError(f"images of {h}x{w} pixels are smaller than one {vision.patch_size}-pixel patch")
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        pixel_values = pixel_values.reshape(b * n, c, h, w)
        real = (pixel_values != 0).flatten(1).any(dim=1)  # (B * N,) all-zero images are padding
        pixel_values = pixel_values[real].to(dtype)
        if pixel_attention_mask is None:
            pixel_mask = torch.ones(
                (pixel_values.shape[0], h, w), dtype=torch.bool, device=pixel_values.device
            )
        else:
            if pixel_attention_mask.shape != (b, n, h, w):
                raise ValueError(
                    f"pixel_attention_mask shape {tuple(pixel_attention_mask.shape)} does not match "
                    f"pixel_values {(b, n, h, w)}"
                )
            pixel_mask = pixel_attention_mask.reshape(b * n, h, w)[real.to(pixel_attention_mask.device)]
            pixel_mask = pixel_mask.to(pixel_values.device)
        patch_mask = patch_mask_from_pixels(pixel_mask, vision.patch_size)  # (N_real, gh, gw)
        if not bool(patch_mask.flatten(1).any(dim=1).all()):
            raise ValueError("an image has no patch whose pixels are all real in pixel_attention_mask")
        # A frozen tower (fine-tuning with the vision tower frozen, as LoRA does) runs without autograd: no
        # graph is kept, and the inference kernels apply
        frozen = not pixel_values.requires_grad and not any(
            p.requires_grad for p in self.vision_model.parameters()
        )
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features = self.vision_model(pixel_values, patch_mask)  # (N_real, gh * gw, vision hidden)
        return self.connector(features, patch_mask.flatten(1))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_hidden_states: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        hidden_at: torch.Tensor | None = None,
    ) -> Idefics2ModelOutput:
        """`segment_ids` (B, T) int: rows that pack several examples (training). A token attends only to the
        earlier tokens of its own segment, positions restart at 0 in each segment, and 0 marks padding.
        `hidden_at` bool (B, T): the last hidden state only at its True positions, (N, hidden) in row-major
        order (the last decoder layer computes only there, but for its keys and values)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_hidden_states is not None:
            raise ValueError("pass pixel_values or image_hidden_states, not both")
        if pixel_values is not None:
            image_hidden_states = self.get_image_features(pixel_values, pixel_attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, image_hidden_states)
        elif image_hidden_states is not None:
            inputs_embeds = self._merge_images(None, inputs_embeds, image_hidden_states)
        b, t, _ = inputs_embeds.shape

        if segment_ids is not None:
            mask, position_ids = self._packed_inputs(
                segment_ids, attention_mask, position_ids, kv_cache, b, t
            )
            cache_position = torch.arange(t, device=inputs_embeds.device)
        else:
            mask, position_ids, cache_position = self._decoder_inputs(
                attention_mask, position_ids, kv_cache, cache_position, b, t, inputs_embeds.device
            )
        if hidden_at is not None:
            if hidden_at.shape != (b, t):
                raise ValueError(
                    f"hidden_at shape {tuple(hidden_at.shape)} does not match the input's {(b, t)}"
                )
            hidden_at = hidden_at.to(device=inputs_embeds.device, dtype=torch.bool)
        unpadded = (
            None
            if hidden_at is None
            else self._unpadded_layout(attention_mask, segment_ids, kv_cache, hidden_at)
        )
        if unpadded is None:
            hidden = self.text_model(inputs_embeds, position_ids, mask, kv_cache, cache_position, hidden_at)
            return Idefics2ModelOutput(hidden, image_hidden_states)
        # only some positions' hidden states are wanted, none at padding: the real tokens alone run, end to
        # end in one row, each sequence attending causally to itself (no mask: sdpa skips the later keys)
        real, segments = unpadded
        hidden = self.text_model(
            inputs_embeds[real][None],
            position_ids[real][None],
            None,
            keep=hidden_at[real][None],
            segments=segments,
        )
        return Idefics2ModelOutput(hidden, image_hidden_states)

    def _unpadded_layout(
        self,
        attention_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        kv_cache: KVCache | None,
        hidden_at: torch.Tensor,
    ) -> tuple[torch.Tensor, list[int]] | None:
        """For hidden states wanted at `hidden_at` alone: bool (B, T) marking the real tokens, and the lengths
        of the sequences they form in row-major order (one per row, or per packed segment), to run them
        without the padding. None where the rows run as they are: a KV cache, no padding, a segment split in
        two, a sequence longer than the sliding window, or hidden states wanted at padding."""
        if kv_cache is not None:
            return None
        device = self.text_model.embed_tokens.weight.device
        if segment_ids is not None:
            segments = segment_ids.to(device)
            real = segments > 0
            starts = real.clone()
            starts[:, 1:] &= segments[:, 1:] != segments[:, :-1]
            # each segment one run of tokens: as many runs as (row, segment) pairs
            rows = torch.arange(segments.shape[0], device=device)[:, None]
            row_segments = rows * (int(segments.max()) + 1) + segments
            if int(starts.sum()) != row_segments[real].unique().numel():
                return None
            run = starts[real].cumsum(0) - 1  # (N,) the sequence of each real token
            lengths = torch.bincount(run).tolist()
        elif attention_mask is None:
            return None
        else:
            real = attention_mask.to(device).bool()
            if bool(real.all()):
                return None
            lengths = [n for n in real.sum(dim=1).tolist() if n]
        window = self.config.text_config.sliding_window
        if not lengths or (window is not None and max(lengths) > window):
            return None
        if bool((hidden_at & ~real).any()):
            return None
        return real, lengths

    def embed_inputs(
        self, input_ids: torch.Tensor, image_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings (B, T, hidden) of input_ids (B, T), with the image latents (n_images, n_latents,
        hidden), in order, at the `<image>` positions."""
        embed = self.text_model.embed_tokens
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= embed.num_embeddings):
            raise ValueError(
                f"input_ids must lie in [0, {embed.num_embeddings}), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        inputs_embeds = embed(input_ids)
        if image_hidden_states is None:
            return inputs_embeds
        return self._merge_images(input_ids, inputs_embeds, image_hidden_states)

    def _merge_images(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, image_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """Put the image latents, in order, at the `<image>` token positions."""
        if input_ids is not None:
            is_image = input_ids == self.config.image_token_id
        else:
            image_embedding = self.text_model.embed_tokens.weight[self.config.image_token_id]
            is_image = (inputs_embeds == image_embedding).all(dim=-1)
        latents = image_hidden_states.reshape(-1, inputs_embeds.shape[-1])
        n_tokens = int(is_image.sum())
        if n_tokens != latents.shape[0]:
            n_latents = self.config.perceiver_config.resampler_n_latents
            raise ValueError(
                f"the input has {n_tokens} <image> tokens but the images give {latents.shape[0]} embeddings "
                f"({image_hidden_states.shape[0]} images x {n_latents} latents)"
            )
        out = inputs_embeds.clone()
        out[is_image] = latents.to(out.dtype)
        return out

    def _packed_inputs(self, segment_ids, attention_mask, position_ids, kv_cache, b, t):
        """Block-diagonal causal mask (B, 1, T, T) and per-segment positions (B, T) of packed rows."""
        if kv_cache is not None:
            raise ValueError(
                "segment_ids (packed rows) are for training: they do not combine with a kv_cache"
            )
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be ({b}, {t}), got {tuple(segment_ids.shape)}")
        device = self.text_model.embed_tokens.weight.device
        segments = segment_ids.to(device)
        if attention_mask is not None and not torch.equal(attention_mask.to(device).bool(), segments > 0):
            raise ValueError("attention_mask must be 1 exactly where segment_ids is non-zero")
        slot = torch.arange(t, device=device)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        if position_ids is None:
            first = torch.where(starts, slot, 0).cummax(dim=1).values  # (B, T) slot where the segment began
            position_ids = slot - first
        causal = slot[None, :] <= slot[:, None]  # (T, T) query x key
        window = self.config.text_config.sliding_window
        if window is not None:
            causal = causal & (slot[None, :] > slot[:, None] - window)
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)  # (B, T, T)
        mask = (same & causal) | torch.eye(t, dtype=torch.bool, device=device)  # padding sees itself: no NaN
        return mask[:, None], position_ids.to(device).expand(b, t)

    def _decoder_inputs(self, attention_mask, position_ids, kv_cache, cache_position, b, t, device):
        """Decoder mask (B, 1, T, S) or None (plain causal), position ids (B, T) and cache positions (T,)."""
        if cache_position is None:
            if kv_cache is not None:
                raise ValueError("cache_position is required with a kv_cache")
            cache_position = torch.arange(t, device=device)
        cache_position = cache_position.to(device=device, dtype=torch.long)
        if cache_position.shape != (t,):
            raise ValueError(f"cache_position must have shape ({t},), got {tuple(cache_position.shape)}")
        no_padding = attention_mask is None
        if attention_mask is None:
            length = t if kv_cache is None else int(cache_position.max()) + 1
            attention_mask = torch.ones((b, length), dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device)
        length = attention_mask.shape[-1]
        if attention_mask.dim() != 2 or attention_mask.shape[0] != b:
            raise ValueError(f"attention_mask must be (batch={b}, length), got {tuple(attention_mask.shape)}")
        if kv_cache is None:
            if length != t:
                raise ValueError(f"attention_mask covers {length} tokens but the input has {t} (no kv_cache)")
        else:
            if kv_cache.batch_size != b:
                raise ValueError(f"kv_cache holds batch {kv_cache.batch_size}, the input has batch {b}")
            if length > kv_cache.max_length:
                raise ValueError(
                    f"attention_mask covers {length} slots, the kv_cache only {kv_cache.max_length}"
                )
            if t and (int(cache_position.max()) >= length or int(cache_position.min()) < 0):
                raise ValueError(f"cache_position must lie in [0, {length}) (the attention_mask length)")
        if position_ids is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
            position_ids = positions[:, cache_position]
        elif position_ids.shape in ((b, t), (1, t)):
            position_ids = position_ids.expand(b, t)
        else:
            raise ValueError(f"position_ids must be ({b}, {t}), got {tuple(position_ids.shape)}")
        window = self.config.text_config.sliding_window
        if (
            (window is None or window >= t)
            and (
                kv_cache is None
                or (length == t and torch.equal(cache_position, torch.arange(t, device=device)))
            )
            and (no_padding or bool(attention_mask.all()))
        ):
            return None, position_ids.to(device), cache_position  # plain causal attention over slots [0, T)
        return causal_mask(attention_mask, cache_position, window), position_ids.to(device), cache_position


class Idefics2ForConditionalGeneration(nn.Module):
    """Idefics2 with its language-modelling head; state-dict names match the hub checkpoints."""

    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Idefics2Model(config)
        text = config.text_config
        self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False)
        self._init_lm_head()
        self.generation_config: dict[str, Any] = {}
        self.checkpoint_dir: Path | None = None
        self.attn_implementation = "sdpa"
        # settings of the decode core (idefics2.decoding) on CUDA: decode steps replay captured CUDA graphs;
        # with compile_decode each step is compiled with torch.compile before capture (faster steps, a
        # one-time compile per batch-size and length bucket)
        self.cuda_graphs = True
        self.compile_decode = False
        # moves whenever weights or modules change: captured graphs and compiled steps are dropped then
        self.weights_version = 0

    # ---- construction, loading, saving -------------------------------------------------------------------

    def init_weights(self) -> None:
        """Draw every weight at random again, as for training from scratch (see init_module_weights)."""
        self.model.init_weights()
        self._init_lm_head()

    @torch.no_grad()
    def _init_lm_head(self) -> None:
        if not self.lm_head.weight.is_meta:
            self.lm_head.weight.normal_(0.0, self.config.text_config.initializer_range)
        self.tie_weights()

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        attn_implementation: str = "sdpa",
        revision: str | None = None,
        adapter: str | os.PathLike | None = None,
        merge_adapter: bool = False,
        quantize: str | None = None,
        group_size: int = 128,
        quantize_modules: tuple[str, ...] = DEFAULT_PARTS,
    ) -> Idefics2ForConditionalGeneration:
        """Load a checkpoint folder or hub repo id (safetensors only; see idefics2.loading).

        `adapter`: a LoRA adapter in PEFT's format (folder or hub repo id) applied on top of the weights;
        `merge_adapter=True` folds it into them (see idefics2.lora).
        `quantize="int8" | "int4"`: quantize the linear layers of `quantize_modules` ("decoder",
        "connector", "perceiver", "vision") while loading, int4 in groups of `group_size` inputs (see
        idefics2.quantization).
        Checkpoints saved quantized, and AutoAWQ GEMM checkpoints, load quantized without asking.
        """
        spec = None if quantize is None else QuantizationSpec.parse(quantize, group_size, quantize_modules)
        merge_first = spec is not None and adapter is not None and merge_adapter
        model = loading.load_pretrained(
            cls,
            path_or_repo_id,
            dtype=dtype if dtype is not None else torch_dtype,
            device=device,
            revision=revision,
            quantization=None if merge_first else spec,
        )
        model.set_attn_implementation(attn_implementation)
        if adapter is not None:
            lora.load_adapter(model, adapter, merge=merge_adapter)
        if merge_first:  # the adapter was folded into the float weights: quantize the result
            model.quantize(quantize, group_size=group_size, modules=quantize_modules)
        return model

    def quantize(
        self,
        mode: str = "int8",
        *,
        group_size: int = 128,
        modules: tuple[str, ...] = DEFAULT_PARTS,
        calibration: Any = None,
    ) -> Idefics2ForConditionalGeneration:
        """Quantize the linear layers of `modules` in place ("int8": per output channel; "int4": groups of
        `group_size` inputs); by default the decoder (its layers and an untied lm_head). `calibration`: a few
        batches (token ids (B, T), or an iterable of them or of dicts of model inputs such as a processor's
        outputs) from which activation-aware scales are found and folded into the decoder's float weights
        before quantizing (see idefics2.quantization.calibration). Returns the model."""
        spec = QuantizationSpec.parse(mode, group_size, modules)
        if quantized_layers(self):
            raise ValueError(
                "this model is already quantized; load the float checkpoint to quantize it again"
            )
        quantize_model(self, spec, tied_lm_head=self.config.tie_word_embeddings, calibration=calibration)
        self.config.extra["quantization_config"] = config_entry(self)
        self.weights_changed()
        return self

    def weights_changed(self) -> None:
        """Note that weights or modules changed: every captured CUDA graph and compiled decode step (of
        `generate` and of the serving engine) is dropped at its next use, as it would replay the old
        weights or read freed memory. The model's own methods call it (quantize, load_state_dict, to / cuda /
        half and other moves) and so do the LoRA functions (add_lora, load_adapter, merge_lora); call it
        after changing the model's modules or parameters any other way (assigning new tensors)."""
        self.weights_version += 1

    def _apply(self, fn, recurse: bool = True):  # every dtype and device move (to, cuda, half, ...)
        result = super()._apply(fn, recurse)
        self.weights_changed()
        return result

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.weights_changed()
        return result

    def save_pretrained(self, folder: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
        """Write config.json (+ generation_config.json) and safetensors weights (sharded above a size);
        a quantized model writes its layers in compressed-tensors' form, with its `quantization_config`."""
        return loading.save_pretrained(self, folder, max_shard_size=max_shard_size)

    def set_attn_implementation(self, name: str) -> None:
        """Switch every attention layer between "sdpa" and "eager"."""
        _set_attn_implementation(self, name)
        self.attn_implementation = name

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.model.vision_model.encoder.gradient_checkpointing = enable
        self.model.text_model.gradient_checkpointing = enable

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.text_model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.text_model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def new_kv_cache(
        self,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A static cache for `max_length` slots per sample."""
        text = self.config.text_config
        return KVCache(
            text.num_hidden_layers,
            batch_size,
            text.num_key_value_heads,
            max_length,
            text.head_dim,
            dtype=dtype or self.dtype,
            device=device or self.device,
        )

    # ---- forward -------------------------------------------------------------------------------------------

    def get_image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, pixel_attention_mask)

    def embed_inputs(
        self, input_ids: torch.Tensor, image_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings (B, T, hidden) with the image features at the `<image>` tokens."""
        return self.model.embed_inputs(input_ids, image_hidden_states)

    def decode_logits(
        self,
        token_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        kv_cache: Any,
        cache_position: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step on prepared tensors (what generate's and the engine's CUDA graphs capture): one
        token per row, token_ids (B, 1) at position_ids (B, 1), attending over the cache slots that the bool
        mask (B, 1, 1, S) allows, its keys and values written at cache_position; logits (B, 1, V)."""
        text = self.model.text_model
        hidden = text(text.embed_tokens(token_ids), position_ids, mask, kv_cache, cache_position)
        return self.lm_head(hidden)

    def c_decode_logits(self, tokens: list[int], positions: list[int], kv_cache: Any) -> torch.Tensor | None:
        """decode_logits' last logits (B, V) float32 for one token per row at its own position (also its cache
        slot), each row attending over its slots up to there (within the sliding window), from one C call on
        CPU (MistralDecoder.c_decode_tokens); None where that call cannot run (then use decode_logits)."""
        return self.model.text_model.c_decode_tokens(tokens, positions, kv_cache, self.lm_head)

    def c_decode_greedy(
        self, tokens: list[int], positions: list[int], kv_cache: Any, excluded: list[list[int]] | None = None
    ) -> list[int] | None:
        """The greedy token of each row of the same step as c_decode_logits (the first largest of those
        logits, row b's `excluded[b]` ids left out), picked inside the same C call on CPU: for a float32 or
        bfloat16 head from its int8 copy and the few logits that copy cannot rule out
        (MistralDecoder.c_decode_greedy); None where that call does not run (then pick from decode_logits)."""
        return self.model.text_model.c_decode_greedy(tokens, positions, kv_cache, self.lm_head, excluded)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_hidden_states: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        logits_at: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None,
    ) -> Idefics2Output:
        """Logits for every position (or the last `logits_to_keep`), and the shifted LM loss given labels.

        `segment_ids`: packed rows of several examples each (see Idefics2Model.forward).
        `logits_at`: bool (B, T); logits only at its True positions, as (N, vocab) in row-major order
        (training needs them only where a label is learned: the (B, T, vocab) logits are never built).
        `head`: called as head(hidden, lm_head) on the kept hidden states (N or B x T, hidden) instead of
        lm_head(hidden); its result is `head_output` (training's chunked loss, idefics2.training.loss).
        Padding positions (attention_mask 0) are computed but meaningless; mask them out of labels with -100.
        """
        if head is not None and labels is not None:
            raise ValueError("head replaces the logits that labels need: do not combine them")
        if logits_at is not None and (labels is not None or logits_to_keep):
            raise ValueError(
                "logits_at picks the positions itself: do not combine it with labels or logits_to_keep"
            )
        tokens = input_ids if input_ids is not None else inputs_embeds
        if logits_at is not None and tokens is not None and logits_at.shape != tokens.shape[:2]:
            raise ValueError(
                f"logits_at shape {tuple(logits_at.shape)} does not match the input's "
                f"{tuple(tokens.shape[:2])}"
            )
        out = self.model(
            input_ids,
            attention_mask,
            pixel_values,
            pixel_attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            image_hidden_states=image_hidden_states,
            kv_cache=kv_cache,
            cache_position=cache_position,
            segment_ids=segment_ids,
            hidden_at=logits_at,
        )
        hidden = out.last_hidden_state  # (B, T, hidden), or (N, hidden) at logits_at
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        if logits_to_keep:
            if labels is not None:
                raise ValueError(
                    "labels need the logits of every position; do not combine them with logits_to_keep"
                )
            hidden = hidden[:, -logits_to_keep:]
        if head is not None:
            if hidden.dim() == 3:
                hidden = hidden.reshape(-1, hidden.shape[-1])
            output = head(hidden, self.lm_head)
            return Idefics2Output(None, image_hidden_states=out.image_hidden_states, head_output=output)
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return Idefics2Output(logits=logits, loss=loss, image_hidden_states=out.image_hidden_states)

    def generate(self, *args: Any, **kwargs: Any) -> torch.LongTensor:
        """See `idefics2.generation.generate`."""
        return generation.generate(self, *args, **kwargs)
