"""KV-cached text generation for Idefics2: greedy or sampled decoding with the usual controls.

`generate` runs on the decode core that the serving engine runs on too (idefics2.decoding): the vision tower
and connector run once, each row's prompt is prefilled into its own cache row (left padding dropped:
positions follow the attention mask), then each decode step feeds one token per row, and the one logits
chain picks every row's next token. Rows that finish (end-of-sequence token or stop string) are padded with
`pad_token_id` from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import torch

from idefics2.constrained import row_grammars
from idefics2.decoding.runner import borrow_runner
from idefics2.decoding.sampler import RowSampler, greedy_exclusions, sample_rows
from idefics2.streaming import TextDeltaDecoder, find_stop

# Defaults used when neither the call nor the checkpoint's generation_config.json sets a value.
DEFAULTS = {"max_new_tokens": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "seed", "generator")
SUPPORTED_ARGUMENTS = (
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "bad_words_ids", "eos_token_id", "pad_token_id", "stop_strings", "tokenizer",
    "seed", "generator", "streamer", "json_schema", "regex",
)  # fmt: skip


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    *,
    streamer: Callable[[torch.Tensor], Any] | Any | None = None,
    **controls: Any,
) -> torch.LongTensor:
    """Generate continuations of `input_ids` (B, P); returns (B, P + new) prompt + new tokens.

    Controls (keyword only; unset ones come from the checkpoint's generation_config.json, then DEFAULTS):
    max_new_tokens (or max_length = prompt + new), min_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, bad_words_ids (list of token-id lists; a multi-token entry forbids its last token
    after the others), eos_token_id (int or list), pad_token_id, stop_strings (str or list; needs
    `tokenizer`; a row stops once its generated text contains one), tokenizer (a tokenizer or processor:
    also adds `<end_of_utterance>` to the default end ids when the processor's chat template uses it),
    seed or generator (sampling), streamer (a callable called with the (B,) tokens of every step, or an
    object with transformers' put/end protocol, e.g. transformers.TextStreamer(tokenizer, skip_prompt=True)),
    json_schema or regex (structured output, needs `tokenizer`: each row's answer follows the JSON schema, a
    dict or its JSON text, or matches the regex; a list gives one per row, None for a free row; the end
    tokens are allowed only once the answer is complete; see idefics2.constrained).
    """
    # a transformers-style streamer (put/end) first gets the prompt, as transformers does
    object_streamer = hasattr(streamer, "put") and hasattr(streamer, "end")
    if object_streamer:
        streamer.put(input_ids.cpu())
    device = model.lm_head.weight.device
    # the whole loop under one no_grad (as transformers' generate runs, its streamer included), not entered
    # and left at every step as a generator's decorator does
    with torch.no_grad():
        steps = _steps(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, **controls)
        while True:
            try:
                tokens = next(steps)
            except StopIteration as done:
                if object_streamer:
                    streamer.end()
                return done.value
            if streamer is None:
                continue
            column = torch.tensor(tokens, dtype=torch.long, device=device)
            if object_streamer:
                streamer.put(column.cpu())
            else:
                streamer(column)


@torch.no_grad()
def stream_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    **controls: Any,
) -> Iterator[torch.Tensor]:
    """Like `generate`, as an iterator: yields the (B,) tokens picked at each step (pad for finished rows)
    and returns (as StopIteration.value) the (B, P + new) sequences."""
    device = model.lm_head.weight.device
    steps = _steps(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, **controls)
    while True:
        try:
            tokens = next(steps)
        except StopIteration as done:
            return done.value
        yield torch.tensor(tokens, dtype=torch.long, device=device)


def _steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    pixel_attention_mask: torch.Tensor | None,
    **controls: Any,
) -> Generator[list[int], None, torch.Tensor]:
    """The generation itself (run under no_grad by its callers): yields each step's B tokens as a list and
    returns the (B, P + new) sequences."""
    device = model.lm_head.weight.device
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask, device)
    batch, prompt_len = input_ids.shape
    opts = resolve_options(model, prompt_len, controls, rows=batch)
    max_new, eos_ids, pad_id = opts["max_new_tokens"], opts["eos_token_id"], opts["pad_token_id"]
    # each row's real tokens, in order: the row sits at cache slots 0, 1, ... of its own cache row
    real = attention_mask.bool()
    lengths = real.sum(dim=1).tolist()
    check_context_length(model.config, max(lengths), max_new)

    images = None if pixel_values is None else model.get_image_features(pixel_values, pixel_attention_mask)
    embeds = model.embed_inputs(input_ids, images)  # (B, P, hidden)
    prompts = [embeds[b, real[b]][None] for b in range(batch)]  # (1, P_b, hidden) each
    vocab = model.lm_head.weight.shape[0]
    grammars = opts["grammars"] or [None] * batch
    rows = [
        RowSampler(
            opts, input_ids[b, real[b]].tolist(), vocab, device, None if g is None else g.new_state(eos_ids)
        )
        for b, g in enumerate(grammars)
    ]
    columns: list[list[int]] = []  # the B new tokens of each step
    finished = [False] * batch
    stop_strings = opts["stop_strings"]
    if stop_strings:  # each row's text so far, decoded incrementally
        texts = [TextDeltaDecoder(opts["tokenizer"], skip_special_tokens=False) for _ in range(batch)]
        generated = ["" for _ in range(batch)]
    with borrow_runner(model, batch, max(lengths) + max_new) as runner:
        logits = runner.prefill_whole(0, prompts)  # (B, V) float32
        greedy: list[int] | None = None  # the step's tokens, where the decode step gave them for its logits
        for step in range(max_new):
            if greedy is None:
                picked, errors = sample_rows(logits, rows)
                if errors:
                    row, error = next(iter(errors.items()))
                    raise ValueError(f"row {row}: {error}")
            else:
                picked = greedy
            tokens = [pad_id if done else token for token, done in zip(picked, finished)]
            for row, token in enumerate(tokens):
                if finished[row]:
                    continue
                rows[row].accept(token)
                ending = token in eos_ids
                if stop_strings:
                    generated[row] += texts[row].push(token)
                    ending = (
                        ending
                        or find_stop(generated[row][-_window(stop_strings) :], stop_strings) is not None
                    )
                if ending:
                    finished[row] = True
                    rows[row].grammar = None  # a row that ended takes no more tokens
            columns.append(tokens)
            yield tokens
            if step + 1 == max_new or all(finished):
                break
            positions = [length + step for length in lengths]
            excluded = greedy_exclusions(rows)  # (a finished row's token is padding: any will do)
            greedy = None if excluded is None else runner.decode_greedy(tokens, positions, excluded=excluded)
            if greedy is None:
                logits = runner.decode(tokens, positions)
    # one column per step run: as many as the longest row's new tokens (the loop ends when every row has)
    return torch.cat([input_ids, torch.tensor(columns, dtype=torch.long, device=device).T], dim=1)


class ContextLengthError(ValueError):
    """The prompt and the new tokens do not fit in the model's context; the numbers are attributes."""

    def __init__(self, message: str, *, prompt_length: int, max_new_tokens: int, limit: int):
        super().__init__(message)
        self.prompt_length, self.max_new_tokens, self.limit = prompt_length, max_new_tokens, limit


def context_length(model_config: Any) -> int:
    """How many positions (prompt + new tokens) the model can attend over: the text decoder's
    `max_position_embeddings`, the positions its rotary embedding was trained for. `model_config` is an
    Idefics2Config or its text config."""
    return int(getattr(model_config, "text_config", model_config).max_position_embeddings)


def check_context_length(model_config: Any, prompt_length: int, max_new_tokens: int) -> None:
    """Raise ContextLengthError (a ValueError) naming the numbers when a `prompt_length`-token prompt plus
    `max_new_tokens` new tokens do not fit in the context (`context_length(model_config)`).

    Beyond `max_position_embeddings` the rotary positions were never seen in training and the model answers
    garbage. A sliding window (`text_config.sliding_window`, Mistral's 4096) does not shorten the context:
    attention keeps the keys of the last `sliding_window` positions, as in training, and the cache holds the
    whole sequence, so prompts longer than the window are valid.
    """
    limit = context_length(model_config)
    total = prompt_length + max_new_tokens
    if total <= limit:
        return
    advice = "shorten the prompt"
    if prompt_length < limit:
        advice += f" or lower max_new_tokens to at most {limit - prompt_length}"
    message = (
        f"the prompt has {prompt_length} tokens and max_new_tokens is {max_new_tokens}: {total} positions, "
        f"more than the model's context of {limit} tokens (text_config.max_position_embeddings, the "
        f"positions its rotary embedding covers); {advice}"
    )
    raise ContextLengthError(message, prompt_length=prompt_length, max_new_tokens=max_new_tokens, limit=limit)


def _window(stop_strings: list[str]) -> int:
    """How much trailing text can hold a stop string completed by the newest token (a generous bound)."""
    return 2 * max(len(s) for s in stop_strings) + 64


def _check_prompt(input_ids, attention_mask, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        shape = tuple(getattr(input_ids, "shape", ()))
        got = f"{type(input_ids).__name__} {getattr(input_ids, 'dtype', '')} {shape}"
        raise ValueError(f"input_ids must be a (batch, length) LongTensor, got {got}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(getattr(attention_mask, 'shape', ()))}"
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "the last prompt position is padding in some row: generation needs left padding "
            "(processor.tokenizer.padding_side = 'left')"
        )
    return input_ids.to(device), attention_mask.to(device=device, dtype=torch.long)


def resolve_options(
    model: torch.nn.Module, prompt_len: int, controls: dict[str, Any], rows: int = 1
) -> dict[str, Any]:
    """Validate the user's controls and fill the rest from generation_config.json and DEFAULTS (`rows`: the
    batch size, for per-row controls)."""
    unknown = sorted(set(controls) - set(SUPPORTED_ARGUMENTS))
    if unknown:
        raise ValueError(
            f"unsupported generation argument(s): {', '.join(unknown)}; "
            f"supported: {', '.join(SUPPORTED_ARGUMENTS)}"
        )
    given = {k: v for k, v in controls.items() if v is not None}
    config = dict(getattr(model, "generation_config", None) or {})

    def pick(name):
        if name in given:
            return given[name]
        return config[name] if config.get(name) is not None else DEFAULTS.get(name)

    opts: dict[str, Any] = {"do_sample": bool(pick("do_sample"))}
    if not opts["do_sample"]:
        wrong = [k for k in _SAMPLING_ONLY if k in given]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} only apply to sampling: pass do_sample=True or drop them")
    if "seed" in given and "generator" in given:
        raise ValueError("pass either seed or generator, not both")

    opts["max_new_tokens"] = _max_new_tokens(given, config, prompt_len)
    opts["min_new_tokens"] = _int(pick("min_new_tokens") or 0, "min_new_tokens", minimum=0)
    if opts["min_new_tokens"] > opts["max_new_tokens"]:
        raise ValueError(
            f"min_new_tokens ({opts['min_new_tokens']}) is larger than "
            f"max_new_tokens ({opts['max_new_tokens']})"
        )
    opts["temperature"] = _positive_float(pick("temperature"), "temperature")
    top_k = pick("top_k")
    opts["top_k"] = 0 if top_k in (None, 0) else _int(top_k, "top_k", minimum=1)
    top_p = _positive_float(pick("top_p"), "top_p")
    if top_p > 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    opts["top_p"] = top_p
    opts["repetition_penalty"] = _positive_float(pick("repetition_penalty") or 1.0, "repetition_penalty")

    tokenizer = given.get("tokenizer")
    opts["tokenizer"] = getattr(tokenizer, "tokenizer", tokenizer)  # a processor carries its tokenizer
    opts["eos_token_id"] = _token_list(given.get("eos_token_id"), "eos_token_id")
    if "eos_token_id" not in given:
        opts["eos_token_id"] = default_eos_token_ids(model, tokenizer)
    vocab = model.lm_head.weight.shape[0]
    opts["bad_words_ids"] = _bad_words(pick("bad_words_ids"), vocab)
    opts["pad_token_id"] = _pad_token_id(pick("pad_token_id"), opts["tokenizer"], opts["eos_token_id"])

    stop = pick("stop_strings")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None:
        if not isinstance(stop, (list, tuple)) or not stop or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop!r}")
        if opts["tokenizer"] is None:
            raise ValueError(
                "stop_strings need tokenizer= (a tokenizer or processor) to read the generated text"
            )
    opts["stop_strings"] = list(stop) if stop else None

    # compiled before anything runs, so a bad schema or regex fails first
    opts["grammars"] = None
    if given.get("json_schema") is not None or given.get("regex") is not None:
        opts["grammars"] = row_grammars(
            tokenizer, rows, json_schema=given.get("json_schema"), regex=given.get("regex")
        )
        if any(opts["grammars"]):
            if opts["min_new_tokens"]:
                raise ValueError("min_new_tokens cannot be combined with json_schema or regex: the grammar "
                                 "decides where the answer ends")  # fmt: skip
            if not opts["eos_token_id"]:
                raise ValueError("json_schema and regex need an end-of-sequence token (eos_token_id)")

    generator = given.get("generator")
    if "seed" in given:
        generator = torch.Generator(device=model.lm_head.weight.device)
        generator.manual_seed(_int(given["seed"], "seed", minimum=0))
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    opts["generator"] = generator
    return opts


def default_eos_token_ids(model: torch.nn.Module, tokenizer: Any = None) -> list[int]:
    """End ids from generation_config.json (else the text config's, else the tokenizer's eos), plus
    `<end_of_utterance>` when the processor's chat template ends turns with it."""
    config = getattr(model, "generation_config", None) or {}
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    ids = _token_list(config.get("eos_token_id"), "generation_config eos_token_id")
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    if not ids and getattr(text_config, "eos_token_id", None) is not None:
        ids = _token_list(text_config.eos_token_id, "text_config eos_token_id")
    if not ids and getattr(inner, "eos_token_id", None) is not None:
        ids = [inner.eos_token_id]
    template = getattr(tokenizer, "chat_template", None) or getattr(inner, "chat_template", None)
    if isinstance(template, str) and "<end_of_utterance>" in template:
        end_id = getattr(inner, "end_of_utterance_token_id", None)
        if end_id is None:
            end_id = inner.convert_tokens_to_ids("<end_of_utterance>")
        if end_id is not None and end_id not in ids:
            ids.append(int(end_id))
    return ids


def _max_new_tokens(given: dict, config: dict, prompt_len: int) -> int:
    if "max_new_tokens" in given and "max_length" in given:
        raise ValueError("pass either max_new_tokens or max_length (prompt + new tokens), not both")
    if "max_length" in given:
        n = _int(given["max_length"], "max_length", minimum=1) - prompt_len
        if n < 1:
            raise ValueError(
                f"max_length ({given['max_length']}) leaves no room after the {prompt_len}-token prompt"
            )
        return n
    if "max_new_tokens" in given:
        return _int(given["max_new_tokens"], "max_new_tokens", minimum=1)
    if config.get("max_new_tokens") is not None:
        return _int(config["max_new_tokens"], "generation_config max_new_tokens", minimum=1)
    if config.get("max_length") is not None:
        room = _int(config["max_length"], "generation_config max_length", minimum=1) - prompt_len
        if room >= 1:
            return room
    return DEFAULTS["max_new_tokens"]


_INT64_MAX = 2**63 - 1  # token ids and counts become int64 tensors


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _INT64_MAX:
        raise ValueError(f"{name} must be an integer >= {minimum} (and below 2**63), got {value!r}")
    return value


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _token_list(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else value
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if not isinstance(values, Iterable) or not all(
        isinstance(v, int) and 0 <= v <= _INT64_MAX for v in values
    ):
        raise ValueError(f"{name} must be a token id or a list of them, got {value!r}")
    return [int(v) for v in values]


def _bad_words(value: Any, vocab: int) -> list[list[int]] | None:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    ok = ok and all(isinstance(seq, (list, tuple)) and len(seq) > 0 for seq in value)
    ok = ok and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for seq in value for t in seq
    )
    if not ok:
        raise ValueError(
            "bad_words_ids must be a non-empty list of non-empty lists of token ids "
            f"in [0, {vocab}), got {value!r}"
        )
    return [list(seq) for seq in value]


def _pad_token_id(value: Any, tokenizer: Any, eos_ids: list[int]) -> int:
    if value is None and tokenizer is not None:
        value = getattr(tokenizer, "pad_token_id", None)
    if value is None:
        # only finished rows are padded; without end ids nothing finishes before max_new_tokens
        value = eos_ids[0] if eos_ids else 0
    return _int(value, "pad_token_id", minimum=0)
