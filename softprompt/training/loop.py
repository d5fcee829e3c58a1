"""`softprompt train`: tune a soft prompt on instruction / input / output records (or labelled classification data).

Any method of the family (--method prompt | prefix | ptuning, core.prompt.build_prompt): the loop only sees an
nn.Module whose parameters train and whose `virtual()` is what core.forward puts in front of the text.

Python API:

    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train
    result = train(TrainConfig(data="alpaca.jsonl", out="runs/alpaca"))          # a file or folder ...
    result = train(TrainConfig(data=[{"instruction": "Hi", "output": "Hello"}],   # ... or in-memory records
                               out="runs/x", model=base, max_steps=50))           # and a preloaded FrozenModel
    result.adapter_dir, result.best_eval_loss, result.steps

The loop is a lean one on accelerate (device placement, process group): one optimiser step takes
batch_size x grad_accum records per process, packed into token-budget micro-batches of similar-length records;
the loss is the summed NLL of answer tokens / answer tokens in the whole step (over all processes), so the
split into micro-batches or processes does not change the result. Gradients of the trainable tensors are summed
across processes with one all-reduce. The loop says when to save, resume and write the final adapter;
formats/run_folder.RunFolder owns the output folder and knows where and how.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt.core import KV_METHODS, forward
from softprompt.core.models import (
    FrozenModel,
    activation_checkpointing,
    describe_parameters,
    load_base,
    resolve_device,
    resolve_dtype,
    training_dtype,
    training_dtype_note,
)
from softprompt.core.prompt import ContextPrompt, MultitaskPrompt, build_prompt, multitask_factors
from softprompt.data import batching
from softprompt.data.context import Context, encode_context, pick_context
from softprompt.data.labels import detect_label_words, example_classes
from softprompt.data.records import DataError, Fields, assign_tasks, load_records, parse_words, split_holdout
from softprompt.data.templates import Template
from softprompt.formats.adapter import FACTOR_KEYS, AdapterError, AdapterMetadata, load_adapter
from softprompt.formats.run_folder import Progress, RunFolder, RunKey, RunSummary
from softprompt.training import distributed, guard
from softprompt.training.config import TrainConfig, default_batch_tokens, length_cap
from softprompt.training.metrics import MetricsLogger
from softprompt.training.optim import build_optimizer, lr_at
from softprompt.training.scoring import evaluate_loss


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    train_loss: float | None
    best_eval_loss: float | None = None
    best_step: int | None = None
    stopped: str = "completed"  # completed | early_stopping
    tokens_per_second: float = 0.0
    train_records: int = 0
    eval_records: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0


@dataclass
class TrainData:
    """The tokenised records of a run."""

    examples: list[batching.Example]
    eval_examples: list[batching.Example]
    skipped: list[str]  # why each skipped record was skipped
    truncated: int
    label_words: list[str] | None
    classes: list[int] | None  # each example's class, for class-balanced steps (None: length-grouped steps)
    lengths: list[int] = field(init=False)  # each example's tokens
    init_text: str | None = None  # --init-text, or the text of --init-file
    context: Context | None = None  # --method cpt: the in-context examples' tokens and types
    num_tasks: int = 1  # --method multitask: the tasks of --task-field (or --num-tasks)
    task_names: list[str] | None = None  # the names a --task-field of strings gave, in id order
    selfstudy: Any = None  # --corpus: selfstudy.SelfStudyData (the teacher's top-k per token of each example)

    def __post_init__(self) -> None:
        self.lengths = [len(e) for e in self.examples]


@dataclass
class LogWindow:
    """Train steps since the last "train" metrics row."""

    started: float
    nll: float = 0.0
    labels: int = 0
    tokens: int = 0


@dataclass
class Run:
    """What the set-up produced, plus the counters the loop moves forward."""

    config: TrainConfig
    accelerator: Any
    base: FrozenModel
    data: TrainData
    prompt: torch.nn.Module  # core.prompt: SoftPrompt, PrefixEncoder or PromptEncoder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    folder: RunFolder  # OUT: checkpoints, OUT/best, the final adapter
    mode: str  # "kv" or "concat" (see forward.label_nll)
    per_epoch: int
    total: int
    warmup: int
    eval_every: int
    start: int
    progress: Progress
    plans: batching.EpochPlans
    sharded: distributed.ShardedBase | None = None  # --shard-base: every process runs the same passes
    logger: MetricsLogger | None = None
    bar: Any = None
    window: LogWindow | None = None
    done: int = 0  # steps completed
    epoch: int = 0  # the epoch of the last step's records
    last_loss: float | None = None
    low_prompt: dict[str, torch.Tensor] | None = None  # the prompt module at progress.low_loss (training/guard.py)
    run_tokens: int = 0  # tokens and seconds of this process's steps in this invocation (not since a resume)
    run_time: float = 0.0
    stopped: str = "completed"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: TrainConfig) -> TrainResult:
    """Train a soft prompt as configured; returns where the adapter went and how training went."""
    run = _setup(config)
    with activation_checkpointing(run.base.model, config.gradient_checkpointing):
        for step in range(run.start, run.total):
            _optimiser_step(run, step)
            _log(run)
            if run.data.eval_examples and _due(run.done, run.eval_every, run.total):
                _evaluate(run)
            if _due(run.done, config.save_every, run.total) or run.stopped != "completed":
                _save_checkpoint(run)
            if run.stopped != "completed":
                break
    return _finish(run)


def _due(done: int, every: int, total: int) -> bool:
    return done % every == 0 or done == total


# --- set-up ----------------------------------------------------------------------------------------------------------


def _setup(config: TrainConfig) -> Run:
    """Records, model, encoded examples, prompt, optimiser, the run folder (and a resume if asked for), metrics and
    the start lines."""
    accelerator = _accelerator(config)
    config, base, template, data = _load(config, accelerator)
    step_records = config.batch_size * config.grad_accum * accelerator.num_processes
    per_epoch = batching.steps_per_epoch(len(data.examples), step_records)
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    init = config.init or ("text" if data.init_text is not None else "labels" if data.label_words else "vocab")
    if data.context is not None:  # --method cpt: the prompt is the context, its "init"
        prompt, init = _context_prompt(config, base, data.context), "context"
    else:
        prompt = build_prompt(
            base,
            config.method,
            init,
            config.num_virtual_tokens,
            data.init_text,
            data.label_words,
            config.seed,
            prefix_projection=config.prefix_projection and config.method == "prefix",
            encoder_hidden_size=config.encoder_hidden_size,
            encoder_type=config.encoder_type,
            num_frozen_tokens=config.frozen_tokens,
            num_tasks=data.num_tasks,
            num_ranks=config.num_ranks or 1,
            factor_init=config.factor_init or "near-one",
        )
    extra = {}
    if config.method == "multitask":
        extra = {"task_field": config.task_field, "task_names": data.task_names}
        extra.update(factor_init=config.factor_init or "near-one")
        if config.init_from is not None:
            prompt, init = _from_source(config, base, prompt), "adapter"
            extra.update(init_from=str(config.init_from), init_from_mode=config.init_from_mode or "average-tasks")
            if config.init_from_mode == "exact-task":
                extra.update(init_task=config.init_task or 0)
        if data.task_names and accelerator.is_main_process:
            named = ", ".join(f"{i} {name}" for i, name in enumerate(data.task_names))
            print(f"train: tasks of --task-field {config.task_field!r}: {named} (saved with the adapter)", flush=True)
    sharded = distributed.shard_if_asked(config.shard_base, base, accelerator, _device(config, accelerator))
    optimizer = build_optimizer(config.optimizer, list(prompt.parameters()), config.peak_lr, config.weight_decay)
    metadata = AdapterMetadata.of(prompt, init=init, template=template, label_words=data.label_words, extra=extra)
    key = RunKey(len(data.examples), step_records, config.seed, prompt.method)
    folder = RunFolder(config.out, base, metadata, key, keep=config.keep_checkpoints)
    if accelerator.is_main_process:
        folder.clean()  # what a run killed while writing left behind
    progress, start, low_prompt = Progress(), 0, None
    if config.resume:
        saved = folder.resume(config.resume, prompt, optimizer)
        print(f"resuming from {saved.folder} (step {saved.step})", flush=True)
        progress, start, low_prompt = saved.progress, saved.step, saved.rollback or None
    run = Run(
        config=config,
        accelerator=accelerator,
        base=base,
        data=data,
        prompt=prompt,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(base.device.type, enabled=base.dtype == torch.float16),
        folder=folder,
        # checkpointing re-runs layers: prompts of input embeddings are concatenated; keys/values (prefix,
        # cartridge) stay in kv mode, read through forward.ReadOnlyCache, which a recompute reads unchanged
        mode="concat" if config.gradient_checkpointing and config.method not in KV_METHODS else "kv",
        per_epoch=per_epoch,
        total=total,
        warmup=config.warmup_steps if config.warmup_steps is not None else int(0.05 * total),
        eval_every=config.eval_every or config.save_every,
        start=start,
        done=start,
        progress=progress,
        plans=batching.EpochPlans(data.lengths, step_records, config.seed, data.classes),
        sharded=sharded,
        low_prompt=low_prompt,
    )
    _start_reporting(run)
    return run


def _context_prompt(config: TrainConfig, base: FrozenModel, context: Context) -> ContextPrompt:
    """--method cpt: the prompt over the context's tokens with the --cpt-* loss and bounds."""
    return ContextPrompt.from_tokens(
        base,
        context.token_ids,
        context.type_mask,
        loss=config.cpt_loss,
        decay_factor=config.cpt_decay_factor,
        epsilon=config.cpt_epsilon,
        format_epsilon=config.cpt_format_epsilon,
    )


def _from_source(config: TrainConfig, base: FrozenModel, fresh: torch.nn.Module) -> torch.nn.Module:
    """--init-from: a multitask prompt starting from the source adapter's shared prompt and, per --init-from-mode,
    its task factors averaged or one task's (else the fresh prompt's factors), in one line naming the source when
    it does not fit."""
    where, mode = f"--init-from {config.init_from}", config.init_from_mode or "average-tasks"
    try:
        source = load_adapter(config.init_from, base)
    except AdapterError as err:
        raise DataError(f"{where}: {err}") from None
    if source.method in KV_METHODS or (source.method != "multitask" and mode != "shared-only"):
        kind = "a multitask adapter" if mode != "shared-only" else "a prompt of input embeddings"
        raise DataError(f"{where}: --init-from-mode {mode} needs {kind}; this is a --method {source.method} adapter")
    if source.num_virtual_tokens != fresh.num_virtual_tokens:
        raise DataError(
            f"{where}: the source has {source.num_virtual_tokens} virtual tokens, this run "
            f"{fresh.num_virtual_tokens}: pass --num-virtual-tokens {source.num_virtual_tokens}"
        )
    factors = None if source.factors is None else tuple(source.factors[key] for key in FACTOR_KEYS)
    if mode == "shared-only":
        cols, rows = fresh.task_cols, fresh.task_rows
    else:
        try:
            cols, rows = multitask_factors(
                fresh.num_tasks, fresh.num_virtual_tokens, fresh.embedding.shape[1], fresh.num_ranks, config.seed,
                factors, mode, config.init_task or 0,
            )  # fmt: skip
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
    return MultitaskPrompt(source.embeddings, cols, rows, "adapter").to(base.device)


def _accelerator(config: TrainConfig):
    """accelerate's Accelerator for this process (the device, the process group), and the thread count."""
    from accelerate import Accelerator

    # accelerate only sets up CPU process groups (gloo) when told it runs on CPU
    auto = config.device in (None, "auto")  # auto: the device accelerate gives this process
    accelerator = Accelerator(cpu=config.device == "cpu" or (auto and not torch.cuda.is_available()))
    if config.threads:
        torch.set_num_threads(config.threads)
    return accelerator


def _init_text(config: TrainConfig) -> str | None:
    """--init-text, or the text of --init-file (one line naming the file when it cannot be read or is empty)."""
    if config.init_file is None:
        return config.init_text
    path = Path(config.init_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--init-file {path}: cannot read: {getattr(err, 'strerror', None) or err}") from err
    if not text.strip():
        raise DataError(f"--init-file {path}: the file is empty")
    return text


def _device(config: TrainConfig, accelerator) -> str:
    """The device this process trains on: the one accelerate gives it (auto), or the one asked for."""
    return str(accelerator.device) if config.device in (None, "auto") else config.device


def _load(config: TrainConfig, accelerator) -> tuple[TrainConfig, FrozenModel, Template, TrainData]:
    """The template, the records, the model, label words found in the data, and the tokenised examples; the config
    with the sizes left to the model filled in."""
    if config.corpus is not None:
        return _load_corpus(config, accelerator)
    template = Template(config.template)
    label_words = parse_words(config.label_words, "--label-words")
    init_text = _init_text(config)  # a bad --init-file fails before the records and the model load
    train_recs, eval_recs, tasks = _load_records(config, label_words)
    base = _base(config, accelerator)  # loaded after the records, so bad data fails fast
    if label_words is None and config.auto_label_words and config.label_field is None:
        label_words = detect_label_words(
            [r.output for r in train_recs.items], base.tokenizer, config.num_virtual_tokens
        )
        if label_words and accelerator.is_main_process:
            print(
                f"train: every training answer is one of {len(label_words)} short answers "
                f"({', '.join(label_words)}): using them as label words ("
                + ("init labels, " if config.init is None and init_text is None and config.method != "cpt" else "")
                + "saved with the adapter, so softprompt eval ranks them as choices); --no-auto-label-words "
                "turns this off",
                flush=True,
            )
    context = None
    if config.method == "cpt":
        picked = pick_context(train_recs.items, config.cpt_examples, config.seed, label_words)
        context = encode_context(picked, base.tokenizer, template)
    config = _sized(config, base, len(context) if context is not None else config.num_virtual_tokens)
    data = _encode(config, base, template, train_recs, eval_recs, label_words)
    data.init_text, data.context = init_text, context
    data.num_tasks, data.task_names = tasks
    return config, base, template, data


def _load_corpus(config: TrainConfig, accelerator) -> tuple[TrainConfig, FrozenModel, Template, TrainData]:
    """Self-study (--corpus): the corpus (checked before the model loads), the model, and the conversations with
    the teacher's top-k tokens (training/selfstudy.py: OUT/selfstudy.safetensors, made now or reused). The cartridge
    starts from the corpus's first tokens unless another init is asked for."""
    from softprompt.data.corpus import read_corpus
    from softprompt.training import selfstudy

    template = Template(config.template)
    corpus = read_corpus(config.corpus)
    init_text = _init_text(config)
    if init_text is None and config.init in (None, "text"):
        init_text = corpus
    base = _base(config, accelerator)
    config = _sized(config, base, config.num_virtual_tokens)
    with accelerator.main_process_first():  # the main process writes the data; the others then find and reuse it
        data = selfstudy.prepare(config, base, template, corpus, Path(config.out), resume=config.resume is not None)
    if accelerator.is_main_process:
        chunks = len({c.chunk for c in data.conversations})
        print(
            f"self-study: {len(data.examples)} conversations about {chunks} chunk(s) of {config.corpus} "
            + (f"(reused from {Path(config.out) / selfstudy.DATA_FILE})" if data.reused else "(generated)"),
            flush=True,
        )
    train = TrainData(data.examples, [], [], 0, None, None, init_text=init_text, selfstudy=data)
    return config, base, template, train


def _base(config: TrainConfig, accelerator) -> FrozenModel:
    """The frozen model: the one given, or loaded for this process's device and dtype."""
    if isinstance(config.model, FrozenModel):
        return config.model
    device = _device(config, accelerator)
    target = resolve_device(device)
    dtype = training_dtype(config.dtype, target)
    note = training_dtype_note("train", config.dtype, target)
    if note is not None and accelerator.is_main_process:  # only where auto differs
        print(note, flush=True)
    return load_base(config.model, **distributed.load_args(config.shard_base, accelerator.num_processes, device, dtype))


def _sized(config: TrainConfig, base: FrozenModel, virtual: int) -> TrainConfig:
    """The config with the token budget per forward pass and the longest record (when not given) for this model,
    whose prompt has `virtual` tokens."""
    if config.max_batch_tokens is None:
        config = dataclasses.replace(config, max_batch_tokens=default_batch_tokens(base.device.type, base.dtype))
    context = getattr(base.model.config, "max_position_embeddings", None)
    if config.method == "cpt" and context is not None and virtual > context - 2:
        raise DataError(
            f"--method cpt: the context of {config.cpt_examples} examples is {virtual} tokens, which leaves no "
            f"room in the model's context of {context}; lower --cpt-examples"
        )
    if config.max_length is None:  # what the records need, up to the context and the memory cap
        config = dataclasses.replace(config, max_length=length_cap(context, virtual, config.max_batch_tokens))
    return config


def _tasks(config: TrainConfig, train_recs, eval_recs) -> tuple[int, list[str] | None]:
    """The number of tasks and their names (a --task-field of strings) of a multitask run; every record gets its
    task id (all 0 without --task-field). Called before a hold-out split, so names are numbered in file order."""
    if config.method != "multitask":
        return 1, None
    if config.task_field is None:
        return config.num_tasks or 1, None
    limit = f"--num-tasks {config.num_tasks} gives" if config.num_tasks else ""
    num_tasks, names = assign_tasks(train_recs.items, config.task_field, config.num_tasks, limit=limit)
    if eval_recs is not None:
        assign_tasks(eval_recs.items, config.task_field, num_tasks, names, limit=limit or "the training data has")
    return num_tasks, names


def _load_records(config: TrainConfig, label_words):
    """The training records and the evaluation ones (from --eval-data, a held-out fraction, or None), and a multitask
    run's number of tasks and task names (`_tasks`)."""
    fields, mapping = Fields.with_labels(config.fields, config.label_field, label_words, "--label-words")
    task_field = config.task_field
    train_recs = load_records(config.data, fields, mapping, config.skip_bad, config.limit, task_field)
    eval_recs = None
    if config.eval_data is not None:
        eval_recs = load_records(config.eval_data, fields, mapping, config.skip_bad, task_field=task_field)
    tasks = _tasks(config, train_recs, eval_recs)
    if eval_recs is None and config.eval_fraction:
        train_recs, eval_recs = split_holdout(train_recs, config.eval_fraction, config.seed)
    return train_recs, eval_recs, tasks


def _encode(
    config: TrainConfig, base: FrozenModel, template: Template, train_recs, eval_recs, label_words
) -> TrainData:
    """The records tokenised with the template (and each example's class for --balance-classes)."""
    skipped = list(train_recs.skipped) + (list(eval_recs.skipped) if eval_recs else [])
    examples, bad, truncated = batching.encode_records(
        train_recs.items, base.tokenizer, template, config.max_length, config.skip_bad
    )
    skipped += bad
    eval_examples = []
    if eval_recs is not None:
        eval_examples, bad, _ = batching.encode_records(
            eval_recs.items, base.tokenizer, template, config.max_length, config.skip_bad
        )
        skipped += bad
    if not examples:
        raise DataError(f"{train_recs.source}: no usable records after tokenisation ({len(skipped)} skipped)")
    classes = example_classes(examples, train_recs.items, label_words) if config.balance_classes else None
    return TrainData(examples, eval_examples, skipped, truncated, label_words, classes)


def _start_reporting(run: Run) -> None:
    """Open metrics.jsonl (trimmed to the resumed step), print the run's outline, start the progress bar."""
    config, data = run.config, run.data
    resume_step = run.start if config.resume else None
    run.logger = MetricsLogger(run.folder.path, run.main, config.tensorboard, resume_step=resume_step)
    if run.main:
        print(describe_parameters(run.base.model, run.prompt))
        if data.context is not None:
            print(
                f"cpt: {len(data.context.examples)} in-context examples ({', '.join(data.context.examples)}), "
                f"{len(data.context)} tokens, {run.prompt.context_label_count} of them answers scored in every row",
                flush=True,
            )
        print(
            f"train: {len(data.examples)} records ({data.truncated} truncated to {config.max_length} tokens, the "
            f"longest {max(data.lengths)}), "
            f"eval: {len(data.eval_examples)}, {run.accelerator.num_processes} process(es), "
            f"{run.folder.key.step_records} records/step, {run.total} steps, device {run.base.device}, "
            f"dtype {run.base.dtype}, up to {config.max_batch_tokens} tokens per forward pass",
            flush=True,
        )
    run.bar = _progress(config.progress and run.main, run.total, run.start)
    run.window = LogWindow(started=time.perf_counter())


# --- one optimiser step ----------------------------------------------------------------------------------------------


def _optimiser_step(run: Run, step: int) -> None:
    """One optimiser step (0-based `step`) over its records, then the step's bookkeeping."""
    config, prompt, optimizer, scaler, data = run.config, run.prompt, run.optimizer, run.scaler, run.data
    records = run.plans.records(step, run.per_epoch)
    label_total = sum(data.examples[i].label_count for i in records)
    if data.context is not None:  # PEFT's CPT loss scores the context's answers in every row too
        label_total += len(records) * prompt.context_label_count
    mine = batching.shard(records, data.lengths, run.accelerator.process_index, run.accelerator.num_processes)
    tick = time.perf_counter()
    for lr_group in optimizer.param_groups:
        lr_group["lr"] = lr_at(step, run.total, config.peak_lr, run.warmup, config.schedule) * run.progress.lr_scale
    nll_sum = _accumulate_gradients(run, mine, label_total)
    params = list(prompt.parameters())
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    if run.accelerator.num_processes > 1:  # one all-reduce for every trainable tensor
        flat = run.accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="sum")
        offset = 0
        for param in params:
            param.grad.copy_(flat[offset : offset + param.numel()].view_as(param))
            offset += param.numel()
        nll_sum = run.accelerator.reduce(nll_sum, reduction="sum")
    step_loss = nll_sum.item() / label_total
    scaler.unscale_(optimizer)
    if not math.isfinite(step_loss) or not all(torch.isfinite(p.grad).all() for p in params):
        _stop_on_nan(run, step + 1, step_loss)
    if config.rollback and _spiked(run, step + 1, step_loss):
        scaler.update()  # the step is not taken: its gradient, computed at the spiking prompt, is dropped
    else:
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(prompt, ContextPrompt):  # CPT's projected gradient step: every delta back within its bound
        prompt.project_()

    run.done, run.epoch, run.last_loss = step + 1, run.plans.epoch, step_loss
    step_tokens = sum(data.lengths[i] for i in records)
    run.run_tokens += step_tokens
    run.run_time += time.perf_counter() - tick
    run.progress.tokens += step_tokens
    run.window.nll += step_loss * label_total
    run.window.labels += label_total
    run.window.tokens += step_tokens
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{run.run_tokens / max(run.run_time, 1e-9):.0f}")
        run.bar.update(1)


def _spiked(run: Run, step: int, loss: float) -> bool:
    """The spike guard (training/guard.py) on 1-based `step`'s loss, measured at the prompt before its update: a
    spike restores the prompt of the lowest step loss so far and halves the learning rate (True: skip the update);
    otherwise the loss joins the recent ones and, when it is the lowest yet, this prompt becomes the one restored."""
    progress = run.progress
    bound = guard.spike_bound(progress.recent_losses)
    if bound is not None and loss > bound and run.low_prompt is not None:
        run.prompt.load_state_dict(run.low_prompt)
        progress.rollbacks += 1  # halves progress.lr_scale
        message = (
            f"train: loss spike at step {step} ({loss:.3f}, over {bound:.3f}: the last steps' median "
            f"{statistics.median(progress.recent_losses):.3f} plus its bound); restored the prompt of step "
            f"{progress.low_step} (loss {progress.low_loss:.3f}) and halved the learning rate "
            f"(x{progress.lr_scale:g} from now on); --no-rollback turns this off"
        )
        if run.main:
            (run.bar.write if run.bar is not None else print)(message)
        run.logger.log(
            "rollback", step, loss=loss, bound=bound, restored_step=progress.low_step, lr_scale=progress.lr_scale
        )
        return True
    progress.recent_losses = guard.remember(progress.recent_losses, loss)
    if progress.low_loss is None or loss < progress.low_loss:
        progress.low_loss, progress.low_step = loss, step
        run.low_prompt = guard.snapshot(run.prompt)
    return False


def _accumulate_gradients(run: Run, mine: list[int], label_total: int) -> torch.Tensor:
    """Forward and backward over this process's records in micro-batches; returns their summed NLL. Each
    micro-batch's loss is divided by the whole step's answer-token count, so the gradients add up to the step's.
    A multitask prompt's step may mix tasks: each task's records run on that task's prompt, computed once."""
    examples = [run.data.examples[i] for i in mine]
    if run.prompt.method != "multitask":
        return _accumulate(run, examples, label_total, run.prompt.virtual, mine)
    nll_sum = torch.zeros((), device=run.base.device)
    for task, rows in batching.by_task(examples).items():
        group = [examples[i] for i in rows]
        nll_sum = nll_sum + _accumulate(run, group, label_total, lambda task=task: run.prompt.virtual(task))
    return nll_sum


def _accumulate(
    run: Run, examples: list[batching.Example], label_total: int, virtual_of, indices: list[int] | None = None
) -> torch.Tensor:
    """_accumulate_gradients over `examples`, whose prompt `virtual_of()` makes (`indices`: their places in the
    run's data, where a self-study run finds their teacher targets)."""
    model, device = run.base.model, run.base.device
    nll_sum = torch.zeros((), device=device)
    # kv mode: the virtual tokens (and a prompt encoder) run once per step, not once per micro-batch, and so do the
    # leading prompt tokens all of the step's records share (see forward.SharedPrefix); the micro-batches hold what
    # follows them. Concat mode re-runs the prompt in each micro-batch, whose backward consumes its graph.
    virtual = virtual_of() if run.mode == "kv" else None
    # (not under checkpointing: the shared text's pass writes a cache, which a layer's recompute would extend twice)
    shared = (
        batching.shared_prompt_length(examples) if run.mode == "kv" and not run.config.gradient_checkpointing else 0
    )
    lockstep = distributed.Lockstep(device) if run.sharded is not None else None
    if lockstep is not None and not lockstep.all(shared > 0):
        shared = 0  # a sharded base runs the shared text on every process or on none (same values either way)
    text = torch.tensor(examples[0].ids[:shared] if shared else [], dtype=torch.long, device=device)
    prompt = run.prompt
    cpt = isinstance(prompt, ContextPrompt)
    prefix = forward.SharedPrefix(model, virtual, text, keep_hidden=cpt) if run.mode == "kv" else None
    rest = [e.after(shared) for e in examples]
    micros = batching.micro_batches(list(range(len(rest))), [len(e) for e in rest], run.config.max_batch_tokens)
    passes = lockstep.max(len(micros)) if lockstep is not None else len(micros)
    for k in range(passes):
        # a sharded base needs the same passes on every process: one with fewer micro-batches repeats its last
        # one at weight 0 (its gradient adds exact zeros)
        weight = 1.0 if k < len(micros) else 0.0
        batch = batching.collate(
            [rest[i] for i in micros[min(k, len(micros) - 1)]], run.base.tokenizer.pad_token_id, device
        )
        chosen = micros[min(k, len(micros) - 1)]
        score, teacher = forward.label_nll, ()
        if run.data.selfstudy is not None:  # context distillation on the teacher's top-k tokens
            score = forward.label_kl
            teacher = _teacher_batch(run.data.selfstudy, [indices[i] for i in chosen], shared, device)
        nll, _ = score(
            model,
            virtual or virtual_of(),
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            *teacher,
            mode=run.mode,
            prefix=prefix,
        )
        loss = nll.sum() / label_total * weight  # x 1.0 is exact: unsharded runs are unchanged
        run.scaler.scale(loss).backward()
        nll_sum += nll.sum().detach().float() * weight
    context_loss = None
    if cpt:  # the context's answers, scored once for this process's rows (the same in every row)
        hidden = prefix.hidden if prefix is not None else forward.virtual_hidden(model, prompt())
        context_nll = prompt.context_nll(model, hidden) * len(examples)
        nll_sum += context_nll.detach().float()
        context_loss = run.scaler.scale(context_nll / label_total)
        if prefix is None:
            context_loss.backward()
    if prefix is not None:
        prefix.backward(context_loss)
    return nll_sum


def _teacher_batch(data, indices: list[int], shared: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids and log-probabilities [B, L, k] of examples `indices` (after their first `shared`
    tokens), right-padded as batching.collate pads the examples (pads carry label -100, so their rows are unused)."""
    ids = [data.teacher_ids[i][shared:] for i in indices]
    logprobs = [data.teacher_logprobs[i][shared:] for i in indices]
    width, k = max(len(t) for t in ids), ids[0].shape[1]
    out_ids = torch.zeros(len(ids), width, k, dtype=torch.long)
    out_lps = torch.zeros(len(ids), width, k, dtype=torch.float32)
    for row, (i, p) in enumerate(zip(ids, logprobs)):
        out_ids[row, : len(i)], out_lps[row, : len(p)] = i, p
    return out_ids.to(device), out_lps.to(device)


# --- between steps: metrics, evaluation, checkpoints, the end -------------------------------------------------------


def _log(run: Run) -> None:
    """Every --log-every steps and at the end: a "train" row averaged over the steps since the last one."""
    done, window = run.done, run.window
    if not _due(done, run.config.log_every, run.total):
        return
    now = time.perf_counter()
    run.logger.log(
        "train",
        done,
        epoch=round(done / run.per_epoch, 4),
        loss=window.nll / window.labels,
        lr=run.optimizer.param_groups[0]["lr"],
        tokens_per_s=window.tokens / (now - window.started),
        tokens=run.progress.tokens,
    )
    run.window = LogWindow(started=now)


def _evaluate(run: Run) -> None:
    """Eval loss; an improvement is saved to OUT/best, --early-stopping non-improvements in a row stop the run."""
    config, progress, done = run.config, run.progress, run.done
    eval_loss = evaluate_loss(
        run.base.model,
        run.prompt,
        run.data.eval_examples,
        config.max_batch_tokens,
        run.base.tokenizer.pad_token_id,
        run.accelerator,
        lockstep=distributed.Lockstep(run.base.device) if run.sharded is not None else None,
    )
    improved = progress.best_eval_loss is None or eval_loss < progress.best_eval_loss
    if improved:
        progress.best_eval_loss, progress.best_step, progress.bad_evals = eval_loss, done, 0
    else:
        progress.bad_evals += 1
    run.logger.log("eval", done, eval_loss=eval_loss, best_eval_loss=progress.best_eval_loss)
    if run.main and improved:
        run.folder.save_best(run.prompt, done, eval_loss)
    if config.early_stopping and progress.bad_evals >= config.early_stopping:
        run.stopped = "early_stopping"


def _save_checkpoint(run: Run) -> None:
    """OUT/checkpoints/step-NNNNNN from the main process; every process waits for it."""
    if run.main:
        run.folder.save_step(run.done, run.epoch, run.prompt, run.optimizer, run.progress, run.low_prompt)
    run.accelerator.wait_for_everyone()


def _finish(run: Run) -> TrainResult:
    """Write the final adapter (the best-eval one or the last step's) into OUT and summarise the run."""
    progress, data = run.progress, run.data
    if run.bar is not None:
        run.bar.close()
    summary = RunSummary(
        steps=run.done,
        train_loss=run.last_loss,
        best_eval_loss=progress.best_eval_loss,
        best_step=progress.best_step,
        stopped=run.stopped,
        final=run.config.final if progress.best_step is not None else "last",
    )
    if run.main:
        run.folder.write_final(run.prompt, summary)
        run.logger.close()
    run.accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=str(run.folder.path),
        steps=run.done,
        train_loss=run.last_loss,
        best_eval_loss=progress.best_eval_loss,
        best_step=progress.best_step,
        stopped=run.stopped,
        tokens_per_second=run.run_tokens / run.run_time if run.run_time else 0.0,
        train_records=len(data.examples),
        eval_records=len(data.eval_examples),
        skipped=data.skipped,
        truncated=data.truncated,
    )


def _stop_on_nan(run: Run, step: int, loss: float) -> None:
    if run.bar is not None:
        run.bar.close()
    found = run.folder.checkpoints()
    keep = (
        f"the last good checkpoint is {found[-1]} (resume with --resume {run.folder.path})"
        if found
        else "no checkpoint had been written yet"
    )
    raise RuntimeError(
        f"training stopped at step {step}: the loss or gradient is not finite (loss {loss}); "
        f"{keep}. Try a lower --lr, --max-grad-norm, or --dtype float32."
    )


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
