"""`--shard-base`: the frozen base sharded over the training processes with FSDP2 (`torch.distributed.fsdp`).

For a base bigger than one device: every decoder layer is its own FSDP unit, so each process keeps 1/N of each
layer's weights and gathers one layer at a time (in the forward pass, and again in the backward pass, which needs
the weights for the activation gradients; the base gets no weight gradients, so nothing is reduce-scattered). The
decoder stack is the FSDP root. The input embedding (and the LM head, tied or not) stays whole on every process:
core/forward.py looks tokens up and runs the fused LM-head NLL outside the decoder stack's forward, where a sharded
weight is a DTensor that cannot mix with plain tensors; for a 70B Llama they are ~4 GB of its 140 GB in bf16.

The trainable prompt is not touched: every process holds all of it, and the loop sums its gradient with one
all-reduce as without sharding. What sharding asks of the loop is lock-step: every gather is a collective, so every
process must run the same sequence of forward and backward passes through the base (`Lockstep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.core.models import FrozenModel


@dataclass(frozen=True)
class ShardedBase:
    """What `shard_base` did: the process count and this process's share of the base's weight bytes."""

    processes: int
    layers: int
    local_bytes: int  # this process's bytes of the base's weights: its shards plus the whole embedding / head
    full_bytes: int  # all of the base's weight bytes (tied tensors once)
    sharded_full_bytes: int  # the decoder layers' bytes (sharded)
    whole_bytes: int  # the embedding's and LM head's bytes (whole on every process)

    def describe(self) -> str:
        gb = 1e9
        return (
            f"base sharded over {self.processes} processes (FSDP2, {self.layers} decoder layers): "
            f"{self.local_bytes / gb:.3g} GB of its {self.full_bytes / gb:.3g} GB of weights on each process "
            f"(the embedding and LM head, {self.whole_bytes / gb:.3g} GB, whole)"
        )


def load_args(shard: bool, processes: int, device: str | None, dtype: str | torch.dtype | None) -> dict:
    """load_base's device and dtype. A base to be sharded loads into host memory (in the dtype chosen for the
    device it will run on), and `shard_base` then moves only this process's shards to the device."""
    from softprompt.core.models import resolve_device, resolve_dtype

    if not (shard and processes > 1):
        return {"device": device, "dtype": dtype}
    return {"device": "cpu", "dtype": resolve_dtype(dtype, resolve_device(device))}


def shard_if_asked(asked: bool, base: FrozenModel, accelerator, device: str | None) -> ShardedBase | None:
    """--shard-base: shard the base over the processes (None without the flag, or with one process, which has
    nothing to share it with: it says so)."""
    if not asked:
        return None
    if accelerator.num_processes == 1:
        print("--shard-base: one process, so the base is not sharded (launch with torchrun --nproc-per-node N)")
        return None
    sharded = shard_base(base, torch.device(device), accelerator.num_processes)
    if accelerator.is_main_process:
        print(sharded.describe(), flush=True)
    return sharded


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder stack's list of layers (`layers`, GPT-2's `h`, OPT's `decoder.layers`): the ModuleList inside
    `model.base_model` with one entry per hidden layer."""
    count = model.config.num_hidden_layers
    found = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not found:
        raise ValueError(
            f"--shard-base cannot find the decoder layers of {type(model).__name__} (no list of {count} modules in "
            "its decoder stack)"
        )
    return found[0]


def shard_base(base: FrozenModel, device: torch.device, processes: int) -> ShardedBase:
    """Shard `base` in place over the default process group (one FSDP unit per decoder layer, the decoder stack as
    root), moving this process's shards and the whole embedding / LM head to `device`. `base.model` keeps its
    interface: core/forward.py runs it unchanged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = base.model
    full = weight_bytes(model)
    layers = decoder_layers(model)
    layer_bytes = sum(weight_bytes(layer) for layer in layers)
    whole = {model.get_input_embeddings().weight}
    head = model.get_output_embeddings()
    if head is not None:
        whole.add(head.weight)
    # FSDP moves what it shards; the rest (embedding, head, final norm, buffers) moves here, without ever moving
    # a whole layer onto the device
    in_layers = {id(t) for t in [*layers.parameters(), *layers.buffers()]}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in in_layers:
            tensor.data = tensor.data.to(device)
    mesh = init_device_mesh(device.type, (processes,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # the root gathers what is left of the stack (final norm, learned positions) for its whole forward
    fully_shard(model.base_model, mesh=mesh, ignored_params=whole)
    whole_bytes = sum(p.numel() * p.element_size() for p in whole)
    return ShardedBase(processes, len(layers), weight_bytes(model), full, layer_bytes, whole_bytes)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters held by this process (a DTensor counts its local shard; tied tensors
    once)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for param in module.parameters():  # parameters() yields a shared tensor once
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


@dataclass(frozen=True)
class Lockstep:
    """What keeps processes sharing a sharded base in step (`agree_max`, `agree_all` on `device`); every process
    calls each method at the same point."""

    device: torch.device

    def max(self, value: int) -> int:
        return agree_max(value, self.device)

    def all(self, flag: bool) -> bool:
        return agree_all(flag, self.device)


def agree_max(value: int, device: torch.device) -> int:
    """The largest of every process's `value` (a collective: every process calls it)."""
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def agree_all(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on every process (a collective)."""
    import torch.distributed as dist

    tensor = torch.tensor([int(flag)], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())
