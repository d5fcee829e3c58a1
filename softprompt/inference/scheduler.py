"""Continuous batching: the one admit/step loop over a DecodeBatch, for offline generation and for the server.

A `Scheduler` owns a DecodeBatch and two queues: generation jobs waiting for a batch slot, and prompt-scoring jobs
(echo with logprobs: `Job.scorer`, a scoring.PromptScorer). One `tick()`:

1. runs queued control calls (`run`: the server's adapter add/remove happen here, between steps);
2. drops cancelled jobs (a row leaves the batch; a waiting job frees its queue place at once);
3. admits waiting jobs up to `max_batch` live rows, in one batched prefill; a generation that continues a prompt
   being scored (echo with logprobs and max_tokens > 0: `Job.after`) waits for its scoring, then takes the
   scored prompt's keys/values and last hidden state instead of running the prompt again (`hand_over`; the same
   bits in row-exact mode, batch.GenerationRequest.prefilled);
4. runs one slice (SCORE_SLICE tokens) of the first scoring jobs, several prompts in one batched forward (up to
   SCORE_TOKENS tokens), so a large scoring request never stalls the streams; prompts that begin alike (the choices
   of one question) run their common start once first (`scoring.share_starts`);
5. advances every live row by one token.

Rows leave the moment they finish, so requests join and leave between steps and a row's tokens never depend on its
batch-mates (the DecodeBatch guarantees that). Each TokenEvent goes to its job's `deliver`, directly or, for a job
with an asyncio `loop`, through `loop.call_soon_threadsafe`.

`Engine.generate` and `Engine.stream` tick on the caller's thread until their jobs are done (`drain`, `ticks`); the
server calls `start()`, and a worker thread ticks whenever there is work. Scoring jobs wait in order and the first
ones are scored together (`score_batch` prompts, SCORE_TOKENS tokens a tick); for capacity the scoring jobs hold one
batch slot and each further one a queue place, so they count against capacity like generation jobs, but a stream
submitted after a large scoring request is admitted at once.

The waiting queue is bounded (`max_queue`; None = unbounded, offline): `submit_many` raises Overloaded (the server
answers 429) when it is full, and Unavailable (503) when the worker is not running. A request's jobs are accepted
together or not at all: when those that cannot take a free batch slot fit in the queue, so up to `capacity`
(max_batch + max_queue) jobs fit on an idle server.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

from softprompt.inference.batch import DecodeBatch, GenerationRequest, TokenEvent
from softprompt.inference.scoring import PromptScorer, advance_together, share_starts
from softprompt.runtime import release_openmp_threads

SCORE_TOKENS = 2048  # most prompt tokens one tick scores (several prompts' slices in one forward): bounds how long
# the decode streams wait between two tokens while prompts are being scored


class Overloaded(RuntimeError):
    """The waiting queue is full."""


class Unavailable(RuntimeError):
    """The worker is stopped (shutting down, or it failed)."""


@dataclass(eq=False)
class Job:
    """One request in flight: a generation request, or (with `scorer`) a prompt to score. `deliver` gets each
    TokenEvent, the scorer's result list (scoring), or an exception when the job fails; after an event with a
    finish_reason, a result or an exception nothing follows. `loop`: an asyncio event loop to deliver on (None:
    deliver directly on the ticking thread)."""

    request: GenerationRequest | None
    deliver: Callable[[object], None]
    loop: object = None
    cancelled: bool = False
    finished: bool = False
    tokens: int = 0
    scorer: PromptScorer | None = None
    after: Job | None = None  # a scoring job of this job's prompt (echo with logprobs): this generation waits for it
    # and, with `Scheduler.hand_over`, continues from its keys/values instead of running the prompt again


@dataclass
class SchedulerStats:
    """Counters since the scheduler was made (the server's /metrics)."""

    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    tokens: int = 0
    steps: int = 0
    prefills: int = 0
    score_slices: int = 0
    score_shared_tokens: int = 0  # prompt tokens not run again: a start shared by prompts scored together
    score_hand_overs: int = 0  # generations that continued from their scored prompt (no prefill of their own)
    max_live: int = 0


class Scheduler:
    """One DecodeBatch, its waiting and scoring queues, and (once started) the worker thread that ticks them."""

    def __init__(
        self,
        make_batch: Callable[[], DecodeBatch],
        max_batch: int = 16,
        max_queue: int | None = 64,
        idle_wait: float = 0.5,
    ):
        if max_batch < 1 or (max_queue is not None and max_queue < 0):
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.make_batch = make_batch
        self.batch = make_batch()
        self.max_batch, self.max_queue, self.idle_wait = max_batch, max_queue, idle_wait
        self.score_batch = max_batch  # most prompts scored together in one tick (1: one at a time)
        self.share_starts = True  # prompts scored together run a common start once (scoring.share_starts)
        self.hand_over = True  # a generation after its prompt's scoring continues from it (Job.after)
        self.waiting: collections.deque[Job] = collections.deque()
        self.live: dict[int, Job] = {}  # id(request) -> job
        self.admitting = 0  # jobs taken from `waiting` whose prefill is running (not yet in `live`)
        self.scoring: collections.deque[Job] = collections.deque()  # scoring jobs; the first one is being run
        self.calls: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.error: BaseException | None = None
        self.stats = SchedulerStats()

    # ---- submitting, any thread ----------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        """The most jobs one request may have: more could never be accepted, even by an idle server."""
        return None if self.max_queue is None else self.max_batch + self.max_queue

    @property
    def idle(self) -> bool:
        return not (self.calls or self.waiting or self.live or self.scoring)

    def submit(self, job: Job) -> None:
        self.submit_many([job])

    def submit_many(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` or none: Overloaded when those that cannot take a free batch slot do not fit in the
        queue, Unavailable when a started worker is no longer running."""
        with self.cond:
            if self.thread is not None and not self.alive:
                raise self.stopped()
            if self.max_queue is not None and self._queued_after(jobs) > self.max_queue:
                self.stats.rejected += 1
                raise Overloaded(
                    f"the server is busy: {len(self.live)} requests running and {len(self.waiting)} "
                    "waiting (the queue is full); retry later"
                )
            self.waiting.extend(job for job in jobs if job.scorer is None)
            self.scoring.extend(job for job in jobs if job.scorer is not None)
            self.stats.submitted += len(jobs)
            self.cond.notify_all()

    def stopped(self) -> Unavailable:
        """The error of a request that finds the worker stopped."""
        return Unavailable(
            "the generation worker is not running" + (f" (it failed: {self.error})" if self.error else "")
        )

    def _queued_after(self, jobs: list[Job]) -> int:
        """How many jobs would wait in the queue if `jobs` were accepted now."""
        scoring = len(self.scoring) + sum(job.scorer is not None for job in jobs)
        free = max(0, self.max_batch - len(self.live) - self.admitting - min(scoring, 1))
        queued = len(self.waiting) + max(scoring - 1, 0)  # scoring jobs but the one being run wait
        return queued + sum(job.scorer is None for job in jobs) - free

    def cancel(self, job: Job) -> None:
        """Cancel a job (e.g. its client disconnected); its row is dropped before the next decode step."""
        with self.cond:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            self.cond.notify_all()

    def run(self, fn: Callable):
        """Run fn() between two ticks and return its result (raise its exception). Called on the worker thread
        itself, or with no worker running, it runs at once."""
        if not self.alive or threading.current_thread() is self.thread:
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            self.calls.append((fn, future))
            self.cond.notify_all()
        return future.result()

    def snapshot(self) -> dict:
        with self.cond:
            return {
                **dataclasses.asdict(self.stats),
                "running": len(self.live),
                "scoring": len(self.scoring),
                "waiting": len(self.waiting),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "alive": self.alive,
            }

    # ---- ticking on the caller's thread (offline) ----------------------------------------------------------
    def drain(self, progress=None) -> None:
        """Tick until every submitted job is done (offline generation). `progress`: called once per finished job."""
        finished = self.stats.completed + self.stats.failed
        while not self.idle:
            self.tick()
            now = self.stats.completed + self.stats.failed
            if progress is not None and now > finished:
                progress(now - finished)
            finished = now

    def ticks(self, job: Job) -> Iterator[None]:
        """Tick until `job` is done, yielding after each tick (a stream hands out what the tick delivered)."""
        while not job.finished:
            self.tick()
            yield

    # ---- the worker thread (server) ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread. The starting thread gives its OpenMP threads back first: the worker runs the
        model from now on, and two OpenMP teams on few cores slow every product (runtime.release_openmp_threads)."""
        with self.cond:
            if self.running:
                return
            self.running = True
        release_openmp_threads()
        self.thread = threading.Thread(target=self._loop, name="softprompt-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still waiting or running get Unavailable."""
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        self._fail_all(Unavailable("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self.running and self.thread is not None and self.thread.is_alive()

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.running and self.idle:
                        self.cond.wait(self.idle_wait)
                    if not self.running:
                        return
                self.tick()
        except BaseException as err:  # noqa: BLE001 (a bug in the worker must not hang every client)
            self.error = err
            self.running = False
            self._fail_all(Unavailable(f"the generation worker failed: {err!r}"))
            raise

    # ---- one tick ------------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Control calls, cancellations, admission, one scoring slice, one decode step (the module docstring)."""
        with self.cond:
            calls = list(self.calls)
            self.calls.clear()
            cancelled = [job for job in self.live.values() if job.cancelled]
            self.waiting = self._without_cancelled(self.waiting)
            self.scoring = self._without_cancelled(self.scoring)
            admit = self._admissible()
            self.admitting = len(admit)
        for fn, future in calls:
            try:
                future.set_result(fn())
            except BaseException as err:  # noqa: BLE001 (handed to the caller)
                future.set_exception(err)
        if cancelled:
            self._drop(cancelled, cancelled=True)
        if admit:
            try:
                self._admit(admit)
            finally:
                with self.cond:
                    self.admitting = 0
        if self.scoring:
            self._score()
        if self.live:
            self._step()

    def _admissible(self) -> list[Job]:
        """Take the waiting jobs to admit now, in order, up to the free batch slots; with `hand_over`, generations
        whose prompt is still being scored (`after`) keep their places, and the others take the scored prompt."""
        free = self.max_batch - len(self.live) - min(len(self.scoring), 1)
        if free <= 0 or not self.waiting:
            return []
        admit, kept = [], collections.deque()
        while self.waiting and len(admit) < free:
            job = self.waiting.popleft()
            if self.hand_over and job.after is not None and not job.after.finished:
                kept.append(job)
                continue
            if self.hand_over and job.after is not None:
                job.request.prefilled = job.after.scorer.take_prefilled()
            job.after = None
            admit.append(job)
        kept.extend(self.waiting)
        self.waiting = kept
        return admit

    def _without_cancelled(self, queue: collections.deque[Job]) -> collections.deque[Job]:
        """The queue without its cancelled jobs, which finish at once (freeing their places)."""
        if not any(job.cancelled for job in queue):
            return queue
        for job in queue:
            if job.cancelled:
                self._finish(job, cancelled=True)
        return collections.deque(job for job in queue if not job.cancelled)

    def _admit(self, jobs: list[Job]) -> None:
        handed = [job.request for job in jobs if job.request.prefilled is not None]
        try:
            events = self.batch.add([j.request for j in jobs])
        except Exception:  # noqa: BLE001
            # Find the culprit(s): admit one by one, failing only the requests that cannot be added.
            events = []
            for job in jobs:
                try:
                    events += self.batch.add([job.request])
                except Exception as err:  # noqa: BLE001
                    self._fail(job, err)
                    continue
                self.live[id(job.request)] = job
        else:
            for job in jobs:
                self.live[id(job.request)] = job
        self.stats.prefills += 1
        self.stats.score_hand_overs += sum(request.prefilled is None for request in handed)  # the batch took them
        for request in handed:
            request.prefilled = None  # one it did not take (a truncated prompt) is let go too
        self.stats.max_live = max(self.stats.max_live, len(self.live))
        self._dispatch(events)

    def _score(self) -> None:
        """One slice of the first scoring jobs, batched: in order, as many as fit `score_batch` prompts and
        SCORE_TOKENS tokens (jobs finish in order of their prompts' lengths, not necessarily of submission)."""
        group, tokens = [], 0
        for job in self.scoring:
            size = job.scorer.next_tokens
            if group and (len(group) >= self.score_batch or tokens + size > SCORE_TOKENS):
                break
            group.append(job)
            tokens += size
        try:
            if self.share_starts and len(group) > 1:
                self.stats.score_shared_tokens += share_starts([job.scorer for job in group])
            advance_together([job.scorer for job in group])
        except Exception:  # noqa: BLE001 (find the prompt that cannot be scored: it fails alone)
            for job in group:
                try:
                    job.scorer.advance()
                except Exception as err:  # noqa: BLE001
                    with self.cond:
                        self.scoring.remove(job)
                    self._fail(job, err)
        self.stats.score_slices += 1
        for job in group:
            if job.scorer.finished and not job.finished:
                with self.cond:
                    self.scoring.remove(job)
                self._finish(job, cancelled=False)
                self._send(job, job.scorer.result)

    def _step(self) -> None:
        try:
            events = self.batch.step()
        except Exception as err:  # noqa: BLE001
            # The batch is in an unknown state: fail its rows and start a fresh one; waiting requests go on.
            jobs = list(self.live.values())
            self.live.clear()
            self.batch = self.make_batch()
            for job in jobs:
                failure = RuntimeError(f"generation failed: {err}")
                failure.__cause__ = err
                self._fail(job, failure)
            return
        self.stats.steps += 1
        self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        done = []
        for event in events:
            job = self.live.get(id(event.request))
            if job is None:
                continue
            job.tokens += 1
            self.stats.tokens += 1
            if event.finish_reason is not None:
                done.append(job)
            if not job.cancelled:
                self._send(job, event)
        if done:
            self._drop(done, cancelled=False)

    def _drop(self, jobs: list[Job], cancelled: bool) -> None:
        self.batch.remove([j.request for j in jobs])
        for job in jobs:
            self.live.pop(id(job.request), None)
            self._finish(job, cancelled)

    def _finish(self, job: Job, cancelled: bool) -> None:
        with self.cond:
            if job.finished:
                return
            job.finished = True
            if cancelled:
                self.stats.cancelled += 1
            else:
                self.stats.completed += 1

    def _fail(self, job: Job, err: BaseException) -> None:
        with self.cond:
            if job.finished:
                return
            job.finished = True
            self.stats.failed += 1
        self._send(job, err)

    def _fail_all(self, err: BaseException) -> None:
        for job in list(self.waiting) + list(self.live.values()) + list(self.scoring):
            self._fail(job, err)
        self.waiting.clear()
        self.live.clear()
        self.scoring.clear()

    @staticmethod
    def _send(job: Job, item: object) -> None:
        if job.loop is None:
            job.deliver(item)
            return
        try:
            job.loop.call_soon_threadsafe(job.deliver, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
