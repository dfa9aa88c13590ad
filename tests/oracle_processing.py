"""Reference (transformers) Idefics2 processor on the real Mistral-7B vocabulary, for tests only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# The chat template of the HuggingFaceM4/idefics2-8b hub repository (processor_config.json).
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
}


def mistral_sentencepiece_model() -> Path:
    """The Mistral-7B v1 SentencePiece model shipped inside the mistral_common package (or the file named by
    $MISTRAL_TOKENIZER_MODEL, for machines without that package)."""
    if os.environ.get("MISTRAL_TOKENIZER_MODEL"):
        return Path(os.environ["MISTRAL_TOKENIZER_MODEL"])
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def build_reference_tokenizer(folder: str | Path):
    """transformers' Llama tokenizer on the Mistral-7B vocabulary, converted from SentencePiece."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mistral_sentencepiece_model(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA_TOKENIZER_CONFIG))
    return AutoTokenizer.from_pretrained(folder)


def reference_processor(
    folder: str | Path,
    *,
    image_seq_len: int = 64,
    do_image_splitting: bool = False,
    longest_edge: int = 980,
    shortest_edge: int = 378,
    chat_template: str | None = IDEFICS2_CHAT_TEMPLATE,
):
    """An in-memory transformers Idefics2Processor (PIL image processor) built in `folder`."""
    from transformers import Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tokenizer = build_reference_tokenizer(Path(folder) / "_tokenizer_source")
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=do_image_splitting,
        size={"longest_edge": longest_edge, "shortest_edge": shortest_edge},
    )
    return Idefics2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=chat_template,
    )


def build_reference_processor(
    folder: str | Path,
    *,
    image_seq_len: int = 64,
    do_image_splitting: bool = False,
    longest_edge: int = 980,
    shortest_edge: int = 378,
    chat_template: str | None = IDEFICS2_CHAT_TEMPLATE,
) -> Path:
    """Save transformers' Idefics2Processor (transformers-5 layout) into `folder` and return the folder.

    Token ids 32000, 32001 and 32002 are `<fake_token_around_image>`, `<image>` and `<end_of_utterance>`.
    """
    folder = Path(folder)
    processor = reference_processor(
        folder,
        image_seq_len=image_seq_len,
        do_image_splitting=do_image_splitting,
        longest_edge=longest_edge,
        shortest_edge=shortest_edge,
        chat_template=chat_template,
    )
    processor.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer_source")
    return folder
