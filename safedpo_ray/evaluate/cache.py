"""What an evaluation has already computed, so a rerun does only what is missing.

An evaluation directory (`output.dir/output.name`) keeps append-only JSONL caches under `cache/`:

* generations.jsonl: one record per (generation key, prompt) with the response and `truncated`;
* scores.jsonl: one record per (scorer key, prompt + response + truncated) with the score;
* implicit.jsonl: one record per implicit-metrics key.

Keys hash what changes the result and nothing else: the model's path (resolved) and a
fingerprint of its weight files (name, size, mtime), its adapter, and the settings that change
the output (generation: engine, max_new_tokens, max_prompt_length, weights dtype, and the
sampling settings and seed only when sampling; scoring: the score model, its dtype and
max_length). A model renamed with another label reuses its results; a retrained model at the
same path, or a changed setting, does not. The judge keeps its own verdict file (judge.jsonl).

    cache = EvalCache(out_dir / "cache")
    cached = cache.generations(key)        # prompt -> {"response": ..., "truncated": ...}
    cache.add_generations(key, rows)
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from safedpo_ray.runtime import storage

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
FINGERPRINT_FILES = ("config.json", "adapter_config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def fingerprint(path: str | None) -> Any:
    """A local model dir: its resolved path and (name, size, mtime_ns) of its weight and config
    files; anything else (a hub id, None): the string itself."""
    if not path:
        return None
    if storage.is_remote(path):  # a model in an object store: its listing, read without downloading
        return _remote_fingerprint(str(path))
    p = Path(path)
    if not p.is_dir():
        return str(path)
    files = sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in FINGERPRINT_FILES))
    return {"path": str(p.resolve()), "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def _remote_fingerprint(uri: str) -> Any:
    import pyarrow.fs as pafs  # lazy: pyarrow

    fs, p = storage.resolve(uri)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return uri
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    files = sorted((Path(i.path).name, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File and (
        Path(i.path).suffix in WEIGHT_SUFFIXES or Path(i.path).name in FINGERPRINT_FILES))
    return {"path": storage.redact(uri), "files": files}


def generation_key(spec: Any, gen: Any, *, max_prompt_length: int, dtype: str) -> str:
    """Key of one model's generations under these settings (see the module docstring)."""
    settings: dict[str, Any] = {"engine": gen.engine, "max_new_tokens": gen.max_new_tokens,
                                "max_prompt_length": max_prompt_length, "dtype": dtype, "do_sample": gen.do_sample}
    if gen.do_sample:
        settings.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, seed=gen.seed)
    return _digest({"model": fingerprint(spec.path), "adapter": fingerprint(spec.adapter), "settings": settings})


def scorer_key(path: str, *, dtype: str, max_length: int) -> str:
    return _digest({"scorer": fingerprint(path), "dtype": dtype, "max_length": max_length})


def implicit_key(spec: Any, data: Any, implicit: Any, *, dtype: str) -> str:
    return _digest({"model": fingerprint(spec.path), "adapter": fingerprint(spec.adapter),
                    "reference": fingerprint(spec.reference),
                    "data": [data.source, data.split, data.subset, data.schema, data.max_rows, data.synthetic_prompts],
                    "lengths": [data.max_length, data.max_prompt_length], "beta": implicit.beta, "dtype": dtype})


def item_key(row: dict[str, Any]) -> str:
    """A scored item: prompt, response and whether the response was truncated."""
    return _digest([str(row.get("prompt", "")), str(row.get("response", "")), bool(row.get("truncated"))])


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


class EvalCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _read(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that item is computed again
        return out

    def _append(self, name: str, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / name).open("a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n")

    # generations
    def generations(self, key: str) -> dict[str, dict[str, Any]]:
        return {r["prompt"]: {"response": r["response"], "truncated": bool(r.get("truncated"))}
                for r in self._read("generations.jsonl") if r.get("key") == key}

    def add_generations(self, key: str, rows: list[dict[str, Any]]) -> None:
        self._append("generations.jsonl", [{"key": key, "prompt": r["prompt"], "response": r["response"],
                                            "truncated": bool(r.get("truncated"))} for r in rows])

    # scores
    def scores(self, key: str) -> dict[str, float]:
        return {r["item"]: r["value"] for r in self._read("scores.jsonl")
                if r.get("scorer") == key and r.get("value") is not None}

    def add_scores(self, key: str, items: list[tuple[str, float]]) -> None:
        self._append("scores.jsonl", [{"scorer": key, "item": i, "value": v} for i, v in items])

    # implicit metrics
    def implicit(self, key: str) -> dict[str, Any] | None:
        found = [r["metrics"] for r in self._read("implicit.jsonl") if r.get("key") == key]
        return found[-1] if found else None

    def add_implicit(self, key: str, metrics: dict[str, Any]) -> None:
        self._append("implicit.jsonl", [{"key": key, "metrics": metrics}])
