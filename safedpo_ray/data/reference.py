"""Reference log-probs, computed once by a pool of Ray actors and kept on disk for reuse.

β and Δ change neither the reference model nor the pairs, so a `train` run, every trial of a
`tune` experiment and any later run on the same inputs share one reference pass. The pass writes
the `pair_id`, `ref_chosen_logps` and `ref_rejected_logps`, row for row with the prepared pairs
(data/prepared.py), as Arrow files under

    <cache>/reference/<key>/{train,eval}.arrow

where `key` hashes the prepared pairs' key (source, data settings, tokenizer), the reference model
(its files) and the compute precision. Changing any of them computes anew.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from safedpo_ray.data.pairs import PairTable, open_split
from safedpo_ray.data.tokenize import collate_pairs
from safedpo_ray.models.precision import weights_dtype
from safedpo_ray.runtime import storage

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
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


def reference_key(prepared_key: str, model_fp: str, *, precision: str, layout: str = "padded",
                  logits_chunk_tokens: int = 0) -> str:
    # The batch layout is in the key: the workers' own forwards on the same micro-batches then
    # round exactly as the cached values did (held-out margins of an untrained policy are 0).
    payload = {"pairs": prepared_key, "model": model_fp, "precision": precision, "version": 2}
    if layout != "padded" or logits_chunk_tokens:
        payload["layout"] = [layout, int(logits_chunk_tokens)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class ReferenceLogps:
    """An actor: loads the reference model once and adds the reference log-probs of each batch it
    is given. Cast like the training workers' reference: parameters only."""

    def __init__(self, model_path: str, precision: str, trust_remote_code: bool, use_gpu: bool,
                 layout: str = "padded", logits_chunk_tokens: int = 0):
        import torch

        from safedpo_ray.core import logp_head  # lazy: imports torch
        from safedpo_ray.models.loading import load_model, load_tokenizer  # lazy: imports torch

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

        # Loaded in the compute dtype and cast on the host, then moved: the GPU never holds a
        # float32 copy, the host one 16-bit copy (parameters only; buffers stay as loaded).
        self.model = load_model(model_path, trust_remote_code=trust_remote_code,
                                dtype=weights_dtype(precision)).eval()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for p in self.model.parameters():
            p.data = p.data.to(dtype)
        self.model = self.model.to(self.device)
        self.pad_id = load_tokenizer(model_path, trust_remote_code=trust_remote_code).pad_token_id
        self.layout, self.layout_checked, self.precision = layout, False, precision
        if logits_chunk_tokens:
            logp_head.install(self.model, logits_chunk_tokens)  # the workers' layout, as they do
        self.tables: dict[str, Any] = {}

    def logps(self, split_uri: str, positions: list[int]) -> tuple[list[int], np.ndarray, np.ndarray]:
        import torch

        from safedpo_ray.core.algorithm import concatenated_logps  # lazy: imports torch

        if split_uri not in self.tables:
            self.tables[split_uri] = PairTable(split_uri)
        columns = self.tables[split_uri].batch(positions)
        if not self.layout_checked:  # as the workers check it (worker.check_layout)
            from safedpo_ray.core.algorithm import usable_layout  # lazy: imports torch

            self.layout_checked = True
            from safedpo_ray.data.packing import probe_pairs  # lazy: imports torch

            probe = probe_pairs(columns)
            self.layout, _ = usable_layout(self.model, self.layout, lambda layout: {
                k: v.to(self.device) for k, v in collate_pairs(probe, self.pad_id, layout=layout,
                                                               row_capacity=4096).items()},
                self.precision)
        collated = collate_pairs(columns, self.pad_id, layout=self.layout)
        with torch.no_grad():
            chosen, rejected = concatenated_logps(
                self.model, {k: v.to(self.device) for k, v in collated.items()})
        return positions, chosen.double().cpu().numpy(), rejected.double().cpu().numpy()


@dataclass
class ReferencePass:
    key: str
    path: str  # a path or URI: <cache>/reference/<key>
    computed: bool
    pairs: int
    seconds: float  # time this run spent on reference log-probs (reading the cache when reused)
    compute_seconds: float  # what computing them cost when they were made

    def split(self, name: str) -> str:
        return storage.join(self.path, f"{name}.arrow")

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


def _reference_pass(split_uri: str, n: int, *, actors, batches) -> pa.Table:
    """Reference log-probs of a prepared split, one micro-batch per call, over an actor pool."""
    from ray.util import ActorPool


    chosen, rejected = np.zeros(n), np.zeros(n)
    for positions, c, r in ActorPool(actors).map_unordered(
            lambda actor, job: actor.logps.remote(split_uri, job), batches):
        chosen[positions], rejected[positions] = c, r
    pair_ids = open_split(split_uri).column("pair_id")
    return pa.table({"pair_id": pair_ids, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected})


def reference_logps(prepared, *, model_path: str, precision: str, cache_base: str, local_base: Path,
                    batch_size: int, num_actors: int, cpus_per_actor: float = 1.0, use_gpu: bool = False,
                    world_size: int = 1, trust_remote_code: bool = False, layout: str = "padded",
                    logits_chunk_tokens: int = 0) -> ReferencePass:
    """Reference log-probs of a preparation's splits, from the cache or from one pass of
    `num_actors` actors over the micro-batches `world_size` training workers form. They are
    stored as `<cache_base>/reference/<key>/{train,eval}.arrow`, row for row with the pairs."""
    import ray


    t0 = time.perf_counter()
    key = reference_key(prepared.key, model_fingerprint(model_path), precision=precision, layout=layout,
                        logits_chunk_tokens=logits_chunk_tokens)
    root = storage.join(cache_base, "reference", key)
    marker = storage.join(root, _COMPLETE)
    computed = not storage.exists(marker)
    splits = [s for s in ("train", "eval") if prepared.stats.get(s, {}).get("pairs", 0) > 0]
    if computed:
        local = Path(local_base) / "reference" / key if storage.is_remote(root) else Path(root)
        tmp = storage.scratch_dir(local)
        tmp.mkdir(parents=True)
        actor_cls = ray.remote(num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0)(ReferenceLogps)
        actors = [actor_cls.remote(model_path, precision, trust_remote_code, use_gpu, layout, logits_chunk_tokens) for _ in range(num_actors)]
        pairs = 0
        try:
            for split in splits:
                n = prepared.stats[split]["pairs"]
                table = _reference_pass(prepared.split(split), n, actors=actors,
                                        batches=worker_batches(n, world_size, batch_size))
                with pa.ipc.new_file(str(tmp / f"{split}.arrow"), table.schema) as w:
                    w.write_table(table)
                pairs += n
        finally:
            for actor in actors:
                ray.kill(actor)
        compute_seconds = time.perf_counter() - t0
        (tmp / _COMPLETE).write_text(json.dumps({"pairs": pairs, "compute_seconds": compute_seconds,
                                                  "model": model_path, "precision": precision,
                                                  "prepared": prepared.key, "splits": splits}))
        if storage.is_remote(root):
            for name in [f"{s}.arrow" for s in splits] + [_COMPLETE]:  # the marker last
                storage.upload(tmp / name, storage.join(root, name))
            shutil.rmtree(tmp, ignore_errors=True)
        elif local.exists():  # another run finished the same pass meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(local)  # atomic: a half-written pass is never picked up
    meta = json.loads(storage.read_text(marker))
    return ReferencePass(key=key, path=root, computed=computed, pairs=int(meta["pairs"]),
                         seconds=time.perf_counter() - t0, compute_seconds=float(meta["compute_seconds"]))
