"""Chat templates rendered with jinja2 in a sandbox, the way Hugging Face checkpoints expect."""

from __future__ import annotations

import json
import reprlib
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import IMAGE_TOKEN, check_text

PART_TYPES = ("text", "image")


def short_repr(value: Any) -> str:
    """A bounded repr of any structure, however deep or long (for error messages)."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 3, 60, 60
    return shortener.repr(value)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and give string contents the list-of-parts form the template expects.

    A message is {"role": str, "content": str | [parts]} (other keys are kept); a part is {"type": "text",
    "text": str} or {"type": "image", ...}. Texts must be valid Unicode (no lone surrogates). Any role is
    accepted: the chat template decides what it makes of it.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            "a conversation must be a non-empty list of {'role': ..., 'content': ...} messages, got "
            + short_repr(messages)
        )
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"message {i} must be a dict with 'role' and 'content', got {short_repr(message)}"
            )
        if not isinstance(message["role"], str) or not message["role"]:
            raise ValueError(f"message {i}: role must be a non-empty str, got {short_repr(message['role'])}")
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not isinstance(content, (list, tuple)) or not all(
            isinstance(p, dict) and p.get("type") in PART_TYPES for p in content
        ):
            raise ValueError(
                f"message {i}: content must be a str or a list of content parts {{'type': 'text'|'image', "
                f"...}}, got {short_repr(content)}"
            )
        elif not content:
            raise ValueError(f"message {i} has empty content")
        for j, part in enumerate(content):
            if part["type"] == "text":
                check_text(part.get("text"), f"message {i}, part {j}: the text")
        normalized.append({**{k: v for k, v in message.items() if v is not None}, "content": list(content)})
    return normalized


def render(template: str, conversation: list[dict[str, Any]], **variables: Any) -> str:
    """The chat template (a checkpoint's own code) applied; any failure of it is a ValueError."""
    if not isinstance(template, str):
        raise ValueError(f"a chat template must be a str, got {type(template).__name__}")
    try:
        return compile_template(template).render(messages=conversation, **variables)
    except jinja2.exceptions.TemplateError as error:
        raise ValueError(f"the chat template failed: {error}") from error
    except Exception as error:  # the template's own code (its expressions and filters) failing
        raise ValueError(f"the chat template failed: {type(error).__name__}: {error}") from error


def chat_prompt(processor: Any, messages: Any, images: Any = None) -> tuple[str, list[Any]]:
    """The prompt text for a conversation (its chat template with the generation prompt; the raw text of a
    single message when the checkpoint has no template) and its images in order."""
    messages, images = conversation_and_images(messages, images)
    if processor.chat_template:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    elif len(messages) == 1:  # a base checkpoint without a chat template: the raw text
        prompt = "".join(p["text"] if p["type"] == "text" else "<image>" for p in messages[0]["content"])
    else:
        raise ValueError("this checkpoint has no chat template: pass a single prompt, not a conversation")
    return prompt, images


def user_turn(prompt: str, num_images: int) -> dict[str, Any]:
    """One user message from a plain prompt: the images first, then the prompt; or, when the prompt holds
    `<image>` markers, the images where the markers are (one marker per image)."""
    pieces = prompt.split(IMAGE_TOKEN)
    if len(pieces) == 1:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        return {"role": "user", "content": content}
    if len(pieces) - 1 != num_images:
        raise ValueError(
            f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} marker(s) but {num_images} image(s)"
        )
    return {"role": "user", "content": _split_at_markers(prompt)}


def _split_at_markers(text: str) -> list[dict[str, Any]]:
    """Text parts and an image part at each `<image>` marker."""
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def conversation_and_images(messages: Any, images: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Normalize to a list of messages with list content, and the flat list of images in order. `<image>`
    markers written in text become image parts (the processor would read them as images anyway)."""
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    if isinstance(messages, str):
        return [user_turn(messages, len(images))], images
    normalized, inline = [], []
    for i, message in enumerate(normalize_messages(messages)):
        parts = []
        for part in message["content"]:
            if part["type"] not in ("text", "image"):
                raise ValueError(
                    f"message {i}: content parts must be {{'type': 'text' | 'image'}}, got {part!r}"
                )
            if part["type"] == "text" and isinstance(part.get("text"), str) and IMAGE_TOKEN in part["text"]:
                parts += _split_at_markers(part["text"])
                continue
            if part["type"] == "image" and part.get("image") is not None:
                inline.append(part["image"])
                part = {"type": "image"}
            parts.append(part)
        normalized.append({**message, "content": parts})
    if inline and images:
        raise ValueError("give images either inside the messages or with images=, not both")
    images = inline or images
    n_parts = sum(p["type"] == "image" for m in normalized for p in m["content"])
    if n_parts != len(images):
        raise ValueError(
            f"the messages have {n_parts} image part(s) (counting {IMAGE_TOKEN} markers in their text) but "
            f"{len(images)} image(s) were given"
        )
    return normalized, images
