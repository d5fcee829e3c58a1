"""`softprompt generate` / `softprompt chat` and their Python API: outputs, batch files, templates, errors."""

import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import peaked_base, random_adapter, reference_greedy
from helpers import reload_tiny, save_tiny

from softprompt import generate, generate_batch
from softprompt.cli import main
from softprompt.data.templates import Template, encode_text
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.chat import Conversation, chat_loop
from softprompt.inference.generate import add_adapter, build_engine

USER_TEMPLATE = "Q: {instruction} {input}\nA:"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model_dir = save_tiny(peaked_base(), root / "model")
    base = reload_tiny(model_dir)
    adapters = root / "adapters"
    save_adapter(adapters / "alpha", random_adapter(3, seed=1).embeddings, base, template=Template())
    save_adapter(adapters / "beta", random_adapter(6, seed=2).embeddings, base, template=Template(USER_TEMPLATE))
    save_adapter(adapters / "peft", random_adapter(5, seed=3).embeddings, base)
    (adapters / "peft" / "softprompt.json").unlink()  # as PEFT writes it: no saved template
    save_adapter(root / "small", random_adapter(4, hidden=16).embeddings, None)
    return SimpleNamespace(root=root, model=str(model_dir), base=base, adapters=adapters)


def answer(env, instruction, adapter=None, input="", **kw):
    return generate(
        instruction,
        input,
        base=env.base,
        greedy=True,
        max_new_tokens=10,
        adapter=None if adapter is None else env.adapters / adapter,
        **kw,
    )


def test_api_greedy_answer_equals_no_cache_loop(env):
    for name in [None, "alpha", "beta"]:
        template = Template(USER_TEMPLATE) if name == "beta" else Template()
        ids = encode_text(env.base.tokenizer, template.prompt("tell me about cats", "", env.base.tokenizer))
        prompt = None if name is None else load_adapter(env.adapters / name).embeddings
        tokens, _ = reference_greedy(env.base, prompt, ids, 10)
        assert answer(env, "tell me about cats", name) == env.base.tokenizer.decode(tokens, skip_special_tokens=True)


def test_templates_saved_reference_and_chat(env):
    engine = build_engine(env.base)
    names = {n: add_adapter(engine, env.adapters / n) for n in ["alpha", "beta", "peft"]}
    assert [engine.template(names[n]).spec for n in ["alpha", "beta", "peft"]] == [
        "human-assistant",
        USER_TEMPLATE,
        "human-assistant",
    ]
    assert engine.template(None).spec == "human-assistant"
    chat = build_engine(env.base, chat_template=True)
    names = {n: add_adapter(chat, env.adapters / n) for n in ["alpha", "beta", "peft"]}
    assert [chat.template(names[n]).spec for n in ["alpha", "beta", "peft"]] == [
        "human-assistant",
        USER_TEMPLATE,
        "chat",
    ]
    assert chat.encode("hi") == encode_text(env.base.tokenizer, "<|user|>hi\n<|assistant|>")


def test_cli_single_streams_the_answer(env, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                env.model,
                "--dtype",
                "float32",
                "--adapter",
                str(env.adapters / "alpha"),
                "--greedy",
                "--max-new-tokens",
                "10",
                "tell me about cats",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == answer(env, "tell me about cats", "alpha") + "\n"
    pieces = []
    text = answer(env, "tell me about cats", "alpha", on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == text


def test_cli_seeded_sampling_is_reproducible(env, capsys):
    argv = [
        "generate",
        "--model",
        env.model,
        "--temperature",
        "1.2",
        "--top-k",
        "30",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--max-new-tokens",
        "12",
        "--input",
        "with input",
        "a story",
    ]
    outputs = []
    for _ in range(2):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) > 1


def test_cli_batch_mixed_adapters_in_input_order(env, tmp_path, capsys):
    records = [
        {"instruction": "tell me about cats", "adapter": "alpha", "id": 0},
        {"instruction": "why is the sky blue", "id": 1},
        {"instruction": "translate", "input": "你好世界", "adapter": "beta", "id": 2},
        {"instruction": "a", "adapter": "peft", "id": 3},
        {"instruction": "a much longer instruction than the others", "adapter": "alpha", "id": 4},
        {"instruction": "short", "id": 5},
    ]
    batch, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    batch.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "\n", encoding="utf-8")
    argv = [
        "generate",
        "--model",
        env.model,
        "--dtype",
        "float32",
        "--batch",
        str(batch),
        "--out",
        str(out),
        "--adapters-dir",
        str(env.adapters),
        "--greedy",
        "--max-new-tokens",
        "10",
        "--batch-size",
        "4",
    ]
    assert main(argv) == 0
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in r.items() if k != "output"} for r in got] == records
    for record, row in zip(records, got):
        assert row["output"] == answer(env, record["instruction"], record.get("adapter"), record.get("input", ""))
    # Records without "adapter" use --adapter when given.
    assert main(argv[:-2] + ["--batch-size", "2", "--adapter", str(env.adapters / "beta")]) == 0
    again = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert again[1]["output"] == answer(env, "why is the sky blue", "beta")
    assert again[0]["output"] == got[0]["output"]


def test_api_batch_seeds_rows_independently(env):
    records = [{"instruction": "one"}, {"instruction": "two words", "adapter": "alpha"}]
    kw = dict(base=env.base, adapters_dir=env.adapters, temperature=1.0, seed=5, max_new_tokens=8)
    together = generate_batch(records, batch_size=2, **kw)
    assert generate_batch(records, batch_size=1, **kw) == together
    assert together[1]["output"] == generate(
        "two words", base=env.base, adapter=env.adapters / "alpha", temperature=1.0, seed=6, max_new_tokens=8
    )


BAD_BATCHES = [
    ('{"instruction": "x"}\n{"instruction": "y", "adapter": "nope"}\n', ":2: unknown adapter 'nope': no folder"),
    ('{"instruction": "x"}\n\n{not json\n', ":3: malformed JSON: Expecting property name enclosed in double quotes"),
    ('{"input": "x"}\n', ":1: missing 'instruction' (a string)"),
    ('["x"]\n', ":1: expected a JSON object with 'instruction', got list"),
    (
        '{"instruction": "x", "adapter": "../alpha"}\n',
        ":1: invalid adapter name '../alpha': use 1-64 letters, "
        "digits, '.', '_' or '-', starting with a letter or digit (no "
        "'/', no '..', not an absolute path); it names a folder under "
        "--adapters-dir",
    ),
    ('{"instruction": "' + "x" * 600 + '"}\n', ":1: prompt too long: 0 virtual tokens + 620 prompt tokens"),
]


@pytest.mark.parametrize("content,message", BAD_BATCHES)
def test_bad_batch_files_are_named(env, tmp_path, capsys, content, message):
    batch = tmp_path / "bad.jsonl"
    batch.write_text(content, encoding="utf-8")
    rc = main(["generate", "--model", env.model, "--batch", str(batch), "--adapters-dir", str(env.adapters)])
    err = capsys.readouterr().err
    assert rc == 2 and "softprompt generate: error: " in err and f"{batch}{message}" in err


def test_bad_adapters_and_prompts_are_clear_errors(env, tmp_path, capsys):
    cases = [
        (["--adapter", str(env.root / "missing"), "hi"], f"adapter folder not found: {env.root / 'missing'}"),
        (
            ["--adapter", str(env.root / "small"), "hi"],
            f"{env.root / 'small'}: adapter hidden size 16 does not fit the base model {env.model} (hidden size 32)",
        ),
        (
            ["x" * 600],
            "prompt too long: 0 virtual tokens + 620 prompt tokens + max_new_tokens 128 = 748 exceeds "
            "the model's context of 512 tokens",
        ),
        (["--greedy", "--temperature", "0.5", "hi"], "--greedy and --temperature cannot be combined"),
        ([], "nothing to answer: give an INSTRUCTION or --batch FILE.jsonl"),
    ]
    for extra, message in cases:
        assert main(["generate", "--model", env.model, *extra]) == 2
        assert message in capsys.readouterr().err
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"instruction": "x", "adapter": "alpha"}\n')
    assert main(["generate", "--model", env.model, "--batch", str(batch)]) == 2
    assert f"{batch}:1: names adapter 'alpha' but no --adapters-dir was given" in capsys.readouterr().err
    assert main(["generate", "--model", env.model, "--greedy", "--max-new-tokens", "4", "--truncate", "x" * 600]) == 0


def test_chat_loop_with_piped_stdin(env):
    engine = build_engine(env.base)
    name = add_adapter(engine, env.adapters / "alpha")
    conversation = Conversation(engine, name, {"temperature": 0.0, "top_k": 0, "top_p": 1.0}, 10)
    stdin, stdout, stderr = (
        io.StringIO("hello there\n\n/reset\nwhy is the sky blue\n/quit\nnever read\n"),
        io.StringIO(),
        io.StringIO(),
    )
    assert chat_loop(conversation, stdin, stdout, stderr) == 0
    expected = [answer(env, "hello there", "alpha"), answer(env, "why is the sky blue", "alpha")]
    assert stdout.getvalue() == "".join(a + "\n" for a in expected)
    assert "(conversation cleared)" in stderr.getvalue()
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"]


def test_chat_template_conversation_keeps_turns(env):
    engine = build_engine(env.base, chat_template=True)
    conversation = Conversation(engine, None, {"temperature": 0.0, "top_k": 0, "top_p": 1.0}, 6)
    first = conversation.reply("hi", io.StringIO())
    request = conversation.request("and then?")
    expected = env.base.tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "and then?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert request.prompt_ids == encode_text(env.base.tokenizer, expected)


def test_chat_cli_reads_stdin(env):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "softprompt",
            "chat",
            "--model",
            env.model,
            "--adapter",
            str(env.adapters / "alpha"),
            "--greedy",
            "--max-new-tokens",
            "10",
            "--dtype",
            "float32",
        ],  # the reference below is fp32
        input="hello there\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == answer(env, "hello there", "alpha") + "\n"


@pytest.mark.slow
def test_default_model_answers_and_matches_no_cache_loop(default_base):
    text = generate(
        "What is the capital of France?", base=default_base, chat_template=True, greedy=True, max_new_tokens=16
    )
    assert "Paris" in text
    engine = build_engine(default_base)
    adapter = random_adapter(5, hidden=default_base.hidden_size, seed=0)
    adapter.embeddings.mul_(0.02)  # about the scale of the model's token embeddings
    engine.add_adapter("p", adapter)
    ids = engine.encode("Name a colour.", adapter="p")
    result = engine.generate([GenerationRequest(ids, adapter="p", max_new_tokens=6)])[0]
    assert result.token_ids == reference_greedy(default_base, adapter.embeddings, ids, 6)[0]
    # A mixed batch (adapter and base rows, different prompt lengths) gives each row's solo output.
    rows = [("Name a colour.", "p"), ("Write one sentence about the sea and the sky.", None), ("Hi", "p")]
    requests = [GenerationRequest(engine.encode(t, adapter=a), adapter=a, max_new_tokens=6) for t, a in rows]
    together = [r.token_ids for r in engine.generate(requests, batch_size=3)]
    assert together == [engine.generate([r])[0].token_ids for r in requests]
    assert together[0] == result.token_ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error(env, capsys):
    assert main(["generate", "--model", env.model, "--device", "cuda", "hi"]) == 2
    assert "device 'cuda' was requested but CUDA is not available here" in capsys.readouterr().err


@pytest.mark.slow
def test_streamed_pieces_never_split_a_character_with_a_byte_level_tokenizer(default_base):
    from softprompt.inference.detokenize import Detokenizer

    text = "Café 你好世界 😀 naïve — done."
    ids = encode_text(default_base.tokenizer, text)
    detok = Detokenizer(default_base.tokenizer, stop=["done"])
    pieces = [detok.push(i)[0] for i in ids]
    assert all("\ufffd" not in p for p in pieces) and len([p for p in pieces if p]) > 5
    assert "".join(pieces) == text[: text.index("done")] and detok.text == text[: text.index("done")]


def test_adapter_written_by_peft_uses_the_reference_template(env, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    wrapped = peft.get_peft_model(reload_tiny(env.model).model, config)
    with torch.no_grad():
        wrapped.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    wrapped.save_pretrained(tmp_path / "peft-adapter")
    assert not (tmp_path / "peft-adapter" / "softprompt.json").exists()
    prompt = load_adapter(tmp_path / "peft-adapter").embeddings
    ids = encode_text(env.base.tokenizer, Template().prompt("tell me about cats", "", env.base.tokenizer))
    tokens, _ = reference_greedy(env.base, prompt, ids, 10)
    got = generate(
        "tell me about cats", base=env.base, adapter=tmp_path / "peft-adapter", greedy=True, max_new_tokens=10
    )
    assert got == env.base.tokenizer.decode(tokens, skip_special_tokens=True)


def test_cli_logprobs_prints_the_answer_and_its_log_probabilities(env, capsys):
    """`generate INSTRUCTION --logprobs N` prints one JSON record: the answer generate gives, and per generated token
    its text, id, log-probability and N alternatives, equal to generate_batch's; the tokens spell the answer."""
    adapter = str(env.adapters / "alpha")
    code = main(["generate", "tell me", "--model", env.model, "--adapter", adapter, "--greedy", "--max-new-tokens",
                 "6", "--logprobs", "2", "--dtype", "float32"])  # fmt: skip
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    expected = generate("tell me", base=env.base, adapter=adapter, greedy=True, max_new_tokens=6)
    assert record["output"] == expected
    entries = record["logprobs"]
    assert "".join(e["token"] for e in entries) == record["output"]
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["id"] == e["id"] for e in entries)  # greedy
    assert all(e["logprob"] == e["top_logprobs"][0]["logprob"] <= 0 for e in entries)
    (api,) = generate_batch([{"instruction": "tell me"}], base=env.base, adapter=adapter, greedy=True,
                            max_new_tokens=6, logprobs=2)  # fmt: skip
    assert api["logprobs"] == entries


def test_logprobs_range_is_checked_before_the_model_loads(capsys):
    assert main(["generate", "hi", "--logprobs", "21", "--model", "/nonexistent"]) == 2
    assert capsys.readouterr().err.strip() == "softprompt generate: error: --logprobs must be <= 20, got 21"
