"""The chunked loss (idefics2.training.loss): the same log-probabilities and gradients as the plain
log-softmax of the full logits, for a frozen head, a trained head, a bias and a LoRA adapter on the head, and
the training objectives built on it against the model's own unchunked loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
from idefics2.quantization import QuantizedLinear
from idefics2.training import LoraConfig, TokenLoss, add_lora, freeze, mark_only_lora_trainable
from idefics2.training.loss import target_logprobs
from oracle_model import tiny_config_dict

CPU = torch.device("cpu")


def plain_logprobs(hidden, head, targets):
    """The reference: full logits through the module (hooks included), log-softmax, gather."""
    logits = head(hidden).double()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def gradients(fn, tensors, weights):
    """(value, gradients of sum(weights * value) with respect to `tensors`)."""
    value = fn()
    grads = torch.autograd.grad((value * weights).sum(), tensors)
    return value.detach(), grads


def head_cases():
    """(name, head, trained parameters of the head) in float64."""
    torch.manual_seed(0)
    frozen = nn.Linear(16, 50, bias=False).double().requires_grad_(False)
    trained = nn.Linear(16, 50, bias=False).double()
    with_bias = nn.Linear(16, 50).double()
    lora_head = nn.Linear(16, 50, bias=False).double().requires_grad_(False)
    lora_head.lm_head = lora_head  # add_lora targets by module name
    holder = nn.Module()
    holder.lm_head = nn.Linear(16, 50, bias=False).double()
    add_lora(holder, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head"]))
    mark_only_lora_trainable(holder)
    with torch.no_grad():
        holder.lm_head.lora_A.weight.copy_(torch.randn(4, 16))
        holder.lm_head.lora_B.weight.copy_(torch.randn(50, 4))
    holder.double()
    return [
        ("frozen", frozen, []),
        ("trained", trained, [trained.weight]),
        ("bias", with_bias, [with_bias.weight, with_bias.bias]),
        ("lora", holder.lm_head, [holder.lm_head.lora_A.weight, holder.lm_head.lora_B.weight]),
    ]


@pytest.mark.parametrize("summed", [False, True], ids=["per-token", "summed"])
@pytest.mark.parametrize("case", range(4), ids=["frozen", "trained", "bias", "lora"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, None])
def test_values_and_gradients_equal_the_full_log_softmax_in_float64(case, chunk_rows, summed):
    _, head, trained = head_cases()[case]
    torch.manual_seed(1)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    # per-token weights, as DPO's per-sequence terms give; one scalar for the sum (the token loss)
    weights = torch.randn(() if summed else 7, dtype=torch.float64)
    tensors = [hidden, *trained]

    def ours_fn():
        return target_logprobs(hidden, head, targets, chunk_rows, summed=summed)

    def reference_fn():
        values = plain_logprobs(hidden, head, targets)
        return values.sum() if summed else values

    ours, our_grads = gradients(ours_fn, tensors, weights)
    ref, ref_grads = gradients(reference_fn, tensors, weights)
    assert ours.dtype == torch.float64 and ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-12
    for mine, theirs in zip(our_grads, ref_grads, strict=True):
        assert (mine - theirs).abs().max() < 1e-10 * max(1.0, theirs.abs().max().item())


def test_no_learned_token_gives_an_empty_result_and_a_zero_gradient():
    head = nn.Linear(8, 20, bias=False)
    hidden = torch.randn(0, 8, requires_grad=True)
    out = target_logprobs(hidden, head, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()
    assert hidden.grad.shape == (0, 8)


def test_bad_shapes_are_one_clear_error():
    head = nn.Linear(8, 20, bias=False)
    with pytest.raises(ValueError, match="targets"):
        target_logprobs(torch.randn(3, 8), head, torch.zeros(4, dtype=torch.long))


# --- the objective on the model, against the model's own unchunked loss (full logits + cross-entropy)
def tiny_batch(seed=0):
    torch.manual_seed(seed)
    input_ids = torch.randint(1, 32000, (2, 12))
    labels = input_ids.clone()
    labels[0, :5] = -100
    labels[1, :3] = -100
    labels[1, 9:] = -100
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("setup", ["lora", "lora+head", "full"])
def test_token_loss_and_gradients_equal_the_unchunked_loss(setup):
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(tiny_config_dict()))
    if setup == "full":
        freeze(model, vision=True, connector=True)  # no image in the batch
    else:
        targets = lora_targets = r".*text_model.*\.(q_proj|v_proj|down_proj)$"  # no image: no connector
        if setup == "lora+head":
            lora_targets = rf"({targets})|lm_head"
        add_lora(model, LoraConfig(lora_dropout=0.0, target_modules=lora_targets))
        mark_only_lora_trainable(model)
        with torch.no_grad():  # B is zero at first: give the adapters something to do
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    batch = tiny_batch()
    trained = [p for p in model.parameters() if p.requires_grad]
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())

    loss, _ = TokenLoss().summed(model, batch, CPU, torch.autocast("cpu", enabled=False))
    ours = torch.autograd.grad(loss, trained)
    reference = model(**batch).loss * n_tokens  # mean cross-entropy over the (B, T, V) logits
    theirs = torch.autograd.grad(reference, trained)
    assert abs(loss.item() - reference.item()) < 1e-5 * reference.item()
    for mine, ref in zip(ours, theirs, strict=True):
        assert (mine - ref).abs().max() < 1e-5 * max(1e-3, ref.abs().max().item())
    if setup == "lora+head":
        assert any(g.abs().max() > 0 for g in ours[-2:])  # the head's adapter gets a gradient


def test_bf16_autocast_stays_close_to_the_unchunked_autocast_loss():
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(tiny_config_dict()))
    batch = tiny_batch()
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        loss, _ = TokenLoss().summed(model, batch, CPU, torch.autocast("cpu", dtype=torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = model(**batch).loss * n_tokens
    assert abs(loss.item() - reference.item()) < 1e-2 * reference.item()


def test_quantized_head_uses_its_dequantized_weight():
    torch.manual_seed(0)
    head = nn.Linear(32, 40, bias=False)
    quantized = QuantizedLinear.from_float(head.weight.detach(), None, bits=8)
    hidden = torch.randn(5, 32, requires_grad=True)
    targets = torch.randint(0, 40, (5,))
    ours = target_logprobs(hidden, quantized, targets, chunk_rows=2)
    ref = torch.log_softmax(quantized(hidden), dim=-1).gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(ours, ref, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.sum(), hidden)
    (g_ref,) = torch.autograd.grad(ref.sum(), hidden)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)
