"""Sharing common prefixes exactly: text every row of a step starts with joins the soft prompt's shared prefix
(training: same loss and same prompt gradient as the full rows, for every method); rank classification runs each
record's prompt once and scores its choices from that cache (same scores as one full sequence per choice)."""

import pytest
import torch

from softprompt.core import forward
from softprompt.core.prompt import build_prompt
from softprompt.data import batching
from softprompt.training import scoring

METHODS = {
    "prompt": {},
    "prefix": {},
    "prefix-proj": {"prefix_projection": True},
    "ptuning": {},
    "ptuning-lstm": {"encoder_type": "lstm"},
    "cartridge": {"num_frozen_tokens": 1},
}


def _examples(tiny, shared: int, tails: list[int], answers: list[int], seed: int = 0) -> list[batching.Example]:
    """Examples that start with the same `shared` prompt tokens, then a prompt tail and an answer of their own."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tiny.tokenizer)
    head = torch.randint(5, vocab, (shared,), generator=g).tolist()
    out = []
    for tail, answer in zip(tails, answers):
        prompt = head + torch.randint(5, vocab, (tail,), generator=g).tolist()
        target = torch.randint(5, vocab, (answer,), generator=g).tolist()
        out.append(batching.Example(prompt + target, [-100] * len(prompt) + target, "x"))
    return out


def _nll_and_grad(tiny, module, batches, share: bool):
    """Summed NLL per row and the gradient of the summed loss w.r.t. every trainable tensor, over micro-batches as
    training runs them (one SharedPrefix per step in kv mode)."""
    module.zero_grad(set_to_none=True)
    examples = [e for b in batches for e in b]
    virtual = module.virtual()
    shared = batching.shared_prompt_length(examples) if share else 0
    text = torch.tensor(examples[0].ids[:shared]) if shared else None
    prefix = forward.SharedPrefix(tiny.model, virtual, text)
    assert prefix.length == virtual.num_virtual_tokens + shared
    nlls = []
    for micro in batches:
        batch = batching.collate([e.after(shared) for e in micro], tiny.tokenizer.pad_token_id)
        nll, count = forward.label_nll(
            tiny.model, virtual, batch["input_ids"], batch["attention_mask"], batch["labels"], prefix=prefix
        )
        assert torch.equal(count, torch.tensor([e.label_count for e in micro]))
        nll.sum().backward()
        nlls.append(nll.detach())
    prefix.backward()
    return torch.cat(nlls), [p.grad.clone() for p in module.parameters()]


def test_shared_prompt_length():
    ex = lambda ids, n_prompt: batching.Example(ids, [-100] * n_prompt + ids[n_prompt:], "x")
    assert batching.shared_prompt_length([ex([1, 2, 3, 4], 3), ex([1, 2, 5, 6], 3)]) == 2
    assert batching.shared_prompt_length([ex([1, 2, 3, 4], 3), ex([1, 2, 3, 4], 3)]) == 3  # answers are not shared
    assert batching.shared_prompt_length([ex([1, 2, 3, 4], 1), ex([1, 2, 3, 5], 3)]) == 1  # a label ends it
    assert batching.shared_prompt_length([ex([1, 2], 2), ex([1, 2, 3], 3)]) == 1  # one token of each is left
    assert batching.shared_prompt_length([ex([7, 2, 3], 2), ex([1, 2, 3], 2)]) == 0
    assert batching.shared_prompt_length([ex([1, 2, 3], 2)]) == 0
    e = ex([1, 2, 3, 4], 3)
    assert e.after(2).ids == [3, 4] and e.after(2).labels == [-100, 4] and e.after(0) is e


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shared_text_gives_the_loss_and_gradient_of_the_full_rows(tiny, name):
    module = build_prompt(tiny, name.split("-")[0], "random", 3, seed=1, **METHODS[name])
    examples = _examples(tiny, shared=6, tails=[3, 0, 5, 2, 1], answers=[2, 4, 1, 3, 2])
    assert batching.shared_prompt_length(examples) == 6
    batches = [examples[:2], examples[2:3], examples[3:]]
    full_nll, full_grads = _nll_and_grad(tiny, module, batches, share=False)
    nll, grads = _nll_and_grad(tiny, module, batches, share=True)
    assert torch.allclose(nll, full_nll, atol=1e-5), (nll, full_nll)
    for grad, full in zip(grads, full_grads):
        assert full.abs().sum() > 0
        assert torch.allclose(grad, full, atol=1e-6, rtol=1e-4), (grad - full).abs().max()


def test_shared_text_equals_the_concat_forward(tiny):
    """An independent path: the textbook [prompt ; text] concatenation, every row whole."""
    module = build_prompt(tiny, "prompt", "random", 4, seed=2)
    examples = _examples(tiny, shared=5, tails=[2, 4, 0], answers=[3, 1, 2], seed=3)
    batch = batching.collate(examples, tiny.tokenizer.pad_token_id)
    expected, _ = forward.label_nll(
        tiny.model, module.virtual(), batch["input_ids"], batch["attention_mask"], batch["labels"], mode="concat"
    )
    (grad_expected,) = torch.autograd.grad(expected.sum(), module.embeddings)
    nll, (grad,) = _nll_and_grad(tiny, module, [examples], share=True)
    assert torch.allclose(nll, expected.detach(), atol=1e-5)
    assert torch.allclose(grad, grad_expected, atol=1e-6, rtol=1e-4)


def test_training_runs_virtual_tokens_and_shared_text_in_one_pass(tiny, monkeypatch):
    """With gradients, input-embedding virtual tokens and the shared text run in one batch-1 pass (scoring keeps two):
    the same keys/values and last hidden state as the two passes, to fp32 rounding."""
    module = build_prompt(tiny, "prompt", "random", 4, seed=2)
    text = torch.tensor(_examples(tiny, shared=5, tails=[1], answers=[1], seed=3)[0].ids[:5])
    passes = []
    run_body = forward.run_body
    monkeypatch.setattr(forward, "run_body", lambda model, embeds, *a, **k: passes.append(embeds.shape[1])
                        or run_body(model, embeds, *a, **k))  # fmt: skip
    trained = forward.SharedPrefix(tiny.model, module.virtual(), text)
    assert passes == [4 + 5] and trained.length == 9
    with torch.no_grad():
        scored = forward.SharedPrefix(tiny.model, module.virtual(), text)
    assert passes == [9, 4, 5] and scored.length == 9
    assert torch.allclose(trained.last, scored.last, atol=1e-6)
    for (k, v), (k2, v2) in zip(trained.kv, scored.kv):
        assert k.shape == k2.shape and torch.allclose(k, k2, atol=1e-6) and torch.allclose(v, v2, atol=1e-6)


def test_shared_text_without_a_prompt_scores_like_the_plain_model(tiny):
    examples = _examples(tiny, shared=4, tails=[1, 3], answers=[2, 2], seed=4)
    batch = batching.collate(examples, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        expected, _ = forward.label_nll(tiny.model, None, batch["input_ids"], batch["attention_mask"], batch["labels"])
        prefix = forward.SharedPrefix(tiny.model, None, torch.tensor(examples[0].ids[:4]))
        rest = batching.collate([e.after(4) for e in examples], tiny.tokenizer.pad_token_id)
        nll, _ = forward.label_nll(
            tiny.model, None, rest["input_ids"], rest["attention_mask"], rest["labels"], prefix=prefix
        )
    assert torch.allclose(nll, expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs a prompt or shared text"):
        forward.SharedPrefix(tiny.model, None)


def _one_by_one(tiny, virtual, examples):
    """The straightforward way: each example alone, as one full sequence."""
    out = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.ids])
            nll, count = forward.label_nll(tiny.model, virtual, ids, torch.ones_like(ids), torch.tensor([e.labels]))
            out.append((float(nll[0]), int(count[0])))
    return torch.tensor([n for n, _ in out], dtype=torch.float64), torch.tensor([c for _, c in out])


def _choice_examples(tiny, records: int, choices: list[list[int]], seed: int = 5, common: int = 3):
    """Record-major (record, choice) examples: a record's prompt (own length, after `common` tokens every record
    starts with) then each choice."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tiny.tokenizer)
    start = torch.randint(5, vocab, (common,), generator=g).tolist()
    out = []
    for r in range(records):
        prompt = start + [5 + r] + torch.randint(5, vocab, ((r * 7) % 9,), generator=g).tolist()
        for choice in choices:
            out.append(batching.Example(prompt + choice, [-100] * len(prompt) + choice, f"r{r}"))
    return out


@pytest.mark.parametrize("name", [None, "prompt", "prefix", "ptuning"])
@pytest.mark.parametrize("max_tokens,max_rows,common", [(4096, None, 3), (40, 2, 3), (4096, None, 0)])
def test_grouped_choice_scoring_equals_full_sequences(tiny, name, max_tokens, max_rows, common):
    virtual = build_prompt(tiny, name, "random", 3, seed=1).virtual() if name else None
    # choices of different lengths, two sharing their first token (which is learned, so it is not shared)
    choices = [[7, 8, 1], [7, 9, 1], [10, 1], [11, 12, 13, 1], [14, 1], [15, 16, 1]]
    examples = _choice_examples(tiny, 7, choices, common=common)
    expected, expected_counts = _one_by_one(tiny, virtual, examples)
    nll, counts = scoring.nll_per_group(
        tiny.model, virtual, examples, len(choices), tiny.tokenizer.pad_token_id, max_tokens, max_rows
    )
    assert torch.equal(counts, expected_counts)
    assert torch.allclose(nll, expected, atol=1e-4, rtol=1e-5), (nll - expected).abs().max()
    picked = nll.view(7, len(choices)).argmin(1)
    assert torch.equal(picked, expected.view(7, len(choices)).argmin(1))
    plain, _ = scoring.nll_per_example(tiny.model, virtual, examples, tiny.tokenizer.pad_token_id, max_tokens, max_rows)
    assert torch.allclose(plain, expected, atol=1e-4, rtol=1e-5)


def test_grouped_scoring_without_a_common_prompt_falls_back(tiny):
    a = batching.Example([5, 6, 7], [-100, 6, 7], "a")
    b = batching.Example([8, 6, 7], [-100, 6, 7], "b")
    expected, _ = _one_by_one(tiny, None, [a, b, a, b])
    nll, _ = scoring.nll_per_group(tiny.model, None, [a, b, a, b], 2, tiny.tokenizer.pad_token_id, 4096)
    assert torch.allclose(nll, expected, atol=1e-4)
    with pytest.raises(ValueError, match="groups of 3"):
        scoring.nll_per_group(tiny.model, None, [a, b], 3, tiny.tokenizer.pad_token_id, 4096)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_with_shared_text_equals_training_without(tmp_path, monkeypatch, name):
    from train_helpers import config, trainable_base

    from softprompt.formats.adapter import load_adapter
    from softprompt.training.loop import train

    base = trainable_base()
    records = [
        {
            "instruction": "Is this sentence about colours? Answer yes or no.",
            "input": word,
            "output": "yes" if i % 2 else "no",
        }
        for i, word in enumerate(["red", "blue", "house", "tree", "pink", "cyan", "car", "dog"] * 2)
    ]
    sizes = []
    real = batching.shared_prompt_length
    monkeypatch.setattr(batching, "shared_prompt_length", lambda ex: sizes.append(real(ex)) or sizes[-1])
    method = name.split("-")[0]
    options = dict(data=records, method=method, max_steps=3, auto_label_words=False, **METHODS[name])
    shared = train(config(tmp_path / "shared", base, **options))
    assert min(sizes) >= len("Human: Is this sentence about colours? Answer yes or no.\n")
    monkeypatch.setattr(batching, "shared_prompt_length", lambda ex: 0)
    whole = train(config(tmp_path / "whole", base, **options))
    assert shared.train_loss == pytest.approx(whole.train_loss, rel=1e-5)
    a, b = load_adapter(tmp_path / "shared").embeddings, load_adapter(tmp_path / "whole").embeddings
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_eval_rank_classification_matches_the_full_sequence_way(tiny, tmp_path, monkeypatch):
    from softprompt.data.templates import Template
    from softprompt.evaluation import evaluate as evaluate_module
    from softprompt.evaluation.config import EvalConfig
    from softprompt.formats.adapter import save_adapter

    g = torch.Generator().manual_seed(3)
    path = save_adapter(
        tmp_path / "a",
        torch.randn(4, tiny.hidden_size, generator=g) * 0.5,
        tiny,
        template=Template("Which class is {instruction}? "),
    )
    choices = ["abbreviation", "description", "entity", "human", "location", "number"]
    records = [
        {"instruction": w, "output": choices[i % 6]}
        for i, w in enumerate(["red", "blue", "a long question here", "cyan", "teal", "x", "gray", "why is the sky"])
    ]
    grouped = evaluate_module.evaluate(EvalConfig(records, tiny, [path], choices=choices, max_new_tokens=0))["results"][
        0
    ]
    calls = []
    monkeypatch.setattr(
        evaluate_module,
        "nll_per_group",
        lambda model, prompt, examples, group, *a: (
            calls.append(1) or scoring.nll_per_example(model, prompt, examples, *a)
        ),
    )
    full = evaluate_module.evaluate(EvalConfig(records, tiny, [path], choices=choices, max_new_tokens=0))["results"][0]
    assert calls
    assert grouped["accuracy"] == full["accuracy"]
    assert [e["choice"] for e in grouped["examples"]] == [e["choice"] for e in full["examples"]]
    assert grouped["loss"] == pytest.approx(full["loss"], rel=1e-5)
