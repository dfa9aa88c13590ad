"""Three-line chat API: `idefics2.pipeline(checkpoint).chat("Describe this image.", images=[image])`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from idefics2.generation import stream_generate
from idefics2.processing.chat import normalize_messages
from idefics2.processing.tokenizer import IMAGE_TOKEN
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


def chat_prompt(processor: Any, messages: Messages, images: Any = None) -> tuple[str, list[Any]]:
    """The prompt text for a conversation (its chat template with the generation prompt; the raw text of a
    single message when the checkpoint has no template) and its images in order."""
    messages, images = _conversation(messages, images)
    if processor.chat_template:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    elif len(messages) == 1:  # a base checkpoint without a chat template: the raw text
        prompt = "".join(p["text"] if p["type"] == "text" else "<image>" for p in messages[0]["content"])
    else:
        raise ValueError("this checkpoint has no chat template: pass a single prompt, not a conversation")
    return prompt, images


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


def _conversation(messages: Messages, images: Any) -> tuple[list[dict[str, Any]], list[Any]]:
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
