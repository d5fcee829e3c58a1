"""Log-probabilities beside the engine: of a chosen token (`token_logprobs`, what DecodeBatch reports when a request
asks for `logprobs`) and of a prompt's own tokens (`PromptScorer`, echo with logprobs / prompt logprobs, what
lm-evaluation-harness reads for log-likelihood tasks).

`PromptScorer` scores a prompt after an adapter's cached soft-prompt keys/values, SCORE_SLICE tokens at a time, so
the scheduler (scheduler.py) runs it between decode steps. It runs one prompt alone, in slices fixed by the prompt, so
its values do not depend on what else is running; `prompt_logprobs` runs it to the end.

Log-probabilities are those of the model's raw distribution (log-softmax of the logits, before temperature,
top-k/top-p, penalties and logit_bias), as vLLM returns them by default.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from softprompt.core.attention import PREFILL_CHUNK, min_rows, row_exact, use_grouped_sdpa
from softprompt.core.forward import cache_tensors, lm_logits, make_cache, prefill_layout, run_body
from softprompt.inference.prompt_cache import CachedPrompt, PromptCache

NEG_INF_LOGPROB = -9999.0  # what an impossible token's log-probability is reported as (JSON has no -inf), as vLLM
HEAD_CHUNK = 128  # prompt positions per LM-head chunk when scoring a prompt
SCORE_SLICE = 128  # prompt tokens a scoring job runs between two decode steps (a multiple of PREFILL_CHUNK)


@dataclass(eq=False)
class TokenLogprobs:
    """One token's log-probability and the most likely alternatives at its place (token id -> log-probability,
    most likely first)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass(eq=False)
class Prefilled:
    """A prompt already run through the model: a scored prompt, handed to the generation that continues it
    (`PromptScorer.hand_overs`), so the decode batch does not run it again (batch.GenerationRequest.prefilled).
    `owner`: its adapter entry's identity (None: the base model); `kv`: per layer its keys/values
    [1, kv_heads, n + len(ids), head_dim], the soft prompt's first; `hidden`: its last token's hidden state [1, H],
    whose logits choose the first new token; `exact`: whether it ran in row-exact mode, with attention in chunks of
    `chunk` tokens aligned to the prompt's start."""

    owner: int | None
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    hidden: torch.Tensor
    exact: bool
    chunk: int = PREFILL_CHUNK


def _finite(x: float) -> float:
    return x if x > NEG_INF_LOGPROB else NEG_INF_LOGPROB


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprobs:
    """Log-probability of `token` and the top_n most likely tokens under one row of raw logits [V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if top_n > 0:
        values, ids = torch.topk(logp, min(top_n, logp.shape[-1]))
        top = [(int(i), _finite(float(v))) for i, v in zip(ids.tolist(), values.tolist())]
    return TokenLogprobs(token, _finite(float(logp[token])), top)


class PromptScorer:
    """Scores one prompt's tokens (echo with logprobs) a slice at a time, so the server's worker can run it between
    decode steps: `advance()` runs the next `slice_tokens` tokens on top of the keys/values of those before it and
    returns True once every token is scored; `result` then holds what `prompt_logprobs` returns. `advance_together`
    runs the next slice of several scorers (any mix of adapters and lengths) in one batched forward.

    Slices always start at multiples of `slice_tokens` (and, in row-exact mode, run their attention in the engine's
    block-aligned chunks, and their matrix products with at least `min_rows` rows), so in bf16 the values depend only
    on the adapter and the prompt, never on the server's load or on which prompts are scored alongside; in fp32 the
    batched kernels are kept, as in generation (differences ~1e-7)."""

    def __init__(self, base, entry: CachedPrompt | None, ids: list[int], top_n: int, slice_tokens: int = SCORE_SLICE):
        if not ids:
            raise ValueError("a prompt to score needs at least one token")
        self.base, self.ids, self.top_n, self.slice_tokens = base, list(ids), top_n, slice_tokens
        self.owner = entry.identity if entry is not None else None  # prompts of one owner can share a start
        self.n = entry.num_virtual_tokens if entry is not None else 0
        self.kv = list(entry.kv) if entry is not None else None  # per layer [1, kv_heads, n + done, head_dim]
        self.exact = base.dtype != torch.float32
        if self.exact:
            use_grouped_sdpa(base.model)  # row by row needs softprompt's attention (a no-op once switched)
        self.done = 0  # prompt tokens run so far
        self.result: list[TokenLogprobs] = [TokenLogprobs(self.ids[0], None, None)]
        self.keep = False  # a shared start (share_starts): keep the keys/values and the last hidden state when done
        self.carry: torch.Tensor | None = None  # [1, H] the hidden state before `done`, when it is still unscored
        # generations that continue this prompt (echo with logprobs and max_tokens > 0): each takes the finished
        # prompt's keys/values and last hidden state (`take_prefilled`) instead of running the prompt again
        self.hand_overs = 0
        self.last_hidden: torch.Tensor | None = None  # [1, H] the last token's, kept for the hand-overs

    @property
    def finished(self) -> bool:
        return self.done >= len(self.ids)

    @property
    def next_tokens(self) -> int:
        """How many tokens the next slice runs."""
        return min(self.slice_tokens, len(self.ids) - self.done)

    def advance(self) -> bool:
        """Run one slice; True when the whole prompt is scored."""
        return advance_together([self])[0]

    def continue_from(self, start: PromptScorer) -> None:
        """Take a finished shared start (a scorer of this prompt's first tokens with `keep`): its keys/values and
        results, so only the rest of the prompt runs; the start's last hidden state scores this prompt's next token."""
        assert start.finished and start.keep and self.done == 0 and self.ids[: len(start.ids)] == start.ids
        self.kv, self.done, self.carry = start.kv, len(start.ids), start.carry
        self.result = list(start.result)

    def take_prefilled(self) -> Prefilled | None:
        """The finished prompt's state for one of its `hand_overs` (None when it is not finished or none is left);
        the keys/values are let go after the last one."""
        if not self.finished or self.hand_overs < 1 or self.last_hidden is None:
            return None
        state = Prefilled(self.owner, self.ids, self.kv, self.last_hidden, self.exact)
        self.hand_overs -= 1
        if not self.hand_overs:
            self.last_hidden = None
            self.kv = None if not self.keep else self.kv
        return state

    def _take(self, hidden: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Record one slice's results: its hidden states [len, H] and the row's keys/values so far."""
        start, stop = self.done, self.done + hidden.shape[0]
        if self.carry is not None:  # the hidden state before this slice predicts its first token
            hidden, start, self.carry = torch.cat([self.carry, hidden]), start - 1, None
        last = min(stop, len(self.ids) - 1)  # the prompt's last token predicts nothing that is scored
        if last > start:
            self.result += self._score(hidden[: last - start], self.ids[start + 1 : last + 1])
        self.done = stop
        if self.keep and self.finished:
            self.carry = hidden[-1:]
        if self.hand_overs and self.finished:
            self.last_hidden = hidden[-1:]
        # free the keys/values at once when done, unless a shared start or a generation continues from them
        self.kv = None if self.finished and not (self.keep or self.hand_overs) else kv

    def _score(self, hidden: torch.Tensor, targets: list[int]) -> list[TokenLogprobs]:
        out = []
        rows = min_rows(self.base.model) if self.exact else 0
        for begin in range(0, len(targets), HEAD_CHUNK):
            part = targets[begin : begin + HEAD_CHUNK]
            head = hidden[begin : begin + len(part)]
            if head.shape[0] < rows:  # row-exact: the LM head's product never has fewer rows than min_rows
                head = torch.cat([head, head[-1:].expand(rows - head.shape[0], -1)])
            logp = torch.log_softmax(lm_logits(self.base.model, head)[: len(part)], dim=-1)
            chosen = logp.gather(1, torch.tensor(part, device=logp.device).unsqueeze(1)).squeeze(1).tolist()
            if self.top_n > 0:
                values, top_ids = torch.topk(logp, min(self.top_n, logp.shape[-1]), dim=-1)
                tops = [
                    [(int(i), _finite(float(v))) for i, v in zip(r_ids, r_vals)]
                    for r_ids, r_vals in zip(top_ids.tolist(), values.tolist())
                ]
            else:
                tops = [[] for _ in chosen]
            out += [TokenLogprobs(t, _finite(c), top) for t, c, top in zip(part, chosen, tops)]
        return out


@torch.no_grad()
def advance_together(scorers: list[PromptScorer]) -> list[bool]:
    """Run the next slice of every scorer in one forward; per scorer, True when its prompt is scored.

    Each row is laid out as the decode batch's prefill: [left pads | its keys/values so far | its slice | right pads],
    with its own positions (n + start, ...); masked keys have no effect, and in row-exact mode (bf16) attention runs
    row by row and every matrix product keeps at least `min_rows` rows, so a row's values do not depend on the others.
    """
    todo = [s for s in scorers if not s.finished]
    if todo:
        _run_slices(todo)
    return [s.finished for s in scorers]


@torch.no_grad()
def share_starts(scorers: list[PromptScorer], block: int = PREFILL_CHUNK) -> int:
    """Before their first slice, prompts of one adapter that begin with the same `block`-aligned tokens (the choices
    of one multiple-choice question: context + each answer; questions that share an instruction) run that start once:
    it is scored as a prompt of its own (a "head") and each prompt continues from it (`continue_from`). Starts form a
    tree (a question's context within the instruction that every question begins with): a head continues from the
    longest shorter head it begins with, heads of one depth run in one batched forward. A start is at most one slice
    (`slice_tokens`), so sharing never makes a tick run longer than the prompts' own slices would. Returns how many
    prompt tokens were not run again.

    Exact in row-exact mode: a start ends on a multiple of the attention chunk, so every row's values are those of
    the prompt scored alone (what the prefix cache relies on for generation); fp32 differs by rounding."""
    members, parents = _starts([s for s in scorers if s.done == 0 and not s.keep], block)
    like = {key[0]: group[0] for key, group in members.items() if group}  # a prompt of each run: its adapter
    heads = {key: _head(like[key[0]], list(key[1])) for key in members}
    todo = list(members)
    while todo:  # in waves: the heads whose shorter head (if any) is done, batched
        wave = [key for key in todo if parents[key] not in todo]
        for key in wave:
            if parents[key] is not None:
                heads[key].continue_from(heads[parents[key]])
        while not all(advance_together([heads[key] for key in wave])):
            pass
        for key in wave:
            for s in members[key]:
                s.continue_from(heads[key])
        todo = [key for key in todo if key not in wave]
    run_by_heads = sum(len(key[1]) - (len(parents[key][1]) if parents[key] else 0) for key in members)
    return sum(s.done for group in members.values() for s in group) - run_by_heads


def _starts(fresh: list[PromptScorer], block: int) -> tuple[dict[tuple, list[PromptScorer]], dict[tuple, tuple | None]]:
    """The shared starts of these prompts, (run, tokens) -> the prompts that continue from it directly: each prompt's
    longest block-aligned start shared with another, the branching points of those starts, and only starts that two
    prompts or heads use (a prompt of an unused start moves to the next shorter one); and each start's parent."""
    starts: dict[tuple, list[PromptScorer]] = {}
    for s in fresh:
        length = max((_common(s.ids, o.ids) for o in fresh if o is not s and _run(o) == _run(s)), default=0)
        # at least one token of each prompt left to run; a start is one slice, so it runs in one tick
        length = min(length, len(s.ids) - 1, s.slice_tokens) // block * block
        if length:
            starts.setdefault((_run(s), tuple(s.ids[:length])), []).append(s)
    grown = True
    while grown:  # where two starts of one run part, their common start is one too
        grown = False
        for a in list(starts):
            for b in list(starts):
                length = _common(a[1], b[1]) // block * block
                if a[0] == b[0] and a != b and length and (a[0], a[1][:length]) not in starts:
                    starts[(a[0], a[1][:length])], grown = [], True
    while True:
        parents = {key: _parent(key, starts) for key in starts}
        unused = [k for k in starts if len(starts[k]) + sum(p == k for p in parents.values()) < 2]
        if not unused:
            return starts, parents
        key = max(unused, key=lambda k: len(k[1]))
        if parents[key] is not None:
            starts[parents[key]] += starts[key]
        del starts[key]


def _head(like: PromptScorer, ids: list[int]) -> PromptScorer:
    """A scorer of a shared start: like `like` (adapter, top_n, slices), keeping its state when done."""
    head = PromptScorer(like.base, None, ids, like.top_n, like.slice_tokens)
    head.owner, head.n, head.kv, head.keep = like.owner, like.n, like.kv, True
    return head


def _begins(key: tuple, start: tuple) -> bool:
    """True when `key`'s tokens begin with `start`'s, in the same run."""
    return key[0] == start[0] and key[1][: len(start[1])] == start[1]


def _parent(key: tuple, starts: dict) -> tuple | None:
    """The longest other start that this start begins with."""
    inner = [k for k in starts if len(k[1]) < len(key[1]) and _begins(key, k)]
    return max(inner, key=lambda k: len(k[1]), default=None)


def _run(s: PromptScorer) -> tuple:
    return (s.owner, s.top_n, s.slice_tokens)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _run_slices(scorers: list[PromptScorer]) -> None:
    base = scorers[0].base
    model, device, exact = base.model, base.device, scorers[0].exact
    lengths = [s.next_tokens for s in scorers]
    runs = [s.ids[s.done : s.done + length] for s, length in zip(scorers, lengths)]
    fronts = [s.n + s.done for s in scorers]  # keys in front of each row's slice
    pad = base.tokenizer.pad_token_id or 0
    # row-exact: no product with fewer rows than min_rows
    layout = prefill_layout(runs, fronts, pad, device, min_rows(model) if exact else 0)
    width = layout.width
    embeds = model.get_input_embeddings()(layout.ids)
    with row_exact(chunk=PREFILL_CHUNK) if exact else nullcontext():
        hidden, cache = run_body(
            model,
            embeds,
            layout.mask,
            layout.positions,
            cache=make_cache(right_aligned_kv([s.kv for s in scorers], width)),
            use_cache=True,
        )
    kv = cache_tensors(cache)
    for b, (scorer, length) in enumerate(zip(scorers, lengths)):
        cols = slice(width - fronts[b], width + length)
        scorer._take(hidden[b, :length], [(k[b : b + 1, :, cols], v[b : b + 1, :, cols]) for k, v in kv])


def right_aligned_kv(rows: list[list[tuple[torch.Tensor, torch.Tensor]] | None], width: int):
    """Per layer (keys, values) [B, kv_heads, width, head_dim] from each row's per-layer keys/values
    [1, kv_heads, len, head_dim] (None: nothing yet), right-aligned, zeros on the left; None when no row has any."""
    like = next((row for row in rows if row is not None), None)
    if like is None:
        return None
    out = []
    for layer, (k0, v0) in enumerate(like):
        keys = k0.new_zeros(len(rows), k0.shape[1], width, k0.shape[3])
        values = v0.new_zeros(len(rows), v0.shape[1], width, v0.shape[3])
        for b, row in enumerate(rows):
            if row is not None:
                k, v = row[layer]
                keys[b, :, width - k.shape[2] :] = k[0]
                values[b, :, width - v.shape[2] :] = v[0]
        out.append((keys, values))
    return out


def prompt_logprobs(base, cache: PromptCache, adapter: str | None, ids: list[int], top_n: int) -> list[TokenLogprobs]:
    """Each prompt token's log-probability given the soft prompt and the tokens before it (the first token's is
    None: OpenAI's and vLLM's convention, kept with an adapter too), and the top_n most likely tokens there.

    The prompt runs alone on top of the adapter's cached keys/values, at the positions the engine gives it (N, N+1,
    ...), slice by slice (PromptScorer, what the server's worker runs between decode steps)."""
    scorer = PromptScorer(base, None if adapter is None else cache.entry(adapter), ids, top_n)
    while not scorer.advance():
        pass
    return scorer.result
