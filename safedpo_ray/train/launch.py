"""The one way a Ray Train job starts: every `TorchTrainer` of the package is built here.

`train`, `sft`, `train-scorer` and every Tune trial describe their job (`Launch`: the worker
loop and its config, the configuration whose `run` section says the resources, storage and
failure handling) and call `launch`. Each of them therefore gets, by construction:
- resources: `run.num_workers` × (`run.cpus_per_worker` CPUs, a GPU with `run.use_gpu`,
  `run.worker_resources`), the NCCL backend on GPUs and gloo on CPUs;
- storage: Ray Train's checkpoints under the job's storage path (a shared filesystem or an
  object store on a cluster), keeping `keep_checkpoints` of them;
- failures: `run.max_failures` restarts from the last checkpoint, and a wait for lost nodes
  bounded by `run.node_wait_timeout_s` with a message saying how to resume (train/faults.py);
- stopping: SIGTERM/SIGINT on the driver asks the workers for a checkpoint and a stop, a
  worker's own SIGTERM (its node going away) checkpoints first (train/preempt.py); a user error
  raised on a worker reaches the user as its one sentence.
Data reaches the workers one way: Arrow files under the run's storage (the prepared pairs of
`train` and Tune trials, the tokenized examples of `sft` and pairs of `train-scorer`), named in
the loop config and memory-mapped by every worker (fetched once per node from an object store;
data/pairs.py), each worker taking its share by index (train/sampler.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from safedpo_ray.train import faults, preempt


@dataclass
class Launch:
    loop: Callable[[dict[str, Any]], Any]
    """What each worker runs (`train_loop(loop_config)`)."""
    loop_config: dict[str, Any]
    cfg: Any
    """The command's configuration: its `run` section (RunConfig) sets resources and failures."""
    name: str
    """Ray Train's name for the run (its checkpoints live under storage_path/name)."""
    storage_path: str
    """Ray Train's storage: a local path, a shared filesystem or an object-store URI."""
    root: str
    """The run's own root (local path or URI): where the driver's stop marker is written."""
    keep_checkpoints: int | None = None
    callbacks: list = field(default_factory=list)
    """More Ray Train callbacks (a Tune trial passes its reporter)."""


def resources_per_worker(run) -> dict[str, float]:
    """One worker's reservation: `run.cpus_per_worker` CPUs, a GPU with `run.use_gpu`, and
    `run.worker_resources` (what Ray Train's ScalingConfig asks each worker's bundle for)."""
    need = {"CPU": float(run.cpus_per_worker), **{k: float(v) for k, v in run.worker_resources.items()}}
    if run.use_gpu:
        need.setdefault("GPU", 1.0)
    return {k: v for k, v in need.items() if v}


def trainer_for(job: Launch):
    """The `TorchTrainer` for a job (built, not started)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig  # lazy: imports ray
    from ray.train.torch import TorchConfig, TorchTrainer

    run = job.cfg.run
    return TorchTrainer(
        job.loop,
        train_loop_config=job.loop_config,
        torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                     resources_per_worker=resources_per_worker(run)),
        run_config=RunConfig(
            name=job.name, storage_path=job.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints),
            failure_config=faults.failure_config(job.cfg),  # max_failures, and a bounded wait for nodes
            # + each worker's SIGTERM handler: checkpoint first (train/preempt.py)
            callbacks=[*job.callbacks, *preempt.worker_callbacks(run.stop_timeout_s)],
        ),
    )


def launch(job: Launch):
    """Run the job to its end; Ray Train's `Result`. `trainer.fit()` runs in a thread under a
    command's signal guard (the main thread keeps handling signals), with a clear message when
    nodes did not come back or a worker raised a user error."""
    trainer = trainer_for(job)
    result = preempt.run_fit(lambda: faults.fit(trainer, job.cfg), root=job.root)
    if result.error:
        raise faults.explain(job.cfg, result.error)
    return result
