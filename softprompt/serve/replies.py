"""Running a prepared generation request: one scheduler job per prompt and choice (and, for echo with logprobs, one
scoring job per prompt), all on the adapter entry the request was validated against, then the answer as one JSON
object or as server-sent events in OpenAI's shapes (text, logprobs, echo, usage), with disconnects noticed at once
(also while prompts are still being scored)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from softprompt.inference.batch import GenerationRequest
from softprompt.inference.prompt_cache import UnknownAdapterError
from softprompt.inference.scheduler import Job, Overloaded, Unavailable
from softprompt.inference.scoring import PromptScorer, TokenLogprobs
from softprompt.serve.schemas import APIError
from softprompt.serve.state import Prepared, ServerState


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of a prompt's choice `index` (n > 1 or best_of): choice 0 keeps the request's seed (so n=1 is
    unchanged), the others get distinct seeds derived from it; None stays None (fresh entropy per choice)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _asked_logprobs(body, chat: bool) -> int | None:
    """How many alternatives per token the client asked for (None: no logprobs at all)."""
    if chat:
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


async def run_generation(request: Request, state: ServerState, prepared: Prepared, chat: bool):
    """Submit one job per prompt and choice, then answer as JSON or as server-sent events."""
    body, key, prompts = prepared.body, prepared.key, prepared.prompts
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    candidates = body.n if chat else body.candidates()
    asked = _asked_logprobs(body, chat)
    # best_of ranks candidates by their summed log-probability, so it needs the chosen tokens' log-probabilities
    track = asked if asked is not None else (0 if candidates > body.n else None)
    temperature, top_k, top_p = body.sampling()
    bias = body.bias() or None
    jobs, slots = [], []  # slots[i] = (prompt index, candidate index) of jobs[i]
    for p, (ids, limit) in enumerate(zip(prompts, prepared.limits)):
        if limit == 0:
            continue
        for c in range(candidates):
            gen = GenerationRequest(
                prompt_ids=ids,
                adapter=key,
                entry=prepared.entry,
                max_new_tokens=limit,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=choice_seed(body.seed, c),
                stop=body.stop_list(),
                id=(p, c),
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logit_bias=bias,
                logprobs=track,
                repetition_penalty=body.repetition_penalty,
                no_repeat_ngram_size=body.no_repeat_ngram_size,
            )
            jobs.append(Job(gen, lambda item, i=len(jobs): events.put_nowait((i, item)), loop))
            slots.append((p, c))
    scored: asyncio.Queue = asyncio.Queue()
    scoring = []  # echo with logprobs: one scoring job per prompt, run by the worker in slices between steps
    if not chat and body.echo and asked is not None:
        scoring = [
            Job(
                None,
                lambda item, p=p: scored.put_nowait((p, item)),
                loop,
                scorer=PromptScorer(state.base, prepared.entry, ids, asked),
            )
            for p, ids in enumerate(prompts)
        ]
    try:
        if jobs or scoring:
            state.scheduler.submit_many(scoring + jobs)
        elif not state.scheduler.alive:
            raise Unavailable("the generation worker is not running")
    except (Overloaded, Unavailable) as err:
        status, kind = (429, "rate_limit_error") if isinstance(err, Overloaded) else (503, "server_error")
        raise APIError(
            status,
            str(err),
            type=kind,
            code="server_overloaded" if status == 429 else "unavailable",
            headers={"Retry-After": "1"},
        )

    def cancel_all():
        for job in scoring + jobs:
            state.scheduler.cancel(job)

    reply = _Reply(state, prepared, jobs, slots, chat, candidates, asked)
    if scoring:
        try:
            reply.prompt_scores = await _scores(request, scored, len(scoring))
        except ClientGone:
            cancel_all()
            return Response(status_code=499)
        except BaseException as err:
            cancel_all()
            raise as_api_error(err) from err

    if body.stream:
        return _EventStream(
            reply.stream(events),
            events,
            on_close=cancel_all,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    watcher = asyncio.create_task(_watch_disconnect(request, events))
    try:
        return JSONResponse(await reply.collect(events))
    except ClientGone:
        return Response(status_code=499)
    finally:
        watcher.cancel()
        cancel_all()


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


class _Reply:
    """Turns the TokenEvents of a request's jobs into OpenAI response objects.

    Choice i * n + j is prompt i's j-th choice. With best_of > n, each prompt's n candidates with the highest summed
    token log-probability are returned (in the order they were sampled)."""

    def __init__(
        self,
        state: ServerState,
        prepared: Prepared,
        jobs: list[Job],
        slots: list[tuple[int, int]],
        chat: bool,
        candidates: int,
        asked: int | None,
    ):
        self.state, self.prepared, self.body, self.jobs, self.slots = state, prepared, prepared.body, jobs, slots
        self.chat, self.candidates, self.asked = chat, candidates, asked
        self.n = self.body.n
        self.echo = not chat and self.body.echo
        self.prompt_scores: list[list[TokenLogprobs]] | None = None
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._strings: dict[int, str] = {}

    def usage(self) -> dict:
        prompt = sum(self.prepared.virtual + len(p) for p in self.prepared.prompts)
        completion = sum(job.tokens for job in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _envelope(self, obj: str, choices: list) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    # ---- log-probabilities -----------------------------------------------------------------------------------
    def token_string(self, token: int) -> str:
        text = self._strings.get(token)
        if text is None:
            text = self._strings[token] = self.state.tokenizer.decode([token])
        return text

    def legacy_logprobs(self, entries: list[TokenLogprobs], offset: int = 0) -> dict:
        """OpenAI's completions logprobs object for `entries`, text offsets counted from `offset`."""
        tokens, values, tops, offsets = [], [], [], []
        for entry in entries:
            text = self.token_string(entry.token_id)
            tokens.append(text)
            values.append(entry.logprob)
            if entry.logprob is None:
                tops.append(None)
            else:
                top = {self.token_string(t): v for t, v in reversed(entry.top or [])}  # most likely wins a clash
                top.setdefault(text, entry.logprob)
                tops.append(dict(sorted(top.items(), key=lambda kv: -kv[1])))
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprobs]) -> dict:
        def item(token: int, value: float) -> dict:
            text = self.token_string(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in (e.top or [])]} for e in entries
            ]
        }

    def echo_part(self, prompt: int) -> tuple[str, list[TokenLogprobs]]:
        """(echoed text, its token log-probabilities) of a prompt ('' and [] without echo)."""
        if not self.echo:
            return "", []
        return self.prepared.texts[prompt], (self.prompt_scores[prompt] if self.prompt_scores is not None else [])

    # ---- whole answers -----------------------------------------------------------------------------------------
    async def collect(self, events: asyncio.Queue) -> dict:
        count = len(self.jobs)
        texts, reasons = [""] * count, [None] * count
        scores: list[list[TokenLogprobs]] = [[] for _ in range(count)]
        remaining = count
        while remaining:
            index, item = await events.get()
            if isinstance(item, BaseException):
                raise item if isinstance(item, ClientGone) else as_api_error(item)
            texts[index] += item.text
            if getattr(item, "logprobs", None) is not None:
                scores[index].append(item.logprobs)
            if item.finish_reason is not None:
                reasons[index] = item.finish_reason
                remaining -= 1
        by_prompt: dict[int, list[int]] = {}
        for index, (p, _) in enumerate(self.slots):
            by_prompt.setdefault(p, []).append(index)
        choices = []
        for p in range(len(self.prepared.prompts)):
            picked = by_prompt.get(p)
            if picked is not None and len(picked) > self.n:  # best_of: the n most likely candidates
                best = sorted(picked, key=lambda i: -sum(e.logprob for e in scores[i]))[: self.n]
                picked = sorted(best)
            echo_text, echo_scores = self.echo_part(p)
            for j in range(self.n):
                index = len(choices)
                if picked is None:  # max_tokens 0: the echoed prompt only
                    text, entries, reason = echo_text, echo_scores, "length"
                else:
                    i = picked[j]
                    text, entries, reason = echo_text + texts[i], echo_scores + scores[i], reasons[i]
                if self.chat:
                    choices.append(
                        {
                            "index": index,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": self.chat_logprobs(entries) if self.asked is not None else None,
                            "finish_reason": reason,
                        }
                    )
                else:
                    choices.append(
                        {
                            "index": index,
                            "text": text,
                            "logprobs": self.legacy_logprobs(entries) if self.asked is not None else None,
                            "finish_reason": reason,
                        }
                    )
        return {**self._envelope(self.object, choices), "usage": self.usage()}

    # ---- streams -----------------------------------------------------------------------------------------------
    def _chunk(
        self, index: int, text: str | None, reason: str | None, role: bool = False, logprobs: dict | None = None
    ) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            data = self._envelope("chat.completion.chunk", [choice])
        else:
            data = self._envelope(
                "text_completion", [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}]
            )
        return _sse(data)

    async def stream(self, events: asyncio.Queue):
        prompts = len(self.prepared.prompts)
        offsets = [0] * (prompts * self.n)  # per choice: characters sent so far (text_offset)
        if self.chat:
            for i in range(self.n):
                yield self._chunk(i, None, None, role=True)
        for p in range(prompts):  # echo: the prompt first; max_tokens 0: nothing else follows
            echo_text, echo_scores = self.echo_part(p)
            if not self.echo:
                continue
            only = self.prepared.limits[p] == 0
            for j in range(self.n):
                index = p * self.n + j
                logprobs = self.legacy_logprobs(echo_scores) if self.asked is not None else None
                yield self._chunk(index, echo_text, "length" if only else None, logprobs=logprobs)
                offsets[index] = len(echo_text)
        remaining = len(self.jobs)
        while remaining:
            index, item = await events.get()
            if isinstance(item, ClientGone):
                return
            if isinstance(item, BaseException):
                yield _sse(as_api_error(item).body())
                break
            p, c = self.slots[index]
            choice = p * self.n + c
            entry = getattr(item, "logprobs", None)
            logprobs = None
            if self.asked is not None and entry is not None:
                if self.chat:
                    logprobs = self.chat_logprobs([entry])
                else:
                    logprobs = self.legacy_logprobs([entry], offsets[choice])
                    offsets[choice] += len(self.token_string(entry.token_id))
            if item.text or item.finish_reason is not None or logprobs is not None:
                yield self._chunk(choice, item.text, item.finish_reason, logprobs=logprobs)
            if item.finish_reason is not None:
                remaining -= 1
        options = self.body.stream_options
        if remaining == 0 and options is not None and options.include_usage:
            yield _sse(
                {
                    **self._envelope("chat.completion.chunk" if self.chat else "text_completion", []),
                    "usage": self.usage(),
                }
            )
        yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def as_api_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, UnknownAdapterError):
        return APIError(
            404, f"the model was removed while the request waited: {err}", param="model", code="model_not_found"
        )
    if isinstance(err, Unavailable):
        return APIError(503, str(err), type="server_error", code="unavailable")
    if isinstance(err, ValueError):
        return APIError(400, str(err))
    return APIError(500, f"generation failed: {err}", type="server_error", code="internal_error")
