"""Reading a chunk's rows, tolerating bad bytes: `read_chunk` yields the rows of one `Chunk`
(data/files.py) as dicts with their 1-based `row_number` in the file; a row that cannot be decoded
or parsed is yielded as `{"__invalid__": reason}` so that only it is quarantined (a repeated JSON
key, a cut gzip stream, bad UTF-8, an over-long line, a nested value too deep).

Plain Python and pyarrow: the same reader serves Ray Data read tasks (data/stream.py) and the
small in-memory reads of evaluation and SFT (`read_rows`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from typing import Any, Iterator

from safedpo_ray.data.files import (
    BOM,
    MAX_ROW_BYTES,
    Chunk,
    SourceError,
    _open,
    _open_text_bytes,
)
from safedpo_ray.data.synthetic import make_synthetic_rows


def _invalid(reason: str) -> dict[str, Any]:
    return {"__invalid__": reason}


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_json_line(line: bytes, max_row_bytes: int) -> dict[str, Any]:
    row = _parse_json_value(line, max_row_bytes)
    if "__invalid__" in row:  # the line as it was, for quarantine.jsonl (bad bytes shown as U+FFFD)
        row["__line__"] = line[:4000].decode("utf-8", errors="replace")
    return row


def _parse_json_value(line: bytes, max_row_bytes: int) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _invalid(f"line is not valid UTF-8 (byte 0x{line[exc.start]:02x} at byte {exc.start + 1})")
    dups: list = []
    try:
        value = json.loads(text, object_pairs_hook=lambda pairs: _object(pairs, dups))
    except json.JSONDecodeError as exc:
        return _invalid(f"line is not valid JSON: {exc.msg} at column {exc.colno}")
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        return _invalid(f"line is not valid JSON: {exc}")
    except RecursionError:
        return _invalid("line is not valid JSON: nested too deeply")
    if not isinstance(value, dict):
        return _invalid(f"line is a JSON {type(value).__name__}, not an object")
    if dups:
        return _invalid(_duplicate_reason(dups[0]))
    try:  # a lone surrogate can only come from a \\uD800-\\uDFFF escape: check rows that have one
        bad = _SURROGATE_ESCAPE.search(text) is not None and _has_bad_bytes(value)
    except RecursionError:
        return _invalid("row is nested too deeply")
    if bad:  # a "\ud800" escape: valid JSON, but no UTF-8 text (Arrow and tokenizers reject it)
        return _invalid("row holds a lone surrogate (\\uXXXX escape), not valid Unicode text")
    return value


_DUPLICATES = "\x00duplicate keys"  # marks an object of a .json document that repeats a key


def _object(pairs: list, dups: list) -> dict:
    """json's object hook: the dict, with each repeated key noted (json itself keeps the last
    value silently: a row with two different `better_response_id` would be trained on one)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: dict = {}
        for k, v in pairs:
            if k in seen:
                dups.append((k, seen[k], v))
                break
            seen[k] = v
    return out


def _duplicate_reason(dup: tuple) -> str:
    key, first, second = dup
    shown = lambda v: (repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "...")  # noqa: E731
    return (f"the key '{key}' appears twice ({shown(first)}, then {shown(second)}): which value is meant "
            "is unknown; keep one")


def _skip_line(f) -> int:
    """Skip to the end of the current line without holding it in memory; the bytes skipped."""
    n = 0
    while True:
        more = f.readline(2**20)
        n += len(more)
        if not more or more.endswith(b"\n"):
            return n


def _read_line(f, limit: int) -> tuple[bytes, int, int]:
    """One line without its end, its length without the end, and the bytes it takes in the file
    (with the end). At most `limit` + 2 bytes are kept; the rest of an over-long line is skipped
    unread into memory."""
    line = f.readline(limit + 2)
    consumed, tail = len(line), line[-2:]
    if consumed == limit + 2 and not line.endswith(b"\n"):
        while True:
            more = f.readline(2**20)
            consumed += len(more)
            tail = (tail + more)[-2:]
            if not more or more.endswith(b"\n"):
                break
    ending = 2 if tail.endswith(b"\r\n") else 1 if tail.endswith(b"\n") else 0
    return line.rstrip(b"\r\n"), consumed - ending, consumed


def _jsonl_rows(chunk: Chunk, max_row_bytes: int) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl file or byte range. A range whose `lines_before` is unknown (-1) numbers
    its rows from 1 + its newlines before them; the generator's return value is the newlines in
    [start, end), from which the driver numbers the next range (stream.RowNumbers)."""
    newlines = 0
    with _open_text_bytes(chunk) as f:
        line_no = 1
        end = chunk.end if chunk.end >= 0 else None
        pos = max(chunk.start, 0)
        if chunk.start > 0:
            line_no = max(chunk.lines_before, 0) + 1
            f.seek(chunk.start - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the previous chunk
                pos += _skip_line(f)  # the next line starts here: maybe past this chunk's end
                line_no += 1
                newlines += end is None or pos - 1 < end
        while end is None or pos < end:
            bom_room = len(BOM) if line_no == 1 and pos == 0 else 0  # a BOM is not the row's bytes
            try:
                line, length, consumed = _read_line(f, max_row_bytes + bom_room)
            except _CUT_ERRORS as exc:
                if not chunk.compressed or line_no == 1:
                    raise  # not gzip at all, or nothing readable: the file as a whole (read_chunk)
                yield {**_cut(exc, line_no), "row_number": line_no}  # the rows before it are kept
                break
            if not consumed:
                break
            pos += consumed
            newlines += consumed > length and (end is None or pos - 1 < end)  # its newline, if in range
            if line_no == 1 and line.startswith(BOM):
                line, length = line[len(BOM):], length - len(BOM)
            if length > max_row_bytes:
                yield {**_invalid(f"row is {length:,} bytes, over data.max_row_bytes ({max_row_bytes:,})"),
                       "row_number": line_no}
            elif line.strip():
                yield {**_parse_json_line(line, max_row_bytes), "row_number": line_no}
            line_no += 1
    return newlines


_CUT_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _cut(exc: Exception, line_no: int) -> dict[str, Any]:
    """The quarantined row where a gzipped file stops being readable (cut mid-stream, or
    corrupt): the rows before it were read; nothing after it can be."""
    return _invalid(f"the gzipped file cannot be read from this row on ({type(exc).__name__}: {exc}): "
                    f"it was cut or damaged; rows 1 to {line_no - 1} were read, the rest is lost")


def _decode_document(data: bytes, what: str) -> str:
    if data.startswith(BOM):
        data = data[len(BOM):]
    # Bad bytes become lone surrogates: only the rows holding them are quarantined.
    return data.decode("utf-8", errors="surrogateescape")


def _has_bad_bytes(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_bad_bytes(k) or _has_bad_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_bad_bytes(v) for v in value)
    return False


def _bad_or_deep(row: dict) -> bool:
    try:
        return _has_bad_bytes(row)
    except RecursionError:
        return True


def _json_rows(chunk: Chunk, max_row_bytes: int) -> Iterator[dict[str, Any]]:
    with _open_text_bytes(chunk) as f:
        text = _decode_document(f.read(), chunk.uri)
    if not text.strip():  # only spaces (or a BOM): no rows, which precheck reports
        return
    def marked(pairs: list) -> dict:
        dups: list = []
        out = _object(pairs, dups)
        if dups:
            out[_DUPLICATES] = dups[0]
        return out

    try:
        data = json.loads(text, object_pairs_hook=marked)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{chunk.uri}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                          "one object per line? name the file .jsonl") from None
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{chunk.uri}: not valid JSON ({exc or 'nested too deeply'})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict) and _DUPLICATES in data:
        raise SourceError(f"{chunk.uri}: {_duplicate_reason(data[_DUPLICATES])}")
    if not isinstance(data, list):
        raise SourceError(f"{chunk.uri}: expected a JSON list of row objects (or {{'data': [...]}})")
    for i, row in enumerate(data, start=1):
        dup = _nested_duplicate(row) if isinstance(row, dict) else None
        if not isinstance(row, dict):
            yield {**_invalid(f"item is a JSON {type(row).__name__}, not an object"), "row_number": i}
        elif dup is not None:
            yield {**_invalid(_duplicate_reason(dup)), "row_number": i}
        elif _bad_or_deep(row):
            yield {**_invalid("row holds bytes that are not valid UTF-8"), "row_number": i}
        else:
            yield {**row, "row_number": i}


def _nested_duplicate(value: Any, depth: int = 0):
    """The first repeated key marked anywhere in a row of a .json document (None: none)."""
    if depth > 100:
        return None
    if isinstance(value, dict):
        if _DUPLICATES in value:
            return value[_DUPLICATES]
        value = list(value.values())
    if isinstance(value, list):
        for v in value:
            found = _nested_duplicate(v, depth + 1)
            if found is not None:
                return found
    return None


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}
_BOOL_FIELDS = ("is_response_0_safe", "is_response_1_safe", "chosen_unsafe", "rejected_unsafe")
_ID_FIELDS = ("better_response_id", "safer_response_id")


def csv_types(row: dict[str, Any]) -> dict[str, Any]:
    """CSV has no types: labels and ids are parsed; anything unparseable stays the string it was,
    for validation to name."""
    for k in _BOOL_FIELDS:
        v = row.get(k)
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            row[k] = v.strip().lower() in _TRUE
        elif v == "":
            row[k] = None
    for k in _ID_FIELDS:
        v = row.get(k)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            try:
                row[k] = int(v)
            except ValueError:  # '²', '--1': isdigit, but no integer; validation names it
                pass
        elif v == "":
            row[k] = None
    return row


def _csv_rows(chunk: Chunk, max_row_bytes: int) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(max(max_row_bytes, 2**17))
    with _open_text_bytes(chunk) as raw:
        head = raw.read(len(BOM))
        if head != BOM:
            raw = io.BufferedReader(_Prepend(head, raw))
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(_after_blank_lines(text))
        i = 0
        while True:
            i += 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except _CUT_ERRORS as exc:
                if not chunk.compressed or i == 1:
                    raise  # nothing readable: the file as a whole (read_chunk)
                yield {**_cut(exc, i), "row_number": i}  # the records before it are kept
                return
            except csv.Error as exc:
                yield {**_invalid(f"CSV record cannot be parsed: {exc}"), "row_number": i}
                continue
            values = list(row.values())
            if None not in row and not str(values[0] or "").strip() and all(v is None for v in values[1:]):
                i -= 1  # a line of spaces: blank, like the empty lines csv skips (not a record)
                continue
            if None in row:
                yield {**_invalid(f"record has {len(reader.fieldnames or []) + len(row[None])} fields, "
                                  f"the header {len(reader.fieldnames or [])}"), "row_number": i}
            elif _has_bad_bytes(row):
                yield {**_invalid("record holds bytes that are not valid UTF-8"), "row_number": i}
            else:
                yield {**csv_types(dict(row)), "row_number": i}


def _after_blank_lines(lines):
    """The lines from the first that is not blank (a file of spaces has no header, no rows)."""
    it = iter(lines)
    for line in it:
        if line.strip():
            yield line
            break
    yield from it


class _Prepend(io.RawIOBase):
    """A raw stream that first returns `head`, then the rest of `stream`."""
    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(b))
        b[: len(data)] = data
        return len(data)


def _parquet_rows(chunk: Chunk, max_row_bytes: int) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with _open(chunk.uri) as f:
        pf = pq.ParquetFile(f)
        groups = list(range(chunk.start, chunk.end)) if chunk.start >= 0 else None
        i = chunk.first_row
        for batch in pf.iter_batches(batch_size=1024, row_groups=groups):
            for row in batch.to_pylist():
                yield {**row, "row_number": i}
                i += 1


def _hub_rows(chunk: Chunk, max_row_bytes: int) -> Iterator[dict[str, Any]]:
    import datasets

    o = chunk.options
    try:
        args = (chunk.uri, o["subset"]) if o.get("subset") else (chunk.uri,)
        ds = datasets.load_dataset(*args, split=o["split"], streaming=True)
    except Exception as exc:  # the hub, a missing split, or no network: say which source failed
        raise SourceError(f"could not load hub dataset '{chunk.uri}' split '{o['split']}': {exc}") from exc
    for i, row in enumerate(ds, start=1):
        yield {**row, "row_number": i}


def _synthetic_rows(chunk: Chunk, max_row_bytes: int) -> Iterator[dict[str, Any]]:
    o = chunk.options
    for i, row in enumerate(make_synthetic_rows(o["prompts"], seed=o["seed"], split=o["split"]), start=1):
        yield {**row, "row_number": i}


_READERS = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows,
            "hub": _hub_rows, "synthetic": _synthetic_rows}


def read_chunk(chunk: Chunk, *, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[dict[str, Any]]:
    """The rows of a chunk, numbered; undecodable rows as `{"__invalid__": reason}`. Returns (as a
    generator's value) the newlines of a .jsonl byte range (`_jsonl_rows`)."""
    try:
        return (yield from _READERS[chunk.fmt](chunk, max_row_bytes))
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a truncated or corrupt .gz, a vanished file
        raise SourceError(f"{chunk.uri}: cannot be read ({exc})") from exc
    except Exception as exc:  # a corrupt parquet file (pyarrow's ArrowInvalid is no OSError)
        import pyarrow as pa

        if isinstance(exc, pa.ArrowException):
            raise SourceError(f"{chunk.uri}: cannot be read ({exc})") from exc
        raise
