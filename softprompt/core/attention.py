"""Attention for grouped-query models on the CPU: PyTorch SDPA reading the grouped key/value heads in place, and a
row-exact mode for batch-invariant generation.

transformers' "sdpa" function copies the key/value heads of grouped-query-attention models (`repeat_kv`) whenever it
passes an attention mask, because CUDA's fused kernels cannot take a mask and grouped heads together. PyTorch's CPU
flash kernel can, so on the CPU that copy is pure overhead: one full-head key and value tensor per layer that autograd
keeps for the backward pass (on SmolLM2-135M, 9 heads over 3: 3 KB per token per layer, about a tenth of training's
saved activations). `grouped_sdpa` hands the grouped heads straight to the kernel on the CPU and defers to
transformers' own sdpa function everywhere else (CUDA, no mask, single-token decoding, position biases).

Row-exact mode (`row_exact()`, used by the generation engine): attention kernels choose their blocking and
reduction order from the key length, and a batch's key length (and where a row's keys sit in it: left pads)
depends on the other rows. In fp32 the resulting rounding differences are
~1e-7 and rarely change a token; in bf16 they flip the rounding of the bf16 output, which then grows through the
layers and changes greedy tokens. In row-exact mode each row's attention runs on its own: its real keys and real
queries are gathered into fresh contiguous tensors (the same tensors whether the row is alone or in any batch), with
the row's own slice of the mask (a sliding window's too: the engine keeps a row's keys contiguous, so the slice is
the same in any batch), so the kernel sees identical inputs and returns identical outputs. Rows at or past
`live` (ghost rows the engine adds to keep matrix products off the one-row path) are skipped.

The kernel's result for one query also depends on how many keys the call holds, even masked ones (its reduction
blocking follows the key length): a prompt token computed in a 40-token prefill and in a 60-token one differs in
the last bf16 bit. `row_exact(chunk=C)` therefore runs a row's queries in chunks of C aligned to the first query,
each over the keys up to that chunk's last query only. A query whose chunk is full then sees exactly the keys
before the end of its chunk whatever follows it in the prompt, so the keys/values of a full C-token block depend on
that block and the tokens before it only (what the prefix cache needs: a block stored by one prompt is bit for bit
the block another prompt would compute).

`use_grouped_sdpa(model)` registers it (with sdpa's mask builder) under NAME and switches a loaded model to it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "softprompt_sdpa"

# Queries per attention call in a row-exact prefill without a prefix cache: the prefix cache's default block size, so
# an engine with the default cache and one without compute every prompt token alike.
PREFILL_CHUNK = 16

ONEDNN_MIN_WORK = 16 * 16 * 16  # torch hands a bf16 product to oneDNN only when m * k * n exceeds this (ATen
# native/mkldnn/Matmul.cpp, checksize); smaller ones run torch's own kernel, which rounds differently


def min_rows(model) -> int:
    """The fewest rows a matrix product of this model may have in row-exact mode: 2 (oneDNN sums a one-row product in
    another order) or more where a layer is so small that fewer rows would leave oneDNN (tiny test models)."""
    rows = getattr(model, "_softprompt_min_rows", None)
    if rows is None:
        sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
        rows = max([2] + [ONEDNN_MIN_WORK // size + 1 for size in sizes])
        model._softprompt_min_rows = rows
    return rows


@dataclass
class _RowExact:
    live: int | None  # rows >= live are ghost rows (skipped); None = every row is real
    chunk: int | None = None  # queries per call, aligned to a row's first query (None: all at once)
    mask: object = None  # the 4-D mask the cached plan below was made from (one per forward)
    shape: tuple = ()
    plan: list = field(default_factory=list)


_ROW_EXACT: ContextVar[_RowExact | None] = ContextVar("softprompt_row_exact", default=None)


@contextmanager
def row_exact(live: int | None = None, chunk: int | None = None):
    """Within this block, attention through `grouped_sdpa` is computed row by row over each row's real keys, so a
    row's result does not depend on its batch-mates; `live`: only the first `live` rows are real; `chunk`: a row's
    queries run `chunk` at a time, each chunk over the keys up to its own last query."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    token = _ROW_EXACT.set(_RowExact(live, chunk))
    try:
        yield
    finally:
        _ROW_EXACT.reset(token)


def _row_plan(
    state: _RowExact, attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, device: torch.device
) -> list:
    """Per real row: (row, key index, query index, chunks), each chunk (first, end, seen, its [end - first, seen]
    mask or None): queries[first:end] over the row's first `seen` real keys. Made once per forward pass (every layer
    shares the mask) and reused by every layer."""
    shape = (batch, q_len, k_len)
    if state.plan and state.mask is attention_mask and state.shape == shape:
        return state.plan
    live = batch if state.live is None else min(state.live, batch)
    plan = []
    for b in range(live):
        if attention_mask is None:  # causal over all keys, nothing padded
            keys = torch.arange(k_len, device=device)
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        else:
            row = attention_mask[b, 0] if attention_mask.shape[0] > 1 else attention_mask[0, 0]
            row = row if row.dtype == torch.bool else row == 0
            keys = row.any(0).nonzero().flatten()  # every key some query sees (a sliding window hides early ones)
            mask = row.index_select(1, keys)
        queries = keys[keys >= k_len - q_len] - (k_len - q_len)  # the new tokens' own keys are the last q_len
        mask = mask.index_select(0, queries)
        step = state.chunk or len(queries) or 1
        own = (k_len - q_len + queries).tolist()  # each query's own key
        chunks = []
        for first in range(0, len(queries), step):
            end = min(first + step, len(queries))
            seen = int(torch.searchsorted(keys, own[end - 1], right=True))  # keys up to the chunk's last query
            part = mask[first:end, :seen]
            chunks.append((first, end, seen, None if bool(part.all()) else part))
        plan.append((b, keys, queries, chunks))
    state.mask, state.shape, state.plan = attention_mask, shape, plan
    return plan


def decode_plan(key_mask: torch.Tensor, live: int) -> list:
    """The row plan of a one-token step from the [B, T] key mask (1 = real key), for the first `live` rows: each
    row's one query over all its real keys. It is the plan `_row_plan` makes from the 4-D mask of the same step
    (a new token's query sees every real key), without building that mask."""
    plan = []
    query = torch.zeros(1, dtype=torch.long, device=key_mask.device)
    for b in range(live):
        keys = key_mask[b].nonzero().flatten()
        plan.append((b, keys, query, [(0, 1, len(keys), None)]))
    return plan


def planned_attention(plan: list, query, key, value, scaling) -> torch.Tensor:
    """Attention row by row as a row plan says: [B, Lq, heads, D], zeros for rows the plan skips (ghost rows)."""
    batch, heads, q_len, dim = query.shape
    out = query.new_zeros(batch, q_len, heads, value.shape[-1])
    gqa = key.shape[1] != heads
    for b, keys, queries, chunks in plan:
        q = query[b].index_select(1, queries).unsqueeze(0)
        k = key[b].index_select(1, keys).unsqueeze(0)
        v = value[b].index_select(1, keys).unsqueeze(0)
        for first, end, seen, mask in chunks:
            o = F.scaled_dot_product_attention(
                q[:, :, first:end], k[:, :, :seen], v[:, :, :seen], attn_mask=mask, scale=scaling, enable_gqa=gqa
            )
            out[b].index_copy_(0, queries[first:end], o[0].transpose(0, 1))
    return out


def decode_attention(plan: list, query, key, value, scaling) -> torch.Tensor:
    """`planned_attention` for a one-token step's plan (`decode_plan`), with fewer operations: [B, 1, heads, D].
    A row's query is its [1, heads, 1, D] slice of `query`: where that slice is contiguous (its heads and dimensions
    dense, as decode_body's are; the batch dimension has size 1 there), it is element for element and stride for
    stride the tensor index_select would copy; otherwise it is copied. Its keys/values are gathered as there."""
    batch, heads, _, _ = query.shape
    out = query.new_zeros(batch, 1, heads, value.shape[-1])
    gqa = key.shape[1] != heads
    for b, keys, _, _ in plan:
        q = query[b : b + 1]
        q = q if q.is_contiguous() else q.contiguous()
        k = key[b].index_select(1, keys).unsqueeze(0)
        v = value[b].index_select(1, keys).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
        out[b] = o[0].transpose(0, 1)
    return out


def _row_exact_sdpa(state: _RowExact, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
    batch, _, q_len, _ = query.shape
    plan = _row_plan(state, attention_mask, batch, q_len, key.shape[2], query.device)
    return planned_attention(plan, query, key, value, scaling)


def grouped_sdpa(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query [B, heads, Lq, D], key/value [B, kv_heads, Lk, D]."""
    state = _ROW_EXACT.get()
    if (
        state is not None
        and query.device.type == "cpu"
        and not dropout
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    ):
        return _row_exact_sdpa(state, module, query, key, value, attention_mask, scaling), None
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.device.type != "cpu"
        or groups == 1
        or attention_mask is None
        or query.shape[2] == 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model) -> bool:
    """Switch a model loaded with attn_implementation="sdpa" to `grouped_sdpa`; False (model unchanged) when the
    model uses another attention or cannot take a registered one."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        return True
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return model.config._attn_implementation == NAME
