"""Checkpoint integrity: a manifest per rank, written last; verified before a checkpoint is loaded.

Every rank saves its DeepSpeed shards into a directory of its own, then writes
`manifest.rank<R>.json` (each file's size and sha256; atomically, after the shards), and Ray Train
uploads the directories into one `checkpoint_*` folder. A checkpoint is intact when the manifests
of all the ranks that saved it are there and every file they list has its size and hash. A folder
missing a manifest was written only in part (a process or node lost during the upload): it is
never loaded.

On resume every rank checks the sizes of all files and the hashes of its share of them (rank r
hashes the files of manifests r, r + world, ...); the ranks agree through one gather, so they all
load the same checkpoint or all skip it. A damaged latest checkpoint is skipped with a warning and
the one before it (Ray Train keeps `train.keep_checkpoints`) is loaded instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safedpo_ray.errors import UserError

MANIFEST = "manifest.rank{rank}.json"
MANIFEST_RE = re.compile(r"manifest\.rank(\d+)\.json$")
FORMAT = 1


class NoIntactCheckpoint(UserError, RuntimeError):
    """Every checkpoint the run has is damaged or incomplete (a user error: one sentence, exit 2)."""


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, *, rank: int, world_size: int, step: int | None = None) -> Path:
    """List what this rank wrote into `directory` (call after the shards are on disk)."""
    d = Path(directory)
    files = {}
    for path in sorted(p for p in d.rglob("*") if p.is_file()):
        rel = path.relative_to(d).as_posix()
        if MANIFEST_RE.search(path.name) or path.name.endswith(".tmp"):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": FORMAT, "rank": rank, "world_size": world_size, "step": step, "files": files}
    out = d / MANIFEST.format(rank=rank)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out)  # a manifest is whole or absent
    return out


def read_manifests(directory: str | os.PathLike) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """The manifests found in a checkpoint, by rank, and the problems with them."""
    d = Path(directory)
    manifests: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    for path in sorted(d.glob("manifest.rank*.json")):
        m = MANIFEST_RE.search(path.name)
        if not m:
            continue
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
                raise ValueError("unknown format")
            manifests[int(m.group(1))] = data
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name} is unreadable ({exc})")
    if not manifests and not problems:
        problems.append("no manifest: the checkpoint was written only in part (or by an older safedpo-ray)")
        return manifests, problems
    saved_world = max((m.get("world_size", 0) for m in manifests.values()), default=0)
    missing = [r for r in range(saved_world) if r not in manifests]
    if missing and not problems:
        problems.append(f"manifests of rank(s) {missing} missing: the checkpoint was written only in part")
    return manifests, problems


def verify(directory: str | os.PathLike, *, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems found in the checkpoint at `directory` ([] when intact). Sizes of every file are
    checked; hashes only of this rank's share of the manifests (all ranks together cover all)."""
    d = Path(directory)
    manifests, problems = read_manifests(d)
    if problems:
        return problems
    for saved_rank, manifest in sorted(manifests.items()):
        hash_here = saved_rank % max(1, world_size) == rank
        for rel, entry in manifest["files"].items():
            path = d / rel
            try:
                size = path.stat().st_size
            except OSError:
                problems.append(f"{rel} is missing")
                continue
            if size != entry["size"]:
                problems.append(f"{rel} has {size} bytes, its manifest says {entry['size']}")
            elif hash_here and file_sha256(path) != entry["sha256"]:
                problems.append(f"{rel} does not match its sha256")
    return problems


@dataclass
class Candidate:
    checkpoint: Any  # ray.train.Checkpoint
    step: int | None = None

    @property
    def name(self) -> str:
        return Path(str(self.checkpoint.path).rstrip("/")).name


@dataclass
class Restored:
    state: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    checkpoint: str | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)  # [{"checkpoint", "step", "problems"}]


def candidates() -> list[Candidate]:
    """The run's checkpoints, newest first: Ray Train's latest (`get_checkpoint()`), then the
    others it keeps (`get_all_reported_checkpoints()`, in the order they were reported)."""
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None:
        return []
    try:
        reported = list(ray.train.get_all_reported_checkpoints(timeout_s=30))
    except Exception:  # an older Ray Train, or the controller busy: the latest alone
        reported = []
    steps = {str(r.checkpoint.path): (r.metrics or {}).get("step") for r in reported}
    ordered = [Candidate(latest, steps.get(str(latest.path)))]
    for r in reversed(reported):
        if str(r.checkpoint.path) != str(latest.path):
            ordered.append(Candidate(r.checkpoint, steps.get(str(r.checkpoint.path))))
    return ordered


def _agree(strategy, problems: list[str]) -> list[str]:
    """Every rank's problems, on every rank (one gather), so all ranks decide alike."""
    import torch.distributed as dist

    if not (dist.is_initialized() and strategy.world_size > 1):
        return problems
    gathered: list[Any] = [None] * strategy.world_size
    dist.all_gather_object(gathered, problems)
    return [p for rank_problems in gathered for p in rank_problems]


def _broadcast(strategy, value):
    import torch.distributed as dist

    if not (dist.is_initialized() and strategy.world_size > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def restore(strategy) -> Restored:
    """Load the newest intact checkpoint of the run into the strategy's engine (all ranks call).
    Damaged or partial checkpoints are skipped with a warning; none at all: a fresh start."""
    found = _broadcast(strategy, candidates() if strategy.is_rank0 else None)
    restored = Restored()
    for cand in found:
        with cand.checkpoint.as_directory() as d:
            problems = sorted(set(_agree(strategy, verify(d, rank=strategy.rank, world_size=strategy.world_size))))
            if problems:
                restored.skipped.append({"checkpoint": cand.name, "step": cand.step, "problems": problems})
                continue
            state = strategy.load(d)
        restored.state, restored.step, restored.checkpoint = state, int(state.pop("step")), cand.name
        break
    if restored.skipped and strategy.is_rank0:
        for i, s in enumerate(restored.skipped):
            shown = "; ".join(s["problems"][:3]) + (f" (+{len(s['problems']) - 3} more)" if len(s["problems"]) > 3 else "")
            step = f" (step {s['step']})" if s["step"] is not None else ""
            if restored.checkpoint:
                instead = f"resuming from {restored.checkpoint} (step {restored.step})"
            elif i + 1 < len(restored.skipped):  # an earlier one is tried next (and found damaged too)
                later = restored.skipped[i + 1]
                instead = f"trying the earlier checkpoint {later['checkpoint']}"
            else:
                instead = "no earlier checkpoint left"
            print(f"[safedpo] warning: checkpoint {s['checkpoint']}{step} is damaged or incomplete: {shown}; "
                  f"{instead}", flush=True)
    if found and restored.checkpoint is None:
        raise NoIntactCheckpoint(
            f"none of the run's {len(found)} checkpoint(s) is intact ({', '.join(c.name for c in found)}): "
            "start the run again under a new run.name, or keep more with train.keep_checkpoints")
    return restored


def describe(restored: Restored | None) -> dict[str, Any]:
    """For the run's result: the checkpoint it resumed from and those it skipped ({} when fresh)."""
    if restored is None or not (restored.checkpoint or restored.skipped):
        return {}
    return {"restored_from": {"checkpoint": restored.checkpoint, "step": restored.step, "skipped": restored.skipped}}
