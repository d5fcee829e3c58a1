"""How OpenMP's wait policy holds up on a busy CPU: training and single-stream generation tokens/s on the default
model, on a quiet machine and beside one CPU-bound competing process per core, for each wait policy.

Policies (each run in a fresh child process, since OpenMP reads its settings once, when torch loads it):
  softprompt      what softprompt sets by itself (a bounded spin, softprompt/runtime.py)
  openmp-default  OpenMP's own default (SOFTPROMPT_OMP_WAIT=keep: GNU OpenMP spins 300,000 iterations per wait)
  active          OMP_WAIT_POLICY=ACTIVE (spin without bound)
  passive         OMP_WAIT_POLICY=PASSIVE (sleep at once)
  spin:N          GOMP_SPINCOUNT=N (to explore other bounds)

Per workload and policy it prints tokens/s quiet and busy, `busy_share` = busy / quiet of that policy (the fair share
beside one competitor per core is 0.5; the goal is >= 0.4), and `quiet_vs_fastest` = quiet / the fastest policy's
quiet (goal >= 0.95). The competitors are plain Python busy loops, one per core, started before each busy child and
ended after it. Run it on an otherwise quiet machine; the last line printed is a JSON object with every figure.

Usage: python benchmarks/contention.py [--model M] [--dtype auto] [--policies softprompt,openmp-default,active,passive]
       [--train-steps 8] [--gen-tokens 48] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

POLICIES = {
    "softprompt": {},
    "openmp-default": {"SOFTPROMPT_OMP_WAIT": "keep"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "SOFTPROMPT_OMP_WAIT")
STREAM_PROMPT = "Write a long story about a lighthouse keeper who finds a map."


def policy_env(policy: str) -> dict[str, str]:
    """The child's environment: this one without any wait variable, plus the policy's."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    if policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    elif policy in POLICIES:
        env.update(POLICIES[policy])
    else:
        raise SystemExit(f"unknown policy {policy!r}: use {', '.join(POLICIES)} or spin:N")
    return env


def child(args) -> None:
    """Run both workloads in this process and print their tokens/s as JSON."""
    import torch

    import softprompt  # noqa: F401  (first: it chooses OpenMP's waits before torch loads)
    from softprompt.core.models import load_base
    from softprompt.demo.task import make_records
    from softprompt.inference.batch import GenerationRequest
    from softprompt.inference.engine import Engine
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    base = load_base(args.model, device="cpu", dtype=args.dtype)
    records, _ = make_records(num_train=8 * args.train_steps, seed=0)
    with tempfile.TemporaryDirectory() as out:
        result = train(
            TrainConfig(
                data=records,
                out=out,
                model=base,
                max_steps=args.train_steps,
                progress=False,
                save_every=10_000,
                log_every=10_000,
            )
        )
    engine = Engine(base)
    ids = engine.encode(STREAM_PROMPT)
    engine.generate([GenerationRequest(ids, max_new_tokens=4)])  # warm-up
    start = time.perf_counter()
    out = engine.generate([GenerationRequest(ids, max_new_tokens=args.gen_tokens)])[0]
    seconds = time.perf_counter() - start
    chosen = {k: os.environ[k] for k in WAIT_VARIABLES if k in os.environ}
    print(
        json.dumps(
            {
                "train": result.tokens_per_second,
                "generate": len(out.token_ids) / seconds,
                "waits": chosen,
                "threads": torch.get_num_threads(),
                "dtype": str(base.dtype).replace("torch.", ""),
            }
        )
    )


def run_child(args, policy: str, busy: bool) -> dict:
    """One child run, with one busy-loop competitor per core when `busy`."""
    competitors = []
    if busy:
        competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
        time.sleep(0.5)
    try:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            "--dtype",
            args.dtype,
            "--train-steps",
            str(args.train_steps),
            "--gen-tokens",
            str(args.gen_tokens),
        ]
        if args.model:
            cmd += ["--model", args.model]
        done = subprocess.run(cmd, env=policy_env(policy), capture_output=True, text=True, timeout=args.timeout)
    finally:
        for proc in competitors:
            proc.kill()
            proc.wait()
    if done.returncode != 0:
        raise SystemExit(f"child ({policy}, busy={busy}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, policies: list[str]) -> dict:
    """Best of --repeats per (policy, condition); runs interleaved so drift hits every policy alike."""
    best: dict = {p: {"quiet": {}, "busy": {}} for p in policies}
    for _ in range(args.repeats):
        for condition in ("quiet", "busy"):
            for policy in policies:
                got = run_child(args, policy, condition == "busy")
                for workload in ("train", "generate"):
                    old = best[policy][condition].get(workload, 0.0)
                    best[policy][condition][workload] = max(old, got[workload])
                best[policy]["dtype"], best[policy]["threads"] = got["dtype"], got["threads"]
                best[policy].setdefault("waits", {})[condition] = got["waits"]
                print(
                    f"{policy:>15} {condition:>5}: train {got['train']:7.1f}  generate {got['generate']:6.2f} "
                    f"tokens/s  {got['waits']}",
                    flush=True,
                )
    return best


def summarise(best: dict) -> dict:
    """Per workload: tokens/s, busy_share and quiet_vs_fastest per policy."""
    summary = {}
    for workload in ("train", "generate"):
        fastest = max(b["quiet"][workload] for b in best.values())
        summary[workload] = {
            policy: {
                "quiet": round(b["quiet"][workload], 2),
                "busy": round(b["busy"][workload], 2),
                "busy_share": round(b["busy"][workload] / b["quiet"][workload], 3),
                "quiet_vs_fastest": round(b["quiet"][workload] / fastest, 3),
                "waits": b["waits"],
            }
            for policy, b in best.items()
        }
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--policies", default="softprompt,openmp-default,active,passive")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    load = os.getloadavg()[0]
    best = measure(args, args.policies.split(","))
    any_policy = next(iter(best.values()))
    print(
        json.dumps(
            {
                "cores": os.cpu_count(),
                "load_average_at_start": round(load, 2),
                "dtype": any_policy["dtype"],
                "threads": any_policy["threads"],
                "competitors": os.cpu_count(),
                **summarise(best),
            }
        )
    )


if __name__ == "__main__":
    main()
