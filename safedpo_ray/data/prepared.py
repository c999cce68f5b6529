"""Prepared pairs: written once per (source, settings, tokenizer), reused by every later run.

    <cache>/prepared/<key>/train.arrow   tokenized pairs after T, in source order (Arrow IPC)
                          /eval.arrow    held-out pairs (SafeDPO's T whatever the training mode)
                          /quarantine.jsonl, stats.json, complete.json (written last)

`<cache>` is `<run.storage_path>/.cache` when a storage path is set (a shared filesystem or an
object store, so every node and every job finds it), else `<run.output_dir>/.cache`. The key hashes
the source's identity (each file's name, size and modification time; a hub id and split; the
synthetic generator's settings), every data setting that changes the pairs, and the tokenizer's
files. The reference log-prob cache (data/reference.py) keys on this key plus the model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safedpo_ray.data.files import SourceError, _open_text_bytes
from safedpo_ray.data.readers import read_chunk
from safedpo_ray.data.schema import SCHEMAS, SchemaError, detect_schema
from safedpo_ray.data.stream import DataError, check_row, run_pipeline
from safedpo_ray.runtime import storage

VERSION = 2
COMPLETE = "complete.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def cache_base(run_cfg) -> str:
    """Where shared caches live: under the run storage when set, else under output_dir."""
    if run_cfg.storage_path:
        base = run_cfg.storage_path if storage.is_uri(run_cfg.storage_path) else str(Path(run_cfg.storage_path).resolve())
        return storage.join(base, ".cache")
    return str((Path(run_cfg.output_dir) / ".cache").resolve())


def local_cache_base(run_cfg) -> Path:
    return (Path(run_cfg.output_dir) / ".cache").resolve()


def tokenizer_fingerprint(name_or_path: str) -> str:
    """A digest of a tokenizer's files; a hub id that is not cached locally stands for itself."""
    path = Path(name_or_path)
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:
            return hashlib.sha256(f"hub:{name_or_path}".encode()).hexdigest()
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def data_key(data_cfg, identity: list[str], tokenizer_fp: str) -> str:
    settings = {k: v for k, v in vars(data_cfg).items() if k not in ("tokenize_batch_size", "chunk_mb")}
    payload = {"identity": identity, "settings": settings, "tokenizer": tokenizer_fp, "version": VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class PreparedData:
    key: str
    root: str  # a path or URI every node can read
    stats: dict[str, Any]
    reused: bool
    seconds: float

    def split(self, name: str) -> str:
        return storage.join(self.root, f"{name}.arrow")

    @property
    def has_eval(self) -> bool:
        return self.stats.get("eval", {}).get("pairs", 0) > 0

    def describe(self) -> str:
        verb = "reused" if self.reused else "prepared"
        return f"pairs {verb} in {self.seconds:.1f} s ({storage.redact(self.root)})"


# --------------------------------------------------------------------------- before any Ray work


def precheck(chunks, names: list[str], schema: str, *, sample_rows: int = 20, max_files: int = 64) -> list[str]:
    """Whole-file problems in one sentence before a cluster is touched: a source whose files have
    no rows, or a file whose first rows match no known schema. (Bad rows further in are
    quarantined, not fatal.) Returns the files without rows beside files with rows (read, and
    named on the console: one blank shard does not stop a run)."""
    checked: set[int] = set()
    empty: dict[str, list[str]] = {}  # split of the chunks → files with no rows
    with_rows: set[str] = set()
    for chunk in chunks:
        if chunk.file_index in checked or chunk.fmt in ("hub", "synthetic") or len(checked) >= max_files:
            continue
        if chunk.start > 0 and chunk.fmt == "jsonl":
            continue
        checked.add(chunk.file_index)
        rows = list(itertools.islice(read_chunk(chunk), sample_rows))
        name = names[chunk.file_index]
        single = not any(c.file_index == chunk.file_index and c is not chunk for c in chunks)
        if not rows and single:
            empty.setdefault(chunk.split, []).append(name)
            continue
        with_rows.add(chunk.split)
        parsed = [r for r in rows if "__invalid__" not in r]
        if not parsed and chunk.fmt != "parquet":
            with _open_text_bytes(chunk) as f:
                head = f.read(64)
            if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
                raise SourceError(f"{name}: the file looks UTF-16 encoded; save it as UTF-8")
        if not parsed:
            continue  # every sampled row is malformed: quarantined row by row
        fields = [set(r) - {"row_number"} for r in parsed]
        try:
            if schema == "auto":
                for f in fields:
                    try:
                        detect_schema(f)
                        break
                    except SchemaError:
                        continue
                else:
                    detect_schema(fields[0])
        except SchemaError as exc:
            raise SourceError(f"{name}: {exc}") from None
        if schema != "auto" and all(check_row(r, schema)[1] for r in parsed):
            missing = [f for f in SCHEMAS[schema] if f not in fields[0]]
            if missing:
                raise SourceError(f"{name}: data.schema={schema} but the rows lack {', '.join(missing)} "
                                  f"(found columns: {', '.join(sorted(fields[0]))})")
    for split, files in empty.items():
        if split not in with_rows and len(checked) < max_files:
            more = f" (nor do {len(files) - 1} more files of the source)" if len(files) > 1 else ""
            raise SourceError(f"{files[0]}: the file has no rows{more}")
    return [f for files in empty.values() for f in files]


def sample_texts(chunks, schema: str, limit: int = 4096) -> list[str]:
    """Texts of the first `limit` valid training rows (what the tiny preset's tokenizer learns)."""
    texts: list[str] = []
    rows = read = 0
    first_bad = None
    for chunk in chunks:
        if chunk.split == "eval":
            continue
        for row in read_chunk(chunk):
            read += 1
            pku, reasons = check_row(row, schema)
            if reasons:
                first_bad = first_bad or f"{chunk.uri}, row {row.get('row_number')}: {'; '.join(reasons)}"
                continue
            texts += [pku["prompt"], pku["response_0"], pku["response_1"]]
            rows += 1
            if rows >= limit:
                return texts
    if not texts:  # no tokenizer can be trained on nothing: say why, before Ray starts
        if not read:
            raise DataError("no training rows were read (is the training split empty?)")
        raise DataError(f"all {read} training rows are invalid, none would be kept (the first: {first_bad})")
    return texts


# --------------------------------------------------------------------------- prepare or reuse


def prepared_root(cfg, identity: list[str], tokenizer_path: str) -> tuple[str, str]:
    """(key, directory) of the prepared pairs of `cfg.data` with this tokenizer."""
    key = data_key(cfg.data, identity, tokenizer_fingerprint(tokenizer_path))
    return key, storage.join(cache_base(cfg.run), "prepared", key)


def is_prepared(cfg, identity: list[str], tokenizer_path: str) -> bool:
    return storage.exists(storage.join(prepared_root(cfg, identity, tokenizer_path)[1], COMPLETE))


def prepare_data(cfg, *, chunks, names: list[str], identity: list[str], tokenizer_path: str,
                 progress: bool = True, tokenizer_spec: dict | None = None, started=None) -> PreparedData:
    """The prepared pairs of `cfg.data` from the cache, or from one streaming Ray Data pass.
    `tokenizer_spec`: the tasks tokenize with the Rust backend alone (data/task_tokenizer.py).
    `started`: an Event set when the pass's first rows arrive (stream.run_pipeline)."""
    t0 = time.perf_counter()
    d = cfg.data
    key, root = prepared_root(cfg, identity, tokenizer_path)
    if not storage.exists(storage.join(root, COMPLETE)):
        local = local_cache_base(cfg.run) / "prepared" / key if storage.is_remote(root) else Path(root)
        tmp = storage.scratch_dir(local)
        tmp.mkdir(parents=True)
        params = {"schema": d.schema, "strict": d.strict, "eval_fraction": d.eval_fraction, "mode": d.mode,
                  "tokenizer": tokenizer_path, "trust_remote_code": cfg.model.trust_remote_code,
                  "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                  "max_row_bytes": d.max_row_bytes, "drop_duplicates": d.drop_duplicates,
                  "tokenizer_spec": tokenizer_spec}
        try:
            stats = run_pipeline(chunks, names, tmp, params, max_rows=d.max_rows, progress=progress,
                                 started=started)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        stats = {s: {**stats[s], "files": sorted({storage.redact(n) for c in chunks if c.split in (s, "hash")
                                                   for n in [names[c.file_index]]})} for s in stats}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        (tmp / COMPLETE).write_text(json.dumps({"key": key, "seconds": time.perf_counter() - t0,
                                                "identity": identity}))
        if storage.is_remote(root):
            for name in ("train.arrow", "eval.arrow", "quarantine.jsonl", "stats.json", COMPLETE):
                storage.upload(tmp / name, storage.join(root, name))  # the marker last
            shutil.rmtree(tmp, ignore_errors=True)
        elif local.exists():  # another run finished the same preparation meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(local)  # atomic: a half-written preparation is never picked up
        reused = False
    else:
        reused = True
    stats = json.loads(storage.read_text(storage.join(root, "stats.json")))
    check_pairs(stats, d.mode)
    return PreparedData(key=key, root=root, stats=stats, reused=reused, seconds=time.perf_counter() - t0)


def check_pairs(stats: dict[str, Any], mode: str) -> None:
    train = stats["train"]
    if train["pairs"] > 0:
        return
    if train["rows_read"] == 0:
        raise DataError("no training rows were read (is the training split empty?)")
    if train["rows_quarantined"] == train["rows_read"]:
        raise DataError(f"all {train['rows_read']} training rows were quarantined: none is a valid row "
                        "(see quarantine.jsonl for each row's reason)")
    valid = train["rows_read"] - train["rows_quarantined"]
    raise DataError(f"data.mode={mode} kept no training pairs: T discarded all of them ({valid} valid rows, "
                    f"{train['rows_quarantined']} quarantined; transform outcomes: {train['transform']})")


def copy_run_files(prepared: PreparedData, run_dir: Path) -> int:
    """data_stats.json and quarantine.jsonl of the preparation into the run directory; returns
    the number of quarantined rows."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "data_stats.json").write_text(json.dumps(prepared.stats, indent=2))
    quarantined = sum(s["rows_quarantined"] for s in prepared.stats.values())
    if quarantined:
        src = storage.join(prepared.root, "quarantine.jsonl")
        if storage.is_remote(src):
            storage.download(src, run_dir / "quarantine.jsonl")
        else:
            shutil.copyfile(src, run_dir / "quarantine.jsonl")
    return quarantined
