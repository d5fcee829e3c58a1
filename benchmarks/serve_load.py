"""Load test of `softprompt serve` on loopback: many concurrent greedy requests over several adapters.

    python benchmarks/serve_load.py                       # 200 requests, 32 concurrent, 4 adapters + base
    python benchmarks/serve_load.py --requests 20 --max-tokens 8   # a quick check

1. Loads the base model (default: the embedded SmolLM2-135M-Instruct) and writes a few freshly initialised adapters
   (different init methods, lengths and templates) to a temporary folder.
2. Reference and baseline: every request run alone, one at a time, through the engine (what `softprompt generate`
   runs), timed. This is "serving the same requests one at a time" without any HTTP overhead.
3. Starts the real server in this process on 127.0.0.1 and sends the same requests with the official `openai`
   client from `--concurrency` threads (completions and chat, mixed over adapters and the base model).
4. Counts errors and mismatches (a response whose text or completion-token count differs from the request run
   alone) and reports throughput and p50/p99 latency of both ways.

Bounded: a fixed number of requests, a per-request timeout and an overall --time-limit (requests not sent before it
count as errors). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.inference.engine import Engine, GenerationRequest
from softprompt.core.models import load_base
from softprompt.core.prompt import SoftPrompt
from softprompt.serve import BackgroundServer
from softprompt.serve.app import create_app
from softprompt.data.templates import Template, encode_text

INSTRUCTIONS = [
    "Give three tips for staying healthy.", "What is the capital of France?", "Translate 'good morning' to Spanish.",
    "Write a haiku about the sea.", "Explain photosynthesis in one sentence.", "Name two primary colours.",
    "Classify the sentiment: I loved this film!", "What is 12 times 7?", "Suggest a name for a pet turtle.",
    "Summarise: The meeting was moved from Monday to Wednesday afternoon.", "List three fruits that are red.",
    "Is the sentiment of 'a dull, lifeless plot' positive or negative?", "Describe a rainbow to a child.",
    "Rewrite in the passive voice: The cat chased the mouse.", "Why is the sky blue?", "Write a short greeting card.",
]
# name -> (init method, init text, virtual tokens, template)
ADAPTERS = {
    "sentiment": ("text", "Classify the sentiment of the review as positive or negative.", None, "human-assistant"),
    "translate": ("text", "Translate the text faithfully.", 16, "chat"),
    "vocab": ("vocab", None, 20, "human-assistant"),
    "qa": ("random", None, 8, "Question: {instruction}\nAnswer:"),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def build_requests(n: int, models: list[str], max_tokens: int) -> list[dict]:
    requests = []
    for i in range(n):
        model = models[i % len(models)]
        instruction = INSTRUCTIONS[(i * 7) % len(INSTRUCTIONS)]
        budget = max(1, max_tokens - 4 * (i % 3))  # different lengths: rows leave at different steps
        if i % 2:
            requests.append({"kind": "chat", "model": model, "messages": [{"role": "user", "content": instruction}],
                             "max_tokens": budget})
        else:
            requests.append({"kind": "completion", "model": model, "prompt": f"{instruction}\n", "max_tokens": budget})
    return requests


def reference_ids(engine: Engine, tokenizer, req: dict) -> list[int]:
    key = None if req["model"] == "base" else req["model"]
    if req["kind"] == "chat":
        return engine.encode_chat(req["messages"], key)
    return encode_text(tokenizer, req["prompt"])


def run_sequential(engine: Engine, tokenizer, requests: list[dict]) -> tuple[list, list[float], float]:
    results, latencies = [], []
    start = time.perf_counter()
    for req in requests:
        t0 = time.perf_counter()
        key = None if req["model"] == "base" else req["model"]
        gen = GenerationRequest(reference_ids(engine, tokenizer, req), adapter=key, max_new_tokens=req["max_tokens"])
        results.append(engine.generate([gen], batch_size=1)[0])
        latencies.append(time.perf_counter() - t0)
    return results, latencies, time.perf_counter() - start


def run_concurrent(url: str, requests: list[dict], concurrency: int, timeout: float, deadline: float):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)

    def send(req: dict):
        if time.monotonic() > deadline:
            return None, None, "skipped: --time-limit reached"
        t0 = time.perf_counter()
        try:
            if req["kind"] == "chat":
                out = client.chat.completions.create(model=req["model"], messages=req["messages"],
                                                     max_tokens=req["max_tokens"], temperature=0)
                text = out.choices[0].message.content
            else:
                out = client.completions.create(model=req["model"], prompt=req["prompt"],
                                                max_tokens=req["max_tokens"], temperature=0)
                text = out.choices[0].text
        except Exception as err:  # noqa: BLE001 (every failure is counted and reported)
            return None, time.perf_counter() - t0, f"{type(err).__name__}: {err}"
        return (text, out.usage.completion_tokens), time.perf_counter() - t0, None

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(send, requests))
    return outcomes, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=200, help="number of requests")
    parser.add_argument("--concurrency", type=int, default=32, help="client threads sending at once")
    parser.add_argument("--max-tokens", type=int, default=24, help="largest max_tokens of a request")
    parser.add_argument("--max-batch", type=int, default=32, help="server --max-batch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    parser.add_argument("--time-limit", type=float, default=1200.0, help="overall limit for the concurrent phase")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_base(args.model, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        folder = Path(tmp)
        for seed, (name, (init, text, n, template)) in enumerate(ADAPTERS.items()):
            prompt = SoftPrompt.initialise(base, init, num_virtual_tokens=n, init_text=text, seed=seed)
            save_adapter(folder / name, prompt.embeddings, base, init=init, init_text=text, template=Template(template))
        adapters = {name: load_adapter(folder / name, base) for name in ADAPTERS}
        models = list(ADAPTERS) + ["base"]
        requests = build_requests(args.requests, models, args.max_tokens)

        engine = Engine(base, adapters, Template("human-assistant"))
        print(f"sequential: {len(requests)} requests one at a time through the engine ...", file=sys.stderr, flush=True)
        reference, seq_latencies, seq_time = run_sequential(engine, base.tokenizer, requests)

        app = create_app(base, folder, max_batch=args.max_batch, max_queue=max(64, args.requests),
                         max_tokens_cap=max(64, args.max_tokens))
        print(f"concurrent: {len(requests)} requests, {args.concurrency} at a time, through the server ...",
              file=sys.stderr, flush=True)
        with BackgroundServer(app) as server:
            outcomes, conc_time = run_concurrent(server.url, requests, args.concurrency, args.timeout,
                                                 time.monotonic() + args.time_limit)
            stats = app.state.softprompt.scheduler.snapshot()

    errors = [(i, err) for i, (_, _, err) in enumerate(outcomes) if err]
    mismatches = [i for i, (got, _, err) in enumerate(outcomes)
                  if not err and got != (reference[i].text, len(reference[i].token_ids))]
    for i, err in errors[:5]:
        print(f"error in request {i}: {err}", file=sys.stderr)
    for i in mismatches[:5]:
        print(f"mismatch in request {i} ({requests[i]['model']}): {outcomes[i][0]!r} != {reference[i].text!r}",
              file=sys.stderr)
    latencies = [lat for (_, lat, err) in outcomes if lat is not None and not err]
    tokens = sum(len(r.token_ids) for r in reference)
    result = {
        "model": base.name, "requests": len(requests), "concurrency": args.concurrency, "adapters": len(ADAPTERS),
        "max_tokens": args.max_tokens, "completion_tokens": tokens, "errors": len(errors),
        "mismatches": len(mismatches),
        "sequential_seconds": round(seq_time, 2), "concurrent_seconds": round(conc_time, 2),
        "sequential_requests_per_s": round(len(requests) / seq_time, 3),
        "concurrent_requests_per_s": round(len(requests) / conc_time, 3),
        "sequential_tokens_per_s": round(tokens / seq_time, 1), "concurrent_tokens_per_s": round(tokens / conc_time, 1),
        "throughput_speedup": round(seq_time / conc_time, 2),
        "sequential_p50_latency_s": round(statistics.median(seq_latencies), 3),
        "sequential_p99_latency_s": round(percentile(seq_latencies, 99), 3),
        "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_latency_s": round(percentile(latencies, 99), 3) if latencies else None,
        "max_live_rows": stats["max_live"], "decode_steps": stats["steps"], "prefills": stats["prefills"],
        "torch_threads": torch.get_num_threads(),
    }
    print(f"one at a time: {result['sequential_requests_per_s']} req/s, p50 {result['sequential_p50_latency_s']} s; "
          f"server, {args.concurrency} concurrent: {result['concurrent_requests_per_s']} req/s, "
          f"p50 {result['p50_latency_s']} s, p99 {result['p99_latency_s']} s; speedup x{result['throughput_speedup']}; "
          f"{len(errors)} errors, {len(mismatches)} mismatches")
    print(json.dumps(result))
    return 1 if errors or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
