"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with one generator per request.

Each request draws its random numbers from its own CPU `torch.Generator`, so a seeded request produces the same
tokens whatever else is in the batch (and on CPU or GPU up to floating-point rounding of the probabilities).
"""

from __future__ import annotations

import torch


def check_params(
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> None:
    """Raise ValueError for sampling settings that make no sense."""
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {no_repeat_ngram_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or from fresh OS entropy when seed is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits of one row [V] with everything outside top-k / the top-p nucleus set to -inf."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the mass of the tokens before it is below top_p (the first one is always kept).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """One sampled token id from one row of logits [V] (inverse-CDF with a uniform draw from `generator`)."""
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.rand(1, generator=generator).to(cdf.device, cdf.dtype) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True).item())
    index = min(index, probs.shape[-1] - 1)
    while probs[index] == 0 and index > 0:  # rounding at the top of the CDF: step back to a kept token
        index -= 1
    return index


def next_tokens(
    logits: torch.Tensor, settings: list[tuple[float, int, float]], generators: list[torch.Generator]
) -> list[int]:
    """Next token per row of logits [B, V]; settings[i] = (temperature, top_k, top_p); temperature 0 or top_k 1
    means greedy (argmax, no random draw)."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    out = []
    for row, ((temperature, top_k, top_p), generator) in enumerate(zip(settings, generators)):
        if temperature == 0 or top_k == 1:
            out.append(greedy[row])
        else:
            out.append(sample_row(logits[row], temperature, top_k, top_p, generator))
    return out


def penalised(request) -> bool:
    """Whether a request (GenerationRequest) asks for any logit processing before the token choice."""
    return bool(
        request.presence_penalty
        or request.frequency_penalty
        or request.repetition_penalty != 1.0
        or request.no_repeat_ngram_size
        or request.logit_bias
    )


def banned_ngram_tokens(generated: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `generated` (the n-1 last tokens followed by them
    somewhere before)."""
    if n < 1 or len(generated) < n:
        return []
    if n == 1:
        return list(set(generated))
    tail = generated[-(n - 1) :]
    return list({generated[i + n - 1] for i in range(len(generated) - n + 1) if generated[i : i + n - 1] == tail})


def process_logits(logits: torch.Tensor, request, generated: list[int]) -> torch.Tensor:
    """One row's logits [V] after the request's penalties, n-gram ban and logit_bias (fp32; a new tensor).

    Only the tokens generated so far count (not the prompt, so an answer may repeat words of its input), as in
    OpenAI's and vLLM's presence/frequency definition: frequency_penalty * count + presence_penalty * (count > 0)
    is subtracted; repetition_penalty r (CTRL's, 1 = off) divides a positive logit of a generated token by r and
    multiplies a negative one; no_repeat_ngram_size n bans every token that would repeat an n-gram of the answer;
    then each logit_bias entry is added."""
    out = logits.float().clone()
    if generated and (request.presence_penalty or request.frequency_penalty or request.repetition_penalty != 1.0):
        ids = torch.tensor(generated, dtype=torch.long, device=out.device)
        counts = torch.bincount(ids, minlength=out.shape[-1]).to(out.dtype)
        seen = counts > 0
        if request.repetition_penalty != 1.0:
            r = request.repetition_penalty
            out = torch.where(seen, torch.where(out > 0, out / r, out * r), out)
        out -= request.frequency_penalty * counts + request.presence_penalty * seen.to(out.dtype)
    banned = banned_ngram_tokens(generated, request.no_repeat_ngram_size)
    if banned:
        out[torch.tensor(banned, dtype=torch.long, device=out.device)] = float("-inf")
    for token, bias in (request.logit_bias or {}).items():
        out[token] += bias
    return out


# A greedy answer is "stuck in a loop" when it ran to its token limit and its last LOOP_WINDOW tokens are periodic
# with a period of at most LOOP_MAX_PERIOD tokens (the same block of 1..16 tokens repeated at least twice, to the end).
LOOP_WINDOW, LOOP_MAX_PERIOD = 32, 16


def is_looping(
    token_ids: list[int], hit_length_limit: bool, window: int = LOOP_WINDOW, max_period: int = LOOP_MAX_PERIOD
) -> bool:
    """Whether an answer is stuck in a repetition loop (see LOOP_WINDOW)."""
    if not hit_length_limit or len(token_ids) < window:
        return False
    tail = token_ids[-window:]
    return any(all(tail[i] == tail[i + p] for i in range(window - p)) for p in range(1, max_period + 1))
