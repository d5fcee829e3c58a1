#!/usr/bin/env bash
# The GPU check: what softprompt promises, run on a CUDA device in about 5 minutes. Exits non-zero on any failure.
#
#   bash scripts/gpu_check.sh                 on a machine with an NVIDIA GPU, from a clone
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh    the same steps on the CPU (to check the script itself)
#
# Steps (each prints "== NAME: ok" or "== NAME: FAILED (rc N)"; all run even after a failure):
#   1. device   torch sees the device; nvidia-smi's view of it
#   2. tests    the device-parametrised tests on the device (SOFTPROMPT_TEST_DEVICE): the engine's greedy output equal
#               to a no-cache loop, mixed-adapter batches equal each row alone (bit for bit in bf16), the prefix cache,
#               training on the device reloading on the CPU with equal logits
#   3. verbs    train / eval / generate / serve on the default model in bf16 on the device (with the compass-game
#               records of `softprompt demo`); `serve` answers one completion over HTTP on loopback
#   4. bench    benchmarks/generate_throughput.py (bf16, the device) and benchmarks/train_throughput.py (the device)
#
# Environment: PYTHON (default .venv/bin/python, else python3); GPU_CHECK_MODEL (default: the embedded
# SmolLM2-135M-Instruct; where it is not installed, the verbs and benchmarks say so and fail); GPU_CHECK_DTYPE
# (default bfloat16); GPU_CHECK_OUT (default /tmp/softprompt-gpu-check). A folder .whl/ of wheels, if present, is
# installed offline first (for machines that reach no package registry). Output: keep it with `| tee FILE`.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
DTYPE=${GPU_CHECK_DTYPE:-bfloat16}
OUT=${GPU_CHECK_OUT:-/tmp/softprompt-gpu-check}
MODEL_ARGS=()
[ -n "${GPU_CHECK_MODEL:-}" ] && MODEL_ARGS=(--model "$GPU_CHECK_MODEL")
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$OUT/site" .whl/*.whl || exit 1
  export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SP=("$PYTHON" -m softprompt)
rm -rf "$OUT/work" && mkdir -p "$OUT/work"
W=$OUT/work
FAILED=()
START=$(date +%s)

step() {  # step NAME COMMAND...: run, time and record one check
  local name=$1 t0 rc
  shift
  echo "== $name: $*"
  t0=$(date +%s)
  "$@"
  rc=$?
  if [ $rc -eq 0 ]; then echo "== $name: ok ($(( $(date +%s) - t0 )) s)"; else
    echo "== $name: FAILED (rc $rc, $(( $(date +%s) - t0 )) s)"; FAILED+=("$name"); fi
}

device_info() {
  if [ "$DEVICE" != "cpu" ]; then nvidia-smi -L || return 1; fi
  "$PYTHON" - "$DEVICE" <<'EOF'
import sys, torch
device = torch.device(sys.argv[1])
print("torch", torch.__version__, "| device", device, end=" | ")
if device.type == "cuda":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    print(torch.cuda.get_device_name(device), "| bf16", torch.cuda.is_bf16_supported())
else:
    print(torch.backends.cpu.get_cpu_capability())
import transformers; print("transformers", transformers.__version__)
EOF
}

demo_records() {  # the compass game's records, as `softprompt demo` makes them
  "$PYTHON" - "$W" <<'EOF'
import json, sys
from softprompt.demo.task import make_records
train, held_out = make_records(num_train=320, seed=0)
for name, rows in (("train", train), ("eval", held_out)):
    with open(f"{sys.argv[1]}/{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
print(len(train), "training and", len(held_out), "held-out records")
EOF
}

serve_answers() {  # start `softprompt serve` on a free loopback port, ask one completion, stop it
  local port log=$W/serve.log pid rc=1
  port=$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  mkdir -p "$W/adapters" && cp -r "$W/compass" "$W/adapters/compass"
  "${SP[@]}" serve "${MODEL_ARGS[@]}" --device "$DEVICE" --dtype "$DTYPE" --adapters "$W/adapters" \
      --port "$port" >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 120); do
    if "$PYTHON" - "$port" <<'EOF' 2>/dev/null
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
urllib.request.urlopen(base + "/health", timeout=2)
body = json.dumps({"model": "compass", "prompt": "tiger", "max_tokens": 8, "temperature": 0}).encode()
req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=60))
print("serve answered:", repr(reply["choices"][0]["text"]), reply["usage"])
EOF
    then rc=0; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  [ $rc -eq 0 ] || tail -20 "$log"
  return $rc
}

step device device_info
step tests env SOFTPROMPT_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/core/test_devices.py tests/inference/test_engine.py tests/inference/test_prefix_cache.py
step records demo_records
step train "${SP[@]}" train "${MODEL_ARGS[@]}" --device "$DEVICE" --dtype "$DTYPE" --data "$W/train.jsonl" \
    --out "$W/compass" --max-steps 40 --no-progress
step eval "${SP[@]}" eval "${MODEL_ARGS[@]}" --device "$DEVICE" --dtype "$DTYPE" --data "$W/eval.jsonl" \
    --adapter "$W/compass" --compare-base --choices north,south,east,west --json "$W/eval.json" --no-progress
step generate "${SP[@]}" generate "${MODEL_ARGS[@]}" --device "$DEVICE" --dtype "$DTYPE" --adapter "$W/compass" \
    --greedy "Which compass direction does this word point to?" --input saxophone
step serve serve_answers
step bench-generate "$PYTHON" benchmarks/generate_throughput.py "${MODEL_ARGS[@]}" --device "$DEVICE" \
    --dtypes "$DTYPE" --no-vllm
step bench-train "$PYTHON" benchmarks/train_throughput.py "${MODEL_ARGS[@]}" --device "$DEVICE" \
    --data "$W/train.jsonl" --records 64 --runs recipe,recipe_bf16,softprompt --out "$W/bench-train"

echo "== gpu check: $(( $(date +%s) - START )) s on $DEVICE, dtype $DTYPE"
if [ ${#FAILED[@]} -gt 0 ]; then echo "== FAILED: ${FAILED[*]}"; exit 1; fi
echo "== all steps ok"
