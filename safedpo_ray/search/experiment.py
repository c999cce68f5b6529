"""A Ray Tune experiment over the training config: shared data and reference log-probs, one
distributed training run per trial, selection under a safety target.

    safedpo-ray tune                                          # built-in quick sweep, CPU, minutes
    safedpo-ray tune --space paper-grid --config my.yaml      # Δ ∈ {0,2,5,10,20} × β ∈ {0.05,0.1}
    safedpo-ray tune --space optuna tune.num_samples=20 tune.scheduler=asha run.address=auto
    safedpo-ray tune --resume NAME                            # continue an interrupted experiment

The data pipeline (validate → T → tokenize) and the reference log-probs are computed once per
experiment and stored under keys that later runs reuse (data/reference.py); every trial reads
them and trains with no reference model. Each trial is a function trainable that builds and fits
a `TorchTrainer` (Ray Train V2 inside Tune), its reports forwarded by `TuneReportCallback`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from safedpo_ray.config.loader import build
from safedpo_ray.config.training import Config, ConfigError, config_from_dict, dump_config
from safedpo_ray.errors import UserError
from safedpo_ray.runtime import storage
from safedpo_ray.runtime import storage as run_storage
from safedpo_ray.runtime.ray_env import ensure_ray
from safedpo_ray.search import placement
from safedpo_ray.search.report import table, write_results
from safedpo_ray.search.scoring import HELD_OUT_PROMPTS, score_trial, write_held_out_prompts
from safedpo_ray.search.space import SearchSpec, apply_params, check_against_config, check_spec, param_space
from safedpo_ray.train.launch import resources_per_worker

SPEC_FILE = "search.yaml"
BASE_FILE = "base_config.yaml"
SHARED_FILE = "shared.json"


class SearchError(UserError):
    """An experiment that cannot start or continue as asked."""


def inputs_key(cfg: Config) -> str:
    """What the prepared pairs and reference log-probs depend on: a trial whose key differs from
    the experiment's (it searches a data or model key) prepares its own (still cached)."""
    return json.dumps({"data": cfg.to_dict()["data"], "model": [cfg.model.name_or_path, cfg.model.gguf_file],
                       "precision": cfg.train.precision, "seed": cfg.train.seed}, sort_keys=True)


def _read_shared(shared: dict[str, Any]):
    from safedpo_ray.data.prepared import PreparedData  # lazy: imports pyarrow
    from safedpo_ray.data.reference import ReferencePass  # lazy: imports pyarrow
    from safedpo_ray.train.trainer import Prepared  # lazy: imports pyarrow

    ref = ReferencePass(**shared["reference"])
    data = PreparedData(**shared["data"])
    return Prepared(data=data, stats=data.stats, model_path=shared["model_path"], reference=ref)


def _prepare_shared(cfg: Config, exp_dir: Path, remote: str | None = None) -> dict[str, Any]:
    """Run the pipeline and the reference pass for `cfg`; a JSON-able description trials read.
    Trials run on any node: every input they read is addressed where every node reads it (the
    caches under run.storage_path, and with an object store the held-out prompts' URI)."""
    from safedpo_ray.train.trainer import attach_reference, prepare  # lazy: imports pyarrow

    prepared = prepare(cfg, exp_dir)
    if not prepared.has_eval:
        raise SearchError("a search needs held-out pairs to compare trials: set data.eval_source, "
                          "data.eval_split or data.eval_fraction > 0")
    prompts = str(write_held_out_prompts(prepared.data.split("eval"), exp_dir))
    if remote:  # exp_dir is the driver's staging directory: other nodes' disks do not have it
        uri = storage.join(remote, HELD_OUT_PROMPTS)
        storage.upload(prompts, uri)
        prompts = uri
    attach_reference(cfg, prepared, shared=True)
    r, d = prepared.reference, prepared.data
    return {"inputs_key": inputs_key(cfg), "model_path": prepared.model_path, "stats": prepared.stats,
            "held_out_prompts": prompts,
            "data": {"key": d.key, "root": d.root, "stats": d.stats, "reused": d.reused, "seconds": d.seconds},
            "reference": {"key": r.key, "path": str(r.path), "computed": r.computed, "pairs": r.pairs,
                          "seconds": r.seconds, "compute_seconds": r.compute_seconds}}


def experiments_base(base: Config) -> tuple[Path, str | None]:
    """(the directory experiments are written in, the object-store URI they are published to).
    run.storage_path on a filesystem every node mounts holds the experiments themselves; an
    object-store storage_path gets Tune's state, every trial's outputs and the result files,
    staged under run.output_dir on the driver; without it, run.output_dir (one machine)."""

    path = base.run.storage_path
    if path and storage.is_remote(path):
        return Path(base.run.output_dir).resolve(), path
    return Path(path or base.run.output_dir).resolve(), None


def _finished_summary(root: str) -> dict[str, Any] | None:
    """The summary of a trial whose training finished under an earlier driver that died before
    Tune recorded it (Tune saves its state every few seconds): resuming reports it, not retrains."""

    try:
        summary = storage.read_json(storage.join(root, "summary.json"))
    except (OSError, ValueError):
        return None
    if summary is None:
        return None
    return summary if summary.get("eval_after") is not None else None


def run_trial(params: dict[str, Any], *, base: dict[str, Any], exp_dir: str, shared: dict[str, Any],
              spec: dict[str, Any], remote: str | None = None) -> None:
    """The function trainable: one full distributed training run with the trial's parameters."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from safedpo_ray.train.trainer import attach_reference, fit, prepare  # lazy: imports pyarrow

    t0 = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_params(config_from_dict(base), params)
    trials = Path(exp_dir) / "trials"
    cfg.run.output_dir, cfg.run.name, cfg.run.resume = str(trials.parent), trial_id, False
    run_dir = trials / trial_id

    # Where the trial's outputs live: the experiment directory, or (object store) its URI.
    root = run_storage.join(remote, "trials", trial_id) if remote else str(run_dir)
    storage = run_storage.join(remote, "train") if remote else str(Path(exp_dir) / "train")
    summary = _finished_summary(root)
    if summary is None:
        # A retried trial starts clean: its earlier attempt's metrics and checkpoints are not its own.
        shutil.rmtree(run_dir, ignore_errors=True)
        if remote:
            _remove(run_storage.join(storage, trial_id))
            _remove(root)
        else:
            shutil.rmtree(Path(storage) / trial_id, ignore_errors=True)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        if inputs_key(cfg) == shared["inputs_key"]:
            prepared = _read_shared(shared)
        else:
            prepared = prepare(cfg, run_dir)
            attach_reference(cfg, prepared, shared=True)
        if remote:
            run_storage.upload(run_dir / "config.yaml", run_storage.join(root, "config.yaml"))
        summary = fit(cfg, run_dir, prepared, storage=storage, started=t0, callbacks=[TuneReportCallback()],
                      root=root)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    final = {"eval/" + k: v for k, v in (summary.get("eval_after") or {}).items()}
    final.update(step=summary.get("last_step"), completed=1, reference_forwards=summary.get("reference_forwards", 0))
    search = build(SearchSpec, {k: v for k, v in spec.items() if k != "params"})
    if search.has_scorers and summary.get("model_dir"):
        # a path or a URI (s3://b/x: Path() would make it s3:/b/x)
        final.update(score_trial(search, cfg, str(summary["model_dir"]), run_dir, shared))
    ray.tune.report(final)


def _remove(uri: str) -> None:
    fs, path = storage.resolve(uri)
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass


def trial_placement(cfg: Config, local: bool, nodes: list[dict[str, float]] | None = None) -> placement.Placement:
    """How the cluster's nodes hold trials of `cfg` (search/placement.py); raises PlacementError
    when one trial can never be placed. A local Ray keeps 2 logical CPUs for Ray Data and
    scoring beyond the first trial, so on 2 cores trials run one at a time."""
    nodes = placement.cluster_nodes() if nodes is None else nodes
    return placement.plan(nodes, resources_per_worker(cfg.run), cfg.run.num_workers, keep_cpus=2 if local else 0)


def max_concurrent(cfg: Config, spec: SearchSpec, local: bool, nodes: list[dict[str, float]] | None = None) -> int:
    """Trials at once: `tune.max_concurrent_trials`, else as many as the nodes hold the workers of."""
    plan = trial_placement(cfg, local, nodes)
    return spec.max_concurrent_trials or plan.max_trials


def _rows(result_grid, spec: SearchSpec, base: Config) -> list[dict[str, Any]]:
    rows = []
    for result in result_grid:
        metrics = dict(result.metrics or {})
        params = {k: (result.config or {}).get(k) for k in spec.params}
        trial = metrics.get("trial_id") or str(result.path).rstrip("/").rsplit("/", 1)[-1]  # a path or URI
        cfg = None
        try:
            cfg = apply_params(base, {k: v for k, v in params.items() if v is not None})
        except ConfigError:
            pass
        row: dict[str, Any] = {"trial": trial, **params}
        if cfg is not None:
            row.setdefault("train.beta", cfg.train.beta)
            row.setdefault("train.delta", cfg.train.delta)
        if result.error is not None:
            row["status"] = "error"
            message = str(result.error).strip().splitlines()
            row["error"] = next((l for l in reversed(message) if l.strip()), type(result.error).__name__)[:300]
        else:
            row["status"] = "done" if metrics.get("completed") else "stopped"
        for key, value in metrics.items():
            if key.startswith(("eval/", "score/")) or key in ("step", "reference_forwards"):
                row[key] = value
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def _tuner(spec: SearchSpec, base: Config, exp_dir: Path, shared: dict[str, Any], local: bool, restore: bool,
           remote_base: str | None = None):
    remote = storage.join(remote_base, exp_dir.name) if remote_base else None
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), exp_dir=str(exp_dir), shared=shared,
                             spec=spec.to_dict(), remote=remote),
        # The trial itself reserves no CPU or GPU (Train V2 reserves its workers in a placement
        # group of its own); max_concurrent_trials keeps the trials to what the nodes hold.
        placement.trial_resources(),
    )
    if restore:
        return tune.Tuner.restore(remote or str(exp_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    search_alg = None
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=base.train.seed)
    elif spec.search == "random":
        search_alg = tune.search.BasicVariantGenerator(random_state=base.train.seed)
    scheduler = FIFOScheduler()
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", grace_period=spec.asha_grace_period,
                                  reduction_factor=spec.asha_reduction_factor, max_t=10**9)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.objective, mode=spec.mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=spec.num_samples,
                                    max_concurrent_trials=max_concurrent(base, spec, local)),
        run_config=tune.RunConfig(name=exp_dir.name, storage_path=remote_base or str(exp_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=spec.trial_retries),
                                  verbose=0),
    )


def prepare_experiment(spec: SearchSpec, base: Config, resume: str | None) -> tuple[SearchSpec, Config, Path]:
    """The experiment directory with its spec and base config saved (or, on resume, read back)."""
    output, remote = experiments_base(base)
    if resume:
        exp_dir = output / resume
        if remote and not (exp_dir / SPEC_FILE).exists():
            for name in (SPEC_FILE, BASE_FILE):  # resuming on another machine: the saved spec
                if storage.exists(storage.join(remote, resume, name)):
                    storage.download(storage.join(remote, resume, name), exp_dir / name)
        if not (exp_dir / SPEC_FILE).exists():
            raise SearchError(f"no experiment '{resume}' under {output} to resume (looked for {exp_dir / SPEC_FILE})")
        tree = yaml.safe_load((exp_dir / SPEC_FILE).read_text())
        params = tree.pop("params")
        spec = build(SearchSpec, tree, "tune.")
        spec.params = params
        base = config_from_dict(yaml.safe_load((exp_dir / BASE_FILE).read_text()))
        return spec, base, exp_dir
    spec.name = spec.name or time.strftime("tune-%Y%m%d-%H%M%S")
    exp_dir = output / spec.name
    if (exp_dir / SPEC_FILE).exists():
        raise SearchError(f"experiment '{spec.name}' already exists in {exp_dir}: continue it with "
                          f"--resume {spec.name}, or choose another tune.name")
    if not base.train.cache_reference:
        print("[safedpo] a search always shares one cached reference pass: train.cache_reference=true", flush=True)
        base.train.cache_reference = True
    if not base.train.eval_every:
        base.train.eval_every = spec.report_every  # trials report held-out metrics as they train
    check_spec(spec)
    check_against_config(spec, base)
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    (exp_dir / BASE_FILE).write_text(dump_config(base))
    return spec, base, exp_dir


def run_experiment(spec: SearchSpec, base: Config, *, resume: str | None = None) -> dict[str, Any]:
    """Run (or continue) the experiment; writes its result files and returns a summary."""
    t0 = time.time()

    spec, base, exp_dir = prepare_experiment(spec, base, resume)
    _, remote_base = experiments_base(base)
    remote = storage.join(remote_base, exp_dir.name) if remote_base else None
    local = not (base.run.address or os.environ.get("RAY_ADDRESS"))
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # scored metrics come at the end only
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ensure_ray(base.run)
    storage.check_cluster_storage(base.run)  # several nodes: the experiment needs shared storage
    storage.check_cluster_inputs({"model.name_or_path": base.model.name_or_path})  # ... and inputs too
    fit_plan = trial_placement(base, local)  # a trial that can never be placed stops here
    print(f"[safedpo] one trial: {base.run.num_workers} worker(s) of {fit_plan.worker}; the cluster holds "
          f"{fit_plan.max_trials} trial(s) at once", flush=True)
    shared = _prepare_shared(base, exp_dir, remote)
    if remote:  # workers on any node load the model from the store
        shared["model_path"] = storage.publish_driver_files(remote, exp_dir, shared["model_path"])
    (exp_dir / SHARED_FILE).write_text(json.dumps(shared, indent=2, default=str))
    ref = shared["reference"]
    print(f"[safedpo] experiment {exp_dir.name}: {ref['pairs']} pairs prepared once; reference log-probs "
          + ("computed" if ref["computed"] else "reused from the cache")
          + f" ({ref['compute_seconds']:.1f} s to compute) and shared by every trial", flush=True)
    restore = bool(resume)
    if restore:
        from ray import tune

        if not tune.Tuner.can_restore(remote or str(exp_dir)):
            restore = False  # interrupted before Tune saved any state: start the trials afresh
    tuner = _tuner(spec, base, exp_dir, shared, local, restore, remote_base)
    grid = tuner.fit()
    rows = _rows(grid, spec, base)
    out = write_results(exp_dir, rows, spec, base)
    trials_run = len([r for r in rows if r["status"] in ("done", "stopped")])
    # Time the shared reference pass saved: every trial but the one that paid for it would
    # have computed the same log-probs (a later experiment on the same inputs saves all of them).
    saved = ref["compute_seconds"] * (trials_run - (1 if ref["computed"] else 0))
    summary = {"experiment_dir": str(exp_dir), "rows": rows, "best": out["best"], "front": out["front"],
               "files": out["files"], "reference": ref, "reference_seconds_saved": round(max(saved, 0.0), 1),
               "wall_time_s": round(time.time() - t0, 1), "safety": spec.safety, "helpfulness": spec.helpfulness,
               "safety_threshold": spec.safety_threshold, "params": list(spec.params)}
    (exp_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    if remote:  # the result files beside Tune's state and the trials' outputs
        for item in sorted(exp_dir.iterdir()):
            if item.is_file():
                storage.upload(item, storage.join(remote, item.name))
        summary["experiment_uri"] = storage.redact(remote)
    summary["table"] = table(rows, spec, out["best"])
    return summary


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["", "== Search results ==", summary["table"], ""]
    best = summary["best"]
    if best is not None:
        lines.append(f"best trial: {best['trial']} (most helpful with {summary['safety']} >= "
                     f"{summary['safety_threshold']}): " + ", ".join(f"{k}={best.get(k)}" for k in summary["params"]))
        lines.append(f"reproduce it: safedpo-ray train --config {summary['files']['best.yaml']}")
    else:
        lines.append(f"no trial reached {summary['safety']} >= {summary['safety_threshold']} (see results.md)")
    lines.append(f"Pareto front (safety vs helpfulness): {', '.join(r['trial'] for r in summary['front']) or 'empty'}")
    lines.append(f"reference log-probs: one pass for the experiment; about {summary['reference_seconds_saved']} s "
                 "of reference passes saved")
    lines.append(f"experiment directory: {summary['experiment_dir']} ({summary['wall_time_s']} s)")
    return "\n".join(lines)
