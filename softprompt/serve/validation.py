"""A request body validated against what this server serves: the model, its template, the prompts' tokens, the
context and the capacity, all checked before any response starts, in the thread pool (never on the event loop).
`prepare_completion` and `prepare_chat` give a `Prepared` request (what replies.py runs); `prepare_tokenize` and
`prepare_detokenize` their whole answers."""

from __future__ import annotations

from softprompt.data.templates import Template, TemplateError, encode_text
from softprompt.inference.prompt_cache import CachedPrompt
from softprompt.serve.body import validate_body
from softprompt.serve.errors import APIError, outside_vocabulary
from softprompt.serve.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, PrefixPin, TokenizeRequest
from softprompt.serve.responses import DetokenizeResponse, PrefixPinned, TokenizeResponse
from softprompt.serve.state import ServerState

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class Prepared:
    """A fully validated generation request: the body, the adapter key, the prompts' ids and token budgets, the
    adapter's number of virtual tokens, (completions) the prompts' texts for echo, and the adapter's PromptCache
    entry it was validated against: every job of the request runs on that entry (pinned), so the request is served
    entirely by one version of the adapter even if it is replaced or removed meanwhile."""

    def __init__(
        self,
        body: CompletionRequest | ChatRequest,
        key: str | None,
        prompts: list[list[int]],
        limits: list[int],
        virtual: int = 0,
        texts: list[str] | None = None,
        entry: CachedPrompt | None = None,
    ):
        self.body, self.key, self.prompts, self.limits = body, key, prompts, limits
        self.virtual, self.texts, self.entry = virtual, texts, entry


# ---- the checks ------------------------------------------------------------------------------------------------
def max_tokens(state: ServerState, asked: int | None, default: int | None, used: int, param: str = "max_tokens") -> int:
    """The completion budget: checked against the server cap and the context left after `used` tokens."""
    cap, context = state.max_tokens_cap, state.context
    if asked is not None and asked > cap:
        raise APIError(
            400,
            f"max_tokens is too large: {asked}. This server allows at most {cap} completion tokens (--max-tokens-cap).",
            param=param,
            code="invalid_value",
        )
    room = context - used if context else cap
    limit = asked if asked is not None else min(default or cap, cap, room)
    if context and (used + limit > context or limit < 1):
        limit = max(limit, 1)
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you "
            f"requested {used + limit} tokens ({used} in the prompt, including the adapter's "
            f"virtual tokens; {limit} for the completion). Please reduce the prompt or "
            "max_tokens.",
            param="messages" if asked is None else param,
            code="context_length_exceeded",
        )
    return limit


def check_prompt_fits(state: ServerState, virtual: int, ids: list[int], room: int = 0) -> None:
    """A prompt to score only (max_tokens 0) must fit the context with the adapter's virtual tokens (and `room`
    tokens after it: a pinned prefix needs at least one for what follows it)."""
    if state.context and virtual + len(ids) + room > state.context:
        after = f" and needs {room} more after it" if room else ""
        raise APIError(
            400,
            f"This model's maximum context length is {state.context} tokens. However, "
            f"the prompt has {virtual + len(ids)} tokens (including the adapter's {virtual} virtual "
            f"tokens){after}. Please reduce the prompt.",
            param="prompt",
            code="context_length_exceeded",
        )


def check_capacity(state: ServerState, count: int, choices: int = 1, param: str = "prompt", scored: int = 0) -> None:
    """A request with more jobs (prompts x choices completions, plus `scored` prompts to score for echo with
    logprobs) than the server can ever hold at once is a 400 (not a 429: retrying cannot help)."""
    sched = state.scheduler
    if count * choices + scored <= sched.capacity:
        return
    what = f"{count} prompts" if choices == 1 else f"{count} prompt(s) x {choices} choices (n / best_of)"
    if scored:
        what = (
            f"{scored} prompts to score (echo with logprobs)"
            if not count
            else f"{what} plus {scored} prompts to score (echo with logprobs)"
        )
    raise APIError(
        400,
        f"Invalid value for '{param}': {what} in one request can never be served: this "
        f"server runs at most {sched.max_batch} requests at once and queues at most "
        f"{sched.max_queue} (--max-batch, --max-queue), so ask for at most {sched.capacity} "
        "completions per request.",
        param=param,
        code="invalid_value",
    )


def check_tokens(state: ServerState, tokens, param: str) -> None:
    """Every token id must be in the model's vocabulary."""
    vocab = state.vocab_size()
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise outside_vocabulary(param, bad, vocab)


def chat_text(state: ServerState, template: Template, messages: list[dict]) -> str:
    """A conversation formatted with a model's template (400 when it cannot be)."""
    try:
        return template.chat_prompt(messages, state.tokenizer)
    except APIError:
        raise
    except Exception as err:  # noqa: BLE001 (TemplateError, or the model's jinja chat template refusing it)
        raise APIError(
            400,
            f"the conversation cannot be formatted: {err}" if not isinstance(err, TemplateError) else str(err),
            param="messages",
        ) from err


# ---- the requests ----------------------------------------------------------------------------------------------
def prepare_completion(state: ServerState, raw: bytes) -> Prepared:
    body = validate_body(raw, CompletionRequest)
    key, n, _, entry = state.lookup(body.model)
    check_tokens(state, body.bias(), "logit_bias")
    token_prompts = body.token_prompts()
    count = len(token_prompts) if token_prompts is not None else len(body.prompts())
    generated = count if body.max_tokens != 0 else 0  # echo only (max_tokens 0) generates nothing
    scored = count if body.scores_prompts() else 0  # each scored prompt is a job too
    choices = body.candidates()
    param = "prompt" if choices == 1 or not generated else "best_of" if body.best_of else "n"
    check_capacity(state, generated, choices, param, scored=scored)
    prompts, texts = _completion_prompts(state, body, token_prompts, count)
    if body.max_tokens == 0:  # echo only: score the prompt, generate nothing
        for ids in prompts:
            check_prompt_fits(state, n, ids)
        limits = [0] * len(prompts)
    else:
        limits = [max_tokens(state, body.max_tokens, DEFAULT_COMPLETION_TOKENS, n + len(ids)) for ids in prompts]
    return Prepared(body, key, prompts, limits, n, texts, entry)


def _completion_prompts(
    state: ServerState, body: CompletionRequest, token_prompts: list[list[int]] | None, count: int
) -> tuple[list[list[int]], list[str]]:
    """The prompts' token ids and texts (a token-id prompt's text only with echo), each checked."""
    single = not isinstance(body.prompt, list) or (token_prompts is not None and isinstance(body.prompt[0], int))
    prompts, texts = [], []
    for index in range(count):
        param = "prompt" if single else f"prompt.{index}"
        if token_prompts is not None:
            ids = token_prompts[index]
            check_tokens(state, ids, param)
            text = state.tokenizer.decode(ids) if body.echo else ""
        else:
            text = body.prompts()[index]
            ids = encode_text(state.tokenizer, text)
        if not ids:
            raise APIError(
                400,
                "prompt is empty: give at least one token" + (" of text" if token_prompts is None else ""),
                param=param,
            )
        prompts.append(ids)
        texts.append(text)
    return prompts, texts


def prepare_chat(state: ServerState, raw: bytes) -> Prepared:
    body = validate_body(raw, ChatRequest)
    key, n, template, entry = state.lookup(body.model)
    check_tokens(state, body.bias(), "logit_bias")
    check_capacity(state, 1, body.n, "n")
    ids = encode_text(state.tokenizer, chat_text(state, template, body.as_dicts()))
    if not ids:
        raise APIError(400, "the formatted conversation is empty", param="messages")
    limit = max_tokens(state, body.limit(), None, n + len(ids), param=body.limit_param())
    return Prepared(body, key, [ids], [limit], n, entry=entry)


def prepare_tokenize(state: ServerState, raw: bytes) -> TokenizeResponse:
    body = validate_body(raw, TokenizeRequest)
    _, n, template, _ = state.lookup(body.model)
    if body.messages is not None:
        text = chat_text(state, template, [{"role": m.role, "content": m.text()} for m in body.messages])
    else:
        text = body.prompt
    ids = state.tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]
    return TokenizeResponse(count=len(ids), max_model_len=state.context, tokens=ids, num_virtual_tokens=n)


def pin_prefix(state: ServerState, raw: bytes) -> PrefixPinned:
    """POST /v1/prefixes: pin or unpin a prompt start of a model in the prefix cache (run in the thread pool: the
    prefill runs beside the worker, which keeps decoding)."""
    body = validate_body(raw, PrefixPin)
    key, n, _, _ = state.lookup(body.model)
    if state.prefix_cache is None:
        raise APIError(400, "this server runs without a prefix cache (--prefix-cache-mb 0): nothing can be pinned",
                       param="model", code="prefix_cache_off")  # fmt: skip
    ids = list(body.prompt) if isinstance(body.prompt, list) else encode_text(state.tokenizer, body.prompt)
    check_tokens(state, ids, "prompt")
    check_prompt_fits(state, n, ids, room=1)
    try:
        tokens = state.engine.pin_prefix(ids, key) if body.pin else state.engine.unpin_prefix(ids, key)
    except ValueError as err:
        raise APIError(400, str(err), param="prompt", code="prefix_too_large") from None
    block = state.prefix_cache.block_tokens
    return PrefixPinned(model=body.model, pinned=body.pin, tokens=tokens,
                        pinned_tokens=state.prefix_cache.stats().pinned_blocks * block)  # fmt: skip


def prepare_detokenize(state: ServerState, raw: bytes) -> DetokenizeResponse:
    body = validate_body(raw, DetokenizeRequest)
    state.lookup(body.model)
    check_tokens(state, body.tokens, "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))
