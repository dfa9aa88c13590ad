import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from idefics2.shapes import (
    COLORS,
    KINDS,
    QUESTION_TYPES,
    ask,
    make_dataset,
    make_example,
    normalize_answer,
    random_scene,
)


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected regions of True pixels (iterative flood fill)."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_scenes_follow_the_rules():
    rng = random.Random(1)
    for _ in range(200):
        scene = random_scene(rng)
        assert 96 <= scene.width <= 384 and 96 <= scene.height <= 384
        assert all(200 <= c <= 255 for c in scene.background)
        assert 1 <= len(scene.shapes) <= 6
        shorter = min(scene.width, scene.height)
        for i, shape in enumerate(scene.shapes):
            x0, y0, x1, y1 = shape.box
            side = x1 - x0 + 1
            assert side == y1 - y0 + 1 and side >= 14
            assert side >= min(14, round(0.12 * shorter)) and side <= max(14, round(0.24 * shorter))
            assert 0 <= x0 and x1 < scene.width and 0 <= y0 and y1 < scene.height
            assert shape.kind in KINDS
            assert all(abs(c - b) <= 20 for c, b in zip(shape.rgb, COLORS[shape.color]))
            for other in scene.shapes[i + 1 :]:
                ox0, oy0, ox1, oy1 = other.box
                assert x1 + 4 < ox0 or ox1 + 4 < x0 or y1 + 4 < oy0 or oy1 + 4 < y0


def test_rendered_pixels_show_each_shape_separately():
    rng = random.Random(2)
    for _ in range(30):
        scene = random_scene(rng)
        pixels = np.asarray(scene.render(), dtype=np.int16)
        foreground = np.abs(pixels - np.array(scene.background)).max(axis=-1) > 0
        assert _components(foreground) == len(scene.shapes)
        for shape in scene.shapes:
            x0, y0, x1, y1 = shape.box
            # the lower middle of the box is inside every kind (a triangle points up)
            inside = pixels[(y0 + 3 * y1) // 4, (x0 + x1) // 2]
            assert tuple(inside) == shape.rgb


def test_answers_agree_with_the_scene():
    rng = random.Random(3)
    for qtype in QUESTION_TYPES:
        for _ in range(40):
            ex = make_example(rng, qtype)
            words = ex.question.rstrip("?").split()
            scene = ex.scenes[0]
            if qtype == "count_all":
                assert ex.answer == str(len(scene.shapes))
            elif qtype == "count_color":
                assert ex.answer == str(sum(s.color == words[2] for s in scene.shapes))
            elif qtype == "count_kind":
                assert ex.answer == str(sum(s.kind + "s" == words[2] for s in scene.shapes))
            elif qtype == "color_of_kind":
                (match,) = [s for s in scene.shapes if s.kind == words[-1]]
                assert ex.answer == match.color
            elif qtype == "kind_of_color":
                (match,) = [s for s in scene.shapes if s.color == words[-2]]
                assert ex.answer == match.kind
            elif qtype == "exists":
                present = any(s.color == words[-2] and s.kind == words[-1] for s in scene.shapes)
                assert ex.answer == ("yes" if present else "no")
            else:
                first, second = (len(s.shapes) for s in ex.scenes)
                assert first != second and ex.answer == ("first" if first > second else "second")


def test_dataset_is_reproducible_and_balanced():
    a, b = make_dataset(30, seed=7), make_dataset(30, seed=7)
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert Counter(e.qtype for e in a) == {q: 30 for q in QUESTION_TYPES}
    exists = Counter(e.answer for e in a if e.qtype == "exists")
    assert exists["yes"] > 5 and exists["no"] > 5
    messages = a[-1].messages(with_answer=True)
    assert [part["type"] for part in messages[0]["content"]] == ["image", "image", "text"]
    assert messages[1]["content"][0]["text"] == a[-1].answer


def test_unknown_question_type_is_rejected():
    with pytest.raises(ValueError, match="unknown question type"):
        make_example(random.Random(0), "colour")


def test_ask_follows_the_scene_and_refuses_inapplicable_types():
    rng = random.Random(4)
    scene = random_scene(rng, 1)
    (only,) = scene.shapes
    assert ask(rng, scene, "count_all") == ("How many shapes are there?", "1")
    assert ask(rng, scene, "color_of_kind") == (f"What color is the {only.kind}?", only.color)
    assert ask(rng, scene, "kind_of_color") == (f"What shape is the {only.color} one?", only.kind)
    for _ in range(50):
        scene = random_scene(rng)
        duplicated_kinds = all(scene.count(kind=k) != 1 for k in KINDS)
        if duplicated_kinds:
            assert ask(rng, scene, "color_of_kind") is None
    with pytest.raises(ValueError):
        ask(rng, scene, "compare")


def test_box_supersampling_antialiases_edges():
    scene = random_scene(random.Random(5), 3)
    aliased = np.asarray(scene.render(), dtype=np.int16)
    for resample in (Image.Resampling.BOX, Image.Resampling.LANCZOS):
        smooth = np.asarray(scene.render(4, resample=resample), dtype=np.int16)
        assert smooth.shape == aliased.shape
        assert len(np.unique(smooth.reshape(-1, 3), axis=0)) > len(np.unique(aliased.reshape(-1, 3), axis=0))
        for shape in scene.shapes:  # shape centres keep their colour
            x0, y0, x1, y1 = shape.box
            centre = smooth[(y0 + 3 * y1) // 4, (x0 + x1) // 2]
            assert np.abs(centre - np.array(shape.rgb)).max() <= 2


def test_analytic_renderer_draws_the_same_scene_independently():
    rng = random.Random(6)
    for _ in range(20):
        scene = random_scene(rng)
        pil = np.asarray(scene.render(), dtype=np.int16)
        analytic = np.asarray(scene.render_analytic(), dtype=np.int16)
        assert analytic.shape == pil.shape
        for shape in scene.shapes:
            x0, y0, x1, y1 = shape.box
            assert tuple(analytic[(y0 + 3 * y1) // 4, (x0 + x1) // 2]) == shape.rgb
            assert tuple(analytic[y0 - 2, x0] if y0 >= 2 else analytic[y1 + 2, x1]) == scene.background
        differ = np.abs(analytic - pil).max(axis=-1) > 40
        shapes_area = sum((x1 - x0 + 1) * (y1 - y0 + 1) for x0, y0, x1, y1 in (s.box for s in scene.shapes))
        assert differ.sum() < 0.15 * shapes_area  # other pixels only along the outlines
        if any(shape.kind != "square" for shape in scene.shapes):  # square edges lie on pixel boundaries
            colors = len(np.unique(analytic.reshape(-1, 3), axis=0))
            assert colors > len(np.unique(pil.reshape(-1, 3), axis=0))  # soft edges


def test_examples_render_with_either_renderer():
    example = make_example(random.Random(1), "compare")
    for renderer in ("pil", "analytic"):
        images = example.images(renderer=renderer, jpeg_quality=50)
        assert [im.size for im in images] == [(s.width, s.height) for s in example.scenes]
    with pytest.raises(ValueError, match="renderer must be one of"):
        example.images(renderer="cairo")


def test_answers_are_normalized_before_comparison():
    assert normalize_answer(" Green.") == "green"
    assert normalize_answer("3\n") == "3"
