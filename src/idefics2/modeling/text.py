"""Mistral decoder: RoPE, grouped-query attention, RMSNorm, gated MLP, and a static KV cache."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import weakref
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from idefics2.config import Idefics2TextConfig
from idefics2.modeling import ckernels, kernels
from idefics2.modeling.attention import GatedMLP, Linear, RMSNorm, attention


class KVCache:
    """Pre-allocated key/value buffers, one pair per layer, each (B, n_kv_heads, max_length, head_dim).

    New keys and values are written in place at the slots given by `cache_position`; attention then reads
    slots [0, S). Nothing is concatenated per step.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(
                f"KVCache needs batch_size > 0 and max_length > 0, got {batch_size}, {max_length}"
            )
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.max_length = max_length

    def update(
        self, layer: int, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, D) at slots cache_position (T,); return slots [0, length)."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, cache_position, k.to(keys.dtype))
        values.index_copy_(2, cache_position, v.to(values.dtype))
        return keys[:, :, :length], values[:, :, :length]


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (B, T, head_dim) for RoPE at these positions, computed in the wider of float32 and dtype."""
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    angles = position_ids[..., None].to(work) * inv_freq.to(work)  # (B, T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RotaryTable:
    """cos and sin of rotary_cos_sin for positions [0, length), computed once per dtype and device and read
    by index: a CPU decode step looks its angles up instead of recomputing the inverse frequencies and the
    trigonometry of every position (the same values: the table is made by rotary_cos_sin itself). sin comes
    with its first half negated, for apply_rotary. The table grows (to the next power of two) when a position
    passes its end; on GPUs nothing is cached (reading the largest position would wait for the device)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim, self.theta = head_dim, theta
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (B, T, head_dim) at position_ids (B, T)."""
        if not position_ids.is_cpu or position_ids.numel() == 0:
            return self._signed(*rotary_cos_sin(position_ids, self.head_dim, self.theta, dtype))
        lowest, highest = (int(end) for end in torch.aminmax(position_ids))
        if lowest < 0:  # not a table index
            return self._signed(*rotary_cos_sin(position_ids, self.head_dim, self.theta, dtype))
        cos, sin = self.table(dtype, position_ids.device, highest + 1)
        return cos[position_ids], sin[position_ids]

    def table(
        self, dtype: torch.dtype, device: torch.device, needed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole tables (T >= needed, head_dim) as they stand, grown first where they are shorter."""
        key = (dtype, device)
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.shape[0] < needed:
            length = max(256, 1 << (needed - 1).bit_length())
            positions = torch.arange(length, device=device)[None]
            cos, sin = self._signed(*rotary_cos_sin(positions, self.head_dim, self.theta, dtype))
            cos, sin = cos[0], sin[0]
            self._tables[key] = cos, sin
        return cos, sin

    @staticmethod
    def _signed(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = sin.shape[-1] // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated pairwise (i, i + D/2) by the angles in cos and signed_sin (B, T, D), the sin
    with its first half negated (RotaryTable): x * cos + (-x2, x1) * sin as x * cos + roll(x) * signed_sin,
    three kernels instead of six."""
    return torch.addcmul(x * cos[:, None], x.roll(x.shape[-1] // 2, dims=-1), signed_sin[:, None])


class TextAttention(nn.Module):
    def __init__(self, config: Idefics2TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        dim = config.hidden_size
        self.q_proj = Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None,
        cache_position: torch.Tensor,
        keep: torch.Tensor | None = None,
        segments: list[int] | None = None,
    ) -> torch.Tensor:
        """mask: bool (B, 1, T, S), or None for plain causal attention over the T new tokens (written to slots
        [0, T) when there is a cache). keep: bool (B, T), the output only at its True positions (N, dim).
        segments: the lengths of the sequences that one row (B = 1, no cache, no mask) holds end to end,
        each attending causally to itself only."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        stored = self._c_rope_store(q, k, v, cos, sin, mask, kv_cache, cache_position)
        if stored is not None:
            q, k, v = stored
        else:
            q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if kv_cache is not None:
                k, v = kv_cache.update(
                    self.layer_idx, cache_position, k, v, t if mask is None else mask.shape[-1]
                )
                k, v = k.to(q.dtype), v.to(q.dtype)
        if segments is None:
            parts = [(q, k, v)]
        else:  # one row of sequences end to end, each attending to itself
            parts = zip(*(tensor.split(segments, dim=2) for tensor in (q, k, v)), strict=True)
        outs = [
            attention(
                part_q,
                part_k,
                part_v,
                mask,
                scale=self.head_dim**-0.5,
                impl=self.attn_implementation,
                dropout=self.dropout if self.training else 0.0,
                causal=True,
            )
            for part_q, part_k, part_v in parts
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, T, heads * head_dim)
        return self.o_proj(out if keep is None else out[keep])

    def _c_rope_store(self, q, k, v, cos, sin, mask, kv_cache, cache_position):
        """(rotated queries (B, H, 1, D), keys, values over the mask's slots) from one C call
        (ckernels.rope_store) where a CPU decode step writes a row cache (kv_cache.row_buffers) and that
        call is measured faster than torch's ops; else None."""
        buffers = getattr(kv_cache, "row_buffers", None)
        if (
            buffers is None
            or mask is None
            or q.shape[1] != 1
            or not q.is_cpu
            or torch.is_grad_enabled()
            or q.dtype not in ckernels.DTYPES
            or cos.dtype != q.dtype
            or not kernels.c_kernels()
        ):
            return None
        keys, values = buffers(self.layer_idx)
        if keys.dtype != q.dtype or values.dtype != q.dtype:
            return None
        shape = (q.dtype, self.num_heads, self.num_kv_heads, self.head_dim)
        kernel = kernels.choose("rope", shape, q.shape[0], lambda: ["torch", "c"], self._rope_bench(q.dtype))
        if kernel != "c":
            return None
        q = ckernels.rope_store(q, k, v, cos, sin, keys, values, cache_position)
        return q, keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]

    def _rope_bench(self, dtype: torch.dtype):
        def make(rows: int):
            generator = torch.Generator().manual_seed(0)
            heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
            widths = (heads * d, kv_heads * d, kv_heads * d)
            q, k, v = (torch.randn(rows, 1, n, generator=generator).to(dtype) for n in widths)
            cos, sin = (torch.randn(rows, 1, d, generator=generator).to(dtype) for _ in range(2))
            keys, values = (torch.zeros(rows, kv_heads, 64, d, dtype=dtype) for _ in range(2))
            slots, index = torch.arange(rows) % 64, torch.arange(rows)

            def run(kernel: str) -> torch.Tensor:
                if kernel == "c":
                    return ckernels.rope_store(q, k, v, cos, sin, keys, values, slots)
                rotated_q = apply_rotary(q.view(rows, 1, heads, d).transpose(1, 2), cos, sin)
                rotated_k = apply_rotary(k.view(rows, 1, kv_heads, d).transpose(1, 2), cos, sin)
                keys[index, :, slots] = rotated_k[:, :, 0]
                values[index, :, slots] = v.view(rows, kv_heads, d)
                return rotated_q

            return run

        return make


class DecoderLayer(nn.Module):
    def __init__(self, config: Idefics2TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TextAttention(config, layer_idx)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_size, config.hidden_act
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache, cache_position, keep=None, segments=None) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim), or (N, dim) at the N True positions of `keep` (B, T): the keys and
        values of every position, the rest of the layer only where kept. `segments`: see TextAttention."""
        attended = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, kv_cache, cache_position, keep, segments
        )
        x = (x if keep is None else x[keep]) + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class MistralDecoder(nn.Module):
    """Token embedding, decoder layers and final norm (no lm_head)."""

    def __init__(self, config: Idefics2TextConfig) -> None:
        super().__init__()
        self.config = config
        shape = (config.vocab_size, config.hidden_size)  # weight left uninitialised here: see init_weights
        self.embed_tokens = nn.Embedding(*shape, padding_idx=config.pad_token_id, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryTable(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        segments: list[int] | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, dim), position_ids (B, T), mask (B, 1, T, S) or None -> hidden (B, T, dim), or
        (N, dim) at the N True positions of `keep` (B, T) in row-major order: the last layer then computes
        only there (its attention's keys and values excepted), as training needs at its learned positions.
        `segments`: the lengths of the sequences held end to end by one row (B = 1, no mask, no cache), each
        attending causally to itself only (padding removed, or examples packed)."""
        _forwards[0] += 1  # (the kept whole-step calls check their weights' storages again: _decode_entry)
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        if keep is None and segments is None:
            stepped = self._c_decode_step(inputs_embeds, cos, sin, mask, kv_cache, cache_position)
            if stepped is not None:
                return stepped
        x = inputs_embeds
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_keep = keep if i == last else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer,
                    x,
                    cos,
                    sin,
                    mask,
                    kv_cache,
                    cache_position,
                    layer_keep,
                    segments,
                    use_reentrant=False,
                )
            else:
                x = layer(x, cos, sin, mask, kv_cache, cache_position, layer_keep, segments)
        return self.norm(x)

    # ---- a CPU decode step in one C call ------------------------------------------------------------------

    def _c_decode_step(self, x, cos, sin, mask, kv_cache, cache_position) -> torch.Tensor | None:
        """The decoder's output (after its last norm) for a CPU decode step (one token per row, a row cache:
        kv_cache.row_buffers, its per-layer buffers in kv_cache.keys and .values) from one
        ckernels.decoder_step call, where every layer's weights can go there and that call is measured faster
        than the layers' own ops (each with its own chosen kernels); else None."""
        if mask is None or x.shape[1] != 1 or not x.is_cpu or cos.dtype != x.dtype:
            return None
        layers = self._c_step_layers(x.dtype, x.shape[0], kv_cache)
        if layers is None:
            return None
        keys, values = kv_cache.keys, kv_cache.values
        norm = self.norm
        if norm._forward_hooks or norm._forward_pre_hooks or norm.weight.dtype != x.dtype:
            return norm(self._c_step(layers, x, cos, sin, cache_position, mask, keys, values))
        return self._c_step(layers, x, cos, sin, cache_position, mask, keys, values, norm.weight)

    def c_decode_tokens(
        self, tokens: list[int], positions: list[int], kv_cache: Any, head: nn.Module
    ) -> torch.Tensor | None:
        """The logits (B, V) float32 of a CPU decode step run whole in one C call (ckernels.DecodeCall): row
        b's token tokens[b] at position positions[b] (its cache slot) of kv_cache (a row cache, as
        `_c_decode_step` takes), attending over its slots up to there (the last sliding_window of them), and
        `head` the language-model head. The same numbers as the embedding, `forward` and `head` run with the C
        kernels, which this takes only where the one-call step is the one chosen and the head's C product is
        too, or was measured within HEAD_JOINS_WITHIN of the chosen one (HEAD_JOINS_SCREENED for a float head
        whose greedy steps are screened; else None, and the step runs as those calls). The call is prepared
        once per cache view and kept while the weights, hooks and chosen kernels stay as they were: assigned
        weights, hooks and kernels are checked every step; the weights' storages (`param.data = ...`, `.to()`)
        at the first step after any forward of the decoder (a prefill: each generation, each request the
        engine admits), since reading every storage costs more than a small model's step can spare. Until then
        a weight given new storage mid-generation is read where it was (the call holds that storage): the
        generation ends on the weights it began with."""
        entry = self._decode_entry(tokens, positions, kv_cache, head)
        return None if entry is None else entry.call(tokens, positions)

    def c_decode_greedy(
        self,
        tokens: list[int],
        positions: list[int],
        kv_cache: Any,
        head: nn.Module,
        excluded: list[list[int]] | None = None,
    ) -> list[int] | None:
        """Each row's greedy token from the same step as `c_decode_tokens` (the index of its first largest
        logit, as sampler.first_largest of those logits gives, row b's `excluded[b]` ids left out), picked in
        the same C call. For a float32 or bfloat16 head with the route on (kernels.greedy_screen), its int8
        copy (ckernels.HeadScreen, made on the first such step and kept while the head's bytes stay the same,
        checked once per prepared call) rules out all but a few of its rows, which alone are computed as the
        head's product computes them; any other head's logits are made whole. None where `c_decode_tokens`
        would give None."""
        entry = self._decode_entry(tokens, positions, kv_cache, head)
        if entry is None:
            return None
        screening = kernels.greedy_screen()
        weight = entry.call.head_weight
        # a screen of the storage the call reads: not of a new one given to the weight since it was prepared
        # (the call reads the one it began with until the next prefill); looked at only while none is made
        if (
            screening
            and entry.screen is None
            and weight.dtype == entry.call.dtype
            and weight.data_ptr() == entry.call.head_ref.data
        ):
            entry.screen = _head_screen(weight)
        return entry.call.argmax(tokens, positions, entry.screen if screening else None, excluded)

    def _decode_entry(
        self, tokens: list[int], positions: list[int], kv_cache: Any, head: nn.Module
    ) -> _DecodeEntry | None:
        """The prepared whole-step call for this cache view (kept between steps while it holds), or None."""
        if not hasattr(kv_cache, "row_buffers"):
            return None
        kept = self.__dict__.get("_decode_calls")  # not in state_dict
        if kept is None:
            kept = self.__dict__["_decode_calls"] = _KeptCalls()
        entry = kept.get(kv_cache)
        forwards = _forwards[0]
        if (
            entry is not None
            and entry.head is head
            and entry.epoch == kernels.routes_epoch()
            and not torch.is_grad_enabled()
            and not (self.training and self.config.attention_dropout > 0)
            and entry.snapshot.holds(storages=entry.forwards != forwards)
        ):
            entry.forwards = forwards
            return entry
        entry = self._prepare_decode_call(len(tokens), max(positions) + 1, kv_cache, head)
        if entry is None:
            kept.pop(kv_cache, None)
            return None
        kept[kv_cache] = entry
        return entry

    def _prepare_decode_call(
        self, rows: int, needed: int, kv_cache: Any, head: nn.Module
    ) -> _DecodeEntry | None:
        epoch = kernels.routes_epoch()
        embed, norm = self.embed_tokens, self.norm
        dtype = embed.weight.dtype
        watched = (embed, norm, head)
        head_operands = getattr(head, "c_operands", lambda *args: None)(dtype, "check")
        # a float head's greedy steps read its int8 screen in the call (`c_decode_greedy`), not its product
        screened = head_operands is not None and head_operands[1] is None and kernels.greedy_screen()
        if (
            not embed.weight.is_cpu
            or not embed.weight.is_contiguous()
            or norm.weight.dtype != dtype
            or any(module._forward_hooks or module._forward_pre_hooks for module in watched)
            or not getattr(head, "c_chosen", lambda *args: False)(
                dtype, rows, HEAD_JOINS_SCREENED if screened else HEAD_JOINS_WITHIN
            )
        ):
            return None
        layers = self._c_step_layers(dtype, rows, kv_cache)
        operands = head.c_operands(dtype, "move") if layers is not None else None
        if operands is None:
            return None
        config = self.config
        # every position the cache holds, so that the call serves the cache's whole length
        table = self.rotary.table(dtype, embed.weight.device, max(needed, kv_cache.keys[0].shape[2]))
        call = ckernels.DecodeCall(
            layers, embed.weight, table, config.sliding_window, kv_cache.keys, kv_cache.values,
            config.num_attention_heads, config.rms_norm_eps, config.hidden_act, norm.weight, operands,
        )  # fmt: skip
        tensors = [*layers.sources, embed.weight, norm.weight, *_flat(operands)]
        return _DecodeEntry(call, _Snapshot([self, head], tensors), head, epoch, _forwards[0])

    def _c_step_layers(self, dtype: torch.dtype, rows: int, kv_cache: Any) -> ckernels.DecoderLayers | None:
        """The layers for a one-call C decode step of `rows` rows with activations of `dtype` over kv_cache,
        where every layer can go there and that call is the one measured faster; else None."""
        if (
            not hasattr(kv_cache, "row_buffers")
            or rows > ckernels.MAX_ROWS
            or torch.is_grad_enabled()
            or (self.training and self.config.attention_dropout > 0)  # the layers' ops drop attention weights
            or dtype not in ckernels.DTYPES
            or self.config.hidden_act not in ckernels.ACTIVATIONS
            or not kernels.c_kernels()
        ):
            return None
        keys, values = kv_cache.keys, kv_cache.values
        if keys[0].dtype != dtype or values[0].dtype != dtype:  # (every layer's buffers have one dtype)
            return None
        layers = self._c_layers(dtype)
        checked = layers or self._c_layers(dtype, layout="check")  # int4 weights still in torch's layout
        if checked is None:
            return None
        bench = self._step_bench(dtype)
        if kernels.choose("decoder_step", checked.key, rows, lambda: ["layers", "c"], bench) != "c":
            return None
        if layers is None:  # int4 weights in torch's layout: they move to the C kernels' for good
            layers = self._c_layers(dtype, layout="move")
        return layers

    def _c_step(self, layers, x, cos, sin, slots, mask, keys, values, final_norm=None) -> torch.Tensor:
        config = self.config
        return ckernels.decoder_step(
            layers, x, cos, sin, slots, mask, keys, values, config.num_attention_heads, config.rms_norm_eps,
            config.hidden_act, final_norm,
        )  # fmt: skip

    def _c_layers(
        self, dtype: torch.dtype, count: int | None = None, layout: str = "held"
    ) -> ckernels.DecoderLayers | None:
        """The first `count` layers' (default: all) weights for ckernels.decoder_step with activations of
        `dtype`, kept while the same tensors stay in place; None where a layer cannot go there (hooks such as
        LoRA's, a bias, weights of another dtype). `layout`: what int4 weights in torch's layout give (see
        QuantizedLinear.c_operands): None ("held"), the weights moved ("move"), portable copies ("copy"), or
        themselves ("check": layers to take the key of, not to compute with)."""
        cache = self.__dict__.setdefault("_c_layers_cache", _KeptLayers())  # not in state_dict
        slot = (dtype, count, layout == "check")  # "held" and "move" give the same layers once moved
        kept = cache.get(slot)
        if layout != "copy" and kept is not None and kept[0].holds():
            return kept[1]
        operands = []
        for layer in self.layers[:count]:
            attn, mlp = layer.self_attn, layer.mlp
            modules = (layer, attn, mlp, layer.input_layernorm, layer.post_attention_layernorm)
            if any(module._forward_hooks or module._forward_pre_hooks for module in modules):
                return None
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, *mlp.gated, mlp.down_proj)
            found = [getattr(p, "c_operands", lambda *args: None)(dtype, layout) for p in projections]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if None in found or any(norm.dtype != dtype for norm in norms):
                return None
            if found[4][0].dtype != found[5][0].dtype or found[4][0].shape != found[5][0].shape:
                return None  # gate and up in one product: one type
            if found[4][0].dtype == torch.uint8 and found[4][1].shape != found[5][1].shape:
                return None  # ... and one group size
            entry = dict(zip(ckernels.PROJECTIONS, found, strict=True))
            operands.append({"input_norm": norms[0], "post_norm": norms[1], **entry})
        config = self.config
        shape = (dtype, config.hidden_size, config.intermediate_size, config.num_attention_heads)
        layers = ckernels.DecoderLayers(operands, key=shape)
        if not all(t.is_contiguous() for t in layers.sources):  # the snapshot watches these, C reads copies
            return None
        if layout != "copy":
            cache[slot] = (_Snapshot([self.layers[:count]], layers.sources), layers)
        return layers

    def _step_bench(self, dtype: torch.dtype):
        def make(rows: int):
            # the leading layers up to STEP_BENCH_BYTES of weights: both routes read them from memory as a
            # decode step does, and timing the 8B's every layer would take seconds
            sizes = [sum(t.nbytes for t in layer.state_dict().values()) for layer in self.layers]
            count = max(1, sum(1 for total in itertools.accumulate(sizes) if total <= STEP_BENCH_BYTES))
            layers = self._c_layers(dtype, count, layout="copy")
            generator = torch.Generator().manual_seed(0)
            config, slot = self.config, 40
            x = torch.randn(rows, 1, config.hidden_size, generator=generator).to(dtype)
            cos, sin = self.rotary(torch.full((rows, 1), slot), dtype)
            slots = torch.full((rows,), slot)
            mask = torch.ones(rows, 1, 1, slot + 1, dtype=torch.bool)
            shape = (rows, config.num_key_value_heads, slot + 1, config.head_dim)
            cache = _RowCache([torch.randn(shape, generator=generator).to(dtype) for _ in range(2 * count)])

            def run(kernel: str) -> torch.Tensor:
                if kernel == "c":
                    return self._c_step(layers, x, cos, sin, slots, mask, cache.keys, cache.values)
                h = x
                for layer in self.layers[:count]:
                    h = layer(h, cos, sin, mask, cache, slots)
                return h

            return run

        return make


# the head's C product joins the whole-step call where it was measured at most this many times the chosen
# kernel's time: the call saves the head's own round trip from Python (float32 "mid" decode on an Intel
# Xeon, head in the call against a separate call by torch's product, which won its race by 0.3%: 16.42 ms
# against 16.81 ms a step)
HEAD_JOINS_WITHIN = 1.05
# the same for a float head where greedy steps are screened (kernels.greedy_screen): those read a quarter
# (float32) or half (bfloat16) of the head's bytes in the call, and a greedy float32 "mid" decode on an Intel
# Xeon ran at 35 tok/s without the call (torch's head product had won its race by 5%) against 44 with it
HEAD_JOINS_SCREENED = 1.25
STEP_BENCH_BYTES = 2**29  # of weights read by one timed decoder step (the "decoder_step" race)


@dataclasses.dataclass
class _DecodeEntry:
    """A prepared whole-step call (MistralDecoder.c_decode_tokens) and what must hold for it to be used."""

    call: ckernels.DecodeCall
    snapshot: _Snapshot  # the decoder's and the head's tensors and hooks
    head: nn.Module
    epoch: int  # kernels.routes_epoch() when the kernels were chosen
    forwards: int  # _forwards[0] when the tensors' storages were last found the same
    screen: ckernels.HeadScreen | None = None  # for greedy steps: checked against the head when first asked


# the int8 copies of float heads that greedy steps read, one per head weight (dropped with it)
# weight (keyed by identity) -> (the hash of its bytes the screen was made from, ckernels.HeadScreen)
_screens: WeakIdKeyDictionary = WeakIdKeyDictionary()
_screens_lock = threading.Lock()


def _head_screen(weight: torch.Tensor) -> ckernels.HeadScreen:
    """The screen of a float head weight: the one kept for it where the weight's bytes still hash the same
    (an in-place change, even through `.data`, makes a new one), else made now."""
    seen = ckernels.fingerprint(weight)
    with _screens_lock:
        made_from, screen = _screens.get(weight, (None, None))
    if screen is None or made_from != seen or screen.q.shape != weight.shape:
        screen = ckernels.HeadScreen(weight)
        with _screens_lock:
            _screens[weight] = (seen, screen)
    return screen


class _KeptCalls(weakref.WeakKeyDictionary):
    """MistralDecoder.c_decode_tokens' calls, one per cache view (dropped with it): empty in a copy of the
    model and when pickled, as _KeptLayers."""

    def __deepcopy__(self, memo) -> _KeptCalls:
        return _KeptCalls()

    def __reduce__(self):
        return _KeptCalls, ()


class _KeptLayers(dict):
    """MistralDecoder._c_layers' layers kept between steps: empty in a copy of the model (whose tensors are
    other ones) and when pickled (they hold memory addresses)."""

    def __deepcopy__(self, memo) -> _KeptLayers:
        return _KeptLayers()

    def __reduce__(self):
        return _KeptLayers, ()


_registrations = [0]  # parameters, buffers and submodules assigned to any module of this process so far
_forwards = [0]  # MistralDecoder.forward calls of this process so far (prefills among them)


@functools.cache
def _count_registrations() -> None:
    """Count every parameter, buffer and submodule assigned to any module from now on (torch's global
    registration hooks; they see `module.weight = ...`, a buffer replaced, a submodule swapped)."""

    def count(*args) -> None:
        _registrations[0] += 1

    for register in (
        torch.nn.modules.module.register_module_parameter_registration_hook,
        torch.nn.modules.module.register_module_buffer_registration_hook,
        torch.nn.modules.module.register_module_module_registration_hook,
    ):
        register(count)


class _Snapshot:
    """Whether the modules under `roots` still compute with `tensors` as they did, told cheaply: no
    parameter, buffer or submodule assigned to any module since, no hooks under `roots`, and (`storages`)
    each of `tensors` on the same storage (`param.data = ...` and `.to()` keep the object and change its
    storage; the costliest part: reading every tensor's storage after a decode step has streamed the weights
    through the caches)."""

    def __init__(self, roots: list[nn.Module], tensors: list[torch.Tensor]) -> None:
        _count_registrations()
        self.registrations = _registrations[0]
        modules = [m for root in roots for m in root.modules()]
        self.hooks = [hooks for m in modules for hooks in (m._forward_hooks, m._forward_pre_hooks)]
        self.tensors, self.addresses = tensors, [t.data_ptr() for t in tensors]

    def holds(self, storages: bool = True) -> bool:
        return (
            self.registrations == _registrations[0]
            and not any(self.hooks)
            and (not storages or list(map(torch.Tensor.data_ptr, self.tensors)) == self.addresses)
        )


def _flat(value) -> list[torch.Tensor]:
    return [t for t in (value if isinstance(value, tuple) else (value,)) if t is not None]


class _RowCache:
    """Keys and values (B, Hkv, L, D) per layer (the first half of `buffers` keys, the second values), each
    row writing its one new token at its own slot (decoding.kv_rows.DecodeView's protocol), for timings."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        half = len(buffers) // 2
        self.keys, self.values = buffers[:half], buffers[half:]

    def row_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]

    def update(self, layer: int, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int):
        rows = torch.arange(k.shape[0])
        self.keys[layer][rows, :, cache_position] = k[:, :, 0]
        self.values[layer][rows, :, cache_position] = v[:, :, 0]
        return self.keys[layer][:, :, :length], self.values[layer][:, :, :length]
