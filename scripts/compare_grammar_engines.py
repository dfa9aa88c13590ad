"""Compare grammar engines for structured output on this machine: llguidance, xgrammar, outlines-core.

For each engine and vocabulary (the built-in model's 382-token byte-level BPE, and the real 32k Mistral-7B
SentencePiece vocabulary of idefics2-8b, built as the tests build it from mistral-common), it measures: the
one-time preparation of the tokenizer, the compilation of each grammar, and the CPU time of one token mask
(the set of tokens allowed next) at every step of a realistic answer, one thread. Only llguidance is a
dependency of the package; install the others somewhere else first, so they do not touch the environment:

    pip install --no-deps --target /tmp/engines/xgrammar xgrammar apache-tvm-ffi
    pip install --no-deps --target /tmp/engines/outlines outlines-core
    PYTHONPATH=src:tests:/tmp/engines/xgrammar:/tmp/engines/outlines python scripts/compare_grammar_engines.py

(xgrammar also needs transformers and pydantic, which the test environment has; it imports transformers
when it is imported.) Engines that are not importable are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES_SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue", "yellow", "purple", "orange"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["color", "count"],
    "additionalProperties": False,
}
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 60},
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number", "minimum": 0},
                },
                "required": ["name", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "total": {"type": "number"},
        "paid": {"type": "boolean"},
    },
    "required": ["vendor", "date", "items", "total", "paid"],
    "additionalProperties": False,
}
WORKLOADS = {
    "shapes schema": ("json", SHAPES_SCHEMA, {"color": "green", "count": 2}),
    "invoice schema": (
        "json",
        INVOICE_SCHEMA,
        {
            "vendor": "Acme Office Supplies Ltd.",
            "date": "2024-03-18",
            "items": [
                {"name": "Printer paper, A4, 500 sheets", "quantity": 4, "price": 5.49},
                {"name": "Blue ballpoint pens (box of 50)", "quantity": 1, "price": 12.9},
            ],
            "total": 34.86,
            "paid": True,
        },
    ),
    "regex (date)": ("regex", r"\d{4}-\d{2}-\d{2}", "2024-03-18"),
}


def vocabularies() -> dict[str, object]:
    from idefics2.assets import builtin_model_dir
    from idefics2.processing import Idefics2Tokenizer
    from oracle_processing import build_reference_processor

    folder = Path(tempfile.mkdtemp()) / "mistral"
    build_reference_processor(folder)
    return {
        "built-in (382, byte-level BPE)": Idefics2Tokenizer.from_pretrained(builtin_model_dir()),
        "Mistral-7B (32003, SentencePiece)": Idefics2Tokenizer.from_pretrained(folder),
    }


def answer_tokens(tokenizer, text: str) -> list[int]:
    """Our tokenizer's tokens for `text` as the start of an answer (no SentencePiece leading space)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    first = tokenizer.id_to_token(ids[0])
    if first.startswith("▁"):  # Metaspace adds a space before the first word: spell it without
        rest = tokenizer.token_to_id(first[1:])
        ids[:1] = (
            [rest]
            if rest is not None
            else [tokenizer.token_to_id(f"<0x{b:02X}>") for b in first[1:].encode()]
        )
    return ids


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token stands for (outlines-core takes the vocabulary in that form)."""
    config = json.loads(tokenizer.backend.to_str())
    vocab = tokenizer.get_vocab()
    by_id = [b""] * len(tokenizer)
    byte_level = "ByteLevel" in json.dumps(config.get("pre_tokenizer"))
    if byte_level:  # GPT-2's printable stand-ins for the 256 byte values
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        chars = {chr(b): b for b in printable}
        extra = 0
        for b in range(256):
            if b not in printable:
                chars[chr(256 + extra)] = b
                extra += 1
    for token, i in vocab.items():
        if byte_level:
            by_id[i] = bytes(chars[c] for c in token) if all(c in chars for c in token) else token.encode()
        elif token.startswith("<0x") and len(token) == 6:
            by_id[i] = bytes([int(token[3:5], 16)])
        else:
            by_id[i] = token.replace("▁", " ").encode()
    return by_id


# ------------------------------------------------------------------------------------------------ engines
class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer):
        import llguidance

        self.llg = llguidance
        self.table = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=[tokenizer.eos_token_id])
        self.words = np.zeros((self.table.vocab_size + 31) // 32, dtype=np.uint32)

    def compile(self, kind, spec):
        m = self.llg.LLMatcher
        grammar = m.grammar_from_json_schema(spec) if kind == "json" else m.grammar_from_regex(spec)
        matcher = m(self.table, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def start(self, compiled):
        return compiled.deep_copy()

    def mask(self, state):
        state.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)

    def advance(self, state, token):
        assert state.consume_token(token), state.get_error()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer):
        import torch
        import xgrammar

        self.xgr = xgrammar
        backend = tokenizer.backend.to_str()
        meta = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend)
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        self.info = xgrammar.TokenizerInfo(
            [t for t, _ in vocab],
            meta["vocab_type"],
            vocab_size=len(tokenizer),
            stop_token_ids=[tokenizer.eos_token_id],
            add_prefix_space=meta["add_prefix_space"],
        )
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.bitmask = xgrammar.allocate_token_bitmask(1, self.info.vocab_size)
        self.torch = torch

    def compile(self, kind, spec):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
        return self.compiler.compile_regex(spec)

    def start(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, state):
        state.fill_next_token_bitmask(self.bitmask)

    def advance(self, state, token):
        assert state.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer):
        import outlines_core

        self.oc = outlines_core
        eos = tokenizer.eos_token_id
        special = set(tokenizer.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        for i, piece in enumerate(token_bytes(tokenizer)):
            if i not in special:
                tokens.setdefault(piece, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)
        self.words = np.zeros((len(tokenizer) + 31) // 32, dtype=np.int32)

    def compile(self, kind, spec):
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(spec)) if kind == "json" else spec
        return self.oc.Index(regex, self.vocabulary)

    def start(self, compiled):
        return self.oc.Guide(compiled)

    def mask(self, state):
        state.write_mask_into(self.words.ctypes.data, self.words.size, 4)

    def advance(self, state, token):
        state.advance(token)


ENGINES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def answer_text(kind, value) -> str:
    return json.dumps(value) if kind == "json" else value


def measure(engine_cls, tokenizer, repeats: int) -> dict:
    t0 = time.perf_counter()
    engine = engine_cls(tokenizer)
    result = {"tokenizer_s": time.perf_counter() - t0}
    for name, (kind, spec, value) in WORKLOADS.items():
        t0 = time.perf_counter()
        compiled = engine.compile(kind, spec)
        compile_s = time.perf_counter() - t0
        tokens = answer_tokens(tokenizer, answer_text(kind, value))
        steps = []
        for _ in range(repeats):
            state = engine.start(compiled)
            for token in tokens:
                t0 = time.perf_counter()
                engine.mask(state)
                steps.append(time.perf_counter() - t0)
                engine.advance(state, token)
        result[name] = {
            "compile_ms": 1e3 * compile_s,
            "tokens": len(tokens),
            "mask_us_median": 1e6 * statistics.median(steps),
            "mask_us_mean": 1e6 * statistics.fmean(steps),
            "mask_us_max": 1e6 * max(steps),
        }
    return result


def package_size_mb(distribution: str) -> float | None:
    from importlib import metadata

    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    return sum(f.locate().stat().st_size for f in files if f.locate().is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="passes over each answer")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results: dict = {"sizes_mb": {}}
    for dist in ("llguidance", "xgrammar", "apache-tvm-ffi", "triton", "outlines_core"):
        results["sizes_mb"][dist] = package_size_mb(dist)
    print(
        "installed size (MB):",
        {k: None if v is None else round(v, 1) for k, v in results["sizes_mb"].items()},
    )
    for vocab_name, tokenizer in vocabularies().items():
        for engine_name, engine_cls in ENGINES.items():
            try:
                measured = measure(engine_cls, tokenizer, args.repeats)
            except ImportError as error:
                print(f"{engine_name}: not installed ({error})")
                continue
            results.setdefault(vocab_name, {})[engine_name] = measured
            print(f"\n{vocab_name} / {engine_name}: tokenizer prepared in {measured['tokenizer_s']:.3f} s")
            for workload in WORKLOADS:
                m = measured[workload]
                print(
                    f"  {workload:15s} compile {m['compile_ms']:8.1f} ms; mask per token over {m['tokens']} "
                    f"tokens: median {m['mask_us_median']:7.1f} us, mean {m['mask_us_mean']:7.1f} us, "
                    f"max {m['mask_us_max']:8.1f} us"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
