"""Serving a soft prompt at scale on vLLM: the client half.

vLLM removed prompt adapters in 2025; what it offers instead is `--enable-prompt-embeds`, where a Completions
request carries `prompt_embeds`: the base64 of a `torch.save`d [seq, hidden] tensor that replaces token
embeddings. A soft prompt fits exactly: build [soft prompt ; token embeddings of the templated prompt] here,
with the same template `softprompt generate` uses, and send it. vLLM numbers the rows 0..seq-1, the same
positions softprompt gives the virtual tokens (0..N-1) and the text (N, N+1, ...), so results match.

    base = load_base("meta-llama/Llama-3.2-1B-Instruct")
    adapter = load_adapter("runs/my-task", base)
    print(complete("http://gpu-box:8000", "meta-llama/Llama-3.2-1B-Instruct", base, adapter,
                   instruction="Classify: great movie!", max_tokens=8)["choices"][0]["text"])

Only the embedding table of the base model is needed client-side (no forward pass). vLLM counts the N + L rows in
`usage.prompt_tokens`, as `softprompt serve` counts an adapter's virtual tokens; responses are returned as vLLM sends
them. Checked against a real vLLM 0.32 server by scripts/vllm_check.sh (docs/vllm.md).

`prompt_embeds` carries input embeddings only, so this route serves prompt-tuning and P-tuning adapters (both are
[N, hidden] input embeddings) but not prefix-tuning ones, whose keys/values live inside every layer:
`completion_payload` refuses those with `PrefixNotSupported` (serve them with `softprompt serve`).
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import torch

from softprompt.core import KV_METHODS
from softprompt.data.templates import Template, encode_text


class PrefixNotSupported(ValueError):
    """A prefix-tuning adapter was given to the prompt_embeds route, which carries input embeddings only."""


def check_embeddable(adapter) -> None:
    """Raise PrefixNotSupported unless `adapter` (an adapter.Adapter or None) is made of input embeddings."""
    method = getattr(adapter, "method", "prompt") if adapter is not None else "prompt"
    if getattr(adapter, "needs_task", False):
        raise ValueError(
            f"adapter {adapter.path or ''} is a multitask adapter, with a prompt per task: export one task with "
            f"--task (0..{adapter.num_tasks - 1})"
        )
    if method in KV_METHODS:
        where = f" {adapter.path}" if getattr(adapter, "path", None) else ""
        kind = "prefix tuning" if method == "prefix" else "a cartridge"
        raise PrefixNotSupported(
            f"adapter{where} uses method {method} ({kind}: keys and values inside every layer); vLLM's "
            "prompt_embeds input carries input embeddings only, so it serves prompt and ptuning adapters but not "
            f"{method} ones; serve this adapter with `softprompt serve`"
        )


def prompt_text(
    template: Template,
    tokenizer,
    *,
    instruction: str | None = None,
    input: str = "",
    messages: list[dict] | None = None,
    text: str | None = None,
) -> str:
    """The text placed after the soft prompt: a raw `text`, a chat conversation (`messages`, formatted with
    template.chat_prompt exactly as the server's chat endpoint does) or an `instruction` (+ `input`)."""
    given = [x is not None for x in (instruction, messages, text)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of instruction=, messages= or text=")
    if text is not None:
        return text
    if messages is not None:
        return template.chat_prompt(messages, tokenizer)
    return template.prompt(instruction, input, tokenizer)


def build_prompt_embeds(
    base, soft_prompt: torch.Tensor | None, prompt_ids: list[int], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """[soft prompt ; token embeddings] as one [N + L, hidden] tensor on the CPU.

    `soft_prompt` is an adapter's fp32 [N, hidden] embeddings (None: the plain base model, N = 0). Both parts are
    cast to `dtype` (default: the base model's embedding dtype, which is what the server computes in).
    """
    table = base.model.get_input_embeddings()
    dtype = dtype or table.weight.dtype
    with torch.no_grad():
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=table.weight.device)
        tokens = (
            table(ids).to(device="cpu", dtype=dtype)
            if len(prompt_ids)
            else torch.empty(0, base.hidden_size, dtype=dtype)
        )
    if soft_prompt is None:
        rows = tokens
    else:
        if soft_prompt.ndim != 2 or soft_prompt.shape[1] != base.hidden_size:
            raise ValueError(
                f"soft prompt has shape {tuple(soft_prompt.shape)}; expected [N, {base.hidden_size}] "
                f"for base model {base.name}"
            )
        rows = torch.cat([soft_prompt.detach().to(device="cpu", dtype=dtype), tokens], dim=0)
    if rows.shape[0] == 0:
        raise ValueError("the prompt is empty: no soft prompt and no text tokens")
    return rows.contiguous()


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """base64 of `torch.save(embeds)`: the encoding vLLM's `prompt_embeds` field expects."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_prompt_embeds(data: str) -> torch.Tensor:
    """The inverse of encode_prompt_embeds (weights_only: a payload can never run code)."""
    return torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True, map_location="cpu")


def completion_payload(
    model: str,
    base,
    adapter=None,
    *,
    instruction: str | None = None,
    input: str = "",
    messages: list[dict] | None = None,
    text: str | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    template: Template | None = None,
    **extra,
) -> dict:
    """The JSON body of a vLLM /v1/completions request carrying [soft prompt ; prompt tokens] as prompt_embeds.

    `adapter` is an adapter.Adapter (its template formats the prompt unless `template` is given) or None.
    """
    check_embeddable(adapter)
    template = template or (adapter.template if adapter is not None else Template())
    text_ = prompt_text(template, base.tokenizer, instruction=instruction, input=input, messages=messages, text=text)
    ids = encode_text(base.tokenizer, text_)
    embeds = build_prompt_embeds(base, adapter.embeddings if adapter is not None else None, ids, dtype)
    # No `prompt` field: vLLM 0.32 turns prompt="" (which its own example sends) into a second, empty prompt and
    # answers 400 "The decoder prompt cannot be empty"; prompt_embeds alone is the whole prompt.
    body = {
        "model": model,
        "prompt_embeds": encode_prompt_embeds(embeds),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
    }
    if stop:
        body["stop"] = list(stop)
    if seed is not None:
        body["seed"] = seed
    body.update(extra)
    return body


def post_json(url: str, body: dict, timeout: float = 600.0, api_key: str | None = None) -> dict:
    """POST a JSON body with the standard library; an HTTP error raises RuntimeError with the server's message."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", errors="replace")
        raise RuntimeError(f"{url}: HTTP {err.code}: {detail}") from err


def complete(
    url: str, model: str, base, adapter=None, *, timeout: float = 600.0, api_key: str | None = None, **kwargs
) -> dict:
    """Send one completion to a vLLM server started with `--enable-prompt-embeds`; returns its JSON response.

    `url` is the server root (http://host:8000) or its /v1 base; kwargs as in completion_payload.
    """
    root = url.rstrip("/")
    endpoint = root + ("/completions" if root.endswith("/v1") else "/v1/completions")
    return post_json(endpoint, completion_payload(model, base, adapter, **kwargs), timeout, api_key)
