"""Options of `softprompt serve`, each declared once (help text and valid range). Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.options import (
    chat_template_option,
    check_options,
    device_option,
    dtype_option,
    model_option,
    no_repeat_ngram_option,
    option,
    repetition_penalty_option,
    threads_option,
)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LIMITS, ACCESS, DEFAULTS = "limits", "access", "generation defaults"
REQUEST_NOTE = "; the server's default for requests that do not set {}"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_PREFIX_CACHE_MB = 256


@dataclass
class ServeConfig:
    """How `softprompt serve` runs: the model, the adapters folder, the address, limits and access control."""

    model: str | None = model_option()
    adapters: str | None = option(
        None,
        "folder whose adapter sub-folders are served under their folder names (rescanned by POST "
        "/v1/adapters/rescan); without it only `base` is served",
        metavar="DIR",
        group="model",
    )
    device: str = device_option()
    dtype: str = dtype_option()
    chat_template: bool = chat_template_option()
    threads: int | None = threads_option()
    host: str = option(
        "127.0.0.1", "address to listen on (the default, loopback, is reachable from this machine only)", group=ACCESS
    )
    port: int = option(8000, "TCP port to listen on (0 = any free port)", minimum=0, maximum=65535, group=ACCESS)
    api_key: str | None = option(
        None,
        "require `Authorization: Bearer KEY` on every endpoint but /health (also read from $SOFTPROMPT_API_KEY)",
        metavar="KEY",
        group=ACCESS,
    )
    allow_admin: bool = option(
        False,
        "enable the admin endpoints (POST /v1/adapters, DELETE /v1/adapters/NAME, POST /v1/adapters/rescan); "
        "off by default, so no other local process can change what is served",
        group=ACCESS,
    )
    allow_insecure: bool = option(
        False,
        "allow a non-loopback --host without --api-key (a loud warning instead of refusing to start)",
        group=ACCESS,
    )
    allowed_hosts: list | None = option(
        None,
        "Host header values accepted besides loopback names and the bound address (protects against DNS "
        "rebinding); '*' accepts any",
        many="+",
        metavar="HOST",
        group=ACCESS,
    )
    allow_origins: list | None = option(
        None,
        "browser origins allowed by CORS (default: none; a request with another Origin gets 403)",
        many="+",
        metavar="ORIGIN",
        group=ACCESS,
    )
    max_request_bytes: int = option(
        DEFAULT_MAX_REQUEST_BYTES,
        "largest request body in bytes (larger: HTTP 413)",
        minimum=1024,
        maximum=1 << 30,
        group=LIMITS,
    )
    max_batch: int = option(16, "most requests decoded together in one batch", minimum=1, maximum=4096, group=LIMITS)
    max_queue: int = option(
        64,
        "most requests waiting for a batch slot; beyond it requests get HTTP 429",
        minimum=0,
        maximum=1_000_000,
        group=LIMITS,
    )
    max_tokens_cap: int = option(
        2048,
        "largest max_tokens a request may ask for (larger ones get HTTP 400)",
        minimum=1,
        maximum=1_000_000,
        group=LIMITS,
    )
    max_model_len: int | None = option(
        None, "context length to enforce (default: the model's max_position_embeddings)", minimum=1, group=LIMITS
    )
    prefix_cache_mb: int = option(
        DEFAULT_PREFIX_CACHE_MB,
        "memory (MiB) for the prefix cache: the keys/values of prompt starts that requests "
        "to the same model share (a system prompt, a template's fixed text) are kept and reused, so those tokens are "
        "not recomputed; least recently used blocks are evicted beyond this; 0 = off",
        minimum=0,
        maximum=1 << 20,
        group=LIMITS,
    )
    repetition_penalty: float = repetition_penalty_option(DEFAULTS, REQUEST_NOTE.format("repetition_penalty"))
    no_repeat_ngram_size: int = no_repeat_ngram_option(DEFAULTS, REQUEST_NOTE.format("no_repeat_ngram_size"))
    log_level: str = option("info", "uvicorn log level", choices=LOG_LEVELS, group="output")

    def __post_init__(self) -> None:
        check_options(self)
