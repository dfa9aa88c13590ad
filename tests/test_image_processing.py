"""Idefics2ImageProcessor against transformers' Idefics2ImageProcessorPil, the torch backend's tolerance,
and clear errors for bad images."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from idefics2 import Idefics2ImageProcessor, Idefics2Processor
from idefics2.processing import DEFAULT_MAX_PIXELS

SMALL = {"longest_edge": 48, "shortest_edge": 16}


def reference_processor(**options):
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    return Idefics2ImageProcessorPil(**options)


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = np.stack([(xs * 5 + ys * (c + 1)) % 256 for c in range(channels)], axis=-1)
    jitter = np.random.default_rng(seed).integers(0, 40, size=smooth.shape)
    return ((smooth + jitter) % 256).astype(np.uint8)


def assert_matches(images, splitting=False, reference_options=None, **options):
    """Our pil backend equals the reference (run with `reference_options` on top of `options`); returns both
    outputs."""
    reference = reference_processor(do_image_splitting=splitting, **{**options, **(reference_options or {})})
    expected = reference(images, return_tensors="pt")
    actual = Idefics2ImageProcessor(do_image_splitting=splitting, **options)(images)
    assert actual["pixel_values"].dtype == torch.float32
    assert actual["pixel_values"].shape == expected["pixel_values"].shape
    assert (actual["pixel_values"] - expected["pixel_values"].float()).abs().max().item() <= 1e-6
    assert torch.equal(actual["pixel_attention_mask"], expected["pixel_attention_mask"])
    return expected, actual


def pil_in_mode(mode: str, height: int = 21, width: int = 34) -> Image.Image:
    rgba = Image.fromarray(noise(height, width, 4), "RGBA")
    if mode == "P+transparency":
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = int(np.asarray(image)[0, 0])
        return image
    return rgba.convert(mode)


@pytest.mark.parametrize(
    "mode", ["RGBA", "LA", "PA", "P+transparency", "P", "L", "1", "CMYK", "I;16", "F", "RGB"]
)
@pytest.mark.parametrize("splitting", [False, True])
def test_pil_modes_composited_like_reference(mode, splitting):
    assert_matches([[pil_in_mode(mode), pil_in_mode(mode, 40, 9)]], splitting=splitting, size=SMALL)


ARRAYS = {
    "hwc-uint8": lambda: noise(20, 30),
    "chw-uint8": lambda: noise(20, 30).transpose(2, 0, 1).copy(),
    "hwc-rgba-uint8": lambda: noise(20, 30, 4),
    "chw-rgba-float": lambda: (noise(20, 30, 4).transpose(2, 0, 1) / 255.0).astype(np.float32),
    "hwc-float-0-1": lambda: (noise(20, 30) / 255.0).astype(np.float32),
    "hwc-float-integers": lambda: noise(20, 30).astype(np.float64),
    "hwc-gray-1-channel": lambda: noise(20, 30, 1),
    "torch-chw-uint8": lambda: torch.from_numpy(noise(20, 30).transpose(2, 0, 1).copy()),
    "torch-hwc-float": lambda: torch.from_numpy((noise(20, 30) / 255.0).astype(np.float32)),
}


# float arrays in [0, 1] are read as already scaled: transformers gives the same only with do_rescale=False
# (with do_rescale=True it scales them a second time, to a near-black image)
UNIT_RANGE = {"chw-rgba-float", "hwc-float-0-1", "torch-hwc-float"}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_arrays_and_tensors_like_reference(name):
    reference_options = {"do_rescale": False} if name in UNIT_RANGE else None
    assert_matches([[ARRAYS[name]()]], size=SMALL, reference_options=reference_options)
    assert_matches([[ARRAYS[name]()]], splitting=True, size=SMALL, reference_options=reference_options)


@pytest.mark.parametrize("backend", ["pil", "torch"])
@pytest.mark.parametrize("do_resize", [True, False])
@pytest.mark.filterwarnings("error")
def test_float_images_in_unit_range_read_as_already_scaled(backend, do_resize):
    levels = noise(24, 18)
    as_uint8 = Idefics2ImageProcessor(size=SMALL, backend=backend, do_resize=do_resize)([[levels]])
    unit = Idefics2ImageProcessor(size=SMALL, backend=backend, do_resize=do_resize)([[levels / 255.0]])
    difference = (unit["pixel_values"] - as_uint8["pixel_values"]).abs().max().item()
    assert difference <= 2 / 255 * 2  # one 8-bit level (quantization), in normalized units (std 0.5)
    assert unit["pixel_values"].max().item() > 0  # a real image, not the near-black double rescale (< -0.99)


@pytest.mark.filterwarnings("error")
def test_float_images_in_unit_range_without_rescale():
    assert_matches([[(noise(8, 9) / 255.0).astype(np.float32)]], do_rescale=False, size=SMALL)


def test_batched_array_is_one_sample():
    batch = np.stack([noise(12, 17, seed=s) for s in range(3)])  # (3, H, W, C)
    _, actual = assert_matches(batch, size=SMALL)
    assert actual["pixel_values"].shape[:2] == (1, 3)


@pytest.mark.parametrize(
    "options",
    [
        {"do_resize": False},
        {"do_rescale": False},
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},
        {
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
        {"rescale_factor": 1 / 127.5, "image_mean": 0.2, "image_std": 0.7},
        {"size": {"height": 30, "width": 17}},
        {"size": {"longest_edge": 25, "shortest_edge": 25}},
        {"resample": PIL.Image.Resampling.BICUBIC},
        {"resample": PIL.Image.Resampling.NEAREST},
        {"resample": PIL.Image.Resampling.LANCZOS},
    ],
    ids=lambda options: ",".join(options),
)
@pytest.mark.parametrize("splitting", [False, True])
def test_options_like_reference(options, splitting):
    options = {"size": SMALL, **options}
    images = [
        [Image.fromarray(noise(33, 47)), Image.fromarray(noise(60, 10, seed=1))],
        [Image.fromarray(noise(5, 5))],
    ]
    assert_matches(images, splitting=splitting, **options)


def test_float_pixels_without_resize_like_reference():
    assert_matches([[noise(7, 3).astype(np.float64) * 1.0]], do_resize=False)
    unit = [[(noise(10, 14) / 255.0).astype(np.float32)]]
    assert_matches(unit, do_resize=False, reference_options={"do_rescale": False})


def test_no_padding_gives_per_image_arrays():
    images = [[Image.fromarray(noise(30, 20)), Image.fromarray(noise(20, 41))]]
    expected = reference_processor(do_pad=False, size=SMALL)(images)["pixel_values"]
    actual = Idefics2ImageProcessor(do_pad=False, size=SMALL)(images, return_tensors="np")["pixel_values"]
    assert [[a.shape for a in sample] for sample in actual] == [
        [e.shape for e in sample] for sample in expected
    ]
    for got, want in zip(actual[0], expected[0]):
        np.testing.assert_array_equal(got, want)


def test_resize_rule_by_hand():
    processor = Idefics2ImageProcessor()  # shortest_edge 378, longest_edge 980
    sizes = {
        (1000, 2000): (490, 980),  # the long side is capped, the short one follows (rounded down)
        (3001, 1000): (980, 378),  # 980 / 3.001 = 326.56 -> 326, then raised to shortest_edge
        (10, 10): (378, 378),
        (500, 700): (500, 700),  # inside the bounds: unchanged
    }
    for (height, width), want in sizes.items():
        out = processor(np.zeros((height, width, 3), dtype=np.uint8), do_image_splitting=False)
        assert tuple(out["pixel_values"].shape[-2:]) == want


def test_padding_and_mask_by_hand():
    processor = Idefics2ImageProcessor(do_resize=False, do_normalize=False)
    white = np.full((5, 6, 3), 255, dtype=np.uint8)
    out = processor([[white], [white[:2, :4], white]])
    assert out["pixel_values"].shape == (2, 2, 3, 5, 6)
    expected_mask = np.zeros((5, 6), dtype=np.int64)
    expected_mask[:2, :4] = 1
    assert out["pixel_attention_mask"][1, 0].tolist() == expected_mask.tolist()
    assert out["pixel_values"][0, 1].abs().sum() == 0 and out["pixel_attention_mask"][0, 1].sum() == 0
    assert out["pixel_values"][1, 0, :, :2, :4].eq(1.0).all() and out["pixel_values"][1, 0, :, 2:].eq(0).all()


def photo(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(xs / (20 + 9 * c) + ys / (31 + 5 * c)) for c in range(3)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def torch_backend_error(images, reference_options=None, **options):
    expected = reference_processor(**{**options, **(reference_options or {})})(images, return_tensors="pt")
    actual = Idefics2ImageProcessor(backend="torch", **options)(images)
    assert torch.equal(actual["pixel_attention_mask"], expected["pixel_attention_mask"])
    return (actual["pixel_values"] - expected["pixel_values"]).abs()


def test_torch_backend_close_to_reference():
    images = [[photo(600, 800, 0), photo(1000, 333, 1)], [photo(250, 250, 2)]]
    for splitting in (False, True):
        error = torch_backend_error(images, do_image_splitting=splitting)
        assert error.mean().item() <= 0.01 and error.max().item() <= 0.1, (error.mean(), error.max())
    error = torch_backend_error(images, resample=PIL.Image.Resampling.BICUBIC)
    assert error.mean().item() <= 0.01 and error.max().item() <= 0.1, (error.mean(), error.max())
    unit = [[(noise(40, 30) / 255.0).astype(np.float32)]]
    error = torch_backend_error(unit, size=SMALL, reference_options={"do_rescale": False})
    assert error.max().item() <= 0.1
    error = torch_backend_error([[noise(15, 9).astype(np.float32)]], do_resize=False)
    assert error.max().item() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_backend_on_cuda():
    images = [[photo(600, 800, 0), photo(300, 500, 1)]]
    cpu = Idefics2ImageProcessor(backend="torch", do_image_splitting=True)(images)
    gpu = Idefics2ImageProcessor(backend="torch", device="cuda", do_image_splitting=True)(images)
    assert gpu["pixel_values"].device.type == "cuda"
    assert torch.equal(gpu["pixel_attention_mask"].cpu(), cpu["pixel_attention_mask"])
    error = (gpu["pixel_values"].cpu() - cpu["pixel_values"]).abs()
    assert error.mean().item() <= 0.01 and error.max().item() <= 0.1


def test_options_as_attributes():
    processor = Idefics2ImageProcessor(size=SMALL)
    assert processor.do_image_splitting is False and processor.size == SMALL
    processor.do_image_splitting = True
    assert processor.to_dict()["do_image_splitting"] is True
    assert processor(noise(10, 10))["pixel_values"].shape[1] == 5
    with pytest.raises(ValueError, match="size must hold"):
        processor.size = {"width": 3}


def test_save_and_load_both_layouts(tmp_path):
    processor = Idefics2ImageProcessor(
        do_image_splitting=True, size={"longest_edge": 500, "shortest_edge": 100}
    )
    processor.save_pretrained(tmp_path / "hub")
    assert Idefics2ImageProcessor.from_pretrained(tmp_path / "hub").to_dict() == processor.to_dict()
    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "processor_config.json").write_text(
        json.dumps({"image_processor": processor.to_dict()})
    )
    assert Idefics2ImageProcessor.from_pretrained(tmp_path / "v5").to_dict() == processor.to_dict()


# ---- bad input -----------------------------------------------------------------------------------------


def png_bytes(height: int = 8, width: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(height, width)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid PNG header announcing a huge image (the pixel data is never reached)."""
    data = png_bytes(1, 1)
    header = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + header
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


BAD_IMAGES = {
    "zero-size PIL image": (lambda tmp: Image.new("RGB", (0, 7)), "zero size"),
    "zero-size array": (lambda tmp: np.zeros((0, 5, 3), dtype=np.uint8), "zero size"),
    "text file": (lambda tmp: _write(tmp / "notes.png", b"definitely not an image"), "not a readable image"),
    "random bytes": (lambda tmp: b"\x00\x01garbage" * 10, "not a readable image"),
    "truncated PNG file": (
        lambda tmp: _write(tmp / "cut.png", png_bytes(64, 64)[:120]),
        "truncated or corrupt",
    ),
    "truncated JPEG bytes": (lambda tmp: jpeg_bytes()[: len(jpeg_bytes()) // 2], "truncated or corrupt"),
    "missing file": (lambda tmp: str(tmp / "nope.jpg"), "does not exist"),
    "decompression bomb": (lambda tmp: png_claiming_size(30000, 30000), "too large|above the limit"),
    "NaN pixels": (lambda tmp: np.full((5, 5, 3), np.nan, dtype=np.float32), "NaN"),
    "float out of range": (lambda tmp: np.full((5, 5, 3), 3.5, dtype=np.float32), "must lie in"),
    "integers out of range": (lambda tmp: np.full((5, 5, 3), 300, dtype=np.int32), "must lie in"),
    "2 channels": (lambda tmp: np.zeros((5, 6, 2), dtype=np.uint8), "channel axis"),
    "5-d array": (lambda tmp: np.zeros((1, 1, 5, 6, 3), dtype=np.uint8), "images must be|dimensions"),
    "not an image": (lambda tmp: {"pixels": 1}, "images must be"),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
@pytest.mark.parametrize("backend", ["pil", "torch"])
def test_bad_images_raise_value_error(name, backend, tmp_path):
    make, message = BAD_IMAGES[name]
    with pytest.raises(ValueError, match=message):
        Idefics2ImageProcessor(backend=backend, size=SMALL)(make(tmp_path))


def test_pixel_limit_is_configurable(tmp_path):
    assert DEFAULT_MAX_PIXELS == PIL.Image.MAX_IMAGE_PIXELS
    image = Image.fromarray(noise(20, 30))
    with pytest.raises(ValueError, match="600 pixels, above the limit of 599"):
        Idefics2ImageProcessor(max_pixels=599)(image)
    with pytest.raises(ValueError, match="above the limit"):
        Idefics2ImageProcessor(max_pixels=599)(_write(tmp_path / "a.png", png_bytes(20, 30)))
    assert Idefics2ImageProcessor(max_pixels=600, size=SMALL)(image)["pixel_values"].shape[1] == 1
    assert Idefics2ImageProcessor(max_pixels=None, size=SMALL)(image)["pixel_values"].shape[1] == 1


def test_splitting_a_one_pixel_side_is_refused():
    with pytest.raises(ValueError, match="cannot be split"):
        Idefics2ImageProcessor(do_image_splitting=True)(
            np.zeros((1, 50, 3), dtype=np.uint8).transpose(2, 0, 1)
        )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"backend": "opencv"}, "backend"),
        ({"size": {"longest_edge": 10}}, "size must hold"),
        ({"bogus_option": 1}, "unknown image processor option"),
        ({"backend": "torch", "resample": PIL.Image.Resampling.LANCZOS}, "torch backend supports resample"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Idefics2ImageProcessor(**kwargs)


def test_bad_call_arguments():
    processor = Idefics2ImageProcessor(size=SMALL)
    image = noise(5, 5)
    with pytest.raises(ValueError, match="return_tensors"):
        processor(image, return_tensors="tf")
    with pytest.raises(ValueError, match="pil backend runs on the CPU"):
        processor(image, device="cuda")
    with pytest.raises(ValueError, match="mean needs 3 values"):
        processor(image, image_mean=[0.5, 0.5])


def test_processor_bad_input_names_the_sample(reference_processor_dir, tmp_path):
    processor = Idefics2Processor.from_pretrained(reference_processor_dir, size=SMALL)
    image = Image.fromarray(noise(10, 10))
    with pytest.raises(ValueError, match=r"sample 1: its text has 2 <image> token\(s\) but 1 image\(s\)"):
        processor(text=["<image>a", "<image><image>b"], images=[[image], [image]])
    with pytest.raises(ValueError, match=r"hold 3 <image> token\(s\) in all \(\[1, 2\] per sample\) but 2"):
        processor(text=["<image>a", "<image><image>b"], images=[image, image])
    with pytest.raises(ValueError, match="got 1 prompt"):
        processor(text="<image>", images=[[image], [image]])
    with pytest.raises(ValueError, match="sample 0, image 1: .*not a readable image"):
        processor(text="<image><image>", images=[image, _write(tmp_path / "x.jpg", b"nope")])
    with pytest.raises(ValueError, match="text must be"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="give text, images or both"):
        processor()
    limited = Idefics2Processor.from_pretrained(reference_processor_dir, max_pixels=50)
    with pytest.raises(ValueError, match="above the limit of 50"):
        limited(text="<image>", images=image)
