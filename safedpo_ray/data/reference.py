"""Reference log-probs, computed once by a pool of Ray actors and kept on disk for reuse.

β and Δ change neither the reference model nor the pairs, so a `train` run, every trial of a
`tune` experiment and any later run on the same inputs share one reference pass. The pass writes
the tokenized pairs plus `ref_chosen_logps`/`ref_rejected_logps` as parquet under

    <output_dir>/.cache/reference/<key>/{train,eval}/

where `key` hashes the reference model (its files), the compute precision, the tokenized pairs
(ids of every prompt and response, which carry the data, the transformation and the template)
and the tokenization settings. Changing any of them computes anew; nothing else is compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
ID_COLUMNS = ("pair_id", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_unsafe", "rejected_unsafe")
_COMPLETE = "complete.json"
_FULL_HASH_LIMIT = 512 * 2**20  # files above this are fingerprinted by size, mtime and sampled chunks


def _hash_file(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            return
        # Multi-GB weights: hashing them whole would cost minutes per run. Sample 16 chunks.
        for i in range(16):
            f.seek(i * (size // 16))
            h.update(f.read(2**20))
        h.update(str(path.stat().st_mtime_ns).encode())


def model_fingerprint(name_or_path: str) -> str:
    """A digest of a model's files (config, weights, tokenizer); a hub id resolves to its local
    snapshot when one is cached, else the id itself stands for the model."""
    path = Path(name_or_path)
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:  # not cached locally: the id (and its default revision) is all we know
            return hashlib.sha256(f"hub:{name_or_path}".encode()).hexdigest()
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        _hash_file(f, h)
    return h.hexdigest()


def pairs_fingerprint(ds) -> str:
    """Order-independent digest of a tokenized split: the ids and flags of every pair, by pair_id."""
    frame = ds.select_columns(list(ID_COLUMNS)).to_pandas().sort_values("pair_id")
    h = hashlib.sha256()
    for row in frame.itertuples(index=False):
        h.update(np.asarray(row.pair_id, dtype=np.int64).tobytes())
        for ids in (row.prompt_ids, row.chosen_ids, row.rejected_ids):
            h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        h.update(bytes([bool(row.chosen_unsafe), bool(row.rejected_unsafe)]))
    return h.hexdigest()


def reference_key(model_fp: str, *, precision: str, splits: dict[str, str], max_length: int,
                  max_prompt_length: int) -> str:
    payload = {"model": model_fp, "precision": precision, "splits": splits,
               "max_length": max_length, "max_prompt_length": max_prompt_length, "version": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class ReferenceLogps:
    """An actor: loads the reference model once and adds the reference log-probs of each batch it
    is given. Cast like the training workers' reference: parameters only."""

    def __init__(self, model_path: str, precision: str, trust_remote_code: bool, use_gpu: bool):
        import torch

        from safedpo_ray.models import load_model, load_tokenizer

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, trust_remote_code=trust_remote_code).to(self.device).eval()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for p in self.model.parameters():
            p.data = p.data.to(dtype)
        self.pad_id = load_tokenizer(model_path, trust_remote_code=trust_remote_code).pad_token_id

    def logps(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from safedpo_ray.algorithm import concatenated_logps
        from safedpo_ray.data.tokenize import collate_pairs

        collated = collate_pairs({k: batch[k] for k in ID_COLUMNS[1:]}, self.pad_id)
        with torch.no_grad():
            chosen, rejected = concatenated_logps(
                self.model, {k: v.to(self.device) for k, v in collated.items()})
        batch["ref_chosen_logps"] = chosen.double().cpu().numpy()
        batch["ref_rejected_logps"] = rejected.double().cpu().numpy()
        return batch


def read_split(root: Path, split: str):
    """A cached split as a materialized Ray Dataset, read here without a Ray Data job (the pairs
    of a preference dataset fit in memory; their ids are what workers need)."""
    import ray.data

    ds = ray.data.from_arrow(pq.read_table(Path(root) / split))
    ds.context.enable_progress_bars = False
    return ds


@dataclass
class ReferencePass:
    key: str
    path: Path
    computed: bool
    pairs: int
    seconds: float  # time this run spent on reference log-probs (reading the cache when reused)
    compute_seconds: float  # what computing them cost when they were made

    def describe(self) -> str:
        if self.computed:
            return (f"reference log-probs of {self.pairs} pairs computed in {self.compute_seconds:.1f} s "
                    f"and cached ({self.path})")
        return (f"reference log-probs of {self.pairs} pairs reused from the cache in {self.seconds:.1f} s "
                f"(computing them took {self.compute_seconds:.1f} s; {self.path})")


def worker_batches(n: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """Positions (in pair_id order) of the micro-batches the training workers evaluate with:
    rank r takes r, r+W, r+2W, ... in micro-batches (worker.Worker.rank_batches). Computing the
    reference on the same batches gives the same padded shapes, hence bit-identical log-probs, so an
    untrained policy's held-out margins are exactly 0 (bf16 kernels round differently otherwise)."""
    batches = []
    for rank in range(world_size):
        mine = list(range(rank, n, world_size))
        batches += [mine[b:b + micro_batch_size] for b in range(0, len(mine), micro_batch_size)]
    return batches


def _reference_pass(frame, *, actors, batches) -> pa.Table:
    """Reference log-probs of a split (a pandas frame sorted by pair_id), one batch per call,
    spread over an actor pool."""
    from ray.util import ActorPool

    jobs = [{k: frame[k].to_numpy()[idx] for k in ID_COLUMNS} for idx in batches]
    results = list(ActorPool(actors).map(lambda actor, job: actor.logps.remote(job), jobs))
    tables = [pa.table({k: list(v) if v.dtype == object else v for k, v in r.items()}) for r in results]
    return pa.concat_tables(tables).sort_by("pair_id")


def with_reference_logps(datasets: dict[str, Any], *, model_path: str, precision: str, cache_root: Path,
                         max_length: int, max_prompt_length: int, batch_size: int, num_actors: int,
                         cpus_per_actor: float = 1.0, use_gpu: bool = False, world_size: int = 1,
                         trust_remote_code: bool = False) -> tuple[dict[str, Any], ReferencePass]:
    """The tokenized splits with reference log-prob columns, from the cache or from one pass of
    `num_actors` actors over the micro-batches `world_size` training workers would form."""
    import ray

    t0 = time.perf_counter()
    fps = {split: pairs_fingerprint(ds) for split, ds in datasets.items()}
    key = reference_key(model_fingerprint(model_path), precision=precision, splits=fps,
                        max_length=max_length, max_prompt_length=max_prompt_length)
    root = Path(cache_root) / key
    marker = root / _COMPLETE
    computed = not marker.exists()
    if computed:
        tmp = root.with_name(f"{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pairs = 0
        actor_cls = ray.remote(num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0)(ReferenceLogps)
        actors = [actor_cls.remote(model_path, precision, trust_remote_code, use_gpu) for _ in range(num_actors)]
        try:
            for split, ds in datasets.items():
                frame = ds.select_columns(list(ID_COLUMNS)).to_pandas().sort_values("pair_id").reset_index(drop=True)
                table = _reference_pass(frame, actors=actors,
                                        batches=worker_batches(len(frame), world_size, batch_size))
                (tmp / split).mkdir(parents=True)
                pq.write_table(table, tmp / split / "pairs.parquet")
                pairs += table.num_rows
        finally:
            for actor in actors:
                ray.kill(actor)
        compute_seconds = time.perf_counter() - t0
        (tmp / _COMPLETE).write_text(json.dumps({"pairs": pairs, "compute_seconds": compute_seconds,
                                                  "model": model_path, "precision": precision,
                                                  "splits": sorted(datasets)}))
        if root.exists():  # another run finished the same pass meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(root)  # atomic: a half-written pass is never picked up
    meta = json.loads(marker.read_text())
    out = {split: read_split(root, split) for split in datasets}
    info = ReferencePass(key=key, path=root, computed=computed, pairs=int(meta["pairs"]),
                         seconds=time.perf_counter() - t0, compute_seconds=float(meta["compute_seconds"]))
    return out, info
