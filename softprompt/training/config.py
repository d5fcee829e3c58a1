"""`TrainConfig`: everything `softprompt train` accepts, in one place. Imports nothing heavy (no torch), so the
command line can build its flags from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Everything `softprompt train` accepts. `data` / `eval_data`: a path or a list of dicts; `model`: a name,
    folder, .gguf file, or a preloaded core.models.FrozenModel."""

    data: str | list[dict]
    out: str
    model: str | object | None = None  # a name or folder, or a preloaded core.models.FrozenModel
    num_virtual_tokens: int = 20
    init: str | None = None  # None: "labels" when label_words are given, else "vocab"
    init_text: str | None = None
    label_words: list[str] | None = None
    template: str = "human-assistant"
    fields: str | dict | None = None  # e.g. "instruction=sentence" (source field per role)
    label_field: str | None = None  # integer labels here become label_words[i] as the output
    lr: float = 0.3  # with Adafactor: the cap on the step relative to the prompt's scale (see README)
    optimizer: str = "adafactor"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None: 5% of the steps
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    max_batch_tokens: int = 1024  # ~0.95 MB of saved activations per token on SmolLM2-135M (fp32)
    max_grad_norm: float | None = 1.0
    eval_data: str | list[dict] | None = None
    eval_fraction: float = 0.0
    eval_every: int | None = None  # None: with every checkpoint
    save_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2
    early_stopping: int | None = None  # evaluations without improvement before stopping
    final: str = "best"  # "best": the best-eval adapter goes to OUT when there is an eval split; "last": last step
    resume: str | None = None
    seed: int = 0
    limit: int | None = None
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    device: str | None = None
    threads: int | None = None
    skip_bad: bool = False
    tensorboard: bool = False
    progress: bool = True
