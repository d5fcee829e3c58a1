"""Request bodies of the OpenAI-compatible endpoints, and OpenAI's error shape.

Fields OpenAI defines but softprompt does not implement (n > 1, logprobs, echo, penalties, ...) are accepted only
at their neutral value; anything else is a 400 naming the field, never silently ignored. Unknown fields are 400s
too, except a few purely informational ones clients send (user, metadata, store).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP = 16


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # not OpenAI's, but vLLM's and common
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @model_validator(mode="after")
    def _supported(self):
        if len(self.stop_list()) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings are supported")
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty/frequency_penalty: only 0 is supported")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class CompletionRequest(_Common):
    """POST /v1/completions: `prompt` is raw text (or a list of texts, one choice each) placed right after the
    soft prompt; no template is applied."""

    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.echo:
            raise ValueError("echo: not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: an empty list has nothing to complete")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages: content part of type {part.get('type')!r} is not supported "
                                    "(text only)", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    """POST /v1/chat/completions: the conversation is formatted with the adapter's template.chat_prompt, exactly
    as `softprompt generate` formats it."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs: not supported")
        if self.tools:
            raise ValueError("tools: not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format: only type 'text' is supported")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def as_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class AdapterAdd(BaseModel):
    """POST /v1/adapters: serve the folder `path` (relative to the adapters folder; default: `name`) as `name`."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str | None = None
    replace: bool = False


def validation_error(err: ValidationError) -> APIError:
    """The first pydantic error as an OpenAI-style 400 naming the field."""
    first = err.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if not str(x).startswith(("function-after", "union"))]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
        if not loc and ": " in message:  # a model-level check names its field as "field: what is wrong"
            param, message = message.split(": ", 1)
    return APIError(400, f"Invalid value for '{param}': {message}" if param else message, param=param,
                    code="invalid_value")
