"""Continuous batching for the server: one worker thread owns the engine's DecodeBatch.

Between two decode steps the worker runs queued control calls (adapter add/remove), drops cancelled rows, admits
waiting requests up to `max_batch` live rows (one batched prefill), runs one slice of the first prompt-scoring job
(echo with logprobs: `Job.scorer`, a batch.PromptScorer, SCORE_SLICE tokens a slice), then advances every live row by
one token. Scoring jobs wait in a queue of their own, in order, because they run one at a time anyway: the one being
scored takes a batch slot and each waiting one a queue place (so they count against capacity like generation jobs),
but a stream submitted after a large scoring request is admitted at once and decodes between the slices. A cancelled
scoring job (its client left) is dropped before its next slice. Rows
leave the moment they finish, so requests join and leave between steps and a row's tokens never depend on its
batch-mates (the DecodeBatch guarantees that). Each TokenEvent goes back to the asyncio side with
`loop.call_soon_threadsafe`.

The waiting queue is bounded: `submit` raises Overloaded (answered 429) when it is full, and Unavailable (503) when
the worker is not running; memory therefore stays bounded whatever the load. A request's jobs (one per prompt) are
submitted together or not at all (`submit_many`): they are accepted when those of them that cannot take a free
batch slot fit in the queue, so up to `capacity` (max_batch + max_queue) jobs fit on an idle server, and a request
with more can never be served (the app answers it 400 before submitting).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Callable

from softprompt.inference.engine import DecodeBatch, GenerationRequest, TokenEvent


class Overloaded(RuntimeError):
    """The waiting queue is full."""


class Unavailable(RuntimeError):
    """The worker is stopped (shutting down, or it failed)."""


@dataclass(eq=False)
class Job:
    """One generation request in flight. `deliver` is called on the event loop `loop` with each TokenEvent, or with
    an exception when the request fails; after an event with a finish_reason (or an exception) nothing follows."""

    request: GenerationRequest
    deliver: Callable[[object], None]
    loop: object  # asyncio event loop (or None: call deliver directly on the worker thread)
    cancelled: bool = False
    finished: bool = False
    tokens: int = 0
    scorer: object = None  # a batch.PromptScorer: the job scores a prompt instead (deliver gets the result list)


class Scheduler:
    """The worker thread and its bounded queue."""

    def __init__(
        self, make_batch: Callable[[], DecodeBatch], max_batch: int = 16, max_queue: int = 64, idle_wait: float = 0.5
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.make_batch = make_batch
        self.batch = make_batch()
        self.max_batch, self.max_queue, self.idle_wait = max_batch, max_queue, idle_wait
        self.waiting: collections.deque[Job] = collections.deque()
        self.live: dict[int, Job] = {}  # id(request) -> job
        self.admitting = 0  # jobs taken from `waiting` whose prefill is running (not yet in `live`)
        self.scoring: collections.deque[Job] = collections.deque()  # scoring jobs; the first one is being run
        self.calls: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.error: BaseException | None = None
        self.stats = {
            "submitted": 0,
            "completed": 0,
            "cancelled": 0,
            "failed": 0,
            "rejected": 0,
            "tokens": 0,
            "steps": 0,
            "prefills": 0,
            "score_slices": 0,
            "max_live": 0,
        }

    # ---- public, any thread --------------------------------------------------------------------------------
    def start(self) -> None:
        with self.cond:
            if self.running:
                return
            self.running = True
        self.thread = threading.Thread(target=self._loop, name="softprompt-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still waiting or running get Unavailable."""
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        for job in list(self.waiting) + list(self.live.values()) + list(self.scoring):
            self._fail(job, Unavailable("the server is shutting down"))
        self.waiting.clear()
        self.live.clear()
        self.scoring.clear()

    @property
    def alive(self) -> bool:
        return self.running and self.thread is not None and self.thread.is_alive()

    @property
    def capacity(self) -> int:
        """The most jobs one request may have: more could never be accepted, even by an idle server."""
        return self.max_batch + self.max_queue

    def submit(self, job: Job) -> None:
        self.submit_many([job])

    def submit_many(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` or none: Overloaded when those that cannot take a free batch slot do not fit in the
        queue, Unavailable when the worker is not running."""
        with self.cond:
            if not self.alive:
                raise Unavailable(
                    "the generation worker is not running" + (f" (it failed: {self.error})" if self.error else "")
                )
            scoring = len(self.scoring) + sum(job.scorer is not None for job in jobs)
            free = max(0, self.max_batch - len(self.live) - self.admitting - min(scoring, 1))
            queued = len(self.waiting) + max(scoring - 1, 0)  # scoring jobs but the one being run wait
            if queued + sum(job.scorer is None for job in jobs) - free > self.max_queue:
                self.stats["rejected"] += 1
                raise Overloaded(
                    f"the server is busy: {len(self.live)} requests running and {len(self.waiting)} "
                    "waiting (the queue is full); retry later"
                )
            self.waiting.extend(job for job in jobs if job.scorer is None)
            self.scoring.extend(job for job in jobs if job.scorer is not None)
            self.stats["submitted"] += len(jobs)
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Cancel a job (e.g. its client disconnected); its row is dropped before the next decode step."""
        with self.cond:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            self.cond.notify_all()

    def run(self, fn: Callable):
        """Run fn() on the worker thread between decode steps and return its result (raise its exception). Called
        on the worker thread itself, or before the worker started, it runs at once."""
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
                **self.stats,
                "running": len(self.live),
                "scoring": len(self.scoring),
                "waiting": len(self.waiting),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "alive": self.alive,
            }

    # ---- the worker ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.running and not (self.calls or self.waiting or self.live or self.scoring):
                        self.cond.wait(self.idle_wait)
                    if not self.running:
                        return
                    calls = list(self.calls)
                    self.calls.clear()
                    cancelled = [j for j in self.live.values() if j.cancelled]
                    if any(j.cancelled for j in self.waiting):  # free their queue places at once
                        for job in [j for j in self.waiting if j.cancelled]:
                            self._finish(job, cancelled=True)
                        self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)
                    if any(j.cancelled for j in self.scoring):
                        for job in [j for j in self.scoring if j.cancelled]:
                            self._finish(job, cancelled=True)
                        self.scoring = collections.deque(j for j in self.scoring if not j.cancelled)
                    admit = []
                    while self.waiting and len(self.live) + len(admit) + min(len(self.scoring), 1) < self.max_batch:
                        admit.append(self.waiting.popleft())
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
        except BaseException as err:  # noqa: BLE001 (a bug in the worker must not hang every client)
            self.error = err
            self.running = False
            for job in list(self.waiting) + list(self.live.values()) + list(self.scoring):
                self._fail(job, Unavailable(f"the generation worker failed: {err!r}"))
            raise

    def _admit(self, jobs: list[Job]) -> None:
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
        self.stats["prefills"] += 1
        self.stats["max_live"] = max(self.stats["max_live"], len(self.live))
        self._dispatch(events)

    def _score(self) -> None:
        """One slice of the first scoring job (which stays first until it is done: jobs are scored in order)."""
        job = self.scoring[0]
        try:
            done = job.scorer.advance()
        except Exception as err:  # noqa: BLE001 (a prompt that cannot be scored fails alone)
            with self.cond:
                self.scoring.popleft()
            self._fail(job, err)
            return
        if done:
            with self.cond:
                self.scoring.popleft()
        self.stats["score_slices"] += 1
        if done:
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
                self._fail(job, RuntimeError(f"generation failed: {err}"))
            return
        self.stats["steps"] += 1
        self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        done = []
        for event in events:
            job = self.live.get(id(event.request))
            if job is None:
                continue
            job.tokens += 1
            self.stats["tokens"] += 1
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
            self.stats["cancelled" if cancelled else "completed"] += 1

    def _fail(self, job: Job, err: BaseException) -> None:
        with self.cond:
            if job.finished:
                return
            job.finished = True
            self.stats["failed"] += 1
        self._send(job, err)

    @staticmethod
    def _send(job: Job, item: object) -> None:
        if job.loop is None:
            job.deliver(item)
            return
        try:
            job.loop.call_soon_threadsafe(job.deliver, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
