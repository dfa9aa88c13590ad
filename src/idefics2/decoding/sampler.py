"""The one logits chain of the decode core: every row's controls applied to a step's logits together, then one
token per row, read back to the host once.

`generate` and the serving engine both choose their tokens here. Each row carries its own controls and the
state they keep (`RowSampler`); `sample_rows` takes the float32 logits (B, V) of B rows. The controls run in
the order transformers applies them: repetition penalty, banned words, minimum length, structured output,
then, for sampled rows, temperature, top-k and top-p before the draw; greedy rows take the argmax. Rows that
share a setting are filtered together, with the setting as a plain number (the same arithmetic as one row at
a time); a row's result never depends on the rows beside it: its filters see only its own scores, and a
sampled row draws from its own generator (rows that share one, as in one `generate` call, draw together, in
row order).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from idefics2.sampling import BadWords, mark_seen_, repetition_penalty_, top_k_filter, top_p_filter


class RowSampler:
    """One row's controls (the `options` that generation.resolve_options returns) and what they remember:
    the tokens seen (repetition penalty), the recent context (banned words), the grammar's state (structured
    output) and how many tokens were generated (minimum length)."""

    def __init__(
        self,
        options: dict[str, Any],
        prompt_ids: Sequence[int],
        vocab_size: int,
        device: torch.device,
        grammar: Any = None,
    ) -> None:
        self.do_sample = bool(options["do_sample"])
        self.temperature = options["temperature"]
        self.top_k = options["top_k"]
        self.top_p = options["top_p"]
        self.generator: torch.Generator | None = options["generator"]
        self.penalty = options["repetition_penalty"]
        self.min_new_tokens = options["min_new_tokens"]
        self.eos = list(options["eos_token_id"])
        self.grammar = grammar  # a constrained.GrammarState, or None for a free row
        self.generated = 0
        self.bad_words = None
        if options["bad_words_ids"]:
            self.bad_words = BadWords(options["bad_words_ids"], vocab_size, self.eos, device)
            self.context = list(prompt_ids)  # the row's tokens so far, prompt included
        self.seen: torch.Tensor | None = None  # (1, V) bool: tokens in the context
        if self.penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            mark_seen_(self.seen, torch.tensor([list(prompt_ids)], dtype=torch.long, device=device))

    @property
    def plain_greedy(self) -> bool:
        """Whether the row's token is the argmax of its logits, whatever they are (no control changes them
        except the minimum length, which `sample_rows` applies cheaply)."""
        return not (self.do_sample or self.seen is not None or self.bad_words or self.grammar is not None)

    def holds_back_eos(self) -> bool:
        """Whether the minimum length still forbids the end-of-sequence tokens."""
        return self.generated < self.min_new_tokens and bool(self.eos)

    def accept(self, token: int) -> None:
        """Record the token chosen for this row (its grammar raises ValueError if the token breaks it)."""
        self.generated += 1
        if self.seen is not None:
            self.seen[0, token] = True
        if self.bad_words is not None:
            self.context.append(token)
        if self.grammar is not None and not self.grammar.is_finished():
            self.grammar.advance(token)


def greedy_exclusions(rows: Sequence[RowSampler]) -> list[list[int]] | None:
    """Where every row's next token is the first largest of its logits but for a few ids (greedy, no control
    that changes the logits, a minimum length holding the end tokens back): those ids per row, with which
    a decode step may give the tokens instead of the logits (ModelRunner.decode_greedy); else None."""
    if not all(row.plain_greedy for row in rows):
        return None
    return [list(row.eos) if row.holds_back_eos() else [] for row in rows]


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSampler]) -> tuple[list[int], dict[int, ValueError]]:
    """Choose one token per row from logits (B, V) float32 (left unchanged): (tokens, errors), where errors
    maps the index of each row that cannot go on (its grammar allows no token that banned words leave) to
    the ValueError saying so; such a row's token is meaningless."""
    errors: dict[int, ValueError] = {}
    if all(row.plain_greedy for row in rows):
        tokens = first_largest(logits).tolist()
        # a row that may not end yet keeps its argmax unless that is an end token: masking the end tokens
        # cannot move an argmax that is none of them (it is the first largest logit either way)
        held = [row.holds_back_eos() and token in row.eos for row, token in zip(rows, tokens, strict=True)]
        if not any(held):
            return tokens, errors
    scores = logits.clone()
    everyone = range(len(rows))
    penalized = [i for i in everyone if rows[i].seen is not None]
    for penalty, at in _groups(rows, penalized, lambda r: r.penalty).items():
        seen = torch.cat([rows[i].seen for i in at])
        _apply(scores, at, lambda s, p=penalty, seen=seen: repetition_penalty_(s, seen, p))
    for i in everyone:
        row = rows[i]
        if row.bad_words is not None:
            context = row.context[-row.bad_words.longest_prefix :] if row.bad_words.longest_prefix else []
            context_ids = torch.tensor([context], dtype=torch.long, device=scores.device)
            scores[i : i + 1] = row.bad_words(scores[i : i + 1], context_ids)
    held = [(i, token) for i in everyone if rows[i].holds_back_eos() for token in rows[i].eos]
    if held:
        at, tokens = zip(*held)
        scores[list(at), list(tokens)] = float("-inf")
    for i in everyone:
        grammar = rows[i].grammar
        if grammar is not None and not grammar.is_finished():
            grammar.mask_(scores[i])
            if not bool(torch.isfinite(scores[i]).any()):
                errors[i] = ValueError(
                    "no token is allowed next (bad_words_ids forbid every token its json_schema or regex "
                    "allows here)"
                )
                scores[i] = 0.0
    sampled = [i for i in everyone if rows[i].do_sample]
    for temperature, at in _groups(rows, sampled, lambda r: r.temperature).items():
        if temperature != 1.0:
            _apply(scores, at, lambda s, t=temperature: s / t)
    for k, at in _groups(rows, sampled, lambda r: r.top_k).items():
        if k:
            _apply(scores, at, lambda s, k=k: top_k_filter(s, k))
    for p, at in _groups(rows, sampled, lambda r: r.top_p).items():
        if p < 1.0:
            _apply(scores, at, lambda s, p=p: top_p_filter(s, p))
    tokens = first_largest(scores)  # (B,)
    for at in _groups(rows, sampled, lambda r: id(r.generator)).values():  # rows sharing a generator
        index = torch.tensor(at, device=scores.device)
        probs = scores.index_select(0, index).softmax(dim=-1)
        drawn = torch.multinomial(probs, num_samples=1, generator=rows[at[0]].generator).squeeze(1)
        tokens.index_copy_(0, index, drawn)
    return tokens.tolist(), errors


def first_largest(scores: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest score (B, V) -> (B,): the first one where several tie, a NaN's where
    the row holds one, as argmax gives. Faster than torch's argmax, a share of every decode step: over a 32k
    vocabulary on an Intel Xeon, NumPy's argmax of CPU float32 / float64 rows takes 2.6 us, torch's max
    over the row 16 us, its argmax 40 us."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64) and scores.dim() == 2:
        return torch.from_numpy(scores.detach().numpy().argmax(axis=-1))
    return scores.max(dim=-1).indices


def _groups(
    rows: Sequence[RowSampler], indices: list[int], setting: Callable[[RowSampler], Hashable]
) -> dict[Hashable, list[int]]:
    """The row indices grouped by a setting of their rows, in row order within each group."""
    groups: dict[Hashable, list[int]] = {}
    for i in indices:
        groups.setdefault(setting(rows[i]), []).append(i)
    return groups


def _apply(scores: torch.Tensor, at: list[int], change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace rows `at` of scores (B, V) in place by `change` of those rows."""
    if len(at) == scores.shape[0]:
        scores.copy_(change(scores))
        return
    index = torch.tensor(at, device=scores.device)
    scores.index_copy_(0, index, change(scores.index_select(0, index)))
