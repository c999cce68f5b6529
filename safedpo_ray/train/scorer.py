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

Outputs: `scorer.output_dir` is the root of every output, a local or shared path or an object-store
URI (s3://b/scorers?endpoint_override=..., like run.storage_path; runtime/storage.py). The driver
writes config.yaml, quarantine.jsonl, the tiny preset's backbone/ and summary.json (staged
locally and uploaded with an object store); rank 0 writes cost/ and reward/ through `RunOutputs`,
uploading each model when it is saved. On a cluster of several nodes a local output_dir must be
a path every node mounts (checked as for run.storage_path). Ray Train's own files go to
run.storage_path, else <output_dir>/ray.

Stopping: SIGTERM/SIGINT on the driver (launch.py's signal handling) is read by the workers after
each optimizer step (the same stop marker and all-reduce as `train`): they stop, rank 0 uploads the
score models already finished, and the command exits 128 + signal (143, 130) saying that nothing
of the interrupted model was kept (train-scorer keeps no checkpoints: run it again).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from safedpo_ray.config.evaluation import ScorerConfig, dump_yaml, scorer_config_from_dict
from safedpo_ray.data.pairs import RowTable, write_split
from safedpo_ray.data.score_inputs import encode_for_score, pad_right
from safedpo_ray.models.loading import TINY_PRESET, build_tiny_model, load_model, load_tokenizer
from safedpo_ray.models.resolve import EvalError
from safedpo_ray.models.score_model import LlamaForScore
from safedpo_ray.runtime import storage as run_storage
from safedpo_ray.runtime.ray_env import ensure_ray
from safedpo_ray.train import preempt
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


# --------------------------------------------------------------------------- worker


def train_one(kind: str, cfg: ScorerConfig, model_path: str, outputs: run_storage.RunOutputs, tokenizer,
              train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Train, evaluate and export one score model on this worker (all workers call it together).
    The model goes to `outputs` (rank 0 writes, uploaded to an object-store root at once). A stop
    asked by the driver ends the training early: {"stopped_early": True, "last_step": n}."""
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
    stop_check = preempt.StopCheck(outputs.root, s)  # the driver's stop marker, a worker's SIGTERM
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
        if cfg.train.step_delay_s:
            time.sleep(cfg.train.step_delay_s)  # debug: room to signal the run between steps
        request = stop_check.poll(step + 1, total)  # all ranks, the same answer
        if request is None or request.kind == "drain":  # nothing to checkpoint: a drained node just goes
            continue
        if request.kind == "worker":  # this attempt fails; Ray Train may restart it (from scratch)
            raise preempt.WorkerStopped(f"a worker process got {request.reason} after step {step + 1} of the "
                                        f"{kind} model (train-scorer keeps no checkpoints)")
        if s.is_rank0:
            print(f"[safedpo] {kind} model: stopped after step {step + 1}/{total} ({request.reason}); "
                  "not saved", flush=True)
        return {"kind": kind, "steps": total, "last_step": step + 1, "stopped_early": True, "train": metrics}

    engine.eval()
    sums, n, forwards = {}, 0, torch.zeros(s.world_size, dtype=torch.float64)
    with torch.no_grad():  # the same number of forwards on every rank (ZeRO-3: collective)
        for idx, real in rank_batches(len(eval_rows), rank=s.rank, world_size=s.world_size, micro_batch_size=mb):
            losses, extra = forward([eval_rows[i] for i in idx])
            forwards[s.rank] += 1
            if real:  # a padding batch's scores are discarded
                add(sums, losses, extra)
                n += len(idx)
    held_out = reduce(sums, n)
    forwards = [int(v) for v in s.all_reduce_sum(forwards).tolist()]  # held-out forwards of each rank, for the summary
    out = outputs.local / kind
    with s.full_parameters() as module:
        if s.is_rank0:
            module.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            outputs.push(kind)  # an object-store root: uploaded now
    s.barrier()
    model_dir = run_storage.join(outputs.root, kind) if outputs.remote else str(out)
    return {"kind": kind, "steps": total, "train": metrics, "eval": held_out, "model_dir": model_dir,
            "eval_forwards_per_rank": forwards}


def scorer_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What each Ray Train worker runs: every requested score model, one after the other, in one
    worker group (one start-up and one mapping of the pairs for both)."""
    import gc

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = scorer_config_from_dict(loop_config["config"])
    tokenizer = load_tokenizer(loop_config["model_path"])
    files = loop_config["pairs"]  # the tokenized pairs, memory-mapped (ordered by pair_id)
    train_rows = RowTable(files["train"], SCORER_COLUMNS)
    eval_rows = RowTable(files["eval"], SCORER_COLUMNS) if files.get("eval") else []
    # Rank 0 writes the models here: the output root, or a node-local staging dir uploaded to it.
    outputs = run_storage.RunOutputs(loop_config["output_dir"], name="scorers")
    results = {}
    try:
        for kind in loop_config["kinds"]:
            results[kind] = train_one(kind, cfg, loop_config["model_path"], outputs, tokenizer, train_rows, eval_rows)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if results[kind].get("stopped_early"):
                break
    finally:
        outputs.finish()  # rank 0's saved models reach the root, also when a later one failed (others: no-op)
    return results


# --------------------------------------------------------------------------- driver


def output_root(output_dir: str) -> str:
    """scorer.output_dir as the root of every output: a URI as given, a local path made absolute."""
    return output_dir if run_storage.is_uri(output_dir) else str(Path(output_dir).expanduser().resolve())


def check_cluster_output(cfg: ScorerConfig, root: str) -> None:
    """On a cluster of several nodes, rank 0 (any node) writes the models: the root must be an
    object store or a path every node mounts (storage.check_cluster_storage, for this key)."""
    from types import SimpleNamespace

    try:
        run_storage.check_cluster_storage(SimpleNamespace(storage_path=root, output_dir=root))
    except run_storage.StorageError as exc:
        raise run_storage.StorageError(str(exc).replace("run.storage_path", "scorer.output_dir")) from None


def train_scorer(cfg: ScorerConfig) -> dict[str, Any]:
    """Train the configured score model(s); returns the summary (also <output_dir>/summary.json)."""
    t0 = time.time()
    root = output_root(cfg.scorer.output_dir)
    remote = run_storage.is_remote(root)
    # What the driver writes: in place, or staged here and uploaded to an object-store root.
    if remote:
        staging = Path(os.environ.get("SAFEDPO_STAGING_DIR") or tempfile.gettempdir())
        staging.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix="safedpo-scorer-", dir=staging))
    else:
        out = Path(run_storage.resolve(root)[1])
    try:
        return _train_scorer(cfg, root, out, t0)
    finally:
        if remote:
            shutil.rmtree(out, ignore_errors=True)


def _train_scorer(cfg: ScorerConfig, root: str, out: Path, t0: float) -> dict[str, Any]:
    from safedpo_ray.data.pipeline import read_splits, validate_rows, write_quarantine  # lazy: imports pyarrow

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
    preempt.rearm()  # ray.init replaced our SIGTERM/SIGINT handlers (train/preempt.py)
    preempt.without_checkpoints("train-scorer")  # a signal's message: stopping after this step
    check_cluster_output(cfg, root)
    run_storage.check_cluster_inputs({"scorer.base_model": cfg.scorer.base_model})  # the workers load it
    # an object-store root: config, quarantine and a built backbone uploaded; base is then its URI,
    # which Ray Data's tasks and the workers load on any node
    base = run_storage.publish_driver_files(root, out, base)
    # The tokenized pairs as files every worker memory-maps (under the output root: on any node)
    pairs = {}
    for split, rows in (("train", train_v.rows), ("eval", eval_v.rows)):
        if rows:
            write_split(tokenize_rows(rows, base, cfg.data.max_length, cfg.data.tokenize_batch_size),
                        out / "data" / f"{split}.arrow", order_by="pair_id")
            pairs[split] = run_storage.publish_file(root, out, "data", f"{split}.arrow")
    kinds = ["cost", "reward"] if cfg.scorer.kind == "both" else [cfg.scorer.kind]
    summary: dict[str, Any] = {"output_dir": root, "base_model": base, "train_pairs": len(train_v.rows),
                               "eval_pairs": len(eval_v.rows)}
    default_storage = run_storage.join(root, "ray") if run_storage.is_remote(root) else str(out / "ray")
    # every worker maps every pair and the PairSampler picks its share (fixed order)
    result = launch(Launch(
        scorer_loop, {"config": cfg.to_dict(), "kinds": kinds, "model_path": base, "output_dir": root,
                      "pairs": pairs},
        cfg, name=f"scorer-{'-'.join(kinds)}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=cfg.run.storage_path or default_storage, root=root))
    summary["models"] = result.return_value or {}
    summary["wall_time_s"] = round(time.time() - t0, 1)
    stopped = [m for m in summary["models"].values() if m.get("stopped_early")]
    if stopped:
        summary.update(stopped_early=True, last_step=f"{stopped[0]['last_step']} of the {stopped[0]['kind']} model")
    run_storage.save_json(root, out, "summary.json", summary)
    done = [k for k, m in summary["models"].items() if not m.get("stopped_early")]
    preempt.raise_if_stopped(summary, None, hint=(
        f"{', '.join(done) + ' model kept, ' if done else ''}train-scorer keeps no checkpoints: "
        "run the same command again"))
    return summary


def format_scorer_summary(summary: dict[str, Any]) -> str:
    lines = ["", "== score models =="]
    for kind, m in summary["models"].items():
        ev = m.get("eval") or {}
        extra = f", sign accuracy {ev['sign_accuracy']:.3f}" if "sign_accuracy" in ev else ""
        acc = f"held-out accuracy {ev['accuracy']:.3f}{extra}" if "accuracy" in ev else "no held-out pairs"
        lines.append(f"  {kind:<7} {m['model_dir']}  ({m['steps']} steps; {acc})")
    lines.append(f"{summary['train_pairs']} training pairs, {summary['eval_pairs']} held-out; "
                 f"{summary['wall_time_s']} s; summary: {run_storage.join(summary['output_dir'], 'summary.json')}")
    return "\n".join(lines)
