"""The shapes world: a procedurally generated visual question answering task.

Each scene is a plain canvas holding 1 to 6 filled circles, squares and upward-pointing isosceles
triangles in six colours. Questions come in seven types with fixed wording; answers are lowercase words or
digits. Everything is drawn from a seeded `random.Random`, so a seed gives the same data on every machine.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
QUESTION_TYPES = (
    "count_all",
    "count_color",
    "count_kind",
    "color_of_kind",
    "kind_of_color",
    "exists",
    "compare",
)

MIN_SIDE, MAX_SIDE = 96, 384
MAX_SHAPES = 6
COLOR_JITTER = 20
MIN_GAP = 4
MIN_SHAPE_PX = 14
RENDERERS = ("pil", "analytic")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    rgb: tuple[int, int, int]
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive pixel bounds)


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: list[Shape] = field(default_factory=list)

    def count(self, *, color: str | None = None, kind: str | None = None) -> int:
        return sum(
            1 for s in self.shapes if (color is None or s.color == color) and (kind is None or s.kind == kind)
        )

    def render(
        self, supersample: int = 1, jpeg_quality: int | None = None, resample: int = Image.Resampling.LANCZOS
    ) -> Image.Image:
        """Draw the scene; `supersample` > 1 anti-aliases edges (drawn that many times larger, then reduced
        with the `resample` filter; BOX is the fast plain average), `jpeg_quality` adds JPEG artefacts."""
        scale = max(1, supersample)
        image = Image.new("RGB", (self.width * scale, self.height * scale), self.background)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            x0, y0, x1, y1 = (v * scale for v in shape.box)
            x1, y1 = x1 + scale - 1, y1 + scale - 1
            if shape.kind == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=shape.rgb)
            elif shape.kind == "square":
                draw.rectangle((x0, y0, x1, y1), fill=shape.rgb)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=shape.rgb)
        if scale > 1:
            if resample == Image.Resampling.BOX:
                image = image.reduce(scale)
            else:
                image = image.resize((self.width, self.height), resample)
        return _jpeg(image, jpeg_quality) if jpeg_quality is not None else image

    def render_analytic(self, jpeg_quality: int | None = None) -> Image.Image:
        """Draw the scene with a second, independent renderer: each pixel gets the exact fraction of its area
        that a shape covers (approximated from the signed distance of the pixel's centre to the shape's
        outline), blended over the background. Edges are soft, and pixel coverage rules differ from PIL's."""
        ys, xs = np.mgrid[0 : self.height, 0 : self.width].astype(np.float64) + 0.5  # pixel centres
        image = np.empty((self.height, self.width, 3))
        image[:] = self.background
        for shape in self.shapes:
            x0, y0, x1, y1 = shape.box
            left, top, right, bottom = x0, y0, x1 + 1.0, y1 + 1.0  # the box's outer edges
            cx, cy, half = (left + right) / 2, (top + bottom) / 2, (right - left) / 2
            if shape.kind == "circle":
                distance = np.hypot(xs - cx, ys - cy) - half
            elif shape.kind == "square":
                distance = np.maximum(np.abs(xs - cx), np.abs(ys - cy)) - half
            else:  # apex at the top centre, base along the bottom edge
                distance = np.maximum(
                    ys - bottom,
                    np.maximum(
                        _edge_distance(xs, ys, (cx, top), (left, bottom)),
                        _edge_distance(xs, ys, (right, bottom), (cx, top)),
                    ),
                )
            coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
            image = image * (1.0 - coverage) + np.asarray(shape.rgb, dtype=np.float64) * coverage
        out = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        return _jpeg(out, jpeg_quality) if jpeg_quality is not None else out


def _edge_distance(
    xs: np.ndarray, ys: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    """Signed distance to the line through a and b: negative on the side of a triangle whose corners, taken
    in the order ... -> a -> b -> ..., run counter-clockwise on screen (y pointing down)."""
    (ax, ay), (bx, by) = a, b
    return ((bx - ax) * (ys - ay) - (by - ay) * (xs - ax)) / np.hypot(bx - ax, by - ay)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@dataclass
class Example:
    qtype: str
    scenes: list[Scene]
    question: str
    answer: str

    def images(
        self, supersample: int = 1, jpeg_quality: int | None = None, renderer: str = "pil"
    ) -> list[Image.Image]:
        """The scenes drawn by `renderer`: "pil" (`Scene.render`) or "analytic" (`Scene.render_analytic`,
        which ignores `supersample`)."""
        if renderer == "analytic":
            return [scene.render_analytic(jpeg_quality) for scene in self.scenes]
        if renderer != "pil":
            raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
        return [scene.render(supersample, jpeg_quality) for scene in self.scenes]

    def messages(self, with_answer: bool = False, structured: bool = False) -> list[dict]:
        """One user turn, the image(s) first then the question; optionally the assistant's answer.
        `structured`: the question asks for a JSON answer (JSON_INSTRUCTION), the answer is `json_answer`."""
        question = f"{JSON_INSTRUCTION} {self.question}" if structured else self.question
        answer = json_answer(self.qtype, self.answer) if structured else self.answer
        content = [{"type": "image"} for _ in self.scenes] + [{"type": "text", "text": question}]
        turns = [{"role": "user", "content": content}]
        if with_answer:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return turns


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb)  # type: ignore[return-value]


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """True when the boxes are separated by at least MIN_GAP pixels along some axis."""
    return a[2] + MIN_GAP < b[0] or b[2] + MIN_GAP < a[0] or a[3] + MIN_GAP < b[1] or b[3] + MIN_GAP < a[1]


def random_scene(rng: random.Random, num_shapes: int | None = None) -> Scene:
    """A canvas with `num_shapes` (default: uniform 1..6) non-overlapping shapes."""
    target = num_shapes if num_shapes is not None else rng.randint(1, MAX_SHAPES)
    if not 1 <= target <= MAX_SHAPES:
        raise ValueError(f"a scene holds 1 to {MAX_SHAPES} shapes, not {target}")
    while True:
        width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        background = tuple(rng.randint(200, 255) for _ in range(3))
        shorter = min(width, height)
        shapes: list[Shape] = []
        for _ in range(200 * target):
            if len(shapes) == target:
                break
            side = max(MIN_SHAPE_PX, round(shorter * rng.uniform(0.12, 0.24)))
            x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if all(_apart(box, other.box) for other in shapes):
                color = rng.choice(list(COLORS))
                shapes.append(Shape(rng.choice(KINDS), color, _jitter(rng, COLORS[color]), box))
        if len(shapes) == target:
            return Scene(width, height, background, shapes)  # type: ignore[arg-type]


def _pick_color(rng: random.Random, scene: Scene) -> str:
    """Half the time a colour present in the scene, otherwise any colour."""
    if rng.random() < 0.5:
        return rng.choice(scene.shapes).color
    return rng.choice(list(COLORS))


def _pick_kind(rng: random.Random, scene: Scene) -> str:
    if rng.random() < 0.5:
        return rng.choice(scene.shapes).kind
    return rng.choice(KINDS)


def ask(rng: random.Random, scene: Scene, qtype: str) -> tuple[str, str] | None:
    """A (question, answer) of a one-image type about `scene`; None when the type does not apply (a "What
    color is the {kind}?" needs exactly one shape of some kind, "What shape is the {color} one?" likewise)."""
    if qtype == "count_all":
        return "How many shapes are there?", str(len(scene.shapes))
    if qtype == "count_color":
        color = _pick_color(rng, scene)
        return f"How many {color} shapes are there?", str(scene.count(color=color))
    if qtype == "count_kind":
        kind = _pick_kind(rng, scene)
        return f"How many {kind}s are there?", str(scene.count(kind=kind))
    if qtype == "color_of_kind":
        unique = [k for k in KINDS if scene.count(kind=k) == 1]
        if not unique:
            return None
        kind = rng.choice(unique)
        return f"What color is the {kind}?", next(s.color for s in scene.shapes if s.kind == kind)
    if qtype == "kind_of_color":
        unique = [c for c in COLORS if scene.count(color=c) == 1]
        if not unique:
            return None
        color = rng.choice(unique)
        return f"What shape is the {color} one?", next(s.kind for s in scene.shapes if s.color == color)
    if qtype == "exists":  # yes and no equally often
        if rng.random() < 0.5:
            target = rng.choice(scene.shapes)
            color, kind = target.color, target.kind
        else:
            absent = [(c, k) for c in COLORS for k in KINDS if scene.count(color=c, kind=k) == 0]
            color, kind = rng.choice(absent)
        return f"Is there any {color} {kind}?", "yes" if scene.count(color=color, kind=kind) else "no"
    raise ValueError(f"{qtype!r} is not a one-image question type")


def make_example(rng: random.Random, qtype: str) -> Example:
    """One question of the given type about freshly drawn scene(s)."""
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {', '.join(QUESTION_TYPES)}")
    if qtype == "compare":
        first, second = rng.sample(range(1, MAX_SHAPES + 1), 2)
        scenes = [random_scene(rng, first), random_scene(rng, second)]
        answer = "first" if first > second else "second"
        return Example(qtype, scenes, "Which image has more shapes, the first or the second?", answer)
    while True:
        scene = random_scene(rng)
        qa = ask(rng, scene, qtype)
        if qa is not None:
            return Example(qtype, [scene], *qa)


def make_dataset(num_per_type: int, seed: int, qtypes: tuple[str, ...] = QUESTION_TYPES) -> list[Example]:
    """`num_per_type` examples of each type, interleaved, reproducible from `seed`."""
    rng = random.Random(seed)
    return [make_example(rng, qtype) for _ in range(num_per_type) for qtype in qtypes]


# Structured answers: a question preceded by JSON_INSTRUCTION is answered with one JSON object whose single
# property holds the answer (the built-in model learned this in its third training stage).
JSON_INSTRUCTION = "Answer in JSON."
ANSWER_PROPERTIES = {
    "count_all": "count", "count_color": "count", "count_kind": "count", "color_of_kind": "color",
    "kind_of_color": "shape", "exists": "present", "compare": "image",
}  # fmt: skip
_PROPERTY_SCHEMAS = {
    "count": {"type": "integer", "minimum": 0, "maximum": 9},
    "color": {"enum": list(COLORS)},
    "shape": {"enum": list(KINDS)},
    "present": {"type": "boolean"},
    "image": {"enum": ["first", "second"]},
}


def answer_schema(qtype: str) -> dict:
    """The JSON schema of a structured answer to a question of type `qtype`, e.g. for "color_of_kind"
    {"type": "object", "properties": {"color": {"enum": [six colours]}}, "required": ["color"], ...}."""
    key = ANSWER_PROPERTIES[qtype]
    return {
        "type": "object",
        "properties": {key: _PROPERTY_SCHEMAS[key]},
        "required": [key],
        "additionalProperties": False,
    }


def json_answer(qtype: str, answer: str) -> str:
    """The structured form of a plain answer: "2" -> '{"count": 2}', "yes" -> '{"present": true}'."""
    key = ANSWER_PROPERTIES[qtype]
    value = int(answer) if key == "count" else (answer == "yes") if key == "present" else answer
    return json.dumps({key: value})


def plain_answer(qtype: str, text: str) -> str | None:
    """The plain answer inside a structured one (the inverse of `json_answer`); None if it does not parse."""
    try:
        value = json.loads(text)[ANSWER_PROPERTIES[qtype]]
    except (ValueError, TypeError, KeyError):
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def normalize_answer(text: str) -> str:
    """The answer as compared: surrounding spaces and a final full stop dropped, lowercase."""
    return text.strip().rstrip(".").strip().lower()


def evaluate(
    model_or_pipeline,
    processor=None,
    examples: list[Example] | None = None,
    *,
    batch_size: int = 32,
    supersample: int = 1,
    jpeg_quality: int | None = None,
    renderer: str = "pil",
    max_new_tokens: int | None = None,
    structured: bool = False,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers, per question type and "overall".

    Pass a model and its processor, or a pipeline (anything with `.model` and `.processor`). The questions are
    asked with the processor's chat template, `batch_size` at a time (left-padded batched generation); the
    images are drawn by `renderer` with `supersample` / `jpeg_quality` (see `Example.images`). `structured`:
    every question starts with JSON_INSTRUCTION and is answered under its type's `answer_schema`
    (constrained decoding); the answer is the property's value (an answer that does not parse is wrong).
    `max_new_tokens` defaults to 6 (plain) or 32 (structured).
    """
    from idefics2.generation import generate

    model = model_or_pipeline
    if processor is None:
        if not (hasattr(model_or_pipeline, "model") and hasattr(model_or_pipeline, "processor")):
            raise ValueError("pass a model and its processor, or a pipeline with .model and .processor")
        model, processor = model_or_pipeline.model, model_or_pipeline.processor
    if not examples:
        raise ValueError("no examples to evaluate")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    predictions = answer_questions(
        model, processor, examples, batch_size=batch_size, supersample=supersample,
        jpeg_quality=jpeg_quality, renderer=renderer, max_new_tokens=max_new_tokens, generate=generate,
        structured=structured,
    )  # fmt: skip
    correct: dict[str, list[bool]] = {}
    for example, prediction in zip(examples, predictions, strict=True):
        if structured:
            prediction = plain_answer(example.qtype, prediction) or ""
        correct.setdefault(example.qtype, []).append(normalize_answer(prediction) == example.answer)
    scores = {qtype: sum(v) / len(v) for qtype, v in correct.items()}
    scores["overall"] = sum(sum(v) for v in correct.values()) / len(examples)
    return scores


def answer_questions(
    model, processor, examples: list[Example], *, batch_size: int, supersample: int = 1,
    jpeg_quality: int | None = None, renderer: str = "pil", max_new_tokens: int | None = None, generate=None,
    structured: bool = False,
) -> list[str]:  # fmt: skip
    """The model's greedy answer (text, stripped) to each example's question; `structured`: asked for JSON
    (JSON_INSTRUCTION) under each question type's `answer_schema`."""
    import torch

    if generate is None:
        from idefics2.generation import generate
    if max_new_tokens is None:
        max_new_tokens = 32 if structured else 6
    tokenizer = processor.tokenizer
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    answers: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = [
                processor.apply_chat_template(e.messages(structured=structured), add_generation_prompt=True)
                for e in chunk
            ]
            schemas = {"json_schema": [answer_schema(e.qtype) for e in chunk]} if structured else {}
            images = [e.images(supersample, jpeg_quality, renderer) for e in chunk]
            batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in batch.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                out = generate(
                    model, **inputs, max_new_tokens=max_new_tokens, do_sample=False, tokenizer=processor,
                    **schemas,
                )  # fmt: skip
            new = out[:, inputs["input_ids"].shape[1] :]
            answers += [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = old_side
    return answers
