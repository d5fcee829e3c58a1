"""Rolling back a loss spike: a step whose loss jumps far above the recent steps' is not taken; the prompt of the
lowest step loss so far comes back and the learning rate is halved for the rest of the run.

Why: with Adafactor's relative steps at the default LR, every early step moves the prompt by 20-30 % of its RMS. On
SST-2 (1,000 records, fp32, seed 0) one such step sent the loss from ~0.5 to 13.7 at step 27, where it stayed: the
prompt had left the region where the label words are reachable, and the cosine schedule then had too little learning
rate to come back (57.7 % held-out; docs/training.md, "Loss spikes"). A run of the same seed that rounded a few
operations differently recovered by itself. The guard changes nothing in a run without such a spike.

The state lives in `Progress` (the recent losses, the rollbacks, which give the LR scale, the lowest loss and its
step) and, for the prompt at that loss, in the checkpoint's `rollback.` tensors, so a resumed run rolls back exactly
as an uninterrupted one.
"""

from __future__ import annotations

import statistics

import torch

WINDOW = 8  # recent step losses a spike is measured against
MIN_HISTORY = 4  # steps before the guard judges at all
# A spike: the step loss exceeds the recent median by more than max(SPIKE_NATS, SPIKE_RATIO x median). It does fire
# on runs that would have recovered by themselves: of SST-2 fp32 seeds 0-4, seed 0 diverged (0.53 -> 13.7, 26x the
# median) and seeds 3 and 4 had spikes they came back from (0.53 -> 6.0; 3.5 -> 14.7), and one of seed 3's rollbacks
# was marginal (2.54 over a bound of 2.43). A rollback there cost at most 0.7 points held-out, a divergence 30.
SPIKE_NATS, SPIKE_RATIO = 2.0, 2.0


def spike_bound(recent: list[float]) -> float | None:
    """The loss above which a step counts as a spike, given the recent step losses (None: too few to judge)."""
    if len(recent) < MIN_HISTORY:
        return None
    median = statistics.median(recent)
    return median + max(SPIKE_NATS, SPIKE_RATIO * median)


def remember(recent: list[float], loss: float) -> list[float]:
    """The recent losses with `loss` appended, the oldest dropped past WINDOW."""
    return (recent + [loss])[-WINDOW:]


def snapshot(prompt: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the prompt module's trainable state (small: the prompt, not the model)."""
    return {k: v.detach().clone() for k, v in prompt.state_dict().items()}
