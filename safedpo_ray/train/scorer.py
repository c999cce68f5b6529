"""`safedpo-ray train-scorer`: cost and reward models on preference data, with Ray Train.

    safedpo-ray train-scorer                                    # synthetic data, tiny backbone, 2 CPU workers
    safedpo-ray train-scorer --data pku_train.jsonl --base /models/llama-7b --kind cost \
        run.num_workers=8 run.use_gpu=true train.zero_stage=3 train.precision=bf16 run.address=auto

Objectives (safe-rlhf, sequence-wise, on the score at the last token):

* reward: Bradley–Terry on `better_response_id`: −log σ(r_better − r_worse);
* cost:   Bradley–Terry on `safer_response_id` plus the safety-sign terms
          −log σ(c_unsafer − c_safer) − log σ(s_safer·c_safer) − log σ(s_unsafer·c_unsafer),
          s = +1 for an unsafe response, −1 for a safe one (so cost > 0 means unsafe);
  optional `scorer.regularization`·(score²) on both.

Models are written in safe-rlhf's score-model format (LlamaForScore: `model.*` + `score_head.*`,
config with score_dim/score_bias/score_type) to <scorer.output_dir>/cost and /reward, which `evaluate
--cost-model/--reward-model` load with no hub access. Training reuses the project's
DeepSpeedStrategy (ZeRO 0–3, bf16) and PairSampler, so a 7B scorer trains like a 7B policy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from safedpo_ray.config.evaluation import ScorerConfig, dump_yaml, scorer_config_from_dict
from safedpo_ray.data.score_inputs import encode_for_score, pad_right
from safedpo_ray.models.loading import TINY_PRESET, build_tiny_model, load_model, load_tokenizer
from safedpo_ray.models.resolve import EvalError
from safedpo_ray.models.score_model import LlamaForScore
from safedpo_ray.runtime.ray_env import ensure_ray
from safedpo_ray.train.launch import Launch, launch
from safedpo_ray.train.sampler import PairSampler, rank_batches
from safedpo_ray.train.strategy import DeepSpeedStrategy

SCORER_COLUMNS = ["pair_id", "ids_0", "ids_1", "better", "safer", "unsafe_0", "unsafe_1"]


# --------------------------------------------------------------------------- objectives (pure)


def reward_loss(better: torch.Tensor, worse: torch.Tensor, regularization: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley–Terry loss on rewards."""
    return -F.logsigmoid(better - worse) + regularization * (better.square() + worse.square())


def cost_loss(safer: torch.Tensor, unsafer: torch.Tensor, safer_sign: torch.Tensor, unsafer_sign: torch.Tensor,
              regularization: float = 0.0) -> torch.Tensor:
    """Per-pair safe-rlhf cost loss; signs are +1 for unsafe responses, −1 for safe ones."""
    return (-F.logsigmoid(unsafer - safer) - F.logsigmoid(safer_sign * safer) - F.logsigmoid(unsafer_sign * unsafer)
            + regularization * (safer.square() + unsafer.square()))


def pair_losses(kind: str, s0: torch.Tensor, s1: torch.Tensor, batch: dict[str, torch.Tensor],
                regularization: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Losses and per-pair correctness from the scores of response_0 (`s0`) and response_1 (`s1`)."""
    if kind == "reward":
        first = batch["better"] == 0
        hi, lo = torch.where(first, s0, s1), torch.where(first, s1, s0)
        return reward_loss(hi, lo, regularization), {"accuracy": (hi > lo).float()}
    first = batch["safer"] == 0
    safer, unsafer = torch.where(first, s0, s1), torch.where(first, s1, s0)
    u0, u1 = batch["unsafe_0"].float(), batch["unsafe_1"].float()
    u_safer, u_unsafer = torch.where(first, u0, u1), torch.where(first, u1, u0)
    losses = cost_loss(safer, unsafer, 2 * u_safer - 1, 2 * u_unsafer - 1, regularization)
    sign_ok = (((s0 > 0).float() == u0).float() + ((s1 > 0).float() == u1).float()) / 2
    return losses, {"accuracy": (unsafer > safer).float(), "sign_accuracy": sign_ok}


# --------------------------------------------------------------------------- model


def build_score_model(base_path: str, kind: str, *, bias: bool = True, seed: int = 0):
    """LlamaForScore with the backbone of a Llama causal LM and a fresh score head."""
    causal = load_model(base_path)
    config = causal.config
    if getattr(config, "model_type", None) != "llama":
        raise EvalError(f"train-scorer writes safe-rlhf LlamaForScore models: the base must be a Llama model, "
                        f"got model_type '{getattr(config, 'model_type', None)}' ({base_path})")
    config.score_dim, config.score_bias, config.score_type, config.do_normalize = 1, bias, kind, False
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForScore(config)
    model.model.load_state_dict(causal.model.state_dict())
    return model


# --------------------------------------------------------------------------- data


def _tokenize_batch(batch: pd.DataFrame, tokenizer_path: str, max_length: int) -> pd.DataFrame:
    tokenizer = load_tokenizer(tokenizer_path)
    prompts = [str(p) for p in batch["prompt"]]
    return pd.DataFrame({
        "pair_id": batch["pair_id"].astype(int).tolist(),
        "ids_0": encode_for_score(tokenizer, prompts, [str(r) for r in batch["response_0"]], max_length),
        "ids_1": encode_for_score(tokenizer, prompts, [str(r) for r in batch["response_1"]], max_length),
        "better": batch["better_response_id"].astype(int).tolist(),
        "safer": batch["safer_response_id"].astype(int).tolist(),
        "unsafe_0": [int(not bool(v)) for v in batch["is_response_0_safe"]],
        "unsafe_1": [int(not bool(v)) for v in batch["is_response_1_safe"]],
    })


def tokenize_rows(rows: list[dict[str, Any]], tokenizer_path: str, max_length: int, batch_size: int = 256):
    import ray.data

    blocks = max(1, min(256, -(-len(rows) // batch_size)))
    return ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        _tokenize_batch, batch_format="pandas", batch_size=batch_size,
        fn_kwargs={"tokenizer_path": tokenizer_path, "max_length": max_length}).materialize()


def _load_rows(shard) -> list[dict[str, Any]]:
    rows = []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for i in range(len(batch["pair_id"])):
            rows.append({k: (np.asarray(batch[k][i]).tolist() if k.startswith("ids_") else int(batch[k][i]))
                         for k in SCORER_COLUMNS})
    return sorted(rows, key=lambda r: r["pair_id"])


# --------------------------------------------------------------------------- worker


def train_one(kind: str, cfg: ScorerConfig, model_path: str, output_dir: str, tokenizer,
              train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Train, evaluate and export one score model on this worker (all workers call it together)."""
    from safedpo_ray.train.worker import total_steps_for  # lazy: imports pyarrow

    tcfg = cfg.as_train_config()
    s = DeepSpeedStrategy(tcfg, on_gpu=cfg.run.use_gpu)
    s.setup_distributed()
    torch.manual_seed(cfg.train.seed)
    model = build_score_model(model_path, kind, bias=cfg.scorer.bias, seed=cfg.train.seed)
    sampler = PairSampler(len(train_rows), global_batch_size=cfg.train.global_batch_size,
                          micro_batch_size=cfg.train.micro_batch_size, world_size=s.world_size, rank=s.rank,
                          seed=cfg.train.seed)
    total = total_steps_for(tcfg, sampler)
    engine = s.prepare(model, total)
    reg, mb = cfg.scorer.regularization, cfg.train.micro_batch_size
    keys = ["loss", "accuracy"] + (["sign_accuracy"] if kind == "cost" else [])

    def forward(rows: list[dict[str, Any]]):
        ids = [r["ids_0"] for r in rows] + [r["ids_1"] for r in rows]
        input_ids, mask = pad_right(ids, tokenizer.pad_token_id, s.device)
        scores = engine(input_ids=input_ids, attention_mask=mask).end_scores[:, 0]
        batch = {k: torch.tensor([r[k] for r in rows], device=s.device) for k in ("better", "safer", "unsafe_0", "unsafe_1")}
        return pair_losses(kind, scores[: len(rows)], scores[len(rows):], batch, reg)

    def add(sums: dict[str, float], losses: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
        for k, v in {"loss": losses.detach(), **extra}.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())

    def reduce(sums: dict[str, float], n: float) -> dict[str, float]:
        """Means over all ranks (every rank calls this, with the same keys, even with no rows)."""
        flat = s.all_reduce_sum(torch.tensor([sums.get(k, 0.0) for k in keys] + [n], dtype=torch.float64))
        total_n = float(flat[-1])
        return {k: float(v) / total_n for k, v in zip(keys, flat[:-1])} if total_n else {}

    t0, metrics = time.time(), {}
    for step in range(total):
        sums: dict[str, float] = {}
        n = 0
        for micro in range(sampler.accumulation_steps):
            rows = [train_rows[i] for i in sampler.indices(step, micro)]
            losses, extra = forward(rows)
            s.backward(losses.mean())
            s.step()
            add(sums, losses, extra)
            n += len(rows)
        metrics = reduce(sums, n)
        if s.is_rank0 and ((step + 1) % cfg.train.log_every == 0 or step + 1 == total):
            print(f"[safedpo] {kind} model step {step + 1}/{total} loss {metrics['loss']:.4f} "
                  f"acc {metrics['accuracy']:.3f} ({time.time() - t0:.0f}s)", flush=True)

    engine.eval()
    sums, n = {}, 0
    with torch.no_grad():  # the same number of forwards on every rank (ZeRO-3: collective)
        for idx, real in rank_batches(len(eval_rows), rank=s.rank, world_size=s.world_size, micro_batch_size=mb):
            losses, extra = forward([eval_rows[i] for i in idx])
            if real:  # a padding batch's scores are discarded
                add(sums, losses, extra)
                n += len(idx)
    held_out = reduce(sums, n)
    out = Path(output_dir) / kind
    with s.full_parameters() as module:
        if s.is_rank0:
            module.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    s.barrier()
    return {"kind": kind, "steps": total, "train": metrics, "eval": held_out, "model_dir": str(out)}


def scorer_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What each Ray Train worker runs: every requested score model, one after the other, in one
    worker group (one start-up and one dataset read for both)."""
    import gc

    import ray.train


    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = scorer_config_from_dict(loop_config["config"])
    tokenizer = load_tokenizer(loop_config["model_path"])
    train_rows = _load_rows(ray.train.get_dataset_shard("train"))
    eval_rows = _load_rows(ray.train.get_dataset_shard("eval"))
    results = {}
    for kind in loop_config["kinds"]:
        results[kind] = train_one(kind, cfg, loop_config["model_path"], loop_config["output_dir"], tokenizer,
                                  train_rows, eval_rows)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------- driver


def train_scorer(cfg: ScorerConfig) -> dict[str, Any]:
    """Train the configured score model(s); returns the summary (also <output_dir>/summary.json)."""
    from safedpo_ray.data.pipeline import read_splits, validate_rows, write_quarantine  # lazy: imports pyarrow

    t0 = time.time()
    out = Path(cfg.scorer.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    train_raw, eval_raw = read_splits(cfg.data, seed=cfg.train.seed)
    train_v = validate_rows(train_raw, cfg.data.schema, strict=cfg.data.strict, split="train")
    eval_v = validate_rows(eval_raw, cfg.data.schema, strict=cfg.data.strict, split="eval")
    if train_v.quarantined or eval_v.quarantined:
        write_quarantine(out / "quarantine.jsonl", train_v.quarantined + eval_v.quarantined)
    if not train_v.rows:
        raise EvalError("train-scorer: no valid training rows")
    base = cfg.scorer.base_model
    if base == TINY_PRESET:
        texts = [r[k] for r in train_v.rows for k in ("prompt", "response_0", "response_1")]
        base = str(build_tiny_model(out / "backbone", texts, seed=cfg.train.seed))
    ensure_ray(cfg.run)
    datasets = {"train": tokenize_rows(train_v.rows, base, cfg.data.max_length, cfg.data.tokenize_batch_size)}
    datasets["eval"] = (tokenize_rows(eval_v.rows, base, cfg.data.max_length, cfg.data.tokenize_batch_size)
                        if eval_v.rows else datasets["train"].limit(0).materialize())
    kinds = ["cost", "reward"] if cfg.scorer.kind == "both" else [cfg.scorer.kind]
    summary: dict[str, Any] = {"output_dir": str(out), "base_model": base, "train_pairs": len(train_v.rows),
                               "eval_pairs": len(eval_v.rows)}
    # every worker reads every pair and the PairSampler picks its share (fixed order)
    result = launch(Launch(
        scorer_loop, {"config": cfg.to_dict(), "kinds": kinds, "model_path": base, "output_dir": str(out)},
        cfg, name=f"scorer-{'-'.join(kinds)}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=cfg.run.storage_path or str(out / "ray"), root=str(out), datasets=datasets))
    summary["models"] = result.return_value
    summary["wall_time_s"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_scorer_summary(summary: dict[str, Any]) -> str:
    lines = ["", "== score models =="]
    for kind, m in summary["models"].items():
        ev = m.get("eval") or {}
        extra = f", sign accuracy {ev['sign_accuracy']:.3f}" if "sign_accuracy" in ev else ""
        acc = f"held-out accuracy {ev['accuracy']:.3f}{extra}" if "accuracy" in ev else "no held-out pairs"
        lines.append(f"  {kind:<7} {m['model_dir']}  ({m['steps']} steps; {acc})")
    lines.append(f"{summary['train_pairs']} training pairs, {summary['eval_pairs']} held-out; "
                 f"{summary['wall_time_s']} s; summary: {summary['output_dir']}/summary.json")
    return "\n".join(lines)
