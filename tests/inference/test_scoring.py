"""Prompt scoring (echo with logprobs): several prompts scored in one batched forward get the values each gets alone
— bit for bit in bf16 (row-exact mode), to rounding in fp32 — whatever their adapters, lengths and slice phases; and
alone, the values are the no-cache model's log-softmax."""

import random

import pytest
import torch
from engine_helpers import base, dtype, random_adapter  # noqa: F401 (fixtures)

from softprompt.core.forward import lm_logits, run_body
from softprompt.inference.batch import DecodeBatch, GenerationRequest
from softprompt.inference.engine import Engine
from softprompt.inference.prefix_cache import PrefixCache
from softprompt.inference.scoring import SCORE_SLICE, PromptScorer, advance_together, share_starts

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


def test_prompts_that_begin_alike_share_their_start_and_score_as_alone(engine, dtype):
    """The choices of one question (one context, several answers) and prompts of other adapters: the context's
    block-aligned start runs once (at most one slice of it), and every prompt's values are those it gets alone (bf16:
    bit for bit)."""
    from softprompt.inference.scoring import share_starts

    rng = random.Random(2)
    context, long_context = prompt(engine, rng, 12), prompt(engine, rng, 45)
    answers = [prompt(engine, rng, w) for w in (5, 3, 2)]
    answers[2] = answers[0] + prompt(engine, rng, 8)  # two choices that begin alike: a start within a start
    prompts = [("a3", context + a) for a in answers] + [("a9", context + answers[0]), (None, context + answers[1])]
    prompts += [(None, context + answers[2]), (None, context[:10] + answers[0]), ("a3", context[:5])]
    prompts += [("a9", long_context + a) for a in answers[:2]]
    scorers = [scorer(engine, adapter, ids) for adapter, ids in prompts]
    start = _common(prompts[0][1], prompts[1][1]) // 16 * 16  # a3's choices; two of them share more
    longer = _common(prompts[0][1], prompts[2][1]) // 16 * 16
    base_start = _common(prompts[4][1], prompts[5][1]) // 16 * 16
    assert 32 <= start < longer < SCORE_SLICE and len(long_context) > SCORE_SLICE
    # a3: the context's start for its three choices (two of them through their longer common start); the base
    # model's two choices: their start once; a9's long context: only its first slice
    assert share_starts(scorers) == start * 2 + (longer - start) + base_start + SCORE_SLICE
    assert [s.done for s in scorers] == [longer, start, longer, 0, base_start, base_start, 0, 0] + [SCORE_SLICE] * 2
    while not all(advance_together(scorers)):
        pass
    for (adapter, ids), together in zip(prompts, scorers):
        reference = alone(engine, adapter, ids)
        assert [e.token_id for e in together.result] == ids
        if dtype != torch.float32:
            assert fields(together.result) == fields(reference)
        else:
            assert [e.logprob for e in together.result[1:]] == pytest.approx(
                [e.logprob for e in reference[1:]], rel=1e-5, abs=1e-5
            )


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_questions_that_share_an_instruction_run_it_once(engine, dtype):
    """Two questions with two choices each after one instruction: the instruction's start runs once (a branching
    point no prompt ends at), each question's context once on top of it, and every value equals the prompt alone."""
    from softprompt.inference.scoring import share_starts

    rng = random.Random(3)
    instruction = prompt(engine, rng, 5)
    questions = [instruction + prompt(engine, rng, 12), instruction + prompt(engine, rng, 8)]
    choices = [prompt(engine, rng, 1), prompt(engine, rng, 2)]
    prompts = [q + c for q in questions for c in choices]
    scorers = [scorer(engine, "a9", ids) for ids in prompts]
    block = 16
    first = _common(*questions) // block * block  # the instruction (and maybe a word more)
    starts = [_common(*prompts[:2]) // block * block, _common(*prompts[2:]) // block * block]  # each question
    assert 0 < first < min(starts) and max(starts) < SCORE_SLICE
    # run alone: every prompt whole; shared: the instruction's start once, each context's rest once, then the answers
    assert share_starts(scorers) == sum(starts) * 2 - (first + sum(s - first for s in starts))
    assert [s.done for s in scorers] == [starts[0], starts[0], starts[1], starts[1]]
    while not all(advance_together(scorers)):
        pass
    for ids, together in zip(prompts, scorers):
        reference = alone(engine, "a9", ids)
        if dtype != torch.float32:
            assert fields(together.result) == fields(reference)
        else:
            assert [e.logprob for e in together.result[1:]] == pytest.approx(
                [e.logprob for e in reference[1:]], rel=1e-5, abs=1e-5
            )


def _decode(engine, requests, steps: int, prefix_cache=None):
    """Each request's tokens and per-step logits over `steps` decode steps of one DecodeBatch (keep_logits)."""
    batch = DecodeBatch(engine.base, engine.prompt_cache, keep_logits=True, prefix_cache=prefix_cache)
    out = {id(r): ([], []) for r in requests}
    events = batch.add(requests)
    for _ in range(steps):
        for event in events:
            out[id(event.request)][0].append(event.token_id)
            out[id(event.request)][1].append(event.logits)
        if not len(batch):
            break
        events = batch.step()
    return [out[id(r)] for r in requests]


def test_a_generation_continuing_a_scored_prompt_equals_its_own_prefill(engine, dtype):
    """A scored prompt's keys/values and last hidden state, handed to the generation that continues it
    (GenerationRequest.prefilled), give the tokens and logits of the generation's own prefill — bit for bit in
    bf16 — across slice boundaries, adapters, a one-token prompt, a shared start, and a prefix cache; the prefix
    cache then holds the same blocks."""
    rng = random.Random(4)
    cases = [(None, 3), ("a3", 40), ("a9", 75)]
    prompts = [(adapter, prompt(engine, rng, words)) for adapter, words in cases]
    prompts += [("a3", prompts[1][1][:16]), ("a3", prompts[1][1][:17])]  # one block; one token more
    prompts.append((None, prompts[0][1][:1]))
    prompts.append(("a9", prompts[2][1][:1] * (SCORE_SLICE + 3)))
    prompts.append(("a9", prompts[2][1][:40] + prompts[0][1]))  # begins as prompts[2]: shares its start
    assert any(len(ids) > SCORE_SLICE for _, ids in prompts) and any(len(ids) == 1 for _, ids in prompts)
    scorers = [scorer(engine, adapter, ids) for adapter, ids in prompts]
    for s in scorers:
        s.hand_overs = 1
    assert share_starts(scorers) > 0
    while not all(advance_together(scorers)):
        pass

    def requests(prefilled: bool):
        return [
            GenerationRequest(ids, adapter, max_new_tokens=6, prefilled=s.take_prefilled() if prefilled else None)
            for (adapter, ids), s in zip(prompts, scorers)
        ]

    handed, caches = requests(True), [PrefixCache(1 << 24), PrefixCache(1 << 24)]
    assert all(r.prefilled is not None for r in handed) and all(s.kv is None for s in scorers)  # let go after
    got = _decode(engine, handed, 6, caches[0])
    assert all(r.prefilled is None for r in handed)  # the batch took them
    want = _decode(engine, requests(False), 6, caches[1])
    for (tokens, logits), (ref_tokens, ref_logits) in zip(got, want):
        assert tokens == ref_tokens
        if dtype != torch.float32:
            assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits))
        else:
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(logits, ref_logits))
    assert caches[0].stats().blocks == caches[1].stats().blocks > 0
    for adapter, ids in prompts:
        owner = engine.prompt_cache.identity(adapter)
        found = [cache.match(owner, ids + [0]) for cache in caches]  # every full block of the prompt
        assert (found[0] is None) == (found[1] is None) == (len(ids) < 16)
        if found[0] is not None and dtype != torch.float32:
            assert torch.equal(found[0], found[1])


def test_a_prefilled_state_that_does_not_match_is_not_taken(engine, dtype):
    """A prefilled state of other tokens or another adapter is ignored: the request runs its own prefill."""
    rng = random.Random(5)
    ids = prompt(engine, rng, 10)
    s = scorer(engine, "a3", ids)
    s.hand_overs = 3
    while not s.advance():
        pass
    cases = [
        GenerationRequest(ids[:-1], "a3", max_new_tokens=3, prefilled=s.take_prefilled()),
        GenerationRequest(ids, "a9", max_new_tokens=3, prefilled=s.take_prefilled()),
        GenerationRequest(ids, None, max_new_tokens=3, prefilled=s.take_prefilled()),
    ]
    got = _decode(engine, cases, 3)
    want = _decode(engine, [GenerationRequest(r.prompt_ids, r.adapter, max_new_tokens=3) for r in cases], 3)
    for (tokens, logits), (ref_tokens, ref_logits) in zip(got, want):
        assert tokens == ref_tokens
        assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits))


def test_prompts_asking_for_different_top_n_score_together_as_alone(engine, dtype):
    """One forward's LM head runs over all its prompts' rows, per top_n asked: each prompt's values, top entries
    included, are those it gets alone (bit for bit in bf16)."""
    rng = random.Random(6)
    asked = [(None, 0, 12), ("a3", 1, 30), ("a9", 3, 7), (None, 1, 50), ("a3", 0, 3)]
    prompts = [(adapter, top_n, prompt(engine, rng, words)) for adapter, top_n, words in asked]
    scorers = [scorer(engine, adapter, ids, top_n) for adapter, top_n, ids in prompts]
    while not all(advance_together(scorers)):
        pass
    for (adapter, top_n, ids), together in zip(prompts, scorers):
        reference = alone(engine, adapter, ids, top_n)
        assert [len(e.top) for e in together.result[1:]] == [top_n] * (len(ids) - 1)
        if dtype != torch.float32:
            assert fields(together.result) == fields(reference)
        else:
            assert [e.logprob for e in together.result[1:]] == pytest.approx(
                [e.logprob for e in reference[1:]], rel=1e-5, abs=1e-5
            )
