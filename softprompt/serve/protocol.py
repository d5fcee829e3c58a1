"""The request models of the endpoints (what a body may hold; /openapi.json publishes them) and the engine requests
they make: `CompletionRequest` and `ChatRequest` give their `GenerationRequest`s (sampling, stop strings, penalties,
logit_bias, logprobs, one per prompt and choice), `TokenizeRequest`, `DetokenizeRequest` and `AdapterAdd` the rest.

Implemented beyond plain generation: `prompt` as token ids, `logprobs` / `top_logprobs`, `echo`, `n`, `best_of`,
`presence_penalty`, `frequency_penalty`, `logit_bias`, stop arrays, `max_completion_tokens`,
`stream_options.include_usage`. Fields OpenAI defines but softprompt does not implement (suffix, tools, ...) are
accepted only at their neutral value; anything else is a 400 naming the field, never silently ignored. Unknown fields
are 400s too, except a few purely informational ones clients send (user, metadata, store).

Types are strict: `max_tokens: "4"` or `max_tokens: true` is a 400, not 4 or 1 (an integer is accepted where a
number is expected; body.py reads a number without a fractional part such as 4.0 as an integer, as JSON Schema
does). Unicode and nesting depth are body.py's checks.

The published schema states every rule these models check (`json_schema_extra` next to each check: patterns, empty
lists, "at most one of", "only with"), so a body valid by /openapi.json is never a 400 for its shape, and an invalid
one always is (tests/serve/test_schema_agrees.py). Beyond JSON Schema, and said in the descriptions: the Unicode and
depth rules, best_of >= n, and no best_of > n with stream. What depends on the served model (its name, the
vocabulary, the context, --max-tokens-cap, the queue) is checked afterwards (validation.py).

Sampling is kept numerically safe in float32: a temperature below TEMPERATURE_EPSILON means greedy decoding (as 0
does), and a top_p below TOP_P_EPSILON keeps only the most likely token (`sampling()`).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from softprompt.formats.adapter import NAME_MAX, NAME_PATTERN
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.config import MAX_LOGPROBS  # one limit for generate --logprobs and the server
from softprompt.inference.prompt_cache import CachedPrompt

# repetition_penalty / no_repeat_ngram_size: the defaults and ranges of the command-line options
from softprompt.options import (
    DEFAULT_NO_REPEAT_NGRAM,
    DEFAULT_REPETITION_PENALTY,
    NO_REPEAT_NGRAM_MAX,
    REPETITION_PENALTY_RANGE,
)
from softprompt.serve.errors import APIError

MAX_STOP = 16
TEMPERATURE_EPSILON = 1e-4  # temperature below it: greedy (logits / tiny temperature overflows float32)
TOP_P_EPSILON = 1e-6  # top_p below it: only the most likely token (top_p rounds to 0 in float32)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
TOP_K_MAX = 2**31 - 1
MAX_N = 64  # choices per prompt (n, best_of); the server's capacity bounds prompts x choices too
PENALTY_MAX = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's range)
LOGIT_BIAS_MAX = 100.0  # |bias| per token (OpenAI's range)
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
TOKEN_KEY_PATTERN = r"^[0-9]{1,12}$"  # a logit_bias key: a token id written as a string


def nullable(schema: dict) -> dict:
    """json_schema_extra for an optional field: its whole published schema is `schema` or null."""
    return {"anyOf": [schema, {"type": "null"}]}


def only_with(field: str, when: dict, other: str, value) -> dict:
    """A JSON Schema rule: when `field` is present and matches `when`, `other` must be present and equal `value`."""
    return {
        "if": {"required": [field], "properties": {field: when}},
        "then": {"required": [other], "properties": {other: {"const": value}}},
    }


def with_rules(*rules: dict):
    """A model's json_schema_extra adding `rules` (e.g. only_with) to its published schema, under allOf."""

    def extra(schema: dict) -> None:
        schema.setdefault("allOf", []).extend(rules)

    return extra


def non_empty_lists(schema: dict) -> None:
    """json_schema_extra publishing that a list field (or a list branch of a union) may not be empty."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "array":
            branch["minItems"] = 1


TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


MODEL_HELP = (
    "a served model: `base`, an adapter's name, prefix/cartridge adapters' names joined by `+` (composed), or "
    "`NAME@TASK` (task TASK, an integer id, of the multitask adapter NAME)"
)


class _Common(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra=with_rules(only_with("stream_options", {"type": "object"}, "stream", True)),
    )

    model: str = Field(description=MODEL_HELP)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(
        default=1.0, ge=0.0, le=2.0, allow_inf_nan=False, description=f"0 (or below {TEMPERATURE_EPSILON}) = greedy"
    )
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=f"below {TOP_P_EPSILON}: only the most likely token",
    )
    top_k: int = Field(default=0, ge=0, le=TOP_K_MAX, description="0 = off (not OpenAI's; vLLM's)")
    stop: Union[str, list[str], None] = Field(
        default=None,
        json_schema_extra={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
                {"type": "null"},
            ]
        },
    )
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N, description="choices per prompt (sampled; reproducible with seed)")
    presence_penalty: float = Field(
        default=0.0,
        ge=-PENALTY_MAX,
        le=PENALTY_MAX,
        allow_inf_nan=False,
        description="subtracted from the logit of every token already generated",
    )
    frequency_penalty: float = Field(
        default=0.0,
        ge=-PENALTY_MAX,
        le=PENALTY_MAX,
        allow_inf_nan=False,
        description="times the number of times a token was generated, subtracted from its logit",
    )
    repetition_penalty: float = Field(
        default=DEFAULT_REPETITION_PENALTY,
        ge=REPETITION_PENALTY_RANGE[0],
        le=REPETITION_PENALTY_RANGE[1],
        allow_inf_nan=False,
        description="divides a positive logit of every token already generated (multiplies a "
        "negative one); 1 = off (vLLM's extra parameter; not OpenAI's)",
    )
    no_repeat_ngram_size: int = Field(
        default=DEFAULT_NO_REPEAT_NGRAM,
        ge=0,
        le=NO_REPEAT_NGRAM_MAX,
        description="never repeat an n-gram of this many generated tokens; 0 = off (not OpenAI's)",
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description=f"token id (as a string) -> bias added to its logit, in [-{LOGIT_BIAS_MAX:g}, "
        f"{LOGIT_BIAS_MAX:g}]; at most {MAX_LOGIT_BIAS} entries",
        json_schema_extra=nullable(
            {
                "type": "object",
                "propertyNames": {"pattern": TOKEN_KEY_PATTERN},
                "maxProperties": MAX_LOGIT_BIAS,
                "additionalProperties": {"type": "number", "minimum": -LOGIT_BIAS_MAX, "maximum": LOGIT_BIAS_MAX},
            }
        ),
    )
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None

    def stop_list(self) -> list[str]:
        """The non-empty stop strings (an empty one stops nothing)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def sampling(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) for the engine, numerically safe in float32: a temperature below
        TEMPERATURE_EPSILON is greedy (0) and a top_p below TOP_P_EPSILON keeps only the top token (top_k 1)."""
        if self.temperature < TEMPERATURE_EPSILON:
            return 0.0, 0, 1.0
        if self.top_p < TOP_P_EPSILON:
            return self.temperature, 1, 1.0
        return self.temperature, self.top_k, self.top_p

    def bias(self) -> dict[int, float]:
        """logit_bias with integer token ids (validated: ids are non-negative integers, biases in range)."""
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    # ---- the engine requests --------------------------------------------------------------------------------
    def candidates(self) -> int:
        """Completions generated per prompt (n; for completions best_of when given)."""
        return self.n

    def asked_logprobs(self) -> int | None:
        """How many alternatives per token the client asked for (None: no logprobs at all)."""
        raise NotImplementedError

    def echoes(self) -> bool:
        """Whether the prompt is returned before the completion (completions' echo)."""
        return False

    def scores_prompts(self) -> bool:
        """Whether each prompt's tokens are scored (echo with logprobs): one scoring job per prompt."""
        return self.echoes() and self.asked_logprobs() is not None

    def generation_requests(
        self,
        prompts: list[list[int]],
        limits: list[int],
        adapter: str | None,
        entry: CachedPrompt | None,
        default_penalty: float = DEFAULT_REPETITION_PENALTY,
        default_ngram: int = DEFAULT_NO_REPEAT_NGRAM,
    ) -> list[GenerationRequest]:
        """One engine request per prompt and choice, in that order: choice c of prompt p has id (p, c) and seed
        choice_seed(seed, c); a prompt whose limit is 0 (echo only) has none. All run on the adapter `entry` the
        request was validated against. `default_penalty` / `default_ngram`: the server's repetition_penalty and
        no_repeat_ngram_size, for a request that does not set them."""
        temperature, top_k, top_p = self.sampling()
        given = self.model_fields_set
        penalty = self.repetition_penalty if "repetition_penalty" in given else default_penalty
        ngram = self.no_repeat_ngram_size if "no_repeat_ngram_size" in given else default_ngram
        asked = self.asked_logprobs()
        # best_of ranks candidates by their summed log-probability, so it needs the chosen tokens' log-probabilities
        track = asked if asked is not None else (0 if self.candidates() > self.n else None)
        bias = self.bias() or None
        return [
            GenerationRequest(
                prompt_ids=ids,
                adapter=adapter,
                entry=entry,
                max_new_tokens=limit,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=choice_seed(self.seed, c),
                stop=self.stop_list(),
                id=(p, c),
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                logit_bias=bias,
                logprobs=track,
                repetition_penalty=penalty,
                no_repeat_ngram_size=ngram,
            )
            for p, (ids, limit) in enumerate(zip(prompts, limits))
            if limit != 0
            for c in range(self.candidates())
        ]

    @model_validator(mode="after")
    def _supported(self):
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings are supported")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries are supported")
            for key, value in self.logit_bias.items():
                if not re.fullmatch(TOKEN_KEY_PATTERN, key):
                    raise ValueError(
                        f'logit_bias: keys are token ids written as strings (e.g. "50256"), got {key[:20]!r}'
                    )
                if not math.isfinite(value) or abs(value) > LOGIT_BIAS_MAX:
                    raise ValueError(
                        f"logit_bias: the bias of token {key} must be in [-{LOGIT_BIAS_MAX:g}, "
                        f"{LOGIT_BIAS_MAX:g}], got {value}"
                    )
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class CompletionRequest(_Common):
    """POST /v1/completions: `prompt` is raw text placed right after the soft prompt (no template is applied), or
    token ids; a list of texts or of token-id lists gives several prompts (`n` choices each, in order).
    best_of must be >= n, and above n it cannot be combined with stream."""

    model_config = ConfigDict(
        json_schema_extra=with_rules(
            only_with("stream_options", {"type": "object"}, "stream", True),
            only_with("max_tokens", {"const": 0}, "echo", True),
        )
    )

    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="a text, a list of texts, a list of token ids, or a list of token-id lists (none empty)",
        json_schema_extra={
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                TOKEN_IDS,
                {"type": "array", "minItems": 1, "items": TOKEN_IDS},
            ]
        },
    )
    max_tokens: int | None = Field(default=None, ge=0, description="0 only with echo (score the prompt)")
    echo: bool = Field(
        default=False,
        description="return the prompt before the completion (with logprobs: the "
        "prompt tokens' log-probabilities too, the first one null)",
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="log-probabilities of each token and of the N most likely tokens at "
        "its place (the model's raw distribution)",
    )
    best_of: int | None = Field(
        default=None,
        ge=1,
        le=MAX_N,
        description="sample best_of completions per prompt, return the n with the highest "
        "sum of token log-probabilities",
    )
    suffix: str | None = Field(
        default=None,
        description='not supported: only null or ""',
        json_schema_extra=nullable({"type": "string", "maxLength": 0}),
    )

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.suffix:
            raise ValueError("suffix: not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: an empty list has nothing to complete")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (to score the prompt); ask for at least 1 token")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of: must be >= n ({self.n}), got {self.best_of}")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise ValueError("best_of: cannot be combined with stream (the best completions are known only at the end)")
        return self

    def candidates(self) -> int:
        """Completions generated per prompt (best_of, else n)."""
        return self.best_of or self.n

    def asked_logprobs(self) -> int | None:
        return self.logprobs

    def echoes(self) -> bool:
        return self.echo

    def token_prompts(self) -> list[list[int]] | None:
        """The prompts when given as token ids (None when given as text)."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], list):
            return [list(p) for p in self.prompt]
        return None

    def prompts(self) -> list[str]:
        """The prompts when given as text."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = Field(
        default=None,
        description="a text, or a list of text parts",
        json_schema_extra={"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}, {"type": "null"}]},
    )

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"messages: content part of type {part.get('type')!r} is not supported (text only)",
                    param="messages",
                )
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    """POST /v1/chat/completions: the conversation is formatted with the adapter's template.chat_prompt, exactly
    as `softprompt generate` formats it."""

    model_config = ConfigDict(
        json_schema_extra=with_rules(
            only_with("stream_options", {"type": "object"}, "stream", True),
            only_with("top_logprobs", {"type": "integer"}, "logprobs", True),
        )
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = Field(
        default=False, description="log-probability of each generated token (the model's raw distribution)"
    )
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the N most likely tokens at each place"
    )
    tools: list | None = Field(
        default=None,
        description="not supported: only null or []",
        json_schema_extra=nullable({"type": "array", "maxItems": 0}),
    )
    tool_choice: Any = Field(
        default=None, description="not supported (there are no tools): only null", json_schema_extra={"type": "null"}
    )
    response_format: dict | None = Field(
        default=None,
        description="only type 'text'",
        json_schema_extra=nullable({"type": "object", "properties": {"type": {"enum": ["text", None]}}}),
    )

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.tools:
            raise ValueError("tools: not supported")
        if self.tool_choice is not None:
            raise ValueError("tool_choice: not supported (tools are not supported)")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format: only type 'text' is supported")
        return self

    def asked_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def as_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class AdapterAdd(BaseModel):
    """POST /v1/adapters: serve the folder `path` (relative to the adapters folder; default: `name`) as `name`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(
        description="1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'",
        json_schema_extra={"pattern": NAME_PATTERN, "maxLength": NAME_MAX},
    )
    path: str | None = None
    replace: bool = False


class PrefixPin(BaseModel):
    """POST /v1/prefixes: pin (or, with `pin: false`, unpin) the keys/values of a prompt start for a model in the
    prefix cache, so every request to that model starting with it reuses them and they are never evicted."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(description=MODEL_HELP)
    prompt: str | list[int] = Field(
        description="the prompt start as completions send it: text (no special tokens added) or token ids",
        json_schema_extra={"anyOf": [{"type": "string", "minLength": 1}, TOKEN_IDS]},
    )
    pin: bool = True

    @model_validator(mode="after")
    def _not_empty(self):
        if not self.prompt:
            raise ValueError("prompt: an empty prompt has nothing to pin")
        return self


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's endpoint): the token ids of `prompt`, or of `messages` formatted with the model's
    template (exactly what /v1/chat/completions would run); virtual tokens are not included."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )
    model: str
    prompt: str | None = Field(default=None, description="give exactly one of prompt or messages")
    messages: list[ChatMessage] | None = Field(default=None, json_schema_extra=non_empty_lists)
    add_special_tokens: bool = Field(
        default=False,
        description="add the tokenizer's special tokens (e.g. BOS); the completions endpoint never adds them",
    )

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages: an empty conversation")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's endpoint): the text of token ids."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    tokens: list[int] = Field(json_schema_extra={"items": {"type": "integer", "minimum": 0}})


REQUEST_MODELS = (CompletionRequest, ChatRequest, AdapterAdd, PrefixPin, TokenizeRequest, DetokenizeRequest)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of a prompt's choice `index` (n > 1 or best_of): choice 0 keeps the request's seed (so n=1 is
    unchanged), the others get distinct seeds derived from it; None stays None (fresh entropy per choice)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
