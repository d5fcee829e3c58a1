"""Options of `softprompt generate` and `softprompt chat`, each declared once (help text and valid range).
Imports nothing heavy, so the command line can build its flags without torch."""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.options import (
    SEED_MAX,
    chat_template_option,
    check_options,
    device_option,
    dtype_option,
    model_option,
    no_repeat_ngram_option,
    option,
    progress_option,
    repetition_penalty_option,
)

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 0.9
SAMPLING = "sampling"
MAX_LOGPROBS = 20  # alternatives per token, for generate --logprobs and the server (vLLM's default max_logprobs)


@dataclass
class GenerationOptions:
    """The base model, the prompt format and how tokens are chosen; shared by generate, generate --batch and chat.
    `model` may also be a preloaded core.models.FrozenModel."""

    model: str | object | None = model_option()
    device: str = device_option()
    dtype: str = dtype_option()
    chat_template: bool = chat_template_option()
    adapter: str | object | None = option(
        None,
        "adapter folder (PEFT format), or prefix/cartridge folders joined with '+' (composed: keys/values "
        "concatenated); default: the base model (with --batch: records without an 'adapter')",
        metavar="DIR",
        group="model",
    )
    task: int | None = option(
        None,
        "the task of a multitask --adapter (an integer id 0, 1, ...; with --batch, records name 'NAME@TASK' instead)",
        minimum=0,
        maximum=1_000_000,
        group="model",
    )
    greedy: bool = option(False, "greedy decoding (no sampling)", group=SAMPLING)
    temperature: float | None = option(
        None,
        f"sampling temperature, 0 = greedy (default {DEFAULT_TEMPERATURE})",
        minimum=0,
        maximum=100,
        group=SAMPLING,
    )
    top_k: int | None = option(
        None, f"sample among the K most likely tokens, 0 = off (default {DEFAULT_TOP_K})", minimum=0, group=SAMPLING
    )
    top_p: float | None = option(
        None, f"nucleus sampling mass (default {DEFAULT_TOP_P})", above=0, maximum=1, group=SAMPLING
    )
    seed: int | None = option(
        None, "random seed for reproducible sampling", minimum=0, maximum=SEED_MAX, group=SAMPLING
    )
    max_new_tokens: int = option(
        128, "most tokens to generate per answer", minimum=1, maximum=1_000_000, group=SAMPLING
    )
    stop: list = option(
        help="stop when this text appears (cut before it); repeat for several. EOS always stops",
        factory=list,
        many=True,
        metavar="TEXT",
        group=SAMPLING,
    )
    truncate: bool = option(
        False, "drop the left side of prompts that do not fit the model's context instead of failing", group=SAMPLING
    )
    repetition_penalty: float = repetition_penalty_option(SAMPLING)
    no_repeat_ngram_size: int = no_repeat_ngram_option(SAMPLING)

    def __post_init__(self) -> None:
        check_options(self)
        if self.task is not None and self.adapter is None:
            raise ValueError("--task needs --adapter (a multitask adapter)")
        if self.greedy and self.temperature not in (None, 0):
            raise ValueError("--greedy and --temperature cannot be combined (greedy means temperature 0)")

    def sampling(self) -> dict:
        """How a GenerationRequest chooses tokens: temperature / top_k / top_p (greedy, or the given values over the
        defaults) and the anti-repetition options."""
        penalties = {
            "repetition_penalty": float(self.repetition_penalty),
            "no_repeat_ngram_size": int(self.no_repeat_ngram_size),
        }
        if self.greedy:
            return {"temperature": 0.0, "top_k": 0, "top_p": 1.0, **penalties}
        return {
            "temperature": DEFAULT_TEMPERATURE if self.temperature is None else float(self.temperature),
            "top_k": DEFAULT_TOP_K if self.top_k is None else int(self.top_k),
            "top_p": DEFAULT_TOP_P if self.top_p is None else float(self.top_p),
            **penalties,
        }


@dataclass
class BatchOptions(GenerationOptions):
    """Many records at once (`generate_batch`, `softprompt generate --batch`)."""

    adapters_dir: str | None = option(
        None, "with --batch: folder holding the adapters that records name", metavar="DIR", group="batch"
    )
    batch_size: int = option(8, "with --batch: rows decoded together", minimum=1, maximum=4096, group="batch")
    progress: bool = progress_option()
    logprobs: int | None = option(
        None,
        "report each generated token's log-probability and the N most likely tokens there (0 = the chosen token "
        "only); the answer is then printed as a JSON record with 'logprobs'",
        minimum=0,
        maximum=MAX_LOGPROBS,
        metavar="N",
        group=SAMPLING,
    )


@dataclass
class GenerateConfig(BatchOptions):
    """`softprompt generate`: one instruction, or a --batch file of records."""

    instruction: str | None = option(None, "the instruction to answer (omit with --batch)", positional=True)
    input: str = option("", "optional input text that goes with the instruction", group="prompt")
    batch: str | None = option(
        None,
        "records with 'instruction', optional 'input' and 'adapter' (a folder name under --adapters-dir; "
        "'NAME@TASK' for a task of a multitask adapter)",
        metavar="FILE.jsonl",
        group="batch",
    )
    out: str | None = option(
        None, "with --batch: write records plus 'output' here (default: stdout)", metavar="FILE.jsonl", group="batch"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch is not None and self.instruction is not None:
            raise ValueError("give either an INSTRUCTION or --batch FILE.jsonl, not both")
        if self.batch is None and self.instruction is None:
            raise ValueError("nothing to answer: give an INSTRUCTION or --batch FILE.jsonl")
        if self.batch is None and (self.out or self.adapters_dir):
            raise ValueError("--out and --adapters-dir go with --batch")


@dataclass
class ChatConfig(GenerationOptions):
    """`softprompt chat`: an interactive conversation."""

    system: str | None = option(None, "a system message (used with the chat template only)", group="prompt")
