"""Captured decode graphs (of the decode core that generate and the engine share) never replay weights that
have changed, and the logits
they hand back are never a buffer that a later step overwrites. Checked on the CPU with a stand-in for CUDA
graph capture that keeps what makes a real graph stale: the replay reruns the captured step into the same
output buffer, and refuses to run once the model's parameters, buffers or modules are no longer the ones it
was captured with (a real graph would replay the old kernels on the old memory)."""

from __future__ import annotations

import itertools

import pytest
import torch

from idefics2 import Idefics2ForConditionalGeneration
from idefics2.decoding import graphs as graphs_module
from idefics2.decoding.graphs import DecodeGraphs
from idefics2.decoding.runner import ModelRunner
from idefics2.lora import LoraConfig, add_lora, load_adapter, merge_lora, save_adapter
from oracle_model import build_reference_checkpoint
from oracle_processing import build_reference_processor


def layout(model: torch.nn.Module) -> tuple:
    """What a captured graph depends on: every tensor's memory, dtype and shape, and the modules run."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return (
        tuple((name, t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for name, t in tensors),
        tuple((name, type(m).__name__, len(m._forward_hooks)) for name, m in model.named_modules()),
    )


class StandInGraph:
    def __init__(self, run, model) -> None:
        self.run, self.model, self.layout = run, model, layout(model)

    def replay(self) -> None:
        assert layout(self.model) == self.layout, "a graph replayed after the model's weights changed"
        self.output.copy_(self.run())

    def pool(self) -> None:
        return None


@pytest.fixture
def captures(monkeypatch, model):
    """Replace CUDA capture by the stand-in; the list of graphs captured so far."""
    graphs: list[StandInGraph] = []

    def capture(run, pool=None):
        graph = StandInGraph(run, model)
        graph.output = run()
        graphs.append(graph)
        return graph, graph.output

    monkeypatch.setattr(graphs_module, "capture", capture)
    return graphs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = build_reference_checkpoint(tmp_path_factory.mktemp("graphs"), seed=3)
    build_reference_processor(folder, image_seq_len=4, longest_edge=56, shortest_edge=28)
    return folder


@pytest.fixture
def model(checkpoint):
    return Idefics2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def random_lora(model, _=None) -> None:
    add_lora(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # fresh adapters are zero: make them change the logits


def state_dict_with_new_tensors(model) -> None:
    state = {k: v.clone() * 1.01 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def adapter_from_elsewhere(model, tmp_path) -> None:
    other = Idefics2ForConditionalGeneration(model.config)
    add_lora(other, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in other.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    save_adapter(other, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0), tmp_path / "adapter")
    load_adapter(model, tmp_path / "adapter")


CHANGES = {
    "add_lora": random_lora,
    "load_adapter": adapter_from_elsewhere,
    "merge_lora": lambda model, _: (random_lora(model), merge_lora(model)),
    "quantize": lambda model, _: model.quantize("int8"),
    "load_state_dict(assign=True)": lambda model, _: state_dict_with_new_tensors(model),
    "dtype move": lambda model, _: model.to(torch.float64),
}


def graphed_runner(model) -> ModelRunner:
    """A runner of 2 rows with graphs on the stand-in capture (as on CUDA), a 6-token prompt in each row."""
    runner = ModelRunner(model, rows=2, length=64)
    runner.graphs = DecodeGraphs(model, runner.decode_step, rows=2, length=64)
    torch.manual_seed(0)
    with torch.no_grad():
        for row in range(2):
            runner.prefill(row, runner.embed_prompt(torch.randint(3, 32000, (6,)).tolist(), None), 0, False)
    return runner


def eager_twin(runner: ModelRunner) -> ModelRunner:
    """A runner without graphs holding a copy of `runner`'s cache."""
    twin = ModelRunner(runner.model, runner.rows, runner.length)
    for source, target in zip(runner.cache.cache.keys + runner.cache.cache.values,
                              twin.cache.cache.keys + twin.cache.cache.values, strict=True):  # fmt: skip
        target.copy_(source)
    return twin


@pytest.mark.parametrize("change", list(CHANGES))
def test_graphs_are_dropped_when_weights_change(model, captures, change, tmp_path):
    runner = graphed_runner(model)
    with torch.no_grad():
        first = runner.decode([5, 9], [6, 6])
        kept = first.clone()
        second = runner.decode([7, 11], [6, 6])  # a replay of the same graph, other tokens
        assert len(captures) == 1
        assert torch.equal(first, kept) and not torch.equal(second, kept)  # the first logits stayed
        CHANGES[change](model, tmp_path)
        if change == "dtype move":  # the cache must follow the model (generate's pool hands out a new one)
            runner = graphed_runner(model)
        expected = eager_twin(runner).decode([5, 9], [6, 6])
        after = runner.decode([5, 9], [6, 6])  # the stand-in refuses a stale replay
    assert len(captures) == 2
    assert torch.allclose(after, expected, rtol=1e-5, atol=1e-5)
    if change != "dtype move":  # the change did change the logits
        assert not torch.allclose(after, kept, atol=1e-3)


def test_forward_is_pure_on_every_device(model):
    """The model's forward never dispatches to graphs: the same inputs give equal, fresh logits tensors."""
    ids = torch.randint(3, 32000, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_an_engine_on_stand_in_graphs_answers_as_without_and_recaptures_after_a_lora(model, captures):
    """The engine's graph path (batch-size and length buckets, placeholder rows, copies of the logits) gives
    the eager engine's tokens; after add_lora the next steps run on new graphs, and give the adapted model's
    tokens."""
    from idefics2 import Idefics2Processor
    from idefics2.serving import Engine

    processor = Idefics2Processor.from_pretrained(model.checkpoint_dir)
    prompts = ["One", "Two, a longer prompt", "Three"]

    def answers(graphs: bool) -> list[list[int]]:
        with Engine(model, processor, max_batch=4, max_length=64) as engine:
            if graphs:
                runner = engine.runner
                runner.graphs = DecodeGraphs(model, runner.decode_step, rows=4, length=64)
            handles = [engine.submit_prompt(p, max_new_tokens=6, min_new_tokens=6) for p in prompts]
            return [h.result(timeout=60).token_ids for h in handles]

    assert answers(graphs=True) == answers(graphs=False) and captures
    before = len(captures)
    random_lora(model)
    adapted = answers(graphs=True)
    assert len(captures) > before and adapted == answers(graphs=False)
