"""Generated comparison cases: our Idefics2Processor against transformers' (PIL image processor) on the real
Mistral-7B vocabulary.

Each case is a batch of prompts (unicode, emoji, chat templates, 0-4 images per sample, adjacent images,
images first or last) with images of many sizes, PIL modes and input types. Most cases use small resize
settings so the suite stays fast; a few use the default 378/980 sizes with 1 px and ~3000 px sides.
Checks: identical input_ids, attention_mask and pixel_attention_mask, pixel_values within 1e-6 (pil
backend), and the torch backend within the documented tolerance.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from idefics2 import Idefics2Processor
from oracle_processing import IDEFICS2_CHAT_TEMPLATE, build_reference_tokenizer

N_GENERATED = 210
SMALL = {"longest_edge": 64, "shortest_edge": 20}
TINY = {"longest_edge": 40, "shortest_edge": 12}
DEFAULT = {"longest_edge": 980, "shortest_edge": 378}
CONFIGS = {
    "seq64": {"image_seq_len": 64, "do_image_splitting": False, "size": SMALL},
    "seq64-split": {"image_seq_len": 64, "do_image_splitting": True, "size": SMALL},
    "seq7": {"image_seq_len": 7, "do_image_splitting": False, "size": TINY},
    "seq7-split": {"image_seq_len": 7, "do_image_splitting": True, "size": TINY},
    "default": {"image_seq_len": 64, "do_image_splitting": False, "size": DEFAULT},
    "default-split": {"image_seq_len": 64, "do_image_splitting": True, "size": DEFAULT},
}
MODES = [
    "RGB",
    "RGBA",
    "L",
    "LA",
    "P",
    "P+transparency",
    "PA",
    "1",
    "CMYK",
    "YCbCr",
    "HSV",
    "I",
    "I;16",
    "F",
    "RGBa",
    "LAB",
]
INPUT_KINDS = ["pil"] * 6 + ["numpy-hwc", "numpy-chw", "torch-chw", "png-file", "exif-jpeg"]
WORDS = [
    "Hello",
    "world",
    "naïve café",
    "日本語のテキスト",
    "🎉",
    "emoji 👍🏽 here",
    "x",
    "42",
    "\n",
    "  ",
    "Ωmega",
    "über-Straße",
    "—",
    "a.b,c",
    "?",
    "What is in the picture",
    "<end_of_utterance>",
    "tab\there",
    "مرحبا",
    "Привет",
    "\u200b",
    "!!",
]
TOLERANCE_TORCH_MEAN, TOLERANCE_TORCH_MAX = 0.01, 0.1
# Channels-first arrays whose last side is 1, 3 or 4 px are ambiguous: read as channels-first, with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:image array of shape")


@dataclass
class ImageSpec:
    height: int
    width: int
    mode: str
    kind: str
    seed: int

    def describe(self) -> str:
        return f"{self.width}x{self.height}/{self.mode}/{self.kind}"


@dataclass
class Case:
    name: str
    config: str
    texts: list[str] | None = None
    conversations: list | None = None
    add_generation_prompt: bool = False
    images: list[list[ImageSpec]] = field(default_factory=list)
    flat_images: bool = False
    padding: object = True
    padding_side: str | None = None


def random_text(rng: np.random.Generator, n_images: int) -> str:
    words = list(rng.choice(WORDS, size=int(rng.integers(0, 6))))
    slots = sorted(rng.integers(0, len(words) + 1, size=n_images).tolist())
    pieces: list[str] = []
    for i in range(len(words) + 1):
        pieces.extend(["<image>"] * slots.count(i))
        if i < len(words):
            pieces.append(str(words[i]))
    separators = ["", " ", " ", "\n"]
    text = ""
    for piece in pieces:
        text += piece + separators[int(rng.integers(0, len(separators)))]
    return text if text.strip() or n_images else "plain text"


def random_size(rng: np.random.Generator, minimum: int) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.6:
        height, width = rng.integers(1, 97, size=2)
    elif kind < 0.8:
        short, long = int(rng.integers(1, 4)), int(rng.integers(50, 301))
        height, width = (short, long) if rng.random() < 0.5 else (long, short)
    else:
        height, width = rng.integers(97, 201, size=2)
    return max(int(height), minimum), max(int(width), minimum)


def random_conversation(rng: np.random.Generator, n_images: int) -> list[dict]:
    conversation = []
    if rng.random() < 0.5:
        conversation.append({"role": "system", "content": [{"type": "text", "text": "You are helpful. 🤖"}]})
    turns = int(rng.integers(1, 4))
    images_left = n_images
    for turn in range(turns):
        content = []
        n_here = images_left if turn == turns - 1 else int(rng.integers(0, images_left + 1))
        images_left -= n_here
        parts = [{"type": "image"}] * n_here + [{"type": "text", "text": str(rng.choice(WORDS[:16]))}]
        order = rng.permutation(len(parts))
        content = [parts[i] for i in order]
        conversation.append({"role": "user", "content": content})
        if turn < turns - 1:
            conversation.append({"role": "assistant", "content": [{"type": "text", "text": "Sure — ok."}]})
    return conversation


def generated_case(index: int) -> Case:
    rng = np.random.default_rng(1000 + index)
    config = ["seq64", "seq64-split", "seq7", "seq7-split"][index % 4]
    minimum = 2 if config.endswith("split") else 1
    n_samples = int(rng.integers(1, 4))
    counts = [int(rng.choice([0, 1, 1, 2, 2, 3, 4])) for _ in range(n_samples)]
    case = Case(name=f"case{index:03d}-{config}", config=config)
    if index % 5 == 0:
        case.conversations = [random_conversation(rng, n) for n in counts]
        case.add_generation_prompt = bool(rng.random() < 0.5)
    else:
        case.texts = [random_text(rng, n) for n in counts]
    for count in counts:
        sample = []
        for _ in range(count):
            kind = str(rng.choice(INPUT_KINDS))
            mode = str(rng.choice(MODES)) if kind == "pil" else "RGB"
            height, width = random_size(rng, minimum)
            if kind == "exif-jpeg":
                height, width = max(height, 8), max(width, 8)
            if kind == "numpy-hwc" and height in (1, 3, 4):
                kind = "numpy-chw"  # an (H, W, 3) array with H in (1, 3, 4) reads as channels-first
            sample.append(ImageSpec(height, width, mode, kind, int(rng.integers(0, 2**31))))
        case.images.append(sample)
    case.flat_images = bool(rng.random() < 0.5)
    case.padding = [True, "longest", True, False][int(rng.integers(0, 4))] if n_samples > 1 else False
    case.padding_side = ["left", "right", None][int(rng.integers(0, 3))]
    return case


def special_cases() -> list[Case]:
    """Default sizes: 1 px sides, ~3000 px sides, several images, splitting."""
    spec = lambda h, w, mode="RGB", kind="pil", seed=0: ImageSpec(h, w, mode, kind, seed)
    return [
        Case("default-1x1", "default", ["<image>one pixel"], images=[[spec(1, 1)]]),
        Case("default-1x700", "default", ["a <image>"], images=[[spec(1, 700, "L")]]),
        Case(
            "default-3000x20",
            "default",
            ["<image><image>"],
            images=[[spec(3000, 20), spec(20, 3000, "RGBA")]],
        ),
        Case("default-2999x2001", "default", ["big <image> photo"], images=[[spec(2999, 2001, seed=3)]]),
        Case(
            "default-batch",
            "default",
            ["<image> first", "second <image><image> x", "none"],
            images=[[spec(400, 300, seed=1)], [spec(1000, 50, "P", seed=2), spec(80, 977, "CMYK")], []],
            padding=True,
            padding_side="right",
        ),
        Case("default-split-2x2", "default-split", ["<image>tiny"], images=[[spec(2, 2)]]),
        Case("default-split-3000x2", "default-split", ["<image>"], images=[[spec(3000, 2, "LA")]]),
        Case(
            "default-split-two",
            "default-split",
            ["<image>", "x<image>y"],
            images=[[spec(1200, 1500, seed=5)], [spec(500, 700, "RGBA", "pil", 6)]],
            padding="longest",
        ),
        Case(
            "default-split-chat",
            "default-split",
            conversations=[
                [
                    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "Was ist das?"}],
                    },
                ]
            ],
            add_generation_prompt=True,
            images=[[spec(700, 1100, "RGB", "numpy-hwc", 8)]],
        ),
    ]


CASES = [generated_case(i) for i in range(N_GENERATED)] + special_cases()


def make_pil(spec: ImageSpec) -> Image.Image:
    rng = np.random.default_rng(spec.seed)
    # Smooth gradients plus noise: closer to photos than pure noise, still exercising every pixel value.
    ys, xs = np.mgrid[0 : spec.height, 0 : spec.width]
    base = np.stack([(xs * 7 + ys * 3) % 256, (ys * 5) % 256, (xs * 11) % 256, (xs + ys) % 256], axis=-1)
    noise = rng.integers(0, 64, size=base.shape)
    rgba = Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGBA")
    if spec.mode == "P+transparency":
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = int(np.asarray(image)[0, 0])
        return image
    if spec.mode == "PA":
        return rgba.convert("PA")
    return rgba.convert(spec.mode)


def make_inputs(spec: ImageSpec, tmp_path) -> tuple[object, object]:
    """(what we are given, what the reference is given): the same picture in the reference's accepted form."""
    image = make_pil(spec)
    if spec.kind == "pil":
        return image, image
    array = np.asarray(image)
    if spec.kind == "numpy-hwc":
        return array, image
    if spec.kind == "numpy-chw":
        return np.ascontiguousarray(array.transpose(2, 0, 1)), image
    if spec.kind == "torch-chw":
        return torch.from_numpy(array.copy()).permute(2, 0, 1), image
    if spec.kind == "png-file":
        path = tmp_path / f"image_{spec.seed}.png"
        image.save(path)
        return path, str(path)
    # A JPEG whose EXIF orientation asks for a rotation: both sides must turn it upright.
    exif = Image.Exif()
    exif[0x0112] = int(np.random.default_rng(spec.seed).choice([3, 6, 8]))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    return loaded, loaded


@pytest.fixture(scope="module")
def reference_tokenizer(tmp_path_factory):
    return build_reference_tokenizer(tmp_path_factory.mktemp("reference_tokenizer"))


@pytest.fixture(scope="module")
def processors(reference_processor_dir, reference_tokenizer):
    """Per config: (reference, ours) built with the same options."""
    from transformers import Idefics2Processor as Reference
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    built = {}
    for name, config in CONFIGS.items():
        reference = Reference(
            image_processor=Idefics2ImageProcessorPil(
                do_image_splitting=config["do_image_splitting"], size=config["size"]
            ),
            tokenizer=reference_tokenizer,
            image_seq_len=config["image_seq_len"],
            chat_template=IDEFICS2_CHAT_TEMPLATE,
        )
        ours = Idefics2Processor.from_pretrained(reference_processor_dir, **config)
        built[name] = (reference, ours)
    return built


def as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_processor_matches_reference(case: Case, processors, tmp_path):
    reference, ours = processors[case.config]
    described = "; ".join(",".join(spec.describe() for spec in sample) or "-" for sample in case.images)
    context = f"{case.name} [images per sample: {described}]"

    if case.conversations is not None:
        texts = [
            reference.apply_chat_template(c, add_generation_prompt=case.add_generation_prompt)
            for c in case.conversations
        ]
        ours_texts = ours.apply_chat_template(
            case.conversations, add_generation_prompt=case.add_generation_prompt
        )
        assert ours_texts == texts, f"{context}: chat template output differs"
    else:
        texts = case.texts

    pairs = [[make_inputs(spec, tmp_path) for spec in sample] for sample in case.images]
    ours_images = [[p[0] for p in sample] for sample in pairs]
    reference_images = [[p[1] for p in sample] for sample in pairs]
    if not any(ours_images):
        ours_images = reference_images = None
    elif (
        case.flat_images
    ):  # ours split a flat list by the prompts' <image> counts; the reference gets it nested
        ours_images = [image for sample in ours_images for image in sample]

    kwargs = {"padding": case.padding, "return_tensors": "pt" if case.padding else None}
    if case.padding_side:
        kwargs["padding_side"] = case.padding_side
    expected = reference(text=texts, images=reference_images, **kwargs)
    actual = ours(text=texts, images=ours_images, **kwargs)

    assert sorted(actual) == sorted(expected), f"{context}: output keys differ"
    for key in ("input_ids", "attention_mask"):
        if kwargs["return_tensors"] is None:
            assert actual[key] == list(expected[key]), f"{context}: {key} differs"
        else:
            assert torch.equal(as_tensor(actual[key]), as_tensor(expected[key])), f"{context}: {key} differs"
    if ours_images is None:
        return
    want_mask, want_pixels = as_tensor(expected["pixel_attention_mask"]), as_tensor(expected["pixel_values"])
    assert torch.equal(as_tensor(actual["pixel_attention_mask"]), want_mask), f"{context}: pixel mask differs"
    pixels = as_tensor(actual["pixel_values"])
    assert pixels.shape == want_pixels.shape and pixels.dtype == torch.float32, (
        f"{context}: pixel_values shape"
    )
    diff = (pixels - want_pixels).abs().max().item()
    assert diff <= 1e-6, f"{context}: pil backend pixel_values differ by {diff}"

    fast = ours(text=texts, images=ours_images, backend="torch", **kwargs)
    assert torch.equal(as_tensor(fast["pixel_attention_mask"]), want_mask), f"{context}: torch backend mask"
    error = (as_tensor(fast["pixel_values"]) - want_pixels).abs()
    assert error.mean().item() <= TOLERANCE_TORCH_MEAN and error.max().item() <= TOLERANCE_TORCH_MAX, (
        f"{context}: torch backend off by mean {error.mean().item()}, max {error.max().item()}"
    )
