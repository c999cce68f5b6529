"""`sft_loop`: what each Ray Train worker runs for `safedpo-ray sft` (next-token loss on responses).

Same pieces as the preference worker (train/worker.py): DeepSpeedStrategy for everything DeepSpeed,
models.py for loading/LoRA/export, PairSampler for the (seed, step) → examples order that makes
resume exact, MetricsLog for metrics, checkpoints through ray.train.report, RunOutputs for where
rank 0 writes (the run root, or a node-local staging directory uploaded to an object-store root).
Receives {"config": Config.to_dict(), "model_path", "run_dir", "storage_root", "examples": {"train":
path or URI, "eval": ...}}: the tokenized examples as Arrow files every worker memory-maps.

The loss of a step is the mean negative log-likelihood over every response token of the global
batch (all ranks and accumulation steps), not a mean of per-micro-batch means, so the numbers do
not depend on how the batch is split.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from safedpo_ray.config.training import Config, config_from_dict
from safedpo_ray.core.logprobs import sequence_logps
from safedpo_ray.data.pairs import RowTable
from safedpo_ray.data.sft import SFT_COLUMNS, collate_examples
from safedpo_ray.models.loading import apply_lora_config, export_model, is_peft_model, load_model, load_tokenizer
from safedpo_ray.models.precision import weights_dtype
from safedpo_ray.runtime.storage import RunOutputs
from safedpo_ray.train import preempt
from safedpo_ray.train.metrics_log import MetricsLog
from safedpo_ray.train.sampler import PairSampler, rank_batches
from safedpo_ray.train.strategy import DeepSpeedStrategy
from safedpo_ray.train.worker import gather_node_ids, restore_checkpoint


def response_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of −log p over response tokens, and the number of those tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logps, tokens = sequence_logps(out.logits, batch["input_ids"], batch["loss_mask"])
    return -logps, tokens


def build_policy(cfg: Config, model_path: str):
    """Tokenizer and trainable model (gradient checkpointing, LoRA) as the config asks."""
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(model_path, trust_remote_code=cfg.model.trust_remote_code,
                       dtype=weights_dtype(cfg.train.precision))  # precision.py: half the host memory in bf16
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.model.lora.enabled:
        model = apply_lora_config(model, cfg.model)
    return tokenizer, model


class SftWorker:
    def __init__(self, loop_config: dict[str, Any]):
        self.cfg = cfg = config_from_dict(loop_config["config"])
        # Rank 0 writes the run's outputs here: the run root, or a node-local staging dir uploaded to it.
        self.outputs = RunOutputs(loop_config.get("storage_root") or loop_config["run_dir"], name=cfg.run.name)
        self.run_dir = self.outputs.local
        self.strategy = s = DeepSpeedStrategy(cfg, on_gpu=cfg.run.use_gpu)
        s.setup_distributed()
        torch.manual_seed(cfg.train.seed)
        self.tokenizer, model = build_policy(cfg, loop_config["model_path"])
        self.pad_id = self.tokenizer.pad_token_id
        # The tokenized examples, memory-mapped (ordered by example_id: a fixed order for the sampler)
        files = loop_config["examples"]
        self.train_rows = RowTable(files["train"], SFT_COLUMNS)
        self.eval_rows = RowTable(files["eval"], SFT_COLUMNS) if files.get("eval") else []
        self.sampler = PairSampler(
            len(self.train_rows), global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size, world_size=s.world_size, rank=s.rank, seed=cfg.train.seed,
        )
        steps = cfg.train.epochs * self.sampler.steps_per_epoch
        self.total_steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
        self.engine = s.prepare(model, self.total_steps)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.strategy.device) for k, v in collate_examples(rows, self.pad_id).items()}

    def evaluate(self) -> dict[str, float]:
        """Mean response-token NLL of the held-out safe and unsafe responses, all ranks together.
        Every rank runs the same number of forwards (ZeRO-3 forwards are collective)."""
        s = self.strategy
        sums = torch.zeros(2, 3, dtype=torch.float64)  # [safe, unsafe] × [nll, tokens, sequences]
        self.engine.eval()
        with torch.no_grad():
            for idx, real in rank_batches(len(self.eval_rows), rank=s.rank, world_size=s.world_size,
                                          micro_batch_size=self.cfg.train.micro_batch_size):
                batch = self.collate([self.eval_rows[i] for i in idx])
                nll, tokens = response_nll(self.engine, batch)
                if real:
                    kind = batch["unsafe"].long().cpu()
                    values = torch.stack([nll.double().cpu(), tokens.double().cpu(), torch.ones_like(tokens).double().cpu()], 1)
                    sums.index_add_(0, kind, values)
        self.engine.train()
        sums = s.all_reduce_sum(sums)
        out: dict[str, float] = {}
        for row, suffix in ((0, ""), (1, "/unsafe")):
            nll, tokens, sequences = sums[row].tolist()
            if tokens:
                out["loss" + suffix] = nll / tokens
                out["perplexity" + suffix] = math.exp(min(nll / tokens, 50.0))
                out["sequences" + suffix] = sequences
        return out

    def train_step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        s, acc = self.strategy, self.sampler.accumulation_steps
        lr = s.current_lr()
        micro_rows = [[self.train_rows[i] for i in self.sampler.indices(step, m)] for m in range(acc)]
        local_tokens = sum(len(r["response_ids"]) for rows in micro_rows for r in rows)
        global_tokens = float(s.all_reduce_sum(torch.tensor([float(local_tokens)], dtype=torch.float64))[0])
        # DeepSpeed divides by the accumulation steps and averages over ranks; undo both so the
        # gradient is that of (sum of token NLLs over the global batch) / (its response tokens).
        scale = acc * s.world_size / global_tokens
        nll_sum, seen = 0.0, 0
        for rows in micro_rows:
            batch = self.collate(rows)
            nll, _ = response_nll(self.engine, batch)
            s.backward(nll.sum() * scale)
            s.step()
            nll_sum += float(nll.detach().sum())
            seen += int(batch["attention_mask"].sum())
        totals = s.all_reduce_sum(torch.tensor([nll_sum, float(seen)], dtype=torch.float64)).tolist()
        step_time = time.perf_counter() - t0
        return {"loss": totals[0] / global_tokens, "response_tokens": global_tokens, "epoch": self.sampler.epoch_of(step),
                "lr": lr, "step_time_s": step_time, "tokens_per_s": totals[1] / step_time}

    def checkpoint(self, step: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        import ray.train

        if self.strategy.is_rank0:
            self.outputs.mark(step)  # log sizes at this checkpoint; uploaded with the logs
        with tempfile.TemporaryDirectory() as tmp:
            self.strategy.save(tmp, {**state, "step": step})
            ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def export(self) -> Path:
        """<run>/model: a full Hugging Face model (LoRA merged in), ready as `model.name_or_path`
        of `safedpo-ray train`; with LoRA the adapter also goes to <run>/adapter."""
        out = self.run_dir / "model"
        with self.strategy.full_parameters() as module:
            if self.strategy.is_rank0:
                if is_peft_model(module):
                    export_model(module, self.tokenizer, self.run_dir)  # writes <run>/adapter
                    export_model(copy.deepcopy(module).merge_and_unload(), self.tokenizer, out)
                else:
                    export_model(module, self.tokenizer, out)
        self.strategy.barrier()
        return out

    def run(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.strategy
        state, start = restore_checkpoint(s)
        worker_nodes = gather_node_ids(s)
        log = None
        if s.is_rank0:
            self.outputs.restore(start)  # logs cut back to this checkpoint: no step is logged twice
            log = MetricsLog(self.run_dir, total_steps=self.total_steps, tensorboard=cfg.run.tensorboard,
                             mlflow_tracking_uri=cfg.run.mlflow_tracking_uri, run_name=self.run_dir.name)
            print(f"[sft] {len(self.train_rows)} train examples, {len(self.eval_rows)} held-out examples, "
                  f"{self.total_steps} steps, {s.world_size} workers, ZeRO-{cfg.train.zero_stage}"
                  + (f", resuming at step {start}" if start else ""), flush=True)
        if "eval_before" not in state:
            state["eval_before"] = self.evaluate()
            if log:
                log.log(0, {"eval/" + k: v for k, v in state["eval_before"].items()})
        stop = min(self.total_steps, cfg.train.stop_at_step or self.total_steps)
        stop_check = preempt.StopCheck(self.outputs.root, s)  # signals (train/preempt.py); the driver's marker is in the root
        started = time.time()
        for step in range(start, stop):
            metrics = self.train_step(step)
            done = step + 1
            if cfg.train.step_delay_s:
                time.sleep(cfg.train.step_delay_s)  # debug: room to lose a node between checkpoints
            if log and (done % cfg.train.log_every == 0 or done == stop):
                log.log(done, metrics)
                print(f"[sft] step {done}/{self.total_steps} epoch {metrics['epoch']} loss {metrics['loss']:.4f} "
                      f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s {metrics['step_time_s']:.2f} s/step "
                      f"elapsed {time.time() - started:.0f}s", flush=True)
            every = cfg.train.checkpoint_every
            saved = (every and done % every == 0) or done == stop
            if saved:
                self.checkpoint(done, metrics, state)
            request = stop_check.poll(done, stop)  # all ranks: a signal asks for a checkpoint now
            if request:
                if not saved:
                    self.checkpoint(done, metrics, state)
                request.after_checkpoint(done)
                if request.ends_run:
                    stop = done
                    break
        result: dict[str, Any] = {"eval_before": state["eval_before"], "last_step": stop,
                                  "resumed_at_step": start, "worker_nodes": worker_nodes}  # this attempt's
        if stop == self.total_steps:
            result["eval_after"] = self.evaluate()
            result["model_dir"] = str(self.export())
            if log:
                log.log(stop, {"eval/" + k: v for k, v in result["eval_after"].items()})
        else:
            result["stopped_early"] = True
        if log:
            log.close()
            (self.run_dir / "train_result.json").write_text(json.dumps(result, indent=2))
            self.outputs.finish()  # an object-store root gets everything rank 0 wrote
        return result


def sft_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return SftWorker(loop_config).run()
