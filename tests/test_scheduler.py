"""The engine's scheduler on its own: which prompts are prefilled in an iteration, under the token budget and
the image-patch budget."""

from __future__ import annotations

from dataclasses import dataclass

from idefics2.serving.scheduler import Scheduler
from idefics2.serving.sequence import WAITING


@dataclass(eq=False)
class Request:
    """What the scheduler reads of a Sequence."""

    prompt_length: int
    patches: int = 0
    filled: int = 0
    state: str = WAITING
    row: int = -1

    def vision_cost(self) -> int:
        return self.patches if self.filled == 0 else 0


def planned(scheduler: Scheduler, *requests: Request) -> list[tuple[int, int, int]]:
    """(request index, first, end) of the iteration's prefill, after the requests are admitted."""
    for request in requests:
        scheduler.add(request)
    scheduler.admit()
    return [(requests.index(seq), first, end) for seq, first, end in scheduler.prefill_chunks()]


def test_prompts_share_the_token_budget_oldest_first():
    scheduler = Scheduler(rows=4, prefill_budget=100, max_waiting=8, vision_budget=10_000)
    assert planned(scheduler, Request(30), Request(50), Request(40)) == [(0, 0, 30), (1, 0, 50), (2, 0, 20)]


def test_image_patches_limit_how_many_requests_start_their_prefill():
    scheduler = Scheduler(rows=4, prefill_budget=512, max_waiting=8, vision_budget=1024)
    requests = Request(70, patches=729), Request(70, patches=729), Request(10)
    # the second request's image would exceed the patch budget: it waits for the next iteration, and so does
    # the text-only request behind it (first come, first served)
    assert planned(scheduler, *requests) == [(0, 0, 70)]


def test_the_first_request_starts_whatever_its_images_cost():
    scheduler = Scheduler(rows=4, prefill_budget=512, max_waiting=8, vision_budget=100)
    assert planned(scheduler, Request(400, patches=5 * 1000), Request(10)) == [(0, 0, 400)]


def test_a_prompt_whose_images_are_encoded_costs_no_patches_in_its_later_chunks():
    scheduler = Scheduler(rows=4, prefill_budget=64, max_waiting=8, vision_budget=1024)
    long, small = Request(200, patches=1000), Request(10, patches=20)
    assert planned(scheduler, long, small) == [(0, 0, 64)]
    long.filled = 64  # its images were encoded with its first chunk
    assert [(first, end) for seq, first, end in scheduler.prefill_chunks()] == [(64, 128)]
    scheduler.prefill_budget = 200
    assert [(seq is small, first, end) for seq, first, end in scheduler.prefill_chunks()] == [
        (False, 64, 200),
        (True, 0, 10),
    ]
