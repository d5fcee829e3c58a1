"""Prompt scoring (echo with logprobs): several prompts scored in one batched forward get the values each gets alone
— bit for bit in bf16 (row-exact mode), to rounding in fp32 — whatever their adapters, lengths and slice phases; and
alone, the values are the no-cache model's log-softmax."""

import random

import pytest
import torch
from engine_helpers import base, dtype, random_adapter  # noqa: F401 (fixtures)

from softprompt.core.forward import lm_logits, run_body
from softprompt.inference.engine import Engine
from softprompt.inference.scoring import SCORE_SLICE, PromptScorer, advance_together

WORDS = ["tell", "me", "about", "cats", "a", "long", "story", "why", "sky", "blue", "你好", "2+2=?"]


@pytest.fixture(scope="module")
def engine(base):
    return Engine(base, {"a3": random_adapter(3, seed=1), "a9": random_adapter(9, seed=2)})


def prompt(engine, rng, words: int) -> list[int]:
    return engine.encode(" ".join(rng.choice(WORDS) for _ in range(words)))


def scorer(engine, adapter, ids, top_n=2):
    entry = None if adapter is None else engine.prompt_cache.entry(adapter)
    return PromptScorer(engine.base, entry, ids, top_n)


def fields(entries) -> list[tuple]:
    return [(e.token_id, e.logprob, e.top) for e in entries]


def alone(engine, adapter, ids, top_n=2):
    one = scorer(engine, adapter, ids, top_n)
    while not one.advance():
        pass
    return one.result


def test_batched_scoring_equals_each_prompt_alone(engine, dtype):
    rng = random.Random(0)
    # lengths across slice boundaries (SCORE_SLICE = 128): short, exactly one slice, one token more, several slices
    cases = [(None, 3), ("a3", 40), ("a9", 60), (None, 45), ("a3", 90), ("a9", 2)]
    prompts = [(adapter, prompt(engine, rng, words)) for adapter, words in cases]
    prompts.append(("a3", prompts[1][1][:1] * (SCORE_SLICE + 1)))
    prompts += [(None, prompts[0][1][:5]), ("a9", prompts[0][1][:1])]  # a few tokens; one token (nothing to score)
    assert any(len(ids) > 2 * SCORE_SLICE for _, ids in prompts) and any(len(ids) < 16 for _, ids in prompts)
    scorers = [scorer(engine, adapter, ids) for adapter, ids in prompts]
    ticks = 0
    while not all(advance_together(scorers)):
        ticks += 1
    assert ticks == max(-(-len(ids) // SCORE_SLICE) for _, ids in prompts) - 1
    for (adapter, ids), together in zip(prompts, scorers):
        reference = alone(engine, adapter, ids)
        assert [e.token_id for e in together.result] == ids
        if dtype != torch.float32:
            assert fields(together.result) == fields(reference)  # every logprob and every top entry, bit for bit
        else:
            assert [e.logprob for e in together.result[1:]] == pytest.approx(
                [e.logprob for e in reference[1:]], rel=1e-5, abs=1e-5
            )


def test_scorers_at_different_slices_batch_together(engine, dtype):
    """A long prompt halfway through joins short new ones in one forward; each still equals its run alone."""
    rng = random.Random(1)
    long_ids = prompt(engine, rng, 80)
    first = scorer(engine, "a9", long_ids)
    assert not first.advance()
    late = [scorer(engine, a, prompt(engine, rng, w)) for a, w in [("a3", 5), (None, 30)]]
    group = [first] + late
    while not all(advance_together(group)):
        pass
    for one, adapter in zip(group, ["a9", "a3", None]):
        reference = alone(engine, adapter, one.ids)
        got = [e.logprob for e in one.result[1:]]
        want = [e.logprob for e in reference[1:]]
        assert got == want if dtype != torch.float32 else got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_alone_the_scores_are_the_models_log_softmax(engine, base, dtype):
    if dtype != torch.float32:
        pytest.skip("the one-pass reference rounds differently in bf16; bf16's promise is batch invariance (above)")
    ids = prompt(engine, random.Random(2), 50)
    result = alone(engine, None, ids, top_n=3)
    with torch.no_grad():
        tokens = torch.tensor([ids], device=base.device)
        embeds = base.model.get_input_embeddings()(tokens)
        mask = torch.ones_like(tokens)
        hidden, _ = run_body(base.model, embeds, mask, torch.arange(len(ids), device=base.device).unsqueeze(0))
        logp = torch.log_softmax(lm_logits(base.model, hidden[0]).float(), dim=-1)
    assert result[0].logprob is None and len(result) == len(ids)
    for t in range(1, len(ids)):
        assert result[t].logprob == pytest.approx(float(logp[t - 1, ids[t]]), abs=1e-4)
        assert [i for i, _ in result[t].top] == torch.topk(logp[t - 1], 3).indices.tolist()
