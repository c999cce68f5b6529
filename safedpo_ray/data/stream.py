"""The training data pipeline as one streaming Ray Data job: read → validate → split → T → tokenize.

    chunks (files, byte ranges, row groups)          data/files.py, planned on the driver
      └─ read + validate + held-out split (by prompt hash)   one Ray Data task per chunk
          └─ T + tokenize                             fused into the same task
              └─ the driver streams the result into train.arrow / eval.arrow / quarantine.jsonl

No list of rows is built anywhere: tasks yield Arrow batches of at most `BATCH` rows, the driver
iterates them (bounded by Ray Data's backpressure) and appends each batch to Arrow IPC files that
training workers memory-map (data/pairs.py). Statistics are counts, updated per batch. The
output order is the chunks' order (`preserve_order`), so a prepared split is the same file
whichever node read which chunk; each row keeps its file and row number (`pair_id` encodes both).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from safedpo_ray.data.files import Chunk
from safedpo_ray.data.readers import read_chunk
from safedpo_ray.data.schema import PKU_FIELDS, SCHEMAS, SchemaError, detect_schema, to_pku, validate_row
from safedpo_ray.data.sources import prompt_in_eval
from safedpo_ray.data.task_tokenizer import BackendTokenizer
from safedpo_ray.data.tokenize import tokenize_pairs
from safedpo_ray.data.transform import pair_category, transform_with_outcome
from safedpo_ray.errors import UserError
from safedpo_ray.runtime.ray_env import parallel_cpus

BATCH = 1024
ROW_BITS = 32  # pair_id = file_index << 32 | row_number: unique over every file of a run's sources
RAW_LIMIT = 4000  # characters of a bad row kept in quarantine.jsonl

PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.int64()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.int32())),
    ("chosen_unsafe", pa.bool_()),
    ("rejected_unsafe", pa.bool_()),
    ("prompt", pa.string()),
])
PAIR_COLUMNS = [f.name for f in PAIR_SCHEMA]

_OUT_SCHEMA = pa.schema([
    ("pair_id", pa.int64()), ("file_index", pa.int32()), ("row_number", pa.int64()),
    ("split", pa.string()), ("status", pa.string()), ("reasons", pa.string()), ("raw", pa.string()),
    ("dup", pa.int64()), ("category", pa.string()), ("outcome", pa.string()),
    *[f for f in PAIR_SCHEMA if f.name not in ("pair_id",)],
    ("prompt_truncated", pa.bool_()), ("chosen_truncated", pa.bool_()), ("rejected_truncated", pa.bool_()),
    ("node", pa.string()),  # the Ray node that read the row (reads spread over a cluster's nodes)
    ("chunk_seq", pa.int32()),  # the chunk's place in the run's chunk list (RowNumbers)
])
LINES = "lines"  # status of the row ending a .jsonl byte range: row_number = the newlines in the range


class DataError(UserError):
    """Invalid data in strict mode, or no usable pairs; the message names the row."""


def pair_id(file_index: int, row_number: int) -> int:
    return (int(file_index) << ROW_BITS) | int(row_number)


def row_location(pid: int) -> tuple[int, int]:
    """(file index, row number) of a pair_id."""
    return int(pid) >> ROW_BITS, int(pid) & ((1 << ROW_BITS) - 1)


# --------------------------------------------------------------------------- per row


def check_row(row: dict[str, Any], schema: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(the row in PKU form, []) or (None, reasons). With schema 'auto' each row is matched to
    the schema its columns fit, else checked against the closest one (naming what is missing)."""
    if "__invalid__" in row:
        return None, [row["__invalid__"]]
    fields = dict(row)
    fields.pop("row_number", None)
    if schema in ("auto", "pku") and _plain_valid_pku(fields):
        return fields, []  # what detect_schema + validate_row + to_pku give such a row (a fresh dict)
    kind = schema
    if schema == "auto":
        try:
            kind = detect_schema(fields)
        except SchemaError:
            kind = closest_schema(fields)
    reasons = validate_row(fields, kind)
    if reasons:
        return None, reasons
    return to_pku(fields, kind), []


def _plain_valid_pku(f: dict[str, Any]) -> bool:
    """True for a PKU row that `validate_row` passes, checked with exact types only (str texts,
    bool labels, int ids 0/1, as JSON rows have them); anything else (missing, NaN, numpy, 0/1
    labels, float ids, ...) takes the general path, which names what is wrong. With every PKU
    field present, 'auto' detects 'pku' too."""
    try:
        prompt, a, b = f["prompt"], f["response_0"], f["response_1"]
        s0, s1, better, safer = (f["is_response_0_safe"], f["is_response_1_safe"], f["better_response_id"],
                                 f["safer_response_id"])
    except KeyError:
        return False
    if not (type(prompt) is str and type(a) is str and type(b) is str and type(s0) is bool and type(s1) is bool
            and type(better) is int and type(safer) is int and better in (0, 1) and safer in (0, 1)):
        return False
    a, b = a.strip(), b.strip()
    return bool(prompt.strip()) and bool(a) and bool(b) and a != b


def closest_schema(columns) -> str:
    cols = set(columns)
    return min(("pku", "pairwise"), key=lambda n: (sum(f not in cols for f in SCHEMAS[n]), n != "pku"))


def _dup_key(pku: dict[str, Any]) -> int:
    text = "\x1f".join(str(pku[k]) for k in PKU_FIELDS)
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _raw(row: dict[str, Any]) -> str:
    if "__line__" in row:  # a line that did not parse: its text
        text = row["__line__"]
    else:
        text = json.dumps({k: v for k, v in row.items() if k not in ("row_number", "__invalid__")},
                          default=str, ensure_ascii=True)
    return text if len(text) <= RAW_LIMIT else text[:RAW_LIMIT] + "…"


# --------------------------------------------------------------------------- Ray Data operators


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, trust_remote_code: bool):
    from safedpo_ray.models.loading import load_tokenizer  # lazy: imports torch

    return load_tokenizer(path, trust_remote_code=trust_remote_code)  # a URI: its tokenizer files only


_BACKENDS: dict[str, Any] = {}  # tokenizer path → BackendTokenizer, one per task process


def _task_tokenizer(p: dict[str, Any]):
    """The Rust backend alone when the driver found it exact (`tokenizer_spec`), else transformers'."""
    spec = p.get("tokenizer_spec")
    if spec is None:
        return _tokenizer(p["tokenizer"], p["trust_remote_code"])
    if p["tokenizer"] not in _BACKENDS:
        _BACKENDS[p["tokenizer"]] = BackendTokenizer(spec)
    return _BACKENDS[p["tokenizer"]]


_OUT_NAMES = _OUT_SCHEMA.names
_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "prompt_truncated", "chosen_truncated",
                  "rejected_truncated")


def _build_batch(records: list[dict[str, Any]], p: dict[str, Any], seq: int) -> pa.Table:
    """T and tokenization of one batch of checked rows; one output row per input row."""
    n = len(records)
    cols: dict[str, list] = {name: [None] * n for name in _OUT_NAMES}  # built column by column
    pairs, owners = [], []
    category, outcome_col = cols["category"], cols["outcome"]
    for i, r in enumerate(records):
        pku = r.pop("pku", None)
        for k, v in r.items():
            cols[k][i] = v
        if pku is not None:
            mode = p["mode"] if r["split"] == "train" else "safedpo"
            pair, outcome = transform_with_outcome(pku, mode)
            category[i], outcome_col[i] = pair_category(pku), outcome
            if pair is not None:
                owners.append(i)
                pairs.append(pair)
    if pairs:
        tok = tokenize_pairs({k: [q[k] for q in pairs] for k in ("prompt", "chosen", "rejected")},
                             _task_tokenizer(p),
                             max_length=p["max_length"], max_prompt_length=p["max_prompt_length"])
        for k in _TOKEN_COLUMNS:
            col, values = cols[k], tok[k]
            for j, i in enumerate(owners):
                col[i] = values[j]
        for k in ("chosen_unsafe", "rejected_unsafe", "prompt"):
            col = cols[k]
            for i, pair in zip(owners, pairs):
                col[i] = pair[k]
    cols["node"] = [_node_id()] * n
    cols["chunk_seq"] = [seq] * n
    return pa.table(cols, schema=_OUT_SCHEMA)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside Ray (tests call process_chunk directly)
        return None


def _returned(gen, box: list):
    box.append((yield from gen))


def process_chunk(chunk: Chunk, p: dict[str, Any], seq: int = 0) -> Iterator[pa.Table]:
    """Read, check, split, transform and tokenize one chunk, in batches of at most BATCH rows.
    A .jsonl byte range ends with a LINES row (its newline count), for `RowNumbers` on the driver;
    one whose first line number is unknown (`lines_before` -1) numbers its rows from its start."""
    records: list[dict[str, Any]] = []
    box: list = []
    for row in _returned(read_chunk(chunk, max_row_bytes=p["max_row_bytes"]), box):
        number = int(row.get("row_number", 0))
        pku, reasons = check_row(row, p["schema"])
        split = chunk.split
        if split == "hash":
            prompt = (pku or row).get("prompt")
            split = "eval" if prompt_in_eval(prompt, p["eval_fraction"]) else "train"
        rec = {"pair_id": pair_id(chunk.file_index, number), "file_index": chunk.file_index,
               "row_number": number, "split": split}
        if reasons:
            if p["strict"]:
                raise DataError(f"{split} data, {chunk.uri}, row {number}: {'; '.join(reasons)}")
            rec.update(status="quarantined", reasons=json.dumps(reasons), raw=_raw(row))
        else:
            rec.update(status="ok", dup=_dup_key(pku), pku=pku)
        records.append(rec)
        if len(records) >= BATCH:
            yield _build_batch(records, p, seq)
            records = []
    if chunk.fmt == "jsonl" and chunk.end >= 0:  # a byte range: the next one starts after its lines
        records.append({"pair_id": -1, "file_index": chunk.file_index, "row_number": box[0], "split": chunk.split,
                        "status": LINES})
    if records:
        yield _build_batch(records, p, seq)


def _process_batch(batch: dict[str, np.ndarray], p: dict[str, Any]) -> Iterator[pa.Table]:
    for spec, seq in zip(batch["chunk"], batch["seq"]):
        yield from process_chunk(Chunk(**json.loads(spec)), p, int(seq))


# --------------------------------------------------------------------------- the driver's side


def _value_counts(column) -> tuple[list, list]:
    counts = column.value_counts()
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


class SplitWriter:
    """Pairs of one split appended to an Arrow IPC file (memory-mappable by the workers)."""
    def __init__(self, path):
        self.path, self.rows, self._writer = path, 0, None

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if self._writer is None:
            self._writer = pa.ipc.new_file(str(self.path), PAIR_SCHEMA)
        self._writer.write_table(table.select(PAIR_COLUMNS).cast(PAIR_SCHEMA))
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is None:  # an empty split is still a valid (empty) file
            self._writer = pa.ipc.new_file(str(self.path), PAIR_SCHEMA)
        self._writer.close()


class RowNumbers:
    """Row numbers of .jsonl byte ranges, made whole on the driver. Every range ends with a LINES
    row giving its newlines; one whose first line number is unknown (planned with count=False)
    numbers its rows from its own start. Ranges arrive in order (preserve_order), so the lines
    before each range are known when its rows arrive: no pass over the files to count newlines
    before reading them."""

    def __init__(self, chunks: list[Chunk]):
        self.chunks = chunks
        self.lines_at: dict[int, int] = {i: c.lines_before for i, c in enumerate(chunks) if c.lines_before >= 0}

    def apply(self, t: pa.Table) -> pa.Table:
        """`t` with absolute row numbers and pair ids, without its LINES rows."""
        import pyarrow.compute as pc

        seq = t.column("chunk_seq").to_numpy()
        lines = pc.fill_null(pc.equal(t.column("status"), LINES), False).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(lines):  # in order: each gives the next range its start
            s = int(seq[i])
            assert s in self.lines_at, f"rows of byte range {s} came before the ranges ahead of it"
            nxt = self.chunks[s + 1] if s + 1 < len(self.chunks) else None
            if nxt is not None and nxt.lines_before < 0 and nxt.uri == self.chunks[s].uri:
                self.lines_at[s + 1] = self.lines_at[s] + int(t.column("row_number")[i].as_py())
        if lines.any():
            t = t.filter(pa.array(~lines))
            seq = seq[~lines]
        relative = [s for s in np.unique(seq) if self.chunks[s].lines_before < 0]
        if not relative:
            return t
        offset = np.zeros(len(seq), dtype=np.int64)
        for s in relative:
            offset[seq == s] = self.lines_at[int(s)]
        for name in ("row_number", "pair_id"):  # pair_id: file_index << ROW_BITS | row_number
            t = t.set_column(t.schema.get_field_index(name), name,
                             pa.array(t.column(name).to_numpy() + offset, pa.int64()))
        return t


class Tally:
    """The statistics of data_stats.json, as counts updated per batch."""
    def __init__(self, modes: dict[str, str], drop_duplicates: bool = False):
        self.modes, self.drop_duplicates = modes, drop_duplicates
        self.splits: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, dict[int, int]] = {"train": {}, "eval": {}}  # dup key → first pair_id
        self.rows = self.quarantined = 0
        self.nodes: dict[str, int] = {}  # rows read per Ray node

    def split(self, name: str) -> dict[str, Any]:
        return self.splits.setdefault(name, {
            "mode": self.modes[name], "rows_read": 0, "rows_quarantined": 0, "rows_duplicate": 0,
            "transform": {}, "pairs": 0, "truncated": {"prompt": 0, "chosen": 0, "rejected": 0},
            "pair_types": {}})

    def add(self, t: pa.Table, names: list[str]) -> tuple[dict[str, pa.Table], list[dict[str, Any]]]:
        """Count a batch; return its pairs per split and its quarantine entries (bad rows and
        duplicates of an earlier row of the same split)."""
        for node, n in zip(*_value_counts(t.column("node"))):
            self.nodes[node or "local"] = self.nodes.get(node or "local", 0) + n
        d = t.select(["pair_id", "split", "status", "dup", "category", "outcome", "reasons", "raw",
                      "file_index", "row_number", "chosen_unsafe", "rejected_unsafe", "prompt_truncated",
                      "chosen_truncated", "rejected_truncated"]).to_pydict()
        keep: dict[str, list[int]] = {"train": [], "eval": []}
        quarantine = []
        drop = self.drop_duplicates
        current, s, seen = None, None, None
        for i, (split, status, dup, pid) in enumerate(zip(d["split"], d["status"], d["dup"], d["pair_id"])):
            if split != current:  # rows of a batch mostly share their split
                current, s, seen = split, self.split(split), self.seen[split]
            s["rows_read"] += 1
            if status != "ok":
                s["rows_quarantined"] += 1
                quarantine.append({"split": split, "file": names[d["file_index"][i]],
                                   "row_number": d["row_number"][i], "reasons": json.loads(d["reasons"][i]),
                                   "row": d["raw"][i]})
                continue
            first = seen.setdefault(dup, pid)
            if first != pid:
                s["rows_duplicate"] += 1
                if drop:
                    s["rows_quarantined"] += 1
                    f, n = row_location(first)
                    quarantine.append({"split": split, "file": names[d["file_index"][i]],
                                       "row_number": d["row_number"][i],
                                       "reasons": [f"duplicate of row {n} of {names[f]}"], "row": None})
                    continue
            counts = s["transform"].setdefault(d["category"][i], {})
            outcome = d["outcome"][i]
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "discarded":
                continue
            keep[split].append(i)
            s["pairs"] += 1
            truncated = s["truncated"]
            for k in ("prompt", "chosen", "rejected"):
                truncated[k] += int(bool(d[f"{k}_truncated"][i]))
            kind = f"{'unsafe' if d['chosen_unsafe'][i] else 'safe'}_{'unsafe' if d['rejected_unsafe'][i] else 'safe'}"
            s["pair_types"][kind] = s["pair_types"].get(kind, 0) + 1
        self.rows += t.num_rows
        self.quarantined += len(quarantine)
        return {k: t.take(v) for k, v in keep.items() if v}, quarantine


class Progress:
    """One line for preparation: rows, rows/s, quarantined so far. On a terminal the line is
    rewritten in place every second; in a log, a new line every 30 s."""

    def __init__(self, enabled: bool = True):
        import sys

        self.t0 = self.last = time.perf_counter()
        self.enabled, self.tty = enabled, sys.stdout.isatty()
        self.every_s = 1.0 if self.tty else 30.0

    def update(self, tally: Tally, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < self.every_s):
            return
        self.last = now
        rate = tally.rows / max(now - self.t0, 1e-9)
        line = (f"[safedpo] {'prepared' if final else 'preparing'}: {tally.rows:,} rows read ({rate:,.0f} rows/s), "
                f"{tally.quarantined:,} quarantined, {now - self.t0:.0f} s")
        if self.tty:
            print("\r" + line + ("\n" if final else ""), end="", flush=True)
        else:
            print(line, flush=True)


def free_cpus(wait_s: float = 1.0) -> float:
    """The CPUs free now, as a limit for the whole preparation. Tasks that have just returned (a
    pass over the files right before, as a newline count once was) keep their workers' leases for a moment:
    measured here, 0 or 2 of 4 CPUs free for 0.1 s, and a limit read then ran the whole
    preparation one task at a time. So: the most seen within `wait_s` (at once when all are free)."""
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    best, start = 0.0, time.monotonic()
    while True:
        best = max(best, ray.available_resources().get("CPU", 0))
        if best >= total or time.monotonic() - start >= wait_s:
            return best
        time.sleep(0.05)


def run_pipeline(chunks: list[Chunk], names: list[str], out_dir, params: dict[str, Any], *,
                 max_rows: int | None = None, progress: bool = True, started=None) -> dict[str, Any]:
    """Stream the chunks through Ray Data into out_dir/{train,eval}.arrow and quarantine.jsonl;
    returns the statistics per split. `started` (a threading.Event): set when the first rows
    arrive, i.e. once the read tasks hold their worker processes."""
    from pathlib import Path

    import ray.data
    from ray.data import ExecutionResources

    out_dir = Path(out_dir)
    specs = [{"chunk": json.dumps(asdict(c)), "seq": i} for i, c in enumerate(chunks)]
    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    # The options go on this dataset's own copy of the DataContext, never on the process's: set
    # there, the CPU limit read now (while other work held CPUs) and preserve_order stayed on every
    # later Ray Data pass of this process (a search's scoring, an evaluation after training).
    ctx = ds.context
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True  # the prepared order is the chunks' order
    # What preparation may hold: the CPUs free now (a search's running trials keep theirs), and
    # on a local Ray no more tasks than cores (each task process imports torch and transformers).
    ctx.execution_options.resource_limits = ExecutionResources(cpu=parallel_cpus(free_cpus()))
    ds = ds.map_batches(_process_batch, batch_size=1, batch_format="numpy", fn_kwargs={"p": params},
                        num_cpus=1)  # Ray Data's default strategy, SPREAD: every node of a cluster reads
    numbers = RowNumbers(chunks)
    tally = Tally({"train": params["mode"], "eval": "safedpo"}, params.get("drop_duplicates", False))
    writers = {s: SplitWriter(out_dir / f"{s}.arrow") for s in ("train", "eval")}
    bar = Progress(enabled=progress)
    with (out_dir / "quarantine.jsonl").open("w") as q:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                batch = numbers.apply(batch)
                if max_rows and tally.rows + batch.num_rows >= max_rows:  # the first max_rows rows read
                    batch = batch.slice(0, max_rows - tally.rows)
                pairs, bad = tally.add(batch, names)
                for split, table in pairs.items():
                    writers[split].write(table)
                for entry in bad:
                    q.write(json.dumps(entry, default=str) + "\n")
                bar.update(tally)
                if started is not None:
                    started.set()
                if max_rows and tally.rows >= max_rows:
                    break
        except Exception as exc:
            raise _user_cause(exc) from None
    for w in writers.values():
        w.close()
    bar.update(tally, final=True)
    for split in ("train", "eval"):
        tally.split(split)
    if len(tally.nodes) > 1 and progress:
        print(f"[safedpo] rows were read on {len(tally.nodes)} nodes", flush=True)
    return tally.splits


def _user_cause(exc: Exception) -> Exception:
    """A DataError/SourceError raised inside a Ray task, unwrapped (its message is the point)."""
    seen = exc
    while seen is not None:
        cause = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(cause, UserError) and not type(cause).__module__.startswith("ray"):
            return type(cause)(str(cause).splitlines()[-1] if "Traceback" in str(cause) else str(cause))
        if isinstance(seen, UserError) and type(seen).__module__.startswith("safedpo_ray"):
            return seen
        seen = cause
    return exc
