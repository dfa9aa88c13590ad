"""Three-line chat API: `idefics2.pipeline(checkpoint).chat("Describe this image.", images=[image])`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from idefics2.generation import stream_generate
from idefics2.processing.chat import chat_prompt
from idefics2.streaming import ReplyStream, trim_at_stop

Messages = str | list[dict[str, Any]]


def pipeline(
    model_id_or_folder: str | os.PathLike | None = None,
    *,
    dtype: Any = None,
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
    adapter: str | os.PathLike | None = None,
    quantize: str | None = None,
    **processor_options: Any,
) -> ChatPipeline:
    """Load the model and processor of a checkpoint (folder or hub repo id) into a `ChatPipeline`.

    Without a checkpoint, the built-in shapes-world model shipped with the package (offline). `adapter`: a
    LoRA adapter (PEFT format) applied on top of the weights. `quantize`: "int8" or "int4" quantizes the
    decoder while loading (see idefics2.quantization). `processor_options` go to
    `Idefics2Processor.from_pretrained` (e.g. do_image_splitting=False).
    """
    from idefics2.hub import resolve_checkpoint
    from idefics2.modeling import Idefics2ForConditionalGeneration
    from idefics2.processing import Idefics2Processor

    if model_id_or_folder is None:
        from idefics2.assets import builtin_model_dir

        folder = builtin_model_dir()
    else:
        folder = resolve_checkpoint(model_id_or_folder)
    model = Idefics2ForConditionalGeneration.from_pretrained(
        folder,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        adapter=adapter,
        quantize=quantize,
    )
    processor = Idefics2Processor.from_pretrained(folder, **processor_options)
    return ChatPipeline(model.eval(), processor)


class ChatPipeline:
    """Processor + chat template + generate + decode. `chat` returns the reply, `stream` yields it in pieces.

    `messages` is either a plain user prompt (str; the images are shown before it) or a conversation:
    a list of {"role": ..., "content": str | list of {"type": "text", "text": ...} / {"type": "image"}}
    parts. Images go in `images=` in the order of the image parts, or inside the parts as {"type": "image",
    "image": <image>}. Generation controls (max_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, bad_words_ids, eos_token_id, stop_strings, seed, json_schema, regex, ...) are passed
    through to `idefics2.generation.generate`; the reply is cut before the first stop string. With
    json_schema= (a dict or its JSON text) or regex= the reply follows the schema or matches the regex,
    unless max_new_tokens cuts it first (then it is returned as it is).
    """

    def __init__(self, model: torch.nn.Module, processor: Any):
        self.model = model
        self.processor = processor

    def chat(self, messages: Messages, images: Any = None, **controls: Any) -> str:
        """Generate the assistant's reply and return it as text."""
        inputs = self.prepare(messages, images)
        _check_controls(controls)
        out = self.model.generate(**inputs, tokenizer=self.processor, **controls)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        eos = set(_end_ids(self.model, self.processor, controls))
        end = next((i for i, t in enumerate(new) if t in eos), len(new))
        text = self.processor.tokenizer.decode(new[:end], skip_special_tokens=True)
        return trim_at_stop(text, _stop_strings(controls)).lstrip()

    def stream(self, messages: Messages, images: Any = None, **controls: Any) -> Iterator[str]:
        """Yield the reply as text deltas while it is generated (never a partial character or stop string)."""
        inputs = self.prepare(messages, images)
        _check_controls(controls)
        eos = set(_end_ids(self.model, self.processor, controls))
        steps = stream_generate(self.model, **inputs, tokenizer=self.processor, **controls)
        reply = ReplyStream(self.processor.tokenizer, _stop_strings(controls))
        for tokens in steps:
            token = int(tokens[0])
            if token in eos:
                break
            text = reply.push(token)
            if text:
                yield text
            if reply.stopped:
                break
        tail = reply.finish()
        if tail:
            yield tail

    def prepare(self, messages: Messages, images: Any = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (and pixel_values, pixel_attention_mask) for one conversation."""
        prompt, images = chat_prompt(self.processor, messages, images)
        batch = self.processor(text=prompt, images=[images] if images else None, return_tensors="pt")
        device = self.model.lm_head.weight.device
        dtype = self.model.lm_head.weight.dtype
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        if images:
            inputs["pixel_values"] = batch["pixel_values"].to(device=device, dtype=dtype)
            inputs["pixel_attention_mask"] = batch["pixel_attention_mask"].to(device)
        return inputs


def _check_controls(controls: dict[str, Any]) -> None:
    for name in ("tokenizer", "streamer"):
        if name in controls:
            raise ValueError(f"{name}= is set by the pipeline; call model.generate for full control")


def _stop_strings(controls: dict[str, Any]) -> list[str]:
    stops = controls.get("stop_strings")
    return [stops] if isinstance(stops, str) else list(stops or [])


def _end_ids(model, processor, controls) -> list[int]:
    from idefics2.generation import _token_list, default_eos_token_ids

    if controls.get("eos_token_id") is not None:
        return _token_list(controls["eos_token_id"], "eos_token_id")
    return default_eos_token_ids(model, processor)
