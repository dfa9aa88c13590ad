"""One request inside the engine: its prompt, images, controls, cache row and progress. Its next token is
chosen by the decode core's logits chain (idefics2.decoding.sampler) from the sampler it carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from idefics2.decoding.sampler import RowSampler
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
        grammar = (options.get("grammars") or [None])[0]
        # its controls and what they remember (tokens seen, grammar state, ...)
        state = None if grammar is None else grammar.new_state(options["eos_token_id"])
        self.sampler = RowSampler(options, prompt_ids, vocab_size, device, state)

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

    def accept(self, token: int, logprob: float | None = None) -> tuple[str, str | None]:
        """Record a new token: (the text it adds, the finish reason or None)."""
        self.generated.append(token)
        self.sampler.accept(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
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
