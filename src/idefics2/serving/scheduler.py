"""What runs in each iteration of the engine's loop.

- **Admission**: waiting requests take free cache rows first come, first served. The waiting queue is bounded;
  a request arriving when it is full is refused at once (`EngineOverloadedError`).
- **Prefill under a token budget**: each iteration prefills at most `prefill_budget` prompt tokens, oldest
  request first; a longer prompt is split into chunks over several iterations (chunked prefill). Requests
  start their prefill while their images' patches fit in `vision_budget` (the first one whatever its
  images), since the vision encoder's work grows with patches, not with the 64 tokens an image becomes. The
  images of the requests starting their prefill are encoded in one vision call, and whole prompts in
  consecutive rows are prefilled as one batch.
- **Decode**: then every running row takes one decode step together. Rows whose prompt is still being
  prefilled ride along as placeholders (their step writes a slot that their next chunk overwrites), so the
  batch is always rows [0, n) of the cache.

So between two tokens of a decoding request there is at most one budget's worth of prefill and of image
encoding (or one request's images): a stream of long new prompts slows decoding rows down by a bounded amount
and never stops them. Finished requests leave at the end of the iteration; the request in the last row moves
into the freed row.
"""

from __future__ import annotations

from collections import deque

from idefics2.serving.request import EngineOverloadedError
from idefics2.serving.sequence import DECODE, PREFILL, Sequence


class Scheduler:
    def __init__(self, rows: int, prefill_budget: int, max_waiting: int, vision_budget: int) -> None:
        self.rows, self.prefill_budget, self.max_waiting = rows, prefill_budget, max_waiting
        self.vision_budget = vision_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i] holds cache row i

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a request; refused when the queue is full (requests that free rows will take at the next
        iteration do not count)."""
        free_rows = self.rows - len(self.running)
        if len(self.waiting) >= self.max_waiting + free_rows:
            raise EngineOverloadedError(
                f"the engine is overloaded: {len(self.waiting)} requests are already waiting "
                f"(max_queue={self.max_waiting}); retry later"
            )
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Give free rows to the oldest waiting requests."""
        admitted = []
        while self.waiting and len(self.running) < self.rows:
            seq = self.waiting.popleft()
            seq.row, seq.state = len(self.running), PREFILL
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def prefill_chunks(self) -> list[tuple[Sequence, int, int]]:
        """(request, first, end) prompt positions to prefill this iteration, within the token budget and the
        image-patch budget."""
        budget, vision, chunks = self.prefill_budget, self.vision_budget, []
        for seq in self.running:
            if budget == 0:
                break
            if seq.state == PREFILL:
                cost = seq.vision_cost() if seq.filled == 0 else 0
                if chunks and cost > vision:
                    break
                vision -= cost
                end = min(seq.prompt_length, seq.filled + budget)
                chunks.append((seq, seq.filled, end))
                budget -= end - seq.filled
        return chunks

    def decoding(self) -> bool:
        return any(seq.state == DECODE for seq in self.running)

    def remove(self, seq: Sequence) -> tuple[Sequence, int] | None:
        """Take a request out (waiting or running). When it held a row that was not the last, the request in
        the last row takes its row: returns (that request, its old row) so the caller moves its cache."""
        if seq.row < 0:
            self.waiting.remove(seq)
            return None
        row, last = seq.row, self.running.pop()
        seq.row = -1
        if last is seq:
            return None
        self.running[row] = last
        old, last.row = last.row, row
        return last, old
