"""The chat collator: exact labels, the same inputs as transformers, padding, truncation, validation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from idefics2 import Idefics2Processor
from idefics2.training import ChatCollator, DataError, normalize_example
from oracle_processing import IDEFICS2_CHAT_TEMPLATE, build_reference_processor, reference_processor

FAKE, IMAGE, EOU = 32000, 32001, 32002
SEQ = 3  # image tokens per image in these tests


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    folder = build_reference_processor(
        tmp_path_factory.mktemp("proc"), image_seq_len=SEQ, longest_edge=56, shortest_edge=28
    )
    return Idefics2Processor.from_pretrained(folder), reference_processor(
        tmp_path_factory.mktemp("ref"), image_seq_len=SEQ, longest_edge=56, shortest_edge=28
    )


def picture(seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def conversation():
    return {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
            {"role": "assistant", "content": "A dog, sitting."},
        ],
        "images": [picture(0), picture(1, (20, 50))],
    }


def hand_labels(ids: list[int], tokens: list[str]) -> list[int]:
    """What must be learned, read off the token sequence: after each "Assistant:" prefix, everything up to
    and including the next <end_of_utterance>; nothing else."""
    labels, learning = [-100] * len(ids), False
    for k in range(len(tokens)):
        if learning:
            labels[k] = ids[k]
            if ids[k] == EOU:
                learning = False
        elif tokens[k - 2 : k + 1] == ["Ass", "istant", ":"]:
            learning = True
    return labels


def test_labels_and_inputs_of_a_multi_turn_example(processors):
    ours, ref = processors
    example = conversation()
    batch = ChatCollator(ours)([example])

    # Inputs are exactly what transformers' processor gives for the rendered conversation.
    text = ref.apply_chat_template([normalize_example(example)["messages"]][0], tokenize=False)
    expected = ref(text=text, images=[example["images"]], return_tensors="pt")
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    assert torch.allclose(batch["pixel_values"], expected["pixel_values"], atol=1e-6)
    assert batch["pixel_attention_mask"].tolist() == expected["pixel_attention_mask"].tolist()
    assert batch["attention_mask"].tolist() == [[1] * batch["input_ids"].shape[1]]

    ids = batch["input_ids"][0].tolist()
    tokens = ref.tokenizer.convert_ids_to_tokens(ids)
    labels = batch["labels"][0].tolist()
    assert labels == hand_labels(ids, tokens)
    learned = [t for t, label in zip(tokens, labels, strict=True) if label != -100]
    assert learned == [
        "▁A",
        "▁cat",
        ".",
        "<end_of_utterance>",
        "▁A",
        "▁dog",
        ",",
        "▁sitting",
        ".",
        "<end_of_utterance>",
    ]
    # Never learned: BOS, images and their markers, the system and user turns, the role prefixes.
    for k, token in enumerate(tokens):
        if ids[k] in (1, FAKE, IMAGE) or token in ("▁System", "User", "Ass", "istant", "▁What", "▁one"):
            assert labels[k] == -100, (k, token)
    assert ids.count(IMAGE) == 2 * SEQ


def test_role_words_inside_user_text_are_not_learned(processors):
    ours, _ = processors
    example = {
        "messages": [
            {"role": "user", "content": "Say: Assistant: hi<end_of_utterance>"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    batch = ChatCollator(ours)([example])
    learned = [i for i in batch["labels"][0].tolist() if i != -100]
    assert learned == ours.tokenizer.encode("ok", add_special_tokens=False)[-1:] + [EOU]


def test_right_padding_and_batches_mixing_text_and_images(processors):
    ours, _ = processors
    text_only = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    batch = ChatCollator(ours)([text_only, conversation()])
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1]
    row = batch["input_ids"][0]
    assert (row[lengths[0] :] == ours.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, lengths[0] :] == -100).all()
    assert (
        batch["attention_mask"][0, : lengths[0]].all() and not batch["attention_mask"][0, lengths[0] :].any()
    )
    # the text-only sample gets all-zero padding images, the other its two real ones
    assert batch["pixel_values"].shape[:2] == (2, 2)
    assert not batch["pixel_values"][0].any() and not batch["pixel_attention_mask"][0].any()
    assert batch["pixel_attention_mask"][1].any(dim=(1, 2)).all()
    alone = ChatCollator(ours)([text_only])
    assert set(alone) == {"input_ids", "attention_mask", "labels"}
    assert alone["labels"][0].tolist() == batch["labels"][0, : lengths[0]].tolist()


def test_truncation_never_cuts_an_image(processors):
    ours, _ = processors
    example = normalize_example(conversation())
    full = ChatCollator(ours).encode(example)
    second_image_end = max(k for k, t in enumerate(full.input_ids) if t == FAKE)

    collator = ChatCollator(ours, max_length=second_image_end + 4)  # keeps both images, cuts the last answer
    cut = collator.encode(example)
    assert cut.input_ids == full.input_ids[: second_image_end + 4]
    assert cut.labels == full.labels[: second_image_end + 4]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ChatCollator(ours, max_length=second_image_end).encode(example) is None
    assert any("image" in str(w.message) for w in caught)


def test_image_splitting_matches_the_reference(tmp_path):
    folder = build_reference_processor(
        tmp_path / "p", image_seq_len=2, do_image_splitting=True, longest_edge=56, shortest_edge=28
    )
    ours = Idefics2Processor.from_pretrained(folder)
    ref = reference_processor(
        tmp_path / "r",
        image_seq_len=2,
        do_image_splitting=True,
        longest_edge=56,
        shortest_edge=28,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    example = conversation()
    batch = ChatCollator(ours)([example])
    text = ref.apply_chat_template(normalize_example(example)["messages"], tokenize=False)
    expected = ref(text=text, images=[example["images"]], return_tensors="pt")
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    assert batch["input_ids"][0].tolist().count(IMAGE) == 2 * 5 * 2
    assert (batch["labels"][batch["input_ids"] == IMAGE] == -100).all()


@pytest.mark.parametrize(
    "example, message",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role must be one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "1 image part",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "a part must be"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "needs a string"),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "image"}]}], "images": ["/no/such.png"]},
            "file not found",
        ),
    ],
)
def test_bad_examples_are_clear_errors(example, message):
    with pytest.raises(DataError, match=message):
        normalize_example(example)


def test_a_processor_without_chat_template_gets_the_idefics2_format(tmp_path, processors):
    ours, _ = processors
    folder = tmp_path / "no_template"
    ours.save_pretrained(folder)
    bare = Idefics2Processor.from_pretrained(folder, chat_template=None)
    assert bare.chat_template is None
    with pytest.warns(UserWarning, match="no chat template"):
        collator = ChatCollator(bare)
    expected = ChatCollator(ours)([conversation()])
    got = collator([conversation()])
    assert got["input_ids"].tolist() == expected["input_ids"].tolist()
    assert got["labels"].tolist() == expected["labels"].tolist()


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    example = {
        "messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
        "images": ["notes.png"],
    }
    with pytest.raises(DataError, match="not a readable image"):
        normalize_example(example, base_dir=tmp_path)
