"""Where rows come from: resolve a source into files and read chunks of them, tolerating bad bytes.

A source is 'synthetic', a file, a directory or glob of shards, a URI that pyarrow opens
(`s3://`, `gs://`, `file://`), or a hub dataset id. It becomes a list of `Chunk`s, each a unit
one read task handles: a byte range of a large `.jsonl` file, a row group of a parquet file, or a
whole file of a format that cannot be split (`.json`, `.csv`, anything gzipped). How a chunk's
rows are read is data/readers.py.

Everything here is plain Python and pyarrow: the same reader serves Ray Data read tasks
(data/stream.py) and the small in-memory reads of evaluation and SFT (`read_rows`).
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from safedpo_ray.data.file_checks import Skipped, local_files
from safedpo_ray.errors import UserError

SYNTHETIC = "synthetic"
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BOM = b"\xef\xbb\xbf"
MAX_ROW_BYTES = 8 * 2**20


class SourceError(UserError):
    """The source as a whole cannot be read; the message says why and what is accepted."""


@dataclass(frozen=True)
class SourceFile:
    uri: str  # an absolute local path or a URI pyarrow opens
    fmt: str
    compressed: bool
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Chunk:
    """One read task's share. `start`/`end`: a byte range of an uncompressed .jsonl file (the
    rows whose line starts inside it), or a parquet row-group range; -1: the whole file.
    `first_row`: the row number of the chunk's first row when it is known in advance (0: counted
    by `read_chunk` from the newline counts in `lines_before`)."""

    file_index: int
    uri: str
    fmt: str  # jsonl, json, csv, parquet, hub, synthetic
    compressed: bool = False
    start: int = -1
    end: int = -1
    lines_before: int = 0  # newlines in [0, start) of a split .jsonl file
    first_row: int = 1
    split: str = "hash"  # "train", "eval", or "hash": by prompt hash (data.eval_fraction)
    options: dict = field(default_factory=dict, hash=False, compare=False)


def file_format(name: str) -> tuple[str, bool] | None:
    """(format, gzipped) from a file name, or None for a name we do not read."""
    lower = name.lower()
    compressed = lower.endswith(".gz")
    if compressed:
        lower = lower[:-3]
    fmt = FORMATS.get(os.path.splitext(lower)[1])
    if fmt is None or (compressed and fmt == "parquet"):
        return None
    return fmt, compressed


def _is_uri(source: str) -> bool:
    return "://" in source


def _filesystem(uri: str):
    """(pyarrow filesystem, path inside it)."""
    import pyarrow.fs as pafs

    if _is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _join_uri(uri: str, path: str) -> str:
    """The URI of `path` (a path inside the filesystem of `uri`), with `uri`'s options (its query:
    endpoint, region...), which the read tasks need to open it."""
    if not _is_uri(uri):
        return path
    scheme = uri.split("://", 1)[0]
    query = uri.split("?", 1)[1] if "?" in uri and scheme != "file" else ""
    joined = f"{scheme}://{path.lstrip('/')}" if scheme != "file" else f"file://{path}"
    return f"{joined}?{query}" if query else joined


def is_hub_id(source: str) -> bool:
    # A name with a data file's extension ('data/train.jsonl') is a missing file, not a hub id.
    return (source != SYNTHETIC and not _is_uri(source) and not Path(source).exists()
            and not any(c in source for c in "*?[") and source.count("/") == 1
            and not source.startswith((".", "/")) and file_format(source) is None
            and not source.lower().endswith(".gz"))


def resolve_files(source: str, report: list | None = None) -> list[SourceFile]:
    """The files of a local or remote file, directory or glob, sorted by path. One sentence and
    SourceError when there are none, a file is of an unknown type, or every file is empty. A
    local source reads each file once; what it does not read (a dangling link, a second path to
    a file, a hidden or non-data file, an empty file beside others) is appended to `report` as
    data.file_checks.Skipped, with "subdir:" entries for files read from subdirectories."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(source)
    # A URI's options ride in its query (s3://b/p?endpoint_override=...): its '?' is no glob.
    glob_chars = any(c in (path if _is_uri(source) else source) for c in "*?[")
    infos: list = []
    if not _is_uri(source):
        return _resolve_local(source, path, glob_chars, report)
    if glob_chars:
        base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        listed = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        infos = [i for i in listed if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        if not infos:
            raise SourceError(f"data source '{source}': the pattern matches no file")
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"data source '{source}' does not exist")
        if info.type == pafs.FileType.Directory:
            listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            infos = [i for i in listed if i.type == pafs.FileType.File and file_format(i.base_name)
                     and not i.base_name.startswith((".", "_"))]
            if not infos:
                raise SourceError(f"data source '{source}' is a directory with no .jsonl, .json, .csv or "
                                  ".parquet files (gzipped text files too)")
        else:
            infos = [info]
    files = []
    for info in sorted(infos, key=lambda i: i.path):
        kind = file_format(info.base_name)
        if kind is None:
            raise SourceError(f"{info.path}: unknown file type; use .jsonl, .json, .csv or .parquet "
                              "(.jsonl.gz, .json.gz, .csv.gz too), a directory or a glob of them")
        if not info.size:
            raise SourceError(f"{_join_uri(source, info.path)}: the file is empty")
        files.append(SourceFile(uri=_join_uri(source, info.path), fmt=kind[0], compressed=kind[1],
                                size=int(info.size), mtime_ns=int(info.mtime_ns or 0)))
    return files


def _resolve_local(source: str, path: str, glob_chars: bool, report: list | None) -> list[SourceFile]:
    if not glob_chars and not os.path.lexists(path):
        raise SourceError(f"data source '{source}' does not exist")
    if not glob_chars and not os.path.exists(path):
        raise SourceError(f"data source '{source}' is a symbolic link to '{os.readlink(path)}', which does not exist")
    found = local_files(path, pattern=glob_chars, is_data=lambda name: file_format(name) is not None)
    if not found.files:
        if glob_chars:
            raise SourceError(f"data source '{source}': the pattern matches no file"
                              + (f" ({'; '.join(str(s) for s in found.skipped[:3])})" if found.skipped else ""))
        raise SourceError(f"data source '{source}' is a directory with no .jsonl, .json, .csv or "
                          ".parquet files (gzipped text files too)")
    files, empty = [], []
    for p, st in found.files:
        kind = file_format(os.path.basename(p))
        if kind is None:
            raise SourceError(f"{p}: unknown file type; use .jsonl, .json, .csv or .parquet "
                              "(.jsonl.gz, .json.gz, .csv.gz too), a directory or a glob of them")
        if not st.st_size:
            empty.append(p)
            continue
        files.append(SourceFile(uri=p, fmt=kind[0], compressed=kind[1], size=int(st.st_size),
                                mtime_ns=int(st.st_mtime_ns)))
    if not files:  # nothing but empty files: the first is the sentence
        raise SourceError(f"{empty[0]}: the file is empty" + (f" (and {len(empty) - 1} more empty files)"
                                                               if len(empty) > 1 else ""))
    if report is not None:
        report += [Skipped(p, "empty file (0 bytes)") for p in empty] + found.skipped
        report += [f"subdir:{p}" for p in found.in_subdirectories]
    return files


def _open(uri: str):
    """A buffered binary reader for a local path or URI."""
    if not _is_uri(uri):
        return open(uri, "rb")
    fs, path = _filesystem(uri)
    return io.BufferedReader(fs.open_input_file(path), buffer_size=2**20)


def _open_text_bytes(chunk: Chunk):
    raw = _open(chunk.uri)
    return gzip.GzipFile(fileobj=raw) if chunk.compressed else raw


# --------------------------------------------------------------------------- chunking


def count_newlines(uri: str, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of an uncompressed file."""
    n = 0
    with _open(uri) as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(left, 8 * 2**20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def _parquet_chunks(index: int, sf: SourceFile, split: str) -> list[Chunk]:
    import pyarrow.parquet as pq

    try:
        with _open(sf.uri) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as exc:  # not parquet, truncated: the file as a whole is unreadable
        raise SourceError(f"{sf.uri}: cannot be read as parquet ({exc})") from None
    chunks, first = [], 1
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        chunks.append(Chunk(index, sf.uri, "parquet", start=g, end=g + 1, first_row=first, split=split))
        first += rows
    return chunks or [Chunk(index, sf.uri, "parquet", start=0, end=0, split=split)]


def plan_chunks(files: list[SourceFile], *, split: str = "hash", chunk_bytes: int = 64 * 2**20,
                first_index: int = 0, count: bool = True) -> list[Chunk]:
    """Chunks of `files`. A large uncompressed .jsonl file is cut into byte ranges; the newlines
    before each range (for row numbers) are counted here (`number_chunks`), or, with count=False, not
    at all: the preparation pipeline numbers the rows of such ranges as they arrive
    (`stream.RowNumbers`), with no pass over the files before reading them."""
    chunks: list[Chunk] = []
    for i, sf in enumerate(files, start=first_index):
        if sf.fmt == "parquet":
            chunks += _parquet_chunks(i, sf, split)
        elif sf.fmt == "jsonl" and not sf.compressed and sf.size > chunk_bytes:
            for start in range(0, sf.size, chunk_bytes):
                chunks.append(Chunk(i, sf.uri, "jsonl", start=start, end=min(sf.size, start + chunk_bytes),
                                    first_row=0, lines_before=0 if start == 0 else -1, split=split))
        else:
            chunks.append(Chunk(i, sf.uri, sf.fmt, compressed=sf.compressed, split=split))
    return number_chunks(chunks) if count else chunks


def number_chunks(chunks: list[Chunk]) -> list[Chunk]:
    """Fill in `lines_before` of byte-range chunks (their newlines counted in this process)."""
    ranges = [c for c in chunks if c.fmt == "jsonl" and c.end >= 0]
    pending = [c for c in ranges if c.lines_before < 0]
    if not pending:
        return chunks
    counts = dict(zip([(c.uri, c.start) for c in ranges],
                      (count_newlines(c.uri, c.start, c.end) for c in ranges)))
    before: dict[str, int] = {}
    out = []
    for c in chunks:
        if c.fmt == "jsonl" and c.end >= 0:
            c = replace(c, lines_before=before.get(c.uri, 0))
            before[c.uri] = before.get(c.uri, 0) + counts[(c.uri, c.start)]
        out.append(c)
    return out


# --------------------------------------------------------------------------- reading
