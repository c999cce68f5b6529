"""Whether `train` starts its workers while the pairs are prepared (run.start_workers_early),
decided before any row is read; `trainer.train_while_preparing` does it."""

from __future__ import annotations

from safedpo_ray.config.training import Config
from safedpo_ray.core.loss_names import uses_reference
from safedpo_ray.runtime import storage as run_storage


def estimated_rows(plan, sample_bytes: int = 1 << 16) -> float | None:
    """The training rows in the sources (held-out files aside), estimated before any is read:
    synthetic ones exactly, uncompressed .jsonl from their bytes and the size of the first file's
    first rows; None for other formats."""
    chunks = [c for c in plan.chunks if c.split != "eval"]
    if not chunks:
        return None
    synthetic = sum(int(c.options.get("prompts", 0)) for c in chunks if c.fmt == "synthetic")
    files = [c for c in chunks if c.fmt != "synthetic"]
    if not files:
        return float(synthetic)
    if any(c.fmt != "jsonl" or c.compressed for c in files):
        return None
    try:
        sizes: dict[str, int] = {}
        total = 0
        for c in files:
            if c.end >= 0:
                total += c.end - max(c.start, 0)
                continue
            if c.uri not in sizes:
                fs, path = run_storage.resolve(c.uri)
                sizes[c.uri] = fs.get_file_info(path).size or 0
            total += sizes[c.uri]
        fs, path = run_storage.resolve(files[0].uri)
        with fs.open_input_stream(path) as f:
            head = f.read(sample_bytes)
    except Exception:  # noqa: BLE001  (an estimate only)
        return None
    rows, used = head.count(b"\n"), head.rfind(b"\n") + 1  # whole rows in the sample, and their bytes
    if not rows:
        return synthetic + 1.0 if head and len(head) < sample_bytes else None  # one row without a newline
    return synthetic + total * rows / used


def reference_pass_expected(cfg: Config, plan) -> bool:
    """Whether `attach_reference` would run a reference pass over the prepared pairs, judged
    before they exist: a run of max_steps that trains on less than a quarter of the rows in the
    sources computes its reference log-probs live."""
    if not cfg.train.cache_reference or not uses_reference(cfg.train.loss):
        return False
    if not cfg.train.max_steps:
        return True
    rows = estimated_rows(plan)
    if rows is not None and cfg.data.max_rows:
        rows = min(rows, cfg.data.max_rows)
    return rows is None or 4 * cfg.train.max_steps * cfg.train.global_batch_size > rows


def overlaps_preparation(cfg: Config, plan, model_path: str) -> bool:
    """Whether `train` starts the workers while the pairs are prepared (run.start_workers_early):
    the pairs are not prepared yet, no reference pass must come between (it needs the prepared
    pairs, and the CPUs or GPUs the workers would hold), and the cluster has a CPU beyond the
    workers' for Ray Data (else the workers would wait for pairs that never come)."""
    import ray

    from safedpo_ray.data.prepared import is_prepared  # lazy: imports pyarrow

    if not cfg.run.start_workers_early or reference_pass_expected(cfg, plan):
        return False
    if is_prepared(cfg, plan.identity, model_path):
        return False
    spare = ray.cluster_resources().get("CPU", 0) - cfg.run.num_workers * cfg.run.cpus_per_worker
    return spare >= 1
