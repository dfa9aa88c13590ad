"""`idefics2 train` from the data layer's inputs: a DocVQA-shaped Parquet (--columns) and a cauldron-shaped
`datasets` folder give the same batches (tokens, labels, pixels) as the equivalent JSONL chat file with image
files, decode no image before a batch needs it, and train from the command line."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from idefics2 import Idefics2Processor
from idefics2.assets import builtin_model_dir
from idefics2.cli import main
from idefics2.data import read_rows
from idefics2.training import ChatCollator, ChatDataset, RowsDataset, read_jsonl

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]
QUESTIONS = ["What colour is it?", "Is there a circle?", "What shape?"]
ANSWERS = ["red", "no", "square"]


def png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_data")
    table = pa.table({
        "image": [{"bytes": png(c), "path": None} for c in COLOURS],
        "query": [{"en": q} for q in QUESTIONS],
        "answers": [[a, a.upper()] for a in ANSWERS],
    })  # fmt: skip
    pq.write_table(table, folder / "docvqa.parquet", row_group_size=2)
    lines = []
    for k, (colour, question, answer) in enumerate(zip(COLOURS, QUESTIONS, ANSWERS)):
        (folder / f"{k}.png").write_bytes(png(colour))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]  # fmt: skip
        lines.append(json.dumps({"messages": messages, "images": [f"{k}.png"]}))
    (folder / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def collator():
    return ChatCollator(Idefics2Processor.from_pretrained(builtin_model_dir()))


def test_parquet_rows_give_the_batches_of_the_same_jsonl(inputs, collator, monkeypatch):
    import idefics2.data.rows as rows_module

    decoded = []
    load_image = rows_module.load_image
    monkeypatch.setattr(rows_module, "load_image", lambda *a: decoded.append(1) or load_image(*a))
    rows = read_rows(inputs / "docvqa.parquet", columns="prompt=query.en,image=image", decode_images=False)
    streamed = RowsDataset(rows, collator)
    assert len(streamed) == 3 and decoded == []  # the texts are encoded without decoding an image
    reference = ChatDataset(read_jsonl(inputs / "chat.jsonl"), collator)
    order = [2, 0, 1]  # random access, across row groups
    got = collator([streamed[i] for i in order])
    expected = collator([reference[i] for i in order])
    assert len(decoded) == 3
    assert set(got) == set(expected) == {"input_ids", "attention_mask", "labels", "pixel_values",
                                         "pixel_attention_mask"}  # fmt: skip
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    learned = got["labels"][0][got["labels"][0] != -100]
    assert collator.tokenizer.decode(learned.tolist()) == " square<end_of_utterance>"  # only the answer


def test_train_from_a_cauldron_folder_and_a_docvqa_parquet(inputs, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}],
    })  # fmt: skip
    texts = [[{"user": q, "assistant": a, "source": "s"}] for q, a in zip(QUESTIONS, ANSWERS)]
    images = [[Image.new("RGB", (40, 32), c)] for c in COLOURS]
    cauldron = datasets.Dataset.from_dict({"images": images, "texts": texts}, features=features)
    datasets.DatasetDict({"train": cauldron, "test": cauldron.select([0])}).save_to_disk(
        tmp_path / "cauldron"
    )
    flags = ["--max-steps", "2", "--batch-size", "2", "--no-progress", "--lora-rank", "2"]
    saved = str(tmp_path / "cauldron")
    argv = ["train", "--data", saved, "--split", "train", "--eval-data", saved, "--eval-split", "test",
            "--output", str(tmp_path / "a"), *flags]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "3 rows, layout cauldron (texts, images)" in err and "1 rows, layout cauldron" in err
    assert (tmp_path / "a" / "adapter_config.json").is_file()

    argv = ["train", "--data", str(inputs / "docvqa.parquet"), "--columns", "prompt=query.en,image=image",
            "--output", str(tmp_path / "b"), *flags]  # fmt: skip
    assert main(argv) == 0 and (tmp_path / "b" / "adapter_config.json").is_file()
    capsys.readouterr()

    pq.write_table(pa.table({"question": ["Why?"], "image": [{"bytes": png(COLOURS[0]), "path": None}]}),
                   tmp_path / "unanswered.parquet")  # fmt: skip
    code = main(
        ["train", "--data", str(tmp_path / "unanswered.parquet"), "--output", str(tmp_path / "c"), *flags]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "error: row 0: no assistant message" in err
    assert "as layout question/answer (question, image)" in err
