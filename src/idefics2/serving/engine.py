"""The continuous-batching engine: one loaded model, one KV-cache budget, one scheduling loop on its own
thread; requests join and leave the shared decode batch at every step.

    engine = Engine(model, processor, max_batch=16)
    handle = engine.submit("What color is the circle?", images=[image], max_new_tokens=32)
    for event in handle:                      # or `async for event in handle`, or handle.result()
        print(event.text, end="")
    engine.close()

`submit` runs in the caller's thread: it renders the chat template, tokenizes, loads and hashes the images
(processing only those whose features are not cached), checks the controls and the lengths, and queues the
request; any mistake raises there (ValueError / TypeError), before the request reaches the loop. The loop
(see scheduler.py for the policy) computes image features, prefills prompt chunks into cache rows, runs one
decode step over every running row, picks each row's token with its own controls and streams text deltas.
An exception while serving one request fails that request alone: a decode step that fails as a whole is
retried row by row, so only the rows that fail alone get an error.

Any other exception that escapes the loop (admission, retiring a request, moving a cache row: the engine's own
state may be wrong from there on) kills the engine: every waiting and running request ends at once with
`EngineDeadError` (finish reason "error"), `submit` raises it, and `dead` / `dead_reason` say so. With
`step_timeout`, a watchdog does the same to a loop whose iteration makes no progress for that many seconds (a
hung device call). A dead engine is not restarted in place: the process is (see the README).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from idefics2.decoding.runner import ModelRunner
from idefics2.decoding.sampler import greedy_exclusions, sample_rows
from idefics2.generation import ContextLengthError, check_context_length, context_length, resolve_options
from idefics2.processing.chat import chat_prompt
from idefics2.processing.images import load_rgb
from idefics2.serving.image_cache import FeatureCache, image_key
from idefics2.serving.request import (
    Completion,
    EngineClosedError,
    EngineDeadError,
    RequestHandle,
    RequestTooLargeError,
    StreamEvent,
)
from idefics2.serving.scheduler import Scheduler
from idefics2.serving.sequence import DECODE, ImageInput, Sequence

log = logging.getLogger("idefics2.serving")

# cache slots per row when max_length is not given (never more than the model's context)
DEFAULT_MAX_LENGTH = 4096
# generate's controls that make no sense for one request of a shared batch
_NOT_PER_REQUEST = ("tokenizer", "streamer", "generator", "pad_token_id")


@dataclass
class EngineOptions:
    max_batch: int = 16  # rows decoded together (cache rows)
    max_length: int | None = None  # cache slots per row, prompt + new tokens (default 4096; <= context)
    max_queue: int = 256  # requests waiting for a row; more are refused (EngineOverloadedError)
    prefill_chunk: int = 512  # prompt tokens prefilled per iteration (chunked prefill budget)
    vision_chunk: int = 1024  # image patches encoded per iteration (at least one request's images)
    image_cache_mb: float = 256.0  # image features kept by content hash (0 turns the cache off)
    step_timeout: float | None = None  # seconds one iteration may run before the engine is declared dead

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk", "vision_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if not isinstance(self.image_cache_mb, (int, float)) or self.image_cache_mb < 0:
            raise ValueError(f"image_cache_mb must be >= 0, got {self.image_cache_mb!r}")
        timeout = self.step_timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):  # fmt: skip
            raise ValueError(f"step_timeout must be a positive number of seconds, got {timeout!r}")


class Engine:
    def __init__(self, model: torch.nn.Module, processor: Any, **options: Any) -> None:
        self.options = EngineOptions(**options)
        self.options.check()
        self.model, self.processor = model.eval(), processor
        self.context_length = context_length(model.config)
        self.max_length = min(self.options.max_length or DEFAULT_MAX_LENGTH, self.context_length)
        self.vocab_size = model.lm_head.weight.shape[0]
        self.runner = ModelRunner(model, self.options.max_batch, self.max_length)
        options = self.options
        self.scheduler = Scheduler(
            options.max_batch, options.prefill_chunk, options.max_queue, options.vision_chunk
        )
        self.image_cache = FeatureCache(int(self.options.image_cache_mb * 2**20))
        self._image_settings = json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._accepting = True
        self._stopping = False
        self._dead_reason: str | None = None  # why the engine died, once it has
        self._iteration_started: float | None = None  # time.monotonic() while an iteration runs
        self._loop_done = threading.Event()
        self._finished: list[Sequence] = []
        # every request submitted and not yet retired, wherever it is (what a dying engine must answer)
        self._open: set[Sequence] = set()
        self.steps = 0  # decode steps run
        self._thread = threading.Thread(target=self._loop, name="idefics2-engine", daemon=True)
        self._thread.start()
        if self.options.step_timeout is not None:
            threading.Thread(target=self._watchdog, name="idefics2-engine-watchdog", daemon=True).start()

    # ---- submitting --------------------------------------------------------------------------------------
    def submit(self, messages: Any, images: Any = None, **controls: Any) -> RequestHandle:
        """Queue one chat request (a prompt string or a conversation, as `ChatPipeline.chat` takes it),
        rendered with the checkpoint's chat template.

        Controls: max_new_tokens (or max_length; unset: the checkpoint's setting, else generate's default,
        cut to the cache slots the prompt leaves), min_new_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty, bad_words_ids, stop_strings, eos_token_id, seed, json_schema or regex (structured
        output: the answer follows the schema or matches the regex; see idefics2.constrained); unset ones
        come from the checkpoint's generation_config.json. `logprobs=True` adds each new token's
        log-probability (under the model's distribution, before the controls) to the events. The reply's
        text: `skip_special_tokens=False` keeps special tokens in it, `include_stop_str_in_output=True` keeps
        the stop string (or the end token's text) that ended it. Raises
        ValueError/TypeError for a bad request, RequestTooLargeError when it can never fit,
        EngineOverloadedError when the queue is full, EngineClosedError after `close` and EngineDeadError
        once the engine has died.
        """
        prompt, images = chat_prompt(self.processor, messages, images)
        return self.submit_prompt(prompt, images, **controls)

    def submit_prompt(self, prompt: str, images: Any = None, **controls: Any) -> RequestHandle:
        """Queue a raw prompt (no chat template), one `<image>` marker per image; see `submit`."""
        self._check_accepting()
        given = sorted(set(controls) & set(_NOT_PER_REQUEST))
        if given:
            raise ValueError(f"{', '.join(given)} cannot be set per request of the engine")
        flags = {
            name: controls.pop(name, default)
            for name, default in (
                ("logprobs", False),
                ("skip_special_tokens", True),
                ("include_stop_str_in_output", False),
            )
        }
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if not isinstance(prompt, str):
            raise TypeError(f"the prompt must be a str, got {type(prompt).__name__}")
        images = [] if images is None else list(images)
        n_markers = prompt.count(self.processor.image_token)
        if n_markers != len(images):
            raise ValueError(f"the prompt holds {n_markers} <image> marker(s) but {len(images)} image(s)")
        prompt_ids = self.processor(text=prompt)["input_ids"][0]
        options = resolve_options(self.model, len(prompt_ids), {**controls, "tokenizer": self.processor})
        if "max_new_tokens" not in controls and "max_length" not in controls:
            options["max_new_tokens"] = max(
                1, min(options["max_new_tokens"], self.max_length - len(prompt_ids))
            )
        self._check_length(len(prompt_ids), options["max_new_tokens"])
        image_inputs = [self._image_input(image, i) for i, image in enumerate(images)]
        handle = RequestHandle(prompt_tokens=len(prompt_ids))
        seq = Sequence(
            handle, prompt_ids, image_inputs, options, self.processor.tokenizer, self.vocab_size,
            self.runner.device, **flags,
        )  # fmt: skip
        with self._lock:
            self._check_accepting()
            self.scheduler.add(seq)
            self._open.add(seq)
            self._wake.notify()
        return handle

    def _check_accepting(self) -> None:
        if self._dead_reason is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead_reason}")
        if not self._accepting:
            raise EngineClosedError("the engine is closed and accepts no more requests")

    def _check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        numbers = {"prompt_length": prompt_length, "max_new_tokens": max_new_tokens}
        try:
            check_context_length(self.model.config, prompt_length, max_new_tokens)
        except ContextLengthError as error:
            raise RequestTooLargeError(str(error), limit=error.limit, **numbers) from None
        if prompt_length + max_new_tokens > self.max_length:
            total = prompt_length + max_new_tokens
            message = (
                f"the request needs {total} positions ({prompt_length} prompt tokens + max_new_tokens "
                f"{max_new_tokens}), more than the engine's {self.max_length} cache slots (max_length)"
            )
            raise RequestTooLargeError(message, limit=self.max_length, **numbers)

    def _image_input(self, image: Any, index: int) -> ImageInput:
        try:
            rgb = load_rgb(image, self.processor.image_processor.max_pixels)
        except ValueError as error:
            raise ValueError(f"image {index}: {error}") from error
        key = image_key(rgb, self._image_settings)
        features = self.image_cache.get(key)
        if features is not None:
            return ImageInput(key, features=features)
        batch = self.processor.image_processor([[rgb]], return_tensors="pt")
        patch = self.model.config.vision_config.patch_size
        real = batch["pixel_attention_mask"][..., ::patch, ::patch]  # (1, n_crops, H / patch, W / patch)
        return ImageInput(key, None, batch["pixel_values"], batch["pixel_attention_mask"], int(real.sum()))

    # ---- state -----------------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        """False once `close` has begun or the engine has died."""
        return self._accepting

    @property
    def dead(self) -> bool:
        """True once the loop has stopped on a fault (or the watchdog saw no progress): see `dead_reason`."""
        return self._dead_reason is not None

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    def stats(self) -> dict[str, int]:
        """The engine's counters, read without the engine's lock (each value is one plain read, so a caller
        such as the server's /metrics never waits for the loop; the values may be a step apart)."""
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "decode_steps": self.steps,
            "image_cache_hits": self.image_cache.hits,
            "image_cache_misses": self.image_cache.misses,
            "image_cache_bytes": self.image_cache.bytes,
            "kv_cache_bytes": self.runner.cache.nbytes,
            "dead": int(self.dead),
        }

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, let the ones in flight finish (for at most `timeout` seconds; then they
        are cancelled) and stop the loop."""
        with self._lock:
            self._accepting = False
            self._wake.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.scheduler.has_work() and not self.dead:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    for seq in [*self.scheduler.waiting, *self.scheduler.running]:
                        seq.handle.cancel()
                    break
                self._wake.wait(timeout=left if left is None else min(left, 0.1))
            self._stopping = True
            self._wake.notify_all()
        # a dead engine's loop may be stuck in a device call for good (the watchdog's case): not waited for
        self._thread.join(timeout=1.0 if self.dead else None)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the loop ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._wait_for_work():
                    self._iteration_started = time.monotonic()
                    self._iteration()
                    self._retire()
                    self._iteration_started = None
        except BaseException as error:  # a fault outside any one request: the engine's state is suspect
            log.exception("the engine's loop failed")
            self._die(f"{type(error).__name__}: {_one_line(error)}")
        finally:
            self._loop_done.set()

    def _wait_for_work(self) -> bool:
        """Wait until there is work; False when the loop should end (closed and drained, or dead)."""
        with self._lock:
            while not self.scheduler.has_work() and not self._stopping and not self.dead:
                self._wake.wait()
            if self.dead or (self._stopping and not self.scheduler.has_work()):
                return False
            if self._stopping:  # cancelled by close(timeout): finish them now
                for seq in [*self.scheduler.waiting, *self.scheduler.running]:
                    seq.handle.cancel()
            return True

    def _watchdog(self) -> None:
        """Kill the engine when one iteration runs longer than step_timeout (checked a few times per
        timeout): its requests end with EngineDeadError instead of waiting forever."""
        timeout = self.options.step_timeout
        while not self._loop_done.wait(min(timeout / 4, 1.0)):
            started = self._iteration_started
            if started is not None and time.monotonic() - started > timeout:
                self._die(f"no progress: an iteration of the loop ran longer than step_timeout={timeout:g} s")
                return

    def _die(self, reason: str) -> None:
        """Mark the engine dead and end every request it holds with EngineDeadError, at once."""
        with self._lock:
            if self.dead:
                return
            self._dead_reason, self._accepting = reason, False
            seqs = sorted(self._open, key=lambda seq: seq.handle.id)
            self._open.clear()
            self.scheduler.waiting.clear()
            self.scheduler.running.clear()
            self._wake.notify_all()
        log.error("the engine is dead (%s); %d request(s) ended with an error", reason, len(seqs))
        message = f"EngineDeadError: the engine is dead: {reason}"
        for seq in seqs:
            event = StreamEvent("", [], "error", seq.prompt_length, len(seq.generated))
            seq.handle.publish(event, self._completion(seq, "error", message), EngineDeadError)

    def _iteration(self) -> None:
        scheduler = self.scheduler
        with self._lock:
            for seq in [s for s in (*scheduler.waiting, *scheduler.running) if s.handle.cancelled]:
                self._end(seq, "cancelled")
        self._retire()
        with self._lock:
            scheduler.admit()
        # images that another request has had encoded since this one was queued cost nothing
        starting = [seq for seq in scheduler.running if seq.embeds is None and seq.filled == 0]
        for image in (image for seq in starting for image in seq.images if image.features is None):
            image.features = self.image_cache.get(image.key, count=False)
        chunks = [chunk for chunk in scheduler.prefill_chunks() if not chunk[0].handle.cancelled]
        self._embed_prompts([seq for seq, _, _ in chunks if seq.embeds is None])
        chunks = [chunk for chunk in chunks if chunk[0] not in self._finished]
        whole = [seq for seq, start, end in chunks if start == 0 and end == seq.prompt_length]
        for run in _consecutive_rows(whole):
            self._prefill_whole(run)
        for seq, start, end in chunks:
            if seq not in whole:
                try:
                    self._prefill_chunk(seq, start, end)
                except Exception as error:
                    self._fail(seq, error)
        if scheduler.decoding():
            self._decode_step()

    def _embed_prompts(self, seqs: list[Sequence]) -> None:
        """Prompt embeddings of requests starting their prefill, their uncached images encoded together
        (request by request if that fails, so that a bad image fails only its request)."""
        try:
            self._encode_images([image for seq in seqs for image in seq.images])
        except Exception as error:
            log.warning(
                "encoding the images of %d requests failed (%s); request by request", len(seqs), error
            )
        for seq in seqs:
            try:
                self._encode_images(seq.images)
                features = [image.features for image in seq.images]
                seq.embeds = self.runner.embed_prompt(
                    seq.prompt_ids, torch.cat(features) if features else None
                )
            except Exception as error:
                self._fail(seq, error)

    def _encode_images(self, images: list[ImageInput]) -> None:
        """Features for every image without them: from the cache (an earlier request may have computed them
        since this one was queued), else computed, each distinct image once, in one call."""
        missing: dict[str, ImageInput] = {}
        for image in images:
            if image.features is None:
                image.features = self.image_cache.get(image.key, count=False)
            if image.features is None and image.key not in missing:
                missing[image.key] = image
        if missing:
            pixels = [(image.pixel_values, image.pixel_attention_mask) for image in missing.values()]
            for key, features in zip(missing, self.runner.image_features(pixels)):
                self.image_cache.put(key, features)
                missing[key].features = features
        for image in images:
            if image.features is None:  # a repeat of an image encoded just now
                image.features = missing[image.key].features
            image.pixel_values = image.pixel_attention_mask = None

    def _prefill_whole(self, seqs: list[Sequence]) -> None:
        """Whole prompts of requests in consecutive rows, in one forward (one by one if that fails)."""
        try:
            logits = self.runner.prefill_whole(seqs[0].row, [seq.embeds for seq in seqs])
        except Exception as error:
            if len(seqs) == 1:
                self._fail(seqs[0], error)
                return
            log.warning("prefilling %d requests together failed (%s); one by one", len(seqs), error)
            for seq in seqs:
                try:
                    self._prefill_chunk(seq, 0, seq.prompt_length)
                except Exception as error:
                    self._fail(seq, error)
            return
        for seq in seqs:
            seq.filled, seq.embeds, seq.state = seq.prompt_length, None, DECODE
        self._pick(seqs, logits, list(range(len(seqs))))

    def _prefill_chunk(self, seq: Sequence, start: int, end: int) -> None:
        last = end == seq.prompt_length
        logits = self.runner.prefill(seq.row, seq.embeds[:, start:end], start, want_logits=last)
        seq.filled = end
        if last:
            seq.embeds, seq.state = None, DECODE
            self._pick([seq], logits[None], [0])

    def _decode_step(self) -> None:
        rows = list(self.scheduler.running)
        live = [seq for seq in rows if seq.state == DECODE and seq not in self._finished]
        # placeholders for rows still in prefill: a slot their next chunk overwrites
        tokens = [seq.generated[-1] if seq in live else 0 for seq in rows]
        positions = [seq.position if seq in live else seq.filled for seq in rows]
        # greedy rows whose logits nobody reads: the step may give their tokens (ModelRunner.decode_greedy)
        exclusions = greedy_exclusions([seq.sampler for seq in live])
        if any(seq.logprobs is not None for seq in live):
            exclusions = None
        try:
            greedy = None
            if exclusions is not None:  # rows still in prefill hold placeholders: nothing excluded there
                by_seq = dict(zip(live, exclusions, strict=True))
                excluded = [by_seq.get(seq, []) for seq in rows]
                greedy = self.runner.decode_greedy(tokens, positions, excluded=excluded)
            logits = self.runner.decode(tokens, positions) if greedy is None else None
        except Exception as error:
            log.warning("a decode step of %d rows failed (%s); retrying row by row", len(rows), error)
            self._decode_rows_alone(rows, live, tokens, positions)
            return
        self.steps += 1
        if greedy is None:
            self._pick(live, logits, [seq.row for seq in live])
            return
        for seq in live:
            try:
                self._accept(seq, greedy[seq.row], None)
            except Exception as error:
                self._fail(seq, error)

    def _decode_rows_alone(self, rows, live, tokens, positions) -> None:
        for i, seq in enumerate(rows):
            if seq not in live:
                continue
            try:
                logits = self.runner.decode([tokens[i]], [positions[i]], start=i)
            except Exception as error:
                self._fail(seq, error)
                continue
            self._pick([seq], logits, [0])

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor, rows: list[int]) -> None:
        """Choose and record each request's token from its row of `logits` (B, V), all rows in one call of the
        logits chain; a request whose controls fail fails alone."""
        scores = logits if rows == list(range(logits.shape[0])) else logits[rows]
        try:
            tokens, errors = sample_rows(scores, [seq.sampler for seq in seqs])
        except Exception as error:  # a fault of the batch as a whole: each request on its own
            if len(seqs) == 1:
                self._fail(seqs[0], error)
                return
            log.warning("choosing the tokens of %d requests failed (%s); one by one", len(seqs), error)
            for seq, row in zip(seqs, rows):
                self._pick([seq], logits[row][None], [0])
            return
        wanted = [i for i, seq in enumerate(seqs) if seq.logprobs is not None]
        logprobs = dict.fromkeys(range(len(seqs)))
        if wanted:
            index = torch.tensor(wanted, device=scores.device)
            chosen = torch.tensor([tokens[i] for i in wanted], device=scores.device)
            values = torch.log_softmax(scores.index_select(0, index), dim=-1).gather(1, chosen[:, None])
            logprobs.update(zip(wanted, values[:, 0].tolist()))
        for i, seq in enumerate(seqs):
            if i in errors:
                self._fail(seq, errors[i])
                continue
            try:
                self._accept(seq, tokens[i], logprobs[i])
            except Exception as error:
                self._fail(seq, error)

    def _accept(self, seq: Sequence, token: int, logprob: float | None) -> None:
        text, reason = seq.accept(token, logprob)
        seq.text_parts.append(text)
        completion = None
        if reason is not None:
            completion = self._completion(seq, reason)
            self._finished.append(seq)
        event = StreamEvent(
            text,
            [token],
            reason,
            seq.prompt_length,
            len(seq.generated),
            None if logprob is None else [logprob],
        )
        seq.handle.publish(event, completion)

    def _completion(self, seq: Sequence, reason: str, error: str | None = None) -> Completion:
        return Completion(
            text="".join(seq.text_parts),
            finish_reason=reason,
            prompt_tokens=seq.prompt_length,
            completion_tokens=len(seq.generated),
            token_ids=list(seq.generated),
            logprobs=None if seq.logprobs is None else list(seq.logprobs),
            stopped_by=seq.stopped_by if reason == "stop" else None,
            error=error,
            submitted_at=seq.handle.submitted_at,
            finished_at=time.monotonic(),
        )

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Finish a request early (cancelled or failed): its last event, and out of the batch."""
        if seq in self._finished:
            return
        completion = self._completion(seq, reason, error)
        seq.handle.publish(StreamEvent("", [], reason, seq.prompt_length, len(seq.generated)), completion)
        self._finished.append(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        message = _one_line(error)
        log.warning("request %d failed: %s: %s", seq.handle.id, type(error).__name__, message)
        self._end(seq, "error", f"{type(error).__name__}: {message}")

    def _retire(self) -> None:
        """Take finished requests out of the batch, moving the last row's cache into each freed row."""
        if not self._finished:
            return
        moves = []  # (request, source row, target row, filled slots), made in this order
        with self._lock:
            for seq in self._finished:
                if seq.row < 0 and seq not in self.scheduler.waiting:
                    continue
                moved = self.scheduler.remove(seq)
                if moved is not None:
                    other, old_row = moved
                    slots = other.position if other.state == DECODE else other.filled
                    moves.append((other, old_row, other.row, slots))
            finished = set(self._finished)
            self._open -= finished
            self._finished.clear()
            self._wake.notify_all()
        # outside the lock (only this thread touches cache rows): submit, stats and close never wait on it;
        # a request that leaves in the same iteration needs no move
        for other, source, target, slots in moves:
            if other not in finished:
                self.runner.move_row(source, target, slots)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _consecutive_rows(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Requests grouped into runs of consecutive cache rows."""
    runs: list[list[Sequence]] = []
    for seq in sorted(seqs, key=lambda s: s.row):
        if runs and runs[-1][-1].row + 1 == seq.row:
            runs[-1].append(seq)
        else:
            runs.append([seq])
    return runs
