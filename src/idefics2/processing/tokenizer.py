"""Idefics2 tokenizer: a checkpoint's tokenizer.json run by the `tokenizers` library, plus its settings."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer
from tokenizers.processors import TemplateProcessing

from .batch import BatchFeature, convert_tensors

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
# Added in this order when a vocabulary lacks them, so they get the ids the reference gives them.
IDEFICS2_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Tokenizer classes that pad on the left unless their config says otherwise.
LEFT_PADDING_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _token_content(value: Any) -> str | None:
    """A special token from a config: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def check_text(text: Any, what: str = "text") -> str:
    """`text` itself when it is a str of valid Unicode. Otherwise a ValueError naming the problem: not a str,
    or a lone surrogate (half of a UTF-16 pair, e.g. "\\ud800", which no tokenizer can encode) and where."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{what} holds a lone surrogate {text[error.start]!r} at position {error.start}: it is not valid "
            "Unicode text; remove it (text decoded with errors='surrogateescape', or from broken UTF-16, has "
            "them)"
        ) from None
    return text


def _is_token_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_id_list(ids: Any, what: str = "token ids") -> list[int]:
    """One sequence of token ids (an int, a list/tuple of ints, a 0-D or 1-D integer tensor or array) as a
    list of non-negative Python ints; TypeError/ValueError naming what is wrong."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        integer = (
            not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
            if isinstance(ids, torch.Tensor)
            else np.issubdtype(ids.dtype, np.integer) or ids.dtype == object
        )
        if not integer:
            raise TypeError(f"{what} must be integers, got a {type(ids).__name__} of dtype {ids.dtype}")
        if ids.ndim > 1:
            raise TypeError(
                f"{what} must be one sequence (1-D), got shape {tuple(ids.shape)}; batch_decode takes several"
            )
        ids = ids.tolist()
    if _is_token_id(ids):
        ids = [ids]
    if not isinstance(ids, (list, tuple)):
        raise TypeError(
            f"{what} must be an int, a list of ints or a 1-D integer tensor, got {type(ids).__name__}"
        )
    for position, token_id in enumerate(ids):
        if not _is_token_id(token_id):
            raise TypeError(f"{what} must be integers, got {token_id!r} at position {position}")
        if token_id < 0:
            raise ValueError(f"{what} must not be negative, got {token_id} at position {position}")
    return [int(token_id) for token_id in ids]


def _check_config(config: dict[str, Any]) -> None:
    """The tokenizer settings of tokenizer_config.json / special_tokens_map.json that this class reads."""

    def token(value: Any) -> bool:
        return (
            value is None
            or isinstance(value, str)
            or (isinstance(value, dict) and isinstance(value.get("content"), str))
        )

    for key in SPECIAL_TOKEN_KEYS:
        if not token(config.get(key)):
            raise ValueError(
                f"{key} must be a token (a str or an object with a str 'content'), got {config[key]!r}"
            )
    for key in ("add_bos_token", "add_eos_token"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise ValueError(f"{key} must be true, false or null, got {config[key]!r}")
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    tokens = list(extra.values()) if isinstance(extra, dict) else extra
    if not isinstance(tokens, list) or not all(token(t) and t is not None for t in tokens):
        raise ValueError(f"additional_special_tokens must be a list of tokens, got {extra!r}")
    declared = config.get("added_tokens_decoder") or {}
    if not isinstance(declared, dict) or not all(
        isinstance(key, str)
        and key.isdigit()
        and isinstance(spec, dict)
        and isinstance(spec.get("content"), str)
        for key, spec in declared.items()
    ):
        raise ValueError("added_tokens_decoder must map token ids to objects with a str 'content'")
    length = config.get("model_max_length")
    if length is not None and not (
        isinstance(length, (int, float)) and not isinstance(length, bool) and 0 < length < float("inf")
    ):
        raise ValueError(f"model_max_length must be a positive number, got {length!r}")


class Idefics2Tokenizer:
    """Text <-> token ids. `backend` is the underlying `tokenizers.Tokenizer`."""

    def __init__(
        self,
        backend: Tokenizer,
        *,
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int = int(1e30),
        additional_special_tokens: Sequence[str] = (),
        config: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (
            bos_token,
            eos_token,
            unk_token,
            pad_token,
        )
        for side, name in ((padding_side, "padding_side"), (truncation_side, "truncation_side")):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.model_max_length = int(model_max_length)
        self.config = dict(config or {})

        missing = [
            t for t in (*additional_special_tokens, *IDEFICS2_TOKENS) if backend.token_to_id(t) is None
        ]
        if missing:
            backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )
        self.additional_special_tokens = list(dict.fromkeys([*additional_special_tokens, *IDEFICS2_TOKENS]))
        for token in (bos_token, eos_token, unk_token, pad_token):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"special token {token!r} is not in the vocabulary")

        # Token ids put around every sequence when add_special_tokens=True.
        if add_bos_token is None and add_eos_token is None:
            self.prefix_ids, self.suffix_ids = self._special_ids_from_backend()
        else:
            self.prefix_ids = [self.bos_token_id] if add_bos_token and bos_token is not None else []
            self.suffix_ids = [self.eos_token_id] if add_eos_token and eos_token is not None else []
            self._set_post_processor()

    # ---- loading and saving ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **overrides: Any) -> Idefics2Tokenizer:
        """Load tokenizer.json with the settings of tokenizer_config.json and special_tokens_map.json."""
        from ..hub import CheckpointError, read_json, resolve_checkpoint

        folder = resolve_checkpoint(path_or_repo_id)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder} has no tokenizer.json")
        try:
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot read
            raise CheckpointError(
                f"{folder / 'tokenizer.json'} is not a valid tokenizer file: {error}"
            ) from None
        config = {
            **read_json(folder / "special_tokens_map.json", what="special tokens map"),
            **read_json(folder / "tokenizer_config.json", what="tokenizer config"),
        }
        try:
            return cls.from_config(backend, config, **overrides)
        except ValueError as error:
            raise CheckpointError(f"{folder}: the tokenizer settings are not valid: {error}") from None

    @classmethod
    def from_config(cls, backend: Tokenizer, config: dict[str, Any], **overrides: Any) -> Idefics2Tokenizer:
        config = {**config, **overrides}
        _check_config(config)
        # Tokens the config declares with their ids; those the tokenizer.json lacks are added in id order.
        declared = config.get("added_tokens_decoder") or {}
        for _, spec in sorted(declared.items(), key=lambda item: int(item[0])):
            if backend.token_to_id(spec["content"]) is None:
                options = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in spec}
                token = AddedToken(spec["content"], special=spec.get("special", True), **options)
                if spec.get("special", True):
                    backend.add_special_tokens([token])
                else:
                    backend.add_tokens([token])
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        padding_side = config.get("padding_side")
        if padding_side is None:
            padding_side = "left" if config.get("tokenizer_class") in LEFT_PADDING_CLASSES else "right"
        return cls(
            backend,
            **{key: _token_content(config.get(key)) for key in SPECIAL_TOKEN_KEYS},
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            padding_side=padding_side,
            truncation_side=config.get("truncation_side", "right"),
            model_max_length=int(config.get("model_max_length") or 1e30),
            additional_special_tokens=[_token_content(t) for t in extra],
            config=config,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {
            # transformers then runs tokenizer.json exactly as written, as this class does; left unnamed, it
            # picks the model type's class (a Llama tokenizer for idefics2), whose own pre-tokenizer and
            # normalizer replace the file's (byte-level spaces and newlines are lost)
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,  # decode gives the backend's text, untouched
            **{key: getattr(self, key) for key in SPECIAL_TOKEN_KEYS},
            "add_bos_token": self.prefix_ids == [self.bos_token_id],
            "add_eos_token": self.suffix_ids == [self.eos_token_id],
            "additional_special_tokens": self.additional_special_tokens,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "model_max_length": self.model_max_length,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def _special_ids_from_backend(self) -> tuple[list[int], list[int]]:
        """The ids tokenizer.json's own post-processor puts before and after a sequence."""
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    def _set_post_processor(self) -> None:
        """Make the backend's own `encode(add_special_tokens=True)` agree with the configured flags."""
        ids = {self.id_to_token(i): i for i in [*self.prefix_ids, *self.suffix_ids]}
        single = " ".join(
            [
                *(f"{self.id_to_token(i)}:0" for i in self.prefix_ids),
                "$A:0",
                *(f"{self.id_to_token(i)}:0" for i in self.suffix_ids),
            ]
        )
        pair = " ".join(
            [
                single,
                *(f"{self.id_to_token(i)}:1" for i in self.prefix_ids),
                "$B:1",
                *(f"{self.id_to_token(i)}:1" for i in self.suffix_ids),
            ]
        )
        self.backend.post_processor = TemplateProcessing(
            single=single, pair=pair, special_tokens=list(ids.items())
        )

    # ---- vocabulary ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        if not isinstance(token, str):
            raise TypeError(f"a token is a str, got {type(token).__name__}")
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token of an id; None for an id the vocabulary does not have."""
        (token_id,) = _as_id_list(token_id, "a token id")
        return self.backend.id_to_token(token_id) if token_id < len(self) else None

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Token ids; a token outside the vocabulary maps to the unk token id (None without one)."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
            raise TypeError(f"tokens must be a str or a list of str, got {type(tokens).__name__}")
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False):
        """Tokens of ids (None for an id the vocabulary does not have); one token for one int id."""
        if _is_token_id(ids):
            return self.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.id_to_token(i) for i in _as_id_list(ids) if i not in special]

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))
    fake_image_token = FAKE_IMAGE_TOKEN
    image_token = IMAGE_TOKEN
    end_of_utterance_token = END_OF_UTTERANCE_TOKEN
    fake_image_token_id = property(lambda self: self._id(FAKE_IMAGE_TOKEN))
    image_token_id = property(lambda self: self._id(IMAGE_TOKEN))
    end_of_utterance_token_id = property(lambda self: self._id(END_OF_UTTERANCE_TOKEN))

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        tokens: dict[str, Any] = {key: getattr(self, key) for key in SPECIAL_TOKEN_KEYS if getattr(self, key)}
        tokens["additional_special_tokens"] = list(self.additional_special_tokens)
        return tokens

    @property
    def all_special_tokens(self) -> list[str]:
        named = [getattr(self, key) for key in SPECIAL_TOKEN_KEYS]
        return list(dict.fromkeys(t for t in [*named, *self.additional_special_tokens] if t is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.all_special_tokens]

    # ---- encoding -----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(check_text(text), add_special_tokens=False).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(check_text(text), add_special_tokens=False).ids
        return [*self.prefix_ids, *ids, *self.suffix_ids] if add_special_tokens else ids

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        padding_side: str | None = None,
        return_attention_mask: bool = True,
    ) -> BatchFeature:
        """Tokenize one text or a batch: `input_ids` and `attention_mask` (a flat list for one str)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a str or a list of str")
        if not texts:
            raise ValueError("text must not be an empty list")
        for i, item in enumerate(texts):
            check_text(item, "text" if single else f"text {i}")
        if max_length is not None and (not _is_token_id(max_length) or max_length < 0):
            raise ValueError(f"max_length must be a non-negative int or None, got {max_length!r}")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        special = len(self.prefix_ids) + len(self.suffix_ids) if add_special_tokens else 0
        limit = self._truncation_limit(truncation, max_length, special)
        rows = []
        for encoding in encodings:
            ids = encoding.ids
            if limit is not None and len(ids) > limit:
                ids = ids[:limit] if self.truncation_side == "right" else ids[len(ids) - limit :]
            rows.append([*self.prefix_ids, *ids, *self.suffix_ids] if add_special_tokens else ids)
        masks = [[1] * len(row) for row in rows]
        rows, masks = self._pad(rows, masks, padding, max_length, padding_side or self.padding_side)
        if return_tensors is not None and len({len(row) for row in rows}) > 1:
            raise ValueError("sequences have different lengths: pass padding=True to return tensors")
        data: dict[str, Any] = {"input_ids": rows[0] if single and return_tensors is None else rows}
        if return_attention_mask:
            data["attention_mask"] = masks[0] if single and return_tensors is None else masks
        return convert_tensors(data, return_tensors)

    def _truncation_limit(
        self, truncation: bool | str | None, max_length: int | None, special: int
    ) -> int | None:
        if truncation in (None, False, "do_not_truncate"):
            return None
        if truncation not in (True, "longest_first", "only_first"):
            raise ValueError(
                f"truncation must be True, False, 'longest_first' or 'only_first', got {truncation!r}"
            )
        total = self.model_max_length if max_length is None else max_length
        if total < special:
            raise ValueError(f"max_length={total} leaves no room next to the {special} special token(s)")
        return total - special

    def _pad(
        self,
        rows: list[list[int]],
        masks: list[list[int]],
        padding: bool | str,
        max_length: int | None,
        side: str,
    ) -> tuple[list[list[int]], list[list[int]]]:
        if padding in (False, None, "do_not_pad"):
            return rows, masks
        if padding in (True, "longest"):
            target = max(len(row) for row in rows)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if self.pad_token_id is None and any(len(row) < target for row in rows):
            raise ValueError("this tokenizer has no pad token; set pad_token to pad")
        padded_rows, padded_masks = [], []
        for row, mask in zip(rows, masks):
            n = max(target - len(row), 0)
            if side == "right":
                padded_rows.append(row + [self.pad_token_id] * n)
                padded_masks.append(mask + [0] * n)
            else:
                padded_rows.append([self.pad_token_id] * n + row)
                padded_masks.append([0] * n + mask)
        return padded_rows, padded_masks

    # ---- decoding -----------------------------------------------------------------------------------
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids. Negative or non-integer ids are an error; ids at or above the
        vocabulary size decode to nothing, as in transformers (a model's embedding rows may outnumber the
        tokenizer's tokens: the built-in model has 512 rows for 382 tokens, and sampling can pick the extra
        ones)."""
        return self.backend.decode(self._known(_as_id_list(ids)), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """Texts of several sequences of ids (a list of sequences, or a 2-D tensor/array); see decode."""
        if isinstance(sequences, (torch.Tensor, np.ndarray)):
            if sequences.ndim == 0:
                raise TypeError("batch_decode takes several sequences of ids, got a single id")
            sequences = list(sequences)
        if not isinstance(sequences, (list, tuple)):
            raise TypeError(
                f"batch_decode takes a list of id sequences or a 2-D tensor, got {type(sequences).__name__}"
            )
        rows = [
            self._known(_as_id_list(ids, f"token ids of sequence {i}")) for i, ids in enumerate(sequences)
        ]
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def _known(self, ids: list[int]) -> list[int]:
        size = len(self)
        return ids if all(i < size for i in ids) else [i for i in ids if i < size]
