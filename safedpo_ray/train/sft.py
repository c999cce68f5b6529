"""`safedpo-ray sft`: supervised fine-tuning on safe responses, the step before SafeDPO.

    safedpo-ray sft                                         # synthetic data, tiny model, 2 CPU workers
    safedpo-ray sft --config safedpo_ray/configs/chain-sft-tiny.yaml
    safedpo-ray sft --config safedpo_ray/configs/chain-sft-pku.yaml run.address=auto   # on a cluster
    safedpo-ray sft data.source=my_sft.jsonl sft.responses=all_safe train.epochs=2

Same data sources, validation/quarantine, Ray Data pipeline, Ray Train + DeepSpeed workers
(ZeRO 0–3, LoRA), checkpoints, `run.resume`, metrics (metrics.jsonl, console, TensorBoard,
MLflow) and run layout as `safedpo-ray train`. Trains on the safe responses of preference data
(`sft.responses`: helpful_safe | all_safe) or on every row of a prompt/response file; the loss
covers response tokens only. `<run>/model` is a full Hugging Face model: pass it as
`model.name_or_path` to `safedpo-ray train` (see safedpo_ray/configs/chain-*.yaml).

Every output lands under the run root exactly as `train`'s do (runtime/storage.py):
`<run.output_dir>/<name>`, or `<run.storage_path>/<name>` on a shared path or an object store
(s3://, gs://...). The driver writes config.yaml, quarantine.jsonl, data_stats.json, the tiny
preset's init-model/, data/{train,eval}.arrow (the tokenized examples the workers memory-map)
and summary.json; rank 0 writes metrics.jsonl, tensorboard/, model/
(adapter/) and train_result.json through `RunOutputs` (staged and uploaded with an object store);
Ray Train writes the checkpoints. With an object store, summary.json's model_dir is the model's
URI, which `safedpo-ray train model.name_or_path=<URI>` loads (fetched once per node).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safedpo_ray.config.training import Config, dump_config
from safedpo_ray.data.pairs import write_split
from safedpo_ray.data.pipeline import DataError, read_splits, validate_rows, write_quarantine
from safedpo_ray.data.schema import SchemaError
from safedpo_ray.data.sft import PLAIN, SFT_COLUMNS, examples_dataset, format_sft_stats, sft_schema, validate_plain_rows
from safedpo_ray.runtime import storage as run_storage
from safedpo_ray.runtime.ray_env import ensure_ray
from safedpo_ray.train import preempt
from safedpo_ray.train.launch import Launch, launch
from safedpo_ray.train.summary import format_run_summary
from safedpo_ray.train.trainer import _check_resources, _check_run_dir, resolve_model, run_dir_for


def _validate(rows: list[dict[str, Any]], cfg: Config, split: str):
    columns = set().union(*(r.keys() for r in rows if "__invalid__" not in r)) if rows else set()
    kind = sft_schema(columns - {"row_number"}, cfg.data.schema) if rows else "pku"
    if kind == PLAIN:
        return kind, validate_plain_rows(rows, strict=cfg.data.strict, split=split)
    return kind, validate_rows(rows, kind, strict=cfg.data.strict, split=split)


@dataclass
class Prepared:
    """SFT examples as materialized Ray Datasets (written to data/*.arrow for the workers)."""
    datasets: dict[str, Any]
    stats: dict[str, Any]
    model_path: str


def prepare_sft(cfg: Config, run_dir: Path, root: str | None = None) -> Prepared:
    """Read and validate both splits, pick responses and tokenize (Ray Data); resolve the model.
    `root`: the run root (default `run_dir`); with an object store, what the driver wrote so far
    (config, quarantine, a tiny model it built) is uploaded there first, and the model path is
    its URI, so Ray Data's tasks and the workers on any node load the same model."""
    root = root or str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = read_splits(cfg.data, seed=cfg.train.seed)
    validated = {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        try:
            validated[split] = _validate(rows, cfg, split)
        except SchemaError as exc:
            raise DataError(f"{split} data: {exc}") from exc
    quarantined = validated["train"][1].quarantined + validated["eval"][1].quarantined
    if quarantined:
        write_quarantine(run_dir / "quarantine.jsonl", quarantined)
        print(f"[sft] {len(quarantined)} invalid rows quarantined to {run_dir / 'quarantine.jsonl'} "
              f"(first: row {quarantined[0]['row_number']}: {quarantined[0]['reasons'][0]})", flush=True)
    kind, train = validated["train"]
    text_keys = ("prompt", "response") if kind == PLAIN else ("prompt", "response_0", "response_1")
    # The tiny preset's tokenizer learns every text of the data (unsafe responses too), as the
    # preference stage's would: the SFT model's vocabulary then suits the SafeDPO stage.
    model_path = resolve_model(cfg, run_dir, [r[k] for r in train.rows for k in text_keys])
    model_path = run_storage.publish_driver_files(root, run_dir, model_path)
    ensure_ray(cfg.run)
    datasets, stats = {}, {}
    for split, held_out in (("train", False), ("eval", True)):
        kind, v = validated[split]
        if not v.rows:
            print(f"[sft] no {split} rows" + (": training without held-out metrics" if held_out else ""), flush=True)
            continue
        ds, s = examples_dataset(v.rows, kind=kind, responses=cfg.sft.responses, held_out=held_out,
                                 tokenizer_path=model_path, cfg=cfg.data, trust_remote_code=cfg.model.trust_remote_code)
        datasets[split] = ds
        selection = "every row" if kind == PLAIN else ("every response" if held_out else cfg.sft.responses)
        stats[split] = {"schema": kind, "selection": selection, "rows_read": v.rows_read,
                        "rows_quarantined": len(v.quarantined), **s}
    if "train" not in datasets:
        raise DataError("no valid training rows for SFT")
    run_storage.save_json(root, run_dir, "data_stats.json", stats)
    return Prepared(datasets=datasets, stats=stats, model_path=model_path)


def sft(cfg: Config) -> dict[str, Any]:
    """Run supervised fine-tuning as configured; returns the summary (also <run root>/summary.json)."""
    from safedpo_ray.train.sft_worker import sft_loop  # lazy: imports torch

    if not cfg.run.name:
        cfg.run.name = time.strftime("sft-%Y%m%d-%H%M%S")
    run_dir = run_dir_for(cfg)
    storage = cfg.run.storage_path or str(run_dir / "ray")
    _check_run_dir(cfg, run_dir, storage)  # a URI stays a string (Path() makes s3://b/x s3:/b/x)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    t0 = time.time()
    ensure_ray(cfg.run)
    preempt.rearm()  # ray.init replaced our SIGTERM/SIGINT handlers
    _check_resources(cfg)
    run_storage.check_cluster_storage(cfg.run)  # several nodes: outputs need shared storage
    run_storage.check_cluster_inputs({"model.name_or_path": cfg.model.name_or_path})  # ... and inputs too
    root = run_storage.run_root(cfg.run, cfg.run.name)
    prepared = prepare_sft(cfg, run_dir, root)
    # The tokenized examples as files every worker memory-maps (in the run root: on any node)
    examples = {}
    for split, ds in prepared.datasets.items():
        write_split(ds.select_columns(SFT_COLUMNS), run_dir / "data" / f"{split}.arrow", order_by="example_id")
        examples[split] = run_storage.publish_file(root, run_dir, "data", f"{split}.arrow")
    result = launch(Launch(
        sft_loop,
        {"config": cfg.to_dict(), "model_path": prepared.model_path, "run_dir": str(run_dir),
         "storage_root": root,  # where rank 0's outputs go
         "examples": examples},
        cfg, name=cfg.run.name, storage_path=storage, root=root, keep_checkpoints=cfg.train.keep_checkpoints))
    # Rank 0's result as written to the run storage (it may have run on another node).
    summary = {"run_dir": root, "stage": "sft", "data": prepared.stats,
               **run_storage.collect_result(root, result.return_value), "wall_time_s": round(time.time() - t0, 1)}
    run_storage.save_json(root, run_dir, "summary.json", summary)
    preempt.raise_if_stopped(summary, cfg.run.name)
    return summary


def format_sft_summary(summary: dict[str, Any]) -> str:
    return format_run_summary(
        "SFT run summary", format_sft_stats(summary["data"]), summary,
        "held-out response-token NLL (per token)                  before    after",
        (("safe responses (the SFT targets' kind)", "loss"), ("unsafe responses (never trained on)", "loss/unsafe")),
        "  (use as model.name_or_path for safedpo-ray train)")
