"""Options of `softprompt eval` and `softprompt inspect`, each declared once (help text and valid range).
Imports nothing heavy, so the command line can build its flags without torch."""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.options import (
    check_options,
    device_option,
    dtype_option,
    model_option,
    no_repeat_ngram_option,
    option,
    progress_option,
    repetition_penalty_option,
)

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class EvalConfig:
    """What `evaluate` measures and on which records. `data`: a path or a list of dicts; `model`: a name, folder,
    .gguf file or a preloaded core.models.FrozenModel."""

    data: str | list[dict] = option(
        help="evaluation records: .json, .jsonl, .csv, .parquet or a save_to_disk folder", metavar="FILE", group="data"
    )
    model: str | object | None = model_option()
    adapters: list = option(
        help="adapter folder(s) to evaluate, each with the template saved with it; prefix/cartridge folders joined "
        "with '+' are one composed adapter (keys/values concatenated, the first part's template)",
        factory=list,
        flag="--adapter",
        many="+",
        metavar="DIR",
        group="model",
    )
    compare_base: bool = option(
        False,
        "also evaluate the base model without a soft prompt (always done when no --adapter is given)",
        group="model",
    )
    choices: str | list[str] | None = option(
        None,
        "comma-separated answers, e.g. negative,positive: adds rank-classification accuracy (full answer "
        "sequences scored); every record's answer must be one of them",
        group="data",
    )
    max_new_tokens: int | None = option(
        None,
        "greedy answer length for exact match / ROUGE-L (default: longest choice + 2 with --choices, else "
        f"{DEFAULT_MAX_NEW_TOKENS}; 0 skips generation)",
        minimum=0,
        maximum=65536,
        group="scoring",
    )
    repetition_penalty: float = repetition_penalty_option("scoring")
    no_repeat_ngram_size: int = no_repeat_ngram_option("scoring")
    batch_size: int = option(16, "rows per forward pass and per generation batch", minimum=1, group="scoring")
    max_batch_tokens: int = option(
        4096, "token budget of one scoring forward pass (rows x longest row)", minimum=1, group="scoring"
    )
    max_length: int | None = option(
        None,
        "longest prompt + answer in tokens (longer: an error naming the record; default: the model's context "
        "less the adapter's virtual tokens)",
        minimum=2,
        group="scoring",
    )
    fields: str | dict | None = option(
        None, "source field names, e.g. 'instruction=sentence' (as in softprompt train)", group="data"
    )
    label_field: str | None = option(
        None,
        "a field of integer class labels; label i becomes choice i (--choices, or the adapter's saved label words)",
        group="data",
    )
    template: str | None = option(
        None,
        "prompt format for the base model (default: the first adapter's template, else 'human-assistant'); "
        "adapters always use their saved template",
        group="data",
    )
    task_field: str | None = option(
        None,
        "for multitask adapters: the field holding each record's task (an integer id, or a task name the adapter "
        "saved), so one file mixes tasks",
        group="data",
    )
    task: int | None = option(
        None, "for multitask adapters: the task of every record (instead of --task-field)", minimum=0,
        maximum=1_000_000, group="data",
    )  # fmt: skip
    limit: int | None = option(None, "evaluate only the first N records", minimum=1, group="data")
    device: str = device_option()
    dtype: str = dtype_option()
    skip_bad: bool = option(False, "skip (and list) bad records instead of stopping at the first one", group="data")
    progress: bool = progress_option()

    def __post_init__(self) -> None:
        check_options(self)
        if self.task is not None and self.task_field is not None:
            raise ValueError("give --task or --task-field, not both")


@dataclass
class InspectConfig:
    """What `inspect_adapter` shows."""

    adapter: str = option(help="adapter folder (softprompt- or PEFT-written)", positional=True)
    model: str | None = option(
        None,
        "base model whose vocabulary to compare against (default: the adapter's recorded base; the embedded "
        "default for SmolLM2-135M-Instruct)",
        metavar="MODEL",
        group="model",
    )
    top_k: int = option(
        5, "nearest vocabulary tokens to list per virtual token (0: skip, and load no model)", minimum=0, maximum=1000
    )
    device: str = option("cpu", "device for the similarity search", group="model")
    json: bool = option(False, "print one JSON object instead of the text report", group="output")

    def __post_init__(self) -> None:
        check_options(self)
