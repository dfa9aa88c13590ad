"""Chat templates rendered with jinja2 in a sandbox, the way Hugging Face checkpoints expect."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


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
    """Check a conversation and give string contents the list-of-parts form the template expects."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not isinstance(content, (list, tuple)) or not all(
            isinstance(p, dict) and "type" in p for p in content
        ):
            raise ValueError(
                f"message {i}: content must be a str or a list of {{'type': 'text'|'image', ...}} parts"
            )
        elif not content:
            raise ValueError(f"message {i} has empty content")
        normalized.append({**{k: v for k, v in message.items() if v is not None}, "content": list(content)})
    return normalized


def render(template: str, conversation: list[dict[str, Any]], **variables: Any) -> str:
    try:
        return compile_template(template).render(messages=conversation, **variables)
    except jinja2.exceptions.TemplateError as error:
        raise ValueError(f"the chat template failed: {error}") from error
