"""Scoring without gradients: the summed NLL of each example's answer tokens, in length-grouped batches.

One loop shared by training's evaluation loss and `softprompt eval` (loss, perplexity, rank classification).

Common prefixes run once (exactly: the same values as the full sequences, to float rounding; tests check):
- `nll_per_example`: the leading prompt tokens every example shares (a fixed instruction) join the soft prompt's
  cached keys/values (forward.SharedPrefix), and each example runs only what follows them;
- `nll_per_group`: rank classification, where each record is scored once per choice. A record's prompt runs once
  (batched with other records' prompts, on top of the soft prompt's keys/values and of the prompt tokens all records
  share); its choices then run on a copy of that record's keys/values, the last prompt token's hidden state
  predicting each choice's first token.
"""

from __future__ import annotations

import torch

from softprompt.core import forward
from softprompt.data import batching


def _batches(lengths: list[int], max_tokens: int, max_rows: int | None) -> list[list[int]]:
    batches = batching.micro_batches(list(range(len(lengths))), lengths, max_tokens)
    if max_rows:
        batches = [b[i : i + max_rows] for b in batches for i in range(0, len(b), max_rows)]
    return batches


def nll_per_example(
    model,
    prompt: "torch.Tensor | forward.Virtual | None",
    examples: list[batching.Example],
    pad_id: int,
    max_tokens: int,
    max_rows: int | None = None,
    bar=None,
    lockstep=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of each example's label tokens and its label count (float64 / long, on the CPU), computed without
    gradients in length-grouped batches of at most `max_tokens` padded tokens (and `max_rows` rows). The prompt
    tokens all examples start with run once, with the soft prompt, and the batches hold what follows them.
    `lockstep` (training.distributed.Lockstep, a sharded base): every process runs the same passes, each with at
    least one example."""
    device = model.get_input_embeddings().weight.device
    nll = torch.zeros(len(examples), dtype=torch.float64)
    counts = torch.zeros(len(examples), dtype=torch.long)
    if not examples:
        return nll, counts
    with torch.no_grad():
        shared = batching.shared_prompt_length(examples)
        if lockstep is not None and not lockstep.all(shared > 0):
            shared = 0  # the shared text runs on every process or on none (same values either way)
        prefix = None
        if shared or prompt is not None:
            prefix = forward.SharedPrefix(model, prompt, torch.tensor(examples[0].ids[:shared], device=device))
        rest = [e.after(shared) for e in examples]
        batches = _batches([len(e) for e in rest], max_tokens, max_rows)
        passes = lockstep.max(len(batches)) if lockstep is not None else len(batches)
        for k in range(passes):
            rows = batches[min(k, len(batches) - 1)]  # past its own batches, a process repeats its last one unused
            batch = batching.collate([rest[i] for i in rows], pad_id, device)
            row_nll, row_counts = forward.label_nll(
                model, prompt, batch["input_ids"], batch["attention_mask"], batch["labels"], prefix=prefix
            )
            if k >= len(batches):
                continue
            nll[rows] = row_nll.double().cpu()
            counts[rows] = row_counts.cpu()
            if bar is not None:
                bar.update(len(rows))
    return nll, counts


def nll_per_group(
    model,
    prompt: "torch.Tensor | forward.Virtual | None",
    examples: list[batching.Example],
    group: int,
    pad_id: int,
    max_tokens: int,
    max_rows: int | None = None,
    bar=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nll_per_example` for examples in consecutive groups of `group` that share their prompt (a record once per
    choice, record-major): each group's common prompt tokens run once per group, and its members run only what
    follows them (the choice and EOS) on a copy of that group's keys/values. Same results, fewer tokens."""
    if len(examples) % group:
        raise ValueError(f"{len(examples)} examples do not split into groups of {group}")
    groups = [examples[i : i + group] for i in range(0, len(examples), group)]
    shared = [batching.shared_prompt_length(g) for g in groups]
    nll = torch.zeros(len(examples), dtype=torch.float64)
    counts = torch.zeros(len(examples), dtype=torch.long)
    alone = [i for i, s in enumerate(shared) if not s]  # nothing in common (or groups of one): score them whole
    if alone:
        rows = [i * group + j for i in alone for j in range(group)]
        part_nll, part_counts = nll_per_example(
            model, prompt, [examples[r] for r in rows], pad_id, max_tokens, max_rows, bar
        )
        nll[rows], counts[rows] = part_nll, part_counts
    todo = [i for i, s in enumerate(shared) if s]
    if not todo:
        return nll, counts
    device = model.get_input_embeddings().weight.device
    # the prompt tokens every group starts with (a fixed instruction) run once, with the soft prompt; each group's
    # own prompt tokens after them (at least one, whose hidden state predicts the choices' first token) run per group
    heads = [batching.Example(groups[i][0].ids[: shared[i]], [-100] * shared[i], "") for i in todo]
    common = min(batching.shared_prompt_length(heads), min(shared[i] for i in todo) - 1)
    with torch.no_grad():
        virtual = None
        if prompt is not None or common > 0:
            virtual = forward.SharedPrefix(
                model, prompt, torch.tensor(heads[0].ids[:common], dtype=torch.long, device=device)
            )
        n = virtual.length if virtual is not None else 0
        shared = [s - common for s in shared]
        for batch_of in _batches([shared[i] for i in todo], max_tokens, max_rows):
            chosen = [todo[b] for b in batch_of]
            heads = [
                batching.Example(groups[i][0].ids[common : common + shared[i]], [-100] * shared[i], "") for i in chosen
            ]
            kv, head_mask, last = _run_heads(model, virtual, heads, pad_id, device)
            # (owner prompt's row in this batch, example index, the example after its prompt)
            members = [
                (k, i * group + j, examples[i * group + j].after(common + shared[i]))
                for k, i in enumerate(chosen)
                for j in range(group)
            ]
            # choice rows per forward: their own tokens plus their copy of the prompt's keys/values count in the
            # token budget; max_rows counts records, as for the prompts
            width = n + head_mask.shape[1]
            lengths = [width + len(tail) for _, _, tail in members]
            for rows in _batches(lengths, max_tokens, max_rows and max_rows * group):
                part = [members[r] for r in rows]
                row_nll, row_counts = _run_tails(
                    model,
                    kv,
                    head_mask,
                    last,
                    n,
                    [k for k, _, _ in part],
                    [tail for _, _, tail in part],
                    pad_id,
                    device,
                )
                out = [index for _, index, _ in part]
                nll[out] = row_nll.double().cpu()
                counts[out] = row_counts.cpu()
                if bar is not None:
                    bar.update(len(rows))
    return nll, counts


def _run_heads(model, virtual: "forward.SharedPrefix | None", heads: list[batching.Example], pad_id: int, device):
    """Run prompts (right-padded, after the soft prompt's keys/values): their per-layer keys/values [B, ...,
    N + L, ...], the mask of their text positions [B, L], and each prompt's last hidden state [B, H]."""
    batch = batching.collate(heads, pad_id, device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = ids.shape[0]
    embeds = model.get_input_embeddings()(ids)
    if virtual is not None:
        ones = torch.ones(rows, virtual.length, dtype=mask.dtype, device=device)
        cache = forward.make_cache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in virtual.kv])
        full_mask, pos = torch.cat([ones, mask], dim=1), forward.positions_from_mask(mask, virtual.length)
    else:
        cache, full_mask, pos = forward.make_cache(), mask, forward.positions_from_mask(mask)
    hidden, cache = forward.run_body(model, embeds, full_mask, pos, cache=cache, use_cache=True)
    last = hidden[torch.arange(rows, device=device), mask.sum(1) - 1]
    return forward.cache_tensors(cache), mask, last


def _run_tails(
    model,
    kv,
    head_mask: torch.Tensor,
    last: torch.Tensor,
    n: int,
    owners: list[int],
    tails: list[batching.Example],
    pad_id: int,
    device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label NLL and label count of each tail, run on a copy of its owner prompt's keys/values."""
    index = torch.tensor(owners, device=device)
    batch = batching.collate(tails, pad_id, device)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = ids.shape[0]
    owned_mask = head_mask.index_select(0, index)
    ones = torch.ones(rows, n, dtype=mask.dtype, device=device)
    full_mask = torch.cat([ones, owned_mask, mask], dim=1)
    pos = forward.positions_from_mask(mask, n + owned_mask.sum(1))
    cache = forward.make_cache([(k.index_select(0, index), v.index_select(0, index)) for k, v in kv])
    hidden, _ = forward.run_body(model, model.get_input_embeddings()(ids), full_mask, pos, cache=cache)
    previous = torch.cat([last.index_select(0, index).unsqueeze(1), hidden[:, :-1]], dim=1)
    r, c = (labels != -100).nonzero(as_tuple=True)
    nll = forward.head_nll(model, previous[r, c], labels[r, c])
    per_row = torch.zeros(rows, dtype=nll.dtype, device=device).index_add_(0, r, nll)
    return per_row, torch.bincount(r, minlength=rows)


@torch.no_grad()
def evaluate_loss(
    model,
    prompt: torch.nn.Module,
    examples: list[batching.Example],
    max_tokens: int,
    pad_id: int,
    accelerator=None,
    lockstep=None,
) -> float:
    """Mean NLL per answer token over `examples` (split across processes when there are several); `prompt` is a
    core.prompt module of any method. `lockstep`: see nll_per_example."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = batching.shard(list(range(len(examples))), [len(e) for e in examples], rank, world)
    if lockstep is not None and world > 1 and not lockstep.all(bool(mine)):
        mine, world = list(range(len(examples))), 1  # fewer examples than processes: every process scores all
    mine = [examples[i] for i in mine]
    if prompt.method == "multitask":  # each task's examples on its own prompt (no sharded base: lockstep is None)
        parts = [
            nll_per_example(model, prompt.virtual(task), [mine[i] for i in rows], pad_id, max_tokens)
            for task, rows in batching.by_task(mine).items()
        ]
        nll = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
        counts = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    else:
        nll, counts = nll_per_example(model, prompt.virtual(), mine, pad_id, max_tokens, lockstep=lockstep)
    device = model.get_input_embeddings().weight.device
    totals = torch.stack([nll.sum(), counts.sum().double()]).to(device)
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()
