"""`train_loop`: what each Ray Train worker runs. Wires model, data, DeepSpeed and the loss.

Receives everything through its config dict (no globals): {"config": Config.to_dict(),
"model_path": local model dir, "run_dir": run directory, "pairs": the prepared split files
(memory-mapped, data/pairs.py), or None while the driver still prepares them (train/handoff.py)}.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from safedpo_ray.config.training import Config, config_from_dict
from safedpo_ray.core import logp_head
from safedpo_ray.core.algorithm import (
    PAIR_TYPES,
    MetricSums,
    concatenated_logps,
    loss_options,
    pair_type_index,
    safedpo_forward,
    tie_aware_accuracy,
    usable_layout,
)
from safedpo_ray.core.loss_names import uses_reference
from safedpo_ray.data.packing import probe_pairs
from safedpo_ray.data.pairs import PairTable
from safedpo_ray.data.tokenize import collate_pairs
from safedpo_ray.models.loading import (
    apply_lora_config,
    export_model,
    load_model,
    load_tokenizer,
    reference_logits_context,
)
from safedpo_ray.models.precision import weights_dtype
from safedpo_ray.runtime.storage import RunOutputs, current_node_id
from safedpo_ray.train import checkpoints, handoff, preempt
from safedpo_ray.train.metrics_log import MetricsLog
from safedpo_ray.train.sampler import PairSampler, rank_batches
from safedpo_ray.train.strategy import DeepSpeedStrategy


def total_steps_for(cfg: Config, sampler: PairSampler) -> int:
    steps = cfg.train.epochs * sampler.steps_per_epoch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def gather_node_ids(strategy) -> list[str | None]:
    """The Ray node of every rank, in rank order (all ranks call this together)."""
    import torch.distributed as dist

    mine = current_node_id()
    if not (dist.is_initialized() and strategy.world_size > 1):
        return [mine]
    nodes: list[Any] = [None] * strategy.world_size
    dist.all_gather_object(nodes, mine)
    return nodes


def restore_checkpoint(strategy: DeepSpeedStrategy) -> tuple[dict[str, Any], int]:
    """The client state and step of the run's newest intact checkpoint ({} and 0 on a fresh
    start); damaged or partly written ones are skipped with a warning (train/checkpoints.py)."""
    restored = checkpoints.restore(strategy)
    strategy.restored = restored  # which checkpoint, and what was skipped: for the run's result
    return restored.state, restored.step


class Worker:
    def __init__(self, loop_config: dict[str, Any]):

        self.cfg = cfg = config_from_dict(loop_config["config"])
        # Rank 0 writes the run's outputs here: the run root, or a node-local staging dir uploaded to it.
        self.outputs = RunOutputs(loop_config.get("storage_root") or loop_config["run_dir"], name=cfg.run.name)
        self.run_dir = self.outputs.local
        self.strategy = DeepSpeedStrategy(cfg, on_gpu=cfg.run.use_gpu)
        self.strategy.setup_distributed()
        torch.manual_seed(cfg.train.seed)

        self.tokenizer = load_tokenizer(loop_config["model_path"], trust_remote_code=cfg.model.trust_remote_code)
        # In the training precision: bf16 halves each worker's host copy (precision.py).
        def load() -> torch.nn.Module:
            return load_model(loop_config["model_path"], trust_remote_code=cfg.model.trust_remote_code,
                              dtype=weights_dtype(cfg.train.precision))

        model = load()
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        # Reference log-probs precomputed on the driver's side (data/reference.py): no reference
        # model is held and no reference forward runs here.
        self.reference_cached = bool(loop_config.get("reference_cached"))
        self.reference_forwards = 0
        reference = None
        if cfg.model.lora.enabled:
            model = apply_lora_config(model, cfg.model)
        elif not self.reference_cached and uses_reference(cfg.train.loss):  # SimPO needs none
            # Loaded again, not deep-copied: the same weights, and a checkpoint stored in the load
            # dtype stays memory-mapped, so the node's workers share its pages (a deep copy is a
            # private copy per worker: measured +420 MiB for a 220M bf16 model, +1 MiB loaded).
            reference = load().eval().requires_grad_(False)
        self.logits_note = install_logp_heads(cfg, model, reference)
        if loop_config.get("pairs") is None:  # the driver prepares them meanwhile: wait (raises NoPairs)
            loop_config = {**loop_config, **handoff.wait_for_pairs(self.outputs.root, self.any_rank)}

        # The prepared splits, memory-mapped (token ids stay in the files' pages), with their
        # cached reference log-probs row for row.
        refs = loop_config.get("reference") or {}
        self.train_pairs = PairTable(loop_config["pairs"]["train"], refs.get("train"))
        self.eval_pairs = (PairTable(loop_config["pairs"]["eval"], refs.get("eval"))
                           if loop_config["has_eval"] else None)
        s = self.strategy
        self.sampler = PairSampler(
            len(self.train_pairs), global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size, world_size=s.world_size, rank=s.rank,
            seed=cfg.train.seed,
        )
        self.total_steps = total_steps_for(cfg, self.sampler)
        self.engine = s.prepare(model, self.total_steps)
        self.reference = s.prepare_reference(reference) if reference is not None else None
        self.pad_id = self.tokenizer.pad_token_id
        self.layout = cfg.train.batch_layout
        self.layout_note = ""

    # -- pieces --------------------------------------------------------------------------------
    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (all ranks call this together)."""
        return bool(self.strategy.all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64))[0] > 0)

    def live_reference_logps(self, batch):
        self.reference_forwards += 1
        if self.reference is not None:
            return concatenated_logps(self.reference, batch)
        if not self.cfg.model.lora.enabled:
            raise RuntimeError("no reference model: its log-probs were expected with the pairs")
        with reference_logits_context(self.engine.module):
            return concatenated_logps(self.engine, batch)

    def reference_logps(self, batch):
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        return self.live_reference_logps(batch)

    def collate(self, pairs: PairTable, positions: list[int], layout: str | None = None) -> dict[str, torch.Tensor]:
        columns = pairs.batch(positions)
        batch = collate_pairs(columns, self.pad_id, layout=layout or self.layout)
        if "ref_chosen_logps" in columns:
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                batch[key] = torch.as_tensor(columns[key], dtype=torch.float32)
        return {k: v.to(self.strategy.device) for k, v in batch.items()}

    def rank_batches(self, n: int):
        """This rank's share of `n` held-out rows, the same number of batches on every rank
        (sampler.rank_batches: ZeRO-3 forwards are collective)."""
        s = self.strategy
        return rank_batches(n, rank=s.rank, world_size=s.world_size, micro_batch_size=self.cfg.train.micro_batch_size)

    def evaluate(self) -> dict[str, float]:
        """Implicit-reward metrics on the held-out pairs (ties count half), all ranks together."""
        sums = MetricSums()
        self.engine.eval()
        with torch.no_grad():
            for idx, real in self.rank_batches(len(self.eval_pairs) if self.eval_pairs else 0):
                batch = self.collate(self.eval_pairs, idx)
                _, per_example = safedpo_forward(
                    self.engine, self.reference_logps, batch, self.cfg.train.beta, self.cfg.train.delta,
                    **loss_options(self.cfg.train),
                )
                if real:
                    sums.add(tie_aware_accuracy(per_example), batch["chosen_unsafe"], batch["rejected_unsafe"])
        self.engine.train()
        sums.sums = self.strategy.all_reduce_sum(sums.sums)
        return sums.as_dict()

    def start_metrics(self) -> dict[str, float]:
        """Held-out metrics before training (train.eval_at_start). 'derived': the policy is the
        reference at step 0 (the same weights, precision and batches; LoRA starts at B = 0), so
        every implicit reward is exactly 0: margins 0, accuracy ½ with ties counted half, and no
        forward pass over the held-out pairs (a reference-free loss is measured instead)."""
        how = self.cfg.train.eval_at_start
        if how == "off" or self.eval_pairs is None:
            return {}
        if how == "measured" or not uses_reference(self.cfg.train.loss):
            return self.evaluate()

        table = self.eval_pairs.table
        types = pair_type_index(torch.as_tensor(table.column("chosen_unsafe").to_numpy(zero_copy_only=False)),
                                torch.as_tensor(table.column("rejected_unsafe").to_numpy(zero_copy_only=False)))
        counts = torch.bincount(types, minlength=len(PAIR_TYPES)).tolist()
        zero = {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.5}
        out = dict(zero)
        for name, n in zip(PAIR_TYPES, counts):
            if n:
                out.update({f"{k}/{name}": v for k, v in zero.items()}, **{f"pairs/{name}": float(n)})
        return out

    def train_step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        lr = self.strategy.current_lr()  # the rate this step uses (the scheduler moves after it)
        sums, tokens = MetricSums(), 0
        for micro in range(self.sampler.accumulation_steps):
            batch = self.collate(self.train_pairs, self.sampler.indices(step, micro))
            loss, per_example = safedpo_forward(
                self.engine, self.reference_logps, batch, self.cfg.train.beta, self.cfg.train.delta,
                **loss_options(self.cfg.train),
            )
            self.strategy.backward(loss)
            self.strategy.step()
            sums.add(per_example, batch["chosen_unsafe"], batch["rejected_unsafe"])
            tokens += int(batch["num_tokens"])
        flat = torch.cat([sums.sums.flatten(), torch.tensor([float(tokens)], dtype=torch.float64)])
        flat = self.strategy.all_reduce_sum(flat)
        sums.sums = flat[:-1].view_as(sums.sums)
        step_time = time.perf_counter() - t0
        metrics = sums.as_dict()
        metrics.update(
            epoch=self.sampler.epoch_of(step), lr=lr,
            step_time_s=step_time, tokens_per_s=float(flat[-1]) / step_time,
        )
        return metrics

    def check_layout(self, step: int) -> None:
        """A packed or shared layout must give the padded layout's log-probs: a model whose
        attention ignores the boundaries (custom code, an implementation without 4D masks) would
        leak across sequences. Compared once on two pairs of this step's first micro-batch cut
        short and laid out in one row (a fraction of a second), all ranks agreeing (a sum of
        non-negative gaps); the next layout is used when they differ by more than rounding."""
        probe = probe_pairs(self.train_pairs.batch(self.sampler.indices(step, 0)))
        device = self.strategy.device

        def agree(gap: float) -> float:
            return float(self.strategy.all_reduce_sum(torch.tensor([gap], dtype=torch.float64))[0])

        self.engine.eval()
        self.layout, self.layout_note = usable_layout(
            self.engine, self.layout,
            lambda layout: {k: v.to(device) for k, v in collate_pairs(probe, self.pad_id, layout=layout,
                                                                      row_capacity=4096).items()},
            self.cfg.train.precision, agree)
        self.engine.train()

    def checkpoint(self, step: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        import ray.train

        if self.strategy.is_rank0:
            self.outputs.mark(step)  # log sizes at this checkpoint; uploaded with the logs
        with tempfile.TemporaryDirectory() as tmp:
            self.strategy.save(tmp, {**state, "step": step})
            ray.train.report(self.report_metrics(step, metrics, state),
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if self.strategy.is_rank0:
            print(f"[safedpo] checkpoint saved at step {step}", flush=True)

    @staticmethod
    def report_metrics(step: int, metrics: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """What goes to Ray Train (and, in a search, to Tune): the step's metrics and the latest
        held-out metrics, so every report carries the metric a scheduler compares."""
        held_out = {"eval/" + k: v for k, v in state.get("eval_last", state.get("eval_before", {})).items()}
        return {**metrics, **held_out, "step": step}

    def record_pairs(self, step: int, done: int) -> None:
        """train.record_pairs: every rank puts the pair_ids it trains at `step` in their slots of
        the global batch, one all-reduce, rank 0 appends them to pairs.jsonl (all ranks call)."""
        s, sampler, mb = self.strategy, self.sampler, self.cfg.train.micro_batch_size
        slots = torch.zeros(self.cfg.train.global_batch_size, dtype=torch.float64)
        for micro in range(sampler.accumulation_steps):
            for j, i in enumerate(sampler.indices(step, micro)):
                slots[(micro * s.world_size + s.rank) * mb + j] = float(self.train_pairs.pair_ids[i]) + 1
        slots = s.all_reduce_sum(slots)
        if s.is_rank0:
            self.outputs.append("pairs.jsonl", {"step": done, "epoch": sampler.epoch_of(step),
                                                "pair_ids": [int(v) - 1 for v in slots.tolist()]})

    def export(self) -> Path:
        out = self.run_dir / "model"
        with self.strategy.full_parameters() as module:
            if self.strategy.is_rank0:
                export_model(module, self.tokenizer, out, merge_lora=self.cfg.run.export_merged)
        self.strategy.barrier()
        return out

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import ray.train

        cfg, s = self.cfg, self.strategy
        state, start = restore_checkpoint(s)
        worker_nodes = gather_node_ids(s)
        log = None
        if s.is_rank0:
            self.outputs.restore(start)  # logs cut back to this checkpoint: no step is logged twice
            log = MetricsLog(self.run_dir, total_steps=self.total_steps, tensorboard=cfg.run.tensorboard,
                             mlflow_tracking_uri=cfg.run.mlflow_tracking_uri, run_name=self.run_dir.name)
            print(f"[safedpo] {len(self.train_pairs)} train pairs, "
                  f"{len(self.eval_pairs) if self.eval_pairs else 0} held-out pairs, "
                  f"{self.total_steps} steps, {s.world_size} workers ({torch.get_num_threads()} threads each), "
                  f"ZeRO-{cfg.train.zero_stage}"
                  + (f", resuming at step {start}" if start else ""), flush=True)
        self.check_layout(start)
        if log:
            for note in (self.logits_note, self.layout_note):
                if note:
                    print(f"[safedpo] {note}", flush=True)
        if "eval_before" not in state:
            state["eval_before"] = self.start_metrics()
            if log:
                log.log(0, {"eval/" + k: v for k, v in state["eval_before"].items()})
        stop = min(self.total_steps, cfg.train.stop_at_step or self.total_steps)
        stop_check, stop_reason = preempt.StopCheck(self.outputs.root, s), None  # signals (train/preempt.py)
        metrics: dict[str, Any] = {}
        for step in range(start, stop):
            metrics = self.train_step(step)
            done = step + 1
            if log and (done % cfg.train.log_every == 0 or done == stop):
                log.log(done, metrics)
                log.progress(done, metrics)
            if cfg.train.record_pairs:
                self.record_pairs(step, done)
            if cfg.train.step_delay_s:
                time.sleep(cfg.train.step_delay_s)  # debug: room to lose a node between checkpoints
            eval_now = cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < self.total_steps
            if eval_now:
                state["eval_last"] = self.evaluate()
                if log:
                    log.log(done, {"eval/" + k: v for k, v in state["eval_last"].items()})
            every = cfg.train.checkpoint_every
            saved = (every and done % every == 0) or done == stop
            if saved:
                self.checkpoint(done, metrics, state)
            elif eval_now:
                ray.train.report(self.report_metrics(done, metrics, state))
            request = stop_check.poll(done, stop)  # all ranks: a signal asks for a checkpoint now
            if request:
                if not saved:
                    self.checkpoint(done, metrics, state)
                request.after_checkpoint(done)  # a worker's SIGTERM ends this attempt (Ray Train may restart)
                if request.ends_run:  # the driver's: the run stops here
                    stop_reason, stop = request.reason, done
                    break
        result: dict[str, Any] = {"eval_before": state["eval_before"], "last_step": stop}
        result.update(resumed_at_step=start, worker_nodes=worker_nodes)  # this attempt's start, ranks' nodes
        result.update(checkpoints.describe(getattr(s, "restored", None)))  # resumed from; damaged ones skipped
        if stop_reason:
            result["stop_reason"] = stop_reason
        if stop == self.total_steps:
            result["eval_after"] = state["eval_last"] = self.evaluate()
            result["model_dir"] = str(self.export())
            if log:
                log.log(stop, {"eval/" + k: v for k, v in result["eval_after"].items()})
            # The final held-out metrics, for a search's scheduler and results table.
            ray.train.report({**self.report_metrics(stop, metrics, state), "completed": 1})
        else:
            result["stopped_early"] = True
        result["reference_forwards"] = self.reference_forwards
        result["reference_model_held"] = self.reference is not None  # a frozen copy in this worker
        if log:
            log.close()
            (self.run_dir / "train_result.json").write_text(json.dumps(result, indent=2))
            self.outputs.finish()  # an object-store root gets everything rank 0 wrote
        return result


def install_logp_heads(cfg: Config, model, reference) -> str:
    """train.logits_chunk_tokens > 0: the policy's (and a frozen reference's) output layer
    projects only response positions, in chunks (logp_head.py). Returns a note when the model
    keeps its full logits."""
    if not cfg.train.logits_chunk_tokens:
        return ""
    reason = logp_head.unsupported_reason(model)
    if reason:
        return f"full logits: {reason}"
    for m in (model, reference):
        if m is not None:
            logp_head.install(m, cfg.train.logits_chunk_tokens)
    return ""


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report's whole metrics dict (60+ keys) and every checkpoint path at
    INFO from each worker; our own progress line says what matters."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if loop_config.get("torch_threads"):
        torch.set_num_threads(int(loop_config["torch_threads"]))
    quiet_ray_train_reports()
    try:
        worker = Worker(loop_config)
    except handoff.NoPairs as reason:  # the driver says why (its preparation error, or the signal)
        return {"no_pairs": str(reason), "stopped_early": True, "last_step": 0}
    return worker.run()
