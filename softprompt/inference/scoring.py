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
        self.n = entry.num_virtual_tokens if entry is not None else 0
        self.kv = list(entry.kv) if entry is not None else None  # per layer [1, kv_heads, n + done, head_dim]
        self.exact = base.dtype != torch.float32
        if self.exact:
            use_grouped_sdpa(base.model)  # row by row needs softprompt's attention (a no-op once switched)
        self.done = 0  # prompt tokens run so far
        self.result: list[TokenLogprobs] = [TokenLogprobs(self.ids[0], None, None)]

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

    def _take(self, hidden: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Record one slice's results: its hidden states [len, H] and the row's keys/values so far."""
        start, stop = self.done, self.done + hidden.shape[0]
        last = min(stop, len(self.ids) - 1)  # the prompt's last token predicts nothing that is scored
        if last > start:
            self.result += self._score(hidden[: last - start], self.ids[start + 1 : last + 1])
        self.done = stop
        self.kv = None if self.finished else kv  # free the keys/values at once when done

    def _score(self, hidden: torch.Tensor, targets: list[int]) -> list[TokenLogprobs]:
        out = []
        for begin in range(0, len(targets), HEAD_CHUNK):
            part = targets[begin : begin + HEAD_CHUNK]
            logp = torch.log_softmax(lm_logits(self.base.model, hidden[begin : begin + len(part)]), dim=-1)
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
            model, embeds, layout.mask, layout.positions, cache=make_cache(_front_kv(scorers, width)), use_cache=True
        )
    kv = cache_tensors(cache)
    for b, (scorer, length) in enumerate(zip(scorers, lengths)):
        cols = slice(width - fronts[b], width + length)
        scorer._take(hidden[b, :length], [(k[b : b + 1, :, cols], v[b : b + 1, :, cols]) for k, v in kv])


def _front_kv(scorers: list[PromptScorer], width: int):
    """Per layer (keys, values) [B, kv_heads, width, head_dim]: each row's keys/values so far, right-aligned."""
    like = next((s.kv for s in scorers if s.kv is not None), None)
    if like is None:
        return None
    out = []
    for layer, (k0, v0) in enumerate(like):
        keys = k0.new_zeros(len(scorers), k0.shape[1], width, k0.shape[3])
        values = v0.new_zeros(len(scorers), v0.shape[1], width, v0.shape[3])
        for b, scorer in enumerate(scorers):
            if scorer.kv is not None:
                k, v = scorer.kv[layer]
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
