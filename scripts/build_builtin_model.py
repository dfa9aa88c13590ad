"""Build the built-in demo model (src/idefics2/assets/builtin) from scratch, reproducibly from a seed.

Steps: train a small byte-level BPE tokenizer on the shapes world's text, build the processor (images squeezed
to 128 x 128: a shape keeps >= 12% of the image along the canvas's shorter side), initialise a small Idefics2,
pre-train its vision tower alone (stage 1), train the whole model with `idefics2.training.train` (stage 2) on
freshly drawn, augmented shapes questions (each example is drawn from the seed and its index, so a resumed run
sees exactly the same data), teach it to answer in JSON when asked (stage 3), evaluate it on 700 held-out
questions (100 per type) in four render styles and in JSON, and export the checkpoint folder.

    python scripts/build_builtin_model.py --work-dir RUN            # train (resumes after an interruption)
    python scripts/build_builtin_model.py --work-dir RUN --device cuda --workers 14   # the same on a GPU
    python scripts/build_builtin_model.py --work-dir RUN --export   # evaluate + write the assets
    python scripts/build_builtin_model.py --work-dir RUN --json-from FOLDER   # stage 3 only, from an export

Recipe (the defaults):
- stage 1: the vision tower (patch 8: 256 patches per image) with a linear read-out on each patch learns
  which of the 18 (colour, kind) pairs an image holds, from the maximum over its patches: 1200 steps of 64
  images, AdamW lr 2e-3, cosine. A from-scratch Idefics2 never learns shape kinds through the long path image
  -> perceiver -> decoder (measured: its loss on "What shape is the red one?" stays at ln 3 for 400 steps,
  and the previous 12000-step recipe scored at the blind baseline on the three kind questions); started from
  this tower it learns them in a few hundred steps.
- stage 2: 8000 steps of 48 rows (a row: one image with 1-4 questions, or a two-image comparison; half of the
  one-image rows also end with a dense "List the shapes." turn that names every shape's colour and kind),
  AdamW lr 1e-3 (eps 1e-12), 200 warmup steps then cosine decay, bf16 autocast.
- stage 3 (JSON answers, for structured output): from the stage-2 weights, 60% of the questions start with
  "Answer in JSON." and are answered with one JSON object (`idefics2.shapes.json_answer`, e.g.
  {"color": "green"}); vision tower frozen, rows of 48, 50 warmup steps then cosine decay, in JSON_PHASES:
  450 steps at lr 8e-4, then 400 at 4e-4 from the result. Without it, decoding under a schema gives valid JSON
  with the wrong value most of the time (measured: 30 of 80 colour and count questions right): the model had
  never seen JSON around an answer. After the first phase the JSON answers were right 82.3% of the time
  (colours 40%: their tokens inside JSON strings are not the " green" the model answers with), after the
  second 93.9% (colours 100%). A first try (600 steps, lr 3e-4, the instruction after the question, vision
  trained) learned the format but put the right value in only 54% of the answers.

Cost of the shipped run: stage 1 took 10.5 minutes on this project's 2-core x86 CPU (avx512_bf16, two
threads, ~1.9 steps/s). Stage 2 ran steps 0-750 on that CPU (~1.2 steps/s, 11 minutes), steps 750-2750 on one
H100 (resumed from the CPU checkpoint with --device cuda --workers 13: 2000 steps in 3.5 minutes, bound by
drawing the data), and steps 2750-8000 on the CPU again (~1.3 steps/s, ~67 minutes): 384k rows, about 1M
questions. All on the CPU it takes about 1 h 55 min. Stage 3 took 24 + 7 minutes on that CPU (shared with
other jobs; ~60 rows/s when quiet). Export and evaluation take about 2 minutes. A resumed run sees the same
data and schedule; the float rounding of a rerun (and of another device) is not bit-identical.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from idefics2.config import Idefics2Config
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing import Idefics2ImageProcessor, Idefics2Processor, Idefics2Tokenizer
from idefics2.shapes import (
    COLORS,
    JSON_INSTRUCTION,
    KINDS,
    ask,
    evaluate,
    json_answer,
    make_dataset,
    make_example,
    random_scene,
)
from idefics2.training import ChatCollator, TrainingArguments, normalize_example, train

REPO = Path(__file__).resolve().parents[1]
ASSET_DIR = REPO / "src" / "idefics2" / "assets" / "builtin"
SEED = 1234
EVAL_SEED = 777  # the 700 held-out questions
IMAGE_SIDE = 128
PATCH = 8
IMAGE_SEQ_LEN = 16
# The chat template of HuggingFaceM4/idefics2-8b.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
]
VOCAB_SIZE = 512
# How often each question type is drawn: the binding questions (colour <-> kind) are the hardest.
TYPE_WEIGHTS = {
    "count_all": 1.0,
    "count_color": 1.0,
    "count_kind": 1.0,
    "color_of_kind": 1.4,
    "kind_of_color": 1.4,
    "exists": 1.4,
    "compare": 0.6,
}
TEXT_WIDTH = 160
MODEL_CONFIG = {
    "model_type": "idefics2",
    "architectures": ["Idefics2ForConditionalGeneration"],
    "image_token_id": 5,
    "tie_word_embeddings": False,
    "use_cache": True,
    "torch_dtype": "float32",
    "vision_config": {
        "model_type": "idefics2_vision",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_channels": 3,
        "image_size": IMAGE_SIDE,
        "patch_size": PATCH,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "initializer_range": 0.02,
    },
    "perceiver_config": {
        "model_type": "idefics2_perceiver",
        "hidden_act": "silu",
        "hidden_size": TEXT_WIDTH,
        "rms_norm_eps": 1e-6,
        "resampler_n_latents": IMAGE_SEQ_LEN,
        "resampler_depth": 2,
        "resampler_n_heads": 4,
        "resampler_head_dim": 40,
        "num_key_value_heads": 2,
        "initializer_range": 0.02,
    },
    "text_config": {
        "model_type": "mistral",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 3,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_theta": 10000.0,
        "sliding_window": None,
    },
}
JSON_FRACTION = 0.6  # stage 3: the share of questions asking for a JSON answer
# Stage 3 runs in phases, each from the weights of the one before: (steps, peak learning rate).
JSON_PHASES = ((450, 8e-4), (400, 4e-4))
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 6], "pad_token_id": 3, "max_new_tokens": 8}


# ----------------------------------------------------------------------------------------------- processor
def corpus(seed: int) -> list[str]:
    """Text for the tokenizer: every question wording and answer, as the chat template writes them."""
    texts = ["User:", "Assistant:", "\n", "Which image has more shapes, the first or the second?"]
    texts += ["How many shapes are there?", " first", " second", " yes", " no"]
    texts += [f" {n}" for n in range(10)]
    for color in COLORS:
        texts += [f"How many {color} shapes are there?", f"What shape is the {color} one?", f" {color}"]
        texts += [f"Is there any {color} {kind}?" for kind in KINDS]
    for kind in KINDS:
        texts += [f"How many {kind}s are there?", f"What color is the {kind}?", f" {kind}"]
    texts += [" " + t for t in texts if t.endswith("?")]
    rng = random.Random(seed)
    return [t for _ in range(20) for t in rng.sample(texts, len(texts))]


def build_processor(seed: int) -> Idefics2Processor:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(seed), trainer)
    if backend.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"the tokenizer has {backend.get_vocab_size()} tokens, more than {VOCAB_SIZE}")
    tokenizer = Idefics2Tokenizer(
        backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        model_max_length=512,
    )
    size = {"shortest_edge": IMAGE_SIDE, "longest_edge": IMAGE_SIDE}  # every image becomes 128 x 128
    image_processor = Idefics2ImageProcessor.from_dict({"size": size, "do_image_splitting": False})
    return Idefics2Processor(
        image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE
    )


# ----------------------------------------------------------------------------------------------- data
def augmented_render(scene, rng: random.Random) -> Image.Image:
    """The scene drawn in a random style: aliased or anti-aliased (box or Lanczos filter), maybe JPEG."""
    style = rng.random()
    if style < 0.4:
        image = scene.render()
    elif style < 0.85:
        image = scene.render(rng.choice((2, 3, 4)), resample=Image.Resampling.BOX)
    else:
        image = scene.render(2)
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(25, 95))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def to_pixels(image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
    """The processor's resize (PIL bilinear to 128 x 128) as uint8 (3, H, W); with `rng`, small colour noise
    (a shift of each channel and per-pixel noise) is added half of the time."""
    resized = np.asarray(image.resize((IMAGE_SIDE, IMAGE_SIDE), resample=Image.Resampling.BILINEAR))
    if rng is not None and rng.random() < 0.5:
        nrng = np.random.default_rng(rng.getrandbits(32))
        noisy = resized + nrng.uniform(-8, 8, size=3) + nrng.normal(0.0, rng.uniform(1.0, 5.0), resized.shape)
        resized = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return torch.from_numpy(resized.copy()).permute(2, 0, 1)


def describe(scene) -> tuple[str, str]:
    """A dense auxiliary turn (training only): every shape's colour and kind, from left to right."""
    shapes = sorted(scene.shapes, key=lambda s: (s.box[0], s.box[1]))
    return "List the shapes.", ", ".join(f"{s.color} {s.kind}" for s in shapes)


class ShapesStream(torch.utils.data.Dataset):
    """Example i is drawn from (seed, i): fresh data at every step, identical after a resume.

    A one-image example asks 1 to 4 questions of different types about the same scene, one per user turn (the
    image is encoded once for all of them); a two-image example asks the comparison question. With
    `json_fraction`, that share of the questions ask for a JSON answer (stage 3).
    """

    def __init__(
        self,
        processor: Idefics2Processor,
        length: int,
        seed: int,
        describe_from: int | None = None,
        json_fraction: float = 0.0,
    ):
        self.collator = ChatCollator(processor)
        self.length, self.seed, self.describe_from = length, seed, describe_from
        self.json_fraction = json_fraction
        self.types = [t for t in TYPE_WEIGHTS if t != "compare"]
        self.cache: dict[tuple, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return self.length

    def encode(self, turns: list[tuple[str, str]], images: list) -> tuple[list[int], list[int]]:
        key = (tuple(turns), len(images))
        if key not in self.cache:
            messages = []
            for k, (question, answer) in enumerate(turns):
                parts = [{"type": "image"} for _ in images] if k == 0 else []
                messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            enc = self.collator.encode(normalize_example({"messages": messages, "images": images}))
            if len(self.cache) > 200_000:
                self.cache.clear()
            self.cache[key] = (enc.input_ids, enc.labels)
        return self.cache[key]

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        total = sum(TYPE_WEIGHTS.values())
        if rng.random() < TYPE_WEIGHTS["compare"] / total:
            example = make_example(rng, "compare")
            scenes = example.scenes
            turns = [self.maybe_json(rng, "compare", example.question, example.answer)]
        else:
            scenes = [random_scene(rng)]
            wanted, turns = rng.randint(1, 4), []
            types = list(self.types)
            while types and len(turns) < wanted:
                qtype = rng.choices(types, [TYPE_WEIGHTS[t] for t in types])[0]
                types.remove(qtype)
                qa = ask(rng, scenes[0], qtype)
                if qa is not None:
                    turns.append(self.maybe_json(rng, qtype, *qa))
            if not turns:
                turns.append(ask(rng, scenes[0], "count_all"))
            if self.describe_from is not None and index >= self.describe_from and rng.random() < 0.5:
                turns.append(describe(scenes[0]))  # last, so no question can read its answer from it
        images = [augmented_render(scene, rng) for scene in scenes]
        ids, labels = self.encode(turns, images)
        return {"ids": ids, "labels": labels, "pixels": torch.stack([to_pixels(im, rng) for im in images])}

    def maybe_json(self, rng: random.Random, qtype: str, question: str, answer: str) -> tuple[str, str]:
        """The turn as asked: plain, or (json_fraction of the time) asking for and answering in JSON."""
        if self.json_fraction and rng.random() < self.json_fraction:
            return f"{JSON_INSTRUCTION} {question}", json_answer(qtype, answer)
        return question, answer


def collate(items: list[dict], pad_id: int = 3) -> dict[str, torch.Tensor]:
    length = max(len(it["ids"]) for it in items)
    n_images = max(len(it["pixels"]) for it in items)
    b = len(items)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    pixel_values = torch.zeros((b, n_images, 3, IMAGE_SIDE, IMAGE_SIDE))
    pixel_attention_mask = torch.zeros((b, n_images, IMAGE_SIDE, IMAGE_SIDE), dtype=torch.long)
    for row, it in enumerate(items):
        n, k = len(it["ids"]), len(it["pixels"])
        input_ids[row, :n] = torch.tensor(it["ids"])
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(it["labels"])
        # the processor's rescale (1/255) and normalisation (mean 0.5, std 0.5)
        pixel_values[row, :k] = it["pixels"].float() / 127.5 - 1.0
        pixel_attention_mask[row, :k] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "pixel_attention_mask": pixel_attention_mask,
    }


def check_pixels_match_processor(processor: Idefics2Processor) -> None:
    """The training pixels must be exactly what the processor gives at inference."""
    rng = random.Random(0)
    for _ in range(4):
        image = augmented_render(make_example(rng, "count_all").scenes[0], rng)
        ours = collate([{"ids": [1], "labels": [-100], "pixels": to_pixels(image)[None]}])["pixel_values"]
        theirs = processor.image_processor([[image]], return_tensors="pt")["pixel_values"]
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-5):
            raise RuntimeError("training pixels differ from the processor's")


class Prefetched(torch.utils.data.Dataset):
    """`data` read in index order by worker processes ahead of the trainer (it reads in order: shuffle is
    off); a jump (a resume) restarts the workers' stream at the asked index."""

    def __init__(self, data: torch.utils.data.Dataset, workers: int):
        global _PREFETCHED
        _PREFETCHED = data
        self.length = len(data)
        self.pool = multiprocessing.get_context("fork").Pool(
            workers, initializer=torch.set_num_threads, initargs=(1,)
        )
        self.next, self.stream = -1, iter(())

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if index != self.next:
            self.stream = self.pool.imap(_prefetched_item, range(index, self.length), chunksize=8)
        self.next = index + 1
        return {
            k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in next(self.stream).items()
        }


_PREFETCHED: torch.utils.data.Dataset | None = None


def _prefetched_item(index: int) -> dict:
    # numpy, not torch: torch would pass every tensor through a shared-memory file descriptor
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in _PREFETCHED[index].items()}


# ----------------------------------------------------------------------------------------------- stage 1
def pair_targets(scene) -> torch.Tensor:
    """(18,) 1.0 where the scene holds a shape of that (colour, kind) pair."""
    colors = list(COLORS)
    target = torch.zeros(len(colors) * len(KINDS))
    for shape in scene.shapes:
        target[colors.index(shape.color) * len(KINDS) + KINDS.index(shape.kind)] = 1.0
    return target


class PairStream(torch.utils.data.Dataset):
    """Stage-1 data: an augmented scene and which (colour, kind) pairs it holds, drawn from (seed, index)."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_033 + index)
        scene = random_scene(rng)
        return {"pixels": to_pixels(augmented_render(scene, rng), rng), "target": pair_targets(scene)}


def pretrain_vision(
    work_dir: Path, steps: int, batch_size: int, lr: float, device: str, workers: int
) -> Path:
    """Stage 1: train the vision tower alone to say which (colour, kind) pairs an image holds, from the
    maximum over its patches of a linear read-out (so each patch's features must name the shape under it).

    Measured: a from-scratch Idefics2 never learns shape kinds through the long path image -> perceiver ->
    decoder (its loss on "What shape is the {color} one?" stays at ln 3), while a vision tower trained like
    this lets the whole model learn that question in ~200 steps. Returns the saved tower's file.
    """
    from safetensors.torch import save_file

    out = work_dir / "vision" / "vision_model.safetensors"
    if out.exists():
        return out
    data = PairStream(steps * batch_size, SEED + 1)
    if workers:  # forked before any CUDA work
        data = Prefetched(data, workers)
    torch.manual_seed(SEED)
    vision = build_model(SEED).model.vision_model.to(device).train()
    head = torch.nn.Linear(MODEL_CONFIG["vision_config"]["hidden_size"], len(COLORS) * len(KINDS)).to(device)
    params = [*vision.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-12, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    grid = IMAGE_SIDE // PATCH
    mask = torch.ones(batch_size, grid, grid, dtype=torch.bool, device=device)
    t0, seen, hits = time.time(), 0, 0.0
    for step in range(steps):
        items = [data[step * batch_size + i] for i in range(batch_size)]
        pixels = torch.stack([it["pixels"] for it in items]).to(device).float() / 127.5 - 1.0
        target = torch.stack([it["target"] for it in items]).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            features = vision(pixels, mask)  # (batch * grid * grid, hidden)
            logits = head(features).float().view(batch_size, grid * grid, -1).amax(dim=1)  # (batch, 18)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seen += batch_size
        hits += float(((logits > 0) == (target > 0.5)).all(dim=1).sum())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            print(
                f"vision step {step + 1}/{steps}: loss {loss.item():.4f}, images exactly right "
                f"{hits / seen:.3f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
            seen, hits = 0, 0.0
    if isinstance(data, Prefetched):
        data.pool.terminate()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in vision.state_dict().items()}, str(out))
    return out


# ----------------------------------------------------------------------------------------------- model
def build_model(seed: int) -> Idefics2ForConditionalGeneration:
    """Random init that makes the model look at the image: the linear layers of the vision encoder and the
    connector, and the query/key projections of every attention (decoder included), get std fan_in^-1/2
    instead of 0.02; the perceiver latents are unit-scale, different from each other.

    With the small default weights every attention starts uniform, the perceiver's output barely depends on
    the image, and the decoder first learns the answer frequencies; suppressing the image "noise" then
    collapses the perceiver onto its latents and the gradient into the vision encoder dies out (measured:
    no use of the image after 1000+ steps). With this init the image is used within 250 steps.
    """
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(MODEL_CONFIG))
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.normal_(0.0, 1.0)
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if "vision_model" in name or "connector" in name:
                module.weight.normal_(0.0, module.in_features**-0.5)
            if name.endswith(("self_attn.q_proj", "self_attn.k_proj")):
                module.weight.normal_(0.0, module.in_features**-0.5)
    model.generation_config = dict(GENERATION_CONFIG)
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- run
def training_arguments(
    output_dir: Path, max_steps: int, batch_size: int, lr: float, warmup_steps: int = 200
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=0.01,
        adam_betas=(0.9, 0.98),
        adam_eps=1e-12,  # keeps Adam scale-free for the small gradients that reach the vision encoder
        scheduler="cosine",
        warmup_steps=warmup_steps,
        max_grad_norm=1.0,
        mixed_precision="bf16",  # autocast: ~2x faster than float32 on this CPU (avx512_bf16)
        shuffle=False,  # the data is drawn from (seed, index) anyway
        seed=SEED,
        save_steps=250,
        save_total_limit=2,
        logging_steps=25,
    )


def run_training(
    work_dir: Path,
    max_steps: int,
    batch_size: int,
    lr: float,
    describe_from_step: int | None,
    vision_steps: int,
    device: str,
    workers: int,
) -> None:
    from safetensors.torch import load_file

    processor = build_processor(SEED)
    check_pixels_match_processor(processor)
    t0 = time.time()
    describe_from = None if describe_from_step is None else describe_from_step * batch_size
    data = ShapesStream(processor, max_steps * batch_size, SEED, describe_from)
    vision_file = pretrain_vision(work_dir, vision_steps, 64, 2e-3, device, workers) if vision_steps else None
    if workers:
        data = Prefetched(data, workers)
    model = build_model(SEED)
    if vision_file is not None:
        model.model.vision_model.load_state_dict(load_file(str(vision_file)))
    print(f"parameters: {parameter_count(model):,}", flush=True)
    args = training_arguments(work_dir / "train", max_steps, batch_size, lr)
    resume = any((work_dir / "train").glob("checkpoint-*/trainer_state.json"))
    train(model, data, collate, args, resume_from=True if resume else None, device=device)
    if isinstance(data, Prefetched):
        data.pool.terminate()
    print(f"training done in {time.time() - t0:.0f} s (this session)", flush=True)


def train_json_answers(
    work_dir: Path,
    start: Path,
    phases: tuple[tuple[int, float], ...],
    batch_size: int,
    device: str,
    workers: int,
) -> None:
    """Stage 3: from the stage-2 weights (`start`, a model.safetensors), learn to answer in JSON when a
    question starts with JSON_INSTRUCTION (JSON_FRACTION of the questions), keeping the plain answers. Each
    (steps, lr) phase starts from the previous one's weights and writes work_dir/json<k>."""
    from safetensors.torch import load_file

    processor = build_processor(SEED)
    for k, (steps, lr) in enumerate(phases, start=1):
        t0 = time.time()
        out = work_dir / f"json{k}"
        data = ShapesStream(
            processor, steps * batch_size, SEED + 2, describe_from=0, json_fraction=JSON_FRACTION
        )
        if workers:
            data = Prefetched(data, workers)
        model = build_model(SEED)
        model.load_state_dict(load_file(str(start)), strict=True)
        model.model.vision_model.requires_grad_(False)  # a language skill: the vision tower stays as it is
        args = training_arguments(out, steps, batch_size, lr, warmup_steps=50)
        resume = any(out.glob("checkpoint-*/trainer_state.json"))
        train(model, data, collate, args, resume_from=True if resume else None, device=device)
        if isinstance(data, Prefetched):
            data.pool.terminate()
        print(f"stage 3 phase {k} (JSON answers) done in {time.time() - t0:.0f} s (this session)", flush=True)
        start = out / "model.safetensors"


def load_trained(work_dir: Path, checkpoint: str | None) -> Idefics2ForConditionalGeneration:
    from safetensors.torch import load_file

    model = build_model(SEED)
    phases = sorted(work_dir.glob("json*/model.safetensors"), key=lambda p: int(p.parent.name[4:] or 0))
    stage = phases[-1].parent if phases else work_dir / "train"  # the last stage run
    folder = stage / checkpoint if checkpoint else stage
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


RENDER_STYLES = {
    "plain": {},
    "antialiased": {"supersample": 4},
    "jpeg": {"jpeg_quality": 40},
    "analytic": {"renderer": "analytic"},  # a second renderer, never seen in training
}


def run_eval(model, processor, num_per_type: int, seed: int, batch_size: int = 50) -> dict:
    examples = make_dataset(num_per_type, seed)
    results = {}
    for style, options in RENDER_STYLES.items():
        t0 = time.time()
        results[style] = evaluate(model, processor, examples, batch_size=batch_size, **options)
        line = " ".join(f"{k}={v:.3f}" for k, v in results[style].items())
        print(f"[{style}] {line} ({time.time() - t0:.0f} s)", flush=True)
    t0 = time.time()  # the same questions asking for JSON, under each type's schema (stage 3)
    results["json"] = evaluate(model, processor, examples, batch_size=batch_size, structured=True)
    line = " ".join(f"{k}={v:.3f}" for k, v in results["json"].items())
    print(f"[json, constrained] {line} ({time.time() - t0:.0f} s)", flush=True)
    return results


def export(work_dir: Path, checkpoint: str | None, out_dir: Path, eval_per_type: int = 100) -> None:
    """Write the checkpoint folder, then evaluate it as users load it (our loaders, from the folder)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    load_trained(work_dir, checkpoint).save_pretrained(out_dir)
    build_processor(SEED).save_pretrained(out_dir)
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "additional_special_tokens": SPECIAL_TOKENS[4:],
            },
            indent=2,
        )
        + "\n"
    )
    model = Idefics2ForConditionalGeneration.from_pretrained(out_dir).eval()
    processor = Idefics2Processor.from_pretrained(out_dir)
    results = run_eval(model, processor, eval_per_type, EVAL_SEED)
    (out_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"exported to {out_dir}", flush=True)
    write_example(model, processor, REPO / "examples" / "shapes.png")


EXAMPLE_QUESTIONS = (
    "How many shapes are there?",
    "What color is the circle?",
    "Is there any blue square?",
)


def write_example(model, processor, path: Path) -> None:
    """Save examples/shapes.png and print the model's answers to the README's questions."""
    from idefics2.pipelines import ChatPipeline

    rng = random.Random(SEED)
    while True:  # a landscape canvas with four shapes, one of them a circle
        scene = random_scene(rng, 4)
        if scene.width >= 1.25 * scene.height >= 250 and scene.count(kind="circle") == 1:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    scene.render().save(path)
    chat = ChatPipeline(model, processor)
    image = Image.open(path).convert("RGB")
    truth = {
        EXAMPLE_QUESTIONS[0]: str(len(scene.shapes)),
        EXAMPLE_QUESTIONS[1]: next(s.color for s in scene.shapes if s.kind == "circle"),
        EXAMPLE_QUESTIONS[2]: "yes" if scene.count(color="blue", kind="square") else "no",
    }
    for question, answer in truth.items():
        print(f"{path.name}: {question} -> {chat.chat(question, images=[image])!r} (truth {answer!r})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="checkpoints and logs of the run")
    parser.add_argument("--max-steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--describe-from-step", type=int, default=0, help="from this step on, add 'List the shapes.' turns"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 if other jobs share the cores)"
    )
    parser.add_argument(
        "--export", action="store_true", help="evaluate the trained model and write the assets"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="with --export: a checkpoint-N folder instead of the end"
    )
    parser.add_argument(
        "--vision-steps",
        type=int,
        default=1200,
        help="stage 1: steps of 64 images (0: no vision pre-training)",
    )
    parser.add_argument("--no-json", action="store_true", help="stop after stage 2 (no JSON answers)")
    parser.add_argument(
        "--json-steps", type=int, help="stage 3 as one phase of this many steps instead of JSON_PHASES"
    )
    parser.add_argument("--json-lr", type=float, default=4e-4, help="with --json-steps: its learning rate")
    parser.add_argument(
        "--json-from",
        type=Path,
        default=None,
        help="run only stage 3, from the model.safetensors in this folder (e.g. a stage-2 export)",
    )
    parser.add_argument("--device", default="cpu", help="where to train: cpu or cuda")
    parser.add_argument("--workers", type=int, default=0, help="processes that draw the data ahead")
    parser.add_argument("--out-dir", type=Path, default=ASSET_DIR)
    parser.add_argument("--eval-per-type", type=int, default=100, help="held-out questions of each type")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    phases = ((args.json_steps, args.json_lr),) if args.json_steps else JSON_PHASES
    if args.export:
        export(args.work_dir, args.checkpoint, args.out_dir, args.eval_per_type)
    elif args.json_from is not None:
        start = args.json_from / "model.safetensors"
        train_json_answers(args.work_dir, start, phases, args.batch_size, args.device, args.workers)
    else:
        run_training(
            args.work_dir,
            args.max_steps,
            args.batch_size,
            args.lr,
            args.describe_from_step,
            args.vision_steps,
            args.device,
            args.workers,
        )
        if not args.no_json:
            start = args.work_dir / "train" / "model.safetensors"
            train_json_answers(args.work_dir, start, phases, args.batch_size, args.device, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
