"""Fused projections for the decode step (inference only): q/k/v as one matrix product, gate/up as another.

A decode step multiplies one row (or a few) by every weight matrix of the model. Each product costs the read of its
weight plus a fixed overhead per call (dispatch, the BLAS call's setup, the output allocation); a Llama layer has
seven of them. Concatenating the q, k and v weights (and the gate and up weights) along their output dimension
gives two products where there were five. Each output element is still the dot product of the same input row with
the same weight row, summed over the input dimension in the same order: MKL (fp32) and oneDNN (bf16) split the
work over output columns and threads, not over that sum, so the outputs are the same bits as the separate products.
That is checked per group when it is fused (`PROBE_ROWS` seeded random rows, at one thread and at the current
thread count, against the modules' own forward, prepacked or not); a group whose probe differs is left unfused.

The concatenated weights are a copy (SmolLM2-135M: +276 MB in fp32; in bf16 the copy is the prepacked oneDNN layout
of core/packed.py, +138 MB), so they are made where generation starts (`DecodeBatch`, when `DecodeBatch.fused` says
so: by default in bf16 on a CPU with native bf16, where each oneDNN product costs ~15 us besides its weight read and
fusing saves three of the seven per layer; not in fp32, where MKL's per-call cost is small and on some CPUs its
one-row product rounds a concatenated weight differently; docs/benchmarks.md, "Decode step"), not when a model
loads. A fused group steps aside (`fused_product` returns None: the caller runs the separate products) whenever
autograd needs the product, one of its weights was replaced or changed in place since fusing, or, for a prepacked
group, within `packed_weights(False)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softprompt.core import packed

GROUPS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "gate_up": ("mlp", ("gate_proj", "up_proj"))}
PROBE_ROWS = packed.PROBE_ROWS


@dataclass
class Fused:
    """One group's concatenated weight [sum of out_features, in_features] (or its oneDNN layout) and bias."""

    sources: tuple[torch.Tensor, ...]  # the modules' weights it was made from
    versions: tuple[int, ...]  # their in-place version counters at fusing time
    weight: torch.Tensor | None  # None: the probe differed (kept, so that the group is not probed again)
    bias: torch.Tensor | None
    prepacked: bool  # weight is oneDNN's blocked bf16 layout (core/packed.py)

    def current(self, modules: list[torch.nn.Linear]) -> bool:
        """True while every module still has the weight this was made from, unchanged."""
        return all(m.weight is s and m.weight._version == v for m, s, v in zip(modules, self.sources, self.versions))


def _modules(layer: torch.nn.Module, group: str) -> list[torch.nn.Linear] | None:
    parent, names = GROUPS[group]
    owner = getattr(layer, parent, None)
    modules = [getattr(owner, name, None) for name in names]
    return modules if all(isinstance(m, torch.nn.Linear) for m in modules) else None


def _product(fused: Fused, x: torch.Tensor) -> torch.Tensor:
    if fused.prepacked:
        return torch.ops.mkldnn._linear_pointwise(x, fused.weight, fused.bias, "none", [], "")
    return F.linear(x, fused.weight, fused.bias)


def _same_bits(fused: Fused, modules: list[torch.nn.Linear]) -> bool:
    """The fused product, split, equals the modules' own products on seeded random rows, for each of PROBE_ROWS row
    counts, at one thread and at the current thread count."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(max(PROBE_ROWS), modules[0].in_features, generator=generator).to(modules[0].weight.dtype)
    sizes = [m.out_features for m in modules]
    threads = torch.get_num_threads()
    try:
        for count in dict.fromkeys((1, threads)):
            torch.set_num_threads(count)
            for rows in PROBE_ROWS:
                mine = _product(fused, x[:rows]).split(sizes, dim=-1)
                if not all(torch.equal(m(x[:rows]), part) for m, part in zip(modules, mine)):
                    return False
    finally:
        torch.set_num_threads(threads)
    return True


def _fuse(modules: list[torch.nn.Linear]) -> Fused | None:
    weights = [m.weight for m in modules]
    biases = [m.bias for m in modules]
    if any((b is None) != (biases[0] is None) for b in biases) or len({w.dtype for w in weights}) > 1:
        return None
    weight = torch.cat([w.detach() for w in weights])
    bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
    prepack = weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and packed.supported()
    if prepack:
        weight = torch.ops.mkldnn._reorder_linear_weight(weight)
    fused = Fused(tuple(weights), tuple(w._version for w in weights), weight, bias, prepack)
    if not _same_bits(fused, modules):
        fused.weight = fused.bias = None
    return fused


@torch.no_grad()
def use_fused_projections(layers) -> int:
    """Fuse each layer's q/k/v and gate/up products where the fused product gives the same bits; returns how many
    groups are fused. Idempotent (a fused group is kept, or made again if one of its weights changed)."""
    count = 0
    for layer in layers:
        for group in GROUPS:
            modules = _modules(layer, group)
            if modules is None:
                continue
            attr = f"_softprompt_fused_{group}"
            fused = getattr(layer, attr, None)
            if fused is None or not fused.current(modules):
                fused = _fuse(modules)
                setattr(layer, attr, fused)
            count += fused is not None and fused.weight is not None
    return count


def fused_product(layer: torch.nn.Module, group: str, x: torch.Tensor) -> torch.Tensor | None:
    """The group's products of x concatenated along the last dimension ([..., sum of out_features]), from the fused
    weight; None where there is none to use (not fused, stale, autograd, prepacking off)."""
    fused: Fused | None = getattr(layer, f"_softprompt_fused_{group}", None)
    if fused is None or fused.weight is None or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if fused.prepacked and (not packed.enabled() or x.dtype != torch.bfloat16):
        return None
    if not fused.current(_modules(layer, group)):
        return None
    return _product(fused, x)
