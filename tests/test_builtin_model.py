"""The built-in demo model: a complete checkpoint our loaders read, and it answers shapes questions."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from idefics2.assets import builtin_model_dir
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.pipelines import ChatPipeline
from idefics2.processing import Idefics2Processor
from idefics2.shapes import QUESTION_TYPES, evaluate, make_dataset
from oracle_processing import IDEFICS2_CHAT_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
FRESH_SEED = 20261127  # used neither in training (seed 1234) nor in the held-out evaluation (seed 777)


@pytest.fixture(scope="module")
def builtin():
    folder = builtin_model_dir()
    model = Idefics2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = Idefics2Processor.from_pretrained(folder)
    return model, processor


def test_folder_is_a_complete_small_checkpoint():
    folder = builtin_model_dir()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                 "chat_template.jinja"):  # fmt: skip
        assert (folder / name).is_file(), name
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "idefics2"


def test_tokenizer_has_the_idefics2_tokens_and_chat_template(builtin):
    model, processor = builtin
    tok = processor.tokenizer
    names = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")
    ids = [tok.convert_tokens_to_ids(t) for t in names]
    assert len(set(ids)) == 3 and all(i is not None and i < model.config.text_config.vocab_size for i in ids)
    assert (tok.fake_image_token_id, tok.image_token_id, tok.end_of_utterance_token_id) == tuple(ids)
    assert model.config.image_token_id == tok.image_token_id
    for token, token_id in zip(names, ids):
        assert tok.encode(token, add_special_tokens=False) == [token_id]  # never split into pieces
    for token in ("<unk>", "<s>", "</s>", "<pad>"):
        assert tok.convert_tokens_to_ids(token) is not None
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert processor.chat_template == IDEFICS2_CHAT_TEMPLATE
    text = "How many red triangles are there?"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.fixture(scope="module")
def fresh_scores(builtin):
    model, processor = builtin
    return evaluate(model, processor, make_dataset(20, FRESH_SEED), batch_size=70)


def test_accuracy_on_fresh_questions(fresh_scores):
    # 140 questions never seen in training or in the held-out evaluation, 20 of each type
    assert fresh_scores["overall"] >= 0.88, fresh_scores
    assert all(fresh_scores[q] >= 0.8 for q in QUESTION_TYPES), fresh_scores


def test_answers_use_the_image(fresh_scores):
    # The best image-blind strategy answers each type with its most frequent answer (estimated on other
    # questions); the model must clearly beat it on the fresh questions.
    reference = make_dataset(200, FRESH_SEED + 10)
    majority = {
        q: Counter(e.answer for e in reference if e.qtype == q).most_common(1)[0][0] for q in QUESTION_TYPES
    }
    examples = make_dataset(20, FRESH_SEED)
    blind = sum(e.answer == majority[e.qtype] for e in examples) / len(examples)
    assert set(fresh_scores) == {*QUESTION_TYPES, "overall"}
    assert fresh_scores["overall"] >= blind + 0.1, (fresh_scores, blind)


def test_evaluate_accepts_a_pipeline_and_checks_its_input(builtin):
    model, processor = builtin
    examples = make_dataset(1, FRESH_SEED + 1)
    assert evaluate(ChatPipeline(model, processor), examples=examples) == evaluate(model, processor, examples)
    with pytest.raises(ValueError):
        evaluate(model, processor, [])
    with pytest.raises(ValueError):
        evaluate(model)
    with pytest.raises(ValueError):
        evaluate(model, processor, examples, batch_size=0)


def test_example_image_is_answered_correctly(builtin):
    # examples/shapes.png (drawn by scripts/build_builtin_model.py), checked by eye: on a light blue canvas a
    # green circle (left), a purple triangle, an orange square (top right) and a yellow square (bottom right).
    model, processor = builtin
    image = Image.open(REPO / "examples" / "shapes.png").convert("RGB")
    chat = ChatPipeline(model, processor)
    assert chat.chat("How many shapes are there?", images=[image]) == "4"
    assert chat.chat("What color is the circle?", images=[image]) == "green"
    assert chat.chat("How many squares are there?", images=[image]) == "2"
    assert chat.chat("What shape is the purple one?", images=[image]) == "triangle"
    assert chat.chat("Is there any yellow square?", images=[image]) == "yes"
    assert chat.chat("Is there any blue square?", images=[image]) == "no"


def test_runs_in_bfloat16(builtin):
    model, processor = builtin
    folder = builtin_model_dir()
    half = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    examples = make_dataset(4, FRESH_SEED + 2)
    full = evaluate(model, processor, examples)["overall"]
    assert abs(evaluate(half, processor, examples)["overall"] - full) <= 0.25


def test_transformers_reads_it_as_an_idefics2_checkpoint(builtin):
    from transformers import Idefics2ForConditionalGeneration as Reference

    model, processor = builtin
    folder = builtin_model_dir()
    reference = Reference.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    example = make_dataset(1, FRESH_SEED + 3)[-1]  # the two-image question
    prompt = processor.apply_chat_template(example.messages(), add_generation_prompt=True)
    inputs = processor(text=prompt, images=[example.images()], return_tensors="pt")
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = reference.eval()(**inputs).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
