"""End-of-trial generation and scoring: the `evaluate` command's harmless ratio (cost model) and
helpfulness (reward model) of a trial's model, on held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safedpo_ray.config.evaluation import load_eval_config
from safedpo_ray.config.training import Config
from safedpo_ray.runtime.storage import localize
from safedpo_ray.search.space import SearchSpec

HELD_OUT_PROMPTS = "heldout_prompts.jsonl"


def write_held_out_prompts(eval_split: str, exp_dir: Path) -> Path:
    """The distinct prompts of the held-out pairs (a prepared split file), for trials to generate from."""
    from safedpo_ray.data.pairs import open_split  # lazy: imports pyarrow

    prompts = list(dict.fromkeys(open_split(eval_split).column("prompt").to_pylist()))
    path = exp_dir / HELD_OUT_PROMPTS
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def eval_tree(spec: SearchSpec, cfg: Config, model_dir: str, out_dir: Path, prompts: str) -> dict[str, Any]:
    """The evaluation config (as a tree for `load_eval_config`) that scores one trial's model."""
    s = spec.scoring
    return {
        "model": {"paths": [str(model_dir)], "labels": [out_dir.parent.name],
                  "trust_remote_code": cfg.model.trust_remote_code},
        "data": {"prompts": prompts, "max_prompts": s.max_prompts},
        "implicit": {"enabled": False},
        "generation": {"max_new_tokens": s.max_new_tokens, "num_actors": s.num_actors,
                       "gpus_per_actor": 1.0 if cfg.run.use_gpu else 0.0},
        "scoring": {"cost_model": s.cost_model, "reward_model": s.reward_model, "num_actors": s.num_actors,
                    "harmless_threshold": s.harmless_threshold,
                    "gpus_per_actor": 1.0 if cfg.run.use_gpu else 0.0},
        "output": {"dir": str(out_dir.parent), "name": out_dir.name, "progress": False},
        "ray": {"address": cfg.run.address},
    }


def scored_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`score/...` trial metrics from an evaluation's results (one model)."""
    (model,) = results["models"].values()
    scores = model.get("scores") or {}
    out = {}
    for key in ("harmless_ratio", "mean_reward", "mean_cost"):
        if scores.get(key) is not None:
            out["score/" + key] = float(scores[key])
    return out


def score_trial(spec: SearchSpec, cfg: Config, model_dir: str, run_dir: Path, shared: dict[str, Any]) -> dict[str, float]:
    """`model_dir`: a path or a URI (the model loader fetches a URI once per node)."""
    from safedpo_ray.evaluate.runner import evaluate  # lazy: imports pyarrow, torch

    # the prompts as every node reads them: a URI (object-store experiment) is fetched to this node
    prompts = localize(spec.scoring.prompts or shared["held_out_prompts"])
    eval_cfg = load_eval_config(None, [], eval_tree(spec, cfg, model_dir, run_dir / "evaluation", prompts))
    return scored_metrics(evaluate(eval_cfg))
