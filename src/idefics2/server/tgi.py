"""text-generation-inference's routes, for clients written against TGI: `POST /generate`, `POST
/generate_stream`, `GET /info`, `GET /health`.

`inputs` is the raw prompt (no chat template is applied, as in TGI), with images written as markdown
`![](URL)`; each becomes an `<image>` marker. Errors use TGI's body: `{"error": ..., "error_type": ...}`.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

import idefics2
from idefics2.server.errors import APIError
from idefics2.server.openai import MAX_STOP_STRINGS, resolve_images
from idefics2.server.running import EndTokens, read_json, sse, submit, until_done
from idefics2.serving import RequestFailedError

router = APIRouter()

MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*([^)\s]+)\s*\)")
FINISH_REASONS = {"length": "length", "eos_token": "eos_token", "stop_sequence": "stop_sequence"}
# TGI parameters with no effect here: any value other than these is refused
UNSUPPORTED = {
    "best_of": (None, 1),
    "typical_p": (None, 1.0),
    "watermark": (None, False),
    "truncate": (None,),
    "top_n_tokens": (None, 0),
    "decoder_input_details": (None, False),
    "frequency_penalty": (None, 0, 0.0),
    "adapter_id": (None,),
}
# the fields these routes read (UNSUPPORTED ones included); others are accepted, logged and counted
KNOWN_FIELDS = frozenset({"inputs", "parameters", "stream"})
KNOWN_PARAMETERS = frozenset(
    {
        "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "seed", "repetition_penalty", "stop",
        "grammar", "details", "return_full_text",
        "ignore_eos_token",  # the name of TGI's own stopping parameter (its benchmark tool sets it)
        *UNSUPPORTED,
    }
)  # fmt: skip


def parse_generate_request(body: dict[str, Any], max_images: int) -> tuple[str, list, dict, dict]:
    """(prompt with <image> markers, image URLs with their fields, controls, options) of a TGI body; the
    options' "unknown_fields" are the fields with no effect here, "end_tokens" what ends the reply."""
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise APIError(422, "inputs must be a non-empty string", param="inputs")
    urls = [(m.group(1), "inputs") for m in MARKDOWN_IMAGE.finditer(inputs)]
    if len(urls) > max_images:
        raise APIError(422, f"inputs hold {len(urls)} images, more than this server's limit of {max_images}")
    prompt = MARKDOWN_IMAGE.sub("<image>", inputs)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise APIError(422, "parameters must be an object", param="parameters")
    for name, allowed in UNSUPPORTED.items():
        if parameters.get(name) not in allowed:
            raise APIError(422, f"parameters.{name} is not supported by this server", param=name)
    controls: dict[str, Any] = {}
    if parameters.get("max_new_tokens") is not None:
        controls["max_new_tokens"] = _number(parameters, "max_new_tokens", int, low=1)
    sampling = {}
    for name, kind, low, high in (("temperature", float, 0.0, None), ("top_p", float, 0.0, 1.0),
                                  ("top_k", int, 1, None)):  # fmt: skip
        if parameters.get(name) is not None:
            sampling[name] = _number(parameters, name, kind, low, high, open_low=kind is float)
    do_sample = parameters.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise APIError(422, "parameters.do_sample must be true or false", param="do_sample")
    if do_sample or sampling:
        controls.update(do_sample=True, **sampling)
        if parameters.get("seed") is not None:
            controls["seed"] = _number(parameters, "seed", int, low=0)
    if parameters.get("repetition_penalty") is not None:
        controls["repetition_penalty"] = _number(parameters, "repetition_penalty", float, 0.0, open_low=True)
    stop = parameters.get("stop") or []
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(422, f"parameters.stop must be a list of at most {MAX_STOP_STRINGS} non-empty strings")
    if stop:
        controls["stop_strings"] = stop
    controls.update(_grammar(parameters.get("grammar")))
    options = {name: parameters.get(name, False) for name in ("details", "return_full_text")}
    if not all(isinstance(v, bool) for v in options.values()):
        raise APIError(422, "parameters.details and parameters.return_full_text must be true or false")
    ignore_eos = parameters.get("ignore_eos_token", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(422, "parameters.ignore_eos_token must be true or false", param="ignore_eos_token")
    options["end_tokens"] = EndTokens(ignore_eos)
    options["seed"] = controls.get("seed")
    options["inputs"] = inputs
    options["unknown_fields"] = sorted(set(body) - KNOWN_FIELDS) + [
        f"parameters.{name}" for name in sorted(set(parameters) - KNOWN_PARAMETERS)
    ]
    return prompt, urls, controls, options


def _grammar(grammar: Any) -> dict[str, Any]:
    """TGI's grammar parameter: {"type": "json", "value": schema} or {"type": "regex", "value": pattern}."""
    if grammar is None:
        return {}
    kind = grammar.get("type") if isinstance(grammar, dict) else None
    value = grammar.get("value") if isinstance(grammar, dict) else None
    if kind in ("json", "json_object") and isinstance(value, dict):
        return {"json_schema": value}
    if kind == "regex" and isinstance(value, str) and value:
        return {"regex": value}
    raise APIError(422, 'parameters.grammar must be {"type": "json", "value": <schema>} or '
                   '{"type": "regex", "value": <pattern>}', param="grammar")  # fmt: skip


def _number(parameters: dict, name: str, kind, low=None, high=None, open_low: bool = False):
    value = parameters[name]
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    ok = (
        ok
        and (low is None or (value > low if open_low else value >= low))
        and (high is None or value <= high)
    )
    if not ok:
        span = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        what = "a number" if kind is float else "an integer"
        raise APIError(422, f"parameters.{name} must be {what} {span}, got {value!r}", param=name)
    return kind(value)


def _token(event, special: set[int]) -> dict[str, Any]:
    token = event.token_ids[0]
    return {"id": token, "text": event.text, "logprob": event.logprobs[0], "special": token in special}


def _finish_reason(completion) -> str:
    return completion.stopped_by if completion.finish_reason == "stop" else completion.finish_reason


async def _start(request: Request):
    state = request.app.state
    try:
        prompt, urls, controls, options = parse_generate_request(
            await read_json(request), state.settings.max_images_per_request
        )
        state.metrics.unknown(request.url.path, options["unknown_fields"])
        images = await resolve_images(urls, request)
        handle = await submit(
            state.preparation_slots, state.engine.submit_prompt, prompt, images, logprobs=True, **controls,
            **options["end_tokens"].controls(state.engine),
        )  # fmt: skip
    except APIError as error:
        if error.status == 400:
            error.status = 422  # TGI answers validation errors with 422
        raise
    return state, handle, options


@router.post("/generate")
async def generate(request: Request):
    state, handle, options = await _start(request)
    events = await until_done(handle, request)
    completion = handle.result()
    state.metrics.finished(completion)
    text = completion.text
    if options["return_full_text"]:
        text = options["inputs"] + text
    answer: dict[str, Any] = {"generated_text": text}
    if options["details"]:
        special = set(state.engine.processor.tokenizer.all_special_ids)
        answer["details"] = {
            "finish_reason": _finish_reason(completion),
            "generated_tokens": completion.completion_tokens,
            "seed": options["seed"],
            "prefill": [],
            "tokens": [_token(e, special) for e in events if e.token_ids],
        }
    return JSONResponse(answer)


@router.post("/generate_stream")
async def generate_stream(request: Request):
    state, handle, options = await _start(request)
    special = set(state.engine.processor.tokenizer.all_special_ids)

    async def chunks():
        index = 0
        try:
            async for event in handle:
                if not event.token_ids:
                    continue
                index += 1
                chunk = {"index": index, "token": _token(event, special), "generated_text": None,
                         "details": None, "top_tokens": None}  # fmt: skip
                if event.finish_reason is not None:
                    completion = handle.result()
                    chunk["generated_text"] = completion.text
                    chunk["details"] = {
                        "finish_reason": _finish_reason(completion),
                        "generated_tokens": completion.completion_tokens,
                        "input_length": completion.prompt_tokens,
                        "seed": options["seed"],
                    }
                yield chunk
        except RequestFailedError as error:
            yield {"error": str(error), "error_type": "generation"}
        if handle.completion is not None:
            state.metrics.finished(handle.completion)

    return StreamingResponse(sse(chunks(), handle, state.metrics), media_type="text/event-stream")


@router.post("/")
async def compat_generate(request: Request):
    """TGI's root route, which huggingface_hub's `text_generation` posts to: /generate_stream when the body
    says "stream": true, else /generate."""
    stream = (await read_json(request)).get("stream", False)
    return await (generate_stream(request) if stream is True else generate(request))


@router.get("/info")
async def info(request: Request):
    state = request.app.state
    engine = state.engine
    return {
        "model_id": state.model_name,
        "model_sha": None,
        "model_dtype": str(engine.model.dtype).removeprefix("torch."),
        "model_device_type": engine.runner.device.type,
        "model_pipeline_tag": "image-text-to-text",
        "max_concurrent_requests": engine.options.max_batch + engine.options.max_queue,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_STRINGS,
        "max_input_tokens": engine.max_length - 1,
        "max_total_tokens": engine.max_length,
        "max_client_batch_size": 1,
        "validation_workers": 1,
        "router": "idefics2",
        "version": idefics2.__version__,
        "sha": None,
        "docker_label": None,
    }
