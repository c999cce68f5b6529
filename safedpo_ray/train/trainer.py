"""Driver side of a run: prepare data and model, launch the Ray Train `TorchTrainer`, summarise.

    safedpo-ray train                                  # built-in default, local Ray, CPU
    safedpo-ray train --config safedpo_ray/configs/paper-7b-zero3.yaml run.address=auto
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safedpo_ray.config.training import TINY_PRESET, Config, dump_config
from safedpo_ray.core.loss_names import uses_reference
from safedpo_ray.data.pipeline import format_stats
from safedpo_ray.data.prepared import (
    PreparedData,
    cache_base,
    copy_run_files,
    is_prepared,
    local_cache_base,
    precheck,
    prepare_data,
    sample_texts,
)
from safedpo_ray.data.reference import ReferencePass, reference_logps
from safedpo_ray.data.sources import config_chunks, print_data_files
from safedpo_ray.data.task_tokenizer import backend_spec
from safedpo_ray.errors import UserError
from safedpo_ray.runtime import ray_env
from safedpo_ray.runtime import storage as run_storage
from safedpo_ray.runtime.ray_env import ensure_ray
from safedpo_ray.runtime.run_dirs import claim
from safedpo_ray.runtime.safe_loading import check_pickle_weights
from safedpo_ray.train import handoff, preempt
from safedpo_ray.train.early_start import overlaps_preparation
from safedpo_ray.train.launch import Launch, launch
from safedpo_ray.train.summary import format_run_summary


class RunError(UserError):
    """A run that cannot start as configured (e.g. it exists and resume is off)."""


@dataclass
class Prepared:
    data: PreparedData  # the prepared splits (Arrow files under the cache)
    stats: dict[str, Any]
    model_path: str
    reference: ReferencePass | None = None  # set when reference log-probs were computed or reused

    @property
    def has_eval(self) -> bool:
        return self.data.has_eval

    def pair_files(self) -> dict[str, Any]:
        """What workers open: the split files, and the reference log-prob files when cached."""
        splits = ["train"] + (["eval"] if self.has_eval else [])
        ref = self.reference
        return {"pairs": {s: self.data.split(s) for s in splits},
                "reference": {s: ref.split(s) for s in splits} if ref is not None else None}


@dataclass
class DataPlan:
    """The sources as read chunks, checked before any Ray work starts."""
    chunks: list
    names: list[str]
    identity: list[str]


def plan_data(cfg: Config) -> DataPlan:
    """Resolve the sources into chunks and check their files (no Ray: a bad source is reported
    before a cluster is touched)."""
    report: dict = {}
    chunks, names, identity = config_chunks(cfg.data, seed=cfg.train.seed, chunk_bytes=cfg.data.chunk_mb * 2**20,
                                            count=False,  # numbered as their rows arrive (stream.RowNumbers)
                                            min_tasks=4 * (os.cpu_count() or 1),  # small files: every CPU reads
                                            report=report)
    no_rows = precheck(chunks, names, cfg.data.schema) or []

    print_data_files(report, no_rows)  # every file of a source: read, or named with its reason
    return DataPlan(chunks, names, identity)


def attach_reference(cfg: Config, prepared: Prepared, *, shared: bool = False) -> None:
    """Give the prepared pairs their reference log-probs (cached, or one actor-pool pass).
    `shared`: for several runs (a search), so computed even when one run would not need all."""
    if not cfg.train.cache_reference:
        return
    if not uses_reference(cfg.train.loss):  # SimPO: no reference pass at all
        print(f"[safedpo] train.loss={cfg.train.loss} is reference-free: no reference model", flush=True)
        return
    pairs = prepared.stats["train"]["pairs"]
    trained = cfg.train.max_steps * cfg.train.global_batch_size if cfg.train.max_steps else None
    if not shared and trained is not None and trained < pairs:
        # A short run on a large dataset: a pass over every pair would cost more than it saves.
        print(f"[safedpo] reference log-probs computed live: this run trains on {trained:,} of {pairs:,} "
              "pairs (the cached pass pays off from one epoch, and in searches)", flush=True)
        return
    workers = cfg.run.num_workers
    prepared.reference = reference_logps(
        prepared.data, model_path=prepared.model_path, precision=cfg.train.precision,
        cache_base=cache_base(cfg.run), local_base=local_cache_base(cfg.run),
        batch_size=cfg.train.micro_batch_size, num_actors=workers, cpus_per_actor=cfg.run.cpus_per_worker,
        use_gpu=cfg.run.use_gpu, world_size=workers, trust_remote_code=cfg.model.trust_remote_code,
        layout=cfg.train.batch_layout, logits_chunk_tokens=cfg.train.logits_chunk_tokens,
    )
    print(f"[safedpo] {prepared.reference.describe()}", flush=True)


def torch_threads(run) -> int:
    """Intra-op threads for each training worker: its reserved CPUs; on a local Ray this process
    started, at least its share of the machine's cores (Ray's workers start with one thread, and a
    single worker on a laptop would leave the other cores idle)."""

    threads = max(1, int(run.cpus_per_worker))
    local = getattr(ray_env, "_local_cores", None)
    if local and not run.use_gpu:
        threads = max(threads, local // run.num_workers)
    return threads


def run_dir_for(cfg: Config) -> Path:
    if not cfg.run.name:
        cfg.run.name = time.strftime("safedpo-%Y%m%d-%H%M%S")
    # <output_dir>/<name>, or <storage_path>/<name> (a local staging copy for object stores)
    run_dir = run_storage.local_run_dir(cfg.run, cfg.run.name)

    # writable, or one sentence now; removed again if the command stops at a user error before Ray
    claim(run_dir, "run.storage_path" if cfg.run.storage_path and not run_storage.is_remote(
        run_storage.run_root(cfg.run, cfg.run.name)) else "run.output_dir")
    return run_dir


def resolve_model(cfg: Config, run_dir: Path, texts) -> str:
    """A path or hub id every worker can load: the tiny preset is built (tokenizer trained on the
    training texts), a GGUF file is converted once to safetensors, a local directory becomes
    absolute (Ray workers do not start in the driver's directory); hub ids pass through."""
    from safedpo_ray.models.loading import TINY_PRESET, convert_gguf  # torch: imported once a model is at hand

    m = cfg.model
    if m.name_or_path == TINY_PRESET:  # `texts`: a list, or a callable that reads a sample
        texts = texts() if callable(texts) else texts
        return str(tiny_model(cfg, run_dir / "init-model", texts))
    if m.gguf_file:
        gguf = Path(m.gguf_file)
        model_dir, name = (str(gguf.parent), gguf.name) if gguf.exists() else (m.name_or_path, m.gguf_file)
        key = hashlib.sha256(f"{Path(model_dir).resolve()}/{name}".encode()).hexdigest()[:12]
        cache = Path(cfg.run.output_dir).resolve() / ".cache" / f"gguf-{key}"
        return str(convert_gguf(model_dir, name, cache))
    if Path(m.name_or_path).is_dir():  # a local dir, e.g. an SFT run's model: workers start elsewhere
        return str(Path(m.name_or_path).resolve())
    return m.name_or_path


def tiny_model(cfg: Config, out: Path, texts: list[str]) -> Path:
    """The tiny preset in `out` (the run's init-model/, its reference for evaluation). It is
    built once per (training texts, seed, library versions) under the cache and copied into each
    run: training its tokenizer and writing the model took seconds of every run's start."""
    from safedpo_ray.models.loading import build_tiny_model, is_tiny_model  # lazy: imports torch

    if is_tiny_model(out):
        return out
    base = cache_base(cfg.run)
    if run_storage.is_remote(base):  # an object store: built where it is used, as before
        return build_tiny_model(out, texts, seed=cfg.train.seed)
    import importlib.metadata as md
    import shutil

    versions = {k: md.version(k) for k in ("torch", "transformers", "tokenizers")}
    payload = json.dumps({"texts": list(texts), "seed": cfg.train.seed, "versions": versions, "v": 1})
    cached = source = Path(base) / "tiny-model" / hashlib.sha256(payload.encode()).hexdigest()[:20]
    if not is_tiny_model(cached):
        source = run_storage.scratch_dir(cached)
        build_tiny_model(source, texts, seed=cfg.train.seed)
        try:
            source.rename(cached)  # atomic: a half-written model is never picked up
            source = cached
        except OSError:  # another run put one there meanwhile: copy ours
            pass
    tmp = run_storage.scratch_dir(out)
    shutil.copytree(source, tmp)
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted build of an earlier attempt left
    tmp.rename(out)
    if source != cached:
        shutil.rmtree(source, ignore_errors=True)
    return out


@dataclass
class ModelReady:
    path: str  # what workers load (resolve_model)
    tokenizer_spec: dict | None  # data/task_tokenizer.py; None: tasks load the transformers tokenizer


def task_tokenizer_spec(cfg: Config, plan: DataPlan, path: str, texts) -> dict | None:
    """The Rust-backend spec for preparation's tasks, checked on the data's first texts; None when
    the pairs are prepared already or the backend alone is not exact (or cannot be checked here:
    the tasks then load the tokenizer as before and report any error themselves)."""

    try:
        if is_prepared(cfg, plan.identity, path):
            return None
        from safedpo_ray.models.loading import load_tokenizer  # lazy: imports torch

        sample = texts[:192] if isinstance(texts, list) else sample_texts(plan.chunks, cfg.data.schema, limit=64)
        return backend_spec(load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code), sample)
    except Exception:  # noqa: BLE001  (an optimisation only)
        return None


def start_model(cfg: Config, run_dir: Path, plan: DataPlan, preload: tuple[str, ...] = ()):
    """`resolve_model` in a thread, started before Ray: building the tiny preset (tokenizer
    training, torch's import) or converting a GGUF file takes seconds that a local `ray.init`
    spends waiting for its processes; so does loading the tokenizer for `task_tokenizer_spec`.
    The modules in `preload` are imported first, in the same thread: one thread imports while
    Ray starts, never two (two start-up threads importing torch at once left one with a
    partially initialised torch: "module 'torch' has no attribute 'library'").
    Returns a future of a `ModelReady`; `.result()` re-raises its error."""
    import threading
    from concurrent.futures import Future


    check_pickle_weights(cfg.model.name_or_path)  # refused pickle weights: one sentence here, before Ray
    run_dir.mkdir(parents=True, exist_ok=True)
    future: Future = Future()
    texts = lambda: sample_texts(plan.chunks, cfg.data.schema)  # noqa: E731
    if cfg.model.name_or_path == TINY_PRESET:
        # read here, not in the thread: rows that are all invalid are one sentence before Ray starts
        texts = texts()

    def run() -> None:
        import_quietly(preload)
        try:
            path = resolve_model(cfg, run_dir, texts)
            future.set_result(ModelReady(path, task_tokenizer_spec(cfg, plan, path, texts)))
        except BaseException as exc:  # noqa: BLE001  (re-raised by .result() in the caller)
            future.set_exception(exc)

    # a daemon: a command that fails meanwhile (Ray unreachable) exits without waiting for it
    threading.Thread(target=run, name="safedpo-model", daemon=True).start()
    return future


def prepare(cfg: Config, run_dir: Path, plan: DataPlan | None = None, *, dashboard: bool = True,
            model=None, started=None) -> Prepared:
    """Prepared pairs of both splits (reused from the cache, or one streaming Ray Data pass:
    read, validate with quarantine, split, T, tokenize) and the model path workers load.
    `dashboard=False`: a local Ray started here has no dashboard (`safedpo-ray prepare`).
    `model`: the future of `start_model`, when the caller started it (else started here).
    `started`: an Event set once the Ray Data pass delivers its first rows."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = plan or plan_data(cfg)
    model = model or start_model(cfg, run_dir, plan, preload=("ray.data",))  # ~0.8 s, while Ray starts
    ensure_ray(cfg.run, dashboard=dashboard)  # while the model is resolved
    ready = model.result()
    model_path = ready.path
    if not is_prepared(cfg, plan.identity, model_path):  # Ray Data's read tasks run on any node
        run_storage.check_cluster_inputs({"data.source": cfg.data.source, "data.eval_source": cfg.data.eval_source})
    data = prepare_data(cfg, chunks=plan.chunks, names=plan.names, identity=plan.identity, tokenizer_path=model_path,
                        tokenizer_spec=ready.tokenizer_spec, started=started)
    quarantined = copy_run_files(data, run_dir)
    print(f"[safedpo] {data.describe()}", flush=True)
    if quarantined:
        print(f"[safedpo] {quarantined} rows quarantined, each with its file, row and reason: "
              f"{run_dir / 'quarantine.jsonl'}", flush=True)
    if not data.has_eval:
        print("[safedpo] no held-out pairs: training without held-out metrics", flush=True)
    return Prepared(data=data, stats=data.stats, model_path=model_path)


def _check_run_dir(cfg: Config, run_dir: Path, storage: str) -> None:
    existing = run_storage.exists(run_storage.join(str(storage), cfg.run.name))
    if cfg.run.resume and not existing and not run_dir.exists():
        raise RunError(f"run.resume=true but run '{cfg.run.name}' does not exist under {run_dir.parent}")
    if not cfg.run.resume and (existing or (run_dir / "metrics.jsonl").exists()):
        raise RunError(
            f"run '{cfg.run.name}' already exists in {run_dir}: pass run.resume=true to continue it, "
            "or choose another run.name"
        )


def _check_resources(cfg: Config) -> None:
    """Fail fast where Ray Train would wait forever: a local Ray lacking the GPUs asked for.
    (A cluster may still be scaling up, so there it is only a warning.)"""
    import ray

    if not cfg.run.use_gpu:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have >= cfg.run.num_workers:
        return
    local = not (cfg.run.address or os.environ.get("RAY_ADDRESS"))
    message = (f"run.use_gpu=true with run.num_workers={cfg.run.num_workers}, but the Ray cluster has "
               f"{have:g} GPUs")
    if local:
        raise RunError(message + ": set run.use_gpu=false, lower run.num_workers, or give run.address")
    print(f"[safedpo] warning: {message} now; waiting for the autoscaler to add them", flush=True)


PRELOAD = ("ray.data", "torch", "ray.train.torch", "safedpo_ray.train.worker")
"""What `fit` imports on the driver (about 2 s of CPU on the 2-core machine)."""


def import_quietly(names: tuple[str, ...]) -> None:
    """Import `names` (a local `ray.init` spends seconds waiting for the processes it starts,
    with CPU to spare; the imports fill that time instead of following it). A failed import is
    left for the place that needs the module, which imports it again and reports the error."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            return


def train(cfg: Config) -> dict[str, Any]:
    """Run SafeDPO training as configured; returns the summary (also written to summary.json)."""
    run_dir = run_dir_for(cfg)
    storage = cfg.run.storage_path or str(run_dir / "ray")
    _check_run_dir(cfg, run_dir, storage)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    t0 = time.time()
    plan = plan_data(cfg)  # a bad source is one sentence before any Ray work
    import ray  # noqa: F401  (Ray's core modules, before the start-up thread imports Ray Train)

    # imported, then the model built or converted, in one thread while ray.init waits for Ray's processes
    model = start_model(cfg, run_dir, plan, preload=PRELOAD)
    ensure_ray(cfg.run)
    preempt.rearm()  # ray.init replaced our SIGTERM/SIGINT handlers (train/preempt.py)
    _check_resources(cfg)
    run_storage.check_cluster_storage(cfg.run)  # several nodes: outputs need shared storage
    run_storage.check_cluster_inputs({"model.name_or_path": cfg.model.name_or_path})  # ... and inputs too
    root = run_storage.run_root(cfg.run, cfg.run.name)
    if overlaps_preparation(cfg, plan, model.result().path):
        return train_while_preparing(cfg, run_dir, plan, model, storage=storage, started=t0, root=root)
    prepared = prepare(cfg, run_dir, plan, model=model)
    prepared.model_path = run_storage.publish_driver_files(root, run_dir, prepared.model_path)
    attach_reference(cfg, prepared)
    return fit(cfg, run_dir, prepared, storage=storage, started=t0, root=root)


def train_while_preparing(cfg: Config, run_dir: Path, plan: DataPlan, model, *, storage: str, started: float,
                          root: str) -> dict[str, Any]:
    """`fit` with the pairs prepared in a thread meanwhile: the workers start once preparation's
    first rows arrive, load the model, then wait for the prepared files (train/handoff.py). A
    preparation error reaches the workers (they stop) and is raised here.

    Why after the first rows: Ray Train's controller, helper actors and workers would otherwise
    take the worker processes Ray started in advance, and the read tasks would wait for new ones
    (measured on 2 cores: 346 rows/s over preparation's first 34 s, against 3,400 alone)."""
    import threading
    from concurrent.futures import Future


    model_path = run_storage.publish_driver_files(root, run_dir, model.result().path)
    handoff.withdraw(root)
    future: Future = Future()
    first_rows, announced = threading.Event(), threading.Event()

    def run() -> None:
        try:
            prepared = prepare(cfg, run_dir, plan, model=model, started=first_rows)
            prepared.model_path = model_path
            if run_storage.is_remote(root):  # what preparation wrote into the run directory
                for name in ("data_stats.json", "quarantine.jsonl"):
                    if (run_dir / name).exists():
                        run_storage.upload(run_dir / name, run_storage.join(root, name))
            announced.set()  # from here a signal takes the checkpointing path (the workers may train)
            handoff.announce(root, pairs=prepared.pair_files()["pairs"], has_eval=prepared.has_eval)
            if uses_reference(cfg.train.loss) and cfg.train.cache_reference:
                print(f"[safedpo] reference log-probs computed live: the workers started while the pairs were "
                      f"prepared (run.start_workers_early); this run trains on "
                      f"{cfg.train.max_steps * cfg.train.global_batch_size:,} of "
                      f"{prepared.stats['train']['pairs']:,} pairs", flush=True)
            future.set_result(prepared)
        except BaseException as exc:  # noqa: BLE001  (raised by fit through the future)
            try:  # announced before the future is done: the caller may withdraw it then
                handoff.announce(root, error=f"preparation failed: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            except Exception as again:  # noqa: BLE001
                print(f"[safedpo] warning: could not tell the workers that preparation failed: {again}", flush=True)
            future.set_exception(exc)
        finally:
            first_rows.set()  # also when preparation ended without rows, or failed

    threading.Thread(target=run, name="safedpo-prepare", daemon=True).start()
    first_rows.wait()
    if future.done() and future.exception() is not None:
        handoff.withdraw(root)
        raise future.exception()  # no worker started yet: preparation's error as it is
    print("[safedpo] training workers start while the pairs are prepared", flush=True)
    preempt.waiting_for_pairs(lambda: not announced.is_set() and not future.done())
    return fit(cfg, run_dir, future, storage=storage, started=started, root=root, model_path=model_path)


def fit(cfg: Config, run_dir: Path, prepared, *, storage: str, started: float,
        callbacks: list | None = None, root: str | None = None, model_path: str | None = None) -> dict[str, Any]:
    """Train on prepared pairs with a Ray Train `TorchTrainer`; returns the summary (also written
    to <run_dir>/summary.json). `callbacks` go to Ray Train (a search passes Tune's reporter).
    `prepared`: a `Prepared`, or the future of one (`train_while_preparing`: the workers wait for
    the pairs, and `model_path` says what they load)."""
    from concurrent.futures import Future

    from safedpo_ray.train.worker import train_loop  # lazy: imports torch

    later = prepared if isinstance(prepared, Future) else None
    if later is None:
        model_path, pairs, has_eval = prepared.model_path, prepared.pair_files(), prepared.has_eval
    else:
        pairs, has_eval = {"pairs": None, "reference": None}, False  # announced to the workers later
    reference_cached = later is None and prepared.reference is not None
    # No Ray Datasets: every worker memory-maps the prepared files and picks its pairs by
    # position (train/sampler.py), a fixed order that exact resume and batch invariance need.
    result = launch(Launch(
        train_loop,
        {"config": cfg.to_dict(), "model_path": model_path, "run_dir": str(run_dir),
         "has_eval": has_eval, "reference_cached": reference_cached,
         **pairs,  # workers memory-map the prepared files
         "storage_root": root or str(run_dir),  # where rank 0's outputs go
         "torch_threads": torch_threads(cfg.run)},
        cfg, name=cfg.run.name, storage_path=storage, root=root or str(run_dir),
        keep_checkpoints=cfg.train.keep_checkpoints, callbacks=list(callbacks or [])))
    if later is not None:
        if (result.return_value or {}).get("no_pairs"):
            preempt.raise_if_signalled(cfg.run.name)  # a signal before the pairs were ready
        prepared = later.result()  # the pairs the workers trained on (or preparation's error)
    root = root or str(run_dir)
    # Rank 0's result as written to the run storage (it may have run on another node).
    summary = {"run_dir": root, "data": prepared.stats, **run_storage.collect_result(root, result.return_value),
               "wall_time_s": round(time.time() - started, 1)}
    summary["driver_node_id"] = run_storage.current_node_id()  # rank 0's is summary["worker_nodes"][0]
    if later is not None:
        summary["started_before_pairs"] = True  # the workers started while the pairs were prepared
    if prepared.reference is not None:
        r = prepared.reference
        summary["reference"] = {"key": r.key, "computed": r.computed, "pairs": r.pairs,
                                "seconds": round(r.seconds, 2), "compute_seconds": round(r.compute_seconds, 2)}
    run_storage.save_json(root, run_dir, "summary.json", summary)
    preempt.raise_if_stopped(summary, cfg.run.name)  # signalled: exit 128 + signal, saying how to resume
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    return format_run_summary(
        "SafeDPO run summary", format_stats(summary["data"]), summary,
        "held-out implicit-reward metrics (ties count half)      before    after",
        (("preference accuracy, safe-safe pairs", "rewards/accuracies/safe_safe"),
         ("safe-over-unsafe accuracy, mixed pairs", "rewards/accuracies/safe_unsafe"),
         ("reward margin, safe-safe pairs", "rewards/margins/safe_safe"),
         ("reward margin, mixed pairs", "rewards/margins/safe_unsafe")))
