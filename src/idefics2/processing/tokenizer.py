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


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


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
        from ..hub import resolve_checkpoint

        folder = resolve_checkpoint(path_or_repo_id)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder} has no tokenizer.json")
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = {
            **_read_json(folder / "special_tokens_map.json"),
            **_read_json(folder / "tokenizer_config.json"),
        }
        return cls.from_config(backend, config, **overrides)

    @classmethod
    def from_config(cls, backend: Tokenizer, config: dict[str, Any], **overrides: Any) -> Idefics2Tokenizer:
        config = {**config, **overrides}
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
            model_max_length=config.get("model_max_length") or int(1e30),
            additional_special_tokens=[_token_content(t) for t in extra],
            config=config,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        keep = {
            k: v
            for k, v in self.config.items()
            if k in ("tokenizer_class", "legacy", "clean_up_tokenization_spaces")
        }
        config = {
            **keep,
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
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Token ids; a token outside the vocabulary maps to the unk token id (None without one)."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(i) for i in _as_id_list(ids) if i not in special]

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
        return self.backend.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
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
        encodings = self.backend.encode_batch(texts, add_special_tokens=False) if texts else []
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
        return self.backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, (torch.Tensor, np.ndarray)):
            sequences = sequences.tolist()
        rows = [_as_id_list(ids) for ids in sequences]
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
