"""The fuzzing campaign, short: every surface of tests/fuzz_surfaces.py with a fixed seed (derandomized) and a
fixed number of cases, about 20 s in all on two cores. Long campaigns: scripts/fuzz.py.

Each case must end as "ok" or "rejected" (a clear ValueError/TypeError, or the command's one-line error);
anything else fails the test, and hypothesis shrinks the case that caused it. Each surface must also reach
both accepted and rejected inputs, so that it is not only feeding junk (or only valid input).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fuzz_surfaces import SURFACES

# cases per surface in CI (a `batch` case is a file of up to 6 lines)
BUDGET = {"images": 400, "text": 500, "chat": 300, "batch": 60, "train": 150, "checkpoint": 250}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The cases are tiny: one thread is as fast, and leaves the other core free."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(BUDGET))
def test_every_case_ends_in_a_result_or_a_clear_error(name):
    surface = SURFACES[name]
    counts: Counter = Counter()

    @settings(
        max_examples=BUDGET[name],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(surface.strategy)
    def check(case):
        for outcome in surface.run(case):
            counts[outcome.kind] += 1
            if outcome.kind == "undocumented":
                raise AssertionError(f"{name}: {outcome.signature}: {outcome.describe()}") from outcome.error

    check()
    assert counts["ok"] > 0 and counts["rejected"] > 0, counts
