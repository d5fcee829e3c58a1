"""The decode batch: mixed-task, batch-invariant decoding on top of cached soft-prompt keys/values.

A `DecodeBatch` holds the live rows of one batch. Per layer its keys/values are [B, kv_heads, T, head_dim], each row
laid out as

    [left pads | that row's cached soft-prompt KV | prompt tokens | generated tokens]

with a key mask [B, T] marking real entries (a row's real entries are contiguous, so sliding-window masks, which
count distance in columns, see the keys they would see in positions). Every row has explicit position ids: virtual
tokens 0..N_i-1, then its real text tokens N_i, N_i+1, ... (pads are never counted). Keys are stored already
rotated, and masked keys have no effect, so a row's result does not depend on its batch-mates, on padding, or on
which adapter (or none) the other rows use. Prompts are right-padded inside a prefill block so that no query ever
sees only pads; after the prefill those pads move to the row's left (`right_align`).

Masked keys having no effect is exact arithmetic; kernels are not. Below fp32 (bf16, fp16) the engine runs in
row-exact mode, so that a row's logits are bit-for-bit those of the same row alone:
- attention runs row by row on the row's own real keys and queries, gathered into fresh tensors (core/attention.py
  `row_exact`): SDPA's blocking and summation order follow the key length and a key's place in it, which depend on
  the batch-mates (left pads);
- no matrix product has a single row: a one-row product takes oneDNN's one-row kernel, which sums in another order
  than the kernel for two or more rows (bf16 outputs then differ by one rounding step), and products below 16^3
  multiply-adds leave oneDNN for torch's own kernel (`min_rows`: 2 for real models, more for tiny test models). A
  smaller batch decodes with ghost copies of its first row (their attention skipped), a short prompt alone gets pads,
  and the LM head is padded the same way. Above that, oneDNN's bf16 products give each row the same bits whatever the
  row count.
In fp32 the batched kernels are kept: their differences (~1e-7) are far below a token's margin in practice, but not
bit-exact (docs/benchmarks.md, "Batch invariance in bf16", has the measurements and the cost).

In row-exact mode a prefill runs each row's attention in chunks of `chunk_tokens` queries (the prefix cache's block
size, or PREFILL_CHUNK without one), each over the keys up to the chunk's end (core/attention.py): the kernel's
rounding follows the number of keys it is given, so this makes a full block's keys/values independent of the prompt
that computed it and of whether the tokens before it came from the cache.

With a `PrefixCache` (prefix_cache.py), a row's prompt start that an earlier request with the same adapter already
computed is not run again: its cached keys/values follow the soft prompt's, as part of the row's front, and only the
rest of the prompt runs, at positions N + cached, ... (at least its last token runs: its logits choose the first new
token). The prompt's new full blocks are stored after the prefill.

The scheduler (scheduler.py) admits requests into a DecodeBatch and steps it; `Engine` (engine.py) is what callers use.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from softprompt.core.attention import PREFILL_CHUNK, min_rows, row_exact, use_grouped_sdpa
from softprompt.core.forward import (
    Kv,
    cache_tensors,
    decode_body,
    fast_decode,
    lm_logits,
    make_cache,
    prefill_layout,
    run_body,
)
from softprompt.core.fused import use_fused_projections
from softprompt.core.models import FrozenModel, cpu_has_native_bf16
from softprompt.core.packed import supported as packed_supported
from softprompt.core.packed import use_packed_linears
from softprompt.inference.detokenize import Detokenizer
from softprompt.inference.prefix_cache import PrefixCache
from softprompt.inference.prompt_cache import CachedPrompt, PromptCache, UnknownAdapterError
from softprompt.inference.sampling import check_params, make_generator, next_tokens, penalised, process_logits
from softprompt.inference.scoring import Prefilled, TokenLogprobs, right_aligned_kv, token_logprobs


@dataclass(eq=False)
class GenerationRequest:
    """One prompt to continue. Requests are compared by identity (the same prompt twice is two requests)."""

    prompt_ids: list[int]  # the templated prompt's token ids (placed right after the soft prompt)
    adapter: str | None = None  # a name in the PromptCache; None = the base model
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # per-request generator: sampled output does not depend on batch-mates
    stop: Sequence[str] = ()  # stop strings; generation also stops at EOS
    id: object = None  # caller's handle
    truncate: bool = False  # too long for the context: drop the prompt's left side instead of raising
    entry: CachedPrompt | None = None  # the adapter's PromptCache entry, pinned (a server pins it when it admits
    # the request, so a replace or removal meanwhile does not change it); None: the one loaded under `adapter`
    # logit processing before the token choice (sampling.process_logits; generated tokens only, not the prompt)
    repetition_penalty: float = 1.0  # 1 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None: none; N >= 0: the chosen token's log-probability and the N most likely tokens
    # (of the raw distribution, before temperature, penalties and logit_bias; scoring.token_logprobs)
    prefilled: Prefilled | None = None  # the prompt, already run (a scored prompt: echo with logprobs): its keys/values
    # and last hidden state are taken instead of a prefill when they match (DecodeBatch.add); the same bits in
    # row-exact mode


@dataclass(eq=False)
class TokenEvent:
    """What one decode step yields per live row."""

    request: GenerationRequest
    token_id: int
    text: str  # newly final text (incremental detokenisation, stop strings cut off)
    finish_reason: str | None  # None while running, "stop" (EOS / stop string) or "length"
    logits: torch.Tensor | None = None  # fp32 [V] on CPU, only when the batch was built with keep_logits=True
    logprobs: TokenLogprobs | None = None  # only when the request asked for them (GenerationRequest.logprobs)


@dataclass(eq=False)
class GenerationResult:
    """A finished request."""

    request: GenerationRequest
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0  # prompt length after any truncation (virtual tokens not counted)
    logprobs: list[TokenLogprobs] | None = None  # per generated token, when the request asked for them


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    generator: torch.Generator
    detok: Detokenizer
    next_pos: int
    prompt_tokens: int
    last_token: int = -1
    generated: list[int] = field(default_factory=list)
    finish: str | None = None


def eos_ids(base: FrozenModel) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = set()
    if base.tokenizer.eos_token_id is not None:
        ids.add(int(base.tokenizer.eos_token_id))
    gen = getattr(base.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return ids


def context_length(base: FrozenModel) -> int | None:
    """The model's maximum number of positions (None when the config does not say)."""
    return getattr(base.model.config, "max_position_embeddings", None)


def fit_prompt(request: GenerationRequest, num_virtual_tokens: int, context: int | None) -> list[int]:
    """Validate a request against the model's context; return its prompt ids (left-truncated only if asked)."""
    check_params(
        request.temperature,
        request.top_k,
        request.top_p,
        request.max_new_tokens,
        request.repetition_penalty,
        request.no_repeat_ngram_size,
    )
    ids = list(request.prompt_ids)
    if not ids:
        raise ValueError("a generation request needs at least one prompt token")
    total = num_virtual_tokens + len(ids) + request.max_new_tokens
    if context is None or total <= context:
        return ids
    room = context - num_virtual_tokens - request.max_new_tokens
    if request.truncate and room >= 1:
        return ids[-room:]
    raise ValueError(
        f"prompt too long: {num_virtual_tokens} virtual tokens + {len(ids)} prompt tokens + max_new_tokens "
        f"{request.max_new_tokens} = {total} exceeds the model's context of {context} tokens; shorten the prompt, "
        "lower max_new_tokens" + (", or ask for truncation" if not request.truncate else "")
    )


def right_align(kv: Kv, mask: torch.Tensor, tails: torch.Tensor) -> tuple[Kv, torch.Tensor]:
    """Move each row's `tails[b]` trailing pad columns to its left end, so that the keys generated next follow the
    row's prompt with no gap: a sliding-window mask counts distance in columns, which then equals distance in
    positions (keys are stored rotated, so moving them changes nothing else)."""
    if not bool(tails.any()):
        return kv, mask
    width = mask.shape[1]
    index = (torch.arange(width, device=mask.device).unsqueeze(0) - tails.view(-1, 1)) % width  # [B, T]

    def move(x: torch.Tensor) -> torch.Tensor:
        return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))

    return [(move(k), move(v)) for k, v in kv], mask.gather(1, index)


def fused_by_default(base: FrozenModel) -> bool:
    """Whether decode steps fuse q/k/v and gate/up (`DecodeBatch.fused` None): bf16 on a CPU with native bf16."""
    return base.dtype == torch.bfloat16 and base.device.type == "cpu" and cpu_has_native_bf16() and packed_supported()


class DecodeBatch:
    """Live rows of a mixed-task batch (see the module docstring for the layout).

    Rows leave as soon as they finish (EOS, a stop string or max_new_tokens): after `add` or `step` returns,
    only unfinished rows remain. `remove` drops rows early (cancelled requests).
    """

    # Row-exact mode (see the module docstring): None = on below fp32 (bf16, fp16), where a rounding difference flips a
    # whole bf16 step; fp32 keeps the plain batched kernels. Benchmarks set True / False to measure the cost.
    exact: bool | None = None
    # Decode steps of Llama bodies through core/forward.py's `decode_body` (the same bits as the model's own forward,
    # row-exact or not); benchmarks set False to measure it.
    fast_path: bool = True
    # Within it, q/k/v and gate/up as one product each (core/fused.py, the same bits). None = on in bf16 on a CPU with
    # native bf16, where each oneDNN product has a fixed cost of ~15 us and fusing saves three of a layer's seven (+6%
    # tokens/s on the AMD EPYC, docs/benchmarks.md "Decode step"), for a packed copy of those weights; off elsewhere:
    # on the Intel Xeon measured it gained nothing in fp32 and lost in (emulated) bf16. Benchmarks set True / False.
    fused: bool | None = None

    def __init__(
        self,
        base: FrozenModel,
        prompt_cache: PromptCache,
        keep_logits: bool = False,
        prefix_cache: PrefixCache | None = None,
    ):
        self.base = base
        self.prompt_cache = prompt_cache
        self.prefix_cache = prefix_cache
        self.exact = self.exact if self.exact is not None else base.dtype != torch.float32
        self.min_rows = min_rows(base.model)
        if base.dtype == torch.bfloat16 and base.device.type == "cpu":
            use_packed_linears(base.model)  # same bits, ~2x faster few-row products (core/packed.py)
        self.chunk_tokens = prefix_cache.block_tokens if prefix_cache is not None else PREFILL_CHUNK
        if self.exact and not use_grouped_sdpa(base.model):
            warnings.warn(
                f"{base.name}: attention {base.model.config._attn_implementation!r} is not sdpa, so the "
                "engine cannot run it row by row: in this dtype a row's tokens may depend on its "
                "batch-mates (load the model with attn_implementation='sdpa')",
                stacklevel=2,
            )
        self.fused = self.fused if self.fused is not None else fused_by_default(base)
        if self.fast_path and self.fused and fast_decode(base.model, self.exact):
            use_fused_projections(base.model.base_model.layers)  # same bits, fewer products per step
        self.keep_logits = keep_logits
        self.rows: list[_Row] = []
        self.cache = None  # transformers DynamicCache over the per-layer [B, kv_heads, T, head_dim] tensors
        self.mask: torch.Tensor | None = None  # [B, T] 1 = real key
        self.eos = eos_ids(base)
        self.context = context_length(base)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [row.request for row in self.rows]

    @torch.no_grad()
    def add(self, requests: list[GenerationRequest]) -> list[TokenEvent]:
        """Prefill new rows (batched, any mix of adapters), merge them into the live batch, return first tokens."""
        if not requests:
            return []
        live = {id(row.request) for row in self.rows}
        prompts, ns = [], []
        for request in requests:
            if id(request) in live:
                raise ValueError(f"request {request.id!r} is already in this batch")
            live.add(id(request))
            entry = self._entry(request)
            n = entry.num_virtual_tokens if entry is not None else 0
            prompts.append(fit_prompt(request, n, self.context))
            ns.append(n)
        if self.prefix_cache is not None:
            self.prefix_cache.retain(self.prompt_cache.identities())  # forget adapters removed or replaced since
        events = []
        ready = [i for i, (r, ids) in enumerate(zip(requests, prompts)) if self._takes_prefilled(r, ids)]
        rest = [i for i in range(len(requests)) if i not in set(ready)]
        waves = [
            [rest[i] for i in wave] for wave in self._waves([requests[i] for i in rest], [prompts[i] for i in rest])
        ]
        for wave in ([ready] if ready else []) + [wave for wave in waves if wave]:
            picked = [requests[i] for i in wave], [prompts[i] for i in wave], [ns[i] for i in wave]
            kv, mask, logits = self._handed_over(*picked) if wave is ready else self._prefill(*picked)
            self._merge(kv, mask)
            new_rows = [
                _Row(
                    request,
                    make_generator(request.seed),
                    Detokenizer(self.base.tokenizer, request.stop),
                    next_pos=n + len(ids),
                    prompt_tokens=len(ids),
                )
                for request, ids, n in zip(*picked)
            ]
            self.rows.extend(new_rows)
            events += self._accept(new_rows, logits)
        self._drop_finished()
        order = {id(request): i for i, request in enumerate(requests)}
        return sorted(events, key=lambda event: order[id(event.request)])

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One decode step for all live rows."""
        if not self.rows:
            return []
        device = self.base.device
        live = len(self.rows)
        ids = torch.tensor([[row.last_token] for row in self.rows], device=device)
        pos = torch.tensor([[row.next_pos] for row in self.rows], device=device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        mask = self.mask
        ghosts = self.min_rows - live if self.exact and live < self.min_rows else 0
        if ghosts:  # copies of row 0 keep every matrix product on the kernel it takes with many rows

            def grow(x: torch.Tensor) -> torch.Tensor:
                return torch.cat([x, x[:1].expand(ghosts, *x.shape[1:])])

            ids, pos, mask = grow(ids), grow(pos), grow(mask)
            if self._cache_rows() == live:  # the ghosts' keys/values stay in the cache until the rows change
                self.cache = make_cache([(grow(k), grow(v)) for k, v in cache_tensors(self.cache)])
        embeds = self.base.model.get_input_embeddings()(ids)
        model = self.base.model
        if self.fast_path and fast_decode(model, self.exact):  # same bits, less per-step work (core/forward.py)
            hidden = decode_body(model, embeds, mask, pos, self.cache, live, self.exact, self.fused)
        else:
            with row_exact(live) if self.exact else nullcontext():
                hidden, self.cache = run_body(model, embeds, mask, pos, cache=self.cache, use_cache=True)
        logits = self._head(hidden[:, -1], live)
        for row in self.rows:
            row.next_pos += 1
        events = self._accept(self.rows, logits)
        self._drop_finished()
        return events

    def _cache_rows(self) -> int:
        """Rows of the cache's keys/values: the live rows, then any ghost rows `step` added (never read)."""
        return next(iter(self.cache))[0].shape[0]

    def remove(self, requests) -> None:
        """Drop rows (finished or cancelled); requests not in the batch are ignored."""
        gone = {id(r) for r in requests}
        self._keep([i for i, row in enumerate(self.rows) if id(row.request) not in gone])

    def _entry(self, request: GenerationRequest) -> CachedPrompt | None:
        """The adapter entry a request runs on (None: the base model): its pinned one, else the loaded one."""
        if request.adapter is not None and request.entry is not None:
            return request.entry
        return self.prompt_cache.request_entry(request.id, request.adapter)

    def _owner(self, request: GenerationRequest) -> int:
        """The prefix cache's owner of a request's blocks: its adapter entry's identity (the base model's)."""
        entry = self._entry(request)
        return entry.identity if entry is not None else self.prompt_cache.identity(None)

    def _prefill(self, requests, prompts: list[list[int]], ns: list[int]):
        """Run new rows' prompts on top of their cached soft prompts and of whatever the prefix cache holds of the
        prompts' starts; return (kv, key mask, last-token logits)."""
        device, model = self.base.device, self.base.model
        owners = [self._owner(r) for r in requests]
        hits = self._cached_prefixes(owners, prompts)
        cached = [0 if hit is None else hit.shape[3] for hit in hits]
        runs = [prompt[c:] for prompt, c in zip(prompts, cached)]  # the tokens to run
        fronts = [n + c for n, c in zip(ns, cached)]  # positions in front of them
        pad = self.base.tokenizer.pad_token_id or 0
        # row-exact: enough token rows for every matrix product
        layout = prefill_layout(runs, fronts, pad, device, self.min_rows if self.exact else 0)
        batch, width, l_max, mask = len(requests), layout.width, layout.ids.shape[1], layout.mask
        embeds = model.get_input_embeddings()(layout.ids)
        with row_exact(chunk=self.chunk_tokens) if self.exact else nullcontext():
            hidden, cache = run_body(
                model,
                embeds,
                mask,
                layout.positions,
                cache=make_cache(self._front_kv(requests, hits, width)),
                use_cache=True,
            )
        kv = cache_tensors(cache)
        self._store(owners, prompts, [width - c for c in cached], kv)
        last = torch.tensor([len(r) - 1 for r in runs], device=device)
        logits = self._head(hidden[torch.arange(batch, device=device), last], batch)
        return (*right_align(kv, mask, l_max - torch.tensor([len(r) for r in runs], device=device)), logits)

    def _takes_prefilled(self, request: GenerationRequest, prompt: list[int]) -> bool:
        """Whether a request's `prefilled` state is what its prefill would compute: the same adapter entry and
        tokens, run in this batch's mode (row-exact, attention chunks aligned as the prefill's)."""
        state = request.prefilled
        if state is None:
            return False
        entry = self._entry(request)
        return (
            state.owner == (entry.identity if entry is not None else None)
            and state.ids == prompt
            and state.exact == self.exact
            and state.chunk == self.chunk_tokens
        )

    def _handed_over(self, requests, prompts: list[list[int]], ns: list[int]):
        """(kv, key mask, last-token logits) of rows whose prompts were run already (`prefilled`): their keys/values
        right-aligned, their last hidden states through the LM head, their full blocks given to the prefix cache."""
        states = [r.prefilled for r in requests]
        width = max(n + len(ids) for n, ids in zip(ns, prompts))
        kv = right_aligned_kv([state.kv for state in states], width)
        mask = torch.zeros(len(states), width, dtype=torch.long, device=self.base.device)
        for b, (n, ids) in enumerate(zip(ns, prompts)):
            mask[b, width - n - len(ids) :] = 1
        for request in requests:
            request.prefilled = None  # taken: the batch holds its own copy
        self._store([self._owner(r) for r in requests], prompts, [width - len(ids) for ids in prompts], kv)
        logits = self._head(torch.cat([state.hidden for state in states]), len(states))
        return kv, mask, logits

    def _waves(self, requests, prompts: list[list[int]]) -> list[list[int]]:
        """Row indices in prefill order. With a prefix cache, a row whose first uncached block an earlier row of
        this call computes too (a burst of requests with the same new system prompt) waits for a second prefill, in
        which it finds that block, and whatever else they share, cached."""
        if self.prefix_cache is None or len(requests) < 2:
            return [list(range(len(requests)))]
        size, first, later, seen = self.prefix_cache.block_tokens, [], [], set()
        for i, (request, prompt) in enumerate(zip(requests, prompts)):
            owner = self._owner(request)
            end = self.prefix_cache.cached_length(owner, prompt) + size
            key = (owner, tuple(prompt[:end])) if end < len(prompt) else None
            (later if key is not None and key in seen else first).append(i)
            seen.add(key)
        return [first, later] if later else [first]

    def _cached_prefixes(self, owners: list[int], prompts: list[list[int]]) -> list[torch.Tensor | None]:
        """Per row, the prefix cache's keys/values [layers, 2, kv_heads, cached, head_dim] of its prompt's start."""
        if self.prefix_cache is None:
            return [None] * len(prompts)
        return [self.prefix_cache.match(owner, prompt) for owner, prompt in zip(owners, prompts)]

    def _front_kv(self, requests, hits: list[torch.Tensor | None], width: int) -> Kv | None:
        """Per layer (keys, values) [B, kv_heads, width, head_dim]: each row's soft-prompt keys/values, then its
        cached prompt prefix, right-aligned (masked zeros on the left)."""
        rows = []
        for request, hit in zip(requests, hits):
            entry = self._entry(request)
            soft = entry.kv if entry is not None else None
            parts = [torch.stack([torch.stack((k[0], v[0])) for k, v in soft])] if soft is not None else []
            parts += [hit] if hit is not None else []
            rows.append(torch.cat(parts, dim=3) if len(parts) > 1 else parts[0] if parts else None)
        like = next((row for row in rows if row is not None), None)
        if like is None:
            return None
        layers, _, kv_heads, _, head_dim = like.shape
        front = like.new_zeros(layers, 2, len(rows), kv_heads, width, head_dim)
        for b, row in enumerate(rows):
            if row is not None:
                front[:, :, b, :, width - row.shape[3] :] = row
        return [(front[layer, 0], front[layer, 1]) for layer in range(layers)]

    def _store(self, owners: list[int], prompts: list[list[int]], starts: list[int], kv: Kv) -> None:
        """Give each row's full prompt blocks to the prefix cache; row b's token t is at column starts[b] + t."""
        if self.prefix_cache is None:
            return
        size = self.prefix_cache.block_tokens
        for b, (owner, prompt, first) in enumerate(zip(owners, prompts, starts)):

            def block_kv(start: int, b: int = b, first: int = first) -> torch.Tensor:
                cols = slice(first + start, first + start + size)
                return torch.stack([torch.stack((k[b, :, cols], v[b, :, cols])) for k, v in kv])

            self.prefix_cache.store(owner, prompt, block_kv)

    def _head(self, hidden: torch.Tensor, live: int) -> torch.Tensor:
        """fp32 logits of the first `live` rows of hidden [>= live, H] (padded to min_rows in row-exact mode)."""
        if self.exact and hidden.shape[0] < self.min_rows:
            hidden = torch.cat([hidden, hidden[:1].expand(self.min_rows - hidden.shape[0], -1)])
        return lm_logits(self.base.model, hidden)[:live]

    def _merge(self, kv, mask: torch.Tensor) -> None:
        """Append new rows' keys/values to the live batch, left-padding whichever side is shorter."""
        if not self.rows:
            self.cache, self.mask = make_cache(kv), mask
            return
        live = len(self.rows)
        old = [(k[:live], v[:live]) for k, v in cache_tensors(self.cache)]  # without ghost rows
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)

        def left_pad(x: torch.Tensor, dim: int, width: int) -> torch.Tensor:
            if width == 0:
                return x
            shape = list(x.shape)
            shape[dim] = width
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        merged = [
            (
                torch.cat([left_pad(ko, 2, t - t_old), left_pad(kn, 2, t - t_new)]),
                torch.cat([left_pad(vo, 2, t - t_old), left_pad(vn, 2, t - t_new)]),
            )
            for (ko, vo), (kn, vn) in zip(old, kv)
        ]
        self.mask = torch.cat([left_pad(self.mask, 1, t - t_old), left_pad(mask, 1, t - t_new)])
        self.cache = make_cache(merged)

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> list[TokenEvent]:
        """Choose each row's next token, detokenise it, decide whether the row is finished."""
        settings = [(r.request.temperature, r.request.top_k, r.request.top_p) for r in rows]
        chosen_from = logits
        if any(penalised(r.request) for r in rows):  # per row, from its own logits and tokens only
            chosen_from = torch.stack(
                [
                    process_logits(logits[i], r.request, r.generated) if penalised(r.request) else logits[i].float()
                    for i, r in enumerate(rows)
                ]
            )
        tokens = next_tokens(chosen_from, settings, [r.generator for r in rows])
        events = []
        for index, (row, token) in enumerate(zip(rows, tokens)):
            row.generated.append(token)
            row.last_token = token
            if token in self.eos:
                text, row.finish = row.detok.flush(), "stop"
            else:
                text, stopped = row.detok.push(token)
                if stopped:
                    row.finish = "stop"
                elif len(row.generated) >= row.request.max_new_tokens:
                    text, row.finish = text + row.detok.flush(), "length"
            kept = logits[index].float().cpu() if self.keep_logits else None
            asked = row.request.logprobs
            scored = token_logprobs(logits[index], token, asked) if asked is not None else None
            events.append(TokenEvent(row.request, token, text, row.finish, kept, scored))
        return events

    def _drop_finished(self) -> None:
        if any(row.finish for row in self.rows):
            self._keep([i for i, row in enumerate(self.rows) if not row.finish])

    def _keep(self, keep: list[int]) -> None:
        """Keep only the given rows; trim leading columns that are padding in every remaining row."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).nonzero()[0])
        self.mask = mask[:, first:]
        self.cache = make_cache(
            [
                (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                for k, v in cache_tensors(self.cache)
            ]
        )
