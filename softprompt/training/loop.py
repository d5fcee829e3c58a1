"""`softprompt train`: tune a soft prompt on instruction / input / output records (or labelled classification data).

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
split into micro-batches or processes does not change the result. Gradients of the one trainable tensor are
summed across processes with one all-reduce. See checkpoint.py for the output folder layout.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softprompt.data import batching
from softprompt.formats import checkpoint
from softprompt.core import forward
from softprompt.data.records import DataError, Fields, load_records, parse_words, split_holdout
from softprompt.training.config import TrainConfig
from softprompt.training.metrics import MetricsLogger
from softprompt.core.models import FrozenModel, describe_parameters, load_base
from softprompt.core.prompt import SoftPrompt
from softprompt.training.optim import build_optimizer, lr_at
from softprompt.training.scoring import evaluate_loss
from softprompt.data.templates import Template


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


def train(config: TrainConfig) -> TrainResult:
    """Train a soft prompt as configured; returns where the adapter went and how training went."""
    from accelerate import Accelerator

    # accelerate only sets up CPU process groups (gloo) when told it runs on CPU
    on_cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=on_cpu)
    rank, world = accelerator.process_index, accelerator.num_processes
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    template = Template(config.template)

    label_words = parse_words(config.label_words, "--label-words")
    fields, mapping = Fields.with_labels(config.fields, config.label_field, label_words, "--label-words")
    train_recs = load_records(config.data, fields, mapping, config.skip_bad, config.limit)
    eval_recs = None
    if config.eval_data is not None:
        eval_recs = load_records(config.eval_data, fields, mapping, config.skip_bad)
    elif config.eval_fraction:
        train_recs, eval_recs = split_holdout(train_recs, config.eval_fraction, config.seed)
    skipped = list(train_recs.skipped) + (list(eval_recs.skipped) if eval_recs else [])
    # the model is loaded after the records, so bad data fails fast
    base = config.model if isinstance(config.model, FrozenModel) else load_base(
        config.model, device=config.device or str(accelerator.device), dtype=config.dtype)
    model, tokenizer, device = base.model, base.tokenizer, base.device
    examples, bad, truncated = batching.encode_records(train_recs.items, tokenizer, template, config.max_length,
                                                       config.skip_bad)
    skipped += bad
    eval_examples = []
    if eval_recs is not None:
        eval_examples, bad, _ = batching.encode_records(eval_recs.items, tokenizer, template, config.max_length,
                                                        config.skip_bad)
        skipped += bad
    if not examples:
        raise DataError(f"{train_recs.source}: no usable records after tokenisation ({len(skipped)} skipped)")
    lengths = [len(e) for e in examples]

    step_records = config.batch_size * config.grad_accum * world
    per_epoch = batching.steps_per_epoch(len(examples), step_records)
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    warmup = config.warmup_steps if config.warmup_steps is not None else int(0.05 * total)
    eval_every = config.eval_every or config.save_every

    init = config.init or ("labels" if label_words else "vocab")
    prompt = SoftPrompt.initialise(base, init, config.num_virtual_tokens, config.init_text, label_words,
                                   config.seed)
    optimizer = build_optimizer(config.optimizer, [prompt.embeddings], config.lr, config.weight_decay)
    adapter_kwargs = {"init": init, "init_text": prompt.init_text, "template": template,
                      "label_words": label_words}
    state = {"best_eval_loss": None, "best_step": None, "bad_evals": 0, "tokens": 0,
             "records": len(examples), "step_records": step_records, "seed": config.seed}
    start = 0
    if config.resume:
        start, state = _resume(config, prompt, optimizer, state)
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers only checkpoints in training mode; the frozen weights are unaffected
    mode = "concat" if config.gradient_checkpointing else "kv"
    scaler = torch.amp.GradScaler(device.type, enabled=base.dtype == torch.float16)

    main = accelerator.is_main_process
    logger = MetricsLogger(out, main, config.tensorboard, resume_step=start if config.resume else None)
    if main:
        print(describe_parameters(model, prompt))
        print(f"train: {len(examples)} records ({truncated} truncated to {config.max_length} tokens), "
              f"eval: {len(eval_examples)}, {world} process(es), {step_records} records/step, "
              f"{total} steps, device {device}, dtype {base.dtype}", flush=True)
    bar = _progress(config.progress and main, total, start)
    plans: dict[int, list[list[int]]] = {}
    window = {"nll": 0.0, "labels": 0, "tokens": 0, "time": time.perf_counter()}
    run_tokens, run_time, stopped, last_loss, done = 0, 0.0, "completed", None, start

    try:
        for step in range(start, total):
            epoch, index = divmod(step, per_epoch)
            if epoch not in plans:
                plans = {epoch: batching.epoch_plan(lengths, step_records, config.seed, epoch)}
            records = plans[epoch][index]
            label_total = sum(examples[i].label_count for i in records)
            mine = batching.shard(records, lengths, rank, world)
            tick = time.perf_counter()
            for lr_group in optimizer.param_groups:
                lr_group["lr"] = lr_at(step, total, config.lr, warmup, config.schedule)
            nll_sum = torch.zeros((), device=device)
            # kv mode: the virtual tokens run once per step, not once per micro-batch (see forward.SharedPrefix)
            prefix = forward.SharedPrefix(model, prompt()) if mode == "kv" else None
            for micro in batching.micro_batches(mine, lengths, config.max_batch_tokens):
                batch = batching.collate([examples[i] for i in micro], tokenizer.pad_token_id, device)
                nll, _ = forward.label_nll(model, prompt(), batch["input_ids"], batch["attention_mask"],
                                           batch["labels"], mode=mode, prefix=prefix)
                loss = nll.sum() / label_total
                scaler.scale(loss).backward()
                nll_sum += nll.sum().detach().float()
            if prefix is not None:
                prefix.backward()
            grad = prompt.embeddings.grad
            if grad is None:
                grad = prompt.embeddings.grad = torch.zeros_like(prompt.embeddings)
            if world > 1:
                grad.copy_(accelerator.reduce(grad, reduction="sum"))
                nll_sum = accelerator.reduce(nll_sum, reduction="sum")
            step_loss = nll_sum.item() / label_total
            scaler.unscale_(optimizer)
            if not math.isfinite(step_loss) or not torch.isfinite(grad).all():
                _stop_on_nan(out, step + 1, step_loss, bar)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([prompt.embeddings], config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            step_tokens = sum(lengths[i] for i in records)
            elapsed = time.perf_counter() - tick
            run_tokens, run_time, last_loss = run_tokens + step_tokens, run_time + elapsed, step_loss
            state["tokens"] += step_tokens
            window["nll"] += step_loss * label_total
            window["labels"] += label_total
            window["tokens"] += step_tokens
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{run_tokens / max(run_time, 1e-9):.0f}")
                bar.update(1)
            if done % config.log_every == 0 or done == total:
                now = time.perf_counter()
                logger.log("train", done, epoch=round(done / per_epoch, 4), loss=window["nll"] / window["labels"],
                           lr=optimizer.param_groups[0]["lr"], tokens_per_s=window["tokens"] / (now - window["time"]),
                           tokens=state["tokens"])
                window = {"nll": 0.0, "labels": 0, "tokens": 0, "time": now}
            if eval_examples and (done % eval_every == 0 or done == total):
                eval_loss = evaluate_loss(model, prompt, eval_examples, config.max_batch_tokens, tokenizer.pad_token_id,
                                          accelerator)
                improved = state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"]
                state.update(best_eval_loss=eval_loss if improved else state["best_eval_loss"],
                             best_step=done if improved else state["best_step"],
                             bad_evals=0 if improved else state["bad_evals"] + 1)
                logger.log("eval", done, eval_loss=eval_loss, best_eval_loss=state["best_eval_loss"])
                if main and improved:
                    from softprompt.formats.adapter import save_adapter

                    save_adapter(out / "best", prompt.embeddings, base, **adapter_kwargs,
                                 extra={"step": done, "eval_loss": eval_loss})
                if config.early_stopping and state["bad_evals"] >= config.early_stopping:
                    stopped = "early_stopping"
            if done % config.save_every == 0 or done == total or stopped != "completed":
                if main:
                    checkpoint.save_checkpoint(out, done, prompt.embeddings, base, adapter_kwargs, optimizer,
                                               {**state, "epoch": epoch}, config.keep_checkpoints)
                accelerator.wait_for_everyone()
            if stopped != "completed":
                break

    finally:
        if config.gradient_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
            model.eval()
    if bar is not None:
        bar.close()
    final_emb = prompt.embeddings
    if config.final == "best" and state["best_step"] is not None:
        from softprompt.formats.adapter import load_adapter

        final_emb = load_adapter(out / "best").embeddings if main else final_emb
    summary = {"steps": done, "train_loss": last_loss,
               "best_eval_loss": state["best_eval_loss"], "best_step": state["best_step"], "stopped": stopped,
               "final": config.final if state["best_step"] is not None else "last"}
    if main:
        checkpoint.write_adapter_into(out, final_emb, base, {**adapter_kwargs, "extra": {"training": summary}})
        logger.close()
    accelerator.wait_for_everyone()
    return TrainResult(str(out), summary["steps"], last_loss, state["best_eval_loss"], state["best_step"], stopped,
                       run_tokens / run_time if run_time else 0.0, len(examples), len(eval_examples), skipped,
                       truncated)


def _resume(config: TrainConfig, prompt: SoftPrompt, optimizer, state: dict) -> tuple[int, dict]:
    from softprompt.formats.adapter import load_adapter

    folder = checkpoint.resolve_resume(config.resume)
    tensors, saved = checkpoint.load_checkpoint(folder)
    for key in ("records", "step_records", "seed"):
        if saved.get(key) != state[key]:
            raise ValueError(f"--resume {folder}: the checkpoint was made with {key}={saved.get(key)}, this run has "
                             f"{state[key]}; resume with the same data, batch size, processes and seed")
    embeddings = load_adapter(folder).embeddings
    if embeddings.shape != prompt.embeddings.shape:
        raise ValueError(f"--resume {folder}: prompt shape {tuple(embeddings.shape)} differs from this run's "
                         f"{tuple(prompt.embeddings.shape)}")
    with torch.no_grad():
        prompt.embeddings.copy_(embeddings)
    checkpoint.load_optimizer_state(optimizer, tensors, saved.pop("optimizer"))
    checkpoint.restore_rng(tensors)
    print(f"resuming from {folder} (step {saved['step']})", flush=True)
    return saved["step"], {k: saved.get(k, v) for k, v in state.items()}


def _stop_on_nan(out: Path, step: int, loss: float, bar) -> None:
    if bar is not None:
        bar.close()
    found = checkpoint.list_checkpoints(out)
    keep = f"the last good checkpoint is {found[-1]} (resume with --resume {out})" if found else \
        "no checkpoint had been written yet"
    raise RuntimeError(f"training stopped at step {step}: the loss or gradient is not finite (loss {loss}); "
                       f"{keep}. Try a lower --lr, --max-grad-norm, or --dtype float32.")


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
