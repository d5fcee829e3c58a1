"""The `softprompt train` command line (flags map one to one onto train.TrainConfig)."""

from __future__ import annotations

import argparse
import json

from softprompt.core.prompt import INIT_METHODS
from softprompt.training.optim import OPTIMIZERS, SCHEDULES


def register(subparsers) -> None:
    from softprompt.training.config import TrainConfig

    d = TrainConfig(data="", out="")
    p = subparsers.add_parser(
        "train", help="train a soft prompt on a data file",
        description="Train a soft prompt (N virtual tokens) in front of a frozen causal LM. The final adapter is "
                    "written to --out as a PEFT-format folder; checkpoints go to OUT/checkpoints, the best-eval "
                    "adapter to OUT/best, metrics to OUT/metrics.jsonl and OUT/loss_curve.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="FILE_OR_DIR",
                   help="training records: .json (array), .jsonl, .csv, .parquet, or a datasets save_to_disk folder")
    g.add_argument("--eval-data", metavar="FILE", help="evaluation records (same formats); eval loss is computed "
                   "every --eval-every steps and the best adapter kept")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="hold out this fraction of --data as the evaluation split (when --eval-data is not given)")
    g.add_argument("--fields", help="source field names, e.g. 'instruction=sentence,input=context,output=answer' "
                   "(defaults instruction / input / output; the input field is optional)")
    g.add_argument("--label-field", help="a field holding integer class labels; label i becomes the output "
                   "word i of --label-words (e.g. --label-field label --label-words negative,positive)")
    g.add_argument("--label-words", help="comma-separated answer words for the classes (for --label-field and "
                   "--init labels)")
    g.add_argument("--template", default=d.template, help="prompt format: 'human-assistant' (Human: ...\\n\\nAssistant: ), "
                   "'chat' (the base model's chat template), or a string with {instruction} and optionally {input}; "
                   "saved with the adapter")
    g.add_argument("--max-length", type=int, default=d.max_length, help="truncate prompt+answer to this many tokens")
    g.add_argument("--limit", type=int, help="use only the first N good records of --data")
    g.add_argument("--skip-bad", action="store_true", help="skip (and count and report) bad records instead of "
                   "stopping at the first one")
    g = p.add_argument_group("model and prompt")
    g.add_argument("--model", help="base model: a local folder, a .gguf file, a hub id, or omitted for the "
                   "embedded SmolLM2-135M-Instruct")
    g.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens,
                   help="soft-prompt length (with --init text, default: the init text's token count if omitted)")
    g.add_argument("--init", choices=INIT_METHODS, default=d.init, help="initialisation: embeddings of --init-text, "
                   "sampled frequent-vocabulary rows, random at the embedding scale, or the --label-words (default: "
                   "labels when --label-words is given, else vocab)")
    g.add_argument("--init-text", help="text whose token embeddings initialise the prompt (--init text)")
    g.add_argument("--dtype", default=d.dtype, help="auto (bf16 on GPUs that support it, else fp32), float32, "
                   "bfloat16, float16")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the accelerate process's device)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate (Adafactor: the cap on each step relative to the prompt's RMS; "
                        "AdamW: absolute, try 3e-2)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimiser")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="LR decay after warmup")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 5%% of the steps)")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training data")
    g.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="records per process per step and "
                   "accumulation round; a step covers batch-size x grad-accum x processes records")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation factor")
    g.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, help="token budget of one forward "
                   "pass (rows x longest row); a step's records are packed into such micro-batches, which never "
                   "changes the result, only speed and memory")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation, data order and hold-out")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward "
                   "(less memory, ~30%% slower)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder (the final adapter, checkpoints, "
                   "metrics)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="log loss, LR and tokens/s every N steps")
    g.add_argument("--save-every", type=int, default=d.save_every, help="write a checkpoint every N steps")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (default: --save-every)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest checkpoints kept")
    g.add_argument("--early-stopping", type=int, metavar="N", help="stop after N evaluations without improvement")
    g.add_argument("--final", choices=("best", "last"), default=d.final, help="adapter written to --out: the "
                   "best-eval one (when there is an eval split) or the last step's")
    g.add_argument("--resume", metavar="DIR", help="continue from a checkpoint folder or an output folder's newest "
                   "checkpoint (same data, batch size and seed)")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs to OUT/tensorboard")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    config = TrainConfig(
        data=args.data, out=args.out, model=args.model, num_virtual_tokens=args.num_virtual_tokens, init=args.init,
        init_text=args.init_text, label_words=args.label_words, template=args.template, fields=args.fields,
        label_field=args.label_field, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
        schedule=args.schedule, warmup_steps=args.warmup_steps, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens, max_grad_norm=args.max_grad_norm or None,
        eval_data=args.eval_data, eval_fraction=args.eval_fraction, eval_every=args.eval_every,
        save_every=args.save_every, log_every=args.log_every, keep_checkpoints=args.keep_checkpoints,
        early_stopping=args.early_stopping, final=args.final, resume=args.resume, seed=args.seed, limit=args.limit,
        gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, device=args.device,
        threads=args.threads, skip_bad=args.skip_bad, tensorboard=args.tensorboard, progress=not args.no_progress,
    )
    result = train(config)
    for reason in result.skipped:
        print(f"skipped: {reason}")
    summary = {"adapter": result.adapter_dir, "steps": result.steps, "train_loss": result.train_loss,
               "best_eval_loss": result.best_eval_loss, "best_step": result.best_step, "stopped": result.stopped,
               "tokens_per_s": round(result.tokens_per_second, 1), "skipped": len(result.skipped),
               "truncated": result.truncated}
    print(json.dumps(summary))
    return 0
