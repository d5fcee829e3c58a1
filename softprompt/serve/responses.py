"""The typed response models of the endpoints: what /openapi.json publishes and what the server builds every answer
from (`model.wire()` is the JSON object sent), so the published schema and the bytes on the wire are one thing.

Key order and nulls are OpenAI's: every field is sent, null included, in the order declared here, except the fields
a model lists in `omitted_when_none` (a chat delta's role / content, a stream chunk's usage), which OpenAI leaves
out rather than sending null.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_serializer


class Wire(BaseModel):
    """A response model: `wire()` is its JSON object (plain dicts, lists, strings and numbers), in declaration
    order."""

    def wire(self) -> dict:
        return self.model_dump()


class OmitsNone(Wire):
    """A response model whose `omitted_when_none` fields are left out of its JSON when they are None."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None or k not in self.omitted_when_none}


class ErrorBody(Wire):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Wire):
    """Every error: {"error": {"message", "type", "param", "code"}} (OpenAI's shape)."""

    error: ErrorBody


FinishReason = Literal["stop", "length"]


class Usage(Wire):
    """Token counts. prompt_tokens counts each prompt once (not once per choice) and includes the adapter's
    virtual tokens, as vLLM counts the rows of prompt_embeds: prompt_tokens + completion_tokens is what the
    context window holds (the model card's num_virtual_tokens says how many of them are virtual)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Wire):
    """OpenAI's legacy completions logprobs, one entry per token (the echoed prompt's tokens first). A prompt's
    first token has no prediction: its token_logprobs and top_logprobs entries are null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] = Field(
        description="per token: the `logprobs` most likely tokens and the chosen one (so up to logprobs + 1)"
    )
    text_offset: list[int] = Field(description="where each token's text starts in the choice's text")


class CompletionChoice(Wire):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(Wire):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(Wire):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(OmitsNone):
    """One `data:` event of a streamed completion (the last one, with stream_options.include_usage, has no
    choices and the usage); the stream ends with `data: [DONE]`, or an ErrorResponse event if generation fails."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None

    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"usage"})


class AssistantMessage(Wire):
    role: Literal["assistant"]
    content: str


class TopLogprob(Wire):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the token's text as UTF-8 bytes")


class TokenLogprob(Wire):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob] = Field(description="the top_logprobs most likely tokens at this place")


class ChoiceLogprobs(Wire):
    """Chat logprobs: one entry per generated token."""

    content: list[TokenLogprob] | None


class ChatChoice(Wire):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(Wire):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(OmitsNone):
    # what a chunk adds to the message: the role (first chunk), text, or nothing (a chunk that only ends it)
    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Wire):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(OmitsNone):
    """One `data:` event of a streamed chat completion (see CompletionChunk)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None

    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"usage"})


class ModelCard(Wire):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    num_virtual_tokens: int
    max_model_len: int | None


class ModelList(Wire):
    object: Literal["list"]
    data: list[ModelCard]


class AdapterDeleted(Wire):
    id: str
    object: Literal["model"]
    deleted: bool


class RescanReport(Wire):
    added: list[str]
    reloaded: list[str]
    removed: list[str]
    skipped: dict[str, str] = Field(description="folder name -> why it is not served")


class Health(Wire):
    status: Literal["ok", "unavailable"]
    model: str
    adapters: int
    scheduler: dict[str, Any]
    prefix_cache: dict[str, Any] | None = Field(
        default=None,
        description="prefix cache counters (lookups, hits, prompt_tokens, cached_tokens, blocks, bytes, "
        "...); null when the cache is off",
    )


class TokenizeResponse(Wire):
    count: int
    max_model_len: int | None
    tokens: list[int]
    num_virtual_tokens: int = Field(description="the model's virtual tokens, placed before these tokens")


class DetokenizeResponse(Wire):
    prompt: str


class PrefixPinned(Wire):
    model: str
    pinned: bool = Field(description="whether the prefix is pinned now")
    tokens: int = Field(description="tokens pinned or unpinned (whole prefix-cache blocks of the prompt start)")
    pinned_tokens: int = Field(description="tokens pinned in the whole prefix cache now")


RESPONSE_MODELS = (
    ErrorResponse,
    Completion,
    CompletionChunk,
    ChatCompletion,
    ChatCompletionChunk,
    ModelCard,
    ModelList,
    AdapterDeleted,
    RescanReport,
    Health,
    TokenizeResponse,
    DetokenizeResponse,
    PrefixPinned,
)
