"""The forward pass with a soft prompt: [soft prompt ; token embeddings] -> frozen model -> loss on answer tokens.

Used by training and evaluation; generation reuses `prompt_kv` and `run_body` with a cache (see kvcache.py).

Two equivalent ways to put the prompt in front (tests check they agree):
- `kv` (default): run the N virtual tokens once (batch 1), then expand their keys/values to every row and run the
  text on top of them. The prompt is the same for every row, so this saves (B-1)*N token positions per batch.
- `concat`: the textbook [prompt ; embeddings] concatenation (needed with gradient checkpointing, which re-runs
  layers and so cannot share a cache object).

Position ids are always explicit: virtual tokens take 0..N-1 and each row's real tokens continue N, N+1, ...
counting only unmasked tokens, so a row's result does not depend on padding side or on how many pads it has.
The LM head is applied only at positions that have a label, never to the whole sequence.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache

Kv = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, kv_heads, seq, head_dim]


def cache_kwarg(model) -> str:
    """transformers 5.24 renamed the forward kwarg past_key_values -> cache; support both spellings."""
    body = model.base_model
    name = getattr(body, "_softprompt_cache_kwarg", None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        body._softprompt_cache_kwarg = name
    return name


def make_cache(kv: Kv | None = None) -> DynamicCache:
    """A transformers cache holding the given per-layer keys/values (or an empty one)."""
    return DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()


def cache_tensors(cache) -> Kv:
    """Per-layer (keys, values) out of a transformers cache."""
    return [(entry[0], entry[1]) for entry in cache]


def positions_from_mask(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position of each token = number of real tokens before it (+ offset); pads get a harmless position."""
    pos = mask.long().cumsum(-1) - 1
    if not isinstance(offset, int):
        offset = offset.view(-1, 1)
    return (pos + offset).clamp(min=0)


def run_body(model, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache=None, use_cache: bool = False):
    """Run the decoder stack (no LM head). attention_mask covers cached + new positions."""
    kwargs = {cache_kwarg(model): cache} if cache is not None else {}
    out = model.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=use_cache, **kwargs)
    return out.last_hidden_state, (cache if use_cache else None)


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM head (+ final soft-capping where the model has it), in fp32."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def prompt_kv(model, prompt: torch.Tensor) -> tuple[Kv, torch.Tensor]:
    """Keys/values of the virtual tokens at positions 0..N-1 (batch 1), and the last virtual token's hidden state.

    They do not depend on what follows, so generation computes them once per adapter; training recomputes them each
    step (they carry the gradient to the prompt).
    """
    dtype = model.get_input_embeddings().weight.dtype
    embeds = prompt.to(dtype).unsqueeze(0)
    n = embeds.shape[1]
    mask = torch.ones(1, n, dtype=torch.long, device=embeds.device)
    pos = torch.arange(n, device=embeds.device).unsqueeze(0)
    hidden, cache = run_body(model, embeds, mask, pos, cache=make_cache(), use_cache=True)
    return cache_tensors(cache), hidden[0, -1]


def text_hidden(model, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mode: str = "kv") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states at the text positions [B, L, H] with the soft prompt in front, plus the hidden state that
    predicts the first text token (the last virtual token's; None without a prompt)."""
    embeds = model.get_input_embeddings()(input_ids)
    if prompt is None:
        hidden, _ = run_body(model, embeds, attention_mask, positions_from_mask(attention_mask))
        return hidden, None
    batch, n = input_ids.shape[0], prompt.shape[0]
    ones = torch.ones(batch, n, dtype=attention_mask.dtype, device=attention_mask.device)
    full_mask = torch.cat([ones, attention_mask], dim=1)
    if mode == "concat":
        p = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        hidden, _ = run_body(model, torch.cat([p, embeds], dim=1), full_mask, positions_from_mask(full_mask))
        return hidden[:, n:], hidden[0, n - 1]
    if mode != "kv":
        raise ValueError(f"unknown prefix mode {mode!r}: use 'kv' or 'concat'")
    kv, last = prompt_kv(model, prompt)
    expanded = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    hidden, _ = run_body(model, embeds, full_mask, positions_from_mask(attention_mask, n), cache=make_cache(expanded))
    return hidden, last


def label_nll(model, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor, mode: str = "kv") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed negative log-likelihood of the label tokens and per-row label counts.

    labels follow the Hugging Face convention: same shape as input_ids, -100 where there is nothing to learn; the
    token at t is predicted from position t-1 (from the last virtual token for t = 0).
    """
    hidden, last = text_hidden(model, prompt, input_ids, attention_mask, mode)
    if last is not None:
        previous = torch.cat([last.expand(hidden.shape[0], 1, -1), hidden[:, :-1]], dim=1)
        targets = labels
    else:
        previous, targets = hidden[:, :-1], labels[:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    logits = lm_logits(model, previous[rows, cols])
    nll = F.cross_entropy(logits, targets[rows, cols], reduction="none")
    per_row = torch.zeros(hidden.shape[0], dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)
    counts = torch.bincount(rows, minlength=hidden.shape[0])
    return per_row, counts


def text_logits(model, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mode: str = "kv") -> torch.Tensor:
    """Full logits at the text positions [B, L, V] — for tests and small inspections, not for training."""
    hidden, _ = text_hidden(model, prompt, input_ids, attention_mask, mode)
    return lm_logits(model, hidden)
