"""Idefics2 processor: prompt text with `<image>` placeholders plus images -> model inputs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..hub import CheckpointError, read_json
from .batch import BatchFeature, convert_tensors
from .chat import normalize_messages, render
from .image_processor import DEFAULTS as IMAGE_OPTIONS
from .image_processor import RUNTIME_OPTIONS, Idefics2ImageProcessor, nest_images, read_image_processor_config
from .images import is_image_like, load_rgb
from .tokenizer import FAKE_IMAGE_TOKEN, IMAGE_TOKEN, Idefics2Tokenizer, check_text

TOKENIZER_OPTIONS = (
    "padding_side",
    "truncation_side",
    "model_max_length",
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "add_bos_token",
    "add_eos_token",
)
# A closing fake token directly followed by a word gets a space, so the word is tokenized as a word start.
_FAKE_THEN_WORD = re.compile(re.escape(FAKE_IMAGE_TOKEN) + r"(?=[^\s<])")


def _template_text(value: Any, path: Path) -> str | None:
    """A chat template from a config: a string, or a list of {"name", "template"} entries."""
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{path}: chat_template must be a str, got {type(value).__name__}")
    return value


def read_chat_template(folder: Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json, processor_config.json or
    tokenizer_config.json, in that order."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise CheckpointError(f"{path} is not UTF-8 text (byte {error.start})") from None
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _template_text(read_json(folder / name).get("chat_template"), folder / name)
        if template:
            return template
    return None


class Idefics2Processor:
    """Tokenizer + image processor for Idefics2.

    Every `<image>` in the text becomes `<fake_token_around_image>` + `image_seq_len` x `<image>` +
    `<fake_token_around_image>` (five such blocks per image when images are split), and the images of each
    sample become `pixel_values` (batch, images, 3, H, W) with `pixel_attention_mask` (batch, images, H, W).
    """

    def __init__(
        self,
        image_processor: Idefics2ImageProcessor,
        tokenizer: Idefics2Tokenizer,
        image_seq_len: int = 64,
        chat_template: str | None = None,
    ) -> None:
        if not isinstance(image_seq_len, int) or image_seq_len < 1:
            raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_seq_len, self.chat_template = image_seq_len, chat_template
        self.image_token, self.fake_image_token = IMAGE_TOKEN, FAKE_IMAGE_TOKEN
        self.image_token_id = tokenizer.image_token_id

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **overrides: Any) -> Idefics2Processor:
        """Load from a checkpoint folder or hub repo id. Keyword overrides go to the part they belong to:
        `image_seq_len`, `chat_template`; image options (`do_image_splitting`, `size`, `backend`, `device`,
        `max_pixels`, ...); tokenizer options (`padding_side`, ...)."""
        from ..hub import resolve_checkpoint

        folder = resolve_checkpoint(path_or_repo_id)
        image_keys = set(IMAGE_OPTIONS) | set(RUNTIME_OPTIONS)
        unknown = set(overrides) - image_keys - set(TOKENIZER_OPTIONS) - {"image_seq_len", "chat_template"}
        if unknown:
            raise ValueError(f"unknown processor option(s): {sorted(unknown)}")
        image_overrides = {k: v for k, v in overrides.items() if k in image_keys}
        tokenizer_overrides = {k: v for k, v in overrides.items() if k in TOKENIZER_OPTIONS}
        config = read_json(folder / "processor_config.json", what="processor config")
        image_processor = Idefics2ImageProcessor.from_dict(
            read_image_processor_config(folder), **image_overrides
        )
        tokenizer = Idefics2Tokenizer.from_pretrained(folder, **tokenizer_overrides)
        return cls(
            image_processor,
            tokenizer,
            image_seq_len=overrides.get("image_seq_len", config.get("image_seq_len", 64)),
            chat_template=overrides.get("chat_template", read_chat_template(folder)),
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the transformers-5 layout: processor_config.json (with the image options), tokenizer files
        and chat_template.jinja."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "image_processor": self.image_processor.to_dict(),
            "image_seq_len": self.image_seq_len,
            "processor_class": "Idefics2Processor",
        }
        (path / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.tokenizer.save_pretrained(path)
        if self.chat_template is not None:
            (path / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    # ---- text ----------------------------------------------------------------------------------------
    def expand_image_tokens(self, text: str, do_image_splitting: bool | None = None) -> str:
        """The prompt the model sees: each `<image>` expanded into its block of image tokens."""
        if do_image_splitting is None:
            do_image_splitting = self.image_processor.do_image_splitting
        block = FAKE_IMAGE_TOKEN + IMAGE_TOKEN * self.image_seq_len + FAKE_IMAGE_TOKEN
        if do_image_splitting:
            block *= 5
        text = text.replace(IMAGE_TOKEN, block).replace(FAKE_IMAGE_TOKEN * 2, FAKE_IMAGE_TOKEN)
        return _FAKE_THEN_WORD.sub(FAKE_IMAGE_TOKEN + " ", text)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        *,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        padding_side: str | None = None,
        **image_options: Any,
    ) -> BatchFeature:
        """Model inputs for a batch of prompts and their images.

        `images`: None, one image, a flat list (split between the samples by their `<image>` counts), or one
        list per sample. An image is a PIL image, numpy array (HWC/CHW), torch tensor, file path or bytes.
        Extra keyword arguments are image options for this call (`do_image_splitting`, `size`, `backend`...).
        """
        if text is None and images is None:
            raise ValueError("give text, images or both")
        unknown = set(image_options) - set(IMAGE_OPTIONS) - {"backend", "device"}
        if unknown:
            raise ValueError(f"unknown processor argument(s): {sorted(unknown)}")
        splitting = image_options.get("do_image_splitting", self.image_processor.do_image_splitting)
        outputs = BatchFeature()
        texts, counts = None, None
        if text is not None:
            texts = (
                [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
            )
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a str or a non-empty list of str")
            for i, item in enumerate(texts):
                check_text(item, "text" if isinstance(text, str) else f"text {i}")
            counts = [t.count(IMAGE_TOKEN) for t in texts]
        # images are matched to the prompts first: a wrong count is the first thing to report
        samples = None if images is None else self._images_per_sample(images, counts)
        if texts is not None:
            prompts = [self.expand_image_tokens(t, splitting) for t in texts]
            encoded = self.tokenizer(
                prompts,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                add_special_tokens=add_special_tokens,
                padding_side=padding_side,
            )
            self._check_truncation(prompts, encoded["input_ids"])
            outputs.update(convert_tensors(encoded, return_tensors))
        if samples is not None:
            samples = [
                [self._load(image, s, k) for k, image in enumerate(sample)]
                for s, sample in enumerate(samples)
            ]
            outputs.update(self.image_processor(samples, return_tensors=return_tensors, **image_options))
        return outputs

    def _images_per_sample(self, images: Any, counts: list[int] | None) -> list[list[Any]]:
        flat = is_image_like(images) or (
            isinstance(images, (list, tuple)) and any(is_image_like(image) for image in images)
        )
        if counts is None:
            return nest_images(images)
        if flat:
            flat_images = [images] if is_image_like(images) else list(images)
            if len(flat_images) != sum(counts):
                raise ValueError(
                    f"the prompts hold {sum(counts)} {IMAGE_TOKEN} token(s) in all ({counts} per sample) but "
                    f"{len(flat_images)} image(s) were given"
                )
            starts = [sum(counts[:i]) for i in range(len(counts))]
            return nest_images([flat_images[s : s + n] for s, n in zip(starts, counts)])
        samples = nest_images(images)
        if len(samples) != len(counts):
            raise ValueError(f"got {len(counts)} prompt(s) but images for {len(samples)} sample(s)")
        for i, (sample, count) in enumerate(zip(samples, counts)):
            if len(sample) != count:
                raise ValueError(
                    f"sample {i}: its text has {count} {IMAGE_TOKEN} token(s) but {len(sample)} image(s) "
                    "were given"
                )
        return samples

    def _load(self, image: Any, sample: int, index: int) -> Any:
        try:
            return load_rgb(image, self.image_processor.max_pixels)
        except ValueError as error:
            raise ValueError(f"sample {sample}, image {index}: {error}") from error

    def _check_truncation(self, prompts: list[str], input_ids: list[list[int]]) -> None:
        for i, (prompt, ids) in enumerate(zip(prompts, input_ids)):
            if prompt.count(IMAGE_TOKEN) != ids.count(self.image_token_id):
                raise ValueError(
                    f"sample {i}: truncation cut through the image tokens ({prompt.count(IMAGE_TOKEN)} "
                    f"expected, {ids.count(self.image_token_id)} kept); raise max_length or do not truncate"
                )

    # ---- chat ----------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        return_dict: bool = False,
        return_tensors: str | None = None,
        **variables: Any,
    ) -> Any:
        """Render a conversation (or a list of them) with the chat template.

        Message contents are a str or a list of {"type": "text", "text": ...} / {"type": "image"} parts.
        `tokenize=True` runs the processor on the result (images taken from the parts' "image", "path" or
        "url" keys when present) and returns input_ids, or everything with `return_dict=True`.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this processor has no chat template; pass chat_template=...")
        batched = (
            isinstance(conversation, (list, tuple))
            and bool(conversation)
            and isinstance(conversation[0], (list, tuple))
        )
        conversations = [normalize_messages(c) for c in (conversation if batched else [conversation])]
        context = {**self.tokenizer.special_tokens_map, **variables}
        prompts = [
            render(template, c, add_generation_prompt=add_generation_prompt, **context) for c in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [
            part.get("image", part.get("path", part.get("url")))
            for c in conversations
            for message in c
            for part in message["content"]
            if part["type"] == "image"
        ]
        has_images = bool(images) and all(image is not None for image in images)
        bos = self.tokenizer.bos_token
        outputs = self(
            text=prompts if batched else prompts[0],
            images=images if has_images else None,
            add_special_tokens=not (bos and prompts[0].startswith(bos)),
            padding=batched,
            return_tensors=return_tensors,
        )
        return outputs if return_dict else outputs["input_ids"]

    # ---- decoding ------------------------------------------------------------------------------------
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)
