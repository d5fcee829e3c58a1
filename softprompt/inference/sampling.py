"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with one generator per request.

Each request draws its random numbers from its own CPU `torch.Generator`, so a seeded request produces the same
tokens whatever else is in the batch (and on CPU or GPU up to floating-point rounding of the probabilities).
"""

from __future__ import annotations

import torch


def check_params(temperature: float, top_k: int, top_p: float, max_new_tokens: int | None = None) -> None:
    """Raise ValueError for sampling settings that make no sense."""
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


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator) -> int:
    """One sampled token id from one row of logits [V] (inverse-CDF with a uniform draw from `generator`)."""
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.rand(1, generator=generator).to(cdf.device, cdf.dtype) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True).item())
    index = min(index, probs.shape[-1] - 1)
    while probs[index] == 0 and index > 0:  # rounding at the top of the CDF: step back to a kept token
        index -= 1
    return index


def next_tokens(logits: torch.Tensor, settings: list[tuple[float, int, float]],
                generators: list[torch.Generator]) -> list[int]:
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
