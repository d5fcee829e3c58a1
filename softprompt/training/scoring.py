"""Scoring without gradients: the summed NLL of each example's answer tokens, in length-grouped batches.

One loop shared by training's evaluation loss and `softprompt eval` (loss, perplexity, rank classification).
"""

from __future__ import annotations

import torch

from softprompt.core import forward
from softprompt.data import batching


def nll_per_example(model, prompt: "torch.Tensor | forward.Virtual | None", examples: list[batching.Example],
                    pad_id: int, max_tokens: int,
                    max_rows: int | None = None, bar=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of each example's label tokens and its label count (float64 / long, on the CPU), computed without
    gradients in length-grouped batches of at most `max_tokens` padded tokens (and `max_rows` rows)."""
    lengths = [len(e) for e in examples]
    batches = batching.micro_batches(list(range(len(examples))), lengths, max_tokens)
    if max_rows:
        batches = [b[i:i + max_rows] for b in batches for i in range(0, len(b), max_rows)]
    device = model.get_input_embeddings().weight.device
    nll = torch.zeros(len(examples), dtype=torch.float64)
    counts = torch.zeros(len(examples), dtype=torch.long)
    with torch.no_grad():
        for rows in batches:
            batch = batching.collate([examples[i] for i in rows], pad_id, device)
            row_nll, row_counts = forward.label_nll(model, prompt, batch["input_ids"], batch["attention_mask"],
                                                    batch["labels"])
            nll[rows] = row_nll.double().cpu()
            counts[rows] = row_counts.cpu()
            if bar is not None:
                bar.update(len(rows))
    return nll, counts


@torch.no_grad()
def evaluate_loss(model, prompt: torch.nn.Module, examples: list[batching.Example], max_tokens: int, pad_id: int,
                  accelerator=None) -> float:
    """Mean NLL per answer token over `examples` (split across processes when there are several); `prompt` is a
    core.prompt module of any method."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = batching.shard(list(range(len(examples))), [len(e) for e in examples], rank, world)
    nll, counts = nll_per_example(model, prompt.virtual(), [examples[i] for i in mine], pad_id, max_tokens)
    device = model.get_input_embeddings().weight.device
    totals = torch.stack([nll.sum(), counts.sum().double()]).to(device)
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()
