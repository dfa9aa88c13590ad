"""The logits controls as small tensor functions, which the decode core's chain (idefics2.decoding.sampler)
runs in order: repetition penalty, banned words, then (sampling only) top-k and top-p.

Every function takes float scores (B, V) and returns new scores; masked-out tokens get -inf.
"""

from __future__ import annotations

import torch


def repetition_penalty_(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize every token already in the context once: negative scores are multiplied by the penalty,
    positive ones divided by it (CTRL's rule). `seen` (B, V) bool marks the tokens present in each row."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def mark_seen_(seen: torch.Tensor, token_ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Add `token_ids` (B, T) to the per-row `seen` mask (B, V) in place; `keep` (B, T) picks which count."""
    if keep is None:
        keep = torch.ones_like(token_ids, dtype=torch.bool)
    vocab = seen.shape[-1]
    # Route the ignored positions (and ids beyond the logits width) to a spare column that is dropped.
    ids = torch.where(keep & (token_ids < vocab), token_ids, vocab)
    spare = torch.zeros(seen.shape[0], vocab + 1, dtype=torch.bool, device=seen.device)
    spare.scatter_(1, ids, True)
    seen |= spare[:, :vocab]
    return seen


class BadWords:
    """Forbid token sequences: a single-token entry is never produced; for a longer entry its last token is
    forbidden whenever the row currently ends with the entry's other tokens. Single-token entries equal to an
    end-of-sequence id are ignored so a row can always stop."""

    def __init__(self, bad_words_ids: list[list[int]], vocab_size: int, eos_token_ids: list[int], device):
        singles = [seq[0] for seq in bad_words_ids if len(seq) == 1 and seq[0] not in eos_token_ids]
        self.single = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if singles:
            self.single[torch.tensor(singles, device=device)] = True
        by_prefix_len: dict[int, list[list[int]]] = {}
        for seq in bad_words_ids:
            if len(seq) > 1:
                by_prefix_len.setdefault(len(seq) - 1, []).append(seq)
        # how many trailing tokens of a row's context the entries can look at
        self.longest_prefix = max(by_prefix_len, default=0)
        # one (prefixes (G, k), last tokens (G,)) pair per prefix length k
        self.groups = [
            (
                torch.tensor([s[:-1] for s in seqs], device=device),
                torch.tensor([s[-1] for s in seqs], device=device),
            )
            for seqs in by_prefix_len.values()
        ]

    def __call__(self, scores: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """scores (B, V); context (B, L): every token of each row so far, prompt included."""
        banned = self.single.expand_as(scores).clone()
        for prefixes, last in self.groups:
            k = prefixes.shape[1]
            if k > context.shape[1]:
                continue
            hits = (context[:, None, -k:] == prefixes).all(-1)  # (B, G)
            # sums rather than a scatter, so two entries ending in the same token cannot overwrite each other
            counts = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
            banned |= counts.index_add_(1, last, hits.to(torch.int32)) > 0
        return scores.masked_fill(banned, float("-inf"))


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the tokens scoring at least the k-th best score of their row (ties at the boundary are kept)."""
    k = min(k, scores.shape[-1])
    kth_best = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth_best, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose probabilities add up to at most 1 - p. The most
    likely token always survives."""
    ascending, order = torch.sort(scores, dim=-1)
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = tail_mass <= 1 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
