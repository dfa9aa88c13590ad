"""Turning a growing list of token ids into text deltas; holding back text that may start a stop string."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# What tokenizers produce for a byte sequence that is not (yet) a whole UTF-8 character.
_INCOMPLETE = "\ufffd"


class TextDeltaDecoder:
    """Incremental detokenizer: `push(ids)` returns the text the new tokens add, `flush()` whatever is left.

    Each call decodes only a short window of recent tokens: the window's text without the new tokens is the
    reference, and the new text is what decoding the whole window adds to it. Decoding with a little left
    context keeps word-initial spaces right for SentencePiece vocabularies; a window whose text ends in an
    incomplete UTF-8 character (a byte-fallback piece still waiting for its other bytes) is not emitted yet.
    The deltas concatenate to `tokenizer.decode(all_ids, skip_special_tokens=...)`.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # first id of the decoding window
        self._emitted = 0  # ids before this one are already reflected in the returned text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: int | Iterable[int]) -> str:
        self.ids.extend([ids] if isinstance(ids, int) else [int(i) for i in ids])
        done = self._decode(self.ids[self._start : self._emitted])
        text = self._decode(self.ids[self._start :])
        if len(text) <= len(done) or text.endswith(_INCOMPLETE):
            return ""
        self._start, self._emitted = self._emitted, len(self.ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Text of the tokens not emitted yet, even if it ends in an incomplete character."""
        done = self._decode(self.ids[self._start : self._emitted])
        text = self._decode(self.ids[self._start :])
        self._start = self._emitted = len(self.ids)
        return text[len(done) :]


class StopStringFilter:
    """Cuts a text stream at the first stop string (which is not emitted, unless `keep_stop`: then the cut
    follows it) and holds back any trailing text that could still grow into one, so streamed text never
    shows part of a stop string."""

    def __init__(self, stop_strings: Iterable[str], keep_stop: bool = False):
        self.stop_strings = [s for s in stop_strings]
        self.keep_stop = keep_stop
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        cut = find_stop(self.pending, self.stop_strings)
        if cut is not None:
            self.stopped = True
            if self.keep_stop:  # the longest stop string starting there
                cut += max(len(s) for s in self.stop_strings if self.pending.startswith(s, cut))
            out, self.pending = self.pending[:cut], ""
            return out
        keep = _longest_partial_stop(self.pending, self.stop_strings)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def find_stop(text: str, stop_strings: Iterable[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def trim_at_stop(text: str, stop_strings: Iterable[str] | None) -> str:
    """`text` up to (not including) its first stop string."""
    cut = find_stop(text, stop_strings or [])
    return text if cut is None else text[:cut]


def _longest_partial_stop(text: str, stop_strings: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class ReplyStream:
    """An assistant reply as text deltas, token by token: detokenized incrementally (special tokens dropped
    unless `skip_special_tokens=False`), leading whitespace removed, cut before the first stop string (held
    back while it may be forming; with `include_stop=True` the cut follows the stop string instead).

    `push(token)` returns the text that token adds (often ""); `stopped` turns True once a stop string has
    been seen; `finish()` returns the rest. The deltas concatenate to the reply.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop_strings: Iterable[str] | None = None,
        *,
        skip_special_tokens: bool = True,
        include_stop: bool = False,
    ):
        self.decoder = TextDeltaDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self.holdback = StopStringFilter(stop_strings or [], keep_stop=include_stop)
        self.include_stop = include_stop
        self.started = False

    @property
    def stopped(self) -> bool:
        return self.holdback.stopped

    def push(self, token: int) -> str:
        return self._strip_start(self.holdback.push(self.decoder.push(token)))

    def finish(self, end_token: int | None = None) -> str:
        """The rest of the reply; `end_token`: the end-of-sequence token that ended it, whose text (if any)
        is part of the reply with `include_stop=True`."""
        text = self.push(end_token) if end_token is not None and self.include_stop else ""
        return text + self._strip_start(self.holdback.push(self.decoder.flush()) + self.holdback.flush())

    def _strip_start(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text
