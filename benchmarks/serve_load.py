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

5. Prefix cache (--prefix-requests, default 8; 0 skips it): chat requests that share a ~500-token system prompt
   (--system-tokens) and differ in the question, for `base` (chat template) and a chat-template adapter, sent one at a
   time and streamed, to a server with the prefix cache (--prefix-cache-mb, the serve default) and to one started
   with --prefix-cache-mb 0. Time to first token (the first streamed token, its log-probability asked so that every
   token is a chunk) per request; prefix_cache_ttft_ratio = median TTFT without the cache / median with it (every
   request counted, the cold first one per model included). A response that differs between the two servers is a
   mismatch.

    python benchmarks/serve_load.py --skip-load                    # only the prefix-cache section (~1 minute)
    python benchmarks/serve_load.py --skip-load --prefix-requests 32 --system-tokens 1500

6. Mixed traffic (--mixed-requests, default 40; 0 skips it): a server with the prefix cache on and adapter admin
   gets, from --concurrency threads, completions that share a long prompt start (so siblings reuse each other's
   cached blocks), seeded sampled requests with n=2, echo-scoring requests (echo + logprobs, max_tokens 0 or 1, as
   lm-evaluation-harness sends them) and requests to an adapter `swap` that a separate thread keeps replacing with
   one of two versions. Every response is compared with the same request run alone through the engine without a
   prefix cache (generated text and token count per choice, and every echoed log-probability exactly); a `swap`
   response must equal one version's answer in all its choices.

    python benchmarks/serve_load.py --skip-load --prefix-requests 0 --mixed-requests 24   # only this section

Bounded: a fixed number of requests, a per-request timeout and an overall --time-limit (requests not sent before it
count as errors). The last line is a JSON object (errors, mismatches and prefix_cache_ttft_ratio among its keys).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# First, before torch: softprompt chooses OpenMP's waits by the machine's load (softprompt/runtime.py), so this
# benchmark runs with what users get, and with the user's own OMP_WAIT_POLICY where one is set.
import softprompt  # noqa: E402, F401

# isort: split

import torch  # noqa: E402

from softprompt import create_app  # noqa: E402
from softprompt.core.models import load_base  # noqa: E402
from softprompt.core.prompt import SoftPrompt  # noqa: E402
from softprompt.data.templates import CHAT, Template, encode_text  # noqa: E402
from softprompt.formats.adapter import load_adapter, save_adapter  # noqa: E402
from softprompt.inference.batch import GenerationRequest  # noqa: E402
from softprompt.inference.engine import Engine  # noqa: E402
from softprompt.serve import BackgroundServer  # noqa: E402
from softprompt.serve.config import DEFAULT_PREFIX_CACHE_MB  # noqa: E402

INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Translate 'good morning' to Spanish.",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Name two primary colours.",
    "Classify the sentiment: I loved this film!",
    "What is 12 times 7?",
    "Suggest a name for a pet turtle.",
    "Summarise: The meeting was moved from Monday to Wednesday afternoon.",
    "List three fruits that are red.",
    "Is the sentiment of 'a dull, lifeless plot' positive or negative?",
    "Describe a rainbow to a child.",
    "Rewrite in the passive voice: The cat chased the mouse.",
    "Why is the sky blue?",
    "Write a short greeting card.",
]
# name -> (init method, init text, virtual tokens, template)
ADAPTERS = {
    "sentiment": ("text", "Classify the sentiment of the review as positive or negative.", None, "human-assistant"),
    "translate": ("text", "Translate the text faithfully.", 16, "chat"),
    "vocab": ("vocab", None, 20, "human-assistant"),
    "qa": ("random", None, 8, "Question: {instruction}\nAnswer:"),
}
PREFIX_MODELS = ["base", "translate"]  # chat-template models: the system message is part of their prompt
RULES = [
    "Answer in plain, friendly English and keep every answer short unless the user asks for detail.",
    "Check each fact before you state it, and say so when you are not sure.",
    "Never invent a source, a quotation, a number or a name.",
    "When a question is ambiguous, answer the most likely reading and mention the other one briefly.",
    "Use the metric system, and give both units when the user writes in imperial units.",
    "Do not give medical, legal or financial advice beyond general, widely known information.",
    "Keep a neutral tone on contested topics and present the main views fairly.",
    "Format lists with one item per line and code in fenced blocks.",
]


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
            requests.append(
                {
                    "kind": "chat",
                    "model": model,
                    "messages": [{"role": "user", "content": instruction}],
                    "max_tokens": budget,
                }
            )
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
                out = client.chat.completions.create(
                    model=req["model"], messages=req["messages"], max_tokens=req["max_tokens"], temperature=0
                )
                text = out.choices[0].message.content
            else:
                out = client.completions.create(
                    model=req["model"], prompt=req["prompt"], max_tokens=req["max_tokens"], temperature=0
                )
                text = out.choices[0].text
        except Exception as err:  # noqa: BLE001 (every failure is counted and reported)
            return None, time.perf_counter() - t0, f"{type(err).__name__}: {err}"
        return (text, out.usage.completion_tokens), time.perf_counter() - t0, None

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(send, requests))
    return outcomes, time.perf_counter() - start


def system_prompt(tokenizer, tokens: int) -> str:
    """A system message of house rules, at least `tokens` tokens long."""
    rules: list[str] = []
    while len(encode_text(tokenizer, " ".join(rules))) < tokens:
        rules.append(f"Rule {len(rules) + 1}: {RULES[len(rules) % len(RULES)]}")
    return " ".join(rules)


def prefix_requests(n: int, system: str, max_tokens: int) -> list[dict]:
    """Chat requests sharing the system message, each with its own question, alternating over PREFIX_MODELS."""
    return [
        {
            "model": PREFIX_MODELS[i % len(PREFIX_MODELS)],
            "max_tokens": max_tokens,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": INSTRUCTIONS[i % len(INSTRUCTIONS)]},
            ],
        }
        for i in range(n)
    ]


@dataclass
class Streamed:
    """One streamed chat answer: its text, number of tokens and time to first token (None when it failed)."""

    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    error: str | None = None


def stream_one(client, req: dict) -> Streamed:
    """Send one streamed chat request; every token arrives as a chunk because its log-probability is asked for."""
    out, start = Streamed(), time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model=req["model"],
            messages=req["messages"],
            max_tokens=req["max_tokens"],
            temperature=0,
            stream=True,
            logprobs=True,
            top_logprobs=0,
        )
        for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.logprobs is not None and choice.logprobs.content:
                if out.ttft is None:
                    out.ttft = time.perf_counter() - start
                out.tokens += len(choice.logprobs.content)
            out.text += choice.delta.content or ""
    except Exception as err:  # noqa: BLE001 (every failure is counted and reported)
        out.error = f"{type(err).__name__}: {err}"
    if out.error is None and out.ttft is None:
        out.error = "no token was streamed"
    return out


def run_prefix_server(
    base, folder: Path, requests: list[dict], cache_mb: int, timeout: float
) -> tuple[list[Streamed], dict | None]:
    """The requests one at a time through a server with `cache_mb` of prefix cache (0 = off): answers and the
    cache's counters. A short unrelated request first warms the server up without touching the shared prompt."""
    import openai

    app = create_app(
        base,
        folder,
        template=Template(CHAT),
        max_tokens_cap=max(64, requests[0]["max_tokens"]),
        prefix_cache_mb=cache_mb,
    )
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=timeout)
        stream_one(client, {"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        answers = [stream_one(client, req) for req in requests]
        cache = app.state.softprompt.prefix_cache
    return answers, (cache.stats().as_dict() if cache is not None else None)


def prefix_cache_section(base, folder: Path, args) -> dict:
    """TTFT of chat requests sharing a long system prompt, with and without the prefix cache (step 5)."""
    system = system_prompt(base.tokenizer, args.system_tokens)
    system_tokens = len(encode_text(base.tokenizer, system))
    requests = prefix_requests(args.prefix_requests, system, args.prefix_max_tokens)
    print(
        f"prefix cache: {len(requests)} chat requests sharing a {system_tokens}-token "
        "system prompt, one at a time, without then with the cache ...",
        file=sys.stderr,
        flush=True,
    )
    uncached, _ = run_prefix_server(base, folder, requests, 0, args.timeout)
    cached, stats = run_prefix_server(base, folder, requests, args.prefix_cache_mb, args.timeout)
    errors = [(i, a.error) for i, a in enumerate(uncached + cached) if a.error]
    mismatches = [
        i
        for i, (a, b) in enumerate(zip(uncached, cached))
        if not a.error and not b.error and (a.text, a.tokens) != (b.text, b.tokens)
    ]
    for i, err in errors[:5]:
        print(f"prefix cache: error in request {i % len(requests)}: {err}", file=sys.stderr)
    for i in mismatches[:5]:
        print(f"prefix cache: mismatch in request {i}: {cached[i].text!r} != {uncached[i].text!r}", file=sys.stderr)
    off = [a.ttft for a in uncached if a.ttft is not None]
    on = [a.ttft for a in cached if a.ttft is not None]
    ratio = round(statistics.median(off) / statistics.median(on), 2) if off and on else None
    return {
        "prefix_cache_requests": len(requests),
        "prefix_cache_errors": len(errors),
        "prefix_cache_mismatches": len(mismatches),
        "system_prompt_tokens": system_tokens,
        "ttft_without_cache_p50_s": round(statistics.median(off), 3) if off else None,
        "ttft_with_cache_p50_s": round(statistics.median(on), 3) if on else None,
        "ttft_with_cache_first_s": round(on[0], 3) if on else None,
        "ttft_with_cache_hit_p50_s": round(statistics.median(on[len(PREFIX_MODELS) :]), 3)
        if len(on) > len(PREFIX_MODELS)
        else None,
        "prefix_cache_ttft_ratio": ratio,
        "prefix_cache": stats,
    }


SHARED_START = (
    "You are a careful assistant. Answer briefly and plainly, check every fact twice, never invent a "
    "source, and say so when you are not sure. "
)
SWAP_VERSIONS = ("swap-a", "swap-b")  # folders the `swap` adapter alternates between


def mixed_requests(n: int, max_tokens: int) -> list[dict]:
    """Step 6's requests: greedy and seeded n=2 completions sharing a long start, echo scoring, and `swap`."""
    models = list(ADAPTERS) + ["base"]
    out = []
    for i in range(n):
        text = SHARED_START * 3 + INSTRUCTIONS[(i * 5) % len(INSTRUCTIONS)]
        kind = ("greedy", "sampled", "score", "swap")[i % 4]
        req = {
            "kind": kind,
            "model": "swap" if kind == "swap" else models[i % len(models)],
            "prompt": text,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "n": 1,
        }
        if kind in ("sampled", "swap"):
            req.update(temperature=0.8, top_p=0.95, seed=1000 + i, n=2)
        if kind == "score":
            req.update(echo=True, logprobs=1, max_tokens=i % 2)  # 0: score only; 1: score and one token
        out.append(req)
    return out


def mixed_reference(base, engine: Engine, req: dict, version: str | None = None) -> dict:
    """What the request gives run alone through the engine (no prefix cache): texts and token counts per choice,
    and the echoed prompt's log-probabilities."""
    from softprompt.inference.scoring import prompt_logprobs
    from softprompt.serve.protocol import choice_seed

    key = version or (None if req["model"] == "base" else req["model"])
    ids = encode_text(base.tokenizer, req["prompt"])
    choices = []
    for c in range(req["n"]):
        if req["max_tokens"] == 0:
            choices.append(("", 0))
            continue
        gen = GenerationRequest(
            ids,
            adapter=key,
            max_new_tokens=req["max_tokens"],
            temperature=req["temperature"],
            top_p=req.get("top_p", 1.0),
            seed=choice_seed(req.get("seed"), c),
        )
        result = engine.generate([gen], batch_size=1)[0]
        choices.append((result.text, len(result.token_ids)))
    scores = (
        [e.logprob for e in prompt_logprobs(base, engine.prompt_cache, key, ids, req["logprobs"])]
        if req.get("echo")
        else None
    )
    return {"choices": choices, "scores": scores}


def send_mixed(client, req: dict) -> list[tuple[str, list]]:
    """One step-6 request through the server: per choice, the generated text (echo removed) and the token
    log-probabilities (echoed prompt first; logprobs=0 is asked of every request so that tokens can be counted)."""
    body = {k: v for k, v in req.items() if k != "kind"}
    body.setdefault("logprobs", 0)
    out = client.completions.create(**body)
    cut = len(req["prompt"]) if req.get("echo") else 0
    return [(choice.text[cut:], choice.logprobs.token_logprobs) for choice in out.choices]


def same(got: list[tuple[str, list]], want: dict) -> bool:
    """Whether a response equals a reference: every choice's text and token count, and the echoed scores exactly."""
    echoed = want["scores"] or []
    return len(got) == len(want["choices"]) and all(
        text == ref_text and values[: len(echoed)] == echoed and len(values) - len(echoed) == ref_tokens
        for (text, values), (ref_text, ref_tokens) in zip(got, want["choices"])
    )


def mixed_section(base, folder: Path, args) -> dict:
    """Step 6: echo scoring, seeded n=2 sampling, shared prompt starts and adapter swaps at once, prefix cache on."""
    import threading

    import httpx
    import openai

    for seed, version in enumerate(SWAP_VERSIONS):
        prompt = SoftPrompt.initialise(base, "random", num_virtual_tokens=6 + 2 * seed, seed=100 + seed)
        save_adapter(folder / version, prompt.embeddings, base, init="random", template=Template("human-assistant"))
    names = list(ADAPTERS) + list(SWAP_VERSIONS)
    engine = Engine(base, {name: load_adapter(folder / name, base) for name in names}, Template("human-assistant"))
    requests = mixed_requests(args.mixed_requests, args.max_tokens)
    print(f"mixed: {len(requests)} requests alone through the engine ...", file=sys.stderr, flush=True)
    refs = [
        [mixed_reference(base, engine, r, v) for v in SWAP_VERSIONS]
        if r["kind"] == "swap"
        else [mixed_reference(base, engine, r)]
        for r in requests
    ]
    app = create_app(
        base,
        folder,
        max_batch=args.max_batch,
        max_queue=max(64, 2 * len(requests)),
        max_tokens_cap=max(64, args.max_tokens),
        allow_admin=True,
    )
    state = app.state.softprompt
    with BackgroundServer(app) as server:
        state.registry.add("swap", SWAP_VERSIONS[0])
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
        done, swaps = threading.Event(), [0]

        def swapper():
            while not done.wait(0.3):
                version = SWAP_VERSIONS[(swaps[0] + 1) % 2]
                r = httpx.post(
                    server.url + "/v1/adapters",
                    json={"name": "swap", "path": version, "replace": True},
                    timeout=args.timeout,
                )
                swaps[0] += r.status_code == 201

        def send(req):
            try:
                return send_mixed(client, req), None
            except Exception as err:  # noqa: BLE001 (every failure is counted and reported)
                return None, f"{type(err).__name__}: {err}"

        thread = threading.Thread(target=swapper, daemon=True)
        thread.start()
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            outcomes = list(pool.map(send, requests))
        seconds = time.perf_counter() - start
        done.set()
        thread.join(args.timeout)
        stats, prefix = state.scheduler.snapshot(), state.prefix_cache.stats().as_dict()
    errors = [(i, err) for i, (_, err) in enumerate(outcomes) if err]
    mismatches = [i for i, (got, err) in enumerate(outcomes) if not err and not any(same(got, w) for w in refs[i])]
    for i, err in errors[:5]:
        print(f"mixed: error in request {i} ({requests[i]['kind']}): {err}", file=sys.stderr)
    for i in mismatches[:5]:
        print(
            f"mixed: mismatch in request {i} ({requests[i]['kind']}, {requests[i]['model']}): "
            f"{outcomes[i][0]} != {refs[i]}",
            file=sys.stderr,
        )
    return {
        "mixed_requests": len(requests),
        "mixed_errors": len(errors),
        "mixed_mismatches": len(mismatches),
        "mixed_seconds": round(seconds, 2),
        "mixed_swaps": swaps[0],
        "mixed_score_requests": sum(r["kind"] == "score" for r in requests),
        "mixed_score_slices": stats.get("score_slices"),
        "mixed_prefix_cached_tokens": prefix["cached_tokens"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", help="weights dtype (default float32)")
    parser.add_argument("--requests", type=int, default=200, help="number of requests")
    parser.add_argument("--concurrency", type=int, default=32, help="client threads sending at once")
    parser.add_argument("--max-tokens", type=int, default=24, help="largest max_tokens of a request")
    parser.add_argument("--max-batch", type=int, default=32, help="server --max-batch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    parser.add_argument("--time-limit", type=float, default=1200.0, help="overall limit for the concurrent phase")
    parser.add_argument("--skip-load", action="store_true", help="skip steps 2-4 (only the prefix-cache section)")
    parser.add_argument(
        "--prefix-requests",
        type=int,
        default=8,
        help="chat requests sharing a system prompt, per server (0 = skip the prefix-cache section)",
    )
    parser.add_argument("--system-tokens", type=int, default=500, help="length of the shared system prompt")
    parser.add_argument("--prefix-max-tokens", type=int, default=16, help="max_tokens of those requests")
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=DEFAULT_PREFIX_CACHE_MB,
        help="--prefix-cache-mb of the server with the cache",
    )
    parser.add_argument(
        "--mixed-requests",
        type=int,
        default=40,
        help="step 6: echo scoring, n=2 sampling and adapter swaps at once (0 = skip)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_base(args.model, device="cpu", dtype=args.dtype)
    result: dict = {"model": base.name, "dtype": str(base.dtype).replace("torch.", "")}
    errors = mismatches = 0
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        folder = Path(tmp)
        for seed, (name, (init, text, n, template)) in enumerate(ADAPTERS.items()):
            prompt = SoftPrompt.initialise(base, init, num_virtual_tokens=n, init_text=text, seed=seed)
            save_adapter(folder / name, prompt.embeddings, base, init=init, init_text=text, template=Template(template))
        if not args.skip_load:
            load = load_section(base, folder, args)
            errors, mismatches = load["errors"], load["mismatches"]
            result.update(load)
        if args.prefix_requests > 0:
            prefix = prefix_cache_section(base, folder, args)
            errors += prefix["prefix_cache_errors"]
            mismatches += prefix["prefix_cache_mismatches"]
            result.update(prefix)
            print(
                f"prefix cache: TTFT p50 {prefix['ttft_without_cache_p50_s']} s without, "
                f"{prefix['ttft_with_cache_p50_s']} s with the cache (x{prefix['prefix_cache_ttft_ratio']}); "
                f"{prefix['prefix_cache_errors']} errors, {prefix['prefix_cache_mismatches']} mismatches"
            )
        if args.mixed_requests > 0:
            mixed = mixed_section(base, folder, args)
            errors += mixed["mixed_errors"]
            mismatches += mixed["mixed_mismatches"]
            result.update(mixed)
            print(
                f"mixed: {mixed['mixed_requests']} requests in {mixed['mixed_seconds']} s with "
                f"{mixed['mixed_swaps']} adapter swaps; {mixed['mixed_errors']} errors, "
                f"{mixed['mixed_mismatches']} mismatches"
            )
    result.update({"errors": errors, "mismatches": mismatches, "torch_threads": torch.get_num_threads()})
    print(json.dumps(result))
    return 1 if errors or mismatches else 0


def load_section(base, folder: Path, args) -> dict:
    """Steps 2-4: every request alone through the engine, then all of them concurrently through the server."""
    adapters = {name: load_adapter(folder / name, base) for name in ADAPTERS}
    models = list(ADAPTERS) + ["base"]
    requests = build_requests(args.requests, models, args.max_tokens)

    engine = Engine(base, adapters, Template("human-assistant"))
    print(f"sequential: {len(requests)} requests one at a time through the engine ...", file=sys.stderr, flush=True)
    reference, seq_latencies, seq_time = run_sequential(engine, base.tokenizer, requests)

    app = create_app(
        base,
        folder,
        max_batch=args.max_batch,
        max_queue=max(64, args.requests),
        max_tokens_cap=max(64, args.max_tokens),
    )
    print(
        f"concurrent: {len(requests)} requests, {args.concurrency} at a time, through the server ...",
        file=sys.stderr,
        flush=True,
    )
    with BackgroundServer(app) as server:
        outcomes, conc_time = run_concurrent(
            server.url, requests, args.concurrency, args.timeout, time.monotonic() + args.time_limit
        )
        stats = app.state.softprompt.scheduler.snapshot()

    errors = [(i, err) for i, (_, _, err) in enumerate(outcomes) if err]
    mismatches = [
        i
        for i, (got, _, err) in enumerate(outcomes)
        if not err and got != (reference[i].text, len(reference[i].token_ids))
    ]
    for i, err in errors[:5]:
        print(f"error in request {i}: {err}", file=sys.stderr)
    for i in mismatches[:5]:
        print(
            f"mismatch in request {i} ({requests[i]['model']}): {outcomes[i][0]!r} != {reference[i].text!r}",
            file=sys.stderr,
        )
    latencies = [lat for (_, lat, err) in outcomes if lat is not None and not err]
    tokens = sum(len(r.token_ids) for r in reference)
    result = {
        "requests": len(requests),
        "concurrency": args.concurrency,
        "adapters": len(ADAPTERS),
        "max_tokens": args.max_tokens,
        "completion_tokens": tokens,
        "errors": len(errors),
        "mismatches": len(mismatches),
        "sequential_seconds": round(seq_time, 2),
        "concurrent_seconds": round(conc_time, 2),
        "sequential_requests_per_s": round(len(requests) / seq_time, 3),
        "concurrent_requests_per_s": round(len(requests) / conc_time, 3),
        "sequential_tokens_per_s": round(tokens / seq_time, 1),
        "concurrent_tokens_per_s": round(tokens / conc_time, 1),
        "throughput_speedup": round(seq_time / conc_time, 2),
        "sequential_p50_latency_s": round(statistics.median(seq_latencies), 3),
        "sequential_p99_latency_s": round(percentile(seq_latencies, 99), 3),
        "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_latency_s": round(percentile(latencies, 99), 3) if latencies else None,
        "max_live_rows": stats["max_live"],
        "decode_steps": stats["steps"],
        "prefills": stats["prefills"],
    }
    print(
        f"one at a time: {result['sequential_requests_per_s']} req/s, p50 {result['sequential_p50_latency_s']} s; "
        f"server, {args.concurrency} concurrent: {result['concurrent_requests_per_s']} req/s, "
        f"p50 {result['p50_latency_s']} s, p99 {result['p99_latency_s']} s; speedup x{result['throughput_speedup']}; "
        f"{len(errors)} errors, {len(mismatches)} mismatches"
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
