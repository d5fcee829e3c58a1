"""An OpenAI-compatible server for many soft-prompt adapters on one frozen base model.

`run_server(ServeConfig(...))` is what `softprompt serve` runs; `BackgroundServer` runs an app in a thread (tests,
benchmarks, notebooks). Nothing heavy is imported here: FastAPI, uvicorn and the model load only when used.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

from softprompt.runtime import release_openmp_threads
from softprompt.serve.config import ServeConfig


def run_server(config: ServeConfig) -> None:
    """Load the base model and the adapters, then serve until interrupted (uvicorn on config.host:config.port)."""
    import uvicorn

    from softprompt.core.models import load_base
    from softprompt.serve.app import create_app
    from softprompt.serve.security import check_exposure

    api_key = config.api_key or os.environ.get("SOFTPROMPT_API_KEY") or None
    warning = check_exposure(config.host, api_key, config.allow_insecure)  # before anything slow happens
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    base = load_base(config.model, device=config.device, dtype=config.dtype)
    app = create_app(base, dataclasses.replace(config, api_key=api_key))
    state = app.state.softprompt
    names = ["base"] + state.registry.names()
    print(
        f"softprompt serve: {base.name} on {base.device}; serving {len(names)} models: {', '.join(names)}", flush=True
    )
    for name, reason in state.scan.get("skipped", {}).items():
        print(f"softprompt serve: warning: not serving {name}: {reason}", flush=True)
    if warning:
        print(f"softprompt serve: {warning}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)


class BackgroundServer:
    """Run an app (create_app's) with uvicorn in a background thread, e.g. for tests, benchmarks and notebooks:

    with BackgroundServer(create_app(base, ServeConfig(adapters="adapters/"))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, name="softprompt-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> "BackgroundServer":
        release_openmp_threads()  # the model runs on the server's worker from now on (runtime.py)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
