"""Running a prepared generation request: one scheduler job per prompt and choice (the request's
protocol.generation_requests) and, for echo with logprobs, one scoring job per prompt, all on the adapter entry the
request was validated against; then its answer (answers.py) as one JSON object or as server-sent events, with
disconnects noticed at once (also while prompts are still being scored or wait for a batch slot)."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from softprompt.inference.scheduler import Job, Overloaded, Unavailable
from softprompt.inference.scoring import PromptScorer, TokenLogprobs
from softprompt.serve.answers import Answer, ClientGone
from softprompt.serve.errors import GENERATION, as_api_error
from softprompt.serve.state import ServerState
from softprompt.serve.validation import Prepared


async def run_generation(request: Request, state: ServerState, prepared: Prepared, chat: bool):
    """Submit the request's jobs, then answer as JSON or as server-sent events."""
    body, loop = prepared.body, asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    requests = body.generation_requests(
        prepared.prompts,
        prepared.limits,
        prepared.key,
        prepared.entry,
        state.config.repetition_penalty,
        state.config.no_repeat_ngram_size,
    )
    jobs = [Job(gen, lambda item, i=i: events.put_nowait((i, item)), loop) for i, gen in enumerate(requests)]
    scored: asyncio.Queue = asyncio.Queue()
    scoring = []  # echo with logprobs: one scoring job per prompt, run by the worker in slices between steps
    if body.scores_prompts():
        scoring = [
            Job(
                None,
                lambda item, p=p: scored.put_nowait((p, item)),
                loop,
                scorer=PromptScorer(state.base, prepared.entry, ids, body.asked_logprobs()),
            )
            for p, ids in enumerate(prepared.prompts)
        ]
        if state.scheduler.hand_over:  # each generation continues from its prompt's scoring (no second prefill)
            for job, gen in zip(jobs, requests):
                job.after = scoring[gen.id[0]]
                job.after.scorer.hand_overs += 1
    _submit(state, scoring + jobs)

    def cancel_all():
        for job in scoring + jobs:
            state.scheduler.cancel(job)

    answer = Answer(state.tokenizer, prepared, jobs, [gen.id for gen in requests], chat)
    if scoring:
        try:
            answer.prompt_scores = await _scores(request, scored, len(scoring))
        except ClientGone:
            cancel_all()
            return Response(status_code=499)
        except BaseException as err:
            cancel_all()
            raise as_api_error(err, GENERATION) from err
    if body.stream:
        return _EventStream(
            answer.stream(events),
            events,
            on_close=cancel_all,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    watcher = asyncio.create_task(_watch_disconnect(request, events))
    try:
        return JSONResponse((await answer.collect(events)).wire())
    except ClientGone:
        return Response(status_code=499)
    finally:
        watcher.cancel()
        cancel_all()


def _submit(state: ServerState, jobs: list[Job]) -> None:
    """Queue all of the request's jobs (429 when the queue is full, 503 when the worker is not running)."""
    try:
        if jobs:
            state.scheduler.submit_many(jobs)
        elif not state.scheduler.alive:
            raise state.scheduler.stopped()
    except (Overloaded, Unavailable) as err:
        raise as_api_error(err) from None


async def _scores(request: Request, scored: asyncio.Queue, count: int) -> list[list[TokenLogprobs]]:
    """The scoring jobs' results in prompt order; ClientGone as soon as the client disconnects (the caller cancels
    the jobs, so the worker drops them before their next slice)."""
    watcher = asyncio.create_task(_watch_disconnect(request, scored))
    try:
        results: dict[int, list[TokenLogprobs]] = {}
        while len(results) < count:
            index, item = await scored.get()
            if isinstance(item, BaseException):
                raise item
            results[index] = item
        return [results[i] for i in range(count)]
    finally:
        watcher.cancel()


async def _watch_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Wait for the client to go away (the body is already read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            events.put_nowait((-1, ClientGone()))
            return


class _EventStream(StreamingResponse):
    """A streaming response that notices a disconnect even while no token is being sent (e.g. the request still
    waits for a batch slot), and runs `on_close` however it ends (finished, client gone, error)."""

    def __init__(self, content, events: asyncio.Queue, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send):
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_close()
            self.events.put_nowait((-1, ClientGone()))  # ends the event generator

        watcher = asyncio.create_task(watch())
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            self.on_close()
