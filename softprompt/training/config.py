"""`TrainConfig`: every option of `softprompt train`, each declared once with its help text and valid range.

The command line builds its flags from these fields; `TrainConfig(...)` checks every value when it is made, so
the Python API refuses what the command line refuses. Imports nothing heavy (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.core import CPT_LOSSES, ENCODER_TYPES, FACTOR_INITS, INIT_METHODS, KV_METHODS, METHODS, MULTITASK_INITS
from softprompt.options import (
    SEED_MAX,
    OptionError,
    check_options,
    device_option,
    dtype_option,
    model_option,
    option,
    progress_option,
    threads_option,
)

OPTIMIZERS = ("adamw", "adafactor")
CPT_OPTIONS = ("cpt_examples", "cpt_loss", "cpt_decay_factor", "cpt_epsilon", "cpt_format_epsilon")
SCHEDULES = ("cosine", "linear", "constant")
FINAL_CHOICES = ("best", "last")

DATA, PROMPT, OPTIM, OUTPUT = "data", "model and prompt", "optimisation", "logging, evaluation, checkpoints"
SELFSTUDY = "self-study (--method cartridge --corpus FILE)"

# Peak learning rate per method when --lr is not given (Adafactor: the cap on each step relative to a tensor's RMS),
# chosen by a sweep on an SST-2 dev split (docs/evaluation.md, "Methods compared"): 0.3 made prefix and P-tuning
# collapse to one answer; 0.03 did not.
DEFAULT_LR = {"prompt": 0.3, "prefix": 0.03, "ptuning": 0.03, "cartridge": 0.03}
DEFAULT_LR["multitask"] = 0.3  # its shared prompt is a prompt-tuning prompt (Adafactor steps are relative)
# CPT: its delta starts at zero, where Adafactor's steps are relative to a floor (eps2 = 1e-3), and its bounds are
# tight (0.053 per token on a 576-wide model): on the SST-2 dev split 0.3 reached them within the run (train loss 1.21
# after 60 steps, 0.03: 1.87) for the same accuracy and a slightly lower answer loss (docs/evaluation.md).
DEFAULT_LR["cpt"] = 0.3
# Self-study (--method cartridge --corpus): chosen on the GPL-2 dev questions (docs/benchmarks.md, "Cartridges by
# self-study"): 0.01 closed more of the loss gap than 0.03 at 128 tokens, and 0.03 diverged for a while at 500.
SELFSTUDY_LR = 0.01

# Default token budget of one training forward pass per device type. On a 2-core AVX-512 CPU, SmolLM2-135M fp32
# training ran at 316 / 324 / 332 / 339 text tokens/s with budgets 320 / 384 / 512 / 1024 and peak memory 1.41 / 1.48 /
# 1.62 / 2.14 GB (docs/training.md): past ~300 rows a CPU's products gain little while each token keeps ~0.7 MB of
# activations.
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 320, 4096
# A bf16 model on a CPU (--dtype auto picks it where bf16 products run ~2x fp32, e.g. AMD EPYC with AVX-512 BF16): a
# token keeps half the bytes, so twice the fp32 budget holds about the same activations, and the fixed costs of a pass
# (the per-operation overhead of its small elementwise operations, each weight's read) are spread over twice the
# tokens: on that EPYC, SmolLM2-135M bf16 training on Alpaca-en ran ~1.2x faster at 640 than at 320
# (docs/benchmarks.md, "Training throughput and memory").
CPU_BF16_BATCH_TOKENS = 640

# Without --max-length a record is cut only past the model's context (less the virtual tokens) or past this many
# token budgets: a row longer than the budget goes alone in its forward pass, so such a row costs this many times the
# memory the budget plans for (~0.7 MB of activations per token for SmolLM2-135M in fp32: 320 x 8 = 2,560 tokens,
# ~1.8 GB on a CPU; GPU budgets reach the context first).
AUTO_LENGTH_BUDGETS = 8


def default_batch_tokens(device_type: str, dtype=None) -> int:
    """The token budget used when --max-batch-tokens is not given, for a model of `dtype` (a torch dtype or its
    name, e.g. "bfloat16"; None: fp32's)."""
    if device_type != "cpu":
        return GPU_BATCH_TOKENS
    return CPU_BF16_BATCH_TOKENS if str(dtype).removeprefix("torch.") == "bfloat16" else CPU_BATCH_TOKENS


def length_cap(context: int | None, num_virtual_tokens: int, max_batch_tokens: int) -> int:
    """The longest prompt + answer kept when --max-length is not given: the model's context less the virtual tokens
    (which take positions before the text), and at most AUTO_LENGTH_BUDGETS token budgets."""
    cap = AUTO_LENGTH_BUDGETS * max_batch_tokens
    if context is not None:
        cap = min(cap, context - num_virtual_tokens)
    return max(2, cap)


@dataclass
class TrainConfig:
    """Everything `softprompt train` accepts. `data` / `eval_data`: a path or a list of dicts; `model`: a name,
    folder, .gguf file, or a preloaded core.models.FrozenModel."""

    out: str = option(help="output folder (the final adapter, checkpoints, metrics)", metavar="DIR", group=OUTPUT)
    data: str | list[dict] | None = option(
        None,
        "training records: .json (array), .jsonl, .csv, .parquet, or a datasets save_to_disk folder (required "
        "unless --corpus is given)",
        metavar="FILE_OR_DIR",
        group=DATA,
    )
    model: str | object | None = model_option()
    method: str = option(
        "prompt",
        "prompt-learning method: prompt (prompt tuning: N input embeddings), prefix (prefix tuning / "
        "P-tuning v2: keys and values of N virtual positions in every layer), ptuning (P-tuning: N input "
        "embeddings produced by a prompt encoder while training; the adapter saves its output), cartridge "
        "(PEFT's CARTRIDGE: keys and values of N virtual positions learned directly, the first "
        "--num-frozen-tokens kept fixed), multitask (PEFT's MULTITASK_PROMPT_TUNING: a shared prompt times "
        "per-task low-rank factors, one prompt per task of --task-field), cpt (PEFT's CPT: in-context examples whose "
        "token embeddings move within bounds, --cpt-*)",
        choices=METHODS,
        group=PROMPT,
    )
    prefix_projection: bool = option(
        True,
        "--method prefix: learn the keys/values directly instead of producing them with PEFT's two-layer MLP "
        "while training (prefix_projection, on by default: measured better; the adapter saves the resulting "
        "keys/values either way)",
        group=PROMPT,
    )
    encoder_hidden_size: int | None = option(
        None,
        "hidden size of the prefix projection (default: kv heads x head dim) or of the P-tuning prompt encoder "
        "(default: the model's hidden size)",
        minimum=1,
        maximum=65536,
        group=PROMPT,
    )
    encoder_type: str = option(
        "mlp",
        "--method ptuning: the prompt encoder, PEFT's encoder_reparameterization_type",
        choices=ENCODER_TYPES,
        group=PROMPT,
    )
    num_virtual_tokens: int = option(
        20,
        "soft-prompt length (with --init text: the init text's token count when not given)",
        minimum=1,
        maximum=4096,
        group=PROMPT,
    )
    init: str | None = option(
        None,
        "initialisation: embeddings of --init-text, sampled frequent-vocabulary rows, random at the embedding "
        "scale, the --label-words, or zero (prefix and cartridge: keys/values start at zero); for a prefix "
        "learned directly and a cartridge, the keys/values the frozen model computes for those tokens (default: "
        "text when --init-text or --init-file is given, labels when --label-words is, else vocab)",
        choices=INIT_METHODS,
        group=PROMPT,
    )
    init_text: str | None = option(
        None,
        "text whose token embeddings (or first N tokens' keys/values) initialise the prompt (--init text)",
        group=PROMPT,
    )
    init_file: str | None = option(
        None,
        "like --init-text, read from this UTF-8 file (e.g. a cartridge's corpus: its first N tokens)",
        metavar="FILE",
        group=PROMPT,
    )
    num_frozen_tokens: int | None = option(
        None,
        "--method cartridge: the first N virtual positions stay as initialised (an attention sink; default 1)",
        minimum=0,
        maximum=4096,
        group=PROMPT,
    )
    task_field: str | None = option(
        None,
        "--method multitask: the field holding each record's task, an integer id 0, 1, ... or a name (names are "
        "numbered in order of first appearance and saved with the adapter; default: every record is task 0)",
        group=DATA,
    )
    num_tasks: int | None = option(
        None, "--method multitask: number of tasks (default: what --task-field holds)", minimum=1, maximum=4096,
        group=PROMPT,
    )  # fmt: skip
    num_ranks: int | None = option(
        None, "--method multitask: rank of each task's factors (PEFT's num_ranks; default 1)", minimum=1,
        maximum=4096, group=PROMPT,
    )  # fmt: skip
    factor_init: str | None = option(
        None,
        "--method multitask: how fresh task factors start: near-one (their product is about 1, so every task starts "
        "at the shared prompt, i.e. at --init; the default) or peft (N(0, 0.02) as PEFT draws them, so every task's "
        "prompt starts near zero)",
        choices=FACTOR_INITS,
        group=PROMPT,
    )
    init_from: str | None = option(
        None,
        "--method multitask: start from this adapter folder (a multitask one; or, with --init-from-mode "
        "shared-only, any prompt of input embeddings): its shared prompt, and task factors as --init-from-mode says",
        metavar="DIR",
        group=PROMPT,
    )
    init_from_mode: str | None = option(
        None,
        "--init-from: average-tasks (its factors averaged over its tasks; PEFT's AVERAGE_SOURCE_TASKS, the default), "
        "exact-task (those of its task --init-task; EXACT_SOURCE_TASK) or shared-only (fresh factors; "
        "ONLY_SOURCE_SHARED); every task of the new prompt starts from them",
        choices=MULTITASK_INITS,
        group=PROMPT,
    )
    init_task: int | None = option(
        None, "--init-from-mode exact-task: the source's task to start from (default 0)", minimum=0, maximum=4095,
        group=PROMPT,
    )  # fmt: skip
    cpt_examples: int = option(
        4,
        "--method cpt: in-context examples taken from --data (seeded; the classes in turn when the answers are "
        "label words); their tokens, formatted with --template, are the prompt (--num-virtual-tokens does not apply)",
        minimum=1,
        maximum=256,
        group=PROMPT,
    )
    cpt_loss: str = option(
        "none",
        "--method cpt: weighting of the context examples' answers in the loss (PEFT's opt_weighted_loss_type): "
        "none (all weight 1), decay (the row's own answer 1, the context's last example --cpt-decay-factor, the one "
        "before its square, ...)",
        choices=CPT_LOSSES,
        group=PROMPT,
    )
    cpt_decay_factor: float = option(
        1.0, "--method cpt with --cpt-loss decay: the factor (opt_loss_decay_factor)", above=0, maximum=1, group=PROMPT
    )
    cpt_epsilon: float = option(
        0.1,
        "--method cpt: bound on the change of each input token's embedding, times sqrt(hidden / 2048) "
        "(opt_projection_epsilon)",
        minimum=0,
        maximum=100,
        group=PROMPT,
    )
    cpt_format_epsilon: float = option(
        0.1,
        "--method cpt: the same bound for the template's own tokens (opt_projection_format_epsilon); answers "
        "never change",
        minimum=0,
        maximum=100,
        group=PROMPT,
    )
    corpus: str | None = option(
        None,
        "--method cartridge: train by self-study on this plain-text or Markdown file instead of --data: the frozen "
        "model writes conversations about each chunk of it (a question or request from a seed prompt, then the "
        "answer, with the chunk in its context), and the cartridge learns to give the model's next-token "
        "distribution with the chunk in context (context distillation on the teacher's --top-k tokens); the "
        "conversations and the teacher's tokens are saved in OUT/selfstudy.safetensors (and readable in "
        "OUT/selfstudy.jsonl), reused by --resume and by a later run with the same settings; the cartridge starts "
        "from the corpus's first N tokens unless --init / --init-text / --init-file say otherwise",
        metavar="FILE",
        group=SELFSTUDY,
    )
    chunk_tokens: int = option(
        1024,
        "--corpus: tokens per chunk the teacher sees in its context (a chunk plus its conversation must fit the "
        "model's context)",
        minimum=16,
        maximum=131072,
        group=SELFSTUDY,
    )
    selfstudy_conversations: int = option(
        8,
        "--corpus: synthetic conversations per chunk (their seed prompts cycle through question, summary, quote, "
        "structure)",
        minimum=1,
        maximum=4096,
        group=SELFSTUDY,
    )
    selfstudy_max_tokens: int = option(
        96,
        "--corpus: most tokens the model writes for each turn of a conversation (the question, then the answer)",
        minimum=4,
        maximum=4096,
        group=SELFSTUDY,
    )
    selfstudy_temperature: float = option(
        0.7,
        "--corpus: sampling temperature of both turns of a synthetic conversation (0 = greedy: one conversation "
        "per seed prompt and chunk, repeated)",
        minimum=0,
        maximum=2,
        group=SELFSTUDY,
    )
    selfstudy_top_p: float = option(
        0.95,
        "--corpus: nucleus sampling mass of both turns of a synthetic conversation",
        above=0,
        maximum=1,
        group=SELFSTUDY,
    )
    top_k: int = option(
        20,
        "--corpus: the teacher's most likely tokens per position that the student matches (their probabilities "
        "renormalised; the Cartridges paper's top-k distillation)",
        minimum=1,
        maximum=1024,
        group=SELFSTUDY,
    )
    label_words: str | list[str] | None = option(
        None, "comma-separated answer words for the classes (for --label-field and --init labels)", group=DATA
    )
    auto_label_words: bool = option(
        True,
        "do not treat classification-like data specially (by default, when every training answer is one of "
        "at most 10 short answers, they become the label words: --init labels and saved with the adapter, "
        "so softprompt eval ranks them as choices)",
        group=DATA,
    )
    template: str = option(
        "human-assistant",
        "prompt format: 'human-assistant' (Human: ...\\n\\nAssistant: ), 'chat' (the base "
        "model's chat template), or a string with {instruction} and optionally {input}; saved "
        "with the adapter",
        group=DATA,
    )
    fields: str | dict | None = option(
        None,
        "source field names, e.g. 'instruction=sentence,input=context,output=answer' (defaults instruction / "
        "input / output; the input field is optional)",
        group=DATA,
    )
    label_field: str | None = option(
        None,
        "a field holding integer class labels; label i becomes the output word i of --label-words "
        "(e.g. --label-field label --label-words negative,positive)",
        group=DATA,
    )
    lr: float | None = option(
        None,
        "peak learning rate (Adafactor: the cap on each step relative to a tensor's RMS; AdamW: absolute, "
        "try 3e-2); default per --method: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
        + f"; {SELFSTUDY_LR:g} for --method cartridge --corpus",
        above=0,
        group=OPTIM,
    )
    optimizer: str = option("adafactor", "optimiser", choices=OPTIMIZERS, group=OPTIM)
    weight_decay: float = option(0.0, "decoupled weight decay", minimum=0, maximum=1, group=OPTIM)
    schedule: str = option("cosine", "learning-rate decay after warmup", choices=SCHEDULES, group=OPTIM)
    warmup_steps: int | None = option(None, "linear warmup steps (default: 5% of the steps)", minimum=0, group=OPTIM)
    epochs: float = option(1.0, "passes over the training data", above=0, maximum=10_000, group=OPTIM)
    max_steps: int | None = option(None, "optimiser steps (overrides --epochs)", minimum=1, group=OPTIM)
    batch_size: int = option(
        8,
        "records per process per step and accumulation round; a step covers batch-size x grad-accum x "
        "processes records",
        minimum=1,
        group=OPTIM,
    )
    grad_accum: int = option(1, "gradient accumulation factor", minimum=1, group=OPTIM)
    balance_classes: bool = option(
        True,
        "do not balance the classes of each step (by default, when every answer is one of the label words, "
        "every step holds the classes in the proportions of the training data instead of records grouped by "
        "length; measured more stable over seeds, docs/training.md)",
        group=DATA,
    )
    max_length: int | None = option(
        None,
        "truncate prompt + answer to this many tokens (default: what the longest record needs, up to the "
        "model's context less the virtual tokens and at most "
        f"{AUTO_LENGTH_BUDGETS} x --max-batch-tokens; the start line reports how many records were cut)",
        minimum=2,
        group=DATA,
    )
    max_batch_tokens: int | None = option(
        None,
        "token budget of one forward pass (rows x longest row); a step's records are packed into such "
        f"micro-batches, which never changes the result, only speed and memory (default: {CPU_BATCH_TOKENS} on "
        f"a CPU, where matrix products reach full speed by then, {CPU_BF16_BATCH_TOKENS} for a bf16 model on a "
        f"CPU, whose tokens keep half the bytes, {GPU_BATCH_TOKENS} on a GPU)",
        minimum=1,
        group=OPTIM,
    )
    max_grad_norm: float | None = option(1.0, "gradient clipping by global norm (0: off)", minimum=0, group=OPTIM)
    rollback: bool = option(
        True,
        "do not roll back loss spikes (by default a step whose loss exceeds the last 8 steps' median m by more "
        "than max(2 nats, 2m) is not taken: the prompt of the lowest step loss so far is restored and the "
        "learning rate halved for the rest of the run, with a line saying so; docs/training.md)",
        group=OPTIM,
    )
    eval_data: str | list[dict] | None = option(
        None,
        "evaluation records (same formats); the eval loss is computed every --eval-every steps and the best "
        "adapter kept",
        metavar="FILE",
        group=DATA,
    )
    eval_fraction: float = option(
        0.0,
        "hold out this fraction of --data as the evaluation split (when --eval-data is not given)",
        minimum=0,
        maximum=0.9,
        group=DATA,
    )
    eval_every: int | None = option(None, "evaluate every N steps (default: --save-every)", minimum=1, group=OUTPUT)
    save_every: int = option(100, "write a checkpoint every N steps", minimum=1, group=OUTPUT)
    log_every: int = option(10, "log loss, learning rate and tokens/s every N steps", minimum=1, group=OUTPUT)
    keep_checkpoints: int = option(2, "newest checkpoints kept", minimum=1, group=OUTPUT)
    early_stopping: int | None = option(
        None, "stop after N evaluations without improvement", minimum=1, metavar="N", group=OUTPUT
    )
    final: str = option(
        "best",
        "adapter written to --out: the best-eval one (when there is an eval split) or the last step's",
        choices=FINAL_CHOICES,
        group=OUTPUT,
    )
    resume: str | None = option(
        None,
        "continue from a checkpoint folder, or from an output folder's newest good checkpoint (same data, "
        "batch size and seed)",
        metavar="DIR",
        group=OUTPUT,
    )
    seed: int = option(0, "seed for initialisation, data order and hold-out", minimum=0, maximum=SEED_MAX, group=OPTIM)
    limit: int | None = option(None, "use only the first N good records of --data", minimum=1, group=DATA)
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass (less memory, ~30% slower)", group=OPTIM
    )
    shard_base: bool = option(
        False,
        "under torchrun / accelerate launch, shard the frozen base's decoder layers over the processes (FSDP2), so "
        "each keeps 1/N of their weights: for a base bigger than one device (the prompt stays whole on every "
        "process)",
        group=OPTIM,
    )
    dtype: str = dtype_option(training=True)
    device: str | None = device_option()
    threads: int | None = threads_option()
    skip_bad: bool = option(
        False, "skip (and count and report) bad records instead of stopping at the first one", group=DATA
    )
    tensorboard: bool = option(False, "also write TensorBoard logs to OUT/tensorboard", group=OUTPUT)
    progress: bool = progress_option()

    def __post_init__(self) -> None:
        check_options(self)
        self._check_init()
        self._check_multitask()
        self._check_cpt()
        self._check_corpus()
        if self.encoder_type != "mlp" and self.method != "ptuning":
            raise OptionError(f"--encoder-type is for --method ptuning (this run has --method {self.method})")
        if self.encoder_hidden_size is not None and not (
            self.method == "ptuning" or (self.method == "prefix" and self.prefix_projection)
        ):
            raise OptionError(
                "--encoder-hidden-size is for --method ptuning, or --method prefix without --no-prefix-projection"
            )

    def _check_multitask(self) -> None:
        given = [
            flag
            for flag, value in (
                ("--task-field", self.task_field),
                ("--num-tasks", self.num_tasks),
                ("--num-ranks", self.num_ranks),
                ("--factor-init", self.factor_init),
                ("--init-from", self.init_from),
            )
            if value is not None
        ]
        if given and self.method != "multitask":
            raise OptionError(f"{given[0]} is for --method multitask (this run has --method {self.method})")
        if self.init_from is None and (self.init_from_mode is not None or self.init_task is not None):
            raise OptionError("--init-from-mode and --init-task need --init-from (the source adapter)")
        if self.init_task is not None and self.init_from_mode != "exact-task":
            raise OptionError("--init-task is for --init-from-mode exact-task")
        if self.init_from is not None and (self.init is not None or self.init_text or self.init_file):
            raise OptionError("give --init-from or --init (with --init-text / --init-file), not both")
        if self.method == "multitask" and self.shard_base:
            raise OptionError("--shard-base is not available for --method multitask")

    def _check_cpt(self) -> None:
        """The --cpt-* options only with --method cpt, and no prompt initialisation with it (its context is)."""
        if self.method != "cpt":
            for name in CPT_OPTIONS:
                if getattr(self, name) != type(self).__dataclass_fields__[name].default:
                    flag = "--" + name.replace("_", "-")
                    raise OptionError(f"{flag} is for --method cpt (this run has --method {self.method})")
            return
        if self.init is not None or self.init_text is not None or self.init_file is not None:
            raise OptionError(
                "--init / --init-text / --init-file are not for --method cpt: its prompt starts as its context "
                "examples' embeddings (--cpt-examples)"
            )
        if self.cpt_decay_factor != 1.0 and self.cpt_loss != "decay":
            raise OptionError("--cpt-decay-factor is for --cpt-loss decay (this run has --cpt-loss none)")

    def _check_init(self) -> None:
        if self.init_text is not None and self.init_file is not None:
            raise OptionError("give --init-text or --init-file, not both")
        if (self.init_text is not None or self.init_file is not None) and self.init not in (None, "text"):
            raise OptionError(f"--init-text / --init-file are for --init text (this run has --init {self.init})")
        if self.init == "zero" and self.method not in KV_METHODS:
            raise OptionError(f"--init zero is for --method prefix or cartridge (this run has --method {self.method})")
        if self.num_frozen_tokens is not None and self.method != "cartridge":
            raise OptionError(f"--num-frozen-tokens is for --method cartridge (this run has --method {self.method})")
        if self.method == "cartridge" and self.frozen_tokens >= self.num_virtual_tokens:
            raise OptionError(
                f"--num-frozen-tokens {self.frozen_tokens} leaves nothing to train: it must be below "
                f"--num-virtual-tokens ({self.num_virtual_tokens})"
            )

    def _check_corpus(self) -> None:
        if self.corpus is None:
            if self.data is None:
                raise OptionError("give --data (training records) or --corpus (self-study, --method cartridge)")
            return
        if self.data is not None:
            raise OptionError("give --data or --corpus, not both")
        if self.method != "cartridge":
            raise OptionError(f"--corpus is for --method cartridge (this run has --method {self.method})")
        if self.eval_data is not None or self.eval_fraction:
            raise OptionError(
                "--eval-data / --eval-fraction are for --data (a --corpus run has no records to hold out)"
            )

    @property
    def frozen_tokens(self) -> int:
        """--num-frozen-tokens, or a cartridge's default of 1."""
        return 1 if self.num_frozen_tokens is None else self.num_frozen_tokens

    @property
    def peak_lr(self) -> float:
        """--lr, or the method's default (self-study's own for a cartridge on --corpus)."""
        if self.lr is not None:
            return self.lr
        return SELFSTUDY_LR if self.corpus is not None else DEFAULT_LR[self.method]
