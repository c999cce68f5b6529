"""Which files of a local source are read, and why each other one is not.

    found = local_files("data/shards")         # Found(files=[(path, stat), ...], skipped=[...])
    print(describe_files("data/shards", names, skipped))

Every file a source reaches is either read or named with its reason: a dangling symbolic link,
a second way to the same file (a glob plus a symlink, a directory symlink: read once, the other
path named), a hidden or non-data file of a directory, a directory matched by a glob, an empty
file beside files with rows. A directory's subdirectories are read (symbolic links to directories
followed once, never in a loop) and said to be read. Remote sources (s3://, gs://) have no
symbolic links and are listed by pyarrow in data/files.py.
"""

from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


@dataclass
class Found:
    files: list[tuple[str, os.stat_result]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    in_subdirectories: list[str] = field(default_factory=list)


def _dangling(path: str) -> Skipped:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return Skipped(path, f"symbolic link to '{target}', which does not exist")


def _walk(top: str, found: Found, is_data, seen_dirs: set, depth: int = 0) -> list[tuple[str, os.stat_result]]:
    out = []
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError as exc:
        found.skipped.append(Skipped(top, f"directory cannot be listed: {exc.strerror or exc}"))
        return out
    for e in entries:
        path = e.path
        try:
            st = os.stat(path)  # follows symbolic links
        except FileNotFoundError:
            found.skipped.append(_dangling(path) if os.path.islink(path) else Skipped(path, "vanished while listed"))
            continue
        except OSError as exc:
            found.skipped.append(Skipped(path, f"cannot be read: {exc.strerror or exc}"))
            continue
        hidden = e.name.startswith((".", "_"))
        if stat.S_ISDIR(st.st_mode):
            if hidden:
                found.skipped.append(Skipped(path + "/", "hidden directory (name starts with '.' or '_'), not read"))
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                found.skipped.append(Skipped(path + "/", "directory already read through another path "
                                                         "(a symbolic link)"))
                continue
            seen_dirs.add(key)
            out += _walk(path, found, is_data, seen_dirs, depth + 1)
            continue
        if not stat.S_ISREG(st.st_mode):
            found.skipped.append(Skipped(path, "not a regular file"))
        elif hidden:
            found.skipped.append(Skipped(path, "hidden file (name starts with '.' or '_')"))
        elif not is_data(e.name):
            found.skipped.append(Skipped(path, "not a data file (.jsonl, .json, .csv, .parquet, or gzipped text)"))
        else:
            out.append((path, st))
            if depth:
                found.in_subdirectories.append(path)
    return out


def local_files(path: str, *, pattern: bool, is_data) -> Found:
    """The regular files of a local file, directory (recursive) or glob `path` (absolute), each
    file once, sorted by path; the rest in `skipped` with a reason. `is_data(name)`: a name the
    reader knows (a directory reads only those; a glob names the others as errors later)."""
    found = Found()
    if pattern:
        candidates = []
        for m in sorted(glob.glob(path, recursive=True)):
            try:
                st = os.stat(m)
            except FileNotFoundError:
                found.skipped.append(_dangling(m) if os.path.islink(m) else Skipped(m, "vanished while listed"))
                continue
            if stat.S_ISDIR(st.st_mode):
                found.skipped.append(Skipped(m + "/", "a directory the pattern matches (a glob reads the files "
                                                      "it matches; use a pattern such as dir/**/*.jsonl)"))
            elif stat.S_ISREG(st.st_mode):
                candidates.append((m, st))
            else:
                found.skipped.append(Skipped(m, "not a regular file"))
    elif os.path.isdir(path):
        st = os.stat(path)
        candidates = _walk(path, found, is_data, {(st.st_dev, st.st_ino)})
    else:
        candidates = [(path, os.stat(path))]
    first: dict[tuple[int, int], str] = {}
    for p, st in sorted(candidates, key=lambda c: c[0]):
        key = (st.st_dev, st.st_ino)
        if key in first:
            found.skipped.append(Skipped(p, f"the same file as {first[key]}, already read (reached twice, "
                                            "through a symbolic link or an overlapping pattern)"))
            if p in found.in_subdirectories:
                found.in_subdirectories.remove(p)
            continue
        first[key] = p
        found.files.append((p, st))
    return found


def describe_files(source: str, names: list[str], skipped: list, in_subdirectories: list[str] | None = None,
                   show: int = 8) -> str:
    """One console paragraph: the files read from `source`, those skipped and why."""
    def listing(items: list[str]) -> str:
        head = ", ".join(items[:show])
        return head + (f", and {len(items) - show} more (data_stats.json lists every file read)"
                       if len(items) > show else "")

    n = len(names)
    lines = [f"data source '{source}': {n} file{'s' if n != 1 else ''} read: {listing(names)}"]
    if in_subdirectories:
        lines.append(f"  {len(in_subdirectories)} of them in subdirectories (read too): "
                     f"{listing(in_subdirectories)}")
    if skipped:
        lines.append(f"  {len(skipped)} skipped, not read: " + "; ".join(str(s) for s in skipped[:show * 2])
                     + (f"; and {len(skipped) - show * 2} more" if len(skipped) > show * 2 else ""))
    return "\n".join(lines)
