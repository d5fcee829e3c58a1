"""Prepacked oneDNN weights for bf16 linear layers on the CPU (inference), and for the LM head's two products in
training (`head_products`, at the end).

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
class HeadProducts:
    """An LM head's two training products in bf16 on the CPU from prepacked weights (training's fused head loss,
    core/forward.py `_FusedHeadNLL`): the logits h W^T + b, and the hidden-state gradient d W. Each is None where
    its packed product did not give the plain one's bits on the probe (the caller then runs the plain product)."""

    source: torch.Tensor
    version: int
    weight: torch.Tensor | None  # W in oneDNN's layout, for the logits
    transposed: torch.Tensor | None  # W^T in oneDNN's layout, for d W

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight is None:
            return F.linear(hidden, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(hidden, self.weight, bias, "none", [], "")

    def gradient(self, d_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.transposed is None:
            return d_logits @ weight
        return torch.ops.mkldnn._linear_pointwise(d_logits, self.transposed, None, "none", [], "")


@torch.no_grad()
def head_products(head: torch.nn.Module) -> HeadProducts | None:
    """The packed training products of an LM head (nn.Linear, bf16, CPU), made on first use and kept on the module
    (two copies of its weight: SmolLM2-135M's 49,152 x 576 head, +113 MB) until its weight is replaced or changed in
    place; None where packing does not apply (other dtype or device, no oneDNN packing, `packed_weights(False)`).

    With the few hundred label rows of a training step, a plain bf16 product reorders the head's 57 MB weight into
    oneDNN's layout on every call, and the gradient product reads it transposed: on an AMD EPYC (AVX-512 BF16) the
    packed products of a 128-row chunk took 21 + 21 ms instead of 26 + 31 ms, with the same bits (probed here for
    `PROBE_ROWS` row counts and a chunk's, as `use_packed_linears` probes)."""
    weight = getattr(head, "weight", None)
    if (
        not _ENABLED.get()
        or not isinstance(head, torch.nn.Linear)
        or weight.dtype != torch.bfloat16
        or weight.device.type != "cpu"
        or not supported()
    ):
        return None
    known: HeadProducts | None = getattr(head, "_softprompt_head_products", None)
    if known is not None and known.source is weight and known.version == weight._version:
        return known
    generator = torch.Generator().manual_seed(0)
    rows = (*PROBE_ROWS, 128)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    x = torch.randn(max(rows), head.in_features, generator=generator).to(torch.bfloat16)
    if not all(
        torch.equal(
            F.linear(x[:n], weight, head.bias),
            torch.ops.mkldnn._linear_pointwise(x[:n], packed, head.bias, "none", [], ""),
        )
        for n in rows
    ):
        packed = None
    transposed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().t().contiguous())
    d = torch.randn(max(rows), head.out_features, generator=generator).to(torch.bfloat16)
    if not all(
        torch.equal(d[:n] @ weight, torch.ops.mkldnn._linear_pointwise(d[:n], transposed, None, "none", [], ""))
        for n in rows
    ):
        transposed = None
    head._softprompt_head_products = HeadProducts(weight, weight._version, packed, transposed)
    return head._softprompt_head_products
