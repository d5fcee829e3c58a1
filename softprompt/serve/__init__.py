"""`softprompt serve`: an OpenAI-compatible server for many soft-prompt adapters on one frozen base model.

Nothing heavy is imported here (the CLI imports every verb module to build its parser); FastAPI, uvicorn and the
model load only when the verb runs.
"""

from __future__ import annotations

import argparse
import os
import threading
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve adapters over an OpenAI-compatible HTTP API",
        description="Serve every adapter sub-folder of --adapters under its folder name, and the base model as "
                    "`base`, over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions with "
                    "streaming). Requests for different adapters are batched together, continuously.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help="base model: a local directory, a hub id, a .gguf file, or omit for the embedded "
                             "SmolLM2-135M-Instruct")
    parser.add_argument("--adapters", default=None, metavar="DIR",
                        help="folder whose adapter sub-folders are served under their folder names (rescanned by "
                             "POST /v1/adapters/rescan); without it only `base` is served")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (the default, loopback, is reachable from this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0 = any free port)")
    parser.add_argument("--device", default="auto", help="device for the base model: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="base model dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--chat-template", action="store_true",
                        help="format prompts of the base model and of adapters saved without a template with the "
                             "model's chat template, as `softprompt generate --chat-template` does; default: the "
                             "reference template")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="most requests decoded together in one batch")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="most requests waiting for a batch slot; beyond it requests get HTTP 429")
    parser.add_argument("--max-tokens-cap", type=int, default=2048,
                        help="largest max_tokens a request may ask for (larger ones get HTTP 400)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length to enforce (default: the model's max_position_embeddings)")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on every endpoint but /health (also read from "
                             "$SOFTPROMPT_API_KEY); the adapter endpoints change what is served, so set one when "
                             "the server is reachable by others")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a small shared CPU 1 is often fastest)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn log level")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from softprompt.core.models import load_base
    from softprompt.data.templates import CHAT, HUMAN_ASSISTANT, Template
    from softprompt.serve.app import create_app

    for flag in ("max_batch", "max_tokens_cap"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    base = load_base(args.model, device=args.device, dtype=args.dtype)
    template = Template(CHAT if args.chat_template else HUMAN_ASSISTANT)
    app = create_app(base, args.adapters, template=template, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_tokens_cap=args.max_tokens_cap, max_model_len=args.max_model_len,
                     api_key=args.api_key or os.environ.get("SOFTPROMPT_API_KEY") or None)
    state = app.state.softprompt
    names = ["base"] + state.registry.names()
    print(f"softprompt serve: {base.name} on {base.device}; serving {len(names)} models: {', '.join(names)}",
          flush=True)
    for name, reason in state.scan.get("skipped", {}).items():
        print(f"softprompt serve: warning: not serving {name}: {reason}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


class BackgroundServer:
    """Run an app (create_app's) with uvicorn in a background thread, e.g. for tests, benchmarks and notebooks:

        with BackgroundServer(create_app(base, "adapters/")) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, name="softprompt-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> "BackgroundServer":
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
