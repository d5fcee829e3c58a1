"""What the server adds to the engine's DecodeBatch: log-probabilities, prompt scoring.

- `ServeRequest` is a GenerationRequest with `logprobs` (None: none; N >= 0: the chosen token's log-probability and
  the N most likely tokens). OpenAI's presence/frequency penalties and logit_bias, and the repetition penalty and
  n-gram ban, are GenerationRequest fields that the engine applies to each row's own fp32 logits
  (inference/sampling.process_logits), the same code for generate, chat, eval and the server.
- `ServeBatch` is a DecodeBatch whose events carry the log-probabilities (`ScoredEvent`). Everything is computed per row from that row's logits only, so a request
  gives the same tokens and log-probabilities alone or in any mixed batch (the engine guarantees the logits).
- `prompt_logprobs` scores a prompt's own tokens after an adapter's cached soft-prompt keys/values (echo with
  logprobs; what lm-evaluation-harness reads for log-likelihood tasks). It runs one prompt alone, so it too does
  not depend on what else the server is doing.

Log-probabilities are those of the model's raw distribution (log-softmax of the logits, before temperature,
top-k/top-p, penalties and logit_bias), as vLLM returns them by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from softprompt.core.forward import lm_logits, make_cache, run_body
from softprompt.inference.engine import DecodeBatch, GenerationRequest, TokenEvent
from softprompt.inference.prompt_cache import PromptCache

NEG_INF_LOGPROB = -9999.0  # what an impossible token's log-probability is reported as (JSON has no -inf), as vLLM
HEAD_CHUNK = 128           # prompt positions per LM-head chunk when scoring a prompt


@dataclass(eq=False)
class ServeRequest(GenerationRequest):
    """A GenerationRequest with log-probability reporting (the penalties and logit_bias are GenerationRequest's)."""

    logprobs: int | None = None    # None: no log-probabilities; N: the chosen token's and the N most likely


@dataclass(eq=False)
class TokenLogprobs:
    """One token's log-probability and the most likely alternatives at its place (token id -> log-probability,
    most likely first)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass(eq=False)
class ScoredEvent(TokenEvent):
    """A TokenEvent with the chosen token's log-probabilities (None unless the request asked for them)."""

    logprobs: TokenLogprobs | None = None


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


class ServeBatch(DecodeBatch):
    """A DecodeBatch that applies ServeRequest's logit processing per row and reports log-probabilities."""

    def _accept(self, rows, logits: torch.Tensor):
        events = super()._accept(rows, logits)  # penalties and logit_bias: the engine's (sampling.process_logits)
        scored = []
        for index, (row, event) in enumerate(zip(rows, events)):
            asked = getattr(row.request, "logprobs", None)
            info = token_logprobs(logits[index], event.token_id, asked) if asked is not None else None
            values = {f.name: getattr(event, f.name) for f in dataclasses.fields(TokenEvent)}
            scored.append(ScoredEvent(**values, logprobs=info))
        return scored


@torch.no_grad()
def prompt_logprobs(base, cache: PromptCache, adapter: str | None, ids: list[int], top_n: int
                    ) -> list[TokenLogprobs]:
    """Each prompt token's log-probability given the soft prompt and the tokens before it (the first token's is
    None: OpenAI's and vLLM's convention, kept with an adapter too), and the top_n most likely tokens there.

    The prompt runs alone on top of the adapter's cached keys/values, at the positions the engine gives it (N, N+1,
    ...), so the values equal those the engine computes for the same prefix."""
    model, device = base.model, base.device
    kv, n = cache.get(adapter)
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    mask = torch.ones(1, n + len(ids), dtype=torch.long, device=device)
    positions = torch.arange(n, n + len(ids), device=device).unsqueeze(0)
    embeds = model.get_input_embeddings()(tokens)
    hidden, _ = run_body(model, embeds, mask, positions, cache=make_cache(list(kv)) if kv else None)
    out = [TokenLogprobs(ids[0], None, None)]
    for start in range(0, len(ids) - 1, HEAD_CHUNK):
        stop = min(start + HEAD_CHUNK, len(ids) - 1)
        logp = torch.log_softmax(lm_logits(model, hidden[0, start:stop]), dim=-1)
        targets = torch.tensor(ids[start + 1:stop + 1], device=logp.device)
        chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        if top_n > 0:
            values, top_ids = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)
            tops = [[(int(i), _finite(float(v))) for i, v in zip(r_ids, r_vals)]
                    for r_ids, r_vals in zip(top_ids.tolist(), values.tolist())]
        else:
            tops = [[] for _ in chosen]
        out += [TokenLogprobs(t, _finite(c), top) for t, c, top in zip(ids[start + 1:stop + 1], chosen, tops)]
    return out
