"""`Engine`: what offline generation, eval, chat and the server use to run generation requests.

An Engine owns the adapters' cached soft-prompt keys/values (a `PromptCache`) and, optionally, a `PrefixCache` of
shared prompt starts. Every run goes through the one scheduler (scheduler.py) over a DecodeBatch (batch.py):
`generate` ticks it on the caller's thread until all requests are done, `stream` until one request is done, and the
server starts the scheduler that `scheduler()` makes on a worker thread. So a batching, sampling or logprobs change
reaches every verb at once.
"""

from __future__ import annotations

from collections.abc import Iterator

from softprompt.core.models import FrozenModel
from softprompt.data.templates import Template, encode_text
from softprompt.formats.adapter import Adapter
from softprompt.inference.batch import (
    DecodeBatch,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
    context_length,
    fit_prompt,
)
from softprompt.inference.prefix_cache import PrefixCache
from softprompt.inference.prompt_cache import PromptCache, UnknownAdapterError
from softprompt.inference.scheduler import Job, Scheduler


class Engine:
    """Owns a PromptCache; runs offline continuous batching and single streamed requests on the scheduler.

    `prefix_cache` (opt-in, e.g. `PrefixCache(256 << 20)`): reuse the keys/values of prompt starts that requests
    share (a system prompt, a template's fixed text) instead of recomputing them; see prefix_cache.py."""

    def __init__(
        self,
        base: FrozenModel,
        adapters: dict[str, Adapter] | None = None,
        default_template: Template | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.base = base
        self.prompt_cache = PromptCache(base, default_template)
        self.prefix_cache = prefix_cache
        for name, adapter in (adapters or {}).items():
            self.prompt_cache.add(name, adapter)

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        self.prompt_cache.add(name, adapter)

    def template(self, adapter: str | None) -> Template:
        return self.prompt_cache.template(adapter)

    def encode(self, instruction: str, input: str = "", adapter: str | None = None) -> list[int]:
        """Prompt token ids of a record, formatted with the adapter's template."""
        text = self.template(adapter).prompt(instruction, input, self.base.tokenizer)
        return encode_text(self.base.tokenizer, text)

    def encode_chat(self, messages: list[dict], adapter: str | None = None) -> list[int]:
        text = self.template(adapter).chat_prompt(messages, self.base.tokenizer)
        return encode_text(self.base.tokenizer, text)

    def check(self, request: GenerationRequest) -> list[int]:
        """Raise the error `DecodeBatch.add` would raise for this request, before any work is done; return the
        prompt ids it will run (left-truncated only if the request asks for it)."""
        # a composition's entry is built here, so a bad one (a missing or non key/value part) fails now
        entry = self.prompt_cache.request_entry(request.id, request.adapter)
        return fit_prompt(request, 0 if entry is None else entry.num_virtual_tokens, context_length(self.base))

    def pin_prefix(self, prompt_ids: list[int], adapter: str | None = None) -> int:
        """Compute the keys/values of a prompt start (a document, a system prompt) for `adapter` and pin them in the
        prefix cache, so that every later prompt starting with it reuses them and they are never evicted; returns
        the number of tokens pinned (whole blocks). `unpin_prefix` releases them."""
        if self.prefix_cache is None:
            raise ValueError("pinning a prefix needs a prefix cache (Engine(..., prefix_cache=PrefixCache(...)))")
        self.generate([GenerationRequest(list(prompt_ids), adapter=adapter, max_new_tokens=1)])  # stores its blocks
        owner, size = self.prompt_cache.identity(adapter), self.prefix_cache.block_tokens
        pinned, wanted = self.prefix_cache.pin(owner, prompt_ids), len(prompt_ids) // size * size
        if pinned < wanted:
            self.prefix_cache.unpin(owner, prompt_ids)
            raise ValueError(
                f"the prefix cache ({self.prefix_cache.max_bytes:,} bytes) cannot hold this prefix of "
                f"{len(prompt_ids)} tokens besides what is pinned already ({pinned} of {wanted} tokens fit); give "
                "the cache more memory (--prefix-cache-mb)"
            )
        return pinned

    def unpin_prefix(self, prompt_ids: list[int], adapter: str | None = None) -> int:
        """Let a pinned prompt start be evicted again; returns the number of tokens unpinned."""
        if self.prefix_cache is None:
            return 0
        return self.prefix_cache.unpin(self.prompt_cache.identity(adapter), prompt_ids)

    def new_batch(self) -> DecodeBatch:
        """An empty DecodeBatch over this engine's caches."""
        return DecodeBatch(self.base, self.prompt_cache, prefix_cache=self.prefix_cache)

    def scheduler(self, max_batch: int = 16, max_queue: int | None = 64) -> Scheduler:
        """A scheduler over a fresh DecodeBatch of this engine (the server starts it on a worker thread)."""
        return Scheduler(self.new_batch, max_batch=max_batch, max_queue=max_queue)

    def generate(
        self, requests: list[GenerationRequest], batch_size: int = 8, progress: bool = False
    ) -> list[GenerationResult]:
        """Run all requests with continuous batching (finished rows leave, queued ones join); results in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results = [self._result(request, self.check(request)) for request in requests]  # all checked first
        scheduler = self.scheduler(max_batch=batch_size, max_queue=None)
        scheduler.submit_many([Job(request, _collector(result)) for request, result in zip(requests, results)])
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="req")
        scheduler.drain(progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        return results

    def stream(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        """Generate one request, yielding each token as it is produced."""
        self.check(request)
        scheduler, events = self.scheduler(max_batch=1, max_queue=None), []
        job = Job(request, events.append)
        scheduler.submit(job)
        for _ in scheduler.ticks(job):
            for item in events:
                if isinstance(item, BaseException):
                    raise item
                yield item
            events.clear()

    @staticmethod
    def _result(request: GenerationRequest, prompt_ids: list[int]) -> GenerationResult:
        return GenerationResult(
            request, "", prompt_tokens=len(prompt_ids), logprobs=[] if request.logprobs is not None else None
        )


def _collector(result: GenerationResult):
    """A Job's deliver that appends each event to `result` (and raises a job's failure)."""

    def deliver(item: object) -> None:
        if isinstance(item, BaseException):
            raise item
        result.text += item.text
        result.token_ids.append(item.token_id)
        if result.logprobs is not None:
            result.logprobs.append(item.logprobs)
        if item.finish_reason:
            result.finish_reason = item.finish_reason

    return deliver
