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
across processes with one all-reduce. See checkpoint.py for the output folder layout.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt.core import KV_METHODS, forward
from softprompt.core.models import FrozenModel, describe_parameters, load_base
from softprompt.core.prompt import build_prompt
from softprompt.data import batching
from softprompt.data.records import DataError, Fields, load_records, parse_words, split_holdout
from softprompt.data.templates import Template
from softprompt.formats import checkpoint
from softprompt.formats.adapter import load_adapter, save_adapter
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
class TrainState:
    """What a checkpoint's trainer_state.json carries and a resume restores. The field order is the JSON's key
    order; records / step_records / seed identify the run (a resume must match them)."""

    best_eval_loss: float | None
    best_step: int | None
    bad_evals: int
    tokens: int
    records: int
    step_records: int
    seed: int

    def for_checkpoint(self, epoch: int) -> dict:
        return {**asdict(self), "epoch": epoch}


@dataclass
class LogWindow:
    """Train steps since the last "train" metrics row."""

    started: float
    nll: float = 0.0
    labels: int = 0
    tokens: int = 0


@dataclass
class EpochPlans:
    """The current epoch's step-by-step record order (one epoch cached; epochs are visited in order)."""

    lengths: list[int]
    step_records: int
    seed: int
    classes: list[int] | None = None  # each record's class (label word index): class-balanced steps
    epoch: int | None = None
    plan: list[list[int]] = field(default_factory=list)

    def records(self, step: int, per_epoch: int) -> list[int]:
        epoch, index = divmod(step, per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.plan = (
                batching.balanced_plan(self.classes, self.step_records, self.seed, epoch)
                if self.classes is not None
                else batching.epoch_plan(self.lengths, self.step_records, self.seed, epoch)
            )
        return self.plan[index]


@dataclass
class Run:
    """What the set-up produced, plus the counters the loop moves forward."""

    config: TrainConfig
    accelerator: Any
    base: FrozenModel
    out: Path
    examples: list
    eval_examples: list
    lengths: list[int]
    skipped: list[str]
    truncated: int
    prompt: torch.nn.Module  # core.prompt: SoftPrompt, PrefixEncoder or PromptEncoder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    adapter_kwargs: dict
    mode: str  # "kv" or "concat" (see forward.label_nll)
    per_epoch: int
    total: int
    warmup: int
    eval_every: int
    start: int
    state: TrainState
    plans: EpochPlans
    logger: MetricsLogger | None = None
    bar: Any = None
    window: LogWindow | None = None
    done: int = 0  # steps completed
    epoch: int = 0  # the epoch of the last step's records
    last_loss: float | None = None
    run_tokens: int = 0  # tokens and seconds of this process's steps in this invocation (not since a resume)
    run_time: float = 0.0
    stopped: str = "completed"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: TrainConfig) -> TrainResult:
    """Train a soft prompt as configured; returns where the adapter went and how training went."""
    run = _setup(config)
    with _activation_checkpointing(run.base.model, config.gradient_checkpointing):
        for step in range(run.start, run.total):
            _optimiser_step(run, step)
            _log(run)
            if run.eval_examples and _due(run.done, run.eval_every, run.total):
                _evaluate(run)
            if _due(run.done, config.save_every, run.total) or run.stopped != "completed":
                _save_checkpoint(run)
            if run.stopped != "completed":
                break
    return _finish(run)


def _due(done: int, every: int, total: int) -> bool:
    return done % every == 0 or done == total


def _setup(config: TrainConfig) -> Run:
    """Records, model, encoded examples, prompt, optimiser, a resume if asked for, metrics and the start lines."""
    from accelerate import Accelerator

    # accelerate only sets up CPU process groups (gloo) when told it runs on CPU
    auto = config.device in (None, "auto")  # auto: the device accelerate gives this process
    on_cpu = config.device == "cpu" or (auto and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=on_cpu)
    if config.threads:
        torch.set_num_threads(config.threads)
    template = Template(config.template)
    label_words = parse_words(config.label_words, "--label-words")
    init_text = _init_text(config)
    train_recs, eval_recs = _load_records(config, label_words)
    # the model is loaded after the records, so bad data fails fast
    base = (
        config.model
        if isinstance(config.model, FrozenModel)
        else load_base(config.model, device=str(accelerator.device) if auto else config.device, dtype=config.dtype)
    )
    if label_words is None and config.auto_label_words and config.label_field is None:
        label_words = detect_label_words(
            [r.output for r in train_recs.items], base.tokenizer, config.num_virtual_tokens
        )
        if label_words and accelerator.is_main_process:
            print(
                f"train: every training answer is one of {len(label_words)} short answers "
                f"({', '.join(label_words)}): using them as label words ("
                + ("init labels, " if config.init is None and init_text is None else "")
                + "saved with the adapter, so softprompt eval ranks them as choices); --no-auto-label-words "
                "turns this off",
                flush=True,
            )
    if config.max_batch_tokens is None:
        config = dataclasses.replace(config, max_batch_tokens=default_batch_tokens(base.device.type))
    if config.max_length is None:  # what the records need, up to the context and the memory cap
        context = getattr(base.model.config, "max_position_embeddings", None)
        config = dataclasses.replace(
            config, max_length=length_cap(context, config.num_virtual_tokens, config.max_batch_tokens)
        )
    examples, eval_examples, skipped, truncated = _encode(config, base, template, train_recs, eval_recs)
    lengths = [len(e) for e in examples]

    step_records = config.batch_size * config.grad_accum * accelerator.num_processes
    per_epoch = batching.steps_per_epoch(len(examples), step_records)
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    init = config.init or ("text" if init_text is not None else "labels" if label_words else "vocab")
    prompt = build_prompt(
        base,
        config.method,
        init,
        config.num_virtual_tokens,
        init_text,
        label_words,
        config.seed,
        prefix_projection=config.prefix_projection and config.method == "prefix",
        encoder_hidden_size=config.encoder_hidden_size,
        encoder_type=config.encoder_type,
        num_frozen_tokens=config.frozen_tokens,
    )
    optimizer = build_optimizer(config.optimizer, list(prompt.parameters()), config.peak_lr, config.weight_decay)
    state = TrainState(
        best_eval_loss=None,
        best_step=None,
        bad_evals=0,
        tokens=0,
        records=len(examples),
        step_records=step_records,
        seed=config.seed,
    )
    start = 0
    if accelerator.is_main_process:
        checkpoint.clean_staging(config.out)  # what a run killed while writing left behind
    if config.resume:
        start, state = _resume(config, prompt, optimizer, state)
    run = Run(
        config=config,
        accelerator=accelerator,
        base=base,
        out=Path(config.out),
        examples=examples,
        eval_examples=eval_examples,
        lengths=lengths,
        skipped=skipped,
        truncated=truncated,
        prompt=prompt,
        optimizer=optimizer,
        adapter_kwargs={
            "method": prompt.method,
            "peft_fields": prompt.peft_fields(),
            "init": init,
            "init_text": prompt.init_text,
            "template": template,
            "label_words": label_words,
        },
        scaler=torch.amp.GradScaler(base.device.type, enabled=base.dtype == torch.float16),
        # checkpointing re-runs layers: prompts of input embeddings are concatenated; keys/values (prefix,
        # cartridge) stay in kv mode, read through forward.ReadOnlyCache, which a recompute reads unchanged
        mode="concat" if config.gradient_checkpointing and config.method not in KV_METHODS else "kv",
        per_epoch=per_epoch,
        total=total,
        warmup=config.warmup_steps if config.warmup_steps is not None else int(0.05 * total),
        eval_every=config.eval_every or config.save_every,
        start=start,
        done=start,
        state=state,
        plans=EpochPlans(
            lengths,
            step_records,
            config.seed,
            _classes(examples, train_recs.items, label_words) if config.balance_classes else None,
        ),
    )
    _start_reporting(run)
    return run


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


def _classes(examples: list[batching.Example], records, label_words: list[str] | None) -> list[int] | None:
    """Each example's class (the index of its answer among the label words), or None unless every answer is one."""
    if not label_words:
        return None
    output = {r.where: r.output for r in records}
    classes = [label_words.index(output[e.where]) if output[e.where] in label_words else -1 for e in examples]
    return None if -1 in classes else classes


# Classification-like data (detect_label_words): at most this many distinct answers over at least this many records,
# each answer seen at least twice and short: at most this many words and characters (a few tokens with any
# subword tokenizer; counted without one, so the rule does not depend on the model).
AUTO_LABELS_MAX_ANSWERS = 10
AUTO_LABELS_MIN_RECORDS = 20
AUTO_LABELS_MAX_WORDS = 3
AUTO_LABELS_MAX_CHARS = 24


def detect_label_words(outputs: list[str], tokenizer, num_virtual_tokens: int) -> list[str] | None:
    """The distinct answers (in order of first appearance) when the data looks like classification: 2 to
    AUTO_LABELS_MAX_ANSWERS distinct answers over at least AUTO_LABELS_MIN_RECORDS records, each short (at most
    AUTO_LABELS_MAX_WORDS words and AUTO_LABELS_MAX_CHARS characters, no comma), seen at least twice, non-empty once
    tokenised, and no more of them than virtual tokens (they initialise the prompt); else None."""
    if len(outputs) < AUTO_LABELS_MIN_RECORDS:
        return None
    counts: dict[str, int] = {}
    for out in outputs:
        counts[out] = counts.get(out, 0) + 1
        if len(counts) > AUTO_LABELS_MAX_ANSWERS:
            return None
    words = list(counts)
    if len(words) < 2 or len(words) > num_virtual_tokens or min(counts.values()) < 2:
        return None
    if any(
        not w.strip()
        or "," in w
        or len(w) > AUTO_LABELS_MAX_CHARS
        or len(w.split()) > AUTO_LABELS_MAX_WORDS
        or not tokenizer(w, add_special_tokens=False)["input_ids"]
        for w in words
    ):
        return None
    return words


def _load_records(config: TrainConfig, label_words):
    """The training records and the evaluation ones (from --eval-data, a held-out fraction, or None)."""
    fields, mapping = Fields.with_labels(config.fields, config.label_field, label_words, "--label-words")
    train_recs = load_records(config.data, fields, mapping, config.skip_bad, config.limit)
    eval_recs = None
    if config.eval_data is not None:
        eval_recs = load_records(config.eval_data, fields, mapping, config.skip_bad)
    elif config.eval_fraction:
        train_recs, eval_recs = split_holdout(train_recs, config.eval_fraction, config.seed)
    return train_recs, eval_recs


def _encode(config: TrainConfig, base: FrozenModel, template: Template, train_recs, eval_recs):
    """Tokenised (train examples, eval examples, skipped records' reasons, truncated count)."""
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
    return examples, eval_examples, skipped, truncated


def _resume(config: TrainConfig, prompt: torch.nn.Module, optimizer, state: TrainState) -> tuple[int, TrainState]:
    """Load a checkpoint's prompt (every trainable tensor, e.g. a prompt encoder's), optimiser state and RNG;
    returns (its step, its training state)."""
    folder = checkpoint.resolve_resume(config.resume)
    tensors, saved = checkpoint.load_checkpoint(folder)
    for key in ("records", "step_records", "seed"):
        if saved.get(key) != getattr(state, key):
            raise ValueError(
                f"--resume {folder}: the checkpoint was made with {key}={saved.get(key)}, this run has "
                f"{getattr(state, key)}; resume with the same data, batch size, processes and seed"
            )
    saved_method = saved.get("method", "prompt")
    if saved_method != prompt.method:
        raise ValueError(
            f"--resume {folder}: the checkpoint was made with --method {saved_method}, this run has "
            f"--method {prompt.method}"
        )
    ours = prompt.state_dict()
    theirs = {k[len(MODULE_KEY) :]: v for k, v in tensors.items() if k.startswith(MODULE_KEY)}
    if not theirs and prompt.method == "prompt":  # checkpoints written before module tensors were saved
        theirs = {"embeddings": load_adapter(folder).embeddings}
    for key, value in ours.items():
        if key not in theirs or theirs[key].shape != value.shape:
            found = tuple(theirs[key].shape) if key in theirs else "missing"
            raise ValueError(
                f"--resume {folder}: trainable tensor {key} is {found} in the checkpoint, "
                f"{tuple(value.shape)} in this run (same --method, --num-virtual-tokens and encoder "
                "options?)"
            )
    prompt.load_state_dict({k: theirs[k] for k in ours})
    checkpoint.load_optimizer_state(optimizer, tensors, saved.pop("optimizer"))
    checkpoint.restore_rng(tensors)
    print(f"resuming from {folder} (step {saved['step']})", flush=True)
    return saved["step"], TrainState(**{k: saved.get(k, v) for k, v in asdict(state).items()})


MODULE_KEY = "prompt."  # checkpoint tensors of the trainable module: prompt.<state_dict key>


def _start_reporting(run: Run) -> None:
    """Open metrics.jsonl (trimmed to the resumed step), print the run's outline, start the progress bar."""
    config = run.config
    run.logger = MetricsLogger(run.out, run.main, config.tensorboard, resume_step=run.start if config.resume else None)
    if run.main:
        print(describe_parameters(run.base.model, run.prompt))
        print(
            f"train: {len(run.examples)} records ({run.truncated} truncated to {config.max_length} tokens, the "
            f"longest {max(run.lengths)}), "
            f"eval: {len(run.eval_examples)}, {run.accelerator.num_processes} process(es), "
            f"{run.state.step_records} records/step, {run.total} steps, device {run.base.device}, "
            f"dtype {run.base.dtype}, up to {config.max_batch_tokens} tokens per forward pass",
            flush=True,
        )
    run.bar = _progress(config.progress and run.main, run.total, run.start)
    run.window = LogWindow(started=time.perf_counter())


@contextmanager
def _activation_checkpointing(model, enabled: bool):
    """Recompute activations in the backward pass while training (--gradient-checkpointing); always undone."""
    if not enabled:
        yield
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers only checkpoints in training mode; the frozen weights are unaffected
    # transformers drops a checkpointed layer's cache (a recompute would extend it twice) unless the layer says it
    # only reads it; the text passes of training read the prompt's keys/values through forward.ReadOnlyCache
    readers = [m for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]
    for layer in readers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in readers:
            del layer._can_checkpoint_with_cache
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.eval()


def _optimiser_step(run: Run, step: int) -> None:
    """One optimiser step (0-based `step`) over its records, then the step's bookkeeping."""
    config, prompt, optimizer, scaler = run.config, run.prompt, run.optimizer, run.scaler
    records = run.plans.records(step, run.per_epoch)
    label_total = sum(run.examples[i].label_count for i in records)
    mine = batching.shard(records, run.lengths, run.accelerator.process_index, run.accelerator.num_processes)
    tick = time.perf_counter()
    for lr_group in optimizer.param_groups:
        lr_group["lr"] = lr_at(step, run.total, config.peak_lr, run.warmup, config.schedule)
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
        _stop_on_nan(run.out, step + 1, step_loss, run.bar)
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    run.done, run.epoch, run.last_loss = step + 1, run.plans.epoch, step_loss
    step_tokens = sum(run.lengths[i] for i in records)
    run.run_tokens += step_tokens
    run.run_time += time.perf_counter() - tick
    run.state.tokens += step_tokens
    run.window.nll += step_loss * label_total
    run.window.labels += label_total
    run.window.tokens += step_tokens
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{run.run_tokens / max(run.run_time, 1e-9):.0f}")
        run.bar.update(1)


def _accumulate_gradients(run: Run, mine: list[int], label_total: int) -> torch.Tensor:
    """Forward and backward over this process's records in micro-batches; returns their summed NLL. Each
    micro-batch's loss is divided by the whole step's answer-token count, so the gradients add up to the step's."""
    model, prompt, device = run.base.model, run.prompt, run.base.device
    nll_sum = torch.zeros((), device=device)
    # kv mode: the virtual tokens (and a prompt encoder) run once per step, not once per micro-batch, and so do the
    # leading prompt tokens all of the step's records share (see forward.SharedPrefix); the micro-batches hold what
    # follows them. Concat mode re-runs the prompt in each micro-batch, whose backward consumes its graph.
    virtual = prompt.virtual() if run.mode == "kv" else None
    examples = [run.examples[i] for i in mine]
    # (not under checkpointing: the shared text's pass writes a cache, which a layer's recompute would extend twice)
    shared = (
        batching.shared_prompt_length(examples) if run.mode == "kv" and not run.config.gradient_checkpointing else 0
    )
    text = torch.tensor(examples[0].ids[:shared] if shared else [], dtype=torch.long, device=device)
    prefix = forward.SharedPrefix(model, virtual, text) if run.mode == "kv" else None
    rest = [e.after(shared) for e in examples]
    for micro in batching.micro_batches(list(range(len(rest))), [len(e) for e in rest], run.config.max_batch_tokens):
        batch = batching.collate([rest[i] for i in micro], run.base.tokenizer.pad_token_id, device)
        nll, _ = forward.label_nll(
            model,
            virtual or prompt.virtual(),
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            mode=run.mode,
            prefix=prefix,
        )
        loss = nll.sum() / label_total
        run.scaler.scale(loss).backward()
        nll_sum += nll.sum().detach().float()
    if prefix is not None:
        prefix.backward()
    return nll_sum


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
        tokens=run.state.tokens,
    )
    run.window = LogWindow(started=now)


def _evaluate(run: Run) -> None:
    """Eval loss; an improvement is saved to OUT/best, --early-stopping non-improvements in a row stop the run."""
    config, state, done = run.config, run.state, run.done
    eval_loss = evaluate_loss(
        run.base.model,
        run.prompt,
        run.eval_examples,
        config.max_batch_tokens,
        run.base.tokenizer.pad_token_id,
        run.accelerator,
    )
    improved = state.best_eval_loss is None or eval_loss < state.best_eval_loss
    if improved:
        state.best_eval_loss, state.best_step, state.bad_evals = eval_loss, done, 0
    else:
        state.bad_evals += 1
    run.logger.log("eval", done, eval_loss=eval_loss, best_eval_loss=state.best_eval_loss)
    if run.main and improved:
        save_adapter(
            run.out / "best",
            _saved_tensor(run.prompt),
            run.base,
            **run.adapter_kwargs,
            extra={"step": done, "eval_loss": eval_loss},
        )
    if config.early_stopping and state.bad_evals >= config.early_stopping:
        run.stopped = "early_stopping"


def _save_checkpoint(run: Run) -> None:
    """OUT/checkpoints/step-NNNNNN from the main process; every process waits for it."""
    if run.main:
        module = {MODULE_KEY + k: v.detach().cpu().contiguous() for k, v in run.prompt.state_dict().items()}
        checkpoint.save_checkpoint(
            run.out,
            run.done,
            _saved_tensor(run.prompt),
            run.base,
            run.adapter_kwargs,
            run.optimizer,
            {**run.state.for_checkpoint(run.epoch), "method": run.prompt.method},
            run.config.keep_checkpoints,
            tensors=module,
        )
    run.accelerator.wait_for_everyone()


def _finish(run: Run) -> TrainResult:
    """Write the final adapter (the best-eval one or the last step's) into OUT and summarise the run."""
    config, state = run.config, run.state
    if run.bar is not None:
        run.bar.close()
    final_emb = _saved_tensor(run.prompt)
    if config.final == "best" and state.best_step is not None and run.main:
        final_emb = load_adapter(run.out / "best").embeddings
    summary = {
        "steps": run.done,
        "train_loss": run.last_loss,
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
        "stopped": run.stopped,
        "final": config.final if state.best_step is not None else "last",
    }
    if run.main:
        checkpoint.write_adapter_into(
            run.out, final_emb, run.base, {**run.adapter_kwargs, "extra": {"training": summary}}
        )
        run.logger.close()
    run.accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=str(run.out),
        steps=run.done,
        train_loss=run.last_loss,
        best_eval_loss=state.best_eval_loss,
        best_step=state.best_step,
        stopped=run.stopped,
        tokens_per_second=run.run_tokens / run.run_time if run.run_time else 0.0,
        train_records=len(run.examples),
        eval_records=len(run.eval_examples),
        skipped=run.skipped,
        truncated=run.truncated,
    )


def _saved_tensor(prompt: torch.nn.Module) -> torch.Tensor:
    """What the adapter saves: the module's output (a prompt encoder's embeddings, a projected prefix), fp32 CPU."""
    with torch.no_grad():
        return prompt().detach().float().cpu()


def _stop_on_nan(out: Path, step: int, loss: float, bar) -> None:
    if bar is not None:
        bar.close()
    found = checkpoint.list_checkpoints(out)
    keep = (
        f"the last good checkpoint is {found[-1]} (resume with --resume {out})"
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
