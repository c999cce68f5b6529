"""Bad training data end to end: what each kind of bad input costs, and that it costs nothing more.

Most checks run the pipeline's per-chunk work (`process_chunk`) and the driver's counting (`Tally`)
without Ray, on files written from a hypothesis-drawn mix of good and bad rows: every bad row is
quarantined with its file, row number and reason; every good row's pair reaches the output with
its text; accepted + discarded + quarantined = rows read, per split; one chunk or many gives the
same result. A few runs go through `prepare` on the session Ray (`ray_local`) and through the CLI
(exit 2, one line, and no Ray for a whole-file problem).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safedpo_ray.cli.main import main as cli_main
from safedpo_ray.config.training import load_config
from safedpo_ray.data.files import BOM, SourceError
from safedpo_ray.data.prepared import check_pairs, precheck, sample_texts
from safedpo_ray.data.schema import PKU_FIELDS, to_pku
from safedpo_ray.data.sources import chunks_for, prompt_in_eval
from safedpo_ray.data.stream import (PAIR_COLUMNS, DataError, RowNumbers, Tally, _tokenizer, pair_id, process_chunk,
                                     row_location)
from safedpo_ray.data.tokenize import tokenize_pairs
from safedpo_ray.data.transform import transform_with_outcome
from safedpo_ray.models.loading import build_tiny_model

pytestmark = pytest.mark.timeout(240)

MAX_ROW_BYTES = 3000
MAX_LENGTH, MAX_PROMPT = 128, 48
TEXTS = ["How do I bake bread?", "Knead the dough and bake it.", "I cannot help with that.",
         "BEGINNING OF CONVERSATION: USER: ASSISTANT:", "é ü 日本 ✓ \n, \"quoted\""]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tok") / "m", TEXTS, seed=0))


def params(tok: str, **kw) -> dict:
    return {"schema": "auto", "strict": False, "eval_fraction": 0.0, "mode": "safedpo", "tokenizer": tok,
            "trust_remote_code": False, "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT,
            "max_row_bytes": MAX_ROW_BYTES, "drop_duplicates": True, **kw}


def local_pipeline(source: str, p: dict, *, chunk_bytes: int = 64 * 2**20):
    """run_pipeline without Ray: the same per-chunk work and the same driver-side numbering and
    counting. Byte ranges are not counted beforehand (count=False, as `plan_data` plans them): the
    row numbers of every range after a file's first come from `RowNumbers`."""
    chunks, names, _ = chunks_for(source, chunk_bytes=chunk_bytes, count=False)
    numbers = RowNumbers(chunks)
    tally = Tally({"train": p["mode"], "eval": "safedpo"}, p["drop_duplicates"])
    pairs: dict[str, list] = {"train": [], "eval": []}
    quarantine: list[dict] = []
    for seq, chunk in enumerate(chunks):
        for table in process_chunk(chunk, p, seq):
            kept, bad = tally.add(numbers.apply(table), names)
            for split, t in kept.items():
                pairs[split] += t.select(PAIR_COLUMNS).to_pylist()
            quarantine += bad
    for split in ("train", "eval"):
        tally.split(split)
    return tally.splits, pairs, quarantine, names


# --------------------------------------------------------------------------- drawn rows

text = st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=12)


@st.composite
def good_row(draw, i: int) -> dict:
    prompt, a, b = f"q{i} {draw(text)}", f"a {draw(text)}", f"b {draw(text)}"
    if draw(st.integers(0, 3)) == 0:
        return {"prompt": prompt, "chosen": a, "rejected": b, "chosen_unsafe": draw(st.booleans()),
                "rejected_unsafe": draw(st.booleans())}
    return {"prompt": prompt, "response_0": a, "response_1": b,
            "is_response_0_safe": draw(st.booleans()), "is_response_1_safe": draw(st.booleans()),
            "better_response_id": draw(st.integers(0, 1)), "safer_response_id": draw(st.integers(0, 1))}


def schema_of(row: dict) -> str:
    return "pairwise" if "chosen" in row else "pku"


def field(row: dict, role: str) -> str:
    pku = schema_of(row) == "pku"
    return {"label": "is_response_1_safe" if pku else "rejected_unsafe",
            "response": "response_1" if pku else "rejected"}[role]


BAD_KINDS = ["missing", "null", "wrong_type", "string_label", "id_range", "id_type", "empty_text", "identical",
             "bad_json", "bad_utf8", "surrogate", "not_object", "huge", "duplicate", "blank"]
GOOD_KINDS = ["good", "good", "good", "extra", "int_labels"]


@st.composite
def line(draw, i: int, earlier: list) -> tuple[str, bytes, dict | None, str | None]:
    """(kind, line bytes, the parsed row or None, expected reason or None) of line i."""
    kind = draw(st.sampled_from(GOOD_KINDS + BAD_KINDS))
    row = draw(good_row(i))
    pku = schema_of(row) == "pku"
    reason = None
    if kind == "extra":
        row["source"] = draw(st.sampled_from([None, 3, "web", [1, {"x": 2}]]))
    elif kind == "int_labels":
        row[field(row, "label")] = int(draw(st.booleans()))  # 0/1 is a valid label
    elif kind in ("missing", "null"):
        f = draw(st.sampled_from(list(row)))
        if kind == "missing":
            del row[f]
        else:
            row[f] = None
        reason = f"missing field '{f}'"
    elif kind == "wrong_type":
        row["prompt"] = draw(st.sampled_from([5, 1.5, ["q"], {"q": 1}, True]))
        reason = "field 'prompt' must be a string"
    elif kind == "string_label":  # JSON has types: a label written as a string is not guessed at
        f = field(row, "label")
        row[f] = draw(st.sampled_from(["true", "false", "yes", "1", ""]))
        reason = f"field '{f}' must be a bool, got str"
    elif kind == "id_range":
        if not pku:
            row["chosen_unsafe"] = 2
            reason = "field 'chosen_unsafe' must be a bool (or 0/1), got 2"
        else:
            v = draw(st.sampled_from([2, -1, 7, 10**20]))
            row["better_response_id"] = v
            reason = f"field 'better_response_id' must be 0 or 1, got {v}"
    elif kind == "id_type":
        if not pku:
            row["chosen_unsafe"] = "no"
            reason = "field 'chosen_unsafe' must be a bool, got str"
        else:
            row["safer_response_id"] = draw(st.sampled_from(["1", 0.5, True, [0]]))
            reason = "field 'safer_response_id' must be an integer 0 or 1"
    elif kind == "empty_text":
        f = draw(st.sampled_from(["prompt", field(row, "response")]))
        row[f] = draw(st.sampled_from(["", " ", "\t\n ", "\u3000"]))
        reason = f"field '{f}' is empty"
    elif kind == "identical":
        first = "response_0" if pku else "chosen"
        row[field(row, "response")] = draw(st.sampled_from(["", " "])) + row[first] + draw(st.sampled_from(["", "\n"]))
        reason = "responses are identical"
    elif kind == "huge":
        row["prompt"] += " pad" * (MAX_ROW_BYTES // 4 + draw(st.integers(1, 50)))
        return kind, json.dumps(row).encode(), None, "over data.max_row_bytes"
    elif kind == "bad_json":
        raw = json.dumps(row, ensure_ascii=False)
        return kind, draw(st.sampled_from([raw[:-1], raw + ",", raw.replace(":", "=", 1)])).encode(), None, \
            "not valid JSON"
    elif kind == "bad_utf8":
        raw = json.dumps(row, ensure_ascii=False).encode()
        at = draw(st.integers(0, len(raw)))
        return kind, raw[:at] + draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80"])) + raw[at:], None, \
            "not valid UTF-8"
    elif kind == "surrogate":  # valid JSON ("\ud800" escape), but no text Arrow or a tokenizer takes
        row[draw(st.sampled_from(["prompt", field(row, "response")]))] += draw(st.sampled_from(["\ud800", "\udfff x"]))
        return kind, json.dumps(row).encode(), None, "lone surrogate"
    elif kind == "not_object":
        return kind, json.dumps([row]).encode(), None, "not an object"
    elif kind == "blank":
        return kind, draw(st.sampled_from([b"", b"  ", b"\t"])), None, None
    elif kind == "duplicate":
        originals = [(n, r) for n, (k, _, r, why) in enumerate(earlier, start=1) if k in GOOD_KINDS]
        if not originals:
            kind = "good"
        else:
            n, original = draw(st.sampled_from(originals))
            # the same row, however it is written: other key order, other spacing
            raw = json.dumps(dict(reversed(list(original.items()))), separators=(",", ":"), ensure_ascii=False)
            return kind, raw.encode(), dict(original), f"duplicate of row {n} of "
    ensure_ascii = draw(st.booleans())
    return kind, json.dumps(row, ensure_ascii=ensure_ascii).encode(), row, reason


@st.composite
def messy_file(draw):
    lines: list = []
    for i in range(draw(st.integers(1, 24))):
        lines.append(draw(line(i, lines)))
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    bom = BOM if draw(st.booleans()) else b""
    return lines, bom + end.join(raw for _, raw, _, _ in lines) + end


def expected_split(kind: str, row: dict | None, fraction: float) -> str:
    prompt = row.get("prompt") if row is not None else None
    return "eval" if prompt_in_eval(prompt, fraction) else "train"


def check_against_lines(lines, stats, pairs, quarantine, name: str, p: dict) -> None:
    """The pipeline's output, row by row, against what each line should have become."""
    want_pairs: dict[str, list] = {"train": [], "eval": []}
    want_q: list[tuple] = []
    rows_read = {"train": 0, "eval": 0}
    discarded_by_t = {"train": 0, "eval": 0}
    for n, (kind, _, row, reason) in enumerate(lines, start=1):
        if kind == "blank":
            continue
        split = expected_split(kind, row, p["eval_fraction"])
        rows_read[split] += 1
        if reason is not None:
            want_q.append((split, n, reason))
            continue
        pku = to_pku(row, schema_of(row))
        pair, outcome = transform_with_outcome(pku, p["mode"] if split == "train" else "safedpo")
        discarded_by_t[split] += outcome == "discarded"
        if pair is not None:
            want_pairs[split].append((pair_id(0, n), pair))

    # every bad row: quarantined with its file, its line number and its reason, nothing else is
    assert [(q["split"], q["row_number"]) for q in quarantine] == [(s, n) for s, n, _ in want_q]
    for q, (_, n, reason) in zip(quarantine, want_q):
        assert q["file"] == name
        assert any(reason in r for r in q["reasons"]), (n, reason, q["reasons"])
        if reason.startswith("duplicate"):
            assert q["reasons"] == [reason + name]
    # every good row: its pair, with its text, in file order; nothing else
    tok = _tokenizer(p["tokenizer"], False)
    for split in ("train", "eval"):
        got, want = pairs[split], want_pairs[split]
        assert [g["pair_id"] for g in got] == [pid for pid, _ in want]
        if want:
            ids = tokenize_pairs({k: [w[k] for _, w in want] for k in ("prompt", "chosen", "rejected")}, tok,
                                 max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
            for j, (g, (_, w)) in enumerate(zip(got, want)):
                assert g["prompt"] == w["prompt"]
                assert (g["chosen_unsafe"], g["rejected_unsafe"]) == (w["chosen_unsafe"], w["rejected_unsafe"])
                assert (g["chosen_ids"], g["rejected_ids"], g["prompt_ids"]) == \
                       (ids["chosen_ids"][j], ids["rejected_ids"][j], ids["prompt_ids"][j])
        s = stats[split]
        # the counts add up: accepted (kept + swapped) + discarded + quarantined = rows read
        accepted = sum(c.get("kept", 0) + c.get("swapped", 0) for c in s["transform"].values())
        discarded = sum(c.get("discarded", 0) for c in s["transform"].values())
        assert s["rows_read"] == rows_read[split]
        assert accepted + discarded + s["rows_quarantined"] == s["rows_read"]
        assert s["rows_quarantined"] == sum(1 for q in want_q if q[0] == split)
        assert s["rows_duplicate"] == sum(1 for q in want_q if q[0] == split and q[2].startswith("duplicate"))
        assert accepted == s["pairs"] == len(want)
        assert discarded == discarded_by_t[split]


HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])


@HYP
@given(messy_file(), st.sampled_from([0.0, 0.3]), st.sampled_from(["safedpo", "helpful", "harmless", "safebetter"]),
       st.integers(40, 400))
def test_each_bad_row_costs_itself_only(tok, tmp_path_factory, data, fraction, mode, chunk_bytes):
    lines, raw = data
    path = tmp_path_factory.mktemp("messy") / "d.jsonl"
    path.write_bytes(raw)
    p = params(tok, eval_fraction=fraction, mode=mode)
    whole = local_pipeline(str(path), p)
    check_against_lines(lines, *whole[:3], str(path), p)
    cut = local_pipeline(str(path), p, chunk_bytes=chunk_bytes)
    assert cut == whole  # many byte-range chunks: identical pairs, statistics and quarantine


# --------------------------------------------------------------------------- formats and labels

GOOD = {"prompt": "How do I bake bread?", "response_0": "Knead the dough and bake it.",
        "response_1": "I cannot help with that.", "is_response_0_safe": True, "is_response_1_safe": True,
        "better_response_id": 0, "safer_response_id": 0}


def test_csv_labels_are_parsed_json_string_labels_are_quarantined(tok, tmp_path):
    header = ",".join(PKU_FIELDS)
    csv_path = tmp_path / "d.csv.gz"
    csv_path.write_bytes(gzip.compress(BOM + (
        f"{header}\r\n"
        '"first line\nsecond line",a,b,true,yes,0,1\r\n'
        "p2,a,b,True,NO,1,0\r\n"
        "p3,a,b,maybe,1,0,0\r\n"
        "p4,a,b,1,0,2,0\r\n"
        "p5,a,a,1,0,1,0\r\n").encode()))
    stats, pairs, q, names = local_pipeline(str(csv_path), params(tok))
    assert [r["prompt"] for r in pairs["train"]] == ["first line\nsecond line", "p2"]
    assert pairs["train"][1]["chosen_unsafe"] is False  # p2: the winner b is unsafe ('NO'): swapped
    assert [(x["row_number"], x["reasons"]) for x in q] == [
        (3, ["field 'is_response_0_safe' must be a bool, got str 'maybe'"]),
        (4, ["field 'better_response_id' must be 0 or 1, got 2"]),
        (5, ["responses are identical"])]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({**GOOD, "is_response_0_safe": "true"}) + "\n" + json.dumps(GOOD) + "\n")
    stats, pairs, q, _ = local_pipeline(str(jsonl), params(tok))
    assert [x["reasons"] for x in q] == [["field 'is_response_0_safe' must be a bool, got str 'true'"]]
    assert stats["train"]["pairs"] == 1


def test_parquet_shards_with_nulls_and_wrong_values(tok, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    rows = [{**GOOD, "prompt": f"p{i}"} for i in range(6)]
    rows[1]["response_1"] = None
    rows[4]["safer_response_id"] = 5
    pq.write_table(pa.Table.from_pylist(rows[:4]), d / "part-0.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(rows[4:]), d / "part-1.parquet", row_group_size=2)
    stats, pairs, q, names = local_pipeline(str(d / "*.parquet"), params(tok))
    assert [(Path(x["file"]).name, x["row_number"], x["reasons"]) for x in q] == [
        ("part-0.parquet", 2, ["missing field 'response_1'"]),
        ("part-1.parquet", 1, ["field 'safer_response_id' must be 0 or 1, got 5"])]
    assert [r["prompt"] for r in pairs["train"]] == ["p0", "p2", "p3", "p5"]
    assert [r["pair_id"] for r in pairs["train"]] == [pair_id(0, 1), pair_id(0, 3), pair_id(0, 4), pair_id(1, 2)]
    assert stats["train"]["rows_read"] == 6 and stats["eval"]["rows_read"] == 0


def test_duplicates_across_files_name_the_first_copy(tok, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "prompt": "other"}) + "\n")
    (d / "b.json").write_text(json.dumps([{**GOOD, "response_0": "different"}, dict(reversed(GOOD.items()))]))
    stats, pairs, q, names = local_pipeline(str(d), params(tok))
    assert [(Path(x["file"]).name, x["row_number"], x["reasons"]) for x in q] == [
        ("b.json", 2, [f"duplicate of row 1 of {names[0]}"])]
    assert stats["train"]["rows_duplicate"] == 1 and stats["train"]["pairs"] == 3
    # by default a duplicate is counted, not dropped (a repeated pair can be deliberate weight)
    stats, pairs, q, _ = local_pipeline(str(d), params(tok, drop_duplicates=False))
    assert q == [] and stats["train"]["rows_duplicate"] == 1 and stats["train"]["pairs"] == 4


def test_empty_held_out_split_and_a_dataset_t_discards_entirely(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    prompts = [f"tiny {i}" for i in range(40) if not prompt_in_eval(f"tiny {i}", 0.05)][:3]
    path.write_text("".join(json.dumps({**GOOD, "prompt": x}) + "\n" for x in prompts))
    for fraction in (0.0, 0.05):  # eval_fraction=0, or a tiny dataset none of whose prompts is held out
        stats, pairs, _, _ = local_pipeline(str(path), params(tok, eval_fraction=fraction))
        assert stats["eval"]["rows_read"] == 0 and pairs["eval"] == [] and stats["train"]["pairs"] == 3
        check_pairs(stats, "safedpo")  # training proceeds
    path.write_text("".join(json.dumps({**GOOD, "prompt": x, "is_response_0_safe": False, "is_response_1_safe": False})
                            + "\n" for x in prompts))
    stats, *_ = local_pipeline(str(path), params(tok))
    assert stats["train"]["transform"] == {"unsafe_unsafe": {"discarded": 3}}
    with pytest.raises(DataError, match=r"data.mode=safedpo kept no training pairs: T discarded all of them"):
        check_pairs(stats, "safedpo")
    stats, *_ = local_pipeline(str(path), params(tok, mode="helpful"))
    check_pairs(stats, "helpful")  # the helpful order keeps them


def test_strict_mode_names_the_first_bad_row(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"train data, .*d.jsonl, row 3: line is not valid UTF-8"):
        local_pipeline(str(path), params(tok, strict=True))


# --------------------------------------------------------------------------- whole-file problems, before Ray


def plan_error(source: str, schema: str = "auto") -> str:
    with pytest.raises(SourceError) as exc:
        chunks, names, _ = chunks_for(source)
        precheck(chunks, names, schema)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_precheck_reports_whole_file_problems_in_one_sentence(tmp_path):
    cases = {
        "none.jsonl": (b'{"question": "q", "answer": "a", "safe": true}\n' * 3, "auto",
                       "columns match no known schema; closest is 'pairwise', missing columns: 'prompt', "
                       "'chosen', 'rejected', 'chosen_unsafe', 'rejected_unsafe' (found columns: answer, "
                       "question, safe)"),
        "pkuish.jsonl": (json.dumps({"prompt": "p", "response_0": "a", "response_1": "b", "is_safe_0": True,
                                     "is_safe_1": False}).encode() + b"\n", "auto",
                         "closest is 'pku', missing columns: 'is_response_0_safe', 'is_response_1_safe', "
                         "'better_response_id', 'safer_response_id' (found columns: is_safe_0, is_safe_1, "
                         "prompt, response_0, response_1)"),
        "pairish.csv": (b"prompt,chosen,rejected,label\np,a,b,1\n", "auto",
                        "closest is 'pairwise', missing columns: 'chosen_unsafe', 'rejected_unsafe'"),
        "pairwise.jsonl": (json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_unsafe": False,
                                       "rejected_unsafe": True}).encode() + b"\n", "pku",
                           "data.schema=pku but the rows lack response_0"),
        "space.jsonl": (b"  \n\t\r\n", "auto", "the file has no rows"),
        "bom.csv": (BOM, "auto", "the file has no rows"),
        "space.csv": (b"   \n \n", "auto", "the file has no rows"),
        "space.json": (BOM + b" \n", "auto", "the file has no rows"),
        "empty.jsonl": (b"", "auto", "the file is empty"),
        "notes.txt": (b"hello\n", "auto", "unknown file type"),
    }
    for name, (data, schema, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert message in plan_error(str(path), schema), name
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "readme.md").write_text("x")
    assert "is a directory with no .jsonl" in plan_error(str(tmp_path / "dir"))
    assert "the pattern matches no file" in plan_error(str(tmp_path / "dir" / "*.jsonl"))


def test_every_row_invalid_is_a_data_error_before_ray(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({**GOOD, "prompt": f"p{i}", "better_response_id": 9}) + "\n" for i in range(3)))
    chunks, names, _ = chunks_for(str(path))
    precheck(chunks, names, "auto")  # the columns are right: each row is wrong, so quarantine...
    with pytest.raises(DataError, match=r"all 3 training rows are invalid.*row 1: field 'better_response_id' "
                                        r"must be 0 or 1, got 9"):
        sample_texts(chunks, "auto")  # ...but the tiny tokenizer has nothing to learn from: say so


# --------------------------------------------------------------------------- the CLI


def no_ray(monkeypatch):
    """Fail loudly if the CLI reaches Ray (for problems that must be reported before it)."""
    import safedpo_ray.train.trainer as trainer

    def boom(*a, **k):
        raise AssertionError("Ray was started for a problem that must be reported before it")

    monkeypatch.setattr(trainer, "ensure_ray", boom)


def test_cli_prepare_exits_2_with_one_line_before_ray(tmp_path, monkeypatch, capsys):
    no_ray(monkeypatch)
    (tmp_path / "dir").mkdir()
    (tmp_path / "bad.jsonl").write_text(json.dumps({**GOOD, "better_response_id": 4}) + "\n")
    (tmp_path / "space.csv").write_bytes(BOM + b"  \n")
    (tmp_path / "x.tsv").write_text("a\tb\n")
    cases = [(tmp_path / "missing.jsonl", "is not a file and not a hub dataset id"),
             (tmp_path / "dir", "is a directory with no .jsonl"),
             (tmp_path / "space.csv", "the file has no rows"),
             (tmp_path / "x.tsv", "unknown file type"),
             (tmp_path / "bad.jsonl", "all 1 training rows are invalid")]
    for source, message in cases:
        rc = cli_main(["prepare", f"data.source={source}", f"run.output_dir={tmp_path / 'out'}", "run.name=r"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.count("\n") == 1 and err.startswith("safedpo-ray: ") and message in err, err


def test_cli_subprocess_whole_file_problems_exit_2_without_ray(tmp_path):
    """The real command: exit 2, one line on stderr, no Ray (a patched ray.init would exit 1)."""
    (tmp_path / "cols.jsonl").write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    code = ("import sys, ray; ray.init = lambda *a, **k: sys.exit('RAY WAS STARTED'); "
            "from safedpo_ray.cli.main import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs = []
    for source in (tmp_path / "cols.jsonl", "data/no-such.jsonl"):
        cmd = [sys.executable, "-c", code, "prepare", f"data.source={source}", f"run.output_dir={tmp_path}",
               "run.name=r"]
        runs.append((time.perf_counter(), subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                                           stderr=subprocess.PIPE, text=True)))
    results = []
    for t0, proc in runs:  # both at once: the import of the package is most of each
        out, err = proc.communicate(timeout=180)
        results.append((proc.returncode, out, err, time.perf_counter() - t0))
    (rc1, out1, err1, s1), (rc2, out2, err2, s2) = results
    for rc, out, err, seconds in results:
        assert rc == 2, err[-3000:]
        assert "Started a local Ray instance" not in out + err and "RAY WAS STARTED" not in err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert seconds < 150  # no Ray start, no model build: the import is all (~5 s on an idle box)
    assert err1 == (f"safedpo-ray: {tmp_path / 'cols.jsonl'}: columns match no known schema; closest is 'pairwise', "
                    "missing columns: 'prompt', 'chosen', 'rejected', 'chosen_unsafe', 'rejected_unsafe' "
                    "(found columns: a, q)\n")
    assert "data source 'data/no-such.jsonl' is not a file" in err2  # a missing file, not a hub id


# --------------------------------------------------------------------------- through Ray


def messy_rows() -> tuple[bytes, dict]:
    """A fixed messy file: what the Ray run must agree with, line by line."""
    rows = [{**GOOD, "prompt": f"question {i}", "is_response_0_safe": i % 3 != 0, "is_response_1_safe": i % 2 == 0,
             "better_response_id": i % 2} for i in range(24)]
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:-1]
    lines[5] = json.dumps({**rows[5], "better_response_id": "1"})
    lines[7] = json.dumps({**rows[7], "prompt": "   "})
    lines[9] = lines[4]  # duplicate of row 5
    lines[11] = json.dumps({**rows[11], "response_1": rows[11]["response_0"]})
    lines[13] = json.dumps({k: v for k, v in rows[13].items() if k != "response_0"})
    lines[15] = json.dumps({**rows[15], "prompt": "x" * 5000})
    raw = "\r\n".join(lines).encode() + b"\r\n\r\n"
    raw = raw.replace(b"question 17", b"question \xff17")
    return BOM + raw, {3: "not valid JSON", 6: "must be an integer 0 or 1, got str", 8: "field 'prompt' is empty",
                       10: "duplicate of row 5", 12: "responses are identical", 14: "missing field 'response_0'",
                       16: "over data.max_row_bytes", 18: "not valid UTF-8"}


def test_prepare_through_ray_in_many_chunks_matches_row_by_row(ray_local, tok, tmp_path):
    from safedpo_ray.train.trainer import DataPlan, prepare

    raw, bad = messy_rows()
    path = tmp_path / "messy.jsonl"
    path.write_bytes(raw)
    cfg = load_config(None, [f"data.source={path}", "data.eval_fraction=0.3", f"data.max_row_bytes={MAX_ROW_BYTES}",
                             "data.drop_duplicates=true",
                             f"data.max_length={MAX_LENGTH}", f"data.max_prompt_length={MAX_PROMPT}",
                             f"model.name_or_path={tok}", f"run.output_dir={tmp_path}", "run.name=messy"])
    chunks, names, identity = chunks_for(str(path), chunk_bytes=2500, count=False)  # 5 tasks; 2 start inside row 16
    assert len(chunks) == 5
    precheck(chunks, names, "auto")
    prepared = prepare(cfg, tmp_path / "messy", DataPlan(chunks, names, identity))

    stats = json.loads((tmp_path / "messy" / "data_stats.json").read_text())
    quarantine = [json.loads(x) for x in (tmp_path / "messy" / "quarantine.jsonl").open()]
    assert [(q["file"], q["row_number"]) for q in quarantine] == [(str(path), n) for n in sorted(bad)]
    for q in quarantine:
        assert any(bad[q["row_number"]] in r for r in q["reasons"]), q
    want_stats, want_pairs, want_q, _ = local_pipeline(str(path), params(tok, eval_fraction=0.3))
    assert quarantine == want_q
    for split in ("train", "eval"):
        s = stats[split]
        accepted = sum(c.get("kept", 0) + c.get("swapped", 0) for c in s["transform"].values())
        discarded = sum(c.get("discarded", 0) for c in s["transform"].values())
        assert accepted + discarded + s["rows_quarantined"] == s["rows_read"] > 0
        assert {k: v for k, v in s.items() if k != "files"} == want_stats[split]
        assert s["files"] == [str(path)]
        table = pa.ipc.open_file(prepared.data.split(split)).read_all()
        assert table.to_pylist() == want_pairs[split]  # every good row's pair, its ids, in file order
    assert stats["train"]["rows_read"] + stats["eval"]["rows_read"] == 24


def test_max_rows_keeps_the_first_rows_read_across_byte_ranges(ray_local, tok, tmp_path):
    """data.max_rows: the first N rows in file order (quarantined ones count as read), whichever
    byte range they are in; the ranges' row numbers still come out whole (RowNumbers)."""
    from safedpo_ray.train.trainer import DataPlan, prepare

    raw, bad = messy_rows()
    path = tmp_path / "messy.jsonl"
    path.write_bytes(raw)
    chunks, names, identity = chunks_for(str(path), chunk_bytes=2500, count=False)
    want_stats, want_pairs, want_q, _ = local_pipeline(str(path), params(tok, eval_fraction=0.0))
    for max_rows in (5, 17):
        cfg = load_config(None, [f"data.source={path}", "data.eval_fraction=0", f"data.max_row_bytes={MAX_ROW_BYTES}",
                                 "data.drop_duplicates=true", f"data.max_rows={max_rows}",
                                 f"data.max_length={MAX_LENGTH}", f"data.max_prompt_length={MAX_PROMPT}",
                                 f"model.name_or_path={tok}", f"run.output_dir={tmp_path}", f"run.name=m{max_rows}"])
        prepared = prepare(cfg, tmp_path / f"m{max_rows}", DataPlan(chunks, names, identity))
        stats = prepared.stats["train"]
        assert stats["rows_read"] == max_rows
        quarantine = [json.loads(x) for x in (tmp_path / f"m{max_rows}" / "quarantine.jsonl").open()] \
            if stats["rows_quarantined"] else []
        assert [q["row_number"] for q in quarantine] == [n for n in sorted(bad) if n <= max_rows]
        table = pa.ipc.open_file(prepared.data.split("train")).read_all()
        assert table.to_pylist() == [r for r in want_pairs["train"] if row_location(r["pair_id"])[1] <= max_rows]


def test_prepare_without_held_out_pairs_and_t_discarding_everything(ray_local, tok, tmp_path, capsys):
    from safedpo_ray.train.trainer import prepare

    d = tmp_path / "shards"
    d.mkdir()
    rows = [{**GOOD, "prompt": f"p{i}", "is_response_0_safe": i != 1} for i in range(5)]
    rows[3]["better_response_id"] = 3
    pq.write_table(pa.Table.from_pylist(rows[:2]), d / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), d / "part-1.parquet")
    common = [f"model.name_or_path={tok}", f"run.output_dir={tmp_path}", f"data.max_length={MAX_LENGTH}",
              f"data.max_prompt_length={MAX_PROMPT}"]
    cfg = load_config(None, [f"data.source={d}/part-*.parquet", "data.eval_fraction=0", "run.name=noeval", *common])
    prepared = prepare(cfg, tmp_path / "noeval")
    stats = json.loads((tmp_path / "noeval" / "data_stats.json").read_text())
    assert not prepared.has_eval and list(prepared.pair_files()["pairs"]) == ["train"]
    assert stats["eval"]["rows_read"] == 0 and stats["eval"]["pairs"] == 0
    assert pa.ipc.open_file(prepared.data.split("eval")).read_all().num_rows == 0  # a valid, empty file
    assert stats["train"]["rows_read"] == 5 and stats["train"]["rows_quarantined"] == 1
    assert stats["train"]["transform"] == {"safe_safe": {"kept": 3}, "unsafe_safe": {"swapped": 1}}
    assert stats["train"]["pairs"] == 4

    unsafe = tmp_path / "unsafe.jsonl"
    unsafe.write_text("".join(json.dumps({**GOOD, "prompt": f"u{i}", "is_response_0_safe": False,
                                           "is_response_1_safe": False}) + "\n" for i in range(4)))
    capsys.readouterr()
    rc = cli_main(["prepare", f"data.source={unsafe}", "data.eval_fraction=0", "run.name=unsafe", *common])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [x for x in err.splitlines() if x.startswith("safedpo-ray: ")]
    assert lines[0] == ("safedpo-ray: data.mode=safedpo kept no training pairs: T discarded all of them "
                        "(4 valid rows, 0 quarantined; transform outcomes: {'unsafe_unsafe': {'discarded': 4}})")
    assert all("logs" in x for x in lines[1:]) and "Traceback" not in err  # then only where Ray's logs are
