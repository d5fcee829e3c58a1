import json
import math

import pytest
import torch
from helpers import text_logits

from softprompt import cli, evaluate
from softprompt.data.records import DataError
from softprompt.data.templates import Template, encode_text
from softprompt.evaluation.evaluate import format_examples, format_table
from softprompt.evaluation.rouge import exact_match, lcs_length, rouge_l, tokenize
from softprompt.formats.adapter import load_adapter, save_adapter

TEMPLATE = "Q: {instruction} {input} A:"


def oracle_nll(base, prompt, template, record, answer):
    """Summed NLL of answer + EOS after the prompt, from full logits of the concatenated sequence (an independent
    path: textbook concatenation, LM head everywhere, log-softmax by hand)."""
    tok = base.tokenizer
    p_ids = encode_text(tok, template.prompt(record["instruction"], record.get("input", ""), tok))
    a_ids = encode_text(tok, template.target(answer, tok))
    ids = torch.tensor([p_ids + a_ids])
    logits = text_logits(base.model, prompt, ids, torch.ones_like(ids), mode="concat")[0]
    logp = logits.log_softmax(-1)
    return -sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(a_ids))


def oracle_greedy(base, template, record, steps):
    tok = base.tokenizer
    ids = encode_text(tok, template.prompt(record["instruction"], record.get("input", ""), tok))
    out = []
    for _ in range(steps):
        t = torch.tensor([ids + out])
        nxt = int(text_logits(base.model, None, t, torch.ones_like(t))[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def random_adapter(base, path, template=TEMPLATE, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, base.hidden_size, generator=g) * 0.5
    return save_adapter(path, emb, base, template=Template(template), label_words=["ab", "ac"])


RECORDS = [{"instruction": w, "input": "", "output": "ab"} for w in ["red", "blue", "pink", "cyan", "teal", "gray"]]


def test_rank_classification_scores_full_choice_sequences(tiny, tmp_path):
    # "ab" and "ac" share their first token (character tokenizer): only the second token can separate them.
    template = Template(TEMPLATE)
    path = random_adapter(tiny, tmp_path / "a")
    emb = load_adapter(path).embeddings
    prefs = []
    for r in RECORDS:
        ab, ac = (oracle_nll(tiny, emb, template, r, c) for c in ("ab", "ac"))
        assert abs(ab - ac) > 1e-4  # the full sequences differ although the first tokens are the same
        prefs.append("ab" if ab < ac else "ac")
    # Gold = the oracle's choice for the first four records, the other choice for the last two: accuracy 4/6.
    records = [
        dict(r, output=p if i < 4 else ({"ab": "ac", "ac": "ab"}[p])) for i, (r, p) in enumerate(zip(RECORDS, prefs))
    ]
    report = evaluate(records, tiny, [path], choices=["ab", "ac"], max_new_tokens=0)
    (result,) = report["results"]
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert [e["choice"] for e in result["examples"]] == prefs
    assert result["template"] == TEMPLATE  # the adapter's saved template, not the reference one
    # Loss = mean NLL per answer token (2 characters + EOS each) over the records' gold answers.
    total = sum(oracle_nll(tiny, emb, template, r, r["output"]) for r in records)
    assert result["loss"] == pytest.approx(total / (3 * len(records)), rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)


def test_base_uses_the_adapter_template_and_compare_base_comes_first(tiny, tmp_path):
    path = random_adapter(tiny, tmp_path / "a")
    report = evaluate(RECORDS[:3], tiny, [path], compare_base=True, max_new_tokens=0, batch_size=2)
    base, tuned = report["results"]
    assert base["adapter"] is None and tuned["adapter"] == str(path)
    assert base["template"] == TEMPLATE
    total = sum(oracle_nll(tiny, None, Template(TEMPLATE), r, r["output"]) for r in RECORDS[:3])
    assert base["loss"] == pytest.approx(total / 9, rel=1e-4)
    reference = evaluate(RECORDS[:3], tiny, [], template="human-assistant", max_new_tokens=0)["results"][0]
    assert reference["loss"] != pytest.approx(base["loss"], rel=1e-3)


def test_greedy_exact_match_and_rouge(tiny):
    template = Template("Q: {instruction}")  # the random tiny model repeats the last character: distinct answers
    greedy = [oracle_greedy(tiny, template, r, 4) for r in RECORDS[:4]]
    assert len(set(greedy)) == 4 and all(greedy), greedy
    records = [dict(r, output=g if i % 2 == 0 else "zz qq") for i, (r, g) in enumerate(zip(RECORDS, greedy))]
    result = evaluate(records, tiny, max_new_tokens=4, batch_size=3, template=template.spec)["results"][0]
    assert [e["generation"] for e in result["examples"]] == greedy
    assert result["exact_match"] == 0.5
    expected = sum(rouge_l(g, r["output"]) for g, r in zip(greedy, records)) / 4
    assert result["rouge_l"] == pytest.approx(expected)
    assert "accuracy" not in result


def test_rouge_l_known_values():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("The cat", "the cat") == 1.0
    assert rouge_l("dog", "cat") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "cat") == 0.0
    assert tokenize("你好, world") == ["你", "好", ",", "world"]
    assert rouge_l("你好世界", "你好") == pytest.approx(2 / 3)  # characters: LCS 2, P 2/4, R 1
    assert exact_match(" Positive. ", "positive") and not exact_match("positive!", "positive")


def test_errors_name_the_record(tiny):
    bad = RECORDS[:2] + [{"instruction": "x", "output": "maybe"}]
    with pytest.raises(DataError, match=r"<records>: record 2: the answer 'maybe' is not one of the choices"):
        evaluate(bad, tiny, choices="ab,ac", max_new_tokens=0)
    report = evaluate(RECORDS[:2] + [{"instruction": "x", "output": ""}], tiny, max_new_tokens=0, skip_bad=True)
    assert report["n"] == 2 and report["skipped"] == ["<records>: record 2: field 'output' is empty"]
    with pytest.raises(
        ValueError, match=r"--label-field needs label words: pass --choices \(or an adapter saved with label words\)"
    ):
        evaluate([{"sentence": "x", "label": 1}], tiny, fields="instruction=sentence", label_field="label")
    with pytest.raises(ValueError, match="--choices needs at least 2 non-empty comma-separated words"):
        evaluate(RECORDS, tiny, choices="ab")


def test_label_field_uses_the_adapter_label_words(tiny, tmp_path):
    path = random_adapter(tiny, tmp_path / "a")
    rows = [{"sentence": "red", "label": 0}, {"sentence": "blue", "label": 1}]
    result = evaluate(rows, tiny, [path], fields="instruction=sentence", label_field="label", max_new_tokens=0)[
        "results"
    ][0]
    assert [e["output"] for e in result["examples"]] == ["ab", "ac"]


def test_cli_json_schema_and_table(tiny, tiny_dir, tmp_path, capsys):
    path = random_adapter(tiny, tmp_path / "a")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "m" / "eval.json"
    argv = [
        "eval",
        "--data",
        str(data),
        "--model",
        str(tiny_dir),
        "--adapter",
        str(path),
        "--compare-base",
        "--choices",
        "ab,ac",
        "--json",
        str(out),
        "--no-progress",
        "--batch-size",
        "4",
    ]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["adapter"] for r in report["results"]] == [None, str(path)]
    for r in report["results"]:
        assert r["n"] == len(RECORDS)
        assert {"loss", "perplexity", "accuracy", "exact_match"} <= set(r)
    assert report["max_new_tokens"] == 4  # longest choice (2 tokens) + 2
    header = text.splitlines()[1].split()
    assert header == ["metric", "base", str(path)]
    assert "accuracy (rank classification)" in text and "examples:" in text


def test_table_and_examples_format():
    results = [
        {
            "adapter": None,
            "n": 2,
            "loss": 1.5,
            "accuracy": 0.5,
            "examples": [
                {"where": "f:1", "instruction": "hi", "input": "", "output": "x", "generation": "y", "choice": "x"}
            ]
            * 2,
        },
        {
            "adapter": "run/a",
            "n": 2,
            "loss": 0.25,
            "accuracy": 1.0,
            "examples": [
                {"where": "f:1", "instruction": "hi", "input": "", "output": "x", "generation": "x", "choice": "x"}
            ]
            * 2,
        },
    ]
    table = format_table(results, ["before", "after"]).splitlines()
    assert table[0].split() == ["metric", "before", "after"]
    assert table[2].split() == ["n", "2", "2"]
    assert table[3].split() == ["loss", "(answer", "tokens)", "1.5000", "0.2500"]
    assert table[4].split()[-2:] == ["50.0%", "100.0%"]
    text = format_examples(results, 1, ["before", "after"])
    assert text.splitlines() == [
        "[f:1] hi",
        "    expected: 'x'",
        "    before: 'y' (ranked choice: x)",
        "    after: 'x' (ranked choice: x)",
    ]
    results[0]["examples"][0] = dict(results[0]["examples"][0], generation="y" * 500)
    long_line = format_examples(results, 1, ["before", "after"]).splitlines()[2]
    assert long_line == "    before: '" + "y" * 155 + "...' (ranked choice: x)"


def test_max_length_defaults_to_the_context_less_the_virtual_tokens(tiny, tmp_path):
    path = random_adapter(tiny, tmp_path / "a")  # 3 virtual tokens; the tiny model's context is 512
    fits = [{"instruction": "y" * 480, "input": "", "output": "ab"}]
    assert evaluate(fits, tiny, [path], choices="ab,ac", max_new_tokens=0)["n"] == 1
    long = [{"instruction": "y" * 520, "input": "", "output": "ab"}]
    with pytest.raises(
        DataError,
        match=r"<records>: record 0: the prompt alone is 527 tokens, which fills "
        r"max_length=509; raise --max-length",
    ):
        evaluate(long, tiny, [path], choices="ab,ac", max_new_tokens=0)
