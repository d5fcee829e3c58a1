"""Prepacked oneDNN weights for bf16 linear layers on the CPU (inference), and for the LM head's gradient product in
training (`head_gradient`, at the end).

A bf16 `F.linear` on the CPU hands the product to oneDNN with the weight in PyTorch's plain [out, in] layout, and
oneDNN reorders it into its blocked layout on every call: with the few rows of a decode step that reorder costs as
much as the product (~5 GB/s of weights read). `torch.ops.mkldnn._reorder_linear_weight` does the reorder once and
`torch.ops.mkldnn._linear_pointwise` multiplies with the result; it runs the same kernel, so the outputs are the same
bits, for any row count (checked per layer when it is packed: a layer whose probe differs is left unpacked).

fp32 is left alone: its products run MKL, and oneDNN's fp32 kernel rounds differently. Packed weights are a second
copy of each packed layer's weight (SmolLM2-135M: +270 MB), so they are made where generation starts
(`DecodeBatch`), not when a model loads. A packed layer falls back to `F.linear` whenever autograd needs the product
(training), the input is not bf16 on the CPU, the weight was replaced or changed in place since packing, or within
`packed_weights(False)` (benchmarks: the plain model, e.g. for Hugging Face's `generate`).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_ENABLED: ContextVar[bool] = ContextVar("softprompt_packed_weights", default=True)
PROBE_ROWS = (1, 2, 3, 17)  # row counts a packed layer must reproduce bit for bit before it is used


@dataclass
class _Packed:
    source: torch.Tensor  # the weight it was packed from
    version: int  # that weight's in-place version counter at packing time
    weight: torch.Tensor  # oneDNN's blocked layout


@contextmanager
def packed_weights(enabled: bool):
    """Within this block, packed layers use their packed weight (True) or the plain `F.linear` (False)."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """False within `packed_weights(False)`."""
    return _ENABLED.get()


def supported() -> bool:
    """True where this PyTorch build can pack bf16 linear weights for oneDNN on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packed_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed: _Packed = module._softprompt_packed
    weight = module.weight
    if (
        not _ENABLED.get()
        or x.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or packed.source is not weight
        or packed.version != weight._version
    ):
        return F.linear(x, weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed.weight, module.bias, "none", [], "")


def _same_bits(module: torch.nn.Linear, weight: torch.Tensor) -> bool:
    """The packed product equals `F.linear` on seeded random rows, for each of PROBE_ROWS row counts."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(max(PROBE_ROWS), module.in_features, generator=generator).to(torch.bfloat16)
    for rows in PROBE_ROWS:
        plain = F.linear(x[:rows], module.weight, module.bias)
        mine = torch.ops.mkldnn._linear_pointwise(x[:rows], weight, module.bias, "none", [], "")
        if not torch.equal(plain, mine):
            return False
    return True


@torch.no_grad()
def use_packed_linears(model: torch.nn.Module) -> int:
    """Pack every bf16 CPU `nn.Linear` of `model` whose packed product gives the same bits; returns how many layers
    use a packed weight. Idempotent (already packed layers are kept, or repacked if their weight changed)."""
    if not supported():
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            continue
        packed = getattr(module, "_softprompt_packed", None)
        if packed is None or packed.source is not weight or packed.version != weight._version:
            blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            if not _same_bits(module, blocked):
                continue
            module._softprompt_packed = _Packed(weight, weight._version, blocked)
            module.forward = _packed_forward.__get__(module)
        count += 1
    return count


@dataclass
class HeadGradient:
    """The hidden-state gradient product of an LM head, d W, in bf16 on the CPU from a prepacked W^T (training's
    fused head loss, core/forward.py `_FusedHeadNLL`). The head keeps it with the weight and version it was made
    from (`head_gradient`)."""

    transposed: torch.Tensor  # W^T in oneDNN's layout

    def __call__(self, d_logits: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(d_logits, self.transposed, None, "none", [], "")


PROBE_HEAD_ROWS = (*PROBE_ROWS, 128)  # and a full chunk of the fused head (forward.HEAD_CHUNK)


@torch.no_grad()
def head_gradient(head: torch.nn.Module) -> HeadGradient | None:
    """The packed gradient product of an LM head (nn.Linear, bf16, CPU), made on first use and kept on the module
    (a copy of its weight: SmolLM2-135M's 49,152 x 576 head, +57 MB) until its weight is replaced or changed in
    place; None where it does not apply (other dtype or device, no oneDNN packing, `packed_weights(False)`) or where
    it does not give the plain product's bits on seeded probe rows (`PROBE_HEAD_ROWS`; then it is not tried again
    for that weight).

    The fused head multiplies each chunk of label rows' logit gradients [rows, vocabulary] by the weight itself
    (d W, the weight read transposed), and oneDNN reorders the 57 MB weight for that on every call: on an AMD EPYC
    (AVX-512 BF16) a 128-row chunk took 31 ms plain and 21 ms packed. The logits product h W^T gains less (26 vs
    21 ms) and is left plain: its packed copy would cost another 57 MB, which on short-record data sets is the margin
    to the reference recipe's peak memory (docs/benchmarks.md, "Training throughput and memory")."""
    weight = getattr(head, "weight", None)
    if (
        not _ENABLED.get()
        or not isinstance(head, torch.nn.Linear)
        or weight.dtype != torch.bfloat16
        or weight.device.type != "cpu"
        or not supported()
    ):
        return None
    known = getattr(head, "_softprompt_head_gradient", None)
    if known is not None and known[0] is weight and known[1] == weight._version:
        return known[2]
    transposed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().t().contiguous())
    generator = torch.Generator().manual_seed(0)
    d = torch.randn(max(PROBE_HEAD_ROWS), head.out_features, generator=generator).to(torch.bfloat16)
    same = all(
        torch.equal(d[:n] @ weight, torch.ops.mkldnn._linear_pointwise(d[:n], transposed, None, "none", [], ""))
        for n in PROBE_HEAD_ROWS
    )
    product = HeadGradient(transposed) if same else None
    head._softprompt_head_gradient = (weight, weight._version, product)
    return product
