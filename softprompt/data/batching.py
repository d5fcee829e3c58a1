"""From records to padded tensors with little wasted compute.

- `encode_records`: tokenise with the template (templates.encode_example), labels -100 on the prompt.
- `epoch_plan`: the records of each optimiser step for one epoch. Records are shuffled, then grouped by length
  inside large "mega-batches" (as Hugging Face's group_by_length does), so a step holds records of similar length;
  the order of steps is shuffled again. It depends only on (seed, epoch), which makes resuming exact.
- `balanced_plan`: the same for classification data: every step holds the classes in the data set's proportions
  (no length grouping: a step whose records share one answer length would tilt the prompt towards whatever class
  those records happen to have, and its answers are short anyway).
- `EpochPlans`: the step plans of the epoch being trained, made when an epoch starts.
- `shard`: one process's share of a step (sorted by length, dealt round-robin, so processes get similar work).
- `micro_batches`: packs a share into batches whose padded size (rows x longest row) stays within a token budget.
  The loss is normalised over the whole step, so how a step is split never changes the result, only the speed.
- `collate`: right padding, mask 0 and label -100 on pads.
- `shared_prompt_length` / `Example.after`: the leading tokens a set of examples has in common (and learns nothing
  from), which the forward runs once for all of them (forward.SharedPrefix), and what each example has after them.

Nothing here runs a model: scoring batches lives in training/scoring.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from softprompt.data.records import DataError, Record
from softprompt.data.templates import Template, encode_example

MEGA_BATCH_STEPS = 50  # steps' worth of records sorted together when grouping by length


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    where: str
    task: int = 0  # a multitask prompt's task for this example

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def label_count(self) -> int:
        return sum(1 for t in self.labels if t != -100)

    def after(self, shared: int) -> "Example":
        """The example without its first `shared` tokens (those of a shared prefix)."""
        return self if not shared else Example(self.ids[shared:], self.labels[shared:], self.where, self.task)


def by_task(examples: list[Example]) -> dict[int, list[int]]:
    """The indices of `examples` per task, tasks in increasing order (a multitask prompt runs once per task)."""
    groups: dict[int, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.task, []).append(i)
    return dict(sorted(groups.items()))


def shared_prompt_length(examples: list[Example]) -> int:
    """How many leading tokens every example has in common and none of them learns (label -100), leaving at least
    one token of each: the part a forward pass can run once for all of them. 0 for fewer than two examples."""
    if len(examples) < 2:
        return 0
    first = examples[0]
    limit = min(len(e) for e in examples) - 1
    shared = 0
    while (
        shared < limit
        and first.labels[shared] == -100
        and all(e.ids[shared] == first.ids[shared] and e.labels[shared] == -100 for e in examples)
    ):
        shared += 1
    return shared


def encode_records(
    records: list[Record], tokenizer, template: Template, max_length: int, skip_bad: bool = False
) -> tuple[list[Example], list[str], int]:
    """Tokenise records. Returns (examples, skipped reasons, number truncated to max_length).

    A record whose prompt alone fills max_length raises DataError naming the record (or is skipped and reported
    with skip_bad).
    """
    examples, skipped, truncated = [], [], 0
    for record in records:
        try:
            ids, labels, cut = encode_example(
                template, tokenizer, record.instruction, record.input, record.output, max_length
            )
        except ValueError as err:
            message = f"{record.where}: {err}; raise --max-length or shorten the record"
            if not skip_bad:
                raise DataError(message) from err
            skipped.append(message)
            continue
        truncated += cut
        examples.append(Example(ids, labels, record.where, record.task if isinstance(record.task, int) else 0))
    return examples, skipped, truncated


def epoch_plan(lengths: list[int], step_records: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Indices of the records of each step of one epoch (the last step may be smaller)."""
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    mega = step_records * MEGA_BATCH_STEPS
    grouped = []
    for start in range(0, len(order), mega):
        grouped += sorted(order[start : start + mega], key=lambda i: -lengths[i])
    steps = [grouped[i : i + step_records] for i in range(0, len(grouped), step_records)]
    if shuffle:
        rng.shuffle(steps)
    return steps


def balanced_plan(classes: list[int], step_records: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of the records of each step of one epoch for classification data: every step holds the classes in
    the proportions of the whole data set, as nearly as its size allows (each class's records are shuffled and
    spread evenly over the epoch), and the order of steps is shuffled. Depends only on (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    members: dict[int, list[int]] = {}
    for index, label in enumerate(classes):
        members.setdefault(label, []).append(index)
    keyed = []
    for label in sorted(members):
        group = members[label]
        rng.shuffle(group)
        offset = rng.random()
        keyed += [((j + offset) / len(group), rng.random(), i) for j, i in enumerate(group)]
    order = [i for *_, i in sorted(keyed)]
    steps = [order[k : k + step_records] for k in range(0, len(order), step_records)]
    rng.shuffle(steps)
    return steps


@dataclass
class EpochPlans:
    """Each optimiser step's records, step by step: the current epoch's plan (epoch_plan, or balanced_plan when each
    record's class is given), made when a step of a new epoch is asked for (epochs are visited in order)."""

    lengths: list[int]
    step_records: int
    seed: int
    classes: list[int] | None = None  # each record's class (label word index): class-balanced steps
    epoch: int | None = None
    plan: list[list[int]] = field(default_factory=list)

    def records(self, step: int, per_epoch: int) -> list[int]:
        """The records of 0-based `step`, with `per_epoch` steps per epoch."""
        epoch, index = divmod(step, per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.plan = (
                balanced_plan(self.classes, self.step_records, self.seed, epoch)
                if self.classes is not None
                else epoch_plan(self.lengths, self.step_records, self.seed, epoch)
            )
        return self.plan[index]


def shard(step: list[int], lengths: list[int], rank: int, world: int) -> list[int]:
    """This process's records of a step."""
    ordered = sorted(step, key=lambda i: (-lengths[i], i))
    return ordered[rank::world]


def micro_batches(indices: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split records (any order) into batches with rows x longest-row <= max_tokens (a longer row goes alone)."""
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in ordered:
        longest = lengths[current[0]] if current else lengths[i]
        if current and longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(examples: list[Example], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on pads)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.ids)
        mask[row, : len(e)] = 1
        labels[row, : len(e)] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def steps_per_epoch(n_records: int, step_records: int) -> int:
    return -(-n_records // step_records)
