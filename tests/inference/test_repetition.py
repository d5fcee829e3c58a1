"""Anti-repetition decoding (--repetition-penalty, --no-repeat-ngram-size) and eval's loop share: the formulas, the
engine applying them per row (greedy output equal to a no-cache loop that applies them), the verbs' flags."""

import json
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import peaked_base, random_adapter

from softprompt import evaluate
from softprompt.cli import main
from softprompt.core.forward import lm_logits, run_body
from softprompt.inference.batch import GenerationRequest, fit_prompt
from softprompt.inference.engine import Engine
from softprompt.inference.sampling import banned_ngram_tokens, is_looping, process_logits


def rules(**kw) -> SimpleNamespace:
    values = dict(
        repetition_penalty=1.0, no_repeat_ngram_size=0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None
    )
    return SimpleNamespace(**{**values, **kw})


def test_repetition_penalty_and_ngram_ban_formulas():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    out = process_logits(logits, rules(repetition_penalty=2.0), [0, 1, 1])
    assert torch.equal(out, torch.tensor([1.0, -2.0, 0.5, 3.0, -2.0, 1.0]))  # only generated tokens change
    assert sorted(banned_ngram_tokens([5, 1, 2, 5, 1, 3, 5, 1], 3)) == [2, 3]
    assert banned_ngram_tokens([5, 1, 2], 3) == [] and sorted(banned_ngram_tokens([4, 2, 4], 1)) == [2, 4]
    out = process_logits(logits, rules(no_repeat_ngram_size=2), [3, 5, 3])  # "3 5" seen: 5 may not follow 3
    assert out[5] == float("-inf") and torch.equal(out[:5], logits[:5])
    assert torch.equal(process_logits(logits, rules(no_repeat_ngram_size=2), [3]), logits)


def test_loop_definition():
    loop = [7, 8, 9] * 11  # 33 tokens, period 3
    assert is_looping(loop, True) and not is_looping(loop, False)  # a finished (EOS) answer is not stuck
    assert not is_looping(list(range(40)), True)
    assert not is_looping([1, 2] * 10, True)  # shorter than the 32-token window
    assert is_looping(list(range(17)) * 2, False) is False and not is_looping(list(range(17)) * 2, True)  # period 17
    assert is_looping(list(range(100, 140)) + list(range(16)) * 2, True)  # period 16 over the last 32


@torch.no_grad()
def reference_penalised(base, prompt, ids, steps, request):
    """Greedy by re-running [soft prompt ; tokens so far] from scratch, applying process_logits at every step."""
    model, ids, out = base.model, list(ids), []
    for _ in range(steps):
        embeds = model.get_input_embeddings()(torch.tensor([ids]))
        embeds = torch.cat([prompt.unsqueeze(0), embeds], dim=1)
        length = embeds.shape[1]
        hidden, _ = run_body(model, embeds, torch.ones(1, length, dtype=torch.long), torch.arange(length).unsqueeze(0))
        token = int(process_logits(lm_logits(model, hidden[:, -1])[0], request, out).argmax())
        out.append(token)
        ids.append(token)
    return out


def test_engine_applies_them_per_row_alone_and_in_a_mixed_batch():
    torch.manual_seed(0)
    base = peaked_base()
    adapter = random_adapter(3, seed=1)
    engine = Engine(base, {"a": adapter})
    eos = base.tokenizer.eos_token_id

    def request(i, **kw):
        ids = base.tokenizer("aaaa bbb"[: 4 + i], add_special_tokens=False)["input_ids"]
        return GenerationRequest(ids, adapter="a", max_new_tokens=24, logit_bias={eos: -100.0}, **kw)

    settings = [
        dict(repetition_penalty=3.0),
        dict(no_repeat_ngram_size=1),
        dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
    ]
    for i, kw in enumerate(settings):
        plain = engine.generate([request(i)])[0].token_ids
        alone = engine.generate([request(i, **kw)])[0].token_ids
        assert alone != plain  # the options change this answer, so the comparisons below can fail
        assert alone == reference_penalised(base, adapter.embeddings, request(i).prompt_ids, 24, request(i, **kw))
        mixed = engine.generate([request(0), request(i, **kw), request(2)], batch_size=3)
        assert mixed[1].token_ids == alone and mixed[0].token_ids == engine.generate([request(0)])[0].token_ids
    banned = engine.generate([request(0, no_repeat_ngram_size=2)])[0].token_ids
    pairs = list(zip(banned, banned[1:]))
    assert len(pairs) == len(set(pairs))  # no bigram twice


def test_eval_reports_the_loop_share_and_takes_the_flags(tiny, tiny_dir, tmp_path):
    records = [{"instruction": w, "input": "", "output": "abc"} for w in ("aaaa", "bbbb", "cccc", "dd")]
    plain = evaluate(records, tiny, [], max_new_tokens=40)["results"][0]
    assert plain["looping"] == 1.0  # this tiny model repeats one token forever
    assert evaluate(records, tiny, [], max_new_tokens=40, no_repeat_ngram_size=1)["results"][0]["looping"] == 0.0
    assert "looping" not in evaluate(records, tiny, [], max_new_tokens=0)["results"][0]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (
        main(
            [
                "eval",
                "--data",
                str(data),
                "--model",
                str(tiny_dir),
                "--max-new-tokens",
                "40",
                "--dtype",
                "float32",
                "--no-repeat-ngram-size",
                "2",
                "--json",
                str(tmp_path / "r.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"][0]["looping"] == 0.0
    assert (
        main(
            [
                "generate",
                "hi",
                "--model",
                str(tiny_dir),
                "--greedy",
                "--max-new-tokens",
                "12",
                "--no-repeat-ngram-size",
                "1",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )


def test_out_of_range_values_are_refused_in_one_place(capsys):
    assert main(["generate", "hi", "--repetition-penalty", "0"]) == 2
    assert "softprompt generate: error: --repetition-penalty must be >= 0.5, got 0" in capsys.readouterr().err
    assert main(["eval", "--data", "x.jsonl", "--no-repeat-ngram-size", "65"]) == 2
    assert "softprompt eval: error: --no-repeat-ngram-size must be <= 64, got 65" in capsys.readouterr().err
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):  # requests built in Python too
        fit_prompt(GenerationRequest([1], repetition_penalty=0.0), 0, None)
