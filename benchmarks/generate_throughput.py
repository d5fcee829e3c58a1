"""Generation benchmark on the default model (SmolLM2-135M-Instruct), one run.

(a) 8 requests for 8 different adapters: one mixed-task batch vs one request at a time (same greedy outputs
    required) -> mixed_batch_speedup = sequential time / batched time (target >= 4).
(b) time to first token with an adapter of 100 virtual tokens: prefill on the cached soft-prompt KV vs the
    PEFT-style forward that recomputes the virtual tokens ([soft prompt ; prompt] in one pass)
    -> ttft_ratio = cached / recomputed (target <= 0.7).

Usage: python benchmarks/generate_throughput.py [--model M] [--device cpu] [--max-new-tokens 32] [--threads N]
The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# On a CPU shared with other work, OpenMP threads that spin-wait for each other slow small ops down by up to ~100x;
# sleeping waits avoid that. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from softprompt.formats.adapter import Adapter  # noqa: E402
from softprompt.inference.engine import DecodeBatch, Engine, GenerationRequest  # noqa: E402
from softprompt.core.forward import lm_logits, run_body  # noqa: E402
from softprompt.core.models import load_base  # noqa: E402
from softprompt.core.prompt import SoftPrompt  # noqa: E402

INSTRUCTIONS = [
    "What is the capital of France?", "Give three tips for staying healthy.", "Explain photosynthesis briefly.",
    "Write a haiku about the sea.", "What is 12 times 7?", "Name a famous painter.",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer in (a)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.model, device=args.device, dtype=args.dtype)

    # (a) mixed-task batch vs one request at a time
    sizes = [8, 12, 16, 20, 24, 10, 14, 18]
    engine = Engine(base, {f"task{i}": adapter_for(base, n, seed=i) for i, n in enumerate(sizes)})

    def requests():
        return [GenerationRequest(engine.encode(text, adapter=f"task{i}"), adapter=f"task{i}",
                                  max_new_tokens=args.max_new_tokens) for i, text in enumerate(INSTRUCTIONS)]

    engine.generate(requests()[:2], batch_size=2)  # warm-up
    t_seq, seq = timed(lambda: [engine.generate([r])[0] for r in requests()])
    t_batch, batch = timed(lambda: engine.generate(requests(), batch_size=8))
    same = [a.token_ids for a in seq] == [b.token_ids for b in batch]
    tokens = sum(len(r.token_ids) for r in batch)
    print(f"(a) {len(sizes)} adapters, {tokens} tokens: one at a time {t_seq:.2f} s ({tokens / t_seq:.1f} tok/s), "
          f"mixed batch {t_batch:.2f} s ({tokens / t_batch:.1f} tok/s), speedup {t_seq / t_batch:.2f}x, "
          f"same outputs: {same}")

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
    print(f"(b) TTFT, 100 virtual tokens + {len(ids)} prompt tokens: cached KV {1000 * t_cached:.1f} ms, "
          f"recomputed {1000 * t_recompute:.1f} ms, ratio {t_cached / t_recompute:.2f}, "
          f"same first token: {first_cached == first_recompute}")

    print(json.dumps({
        "mixed_batch_speedup": round(t_seq / t_batch, 3), "ttft_ratio": round(t_cached / t_recompute, 3),
        "same_outputs": same, "same_first_token": first_cached == first_recompute,
        "sequential_s": round(t_seq, 3), "mixed_batch_s": round(t_batch, 3), "generated_tokens": tokens,
        "ttft_cached_ms": round(1000 * t_cached, 2), "ttft_recompute_ms": round(1000 * t_recompute, 2),
        "model": base.name, "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
