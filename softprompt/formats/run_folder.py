"""The one owner of a training run's output folder: the loop says when to save or resume, `RunFolder` knows where
and how.

    OUT/adapter_config.json, adapter_model.safetensors, softprompt.json   the final adapter       write_final
    OUT/best/                                                             the best-eval adapter   save_best
    OUT/checkpoints/step-NNNNNN/                                          a step checkpoint       save_step, resume

checkpoint.py writes a checkpoint atomically and verifies it; this module decides what goes in it and reads it
back: the adapter (the prompt module's output, as every adapter folder holds it), every trainable tensor of the
module under `prompt.<state_dict key>` (a prompt encoder's weights, which the adapter does not hold), the
optimiser's state, the RNG states, and trainer_state.json's counters and run identity (`Progress`, `RunKey`).

Older checkpoints still resume (`read_step`): without `prompt.` tensors (a prompt-tuning run, whose trainable
tensor is the adapter itself), without a method (prompt tuning), or without some counters (fresh ones).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from softprompt.formats import checkpoint
from softprompt.formats.adapter import AdapterMetadata, cpu_fp32, load_adapter, save_adapter

MODULE_KEY = "prompt."  # checkpoint tensors of the trainable module: prompt.<state_dict key>
ROLLBACK_KEY = "rollback."  # the module's state at the lowest step loss (training/guard.py): rollback.<key>
BEST = "best"


@dataclass(frozen=True)
class RunKey:
    """What identifies a run: a checkpoint resumes only a run with the same records, records per optimiser step
    (batch size x accumulation x processes), seed and method. None: not recorded (an older checkpoint)."""

    records: int | None
    step_records: int | None
    seed: int | None
    method: str = "prompt"


@dataclass
class Progress:
    """The counters a checkpoint carries and a resume restores: the best eval loss and its step, the evaluations
    without improvement since (for --early-stopping), the tokens trained on, and the spike guard's state
    (training/guard.py): the recent step losses, the lowest step loss and its step, the rollbacks so far (each
    halves the learning rate: `lr_scale`)."""

    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    tokens: int = 0
    recent_losses: list[float] = field(default_factory=list)
    low_loss: float | None = None
    low_step: int | None = None
    rollbacks: int = 0

    @property
    def lr_scale(self) -> float:
        """The factor on the scheduled learning rate: halved by every rollback."""
        return 0.5**self.rollbacks


@dataclass(frozen=True)
class RunSummary:
    """How training went, saved in the final adapter's softprompt.json under "training"."""

    steps: int
    train_loss: float | None
    best_eval_loss: float | None
    best_step: int | None
    stopped: str  # completed | early_stopping
    final: str  # best | last: which adapter the final one is


@dataclass
class SavedStep:
    """A step checkpoint as read back, older layouts filled in."""

    folder: Path
    step: int
    epoch: int | None
    key: RunKey
    progress: Progress
    module_state: dict[str, torch.Tensor]  # the trainable module's state_dict
    optimizer: dict  # the optimiser state's JSON part (checkpoint.optimizer_state)
    tensors: dict[str, torch.Tensor]  # the optimiser state's tensors and the RNG states
    rollback: dict[str, torch.Tensor] = field(default_factory=dict)  # the module at the lowest step loss


class RunFolder:
    """OUT of one training run of `base` whose adapters are saved with `metadata` and whose identity is `key`."""

    def __init__(self, out: str | Path, base, metadata: AdapterMetadata, key: RunKey, keep: int | None = 2):
        self.path = Path(out)
        self.base = base
        self.metadata = metadata
        self.key = key
        self.keep = keep  # newest step checkpoints kept (None: all)

    def clean(self) -> list[Path]:
        """Remove what a run killed while writing left behind (checkpoint.clean_staging); call before training."""
        return checkpoint.clean_staging(self.path)

    def checkpoints(self) -> list[Path]:
        """The complete step checkpoints, oldest first."""
        return checkpoint.list_checkpoints(self.path)

    def save_step(
        self,
        step: int,
        epoch: int,
        prompt: torch.nn.Module,
        optimizer,
        progress: Progress,
        rollback: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """OUT/checkpoints/step-NNNNNN after `step` optimiser steps (in `epoch`): all a resume needs to carry on
        bit for bit (`rollback`: the module's state the spike guard would restore). Prunes all but the newest
        `keep`."""
        module = {MODULE_KEY + k: v.detach().cpu().contiguous() for k, v in prompt.state_dict().items()}
        module.update({ROLLBACK_KEY + k: v.detach().cpu().contiguous() for k, v in (rollback or {}).items()})
        key = self.key
        state = {**asdict(progress), "records": key.records, "step_records": key.step_records, "seed": key.seed}
        state.update(epoch=epoch, method=key.method)  # trainer_state.json's key order, as older versions wrote it
        return checkpoint.save_checkpoint(
            self.path, step, adapter_tensor(prompt), self.base, self.metadata, optimizer, state, self.keep, module
        )

    def save_best(self, prompt: torch.nn.Module, step: int, eval_loss: float) -> Path:
        """OUT/best: the adapter with the best eval loss so far, with its step and loss."""
        meta = self.metadata.with_extra(step=step, eval_loss=eval_loss)
        return save_adapter(self.path / BEST, adapter_tensor(prompt), self.base, metadata=meta)

    def write_final(self, prompt: torch.nn.Module, summary: RunSummary) -> Path:
        """The final adapter into OUT itself, beside the checkpoints: OUT/best's when `summary.final` is "best",
        else the prompt as it is now; the summary goes into its softprompt.json."""
        tensor = load_adapter(self.path / BEST).saved() if summary.final == "best" else adapter_tensor(prompt)
        meta = self.metadata.with_extra(training=asdict(summary))
        return checkpoint.write_adapter_into(self.path, tensor, self.base, meta)

    def read_step(self, folder: str | Path) -> SavedStep:
        """Read one step checkpoint (verified against its checksums), filling in what older layouts lack."""
        folder = Path(folder)
        tensors, saved = checkpoint.load_checkpoint(folder)
        key = RunKey(saved.get("records"), saved.get("step_records"), saved.get("seed"), saved.get("method", "prompt"))
        fresh = asdict(Progress())
        module = {k[len(MODULE_KEY) :]: v for k, v in tensors.items() if k.startswith(MODULE_KEY)}
        if not module and key.method == "prompt":  # written before module tensors were saved: the adapter is all
            module = {"embeddings": load_adapter(folder).embeddings}
        return SavedStep(
            folder=folder,
            step=saved["step"],
            epoch=saved.get("epoch"),
            key=key,
            progress=Progress(**{k: saved.get(k, v) for k, v in fresh.items()}),
            module_state=module,
            optimizer=saved["optimizer"],
            tensors={k: v for k, v in tensors.items() if not k.startswith((MODULE_KEY, ROLLBACK_KEY))},
            rollback={k[len(ROLLBACK_KEY) :]: v for k, v in tensors.items() if k.startswith(ROLLBACK_KEY)},
        )

    def resume(self, source: str | Path, prompt: torch.nn.Module, optimizer) -> SavedStep:
        """Restore `prompt`'s trainable tensors, the optimiser's state and the RNG from `source` (a checkpoint
        folder, or an output folder: its newest checkpoint that verifies), once it is checked to be this run's."""
        saved = self.read_step(checkpoint.resolve_resume(source))
        self.check(saved, prompt)
        prompt.load_state_dict({k: saved.module_state[k] for k in prompt.state_dict()})
        checkpoint.load_optimizer_state(optimizer, saved.tensors, saved.optimizer)
        checkpoint.restore_rng(saved.tensors)
        return saved

    def check(self, saved: SavedStep, prompt: torch.nn.Module) -> None:
        """Raise ValueError, in one line naming the checkpoint, unless `saved` can resume this run's `prompt`."""
        where = f"--resume {saved.folder}"
        for name in ("records", "step_records", "seed"):
            theirs, ours = getattr(saved.key, name), getattr(self.key, name)
            if theirs != ours:
                raise ValueError(
                    f"{where}: the checkpoint was made with {name}={theirs}, this run has {ours}; resume with "
                    "the same data, batch size, processes and seed"
                )
        if saved.key.method != self.key.method:
            raise ValueError(
                f"{where}: the checkpoint was made with --method {saved.key.method}, this run has "
                f"--method {self.key.method}"
            )
        theirs = saved.module_state
        for name, value in prompt.state_dict().items():
            if name not in theirs or theirs[name].shape != value.shape:
                found = tuple(theirs[name].shape) if name in theirs else "missing"
                raise ValueError(
                    f"{where}: trainable tensor {name} is {found} in the checkpoint, {tuple(value.shape)} in "
                    "this run (same --method, --num-virtual-tokens and encoder options?)"
                )


def adapter_tensor(prompt: torch.nn.Module) -> torch.Tensor | dict[str, torch.Tensor]:
    """What an adapter saves of a core.prompt module: its output (a prompt encoder's embeddings, a projected
    prefix; a multitask prompt's three tensors), fp32 on the CPU."""
    with torch.no_grad():
        return cpu_fp32(prompt())
