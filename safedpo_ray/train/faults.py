"""Losing a worker or a node: what Ray Train retries, how long it waits, what the user is told.

`run.max_failures` lets Ray Train restart the worker group after a worker or node dies; the new
group resumes from the last checkpoint (worker.py: `ray.train.get_checkpoint()` and the step in
it, so the sampler continues with the same next batch). Restarting needs the nodes the workers
were placed on, or new ones: the placement group waits `run.node_wait_timeout_s` for them, then
the run fails with `NodesDidNotComeBack` instead of waiting forever (Ray Train's default retries
the wait without limit).
"""

from __future__ import annotations

import os

from safedpo_ray.config.training import Config
from safedpo_ray.errors import UserError
from safedpo_ray.runtime.storage import redact
from safedpo_ray.train import preempt
from safedpo_ray.train.worker_errors import user_error_in

TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0


class NodesDidNotComeBack(UserError):
    """The workers could not all be placed within run.node_wait_timeout_s."""


def node_wait_timeout_s(cfg: Config) -> float:
    if cfg.run.node_wait_timeout_s is not None:
        return float(cfg.run.node_wait_timeout_s)
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def failure_config(cfg: Config):
    """Ray Train's FailureConfig for this run; also sets the wait for nodes, which Ray Train
    reads from the environment (propagated from the driver to its controller and workers)."""
    from ray.train import FailureConfig

    os.environ[TIMEOUT_ENV] = f"{node_wait_timeout_s(cfg):g}"
    # controller_failure_limit=0: a worker group that cannot be placed in time ends the run.
    return FailureConfig(max_failures=cfg.run.max_failures, controller_failure_limit=0)


def fit(trainer, cfg: Config):
    """`trainer.fit()`; a failure the user can act on is raised as a UserError with its message."""
    try:
        return trainer.fit()
    except Exception as exc:
        explained = explain(cfg, exc)
        if explained is exc:
            raise
        raise explained from exc


def explain(cfg: Config, error: BaseException) -> BaseException:
    """A clear message for the failures a user can act on; other errors pass through."""
    stopped = preempt.explain(cfg.run.name, error)  # a worker got SIGTERM and saved a checkpoint first
    if stopped is not None:
        return stopped

    user = user_error_in(error)  # a worker's UserError (no intact checkpoint, refused weights): its sentence
    if user is not None:
        return user
    try:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
        from ray.train.v2.api.exceptions import ControllerError
    except ImportError:  # pragma: no cover - another Ray Train version
        return error
    cause = getattr(error, "controller_failure", None) if isinstance(error, ControllerError) else None
    if isinstance(cause, WorkerGroupStartupTimeoutError):
        r = cfg.run
        per_worker = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {}), **r.worker_resources}

        where = redact(r.storage_path) if r.storage_path else "the run directory"
        return NodesDidNotComeBack(
            f"the cluster did not provide {r.num_workers} workers × {per_worker} within "
            f"run.node_wait_timeout_s={node_wait_timeout_s(cfg):g} s (a node was lost and none came back, "
            f"or the cluster is too small), so the run failed instead of waiting. Its last checkpoint is "
            f"kept in {where}: when the nodes are back, rerun with run.resume=true run.name={r.name}; "
            f"raise run.node_wait_timeout_s if nodes take longer to start (autoscaling)."
        )
    return error
