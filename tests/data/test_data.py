"""Record loading, field mapping, label words, bad-input messages, batching."""

import csv
import json

import pytest
import torch

from softprompt.data import batching
from softprompt.data.records import DataError, Fields, load_records, split_holdout
from softprompt.data.templates import Template

ROWS = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Greet", "output": "hi"}]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_all_formats_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    full = [{**r, "input": r.get("input", "")} for r in ROWS]
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    with open(tmp_path / "d.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(full)
    pq.write_table(pa.Table.from_pylist(full), tmp_path / "d.parquet")
    Dataset.from_list(full).save_to_disk(str(tmp_path / "disk"))
    for source in ["d.jsonl", "d.json", "d.csv", "d.parquet", "disk"]:
        recs = load_records(tmp_path / source)
        assert [(r.instruction, r.input, r.output) for r in recs.items] == [("Add", "1 2", "3"), ("Greet", "", "hi")]
    assert load_records(ROWS).items[1].where == "<records>: record 1"
    assert load_records(tmp_path / "d.jsonl").items[1].where == f"{tmp_path / 'd.jsonl'}:2"


def test_field_mapping_and_label_words(tmp_path):
    path = write_jsonl(
        tmp_path / "sst.jsonl", [{"sentence": "great film", "label": 1}, {"sentence": "dull", "label": 0}]
    )
    recs = load_records(path, "instruction=sentence,output=label", ["negative", "positive"])
    assert [(r.instruction, r.output) for r in recs.items] == [("great film", "positive"), ("dull", "negative")]
    assert Fields.parse({"instruction": "q"}) == Fields("q", "input", "output")
    with pytest.raises(DataError, match="unknown field role"):
        Fields.parse("question=q")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"sentence": "x", "label": 2}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: label 2 in field 'label' is out of range for 2 label words"):
        load_records(bad, "instruction=sentence,output=label", ["negative", "positive"])


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '],
            r"d.jsonl:2: malformed JSON: Expecting value \(column 32\)",
        ),
        (
            ['{"instruction": "a", "output": "b"}', "", '{"instruction": "a"}'],
            r"d.jsonl:3: missing field 'output' \(the output; fields present: instruction\)",
        ),
        (['{"instruction": 5, "output": "b"}'], r"d.jsonl:1: field 'instruction' must be a string, got int 5"),
        (["[1, 2]"], r"d.jsonl:1: expected a JSON object with fields, got list"),
        (['{"instruction": "  ", "output": "b"}'], r"d.jsonl:1: field 'instruction' is empty"),
        ([], r"d.jsonl: no usable records"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_skip_bad_counts_and_reports(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"instruction": "a", "output": "b"}', "{oops", '{"instruction": "c"}'])
    recs = load_records(path, skip_bad=True)
    assert len(recs) == 1
    assert len(recs.skipped) == 2 and recs.skipped[0].startswith(f"{path}:2: malformed JSON")
    assert "d.jsonl:3: missing field 'output'" in recs.skipped[1]
    only_bad = write_jsonl(tmp_path / "e.jsonl", ["{oops"])
    with pytest.raises(DataError, match=r"e.jsonl: no usable records \(1 skipped as bad\)"):
        load_records(only_bad, skip_bad=True)


def test_other_format_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown data format '.txt'"):
        load_records(tmp_path / "d.txt")
    (tmp_path / "d.json").write_text('{"instruction": "a"}')
    with pytest.raises(DataError, match="expected a JSON array of records"):
        load_records(tmp_path / "d.json")
    (tmp_path / "e.json").write_text('[\n{"instruction": "a",\n}]')
    with pytest.raises(DataError, match=r"e.json:3: malformed JSON"):
        load_records(tmp_path / "e.json")
    (tmp_path / "d.csv").write_text("instruction,output\nhello\n")
    with pytest.raises(DataError, match=r"d.csv:2: missing field 'output'"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk folder"):
        load_records(tmp_path / "empty")


def test_holdout_is_disjoint_and_seeded():
    recs = load_records([{"instruction": str(i), "output": "x"} for i in range(20)])
    train, held = split_holdout(recs, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert {r.instruction for r in train.items}.isdisjoint({r.instruction for r in held.items})
    assert [r.instruction for r in split_holdout(recs, 0.25, seed=3)[1].items] == [r.instruction for r in held.items]
    with pytest.raises(DataError, match="too few to hold out"):
        split_holdout(load_records(ROWS[:1]), 0.5, 0)


def test_prompt_filling_max_length_names_the_record(tiny, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "short", "output": "ok"}, {"instruction": "x" * 80, "output": "ok"}]
    )
    recs = load_records(path)
    with pytest.raises(DataError, match=r"d.jsonl:2: the prompt alone is \d+ tokens, which fills max_length=40"):
        batching.encode_records(recs.items, tiny.tokenizer, Template(), 40)
    examples, skipped, _ = batching.encode_records(recs.items, tiny.tokenizer, Template(), 40, skip_bad=True)
    assert len(examples) == 1 and skipped[0].startswith(f"{path}:2:")


def test_balanced_plan_keeps_the_class_proportions_in_every_step():
    classes = [0] * 30 + [1] * 10 + [2] * 20  # 3 : 1 : 2
    plan = batching.balanced_plan(classes, 6, seed=3, epoch=0)
    assert sorted(i for step in plan for i in step) == list(range(60))
    assert all(sorted(classes[i] for i in step) == [0, 0, 0, 1, 2, 2] for step in plan)
    assert plan == batching.balanced_plan(classes, 6, seed=3, epoch=0)
    assert plan != batching.balanced_plan(classes, 6, seed=3, epoch=1)
    lengths = [1 + (i % 7) for i in range(60)]  # the length-grouped plan mixes classes far less evenly
    grouped = batching.epoch_plan(lengths, 6, seed=3, epoch=0)
    assert any(sorted(classes[i] for i in step) != [0, 0, 0, 1, 2, 2] for step in grouped)


def test_plan_shard_and_micro_batches():
    lengths = [5, 50, 7, 48, 6, 52, 9, 30, 31, 8]
    plan = batching.epoch_plan(lengths, 4, seed=1, epoch=0)
    assert sorted(i for step in plan for i in step) == list(range(10))
    assert plan == batching.epoch_plan(lengths, 4, seed=1, epoch=0)
    assert plan != batching.epoch_plan(lengths, 4, seed=1, epoch=1)
    step = [0, 1, 2, 3, 4, 5]
    parts = [batching.shard(step, lengths, r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(step)
    micro = batching.micro_batches(step, lengths, max_tokens=110)
    assert sorted(i for m in micro for i in m) == sorted(step)
    assert all(max(lengths[i] for i in m) * len(m) <= 110 for m in micro)


def test_collate_pads_right_and_masks_labels():
    a = batching.Example([1, 2, 3], [-100, 2, 3], "a")
    b = batching.Example([4], [4], "b")
    batch = batching.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["labels"].dtype == torch.long
