"""What a `--model` argument means: a model dir, a training run dir, or a LoRA adapter.

A run directory (the output of `safedpo-ray train`) holds `model/` (full weights, or `model/adapter`
for LoRA runs) and, for the tiny preset, `init-model/` (the reference); other runs name their base
model in `config.yaml`.

A run in an object store (`s3://bucket/runs/NAME`, or `.../NAME/model`) is resolved on the driver
by reading only small files through storage (listings, config.yaml, adapter_config.json): the
ModelSpec keeps URIs, and whatever loads the weights (an actor, on any node) fetches them into its
own node's cache (`load_model`, `load_tokenizer` and `load_policy` call `storage.localize`). The
driver never hands a path of its own disk to another node.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from safedpo_ray.errors import EvalError  # noqa: F401 (raised here; imported from here by evaluate/)
from safedpo_ray.models.loading import load_model
from safedpo_ray.runtime import storage


@dataclass
class ModelSpec:
    label: str
    path: str
    """Full model dir or hub id; with `adapter`, the base model the adapter sits on."""
    adapter: str | None = None
    reference: str | None = None
    """Reference model for implicit rewards; None with an adapter means the adapter-free base."""
    run_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _adapter_dir(d: Path) -> Path | None:
    for cand in (d, d / "adapter"):
        if (cand / "adapter_config.json").exists():
            return cand
    return None


def _run_base_model(run: Path) -> str | None:
    cfg = run / "config.yaml"
    return _base_model_of(cfg.read_text()) if cfg.exists() else None


def _resolve_remote(path: str, *, label: str | None, reference: str | None) -> ModelSpec:
    """`resolve_model` for an object-store URI: the same layout rules, read through storage
    without downloading weights; every path in the spec is a URI (or a hub id)."""
    path = path.rstrip("/")
    if not storage.exists(path):
        raise EvalError(f"nothing at '{storage.redact(path)}'")
    run = path if storage.exists(storage.join(path, "model")) else None
    model_dir = storage.join(path, "model") if run else path
    if run is None and storage.basename(path) == "model" and storage.exists(
            storage.join(storage.parent(path), "init-model")):
        run = storage.parent(path)  # <run>/model given directly
    adapter = next((c for c in (model_dir, storage.join(model_dir, "adapter"))
                    if storage.exists(storage.join(c, "adapter_config.json"))), None)
    init = storage.join(run, "init-model") if run and storage.exists(storage.join(run, "init-model")) else None
    name = label or storage.basename(run or path)
    if adapter is not None:
        base = json.loads(storage.read_text(storage.join(adapter, "adapter_config.json"))).get("base_model_name_or_path")
        if init is not None and (not base or not (storage.is_uri(base) or Path(base).exists())):
            base = init  # the adapter names the training node's path of its base: the run's init-model
        if not base:
            raise EvalError(f"{storage.redact(adapter)}: adapter_config.json names no base model; "
                            "evaluate the merged export instead")
        return ModelSpec(label=name, path=str(base), adapter=adapter, reference=reference, run_dir=run)
    if not storage.exists(storage.join(model_dir, "config.json")):
        raise EvalError(f"{storage.redact(path)}: no config.json (expected a Hugging Face model dir or a run dir "
                        "with model/)")
    ref = reference or init
    if ref is None and run and storage.exists(storage.join(run, "config.yaml")):
        ref = _base_model_of(storage.read_text(storage.join(run, "config.yaml")))
    return ModelSpec(label=name, path=model_dir, reference=ref, run_dir=run)


def _base_model_of(config_yaml: str) -> str | None:
    name = ((yaml.safe_load(config_yaml) or {}).get("model") or {}).get("name_or_path")
    return name if name and name != "tiny" else None


def resolve_model(path: str, *, label: str | None = None, reference: str | None = None) -> ModelSpec:
    """Where the policy weights, a LoRA adapter and the reference are for `path`."""
    if reference and not storage.is_uri(reference) and Path(reference).exists():
        reference = str(Path(reference).resolve())
    if storage.is_remote(path):  # s3://.../run or .../run/model: resolved here, fetched by each actor
        return _resolve_remote(path, label=label, reference=reference)
    p = Path(path)
    if not p.exists():  # a hub id: no run structure, reference only if given
        return ModelSpec(label=label or path.rstrip("/").split("/")[-1], path=path, reference=reference)
    p = p.resolve()  # Ray workers may start elsewhere
    run = p if (p / "model").is_dir() else None
    model_dir = p / "model" if run else p
    if run is None and p.name == "model" and (p.parent / "init-model").is_dir():
        run = p.parent  # <run>/model given directly
    adapter = _adapter_dir(model_dir)
    init = run / "init-model" if run and (run / "init-model").is_dir() else None
    name = label or (run.name if run else p.name)
    if adapter is not None:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if init is not None and (not base or not Path(base).exists()):
            base = str(init)
        if not base:
            raise EvalError(f"{adapter}: adapter_config.json names no base model; evaluate the merged export instead")
        return ModelSpec(label=name, path=str(base), adapter=str(adapter), reference=reference, run_dir=str(run) if run else None)
    if not (model_dir / "config.json").exists():
        raise EvalError(f"{path}: no config.json (expected a Hugging Face model dir or a run dir with model/)")
    ref = reference or (str(init) if init else (_run_base_model(run) if run else None))
    return ModelSpec(label=name, path=str(model_dir), reference=ref, run_dir=str(run) if run else None)


def resolve_models(paths: list[str], labels: list[str], reference: str | None) -> list[ModelSpec]:
    specs = [resolve_model(p, label=(labels[i] if labels else None), reference=reference) for i, p in enumerate(paths)]
    seen: dict[str, int] = {}
    for s in specs:  # two runs called "model": keep labels distinct
        seen[s.label] = seen.get(s.label, 0) + 1
        if seen[s.label] > 1:
            s.label = f"{s.label}-{seen[s.label]}"
    return specs


def tokenizer_source(spec: ModelSpec) -> str:
    """The adapter's dir when it carries a tokenizer, else the model's (a path or a storage URI:
    `load_tokenizer` fetches a URI into this node's cache)."""
    if spec.adapter and storage.exists(storage.join(spec.adapter, "tokenizer_config.json")):
        return spec.adapter
    return spec.path


def load_policy(spec: ModelSpec, *, dtype: str = "float32", trust_remote_code: bool = False,
                device: str | torch.device = "cpu") -> torch.nn.Module:
    """The policy in eval mode, frozen; a PeftModel when the spec has an adapter."""
    model = load_model(spec.path, dtype=dtype, trust_remote_code=trust_remote_code)
    if spec.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, storage.localize(spec.adapter))  # a URI: fetched to this node
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def load_reference(spec: ModelSpec, *, dtype: str = "float32", trust_remote_code: bool = False,
                   device: str | torch.device = "cpu") -> torch.nn.Module | None:
    """The reference model, or None when the policy's adapter-free base is the reference."""
    if spec.reference is None:
        if spec.adapter:
            return None
        raise EvalError(
            f"model '{spec.label}': no reference model for implicit rewards; pass a run dir with "
            "init-model/, or set model.reference (the model training started from)")
    ref = load_model(spec.reference, dtype=dtype, trust_remote_code=trust_remote_code)
    ref.to(device).eval()
    ref.requires_grad_(False)
    return ref


def has_reference(spec: ModelSpec) -> bool:
    return spec.reference is not None or spec.adapter is not None


def rows_dataset(rows: list[dict[str, Any]], batch_size: int, *, progress: bool = True):
    """Rows as a Ray Dataset of string columns plus an `_order` index (results are put back in
    input order with it), one block per batch. Returns (dataset, column names, number of blocks)."""
    import math

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress
    columns = sorted(set().union(*(r.keys() for r in rows)))
    items = [{**{c: str(r.get(c, "")) for c in columns}, "_order": i} for i, r in enumerate(rows)]
    blocks = max(1, math.ceil(len(items) / batch_size))
    return ray.data.from_items(items, override_num_blocks=blocks), columns, blocks
