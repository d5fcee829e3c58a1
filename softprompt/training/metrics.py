"""Training metrics: one JSON object per line in OUT/metrics.jsonl, a loss-curve PNG, optional TensorBoard.

Each line has "step" and "kind" ("train" or "eval") plus numbers (loss, lr, tokens_per_s, eval_loss, ...). On a
resume, lines past the resumed step are dropped so the file describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


class MetricsLogger:
    """Appends metrics; writes nothing when `enabled` is False (non-main processes)."""

    def __init__(
        self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = False, resume_step: int | None = None
    ):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("--tensorboard needs the tensorboard package: pip install tensorboard") from err
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            plot_loss(self.path, self.out_dir / CURVE_FILE)
        if self.writer is not None:
            self.writer.close()


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "soft-prompt training") -> Path | None:
    """Train (and eval) loss against step; returns the PNG path, or None when there is nothing to plot."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval" and isinstance(r.get("eval_loss"), float)]
    if not train and not evals:
        return None
    return plot_curves({"train loss": train, "eval loss": evals}, png_path, title)


def plot_curves(curves: dict[str, list[tuple[float, float]]], png_path: str | Path, title: str) -> Path:
    """Plot named (step, loss) series into a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=name)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (mean NLL per answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return Path(png_path)
