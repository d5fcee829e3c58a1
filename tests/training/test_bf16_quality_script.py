"""benchmarks/bf16_quality.py: a sweep run one training per call (--seeds / --dtypes / --record) and summarised
afterwards (--merge) gives the last line of the same sweep run in one call; the summary's statistics; --gradients'
comparison (gradient_check) against itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bf16_quality import GRADIENT_VARIANTS, gradient_check, summary  # noqa: E402

from softprompt.core.prompt import SoftPrompt  # noqa: E402
from softprompt.data.batching import collate, encode_records  # noqa: E402
from softprompt.data.records import load_records  # noqa: E402
from softprompt.data.templates import Template  # noqa: E402


def _run(tmp_path: Path, model: Path, data: Path, *args: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, str(ROOT / "benchmarks" / "bf16_quality.py"), "--model", str(model), "--threads", "1"]
    command += ["--sst2", str(data), "--sst2-train", "8", "--sst2-held-out", "4", "--out", str(tmp_path / "scratch")]
    done = subprocess.run(command + list(args), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_one_training_per_call_merges_into_the_last_line_of_one_sweep(tmp_path, tiny_dir):
    data = tmp_path / "sst2.jsonl"
    words = ["good fun", "dull", "great", "bad plot", "lovely", "awful", "fine film", "boring", "nice", "weak", "ok"]
    data.write_text("".join(json.dumps({"sentence": w, "label": i % 2}) + "\n" for i, w in enumerate(words * 2)))
    whole = _run(tmp_path, tiny_dir, data, "--seeds", "0,1")
    record = tmp_path / "runs.jsonl"
    _run(tmp_path, tiny_dir, data, "--seeds", "0", "--dtypes", "float32", "--record", str(record))
    for seed, dtype in (("0", "bfloat16"), ("1", "float32"), ("1", "bfloat16")):
        _run(tmp_path, tiny_dir, data, "--seeds", seed, "--dtypes", dtype, "--record", str(record), "--no-baselines")
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r.get("seed"), r.get("dtype"), r.get("baseline")) for r in rows] == [
        (None, None, "zero_shot"),
        (0, "float32", None),
        (0, "bfloat16", None),
        (1, "float32", None),
        (1, "bfloat16", None),
    ]
    merged = _run(tmp_path, tiny_dir, data, "--merge", str(record))
    assert len(merged) == 1
    # the trainings are the same bits in either form (same seed, model and thread count), so the lines are equal
    assert merged[0] == whole[-1]
    part = merged[0]["sst2_accuracy"]
    assert sorted(part) == sorted(
        ["train", "held_out", "zero_shot", "values", "min", "mean", "max", "seed_spread", "diff_bf16_fp32"]
        + ["mean_diff_bf16_fp32", "max_abs_diff_bf16_fp32"]
    )
    assert (part["train"], part["held_out"]) == (8, 4)


def test_summary_statistics_and_a_later_line_replacing_an_earlier_one():
    def row(seed, dtype, loss):
        return {"part": "alpaca", "seed": seed, "dtype": dtype, "held_out_loss": loss, "sizes": {"train": 5}}

    rows = [
        {"part": "alpaca", "baseline": "initial_prompt", "value": 2.5, "sizes": {"train": 5, "held_out": 3}},
        row(0, "float32", 1.9),
        row(0, "bfloat16", 9.9),  # replaced below (a rerun)
        row(0, "bfloat16", 1.95),
        row(1, "float32", 2.0),
        row(1, "bfloat16", 1.98),
        row(2, "float32", 2.1),  # no bf16 run at seed 2: in the per-dtype figures, not in the differences
    ]
    part = summary(rows)["alpaca_held_out_loss"]
    assert summary(rows)["seeds"] == [0, 1, 2]
    assert (part["train"], part["held_out"], part["initial_prompt"]) == (5, 3, 2.5)
    assert part["min"] == {"float32": 1.9, "bfloat16": 1.95}
    assert part["max"] == {"float32": 2.1, "bfloat16": 1.98}
    assert part["mean"] == {"float32": 2.0, "bfloat16": 1.965}
    assert part["seed_spread"] == {"float32": 0.2, "bfloat16": 0.03}
    assert part["diff_bf16_fp32"] == {0: 0.05, 1: -0.02}
    assert part["mean_diff_bf16_fp32"] == 0.015
    assert part["max_abs_diff_bf16_fp32"] == 0.05


def test_gradient_check_against_itself_is_exact_and_its_fp32_variants_agree(tiny):
    """With the fp32 model standing in for the bf16 one, the training forward's loss and gradient equal the
    reference's bit for bit, and the variants with the head (and final norm) recomputed in fp32 agree to rounding."""
    records = [{"instruction": "Say hi", "input": "", "output": "hi there"}, {"instruction": "Add 1+1", "output": "2"}]
    examples, _, _ = encode_records(load_records(records).items, tiny.tokenizer, Template(), 128)
    batch = collate(examples, tiny.tokenizer.pad_token_id)
    prompt = SoftPrompt.initialise(tiny, "vocab", 4, seed=0).embeddings.detach()
    before = tiny.model.base_model.norm
    out = gradient_check({"float32": tiny, "bfloat16": tiny}, batch, prompt)
    assert tiny.model.base_model.norm is before  # the final norm is put back
    assert out["labels"] == int((batch["labels"] != -100).sum()) > 0
    assert out["bf16"] == {"loss_diff": 0.0, "grad_cosine": 1.0, "grad_rel_err": 0.0}
    for variant in GRADIENT_VARIANTS[1:]:
        assert abs(out[variant]["loss_diff"]) <= 1e-5
        assert out[variant]["grad_rel_err"] <= 1e-4
    assert torch.is_tensor(prompt) and not prompt.requires_grad
