"""The OpenAI-compatible HTTP server as a FastAPI app: `create_app(base, ServeConfig(...))`.

A request's path (docs/architecture.md draws it): body.py -> protocol.py -> state.py, validation.py -> replies.py
-> the inference scheduler -> answers.py -> responses.py; routes.py holds the endpoints, errors.py the one exception
-> status table (a mistake in a request is a 4xx, never a 5xx or FastAPI's 422), security.py the Host / Origin /
Content-Type guard and the API-key and admin checks, openapi.py /openapi.json (open even with an api_key).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from softprompt.data.templates import CHAT, HUMAN_ASSISTANT, Template
from softprompt.serve.config import ServeConfig
from softprompt.serve.errors import install_error_handlers
from softprompt.serve.openapi import openapi_for
from softprompt.serve.routes import allowed_methods, include
from softprompt.serve.security import Guard, admin_check, api_key_check
from softprompt.serve.state import ServerState

APP_INFO = {
    "title": "softprompt",
    "version": "1",
    "description": "OpenAI-compatible server for soft-prompt adapters on one frozen base model.",
    "docs_url": None,  # no Swagger UI / ReDoc pages: /openapi.json only
    "redoc_url": None,
}


def create_app(base, config: ServeConfig | None = None, template: Template | None = None) -> FastAPI:
    """Build the server for `base` (a models.FrozenModel) as `config` says (ServeConfig: the adapters folder, limits,
    access control; `config.model`, host and port are run_server's). `template`: the default template for `base`
    and adapters saved without one (default: the chat template with `config.chat_template`, else human-assistant).
    The worker thread starts and stops with the app's lifespan. The keyword form is
    `softprompt.create_app(base, adapters_dir, **options)`."""
    config = config if config is not None else ServeConfig()
    if template is None:
        template = Template(CHAT if config.chat_template else HUMAN_ASSISTANT)
    state = ServerState(base, config, template)
    app = FastAPI(**APP_INFO, lifespan=state.lifespan, dependencies=[Depends(api_key_check(config.api_key))])
    app.state.softprompt = state
    app.openapi = openapi_for(app, config.api_key)
    hosts, origins = config.allowed_hosts, config.allow_origins
    app.add_middleware(Guard, allowed_hosts=hosts, allow_origins=origins, max_request_bytes=config.max_request_bytes)
    if origins:
        methods, headers = ["GET", "POST", "DELETE"], ["Authorization", "Content-Type"]
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=methods, allow_headers=headers)
    admin = [Depends(admin_check(config.allow_admin, config.api_key))]
    routers = include(app, state, config.max_request_bytes, admin)
    install_error_handlers(app, lambda path: allowed_methods(routers, path))
    return app
