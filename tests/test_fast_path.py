"""Fast path: packed vision encoding, grouped decode attention, bfloat16 mode, GPU paths (skipped on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.decoding import runner as runner_module
from idefics2.decoding.runner import RunnerPool
from idefics2.modeling import attention as attention_module
from idefics2.modeling import kernels
from idefics2.modeling.attention import attention, grouped_matmul_attention, per_head_attention
from idefics2.modeling.vision import PackedLayout
from oracle_model import build_reference_checkpoint, rel_diff
from oracle_processing import build_reference_processor

N_LATENTS = 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fast")
    build_reference_checkpoint(folder, seed=3)
    build_reference_processor(
        folder, image_seq_len=N_LATENTS, do_image_splitting=True, longest_edge=70, shortest_edge=28
    )
    return folder


@pytest.fixture(scope="module")
def models(checkpoint):
    from transformers import Idefics2ForConditionalGeneration as Reference

    ref = Reference.from_pretrained(checkpoint, attn_implementation="sdpa", dtype=torch.float32).eval()
    return ref, Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()


def image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_features(ref, pixel_values, pixel_attention_mask) -> torch.Tensor:
    with torch.no_grad():
        out = ref.model.get_image_features(pixel_values, pixel_attention_mask)
    return torch.cat(out.pooler_output).view(-1, N_LATENTS, ref.config.text_config.hidden_size)


def test_packed_vision_matches_padded_reference_with_splitting(checkpoint, models):
    """Images of different sizes, split into crops, padded to the batch's largest and padded in count with
    all-zero images: our packed encoding gives transformers' padded features."""
    ref, ours = models
    processor = Idefics2Processor.from_pretrained(checkpoint)
    texts = ["<image>Two pictures<image>", "<image>One picture"]
    images = [[image(70, 40, 0), image(30, 66, 1)], [image(56, 56, 2)]]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_attention_mask"]
    assert pixel_values.shape[1] == 10  # 2 x (4 crops + image), the second sample padded with 5 zero images
    assert not bool(pixel_mask.all())  # crops smaller than the batch's largest are padded
    with torch.no_grad():
        got = ours.get_image_features(pixel_values, pixel_mask)
    expected = reference_features(ref, pixel_values, pixel_mask)
    assert got.shape == expected.shape == (15, N_LATENTS, 64)
    assert rel_diff(got, expected) <= 1e-5
    with torch.no_grad():
        logits = ours(**batch).logits
        ref_logits = ref(**batch).logits
    assert rel_diff(logits, ref_logits, batch["attention_mask"]) <= 1e-5


def test_packed_vision_any_real_patch_pattern(models):
    """Real pixels that are not a top-left rectangle, sizes interleaved (A, B, A): same as transformers."""
    ref, ours = models
    torch.manual_seed(0)
    pixel_values = torch.randn(1, 3, 3, 56, 56)
    mask = torch.zeros(1, 3, 56, 56, dtype=torch.long)
    mask[0, 0, :28, :42] = 1
    mask[0, 1] = 1
    mask[0, 2, 14:42, 0:42] = 1  # same real-patch count as image 0, not at the top-left
    pixel_values = pixel_values * mask[:, :, None]
    with torch.no_grad():
        got = ours.get_image_features(pixel_values, mask)
    assert rel_diff(got, reference_features(ref, pixel_values, mask)) <= 1e-5


def test_packed_layout_groups_and_order():
    mask = torch.zeros(4, 3, 3, dtype=torch.bool)
    mask[0, :2, :2] = True  # 4 patches
    mask[1] = True  # 9
    mask[2, :1, :] = True  # 3
    mask[3, :2, :2] = True  # 4
    layout = PackedLayout.from_patch_mask(mask)
    assert layout.lengths == [4, 9, 3, 4]
    # the encoder's order: images 0 and 3 (4 patches each), then 1, then 2, each size one slice of its axis
    assert layout.groups == [(4, slice(0, 8)), (9, slice(8, 17)), (3, slice(17, 20))]
    assert layout.order.tolist() == [0, 1, 2, 3, 16, 17, 18, 19, *range(4, 13), 13, 14, 15]
    assert torch.equal(layout.order[layout.restore], torch.arange(20))
    in_order = PackedLayout.from_patch_mask(mask[[0, 3, 1]])
    assert in_order.order is None and in_order.restore is None
    assert in_order.groups == [(4, slice(0, 8)), (9, slice(8, 17))]


@pytest.mark.parametrize("t", [1, 3])
def test_grouped_matmul_attention_matches_sdpa_on_repeated_heads(t):
    torch.manual_seed(0)
    q = torch.randn(2, 8, t, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 11, 16, dtype=torch.float64), torch.randn(2, 2, 11, 16, dtype=torch.float64)
    mask = torch.rand(2, 1, t, 11) > 0.3
    mask[..., 0] = True
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), attn_mask=mask, scale=0.3
    )
    got = grouped_matmul_attention(q, k, v, mask, scale=0.3)
    assert rel_diff(got, expected) <= 1e-12
    per_head = torch.rand(2, 8, t, 11) > 0.3
    per_head[..., 0] = True
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), attn_mask=per_head, scale=0.3
    )
    assert rel_diff(grouped_matmul_attention(q, k, v, per_head, scale=0.3), expected) <= 1e-12


def test_per_head_attention_matches_sdpa_across_query_blocks_and_grouped_heads(monkeypatch):
    monkeypatch.setattr(attention_module, "PER_HEAD_QUERY_BLOCK", 4)  # 10 queries: blocks of 4, 4, 2
    torch.manual_seed(0)
    q = torch.randn(2, 6, 10, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, 13, 8, dtype=torch.float64), torch.randn(2, 3, 13, 8, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), scale=0.4
    )
    assert rel_diff(per_head_attention(q, k, v, scale=0.4), expected) <= 1e-12


def test_cpu_bfloat16_full_attention_takes_the_per_head_path_and_stays_close():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 30, 16) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2).reshape(2, 30, 64)
    low = [t.bfloat16() for t in (q, k, v)]
    with torch.no_grad(), kernels.force(native_bfloat16=True):
        fast = attention(*low, None, scale=0.25)
        assert torch.equal(fast, per_head_attention(*low, scale=0.25).transpose(1, 2).reshape(2, 30, 64))
    assert fast.dtype == torch.bfloat16
    assert rel_diff(fast.float(), exact) <= 2e-2
    with torch.enable_grad():  # training keeps sdpa (it has the backward)
        q_grad = low[0].clone().requires_grad_()
        attention(q_grad, low[1], low[2], None, scale=0.25).sum().backward()
    assert q_grad.grad is not None


def test_cpu_bfloat16_decode_attention_takes_the_grouped_path_and_stays_close():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    mask = torch.rand(2, 1, 1, 40) > 0.2
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    low = [t.bfloat16() for t in (q, k, v)]
    with torch.no_grad(), kernels.force(native_bfloat16=True):
        fast = attention(*low, mask, scale=0.25)
        grouped = grouped_matmul_attention(*low, mask, scale=0.25)
    assert torch.equal(fast, grouped.transpose(1, 2).reshape(2, 1, 128))
    assert rel_diff(fast.float(), exact.transpose(1, 2).reshape(2, 1, 128)) <= 2e-2


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_greedy_generation_matches_transformers(checkpoint, models, threads):
    """The default fast path end to end in float32 (oneDNN's linear kernels for prefill and decode steps, on
    one thread and on two): same greedy tokens as transformers."""
    ref, ours = models
    processor = Idefics2Processor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    texts = ["<image>What is in the picture", "Say something about<image>"]
    images = [[image(70, 40, 7)], [image(30, 66, 8)]]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ours.generate(**batch, max_new_tokens=8, eos_token_id=0, pad_token_id=0)
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        expected = ref.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=0, pad_token_id=0)
    assert torch.equal(got, expected)


def test_bfloat16_mode_logits_close_to_float32(checkpoint, models):
    _, ours = models
    bf16 = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    processor = Idefics2Processor.from_pretrained(checkpoint)
    batch = processor(text=["<image>A picture of"], images=[[image(60, 44, 5)]], return_tensors="pt")
    with torch.no_grad():
        low = bf16(**batch).logits
        high = ours(**batch).logits
    assert low.dtype == torch.bfloat16
    assert rel_diff(low.float(), high) <= 2e-2


def gpu_model_and_batch(checkpoint):
    gpu = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, device="cuda").eval()
    processor = Idefics2Processor.from_pretrained(checkpoint)
    batch = processor(text=["<image>A picture of"], images=[[image(60, 44, 5)]], return_tensors="pt")
    return gpu, batch.to("cuda")


def pooled_runner(model):
    """The one runner that generate's calls on `model` have left in the model's pool."""
    (runner,) = runner_module._pools[model].idle
    return runner


@needs_cuda
def test_cuda_graph_decoding_matches_eager(checkpoint):
    gpu, batch = gpu_model_and_batch(checkpoint)
    graphed = gpu.generate(**batch, max_new_tokens=6, eos_token_id=0)
    graphs = pooled_runner(gpu).graphs
    assert graphs is not None and graphs.graphs and not graphs.failed
    gpu.cuda_graphs = False
    assert torch.equal(graphed, gpu.generate(**batch, max_new_tokens=6, eos_token_id=0))


@needs_cuda
def test_cuda_generate_matches_cpu(checkpoint, models):
    _, ours = models
    gpu = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, device="cuda").eval()
    processor = Idefics2Processor.from_pretrained(checkpoint)
    batch = processor(text=["<image>A picture of"], images=[[image(60, 44, 5)]], return_tensors="pt")
    expected = ours.generate(**batch, max_new_tokens=6, eos_token_id=0)
    got = gpu.generate(**batch.to("cuda"), max_new_tokens=6, eos_token_id=0)
    assert torch.equal(got.cpu(), expected)


def test_runner_pool_lends_each_runner_once_and_keeps_them_by_bucket(models):
    _, ours = models
    pool = RunnerPool(size=2)
    with pool.borrow(ours, 2, 300) as first:
        assert first.length == 512 and first.rows == 2  # the length bucket
        with pool.borrow(ours, 2, 300) as other:
            assert other is not first  # lent out: a concurrent generation gets its own
    with pool.borrow(ours, 2, 400) as again:  # same bucket
        assert again in (first, other)
    with pool.borrow(ours, 1, 400) as one_row, pool.borrow(ours, 2, 600) as longer:
        assert one_row not in (first, other) and longer not in (first, other)
    assert len(pool.idle) == 2  # only the newest are kept
    ours.to(torch.float64)
    try:
        with pool.borrow(ours, 1, 400) as moved:  # a runner whose cache has the old dtype is not reused
            assert moved is not one_row and moved.cache.cache.keys[0].dtype == torch.float64
    finally:
        ours.to(torch.float32)


@needs_cuda
def test_cuda_graphs_reused_across_generations_and_compiled_decoding_matches_eager(checkpoint):
    gpu, batch = gpu_model_and_batch(checkpoint)
    graphed = gpu.generate(**batch, max_new_tokens=6, eos_token_id=0)
    runner = pooled_runner(gpu)
    steps = dict(runner.graphs.graphs)
    assert torch.equal(gpu.generate(**batch, max_new_tokens=6, eos_token_id=0), graphed)
    assert pooled_runner(gpu) is runner and runner.graphs.graphs == steps  # replayed, not captured again
    gpu.compile_decode = True
    compiled = gpu.generate(**batch, max_new_tokens=6, eos_token_id=0)
    assert {key[2] for key in runner.graphs.graphs} == {False, True} and not runner.graphs.failed
    gpu.compile_decode, gpu.cuda_graphs = False, False
    eager = gpu.generate(**batch, max_new_tokens=6, eos_token_id=0)
    assert torch.equal(graphed, eager) and torch.equal(compiled, eager)
