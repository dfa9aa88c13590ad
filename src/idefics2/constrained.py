"""Structured output: generation constrained to a JSON schema or a regular expression.

The grammar engine is llguidance (see README, "Structured output", for why): it reads the checkpoint's
`tokenizer.json`, turns a JSON schema or a regex into a grammar and, at every step, says which tokens may
come next. This module wraps it in three small pieces that any decoding loop can use: `generate`, and the
batching engine and server, which call the same functions.

    grammar = compile_grammar(tokenizer, json_schema=schema)   # or regex=r"..."; ValueError if invalid
    state = grammar.new_state(end_token_ids=[2, 32002])        # one per request (per batch row)
    for each decode step:                                       # outside any captured CUDA graph
        state.mask_(scores[row])         # float32 (vocab,) or (rows, vocab): -inf on forbidden tokens
        token = pick(scores[row])
        state.advance(token)             # ValueError if the grammar does not allow it
        if state.is_finished(): ...      # an end token was taken: the answer is complete

- **Compile once.** `compile_grammar` caches the compiled grammar per (schema or regex, tokenizer), so
  requests that share a schema share the work; building the tokenizer's token table (~0.15 s for a 32k
  vocabulary) is done once per tokenizer. `validate(json_schema=..., regex=...)` checks a schema or regex
  without a tokenizer, e.g. before a model is loaded or a request is queued. Both raise `ValueError` naming
  the problem (bad JSON, an unsupported schema keyword, a regex syntax error).
- **One state per row**, cheap to create (a copy of the compiled grammar's start state). Rows of one batch
  may carry different grammars or none: the decode core's logits chain (idefics2.decoding.sampler) masks and
  advances each row that has one.
- **End tokens.** The end-of-sequence ids given to `new_state` (for Idefics2 `</s>` and
  `<end_of_utterance>`) are allowed exactly when the text so far is complete (`state.can_end()`); once the
  grammar can go no further they are the only tokens allowed. Every other special token is forbidden. If
  max_new_tokens runs out first, the text is simply incomplete: the caller reports finish reason "length"
  and returns it as is (`grammar.matches(text)` tells complete from incomplete afterwards).
- **JSON layout.** Unless the schema sets llguidance's `"x-guidance"` options, JSON is written the way
  Python's `json.dumps` writes it (`{"a": 1, "b": [1, 2]}`: ", " and ": " separators, no other
  whitespace), optionally after one leading space (SentencePiece models like to start an answer with a
  space token). A fixed layout keeps small models from looping on whitespace. Object properties come in the
  schema's order.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np
import torch

# The layout of generated JSON, unless a schema's own "x-guidance" says otherwise.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled grammars kept per tokenizer (a server sees many schemas; the least recently used go first).
CACHE_SIZE = 256


class Grammar:
    """A JSON schema or regex compiled for one tokenizer. Immutable; shared by all requests using it."""

    def __init__(self, kind: str, source: str, matcher: llguidance.LLMatcher, table: _TokenTable):
        self.kind = kind  # "json_schema" or "regex"
        self.source = source  # the schema as JSON text, or the regex
        self._start = matcher
        self._table = table

    def new_state(self, end_token_ids: Sequence[int]) -> GrammarState:
        """A fresh per-request state. `end_token_ids`: the ids that end the answer (at least one)."""
        ends = [int(i) for i in end_token_ids]
        if not ends:
            raise ValueError("constrained generation needs at least one end-of-sequence token id")
        return GrammarState(self._start.deep_copy(), self._table, ends)

    def can_start(self) -> bool:
        """Whether any answer is possible: some token is allowed first, or the empty answer is complete."""
        state = self.new_state([0])
        return bool(not state.forbidden(self._table.words * 32).all()) or self._start.is_accepting()

    def matches(self, text: str) -> bool:
        """Whether `text` is a complete answer of this grammar (e.g. False for JSON cut by max_new_tokens)."""
        matcher = self._start.deep_copy()
        tokens = self._table.llg.greedy_tokenize(text)
        return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()

    def __repr__(self) -> str:
        return f"Grammar({self.kind}={self.source[:60]!r})"


class GrammarState:
    """Where one request stands in its grammar: which tokens may come next, and whether it may end."""

    def __init__(self, matcher: llguidance.LLMatcher, table: _TokenTable, end_token_ids: list[int]):
        self._matcher = matcher
        self._table = table
        self.end_token_ids = end_token_ids
        self._finished = False
        self._ends = np.array(end_token_ids, dtype=np.int64)
        # llguidance's allowed-token bitmask: token t is bit t % 32 of word t // 32
        self._words = np.empty(table.words, dtype=np.uint32)

    def can_end(self) -> bool:
        """Whether the text so far is complete, so an end token is allowed now."""
        return not self._finished and self._matcher.is_accepting()

    def is_finished(self) -> bool:
        """Whether an end token has been taken."""
        return self._finished

    def forbidden(self, vocab_size: int) -> np.ndarray:
        """(vocab_size,) bool: True for the tokens that may not come next."""
        if self._finished:
            raise ValueError("this answer is finished: it takes no more tokens")
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        bits = np.unpackbits(np.invert(words).view(np.uint8), bitorder="little")  # 1 = forbidden
        if bits.shape[0] < vocab_size:  # the model has rows beyond the tokenizer's tokens: never allowed
            bits = np.concatenate([bits, np.ones(vocab_size - bits.shape[0], np.uint8)])
        forbidden = bits[:vocab_size].view(bool)
        # the end tokens are ours, not llguidance's: allowed exactly when the text is complete
        forbidden[self._table.end_ids[self._table.end_ids < vocab_size]] = True
        if self._matcher.is_accepting():
            forbidden[self._ends[self._ends < vocab_size]] = False
        return forbidden

    def mask_(self, scores: torch.Tensor) -> torch.Tensor:
        """Set the scores of forbidden tokens to -inf in place; `scores` is (vocab,), or (rows, vocab) to give
        several rows this state's mask (the model's vocabulary may be wider than the tokenizer's)."""
        forbidden = torch.from_numpy(self.forbidden(scores.shape[-1])).to(scores.device, non_blocking=True)
        return scores.masked_fill_(forbidden, float("-inf"))

    def advance(self, token_id: int) -> None:
        """Take the token picked for this request. An end token finishes the answer."""
        token_id = int(token_id)
        if self._finished:
            raise ValueError("this answer is finished: it takes no more tokens")
        if token_id in self.end_token_ids:
            if not self._matcher.is_accepting():
                raise ValueError(f"end token {token_id} taken before the answer is complete")
            self._finished = True
        elif not self._matcher.consume_token(token_id):
            error = (self._matcher.get_error().strip().splitlines() or [""])[0]
            raise ValueError(f"token {token_id} is not allowed here by the grammar: {error}")


# ------------------------------------------------------------------------------------------ compiling
def validate(*, json_schema: Any = None, regex: str | None = None) -> None:
    """Check a JSON schema or a regex without a tokenizer; ValueError naming the problem."""
    kind, source, grammar = _grammar_text(json_schema, regex)
    _check(kind, grammar, None)


def compile_grammar(tokenizer: Any, *, json_schema: Any = None, regex: str | None = None) -> Grammar:
    """Compile a JSON schema (a dict, or its JSON text) or a regex (the whole answer must match it) for
    `tokenizer` (an Idefics2Tokenizer or a processor holding one). Cached; ValueError when invalid."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if not hasattr(tokenizer, "backend"):
        raise ValueError(f"a constraint needs the model's tokenizer, got {type(tokenizer).__name__}")
    kind, source, grammar = _grammar_text(json_schema, regex)
    entry = _tokenizer_entry(tokenizer)
    key = (kind, source)
    with entry.lock:
        compiled = entry.grammars.get(key)
        if compiled is not None:
            entry.grammars.move_to_end(key)
            return compiled
    _check(kind, grammar, entry.table.llg)
    matcher = llguidance.LLMatcher(entry.table.llg, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(_describe(kind, matcher.get_error()))
    compiled = Grammar(kind, source, matcher, entry.table)
    if not compiled.can_start():
        raise ValueError(f"invalid {_NAMES[kind]}: no text satisfies it")
    with entry.lock:
        entry.grammars[key] = compiled
        while len(entry.grammars) > CACHE_SIZE:
            entry.grammars.popitem(last=False)
    return compiled


def row_grammars(
    tokenizer: Any, rows: int, *, json_schema: Any = None, regex: Any = None
) -> list[Grammar | None]:
    """One compiled grammar (or None: unconstrained) per batch row. `json_schema` is one schema for every
    row or a list with one schema or None per row; `regex` likewise. A row takes at most one of the two."""
    schemas = _per_row(json_schema, rows, "json_schema", single=(dict, str))
    patterns = _per_row(regex, rows, "regex", single=(str,))
    grammars: list[Grammar | None] = []
    for row, (schema, pattern) in enumerate(zip(schemas, patterns)):
        if schema is not None and pattern is not None:
            raise ValueError(f"row {row} has both a json_schema and a regex: give one")
        if schema is None and pattern is None:
            grammars.append(None)
        elif tokenizer is None:
            raise ValueError("json_schema and regex need tokenizer= (the model's tokenizer or processor)")
        else:
            grammars.append(compile_grammar(tokenizer, json_schema=schema, regex=pattern))
    return grammars


def _per_row(value: Any, rows: int, name: str, single: tuple[type, ...]) -> list[Any]:
    if value is None or isinstance(value, single):
        return [value] * rows
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise ValueError(f"{name} has {len(value)} entries for {rows} rows: one per row (None: free)")
        return list(value)
    raise ValueError(f"{name} must be {' or '.join(t.__name__ for t in single)}, or a list with one per row")


_NAMES = {"json_schema": "JSON schema", "regex": "regex"}


def _grammar_text(json_schema: Any, regex: str | None) -> tuple[str, str, str]:
    """(kind, source, llguidance grammar) for exactly one of a JSON schema and a regex."""
    if (json_schema is None) == (regex is None):
        raise ValueError("give exactly one of json_schema and regex")
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise ValueError(f"regex must be a non-empty string, got {regex!r}")
        return "regex", regex, llguidance.LLMatcher.grammar_from_regex(regex)
    schema = json_schema
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise ValueError(f"json_schema is not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        source = json.dumps(schema, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"json_schema cannot be written as JSON: {error}") from None
    if "x-guidance" not in schema:
        schema = {"x-guidance": JSON_LAYOUT, **schema}
    # one optional space, then the JSON value
    lark = f'start: " "? value\nvalue: %json {json.dumps(schema, ensure_ascii=False)}\n'
    return "json_schema", source, llguidance.LLMatcher.grammar_from_lark(lark)


def _check(kind: str, grammar: str, table: llguidance.LLTokenizer | None) -> None:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, table)
    if is_error:
        raise ValueError(_describe(kind, messages[0] if messages else ""))


def _describe(kind: str, message: str) -> str:
    """llguidance's error as one line: its first line (without the grammar position) and the detail line
    of a regex error, not the listing of our wrapper grammar."""
    lines = message.strip().splitlines() or ["unknown error"]
    head = re.sub(r"^at \d+\(\d+\): ", "", lines[0].strip())
    head = head.removeprefix("failed to compile JSON schema: ").replace(" (in regex)", "")
    detail = next((line.strip()[7:] for line in lines[1:] if line.strip().startswith("error: ")), None)
    text = f"{head} {detail}" if detail else head
    return text if text.startswith("invalid regex") else f"invalid {_NAMES[kind]}: {text}"


class _TokenTable:
    """llguidance's view of a tokenizer (the bytes of every token), built once per tokenizer."""

    def __init__(self, tokenizer: Any):
        self.llg = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=_end_ids(tokenizer))
        self.words = (self.llg.vocab_size + 31) // 32
        self.end_ids = np.array(self.llg.eos_tokens, dtype=np.int64)


def _end_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.eos_token_id, getattr(tokenizer, "end_of_utterance_token_id", None)]
    return [i for i in ids if i is not None] or [0]


class _TokenizerEntry:
    def __init__(self, tokenizer: Any):
        self.table = _TokenTable(tokenizer)
        self.grammars: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self.lock = threading.Lock()


_ENTRIES: weakref.WeakKeyDictionary[Any, _TokenizerEntry] = weakref.WeakKeyDictionary()
_ENTRIES_LOCK = threading.Lock()


def _tokenizer_entry(tokenizer: Any) -> _TokenizerEntry:
    with _ENTRIES_LOCK:
        entry = _ENTRIES.get(tokenizer)
        if entry is None:
            entry = _ENTRIES[tokenizer] = _TokenizerEntry(tokenizer)
        return entry
