"""The client half of serving on vLLM: [soft prompt ; token embeddings] sent as base64 `prompt_embeds`.

vLLM cannot run here, so a stub HTTP server on loopback receives the request, decodes the payload as vLLM does
(base64 -> torch.load) and the test checks shape, dtype and values row by row.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from softprompt.core.prompt import SoftPrompt
from softprompt.data.templates import Template, encode_text
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.vllm.client import (
    build_prompt_embeds,
    complete,
    completion_payload,
    decode_prompt_embeds,
    encode_prompt_embeds,
)


@pytest.fixture()
def stub_vllm():
    """A loopback HTTP server standing in for `vllm serve --enable-prompt-embeds`; records what it receives."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.path, body))
            if body["model"] == "unknown":
                data = json.dumps({"error": {"message": "The model `unknown` does not exist."}}).encode()
                self.send_response(404)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            embeds = decode_prompt_embeds(body["prompt_embeds"])
            reply = {
                "object": "text_completion",
                "model": body["model"],
                "choices": [{"index": 0, "text": f"rows={embeds.shape[0]}", "finish_reason": "length"}],
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_payload_is_soft_prompt_then_token_embeddings(tiny, tmp_path, stub_vllm):
    url, received = stub_vllm
    prompt = SoftPrompt.initialise(tiny, "random", num_virtual_tokens=5, seed=3)
    save_adapter(tmp_path / "task", prompt.embeddings, tiny, template=Template("Review: {instruction}\nLabel:"))
    adapter = load_adapter(tmp_path / "task", tiny)

    reply = complete(url, "tiny-llama", tiny, adapter, instruction="good film", max_tokens=3, seed=7, stop=["\n"])

    ids = encode_text(tiny.tokenizer, "Review: good film\nLabel:")
    assert reply["choices"][0]["text"] == f"rows={5 + len(ids)}"
    path, body = received[0]
    assert path == "/v1/completions"
    assert body["model"] == "tiny-llama" and "prompt" not in body  # vLLM 0.32 refuses prompt="" (HTTP 400)
    assert body["max_tokens"] == 3 and body["seed"] == 7 and body["stop"] == ["\n"] and body["temperature"] == 0.0
    embeds = decode_prompt_embeds(body["prompt_embeds"])
    assert embeds.shape == (5 + len(ids), tiny.hidden_size)
    assert embeds.dtype == torch.float32
    assert torch.equal(embeds[:5], adapter.embeddings)
    table = tiny.model.get_input_embeddings().weight
    assert torch.equal(embeds[5:], table[torch.tensor(ids)])


def test_chat_messages_use_the_adapter_template(tiny, tmp_path, stub_vllm):
    url, received = stub_vllm
    prompt = SoftPrompt.initialise(tiny, "random", num_virtual_tokens=4, seed=1)
    save_adapter(tmp_path / "chat", prompt.embeddings, tiny, template=Template("chat"))
    adapter = load_adapter(tmp_path / "chat", tiny)
    messages = [{"role": "user", "content": "hi"}]

    complete(url + "/v1", "m", tiny, adapter, messages=messages)

    ids = encode_text(
        tiny.tokenizer, tiny.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    embeds = decode_prompt_embeds(received[0][1]["prompt_embeds"])
    table = tiny.model.get_input_embeddings().weight
    assert torch.equal(embeds, torch.cat([adapter.embeddings, table[torch.tensor(ids)]]))


def test_dtype_cast_and_base_model_without_adapter(tiny):
    ids = encode_text(tiny.tokenizer, "abc")
    embeds = build_prompt_embeds(tiny, None, ids, dtype=torch.bfloat16)
    assert embeds.shape == (3, tiny.hidden_size) and embeds.dtype == torch.bfloat16
    roundtrip = decode_prompt_embeds(encode_prompt_embeds(embeds))
    assert roundtrip.dtype == torch.bfloat16 and torch.equal(roundtrip, embeds)
    body = completion_payload("m", tiny, None, text="abc")
    assert torch.equal(
        decode_prompt_embeds(body["prompt_embeds"]), tiny.model.get_input_embeddings().weight[torch.tensor(ids)]
    )


def test_bad_inputs(tiny, stub_vllm):
    with pytest.raises(ValueError, match="exactly one of"):
        completion_payload("m", tiny, None, text="a", instruction="b")
    with pytest.raises(ValueError, match=r"expected \[N, 32\]"):
        build_prompt_embeds(tiny, torch.zeros(3, 7), [5])
    with pytest.raises(ValueError, match="the prompt is empty"):
        build_prompt_embeds(tiny, None, [])
    url, _ = stub_vllm
    with pytest.raises(RuntimeError, match=r"HTTP 404: .*The model `unknown` does not exist"):
        complete(url, "unknown", tiny, None, text="abc")


# ---- softprompt export-vllm ------------------------------------------------------------------------------------------
def test_export_vllm_writes_rows_recipe_and_a_ready_request(tiny, tiny_dir, tmp_path, stub_vllm, capsys):
    """What a vLLM fleet needs per adapter: the soft-prompt rows, the template, and (optionally) a whole body."""
    from safetensors.torch import load_file

    from softprompt.cli import main

    prompt = SoftPrompt.initialise(tiny, "random", num_virtual_tokens=5, seed=3)
    save_adapter(tmp_path / "task", prompt.embeddings, tiny, template=Template("Review: {instruction}\nLabel:"))
    out = tmp_path / "export"
    assert (
        main(
            [
                "export-vllm",
                str(tmp_path / "task"),
                "--out",
                str(out),
                "--model",
                str(tiny_dir),
                "--instruction",
                "good film",
                "--served-model-name",
                "tiny-llama",
                "--max-tokens",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "softprompt export-vllm: wrote" in capsys.readouterr().out
    adapter = load_adapter(tmp_path / "task", tiny)
    rows = load_file(str(out / "prompt_embeds.safetensors"))["prompt_embeds"]
    assert torch.equal(rows, adapter.embeddings) and torch.equal(torch.load(out / "prompt_embeds.pt"), rows)
    info = json.loads((out / "vllm.json").read_text())
    assert info["method"] == "prompt" and info["num_virtual_tokens"] == 5 and info["hidden_size"] == 32
    assert info["template_example"] == "Review: {instruction}\nLabel:"
    # The recipe, followed by hand (no softprompt client), gives exactly the body the client builds ...
    ids = encode_text(tiny.tokenizer, info["template_example"].replace("{instruction}", "good film"))
    table = tiny.model.get_input_embeddings().weight
    by_hand = torch.cat([rows, table[torch.tensor(ids)]])
    body = json.loads((out / "request.json").read_text())
    assert "prompt" not in body and body["model"] == "tiny-llama" and body["max_tokens"] == 3
    assert torch.equal(decode_prompt_embeds(body["prompt_embeds"]), by_hand)
    assert body == completion_payload("tiny-llama", tiny, adapter, instruction="good film", max_tokens=3)
    # ... and request.json can be posted as it is.
    url, received = stub_vllm
    from softprompt.vllm.client import post_json

    assert post_json(url + "/v1/completions", body)["choices"][0]["text"] == f"rows={5 + len(ids)}"

    bf16 = tmp_path / "bf16"
    main(["export-vllm", str(tmp_path / "task"), "--out", str(bf16), "--dtype", "bfloat16"])
    assert load_file(str(bf16 / "prompt_embeds.safetensors"))["prompt_embeds"].dtype == torch.bfloat16
    assert not (bf16 / "request.json").exists()


def test_export_vllm_refuses_prefix_adapters(tiny, tmp_path, capsys):
    from softprompt.cli import main
    from softprompt.core.prompt import build_prompt

    save_adapter(tmp_path / "prefix", build_prompt(tiny, "prefix", "vocab", 3), tiny)
    assert main(["export-vllm", str(tmp_path / "prefix"), "--out", str(tmp_path / "x")]) == 2
    assert "uses method prefix" in capsys.readouterr().err
    assert not (tmp_path / "x" / "prompt_embeds.safetensors").exists()
