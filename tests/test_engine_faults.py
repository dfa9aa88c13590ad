"""Faults injected at every stage of the engine's iteration: a fault that belongs to one request fails that
request alone; any other kills the engine loudly (every request ends with EngineDeadError, submit raises it);
a hung step trips the watchdog. In no case does a handle wait forever (every wait here has a timeout)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from idefics2 import pipeline
from idefics2.serving import Engine, EngineDeadError, RequestFailedError
from idefics2.serving import engine as engine_module

SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
WAIT_S = 30  # far longer than any of these requests takes; reaching it is the failure


@pytest.fixture(scope="module")
def builtin():
    return pipeline()


class Fault(RuntimeError):
    pass


def inject(monkeypatch, target, name: str, armed: threading.Event) -> None:
    """Make target.name raise Fault once `armed` is set."""
    real = getattr(target, name)

    def faulty(*args, **kwargs):
        if armed.is_set():
            raise Fault(f"injected into {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, faulty)


# stage -> (what to patch on the engine, whether the fault kills the engine)
STAGES = {
    "admission": (lambda engine: engine.scheduler, "admit", True),
    "image encoding": (lambda engine: engine.runner, "image_features", False),
    "prefill, whole prompts": (lambda engine: engine.runner, "prefill_whole", False),
    "prefill, chunks": (lambda engine: engine.runner, "prefill", False),
    "decode": (lambda engine: engine.runner, "decode", False),
    "sampling": (lambda engine: engine_module, "sample_rows", False),
    "row moves": (lambda engine: engine.runner, "move_row", True),
    "retirement": (lambda engine: engine.scheduler, "remove", True),
}


def submit_mixed(engine: Engine) -> list:
    """Four requests on two rows: with an image, a long text prompt (prefilled in chunks), sampled ones,
    and different lengths, so that rows finish out of order (a row move) and requests wait for rows (the last
    two start while the first two decode). A request refused because the engine has died already is its
    EngineDeadError in the list."""
    requests = [
        ("What color is the circle?", [SHAPES], {"max_new_tokens": 3, "min_new_tokens": 3}),
        ("Long " * 40, [], {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": True, "seed": 1}),
        ("Third", [SHAPES], {"max_new_tokens": 5, "min_new_tokens": 5}),
        ("Fourth, longer " * 12, [], {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": True}),
    ]
    handles = []
    for prompt, images, controls in requests:
        try:
            handles.append(engine.submit(prompt, images=images, **controls))
        except EngineDeadError as error:
            handles.append(error)
    return handles


def outcomes(handles) -> list[str]:
    """'ok', 'failed' or 'dead' per handle; TimeoutError (the test fails) if any waits past WAIT_S."""
    results = []
    for handle in handles:
        try:
            if isinstance(handle, EngineDeadError):
                raise handle
            handle.result(timeout=WAIT_S)
            results.append("ok")
        except EngineDeadError:
            results.append("dead")
        except RequestFailedError:
            results.append("failed")
    return results


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("when", ["from the start", "while decoding"])
def test_a_fault_at_any_stage_ends_every_request(builtin, monkeypatch, stage, when):
    where, name, deadly = STAGES[stage]
    armed = threading.Event()
    # no image cache: the later requests' images are encoded while the first ones decode
    engine = Engine(builtin.model, builtin.processor, max_batch=2, prefill_chunk=32, image_cache_mb=0)
    try:
        inject(monkeypatch, where(engine), name, armed)
        if when == "from the start":
            armed.set()
        handles = submit_mixed(engine)
        if when == "while decoding":
            next(iter(handles[0]))  # a first token: prefill done, decoding under way
            armed.set()
        results = outcomes(handles)
        handles = [h for h in handles if not isinstance(h, EngineDeadError)]
        assert all(handle.done for handle in handles)
        if deadly:
            assert engine.dead and not engine.accepting and engine.stats()["dead"] == 1
            assert "dead" in results and "failed" not in results
            assert f"Fault: injected into {name}" in engine.dead_reason
            dead = next(h for h in handles if h.completion.finish_reason == "error")
            assert dead.completion.finish_reason == "error" and "engine is dead" in dead.completion.error
            with pytest.raises(EngineDeadError, match="injected"):
                engine.submit("After the death", max_new_tokens=2)
        else:
            assert not engine.dead and "dead" not in results
            # from the start every stage is reached; while decoding, some are past for these requests
            assert "failed" in results or when == "while decoding"
            armed.clear()
            after = engine.submit("Still serving", images=[SHAPES], max_new_tokens=2, min_new_tokens=2)
            assert after.result(timeout=WAIT_S).completion_tokens == 2
    finally:
        armed.clear()
        closing = time.monotonic()
        engine.close(timeout=WAIT_S)
        assert time.monotonic() - closing < WAIT_S


def test_a_fault_in_a_row_move_answers_every_handle_and_refuses_new_requests(builtin, monkeypatch):
    """The issue's case: the row move after a request leaves fails; before, the loop's thread died quietly,
    later requests were accepted and never answered."""
    engine = Engine(builtin.model, builtin.processor, max_batch=3)
    armed = threading.Event()
    armed.set()
    inject(monkeypatch, engine.runner, "move_row", armed)
    # the three are admitted together (rows 0, 1, 2), however the loop's thread is scheduled: else "last"
    # could arrive after "short" has left and take its row, with no row to move
    all_queued, retire = threading.Event(), engine._retire
    monkeypatch.setattr(engine, "_retire", lambda: all_queued.wait(WAIT_S) and retire())
    first = engine.submit("Longer, first", max_new_tokens=30, min_new_tokens=30)
    short = engine.submit("Short", max_new_tokens=1)  # its row is given to the request after it
    last = engine.submit("Longer, last", max_new_tokens=20, min_new_tokens=20)
    all_queued.set()
    assert short.result(timeout=WAIT_S).completion_tokens == 1  # it finished before its row was given away
    results = outcomes([first, last])
    assert "ok" not in results and "dead" in results, results
    for handle in (first, last):
        with pytest.raises(EngineDeadError, match="move_row"):  # iterating an ended handle raises at once
            list(handle)
    assert engine.dead and not engine.accepting
    with pytest.raises(EngineDeadError):
        engine.submit("Anyone there?")
    engine.close()


def test_the_watchdog_kills_an_engine_whose_step_hangs(builtin, monkeypatch):
    engine = Engine(builtin.model, builtin.processor, max_batch=2, step_timeout=0.3)
    release = threading.Event()
    real_decode = engine.runner.decode

    def hung_decode(*args, **kwargs):
        release.wait(WAIT_S)  # a device call that never returns (until the test lets it)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "decode", hung_decode)
    handles = [engine.submit(f"Hang {i}", max_new_tokens=4, min_new_tokens=4) for i in range(3)]
    started = time.monotonic()
    for handle in handles:  # two hold rows, one waits for a row: all end
        with pytest.raises(EngineDeadError, match="step_timeout=0.3"):
            handle.result(timeout=WAIT_S)
    assert time.monotonic() - started < 5
    with pytest.raises(EngineDeadError, match="no progress"):
        engine.submit("Next")
    engine.close()  # returns although the loop is still stuck
    release.set()


def test_a_slow_step_within_the_timeout_is_not_a_hang(builtin):
    with Engine(builtin.model, builtin.processor, max_batch=2, step_timeout=5) as engine:
        handle = engine.submit("Fine", max_new_tokens=6, min_new_tokens=6)
        assert handle.result(timeout=WAIT_S).completion_tokens == 6
        time.sleep(0.2)  # idle: no iteration runs, nothing to time out
        assert not engine.dead
    with pytest.raises(ValueError, match="step_timeout"):
        Engine(builtin.model, builtin.processor, step_timeout=0)


def test_a_request_lost_halfway_through_admission_is_still_answered(builtin, monkeypatch):
    """A fault after admission took a request from the queue but before it reached a row: the request is in
    neither list, and the dying engine still ends it (it answers every request it accepted)."""
    engine = Engine(builtin.model, builtin.processor, max_batch=2)
    armed = threading.Event()
    real_admit = engine.scheduler.admit

    def admit():
        if armed.is_set() and engine.scheduler.waiting:
            engine.scheduler.waiting.popleft()
            raise Fault("admission lost a request")
        return real_admit()

    monkeypatch.setattr(engine.scheduler, "admit", admit)
    running = engine.submit("Running", max_new_tokens=200, min_new_tokens=200)
    next(iter(running))
    armed.set()
    lost = engine.submit("Lost", max_new_tokens=2)
    assert outcomes([running, lost]) == ["dead", "dead"]
    engine.close()
