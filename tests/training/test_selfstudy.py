"""Self-study (--method cartridge --corpus FILE): the corpus checks, chunking, the distillation loss against a direct
computation, the teacher's targets (a cartridge holding the chunk's own keys/values matches them exactly), the
synthetic-data file written beside the adapter and reused, an exact resume, and a loss that falls."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import Crash, torchrun, train_until, trainable_base

from softprompt.core import forward
from softprompt.core.prompt import prefill_kv
from softprompt.data.corpus import chunk_ids, read_corpus
from softprompt.data.records import DataError
from softprompt.data.templates import Template
from softprompt.formats import checkpoint
from softprompt.formats.adapter import load_adapter
from softprompt.training import loop as train_module
from softprompt.training import selfstudy
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train

CORPUS = (
    "The lighthouse on Gull Rock was built in 1871 by the harbour board.\n\n"
    "Its lamp burned whale oil until 1902, then kerosene, and was electrified in 1948.\n\n"
    "## Keepers\n\nThree families kept the light: the Orrs, the Lindqvists and the Baileys.\n"
)


@pytest.fixture(scope="module")
def base():
    return trainable_base()


def corpus_config(tmp_path, out, base, **overrides) -> TrainConfig:
    path = tmp_path / "corpus.md"
    if not path.exists():
        path.write_text(CORPUS, encoding="utf-8")
    values = dict(
        corpus=str(path),
        out=str(out),
        model=base,
        method="cartridge",
        num_virtual_tokens=8,
        chunk_tokens=96,
        selfstudy_conversations=3,
        selfstudy_max_tokens=12,
        top_k=8,
        lr=0.1,
        batch_size=3,
        max_steps=8,
        save_every=4,
        log_every=1,
        progress=False,
        max_batch_tokens=256,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_bad_corpus_files_are_refused_in_one_line_naming_the_file(tmp_path, base):
    cases = [
        ("empty.txt", b"", "--corpus {p}: the file is empty"),
        ("blank.md", b"  \n\n\t\n", "--corpus {p}: the file is empty"),
        (
            "image.png",
            b"\x89PN\x00G\r\n",
            "--corpus {p}: a binary file, not text (a NUL byte at byte 3); give a plain-text or Markdown file",
        ),
        (
            "latin1.txt",
            "first line\nna\xefve\n".encode("latin-1"),
            "{p}:2: not valid Unicode: byte 0xef at column 3 is not UTF-8; save the file as UTF-8",
        ),
    ]
    for name, content, message in cases:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as err:
            train(corpus_config(tmp_path, tmp_path / "out", base, corpus=str(path)))
        assert str(err.value) == message.format(p=path)
        assert "\n" not in str(err.value)
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError) as err:
        read_corpus(missing)
    assert str(err.value) == f"--corpus {missing}: cannot read: No such file or directory"
    assert read_corpus(tmp_path / "corpus.md") == CORPUS


def test_corpus_options_are_checked(tmp_path):
    def make(**kw):
        return TrainConfig(out="x", **kw)

    cases = [
        ({}, r"give --data \(training records\) or --corpus \(self-study, --method cartridge\)"),
        ({"corpus": "c.txt"}, r"--corpus is for --method cartridge \(this run has --method prompt\)"),
        ({"corpus": "c.txt", "data": "d.jsonl", "method": "cartridge"}, "give --data or --corpus, not both"),
        (
            {"corpus": "c.txt", "method": "cartridge", "eval_fraction": 0.1},
            r"--eval-data / --eval-fraction are for --data",
        ),
        ({"corpus": "c.txt", "method": "cartridge", "top_k": 0}, "--top-k must be >= 1, got 0"),
        ({"corpus": "c.txt", "method": "cartridge", "chunk_tokens": 8}, "--chunk-tokens must be >= 16, got 8"),
        (
            {"corpus": "c.txt", "method": "cartridge", "selfstudy_conversations": 0},
            "--selfstudy-conversations must be >= 1, got 0",
        ),
        (
            {"corpus": "c.txt", "method": "cartridge", "selfstudy_max_tokens": 2},
            "--selfstudy-max-tokens must be >= 4, got 2",
        ),
        (
            {"corpus": "c.txt", "method": "cartridge", "selfstudy_temperature": 2.5},
            "--selfstudy-temperature must be <= 2, got 2.5",
        ),
        ({"corpus": "c.txt", "method": "cartridge", "selfstudy_top_p": 0.0}, "--selfstudy-top-p must be > 0, got 0"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            make(**kw)


def test_self_study_has_its_own_default_lr():
    corpus = TrainConfig(out="x", corpus="c.txt", method="cartridge")
    data = TrainConfig(out="x", data="d.jsonl", method="cartridge")
    assert (corpus.peak_lr, data.peak_lr) == (0.01, 0.03)
    assert TrainConfig(out="x", corpus="c.txt", method="cartridge", lr=0.2).peak_lr == 0.2


def test_chunks_fit_the_budget_or_are_refused(tmp_path, base):
    assert chunk_ids(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_ids(list(range(8)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(
        DataError, match=r"--chunk-tokens 500 \+ a conversation .* more than the model's context of 512"
    ):
        train(corpus_config(tmp_path, tmp_path / "o", base, chunk_tokens=500))


def test_topk_kl_is_the_renormalised_kl_computed_directly():
    torch.manual_seed(0)
    logits = torch.randn(5, 30) * 3
    teacher = torch.log_softmax(torch.randn(5, 30) * 2, dim=-1)
    values, ids = teacher.topk(4, dim=-1)
    got = forward.topk_kl(logits, ids, values)
    for n in range(5):
        q = [math.exp(v) for v in values[n].double().tolist()]
        q = [x / sum(q) for x in q]
        row = logits[n].double()
        log_z = math.log(sum(math.exp(x) for x in row.tolist()))
        p = [row[i].item() - log_z for i in ids[n].tolist()]
        expected = sum(qi * (math.log(qi) - pi) for qi, pi in zip(q, p))
        assert abs(got[n].item() - expected) < 1e-5
    # zero when the student puts exactly the renormalised top-k on those tokens and nothing elsewhere
    exact = torch.full((1, 30), -1e9)
    exact[0, ids[0]] = values[0]
    assert forward.topk_kl(exact, ids[:1], values[:1]).abs().item() < 1e-6


def test_the_teacher_is_the_chunk_in_context(tmp_path, base):
    """A cartridge holding the chunk's own keys/values is the teacher: with every token in the top-k the
    distillation loss is zero (to rounding), so the targets line up with the student's positions."""
    template = Template("human-assistant")
    chunks = chunk_ids(base.tokenizer(CORPUS, add_special_tokens=False)["input_ids"], 64)
    conversations = [
        selfstudy.Conversation(0, "question", "When was it built?", "In 1871."),
        selfstudy.Conversation(0, "quote", "Quote the lamp sentence.", "Its lamp burned whale oil."),
    ]
    vocab = base.model.get_input_embeddings().weight.shape[0]
    data = selfstudy.distil_targets(base, template, chunks, conversations, top_k=vocab)
    context = torch.tensor(selfstudy.context_ids(base, chunks[0]))
    kv = prefill_kv(base, base.model.get_input_embeddings()(context).detach())
    batch = {
        k: v for k, v in zip(("ids", "labels"), ([e.ids for e in data.examples], [e.labels for e in data.examples]))
    }
    width = max(len(r) for r in batch["ids"])
    pad = lambda rows, value: torch.tensor([r + [value] * (width - len(r)) for r in rows])  # noqa: E731
    ids, labels = pad(batch["ids"], 0), pad(batch["labels"], -100)
    mask = pad([[1] * len(r) for r in batch["ids"]], 0)
    teacher_ids = torch.nn.utils.rnn.pad_sequence([t.long() for t in data.teacher_ids], batch_first=True)
    teacher_lps = torch.nn.utils.rnn.pad_sequence(data.teacher_logprobs, batch_first=True)
    with torch.no_grad():
        kl, counts = forward.label_kl(
            base.model, forward.Virtual(kv, "cartridge"), ids, mask, labels, teacher_ids, teacher_lps
        )
    assert counts.tolist() == [len(e) - 1 for e in data.examples]
    assert kl.abs().max().item() < 1e-4
    # and a cartridge of other keys/values is not
    with torch.no_grad():
        off, _ = forward.label_kl(
            base.model, forward.Virtual(kv[:4], "cartridge"), ids, mask, labels, teacher_ids, teacher_lps
        )
    assert (off / counts).min().item() > 1e-3


def test_a_run_saves_its_data_reuses_it_and_the_loss_falls(tmp_path, base, monkeypatch):
    result = train(corpus_config(tmp_path, tmp_path / "run", base))
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("kind", "train") == "train" and "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert (out / "loss_curve.png").exists() and (out / selfstudy.DATA_FILE).exists()
    texts = [json.loads(line) for line in (out / selfstudy.TEXT_FILE).read_text(encoding="utf-8").splitlines()]
    assert [t["kind"] for t in texts] == ["question", "summary", "quote"] * 3  # 3 chunks of 96 characters
    assert [t["chunk"] for t in texts] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(t["question"] and isinstance(t["answer"], str) for t in texts)
    adapter = load_adapter(result.adapter_dir, base)
    assert adapter.method == "cartridge" and adapter.embeddings.shape[0] == 8
    # the cartridge started from the corpus's first 8 tokens (the text prefill), and trained
    first = torch.tensor(base.tokenizer(CORPUS)["input_ids"][:8])
    start = prefill_kv(base, base.model.get_input_embeddings()(first).detach())
    assert torch.equal(adapter.embeddings[:1], start[:1]) and not torch.equal(adapter.embeddings, start)
    # the same settings into another folder holding the file: nothing is generated again, the same cartridge comes out
    again = tmp_path / "again"
    again.mkdir()
    (again / selfstudy.DATA_FILE).write_bytes((out / selfstudy.DATA_FILE).read_bytes())

    def no_generation(*args, **kwargs):
        raise AssertionError("self-study data was generated again")

    monkeypatch.setattr(selfstudy, "synthesise", no_generation)
    second = train(corpus_config(tmp_path, again, base))
    assert torch.equal(load_adapter(second.adapter_dir).embeddings, adapter.embeddings)
    # the same seed writes the same conversations; another seed other ones
    monkeypatch.undo()
    data = selfstudy.load(out / selfstudy.DATA_FILE)
    fresh = selfstudy.synthesise(
        base, Template("human-assistant"), [data.examples[0].ids[:40]], 2, corpus_config(tmp_path, out, base), 0
    )
    repeat = selfstudy.synthesise(
        base, Template("human-assistant"), [data.examples[0].ids[:40]], 2, corpus_config(tmp_path, out, base), 0
    )
    other = selfstudy.synthesise(
        base, Template("human-assistant"), [data.examples[0].ids[:40]], 2, corpus_config(tmp_path, out, base), 1
    )
    assert fresh == repeat and fresh != other
    # temperature 0: greedy turns, the same conversations whatever the seed; the settings record the sampling
    greedy = corpus_config(tmp_path, out, base, selfstudy_temperature=0.0)
    chunk = [data.examples[0].ids[:40]]
    template = Template("human-assistant")
    assert selfstudy.synthesise(base, template, chunk, 2, greedy, 0) == selfstudy.synthesise(
        base, template, chunk, 2, greedy, 1
    )
    wanted = selfstudy.settings(greedy, base, template, CORPUS)
    assert (wanted["temperature"], wanted["top_p"]) == (0.0, 0.95)


def test_resume_equals_an_uninterrupted_run(tmp_path, base, monkeypatch):
    whole = train(corpus_config(tmp_path, tmp_path / "whole", base))
    train_until(corpus_config(tmp_path, tmp_path / "cut", base), monkeypatch, 5)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "cut")] == ["step-000004"]

    def no_generation(*args, **kwargs):
        raise AssertionError("a resume generated its data again")

    monkeypatch.setattr(selfstudy, "synthesise", no_generation)
    resumed = train(corpus_config(tmp_path, tmp_path / "cut", base, resume=str(tmp_path / "cut")))
    assert resumed.steps == whole.steps == 8
    assert torch.equal(load_adapter(whole.adapter_dir).embeddings, load_adapter(resumed.adapter_dir).embeddings)
    # a resume whose settings differ from the saved data's is refused, naming what differs
    with pytest.raises(DataError, match=r"selfstudy.safetensors: made with other settings than this run \(top_k\)"):
        train(corpus_config(tmp_path, tmp_path / "cut", base, top_k=4, resume=str(tmp_path / "cut")))


def test_the_command_line_says_the_same_in_one_line(tmp_path, capsys):
    from softprompt.cli import main

    binary = tmp_path / "b.txt"
    binary.write_bytes(b"ab\x00cd")
    cases = [
        (["--out", str(tmp_path / "o")], "give --data (training records) or --corpus (self-study, --method cartridge)"),
        (
            ["--out", str(tmp_path / "o"), "--method", "cartridge", "--corpus", str(binary)],
            f"--corpus {binary}: a binary file, not text (a NUL byte at byte 2); give a plain-text or Markdown file",
        ),
    ]
    for argv, message in cases:
        assert main(["train", *argv]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert lines == [f"softprompt train: error: {message}"]


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from train_helpers import trainable_base
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train
train(TrainConfig(corpus={corpus!r}, out={out!r}, model=trainable_base(), method="cartridge", num_virtual_tokens=8,
                  chunk_tokens=96, selfstudy_conversations=3, selfstudy_max_tokens=12, top_k=8, lr=0.1, batch_size=2,
                  max_steps=4, progress=False, max_batch_tokens=256, threads=1))
"""


def test_two_processes_match_one_at_the_same_global_batch(tmp_path, base):
    """torchrun with 2 processes: the main process writes the self-study data, the other reuses it, and the
    cartridge equals a one-process run's at the same global batch (2 x 2 = 4 conversations a step)."""
    corpus = tmp_path / "corpus.md"
    corpus.write_text(CORPUS, encoding="utf-8")
    script = tmp_path / "ddp.py"
    tests = str(Path(__file__).parents[1])
    script.write_text(DDP_SCRIPT.format(tests=tests, corpus=str(corpus), out=str(tmp_path / "two")))
    run = torchrun(script)
    assert "2 process(es), 4 records/step" in run.stdout
    assert run.stdout.count("conversations about 3 chunk(s)") == 1  # printed by the main process only
    one = train(corpus_config(tmp_path, tmp_path / "one", base, batch_size=4, max_steps=4))
    two = load_adapter(tmp_path / "two").embeddings
    assert torch.allclose(load_adapter(one.adapter_dir).embeddings, two, atol=1e-5)
    first = torch.tensor(base.tokenizer(CORPUS)["input_ids"][:8])
    assert not torch.equal(two, prefill_kv(base, base.model.get_input_embeddings()(first).detach()))
    # the same conversations in both runs (seeded sampling), so the same file
    texts = [(tmp_path / run / selfstudy.TEXT_FILE).read_text(encoding="utf-8") for run in ("one", "two")]
    assert texts[0] == texts[1]
