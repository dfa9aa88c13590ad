"""Chat-format training data: reading and validating JSONL, and turning examples into labelled batches.

An example is `{"messages": [{"role": "user" | "assistant" | "system", "content": str | [parts]}, ...],
"images": [path or PIL image, ...]}`; a part is `{"type": "text", "text": ...}` or `{"type": "image"}`, and
the images fill the image parts in order (or each image part names its own, `{"type": "image", "image":
"a.png"}`, as the pipeline accepts). Only assistant turns are learned: their text and their
`<end_of_utterance>`, not the "Assistant:" role prefix. Everything else is -100 in the labels: the system and
user turns with their role prefixes, BOS, the image tokens and their `<fake_token_around_image>` markers,
padding.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROLES = ("system", "user", "assistant")
IGNORE = -100

# The conversation format of the idefics2-8b chat checkpoints: "User:<image>Question?<end_of_utterance>\n
# Assistant: Answer.<end_of_utterance>\n" (a role is followed by a space unless an image comes first).
IDEFICS2_CHAT_FORMAT = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<image>{% endif %}"
    "{% endfor %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class DataError(ValueError):
    """A problem with one example; `line` is its 1-based line number in the JSONL file when known."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, line: int | None = None):
        where = (
            f"{path}:{line}: "
            if path is not None and line is not None
            else (f"line {line}: " if line else "")
        )
        super().__init__(where + message)
        self.line = line


# ----------------------------------------------------------------------------------------------- validation
def normalize_example(example: Any, base_dir: Path | None = None) -> dict:
    """Check one example and return it with every content as a list of parts and image paths resolved.

    Raises DataError naming the problem.
    """
    if not isinstance(example, dict):
        raise DataError(f"an example must be a JSON object, got {type(example).__name__}")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError('"messages" must be a non-empty list')
    out_messages, n_image_parts, inline = [], 0, []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"messages[{i}]: role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise DataError(f"messages[{i}]: content must be a string or a non-empty list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(
                    {"type": "text", "text": _checked_text(part.get("text"), f"messages[{i}].content[{j}]")}
                )
            elif kind == "image":
                parts.append({"type": "image"})
                n_image_parts += 1
                if part.get("image") is not None:
                    inline.append(part["image"])
            else:
                raise DataError(
                    f'messages[{i}].content[{j}]: a part must be {{"type": "text", "text": ...}} '
                    f'or {{"type": "image"}}'
                )
        out_messages.append({"role": role, "content": parts})
    if not any(m["role"] == "assistant" for m in out_messages):
        raise DataError("no assistant message: there is nothing to learn from this example")
    images = example.get("images", [])
    if not isinstance(images, list):
        raise DataError('"images" must be a list of image paths')
    if inline:
        if images:
            raise DataError('give the images either inside the image parts or in "images", not both')
        if len(inline) != n_image_parts:
            raise DataError(
                f'{len(inline)} of the {n_image_parts} image parts hold an "image": give every image part '
                'its image, or list the images in "images"'
            )
        images = inline
    if len(images) != n_image_parts:
        raise DataError(
            f'{n_image_parts} image part(s) in the messages but {len(images)} image(s) in "images"'
        )
    resolved = []
    for k, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            path = Path(image).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            try:
                found = path.is_file()
            except OSError as error:  # e.g. a name longer than the file system allows
                raise DataError(f"images[{k}]: cannot open {path}: {error.strerror}") from None
            if not found:
                raise DataError(f"images[{k}]: file not found: {path}")
            _check_image_header(path, k)
            resolved.append(str(path))
        elif hasattr(image, "size") or torch.is_tensor(image):  # a PIL image, array or tensor given in code
            resolved.append(image)
        else:
            raise DataError(f"images[{k}] must be a file path, got {type(image).__name__}")
    return {"messages": out_messages, "images": resolved}


def _checked_text(text: Any, where: str) -> str:
    """A text part's text: a str of valid Unicode without the image markers, whose count must match the
    image parts (an image goes in a {"type": "image"} part, not in the text)."""
    from idefics2.processing.tokenizer import FAKE_IMAGE_TOKEN, IMAGE_TOKEN, check_text

    if not isinstance(text, str):
        raise DataError(f'{where}: a text part needs a string "text"')
    try:
        check_text(text, "its text")
    except ValueError as error:
        raise DataError(f"{where}: {error}") from None
    for marker in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN):
        if marker in text:
            raise DataError(f'{where}: the text holds {marker}; put images in {{"type": "image"}} parts')
    return text


def _check_image_header(path: Path, index: int) -> None:
    """Open the file lazily (header only): a file that is not an image, or too large to decode safely, fails
    here, before training. (A file truncated after its header only fails when its batch is built.)"""
    import warnings

    from PIL import Image

    from idefics2.processing.images import DEFAULT_MAX_PIXELS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Exception as error:  # Pillow's format plugins raise all sorts of exceptions on corrupt headers
        raise DataError(f"images[{index}]: {path} is not a readable image ({type(error).__name__})") from None
    if width == 0 or height == 0:
        raise DataError(f"images[{index}]: {path} is an empty image")
    if width * height > DEFAULT_MAX_PIXELS:
        raise DataError(
            f"images[{index}]: {path} has {width}x{height} pixels, above the limit of {DEFAULT_MAX_PIXELS} "
            "(a possible decompression bomb)"
        )


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read and validate a JSONL file (one example per line, blank lines skipped); image paths are relative to
    the file's folder. The first bad line raises DataError with its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    examples = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            example = parse_json_line(raw, functools.partial(DataError, path=path, line=number))
            if example is None:
                continue
            try:
                examples.append(normalize_example(example, base_dir=path.parent))
            except DataError as error:
                raise DataError(str(error), path=path, line=number) from None
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def parse_json_line(raw: bytes, error: Any) -> Any:
    """The JSON value of one line of a JSONL file (bytes, without or with its newline); None for a blank line.
    A line that is not UTF-8 or not JSON raises `error(message)`."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as problem:
        raise error(f"not UTF-8 text (byte {problem.start + 1} of the line)") from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as problem:
        raise error(f"invalid JSON: {problem.msg} (column {problem.colno})") from None
    except RecursionError:
        raise error("invalid JSON: nested too deeply") from None
    except ValueError:  # json reads integers of at most 4300 digits
        raise error("invalid JSON: a number with too many digits") from None


# ----------------------------------------------------------------------------------------------- encoding
@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    images: list  # paths or images, in order


@dataclass
class PackedExample:
    """Several encoded examples sharing one row (sequence packing): each attends only to itself."""

    parts: list[EncodedExample]

    def __len__(self) -> int:
        return sum(len(part.input_ids) for part in self.parts)


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of examples of these token counts grouped into rows of at most `capacity` tokens: longest
    first, each into the first row with room (first-fit decreasing); an example longer than `capacity` gets a
    row of its own."""
    if capacity < 1:
        raise ValueError(f"the packing capacity must be positive, got {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        row = next((k for k, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def _learned_spans(render, messages: list[dict], eou: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of what is learned in it.

    Turns are found by rendering growing prefixes of the conversation; an assistant turn is learned from the
    end of the generation prompt ("Assistant:") through its last end-of-utterance marker.
    """
    full = render(messages, False)
    spans, turn_start = [], 0
    for i, message in enumerate(messages):
        turn_end = len(render(messages[: i + 1], False))
        if not full.startswith(render(messages[: i + 1], False)):
            raise ValueError("the chat template does not render a conversation's prefixes as prefixes")
        if message["role"] == "assistant":
            start = turn_start
            try:
                prompt = render(messages[:i], True)
            except Exception:  # a template that cannot render an empty conversation
                prompt = None
            if prompt is not None and full.startswith(prompt) and turn_start <= len(prompt) <= turn_end:
                start = len(prompt)
            marker = full.rfind(eou, start, turn_end)
            end = marker + len(eou) if marker >= 0 else turn_start + len(full[turn_start:turn_end].rstrip())
            if end > start:
                spans.append((start, end))
        turn_start = turn_end
    return full, spans


class ChatCollator:
    """Turns chat examples into right-padded training batches (input_ids, attention_mask, labels, and
    pixel_values / pixel_attention_mask when the batch has images).

    `max_length`: longer examples are cut to that many tokens when every image's tokens stay whole (only
    text is removed); otherwise the example is dropped with a warning.
    """

    def __init__(self, processor, max_length: int | None = None):
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.processor = processor
        self.max_length = max_length
        tok = processor.tokenizer
        self.tokenizer = tok
        self.image_id, self.fake_id = tok.image_token_id, tok.fake_image_token_id
        self.image_token = tok.convert_ids_to_tokens(self.image_id)
        self.fake_token = tok.convert_ids_to_tokens(self.fake_id)
        self.eou_token = tok.convert_ids_to_tokens(tok.end_of_utterance_token_id)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        splitting = bool(getattr(processor.image_processor, "do_image_splitting", False))
        block = self.fake_token + self.image_token * processor.image_seq_len + self.fake_token
        self.image_block = block * (5 if splitting else 1)
        if getattr(processor, "chat_template", None) is None:
            warnings.warn(
                "the processor has no chat template (a base checkpoint?): using the Idefics2 chat "
                "format of idefics2-8b",
                stacklevel=2,
            )
            processor.chat_template = IDEFICS2_CHAT_FORMAT

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _expand(self, text: str) -> str:
        """Each `<image>` becomes its fake-token-delimited image tokens, as the processor writes it."""
        text = text.replace(self.image_token, self.image_block)
        text = text.replace(self.fake_token + self.fake_token, self.fake_token)
        return re.sub(rf"{re.escape(self.fake_token)}(?=[^\s<])", self.fake_token + " ", text)

    def encode(self, example: dict) -> EncodedExample | None:
        """Token ids and labels of one (normalized) example; None (with a warning) when it must be dropped."""
        full, spans = _learned_spans(self._render, example["messages"], self.eou_token)
        cuts = sorted({0, len(full), *(p for span in spans for p in span)})
        pieces = [full[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        expanded_pieces = [self._expand(piece) for piece in pieces]
        expanded = "".join(expanded_pieces)
        if expanded != self._expand(full):
            raise ValueError("an image placeholder touches a turn boundary: cannot tell what to learn")
        learned_ranges, position = [], 0
        for (a, _), piece in zip(zip(cuts[:-1], cuts[1:], strict=True), expanded_pieces, strict=True):
            if any(start <= a < end for start, end in spans):
                learned_ranges.append((position, position + len(piece)))
            position += len(piece)

        encoding = self.tokenizer.backend.encode(expanded, add_special_tokens=False)
        core = list(encoding.ids)
        ids = list(self.tokenizer.encode(expanded))
        offset = next((k for k in range(len(ids) - len(core) + 1) if ids[k : k + len(core)] == core), None)
        if offset is None:
            raise RuntimeError("the tokenizer's backend and its encode() disagree on this text")
        labels = [IGNORE] * len(ids)
        for k, (token_id, (start, _)) in enumerate(zip(core, encoding.offsets, strict=True)):
            if token_id in (self.image_id, self.fake_id):
                continue
            if any(a <= start < b for a, b in learned_ranges):
                labels[offset + k] = token_id
        return self._truncate(EncodedExample(ids, labels, list(example["images"])))

    def _truncate(self, encoded: EncodedExample) -> EncodedExample | None:
        n = self.max_length
        if n is None or len(encoded.input_ids) <= n:
            return encoded
        image_positions = [k for k, t in enumerate(encoded.input_ids) if t in (self.image_id, self.fake_id)]
        if image_positions and image_positions[-1] >= n:
            warnings.warn(
                f"dropping an example of {len(encoded.input_ids)} tokens: max_length={n} would cut "
                "through its image tokens",
                stacklevel=3,
            )
            return None
        labels = encoded.labels[:n]
        if all(label == IGNORE for label in labels[1:]):
            warnings.warn(
                f"dropping an example of {len(encoded.input_ids)} tokens: after truncation to "
                f"max_length={n} nothing is left to learn",
                stacklevel=3,
            )
            return None
        return EncodedExample(encoded.input_ids[:n], labels, encoded.images)

    def __call__(self, examples: Sequence[dict | EncodedExample | PackedExample]) -> dict[str, torch.Tensor]:
        """Right-padded batch; packed rows (PackedExample) add `segment_ids` (B, T): 1, 2, ... for the
        examples of a row, 0 for padding."""
        encoded = [
            e if isinstance(e, (EncodedExample, PackedExample)) else self.encode(normalize_example(e))
            for e in examples
        ]
        encoded = [e for e in encoded if e is not None]
        if not encoded:
            raise ValueError("every example of this batch was dropped (longer than max_length)")
        rows = [e.parts if isinstance(e, PackedExample) else [e] for e in encoded]
        length = max(sum(len(part.input_ids) for part in parts) for parts in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        segment_ids = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        for row, parts in enumerate(rows):
            start = 0
            for segment, part in enumerate(parts, start=1):
                end = start + len(part.input_ids)
                input_ids[row, start:end] = torch.tensor(part.input_ids)
                segment_ids[row, start:end] = segment
                labels[row, start + 1 : end] = torch.tensor(part.labels[1:])  # nothing predicts a first token
                start = end
        batch = {"input_ids": input_ids, "attention_mask": (segment_ids > 0).long(), "labels": labels}
        if any(isinstance(e, PackedExample) for e in encoded):
            batch["segment_ids"] = segment_ids
        batch.update(self._pixels([[image for part in parts for image in part.images] for parts in rows]))
        return batch

    def _pixels(self, images: list[list]) -> dict[str, torch.Tensor]:
        """pixel_values / pixel_attention_mask for rows given as lists of images (rows may have none)."""
        with_images = [row for row, row_images in enumerate(images) if row_images]
        if not with_images:
            return {}
        out = self.processor.image_processor([images[row] for row in with_images], return_tensors="pt")
        values, mask = out["pixel_values"], out["pixel_attention_mask"]  # (B', N, 3, H, W), (B', N, H, W)
        pixel_values = values.new_zeros((len(images), *values.shape[1:]))
        pixel_attention_mask = mask.new_zeros((len(images), *mask.shape[1:]))
        pixel_values[with_images] = values
        pixel_attention_mask[with_images] = mask
        return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask}


class ChatDataset(torch.utils.data.Dataset):
    """Examples encoded once (text only; images are read when a batch is built). Examples that cannot fit
    `collator.max_length` without cutting an image are dropped with a warning."""

    def __init__(self, examples: Sequence[dict], collator: ChatCollator):
        encoded = [collator.encode(normalize_example(e)) for e in examples]
        self.examples = [e for e in encoded if e is not None]
        self.dropped = len(encoded) - len(self.examples)
        if not self.examples:
            raise ValueError("no example is left: every one is longer than max_length")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]

    def token_count(self, index: int) -> int:
        return len(self.examples[index].input_ids)


class RowsDataset(torch.utils.data.Dataset):
    """Training examples from the rows of any input idefics2.data reads (a Parquet file, a `datasets`
    folder, a hub dataset, in any layout it knows), without holding or decoding the images up front: the
    texts are encoded in one pass (`rows` opened with decode_images=False), and an example's images are read
    again and decoded when its batch is built. The first bad row raises DataError naming it. Examples that
    cannot fit `collator.max_length` without cutting an image are dropped with a warning."""

    def __init__(self, rows, collator: ChatCollator):
        from PIL import Image

        stand_in = Image.new("RGB", (1, 1))  # the encoding only counts the images
        self.rows = rows
        self.examples: list[tuple[int, EncodedExample, int]] = []  # (row index, texts, number of images)
        self.dropped = 0
        for row in rows:
            if row.error is not None:
                raise DataError(row.error)
            try:
                example = normalize_example(
                    {"messages": row.messages, "images": [stand_in] * len(row.images)}
                )
            except DataError as error:
                raise DataError(f"{row.where}: {error}") from None
            encoded = collator.encode(example)
            if encoded is None:
                self.dropped += 1
                continue
            self.examples.append(
                (row.index, EncodedExample(encoded.input_ids, encoded.labels, []), len(row.images))
            )
        if not self.examples:
            raise ValueError("no example is left: every one is longer than max_length")

    def __len__(self) -> int:
        return len(self.examples)

    def token_count(self, index: int) -> int:
        return len(self.examples[index][1].input_ids)

    def __getitem__(self, index: int) -> EncodedExample:
        row_index, encoded, num_images = self.examples[index]
        if not num_images:
            return encoded
        row = self.rows.row_at(row_index)
        if row.error is not None:
            raise DataError(row.error)
        return EncodedExample(encoded.input_ids, encoded.labels, row.images)


class PackedDataset(torch.utils.data.Dataset):
    """The examples of a ChatDataset or RowsDataset packed into rows of at most `capacity` tokens (default:
    the longest example's length), so that short examples share rows instead of padding (see pack_lengths).
    Rows are built when asked for: a RowsDataset's images are still read only as batches are built."""

    def __init__(self, dataset: ChatDataset | RowsDataset, capacity: int | None = None):
        lengths = [dataset.token_count(i) for i in range(len(dataset))]
        if not lengths:
            raise ValueError("nothing to pack: no examples")
        self.dataset = dataset
        self.capacity = capacity or max(lengths)
        self.groups = pack_lengths(lengths, self.capacity)
        self.num_examples = len(lengths)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> PackedExample:
        return PackedExample([self.dataset[i] for i in self.groups[index]])
