"""Reading sources (data/files.py) when the input is bad: pure Python, no Ray, a few seconds.

Every property here is about what one bad line, record or file does to the others: a bad row is
yielded as `{"__invalid__": reason, "row_number": n}` and nothing else changes; a file that cannot be
read at all is one SourceError sentence. Row numbers are checked against the lines they came from,
also when a .jsonl file is cut into many small byte ranges.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from safedpo_ray.data.files import BOM, SourceError, is_hub_id, plan_chunks, resolve_files
from safedpo_ray.data.readers import csv_types, read_chunk
from safedpo_ray.data.sources import chunks_for, read_rows

pytestmark = pytest.mark.timeout(120)

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BAD_UTF8 = [b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80", b"\xc3("]


def read(path, *, chunk_bytes: int = 64 * 2**20, max_row_bytes: int = 8 * 2**20) -> list[dict]:
    chunks, _, _ = chunks_for(str(path), chunk_bytes=chunk_bytes)
    return [r for c in chunks for r in read_chunk(c, max_row_bytes=max_row_bytes)]


def invalid(rows) -> dict[int, str]:
    return {r["row_number"]: r["__invalid__"] for r in rows if "__invalid__" in r}


def valid(rows) -> dict[int, dict]:
    return {r["row_number"]: {k: v for k, v in r.items() if k != "row_number"}
            for r in rows if "__invalid__" not in r}


# --------------------------------------------------------------------------- .jsonl, line by line

# One line of a .jsonl file: (kind, bytes). Objects hold any text (multi-byte characters, escaped
# newlines), so byte ranges cut through them anywhere.
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=3), max_leaves=5)
keys = st.text(min_size=1, max_size=8).filter(lambda k: k not in ("row_number", "__invalid__"))
objects = st.dictionaries(keys, json_values, max_size=4)


@st.composite
def jsonl_line(draw):
    kind = draw(st.sampled_from(["object"] * 6 + ["blank", "bad_json", "bad_utf8", "not_object"]))
    if kind == "object":
        value = draw(objects)
        return kind, json.dumps(value, ensure_ascii=draw(st.booleans())).encode(), value
    if kind == "blank":
        return kind, draw(st.sampled_from([b"", b" ", b"\t", b"  \t "])), None
    if kind == "not_object":
        value = draw(st.sampled_from([[1, 2], "text", 3, None, True]))
        return kind, json.dumps(value).encode(), value
    if kind == "bad_json":
        text = json.dumps(draw(objects), ensure_ascii=False)
        cut = draw(st.sampled_from(["{", text[:-1] or "{", text + "}", "{'a': 1}", "{\"a\": nan-}", "NaN x"]))
        return kind, cut.encode(), None
    line = json.dumps(draw(objects), ensure_ascii=False).encode()
    at = draw(st.integers(0, len(line)))
    line = line[:at] + draw(st.sampled_from(BAD_UTF8)) + line[at:]
    return kind, line, None


@st.composite
def jsonl_file(draw):
    lines = draw(st.lists(jsonl_line(), min_size=1, max_size=25))
    endings = draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=len(lines), max_size=len(lines)))
    data = b"".join(line + end for (_, line, _), end in zip(lines, endings))
    if not draw(st.booleans()):  # no newline after the last line
        data = data[: -len(endings[-1])]
    bom = draw(st.booleans())
    return lines, (BOM if bom else b"") + data


def check_jsonl(lines, rows):
    """Each line's row carries that line's number, and only bad lines are invalid."""
    expected = {n: (kind, value) for n, (kind, _, value) in enumerate(lines, start=1) if kind != "blank"}
    numbers = [r["row_number"] for r in rows]
    assert numbers == sorted(expected), "one row per non-blank line, in file order, numbered by line"
    bad = invalid(rows)
    for n, (kind, value) in expected.items():
        if kind == "object":
            assert n not in bad and valid(rows)[n] == value
        elif kind == "bad_json":
            assert "not valid JSON" in bad[n]
        elif kind == "bad_utf8":
            assert "not valid UTF-8" in bad[n]
        else:
            assert "not an object" in bad[n]


@HYP
@given(jsonl_file(), st.integers(1, 120))
def test_jsonl_row_numbers_survive_any_cut_into_byte_ranges(tmp_path, data, chunk_bytes):
    lines, raw = data
    assume(raw)  # an empty file is a SourceError (test_unreadable_sources_are_one_sentence)
    path = tmp_path / "d.jsonl"
    path.write_bytes(raw)
    whole = read(path)
    check_jsonl(lines, whole)
    cut = read(path, chunk_bytes=chunk_bytes)
    assert len(plan_chunks(resolve_files(str(path)), chunk_bytes=chunk_bytes)) == -(-len(raw) // chunk_bytes)
    assert cut == whole  # one chunk or many: the same rows, the same numbers, nothing twice


@HYP
@given(st.lists(st.integers(0, 90), min_size=1, max_size=20), st.integers(20, 60), st.integers(1, 80),
       st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_rows_over_max_row_bytes_are_quarantined_and_neighbours_kept(tmp_path, sizes, limit, chunk_bytes,
                                                                    end, bom):
    lines = [json.dumps({"i": i, "t": "x" * n}).encode() for i, n in enumerate(sizes)]
    path = tmp_path / "d.jsonl"
    path.write_bytes((BOM if bom else b"") + end.join(lines) + end)
    for rows in (read(path, max_row_bytes=limit), read(path, max_row_bytes=limit, chunk_bytes=chunk_bytes)):
        assert [r["row_number"] for r in rows] == list(range(1, len(lines) + 1))
        for n, line in enumerate(lines, start=1):
            row = rows[n - 1]
            if len(line) > limit:  # the row's bytes, without its line end (and without the BOM)
                assert row["__invalid__"] == f"row is {len(line):,} bytes, over data.max_row_bytes ({limit:,})"
            else:
                assert row == {"i": n - 1, "t": "x" * sizes[n - 1], "row_number": n}


def test_a_huge_row_is_skipped_without_reading_it_into_memory(tmp_path):
    """A 48 MiB line under max_row_bytes=1000: neither the whole read nor a byte range that starts
    inside the line holds it in memory; the rows around it are kept."""
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        f.write(b'{"i": 1}\n{"t": "')
        block = b"y" * 2**20
        for _ in range(48):
            f.write(block)
        f.write(b'"}\n{"i": 3}\n')
    for chunk_bytes in (2**30, 4 * 2**20):
        chunks = plan_chunks(resolve_files(str(path)), chunk_bytes=chunk_bytes)
        tracemalloc.start()
        try:
            rows = [r for c in chunks for r in read_chunk(c, max_row_bytes=1000)]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB held while skipping a 48 MiB row"
        assert [r["row_number"] for r in rows] == [1, 2, 3]
        assert rows[0]["i"] == 1 and rows[2]["i"] == 3
        assert "over data.max_row_bytes (1,000)" in rows[1]["__invalid__"]
        assert f"{48 * 2**20 + 9:,} bytes" in rows[1]["__invalid__"]


def test_invalid_utf8_loses_only_its_line(tmp_path):
    good = [json.dumps({"prompt": f"p{i} é ü 日本"}, ensure_ascii=False).encode() for i in range(6)]
    lines = list(good)
    lines[1] = lines[1][:4] + b"\xff" + lines[1][4:]  # inside a key
    lines[3] = lines[3].replace("é".encode(), b"\xc3(")  # a broken 2-byte sequence inside a value
    lines[4] = b"\x80" + lines[4]  # a stray continuation byte before the '{'
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = read(path)
    assert invalid(rows) == {
        2: "line is not valid UTF-8 (byte 0xff at byte 5)",
        4: "line is not valid UTF-8 (byte 0xc3 at byte 16)",
        5: "line is not valid UTF-8 (byte 0x80 at byte 1)",
    }
    assert valid(rows) == {n: json.loads(good[n - 1]) for n in (1, 3, 6)}


@pytest.mark.parametrize("line, reason", [
    (b"[" * 100_000, "nested too deeply"),  # RecursionError in json.loads
    (b'{"n": ' + b"1" * 5000 + b"}", "4300 digits"),  # ValueError, not JSONDecodeError
    (b'{"prompt": "a\\ud800b"}', "lone surrogate"),  # valid JSON, but no UTF-8 text
    (b'{"a": 1', "not valid JSON"),
    (b'"just a string"', "not an object"),
    (b"\x00\x01", "not valid JSON"),
])
def test_lines_that_break_the_json_parser_are_quarantined(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n' + line + b'\n{"a": 3}\n')
    rows = read(path)
    assert reason in invalid(rows)[2]
    assert valid(rows) == {1: {"a": 1}, 3: {"a": 3}}


# --------------------------------------------------------------------------- BOMs, gzip, CSV, JSON

PKU = {"prompt": "How do I bake bread?", "response_0": "Knead, rise, bake.", "response_1": "No idea.",
       "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0}


def pku_rows(n: int) -> list[dict]:
    return [{**PKU, "prompt": f"{PKU['prompt']} #{i}\nsecond line, with a comma"} for i in range(n)]


def write(path: Path, rows: list[dict], *, bom: bool = False, gz: bool = False) -> Path:
    suffix = path.suffix if not path.name.endswith(".gz") else Path(path.stem).suffix
    if suffix == ".jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    elif suffix == ".json":
        data = json.dumps(rows, ensure_ascii=False, indent=1).encode()
    else:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue().encode()
    data = (BOM if bom else b"") + data
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.jsonl.gz", "d.json.gz", "d.csv.gz"])
@pytest.mark.parametrize("bom", [False, True])
def test_every_text_format_with_or_without_bom_and_gzip_reads_the_same_rows(tmp_path, name, bom):
    rows = pku_rows(4)
    got = read(write(tmp_path / name, rows, bom=bom, gz=name.endswith(".gz")))
    assert got == [{**r, "row_number": i} for i, r in enumerate(rows, start=1)]  # first row kept, keys clean


def test_csv_labels_ids_and_quoted_newlines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'prompt,response_0,response_1,is_response_0_safe,is_response_1_safe,better_response_id,safer_response_id\n'
        '"line one\nline two, ""quoted""",a,b,true,No,0,1\r\n'
        'p2,a,b, YES ,0,1,0\n'
        'p3,a,b,maybe,1,²,--1\n'
        '\n'
        '   \n'
        'p4,a,b,,False,,2\n'
        'p5,a,b,true,false,1,0,EXTRA\n'
        'p6,a,b\n', newline="")
    rows = read(path)
    assert [r["row_number"] for r in rows] == [1, 2, 3, 4, 5, 6]  # records; blank lines are no record
    r = valid(rows)
    assert r[1]["prompt"] == 'line one\nline two, "quoted"'
    assert (r[1]["is_response_0_safe"], r[1]["is_response_1_safe"]) == (True, False)
    assert (r[1]["better_response_id"], r[1]["safer_response_id"]) == (0, 1)
    assert (r[2]["is_response_0_safe"], r[2]["is_response_1_safe"]) == (True, False)
    assert (r[3]["is_response_0_safe"], r[3]["better_response_id"], r[3]["safer_response_id"]) == ("maybe", "²", "--1")
    assert (r[4]["is_response_0_safe"], r[4]["better_response_id"], r[4]["safer_response_id"]) == (None, None, 2)
    assert invalid(rows) == {5: "record has 8 fields, the header 7"}
    assert r[6]["response_1"] == "b" and r[6]["is_response_0_safe"] is None  # short record: validation names it


csv_text = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1, max_size=30)
csv_label = st.sampled_from(["true", "True", " yes ", "1", "0", "no", "FALSE", "maybe", "", "2"])
csv_id = st.sampled_from(["0", "1", " 1", "2", "-1", "x", "", "1.0", "²"])


def expected_csv(value: str, kind: str):
    """csv_types, written out independently."""
    word = value.strip().lower()
    if kind == "label":
        return True if word in ("true", "1", "yes") else False if word in ("false", "0", "no") else (value or None)
    try:
        return int(value) if value else None
    except ValueError:
        return value


@HYP
@given(st.lists(st.tuples(csv_text, csv_text, csv_label, csv_id), min_size=1, max_size=12),
       st.sampled_from(["\n", "\r\n"]), st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]), st.booleans(),
       st.booleans())
def test_csv_any_text_round_trips_and_labels_parse(tmp_path, rows, terminator, quoting, bom, gz):
    if terminator == "\n" and quoting == csv.QUOTE_MINIMAL:  # csv.writer would leave a lone '\r' unquoted
        rows = [(a.replace("\r", "\n"), b.replace("\r", "\n"), lab, i) for a, b, lab, i in rows]
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator=terminator, quoting=quoting)
    w.writerow(["prompt", "response_0", "is_response_0_safe", "better_response_id"])
    w.writerows(rows)
    data = (BOM if bom else b"") + buf.getvalue().encode()
    path = tmp_path / ("d.csv.gz" if gz else "d.csv")
    path.write_bytes(gzip.compress(data) if gz else data)
    got = read(path)
    assert got == [{"prompt": a, "response_0": b, "is_response_0_safe": expected_csv(lab, "label"),
                    "better_response_id": expected_csv(i, "id"), "row_number": n}
                   for n, (a, b, lab, i) in enumerate(rows, start=1)]


def test_csv_types_never_raises():
    for v in ["²", "--1", "-", "١", "1" * 5000, "\u0663", " 0 "]:
        csv_types({"better_response_id": v, "is_response_0_safe": v})


def test_json_document_bad_items_lose_only_themselves(tmp_path):
    path = tmp_path / "d.json"
    good = pku_rows(3)
    text = json.dumps({"data": [good[0], [1, 2], good[1], "x", {**good[2], "prompt": "@@"}]}, ensure_ascii=False)
    path.write_bytes(text.encode().replace(b"@@", b"\xff\xfe"))  # raw bad bytes inside one item
    rows = read(path)
    assert valid(rows) == {1: good[0], 3: good[1]}
    assert invalid(rows) == {2: "item is a JSON list, not an object", 4: "item is a JSON str, not an object",
                             5: "row holds bytes that are not valid UTF-8"}


# --------------------------------------------------------------------------- shards and globs


def write_shards(root: Path, per_file: list[int], group: int = 3) -> list[list[dict]]:
    out = []
    for i, n in enumerate(per_file):
        rows = [{**PKU, "prompt": f"shard {i} row {j}"} for j in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), root / f"part-{i:03d}.parquet", row_group_size=group)
        out.append(rows)
    return out


def test_directory_and_glob_of_parquet_shards(tmp_path):
    d = tmp_path / "shards"
    (d / "sub").mkdir(parents=True)
    shards = write_shards(d, [7, 1, 5])
    pq.write_table(pa.Table.from_pylist([PKU]), d / "sub" / "part-100.parquet")
    for junk in ("_SUCCESS", ".part-000.parquet.crc", "README.md", "_common_metadata"):
        (d / junk).write_bytes(b"not data")
    chunks, names, _ = chunks_for(str(d))
    assert [Path(n).name for n in names] == ["part-000.parquet", "part-001.parquet", "part-002.parquet",
                                             "part-100.parquet"]
    assert len(chunks) == 3 + 1 + 2 + 1  # one chunk per row group
    rows = [(c.file_index, r) for c in chunks for r in read_chunk(c)]
    for i, rows_i in enumerate(shards):
        got = [r for f, r in rows if f == i]
        assert got == [{**x, "row_number": n} for n, x in enumerate(rows_i, start=1)]  # numbered per file
    globbed = read_rows(str(d / "part-00[02].parquet"))
    assert [r["prompt"] for r in globbed] == [r["prompt"] for r in shards[0] + shards[2]]


def test_mixed_directory_of_formats(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    write(d / "a.jsonl.gz", pku_rows(2), gz=True)
    write(d / "b.csv", pku_rows(3), bom=True)
    write(d / "c.json", pku_rows(1))
    _, names, identity = chunks_for(str(d))
    assert [Path(n).name for n in names] == ["a.jsonl.gz", "b.csv", "c.json"]
    assert len(read_rows(str(d))) == 6 and len(identity) == 3


# --------------------------------------------------------------------------- whole-file problems


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.jsonl", "is not a file and not a hub dataset id"),
    (lambda d: (d / "e.jsonl").write_bytes(b"") and None or d / "e.jsonl", "the file is empty"),
    (lambda d: (d / "x.txt").write_text("{}\n") and d / "x.txt", "unknown file type"),
    (lambda d: (d / "x.parquet.gz").write_bytes(b"x") and d / "x.parquet.gz", "unknown file type"),
    (lambda d: (d / "dir").mkdir() or (d / "dir" / "notes.md").write_text("x") and d / "dir",
     "is a directory with no .jsonl, .json, .csv or .parquet files"),
    (lambda d: d / "nothing-*.jsonl", "the pattern matches no file"),
    (lambda d: (d / "bad.parquet").write_bytes(b"PAR1 not really") and d / "bad.parquet", "cannot be read as parquet"),
])
def test_unreadable_sources_are_one_sentence(tmp_path, make, match):
    with pytest.raises(SourceError, match=match) as exc:
        chunks_for(str(make(tmp_path)))
    one_sentence(exc)


def test_a_missing_relative_file_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("data/train.jsonl") and not is_hub_id("data/train.csv.gz")
    assert is_hub_id("PKU-Alignment/PKU-SafeRLHF-30K")
    with pytest.raises(SourceError, match="'data/train.jsonl' is not a file"):
        chunks_for("data/train.jsonl")


def corrupt(data: bytes) -> bytes:
    return data[:20] + bytes(b ^ 0xFF for b in data[20:60]) + data[60:]


@pytest.mark.parametrize("name, data, match", [
    ("d.jsonl.gz", b"this is not gzip", "cannot be read"),
    ("d.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 200, mtime=0)[:18], "cannot be read"),  # cut before any row
    ("d.csv.gz", corrupt(gzip.compress(b"".join(b"%d,%s\n" % (i, b"x" * (i % 37)) for i in range(400)), mtime=0)),
     "cannot be read"),  # flipped bits inside the deflate stream: zlib.error
    ("d.json", b'{"data": [1, 2', "not valid JSON"),
    ("d.json", b"[" * 100_000, "not valid JSON"),
    ("d.json", b'{"rows": []}', "expected a JSON list of row objects"),
])
def test_unreadable_files_fail_with_one_sentence(tmp_path, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SourceError, match=match) as exc:
        read(path)
    assert str(path) in one_sentence(exc)


@pytest.mark.parametrize("name, data", [
    ("d.jsonl", b"\n \n\t\r\n"), ("d.jsonl", BOM), ("d.jsonl", BOM + b"\n  \n"), ("d.csv", b"  \n \r\n"),
    ("d.csv", BOM), ("d.csv", b"prompt,chosen\n"), ("d.json", b" \n "), ("d.json", BOM), ("d.json", b"[]"),
    ("d.jsonl.gz", gzip.compress(b"\n\n", mtime=0)),
])
def test_files_of_only_whitespace_or_a_bom_have_no_rows(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    assert read(path) == []


def test_a_utf16_file_is_one_sentence_and_an_unparsed_line_keeps_its_text(tmp_path):
    from safedpo_ray.data.prepared import precheck
    from safedpo_ray.data.sources import chunks_for
    from safedpo_ray.data.stream import _raw

    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n", encoding="utf-16")
    chunks, names, _ = chunks_for(str(path))
    with pytest.raises(SourceError, match="UTF-16"):
        precheck(chunks, names, "auto")
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", oops}\n')
    row = next(read_chunk(chunks_for(str(bad))[0][0]))
    assert "__invalid__" in row and _raw(row) == '{"prompt": "caf\ufffd", oops}'
