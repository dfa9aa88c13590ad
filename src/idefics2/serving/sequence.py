"""One request inside the engine: its prompt, images, controls, cache row and progress, and how its next
token is chosen from its logits (the controls of `generate`, applied in the same order, one row at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from idefics2.sampling import (
    BadWords,
    forbid_tokens,
    mark_seen_,
    pick_next_tokens,
    repetition_penalty_,
    top_k_filter,
    top_p_filter,
)
from idefics2.serving.request import RequestHandle
from idefics2.streaming import ReplyStream

WAITING, PREFILL, DECODE = "waiting", "prefill", "decode"


@dataclass
class ImageInput:
    key: str  # content hash (see image_cache.image_key)
    features: torch.Tensor | None = None  # (n_crops, n_latents, hidden) once known
    pixel_values: torch.Tensor | None = None  # (1, n_crops, C, H, W) when the features must be computed
    pixel_attention_mask: torch.Tensor | None = None
    patches: int = 0  # vision-encoder patches of its real pixels, while the features are still to compute


class Sequence:
    def __init__(
        self,
        handle: RequestHandle,
        prompt_ids: list[int],
        images: list[ImageInput],
        options: dict[str, Any],
        tokenizer: Any,
        vocab_size: int,
        device: torch.device,
        logprobs: bool = False,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.handle = handle
        self.prompt_ids = prompt_ids
        self.images = images
        self.options = options
        self.eos = set(options["eos_token_id"])
        self.state = WAITING
        self.row = -1
        self.embeds: torch.Tensor | None = None  # (1, P, hidden), made when the prefill starts
        self.filled = 0  # prompt positions already in the cache
        self.generated: list[int] = []
        self.logprobs: list[float] | None = [] if logprobs else None
        self.stopped_by: str | None = None  # "eos_token" or "stop_sequence" once it stops
        self.reply = ReplyStream(
            tokenizer,
            options["stop_strings"],
            skip_special_tokens=skip_special_tokens,
            include_stop=include_stop_str_in_output,
        )
        self.text_parts: list[str] = []
        grammars = options.get("grammars") or [None]
        # the request's place in its JSON schema or regex (structured output), None when it is free
        self.grammar = grammars[0].new_state(options["eos_token_id"]) if grammars[0] is not None else None
        # greedy rows that the engine picks together, with one argmax over their logits
        self.greedy_plain = not (
            options["do_sample"]
            or options["repetition_penalty"] != 1.0
            or options["bad_words_ids"]
            or self.grammar is not None
        )
        self.bad_words = (
            BadWords(options["bad_words_ids"], vocab_size, options["eos_token_id"], device)
            if options["bad_words_ids"]
            else None
        )
        self.seen: torch.Tensor | None = None
        if options["repetition_penalty"] != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            mark_seen_(self.seen, torch.tensor([prompt_ids], device=device))

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def position(self) -> int:
        """The cache slot of the next token fed to the model (its last generated token)."""
        return self.prompt_length + len(self.generated) - 1

    def vision_cost(self) -> int:
        """Image patches the vision encoder still has to run for this request."""
        return sum(image.patches for image in self.images if image.features is None)

    def holds_back_eos(self) -> bool:
        """Whether min_new_tokens still forbids the end-of-sequence tokens."""
        return len(self.generated) < self.options["min_new_tokens"] and bool(self.eos)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's float32 logits (V,), as `generate` would choose it."""
        opts = self.options
        scores, device = logits[None], logits.device
        if self.seen is not None:
            scores = repetition_penalty_(scores, self.seen, opts["repetition_penalty"])
        if self.bad_words is not None:
            scores = self.bad_words(scores, torch.tensor([self.prompt_ids + self.generated], device=device))
        if self.holds_back_eos():
            scores = forbid_tokens(scores, torch.tensor(sorted(self.eos), device=device))
        if self.grammar is not None:
            scores = self.grammar.mask_(scores.clone())  # the caller's logits stay unmasked
            if not bool(torch.isfinite(scores).any()):
                raise ValueError(
                    "no token is allowed next (bad_words_ids forbid every token the grammar allows)"
                )
        if opts["do_sample"]:
            if opts["temperature"] != 1.0:
                scores = scores / opts["temperature"]
            if opts["top_k"]:
                scores = top_k_filter(scores, opts["top_k"])
            if opts["top_p"] < 1.0:
                scores = top_p_filter(scores, opts["top_p"])
        return int(pick_next_tokens(scores, opts["do_sample"], opts["generator"])[0])

    def accept(self, token: int, logprob: float | None = None) -> tuple[str, str | None]:
        """Record a new token: (the text it adds, the finish reason or None)."""
        self.generated.append(token)
        if self.grammar is not None:
            self.grammar.advance(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.seen is not None:
            mark_seen_(self.seen, torch.tensor([[token]], device=self.seen.device))
        if token in self.eos:
            self.stopped_by = "eos_token"
            return self.reply.finish(token), "stop"
        text = self.reply.push(token)
        if self.reply.stopped:
            self.stopped_by = "stop_sequence"
            return text + self.reply.finish(), "stop"
        if len(self.generated) >= self.options["max_new_tokens"]:
            return text + self.reply.finish(), "length"
        return text, None
