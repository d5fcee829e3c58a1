"""The answer to a generation request, built as responses.py models from its jobs' token events: one Completion or
ChatCompletion (`Answer.collect`), or server-sent events of CompletionChunk / ChatCompletionChunk (`Answer.stream`),
with OpenAI's logprobs objects, the echoed prompt and the usage.

Choice i * n + j is prompt i's j-th choice. With best_of > n, each prompt's n candidates with the highest summed
token log-probability are returned (in the order they were sampled)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from softprompt.inference.scheduler import Job
from softprompt.inference.scoring import TokenLogprobs
from softprompt.serve.errors import GENERATION, as_api_error
from softprompt.serve.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
    Wire,
)
from softprompt.serve.validation import Prepared


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def sse(data: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Answer:
    """Turns the TokenEvents of a request's jobs (`slots[i]`: the (prompt, choice) of jobs[i]) into its answer."""

    def __init__(self, tokenizer, prepared: Prepared, jobs: list[Job], slots: list[tuple[int, int]], chat: bool):
        self.tokenizer, self.prepared, self.body, self.jobs, self.slots = (
            tokenizer,
            prepared,
            prepared.body,
            jobs,
            slots,
        )
        self.chat, self.n = chat, self.body.n
        self.asked = self.body.asked_logprobs()
        self.echo = self.body.echoes()
        self.prompt_scores: list[list[TokenLogprobs]] | None = None  # echo with logprobs: the prompts' scores
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._strings: dict[int, str] = {}

    def usage(self) -> Usage:
        prompt = sum(self.prepared.virtual + len(p) for p in self.prepared.prompts)
        completion = sum(job.tokens for job in self.jobs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _envelope(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.body.model, "system_fingerprint": None}

    # ---- log-probabilities -----------------------------------------------------------------------------------
    def token_string(self, token: int) -> str:
        text = self._strings.get(token)
        if text is None:
            text = self._strings[token] = self.tokenizer.decode([token])
        return text

    def legacy_logprobs(self, entries: list[TokenLogprobs], offset: int = 0) -> CompletionLogprobs:
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
        return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)

    def chat_logprobs(self, entries: list[TokenLogprobs]) -> ChoiceLogprobs:
        def item(token: int, value: float) -> dict:
            text = self.token_string(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        content = [
            TokenLogprob(
                **item(e.token_id, e.logprob), top_logprobs=[TopLogprob(**item(t, v)) for t, v in (e.top or [])]
            )
            for e in entries
        ]
        return ChoiceLogprobs(content=content)

    def logprobs(self, entries: list[TokenLogprobs]) -> CompletionLogprobs | ChoiceLogprobs | None:
        """A whole choice's logprobs object (None when none were asked for)."""
        if self.asked is None:
            return None
        return self.chat_logprobs(entries) if self.chat else self.legacy_logprobs(entries)

    def echo_part(self, prompt: int) -> tuple[str, list[TokenLogprobs]]:
        """(echoed text, its token log-probabilities) of a prompt ('' and [] without echo)."""
        if not self.echo:
            return "", []
        return self.prepared.texts[prompt], (self.prompt_scores[prompt] if self.prompt_scores is not None else [])

    # ---- whole answers -----------------------------------------------------------------------------------------
    async def _gather(self, events: asyncio.Queue) -> tuple[list[str], list, list[list[TokenLogprobs]]]:
        """Every job's text, finish reason and token log-probabilities, once all have finished."""
        count = len(self.jobs)
        texts, reasons = [""] * count, [None] * count
        scores: list[list[TokenLogprobs]] = [[] for _ in range(count)]
        remaining = count
        while remaining:
            index, item = await events.get()
            if isinstance(item, BaseException):
                raise item if isinstance(item, ClientGone) else as_api_error(item, GENERATION)
            texts[index] += item.text
            if getattr(item, "logprobs", None) is not None:
                scores[index].append(item.logprobs)
            if item.finish_reason is not None:
                reasons[index] = item.finish_reason
                remaining -= 1
        return texts, reasons, scores

    def _picked(self, scores: list[list[TokenLogprobs]]) -> dict[int, list[int]]:
        """Per prompt, the jobs whose completions are returned (best_of: the n most likely, in sampled order)."""
        by_prompt: dict[int, list[int]] = {}
        for index, (p, _) in enumerate(self.slots):
            by_prompt.setdefault(p, []).append(index)
        for p, picked in by_prompt.items():
            if len(picked) > self.n:
                best = sorted(picked, key=lambda i: -sum(e.logprob for e in scores[i]))[: self.n]
                by_prompt[p] = sorted(best)
        return by_prompt

    def _choice(
        self, index: int, text: str, entries: list[TokenLogprobs], reason: str
    ) -> ChatChoice | CompletionChoice:
        logprobs = self.logprobs(entries)
        if self.chat:
            message = AssistantMessage(role="assistant", content=text)
            return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=reason)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)

    async def collect(self, events: asyncio.Queue) -> Completion | ChatCompletion:
        texts, reasons, scores = await self._gather(events)
        picked = self._picked(scores)
        choices = []
        for p in range(len(self.prepared.prompts)):
            echo_text, echo_scores = self.echo_part(p)
            for j in range(self.n):
                if p not in picked:  # max_tokens 0: the echoed prompt only
                    choices.append(self._choice(len(choices), echo_text, echo_scores, "length"))
                else:
                    i = picked[p][j]
                    choices.append(
                        self._choice(len(choices), echo_text + texts[i], echo_scores + scores[i], reasons[i])
                    )
        if self.chat:
            return ChatCompletion(object="chat.completion", **self._envelope(), choices=choices, usage=self.usage())
        return Completion(object="text_completion", **self._envelope(), choices=choices, usage=self.usage())

    # ---- streams -----------------------------------------------------------------------------------------------
    def chunk(self, choices: list, usage: Usage | None = None) -> Wire:
        if self.chat:
            return ChatCompletionChunk(object="chat.completion.chunk", **self._envelope(), choices=choices, usage=usage)
        return CompletionChunk(object="text_completion", **self._envelope(), choices=choices, usage=usage)

    def _event(self, index: int, text: str | None, reason: str | None, role: bool = False, logprobs=None) -> str:
        if self.chat:
            delta = ChatDelta(role="assistant", content="") if role else ChatDelta(content=text or None)
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)
        else:
            choice = CompletionChunkChoice(index=index, text=text or "", logprobs=logprobs, finish_reason=reason)
        return sse(self.chunk([choice]).wire())

    def _echoes(self):
        """The first events of a stream with echo: each choice's prompt (the only event when max_tokens is 0)."""
        for p in range(len(self.prepared.prompts)):
            echo_text, echo_scores = self.echo_part(p)
            only = self.prepared.limits[p] == 0
            for j in range(self.n):
                logprobs = self.legacy_logprobs(echo_scores) if self.asked is not None else None
                yield (
                    p * self.n + j,
                    echo_text,
                    self._event(p * self.n + j, echo_text, "length" if only else None, logprobs=logprobs),
                )

    async def stream(self, events: asyncio.Queue):
        offsets = [0] * (len(self.prepared.prompts) * self.n)  # per choice: characters sent so far (text_offset)
        if self.chat:
            for i in range(self.n):
                yield self._event(i, None, None, role=True)
        if self.echo:
            for index, echo_text, event in self._echoes():
                yield event
                offsets[index] = len(echo_text)
        remaining = len(self.jobs)
        while remaining:
            index, item = await events.get()
            if isinstance(item, ClientGone):
                return
            if isinstance(item, BaseException):
                yield sse(as_api_error(item, GENERATION).body())
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
                yield self._event(choice, item.text, item.finish_reason, logprobs=logprobs)
            if item.finish_reason is not None:
                remaining -= 1
        options = self.body.stream_options
        if remaining == 0 and options is not None and options.include_usage:
            yield sse(self.chunk([], usage=self.usage()).wire())
        yield "data: [DONE]\n\n"
