"""OpenAI's chat completions API: `POST /v1/chat/completions` (plain or streamed) and `GET /v1/models`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from idefics2.server.errors import APIError
from idefics2.server.media import load_images
from idefics2.server.running import EndTokens, read_json, sse, submit, until_done
from idefics2.serving import RequestFailedError

router = APIRouter()

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
# parameters of OpenAI's API this server does not implement: any value other than these defaults is refused
UNSUPPORTED = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}
# every request field this route reads (UNSUPPORTED ones included); others are accepted, logged and counted
KNOWN_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
        "stream_options", "stop", "seed", "response_format", "logprobs",
        "user",  # an end-user id for OpenAI's abuse monitoring: no effect here
        # vLLM's extensions
        "top_k", "min_tokens", "repetition_penalty", "ignore_eos", "stop_token_ids", "skip_special_tokens",
        "include_stop_str_in_output",
        *UNSUPPORTED,
    }
)  # fmt: skip
STREAM_OPTIONS = frozenset({"include_usage", "continuous_usage_stats"})


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    image_urls: list[tuple[str, str]]  # (url, the request field that named it)
    controls: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False  # a last chunk with the usage
    continuous_usage: bool = False  # the usage so far in every chunk
    logprobs: bool = False
    end_tokens: EndTokens = field(default_factory=EndTokens)
    unknown_fields: list[str] = field(default_factory=list)


def parse_chat_request(body: dict[str, Any], max_images: int) -> ChatRequest:
    """OpenAI's request body -> our conversation, image URLs and generation controls; APIError(400)
    naming the field for anything wrong or unsupported."""
    if "model" in body and not isinstance(body["model"], str):
        raise APIError(400, "model must be a string", param="model")
    for name, defaults in UNSUPPORTED.items():
        if name in body and body[name] not in defaults:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported")
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, f"n must be 1 (one choice per request), got {n!r}", param="n")
    messages, image_urls = _conversation(body.get("messages"))
    if len(image_urls) > max_images:
        raise APIError(
            400, f"the request has {len(image_urls)} images, more than this server's limit of {max_images}",
            param="messages", code="too_many_images",
        )  # fmt: skip
    request = ChatRequest(messages, image_urls, {**_controls(body), **_response_format(body)})
    request.unknown_fields = sorted(set(body) - KNOWN_FIELDS)
    request.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        if not request.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")
        request.include_usage = _flag(options, "include_usage", "stream_options.include_usage")
        request.continuous_usage = _flag(
            options, "continuous_usage_stats", "stream_options.continuous_usage_stats"
        )
        request.unknown_fields += [f"stream_options.{name}" for name in sorted(set(options) - STREAM_OPTIONS)]
    request.logprobs = _flag(body, "logprobs")
    for name in ("skip_special_tokens", "include_stop_str_in_output"):
        if body.get(name) is not None:
            request.controls[name] = _flag(body, name)
    request.end_tokens = EndTokens(_flag(body, "ignore_eos"), _stop_token_ids(body.get("stop_token_ids")))
    return request


def _stop_token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if (
        not isinstance(value, list)
        or len(value) > MAX_STOP_TOKEN_IDS
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    ):
        raise APIError(
            400,
            f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids (integers >= 0)",
            param="stop_token_ids",
        )
    return value


def _flag(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{param or name} must be true or false, got {value!r}", param=param or name)
    return value


def _conversation(messages: Any) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    conversation, urls = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=where)
        content = message.get("content")
        if isinstance(content, str):
            conversation.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list) or not content:
            raise APIError(400, f"{where}.content must be a string or a non-empty list of parts", param=where)
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and role != "assistant":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str):
                    raise APIError(400, f"{at}.image_url must be {{'url': ...}}", param=at)
                urls.append((url, f"{at}.image_url"))
                parts.append({"type": "image"})
            else:
                expected = "{'type': 'text', 'text': ...} or {'type': 'image_url', 'image_url': {'url': ...}}"
                raise APIError(400, f"{at} must be {expected} (images in user and system turns)", param=at)
        conversation.append({"role": role, "content": parts})
    return conversation, urls


def _controls(body: dict[str, Any]) -> dict[str, Any]:
    controls: dict[str, Any] = {}
    lengths = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    if len(set(map(repr, lengths.values()))) > 1:
        raise APIError(400, "max_tokens and max_completion_tokens disagree", param="max_completion_tokens")
    for name, value in lengths.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise APIError(400, f"{name} must be an integer >= 1, got {value!r}", param=name)
        controls["max_new_tokens"] = value
    min_tokens = body.get("min_tokens")
    if min_tokens is not None:
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise APIError(400, f"min_tokens must be an integer >= 0, got {min_tokens!r}", param="min_tokens")
        if min_tokens > controls.get("max_new_tokens", min_tokens):
            limit = controls["max_new_tokens"]
            raise APIError(400, f"min_tokens ({min_tokens}) exceeds max_tokens ({limit})", param="min_tokens")
        controls["min_new_tokens"] = min_tokens
    temperature, top_p, top_k = body.get("temperature"), body.get("top_p"), body.get("top_k")
    for name, value, high in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= high):  # fmt: skip
            raise APIError(400, f"{name} must be a number in [0, {high:g}], got {value!r}", param=name)
    if top_p == 0:
        raise APIError(400, "top_p must be above 0", param="top_p")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1):
        raise APIError(400, f"top_k must be an integer >= 1, or 0 or -1 (all tokens), got {top_k!r}",
                       param="top_k")  # fmt: skip
    top_k = None if top_k is None else max(top_k, 0)  # 0: every token
    if temperature == 0:
        controls["do_sample"] = False  # greedy; top_p, top_k and seed do not apply
    elif temperature is not None or top_p is not None or top_k:
        controls["do_sample"] = True
        if temperature is not None:
            controls["temperature"] = float(temperature)
        if top_p is not None:
            controls["top_p"] = float(top_p)
    if controls.get("do_sample") and top_k is not None:
        controls["top_k"] = top_k
    penalty = body.get("repetition_penalty")
    if penalty is not None:
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 < penalty <= 2:
            raise APIError(400, f"repetition_penalty must be a number in (0, 2], got {penalty!r}",
                           param="repetition_penalty")  # fmt: skip
        controls["repetition_penalty"] = float(penalty)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise APIError(400, f"seed must be an integer >= 0, got {seed!r}", param="seed")
        if controls.get("do_sample"):
            controls["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stop, list) or not stop or len(stop) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and s for s in stop)):  # fmt: skip
            raise APIError(
                400,
                f"stop must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them",
                param="stop",
            )
        controls["stop_strings"] = stop
    return controls


def _response_format(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's response_format as a constraint: `json_object` (any JSON object), `json_schema` (that schema;
    always enforced, `strict` or not), `text` (none)."""
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema (an object)",
                           param="response_format.json_schema.schema")  # fmt: skip
        return {"json_schema": schema}
    raise APIError(
        400, "response_format.type must be text, json_object or json_schema", param="response_format"
    )


async def resolve_images(urls: list[tuple[str, str]], request: Request) -> list[bytes]:
    """The images' bytes: data: URLs decoded and files read in worker threads within the preparation slots,
    remote images fetched on the event loop."""
    state = request.app.state
    failures = state.metrics.remote_image_failures
    return await load_images(urls, state.media_policy, lambda reason: failures.labels(reason=reason).inc(),
                             state.preparation_slots)  # fmt: skip


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = request.app.state
    chat = parse_chat_request(await read_json(request), state.settings.max_images_per_request)
    state.metrics.unknown("/v1/chat/completions", chat.unknown_fields)
    images = await resolve_images(chat.image_urls, request)
    handle = await submit(
        state.preparation_slots, state.engine.submit, chat.messages, images, logprobs=chat.logprobs,
        **chat.controls, **chat.end_tokens.controls(state.engine),
    )  # fmt: skip
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": reply_id, "created": created, "model": state.model_name}
    if chat.stream:
        chunks = _stream_chunks(handle, head, chat, state.metrics)
        return StreamingResponse(sse(chunks, handle, state.metrics), media_type="text/event-stream")
    events = await until_done(handle, request)
    completion = handle.result()
    state.metrics.finished(completion)
    message = {"role": "assistant", "content": completion.text}
    choice = {"index": 0, "message": message, "finish_reason": completion.finish_reason, "logprobs": None}
    if chat.logprobs:
        choice["logprobs"] = {"content": [_logprob(e) for e in events if e.token_ids]}
    usage = _usage(completion.prompt_tokens, completion.completion_tokens)
    body = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
    return JSONResponse(body)


async def _stream_chunks(handle, head: dict, chat: ChatRequest, metrics):
    base = {**head, "object": "chat.completion.chunk"}
    counts = (handle.prompt_tokens, 0)  # (prompt, completion) tokens so far

    def chunk(delta: dict, finish_reason: str | None = None, logprobs=None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        out = {**base, "choices": [choice]}
        if chat.continuous_usage:
            out["usage"] = _usage(*counts)
        return out

    last = None
    try:
        async for event in handle:
            if last is None:  # the role goes out with the first token: the first event times the first token
                yield chunk({"role": "assistant", "content": ""})
            last, counts = event, (event.prompt_tokens, event.completion_tokens)
            logprobs = {"content": [_logprob(event)]} if chat.logprobs and event.token_ids else None
            if event.text or logprobs:
                yield chunk({"content": event.text}, None, logprobs)
            if event.finish_reason is not None:
                yield chunk({}, event.finish_reason)
    except RequestFailedError as error:
        metrics.finished(handle.completion)
        yield {
            "error": {
                "message": str(error),
                "type": "server_error",
                "param": None,
                "code": "generation_failed",
            }
        }
        yield "[DONE]"
        return
    metrics.finished(handle.result())
    if chat.include_usage and last is not None:
        yield {**base, "choices": [], "usage": _usage(last.prompt_tokens, last.completion_tokens)}
    yield "[DONE]"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprob(event) -> dict[str, Any]:
    text = event.text
    return {"token": text, "logprob": event.logprobs[0], "bytes": list(text.encode()), "top_logprobs": []}


@router.get("/v1/models")
async def models(request: Request):
    state = request.app.state
    card = {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "idefics2"}
    return {"object": "list", "data": [card]}
