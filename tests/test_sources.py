"""Reading every source format, row numbering, validation with quarantine and strict mode."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safedpo_ray.data.pipeline import DataError, read_splits, validate_rows, write_quarantine
from safedpo_ray.data.sources import SourceError, prompt_in_eval, read_rows
from safedpo_ray.config.training import DataConfig

GOOD = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
        "is_response_1_safe": False, "better_response_id": 1, "safer_response_id": 0, "severity": 2}


def rows_with_bad():
    return [
        GOOD,
        {**GOOD, "better_response_id": 2},
        {k: v for k, v in GOOD.items() if k != "response_1"},
        {**GOOD, "response_1": "a"},
        {**GOOD, "prompt": "  "},
        {**GOOD, "is_response_0_safe": "yes"},
    ]


def test_jsonl_numbers_lines_and_keeps_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in rows_with_bad()] + ["{not json", "[1, 2]"]
    path.write_text("\n".join(lines) + "\n")
    rows = read_rows(str(path))
    assert [r["row_number"] for r in rows] == list(range(1, 9))
    v = validate_rows(rows, split="train")
    assert [r["pair_id"] for r in v.rows] == [1]
    reasons = {q["row_number"]: " ".join(q["reasons"]) for q in v.quarantined}
    assert "better_response_id" in reasons[2] and "0 or 1" in reasons[2]
    assert "missing field 'response_1'" in reasons[3]
    assert "identical" in reasons[4]
    assert "prompt" in reasons[5] and "empty" in reasons[5]
    assert "is_response_0_safe" in reasons[6]
    assert "not valid JSON" in reasons[7] and "not an object" in reasons[8]
    assert v.rows_read == 8 and len(v.quarantined) == 7
    q = tmp_path / "q.jsonl"
    write_quarantine(q, v.quarantined)
    saved = [json.loads(l) for l in q.open()]
    assert [s["row_number"] for s in saved] == [2, 3, 4, 5, 6, 7, 8]
    assert saved[0]["row"]["better_response_id"] == 2  # the bad row itself is kept, nothing lost


def test_strict_mode_stops_at_first_bad_row():
    rows = [{**r, "row_number": i} for i, r in enumerate(rows_with_bad(), start=1)]
    with pytest.raises(DataError, match="row 2: field 'better_response_id'"):
        validate_rows(rows, strict=True)


def test_extra_columns_kept_as_json():
    v = validate_rows([{**GOOD, "row_number": 1}])
    assert json.loads(v.rows[0]["extra"]) == {"severity": 2}


def test_json_csv_parquet(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([GOOD, GOOD]))
    assert [r["row_number"] for r in read_rows(str(tmp_path / "d.json"))] == [1, 2]
    (tmp_path / "w.json").write_text(json.dumps({"data": [GOOD]}))
    assert len(read_rows(str(tmp_path / "w.json"))) == 1
    csv_text = ("prompt,response_0,response_1,is_response_0_safe,is_response_1_safe,better_response_id,safer_response_id\n"
                "p,a,b,True,false,1,0\n" "q,a,b,True,maybe,1,0\n")
    (tmp_path / "d.csv").write_text(csv_text)
    rows = read_rows(str(tmp_path / "d.csv"))
    assert rows[0]["is_response_0_safe"] is True and rows[0]["better_response_id"] == 1
    v = validate_rows(rows)
    assert len(v.rows) == 1 and "is_response_1_safe" in v.quarantined[0]["reasons"][0]
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "safer_response_id": 5}]), tmp_path / "d.parquet")
    v = validate_rows(read_rows(str(tmp_path / "d.parquet")))
    assert len(v.rows) == 1 and v.quarantined[0]["row_number"] == 2


def test_pairwise_schema_is_detected_and_converted():
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "chosen_unsafe": True, "rejected_unsafe": False,
             "row_number": 1}]
    v = validate_rows(rows)
    r = v.rows[0]
    assert (r["response_0"], r["is_response_0_safe"], r["better_response_id"], r["safer_response_id"]) == ("c", False, 0, 1)


def test_unrecognised_schema_names_missing_columns():
    with pytest.raises(DataError, match="missing"):
        validate_rows([{"prompt": "p", "answer": "a", "row_number": 1}])


def test_bad_sources(tmp_path):
    with pytest.raises(SourceError, match="not a file and not a hub dataset id"):
        read_rows("no_such_file.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(SourceError, match="unknown file type"):
        read_rows(str(tmp_path / "d.txt"))


def test_hub_path_reads_through_datasets(tmp_path, monkeypatch):
    """A hub id goes through datasets.load_dataset(id, split=...); here the id is served from a
    local dataset repository directory, the same call a user's hub id takes."""
    import datasets

    repo = tmp_path / "PKU-Alignment" / "PKU-SafeRLHF-30K"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    (repo / "data" / "test.jsonl").write_text(json.dumps(GOOD) + "\n")
    real = datasets.load_dataset
    calls = []

    def local_hub(name, subset=None, split=None, **kw):
        calls.append((name, split) if subset is None else (name, subset, split))
        return real(str(tmp_path / name), split=split, **kw)

    monkeypatch.setattr(datasets, "load_dataset", local_hub)
    cfg = DataConfig(source="PKU-Alignment/PKU-SafeRLHF-30K", eval_split="test")
    train, held = read_splits(cfg, seed=0)
    assert calls == [("PKU-Alignment/PKU-SafeRLHF-30K", "train"), ("PKU-Alignment/PKU-SafeRLHF-30K", "test")]
    assert len(train) == 2 and len(held) == 1 and train[1]["row_number"] == 2
    calls.clear()
    read_splits(DataConfig(source="PKU-Alignment/PKU-SafeRLHF-30K", subset="default", eval_split="test"), seed=0)
    assert calls[0] == ("PKU-Alignment/PKU-SafeRLHF-30K", "default", "train")


def test_eval_fraction_splits_by_prompt(tmp_path):
    rows = [{**GOOD, "prompt": f"prompt {i}"} for i in range(400)] * 2
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, held = read_splits(DataConfig(source=str(path), eval_fraction=0.1), seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert 40 < len(held) < 120 and len(train) + len(held) == 800
    assert prompt_in_eval("x", 0.0) is False
