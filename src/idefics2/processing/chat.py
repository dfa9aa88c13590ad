"""Chat templates rendered with jinja2 in a sandbox, the way Hugging Face checkpoints expect."""

from __future__ import annotations

import json
import reprlib
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import check_text

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
