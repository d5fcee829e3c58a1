"""Shared by the server tests: adapters with a template on disk, the real server on loopback with an `openai`
client (LiveServer), the reference answer of a request run alone, and the error body's checked shape."""

from pathlib import Path

import httpx
import openai

from softprompt.core.prompt import SoftPrompt
from softprompt.data.templates import Template
from softprompt.formats.adapter import save_adapter
from softprompt.inference.batch import GenerationRequest
from softprompt.serve import BackgroundServer


def make_adapter(base, folder: Path, name: str, template: str, n: int, seed: int = 0) -> None:
    prompt = SoftPrompt.initialise(base, "random", num_virtual_tokens=n, seed=seed)
    # Random tiny-model prompts are far off scale; scale them up so adapters visibly change the output.
    save_adapter(folder / name, prompt.embeddings * 8, base, template=Template(template))


class LiveServer(BackgroundServer):
    """The server on 127.0.0.1, a free port, in a background thread, plus an openai client for it."""

    def __enter__(self):
        super().__enter__()
        self.state = self.app.state.softprompt
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)
        return self


def alone(engine, ids, adapter, max_new_tokens, **kw):
    """The reference: one request alone through the engine."""
    return engine.generate(
        [GenerationRequest(ids, adapter=adapter, max_new_tokens=max_new_tokens, **kw)], batch_size=1
    )[0]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]
