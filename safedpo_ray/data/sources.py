"""Sources as the pipeline sees them: a config's training and held-out data as read chunks, and
small sources read whole into memory (evaluation, SFT).

Reading itself (formats, compression, shards, bad bytes) is data/files.py, shared by both paths.
Rows are numbered from 1 in file order: `row_number` is the line of a .jsonl file and the record
of other formats.
"""

from __future__ import annotations

import hashlib
from typing import Any

from safedpo_ray.data.file_checks import Skipped, describe_files
from safedpo_ray.data.files import (  # noqa: F401  (re-exported: the names callers know)
    SYNTHETIC,
    Chunk,
    SourceError,
    is_hub_id,
    plan_chunks,
    resolve_files,
)
from safedpo_ray.data.readers import read_chunk
from safedpo_ray.runtime.storage import redact


def chunks_for(source: str, *, split: str = "train", chunk_split: str = "hash", subset: str | None = None,
               synthetic_prompts: int = 240, seed: int = 0, first_index: int = 0,
               chunk_bytes: int = 64 * 2**20, count: bool = True,
               min_tasks: int = 1, report: list | None = None) -> tuple[list[Chunk], list[str], list[str]]:
    """Read chunks of one source, the names of its files (indexed by `Chunk.file_index`) and
    their identities (name, size and modification time: what a prepared-data key hashes).
    `report`: the files not read and why (resolve_files).
    `split` is the hub split or synthetic split to read; `chunk_split` what the rows become."""
    if source == SYNTHETIC:
        chunk = Chunk(first_index, SYNTHETIC, "synthetic", split=chunk_split,
                      options={"prompts": synthetic_prompts, "seed": seed, "split": split})
        name = f"synthetic:{split}"
        return [chunk], [name], [f"{name}:{synthetic_prompts}:{seed}"]
    if is_hub_id(source):
        chunk = Chunk(first_index, source, "hub", split=chunk_split, options={"split": split, "subset": subset})
        return [chunk], [f"{source}:{split}"], [f"hub:{source}:{subset}:{split}"]
    if not any(c in source for c in "*?[") and "://" not in source:
        from pathlib import Path

        if not Path(source).exists():
            raise SourceError(
                f"data source '{source}' is not a file and not a hub dataset id (owner/name); use "
                "'synthetic', a .jsonl/.json/.parquet/.csv file (.gz too), a directory or glob of them, "
                "an s3:// or gs:// URI, or e.g. PKU-Alignment/PKU-SafeRLHF-30K")
    files = resolve_files(source, report)
    if min_tasks > 1:  # small inputs still spread over every CPU: smaller byte ranges
        total = sum(f.size for f in files if f.fmt == "jsonl" and not f.compressed)
        chunk_bytes = max(4 * 2**20, min(chunk_bytes, -(-total // min_tasks)))
    chunks = plan_chunks(files, split=chunk_split, first_index=first_index, chunk_bytes=chunk_bytes,
                         count=count)
    return chunks, [f.uri for f in files], [f"{f.uri}:{f.size}:{f.mtime_ns}" for f in files]


def config_chunks(cfg, seed: int, chunk_bytes: int = 64 * 2**20, count: bool = True, min_tasks: int = 1,
                  report: dict | None = None) -> tuple[list[Chunk], list[str], list[str]]:
    """Chunks of the training source and of the held-out data a `DataConfig` asks for, with the
    names and identities of their files. count=False: byte ranges of large .jsonl files are not
    numbered (the pipeline numbers their rows as they arrive: `stream.RowNumbers`). `report`:
    source → (its file names, what was not read and why), for the console."""
    chunks, names, identity = [], [], []

    def add(source: str, **kw) -> None:
        skipped: list = []
        c, n, i = chunks_for(source, first_index=len(names), seed=seed, chunk_bytes=chunk_bytes,
                             count=count, min_tasks=min_tasks, report=skipped, **kw)
        if report is not None:
            report[source] = (n, skipped)
        chunks.extend(c)
        names.extend(n)
        identity.extend(f"{c[0].split}={x}" for x in i)

    separate_eval = bool(cfg.eval_source or cfg.source == SYNTHETIC or (cfg.eval_split and is_hub_id(cfg.source)))
    add(cfg.source, split=cfg.split, subset=cfg.subset, synthetic_prompts=cfg.synthetic_prompts,
        chunk_split="train" if separate_eval else "hash")
    if cfg.eval_source:
        add(cfg.eval_source, split=cfg.eval_split or cfg.split, chunk_split="eval",
            synthetic_prompts=cfg.synthetic_eval_prompts)
    elif cfg.source == SYNTHETIC:
        add(SYNTHETIC, split="eval", chunk_split="eval", synthetic_prompts=cfg.synthetic_eval_prompts)
    elif separate_eval:
        add(cfg.source, split=cfg.eval_split, subset=cfg.subset, chunk_split="eval")
    return chunks, names, identity


def read_rows(source: str, *, split: str = "train", max_rows: int | None = None,
              synthetic_prompts: int = 240, seed: int = 0, subset: str | None = None) -> list[dict[str, Any]]:
    """All rows of a small source as dicts with a 1-based `row_number` (evaluation and SFT sets;
    training data streams through data/stream.py instead)."""
    chunks, _, _ = chunks_for(source, split=split, subset=subset, synthetic_prompts=synthetic_prompts, seed=seed)
    rows: list[dict[str, Any]] = []
    for chunk in chunks:
        for row in read_chunk(chunk):
            rows.append(row)
            if max_rows and len(rows) >= max_rows:
                return rows
    return rows


def prompt_in_eval(prompt: Any, fraction: float) -> bool:
    """Deterministic split by prompt text: the same prompt always lands on the same side."""
    digest = hashlib.sha256(str(prompt).encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def print_data_files(report: dict, no_rows: list[str] = ()) -> None:
    """The console's lines on the files of each file source (`sources.config_chunks(report=)`):
    read, in subdirectories, skipped and why; `no_rows`: files read that hold no row."""

    for source, (names, entries) in report.items():
        if source == SYNTHETIC or is_hub_id(source):
            continue  # generated rows or a hub dataset: no files to name
        skipped = [e for e in entries if isinstance(e, Skipped)]
        skipped += [Skipped(n, "no rows: only blank lines") for n in names if n in no_rows]
        subdirs = [e[len("subdir:"):] for e in entries if isinstance(e, str) and e.startswith("subdir:")]
        shown = [redact(n) for n in names if n not in no_rows]  # a URI's query may hold a key
        print(f"[safedpo] {describe_files(redact(source), shown, skipped, subdirs)}", flush=True)
