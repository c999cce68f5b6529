"""Where Tune trials go: what one trial reserves, how many fit at once, and a clear error when
one can never fit.

A trial is a function trainable (search/experiment.py) that builds and fits a `TorchTrainer`.
In Ray 2.60's Train V2 the trainer's controller creates its workers' placement group itself
(`WorkerGroup._create_placement_group` calls `placement_group(...)` unconditionally; Train V1's
`BackendExecutor` reused Tune's group, V2 does not). Worker bundles reserved in the trial's own
placement group would therefore be reserved twice, and a GPU pod whose CPUs are exactly its
workers' could never start them. So:

- the trial itself reserves no CPU and no GPU, only `TRIAL_BUNDLE` (a little memory, which
  every node has, a head with `num-cpus: 0` included): it can wait on any node without taking
  a CPU its workers need;
- its workers are reserved by Train V2 (`run.num_workers` × `train.launch.resources_per_worker`),
  and how many trials Tune starts at once is what the cluster's nodes hold of those workers
  (`max_trials`), so every running trial's worker group can be placed;
- a trial whose workers no node set can ever hold stops the command before any trial starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from safedpo_ray.errors import UserError
from safedpo_ray.runtime.storage import alive_nodes

TRIAL_BUNDLE: dict[str, float] = {"memory": float(128 * 2**20)}
"""What a trial's own process reserves: no CPU (on a pod of exactly 8 × 4 CPUs its 8 workers
would otherwise never fit), a little memory so the bundle is not empty."""

_EPS = 1e-9


class PlacementError(UserError):
    """A trial that the cluster can never place."""


@dataclass
class Placement:
    worker: dict[str, float]
    """One worker's bundle."""
    workers_per_trial: int
    per_node: list[int]
    """How many such workers each node holds (the nodes in the order given)."""
    max_trials: int
    """Trials whose workers all fit at once (at least 1)."""


def holds(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of `bundle` fit on a node with these total resources."""
    counts = [math.floor(node.get(k, 0.0) / v + _EPS) for k, v in bundle.items() if v > 0]
    return max(0, min(counts)) if counts else 0


def _fmt(resources: dict[str, float]) -> str:
    def value(k: str, v: float) -> str:
        if k in ("memory", "object_store_memory"):
            return f"{v / 2**30:.2g} GiB"
        return f"{v:g}"
    return "{" + ", ".join(f"{k}: {value(k, v)}" for k, v in sorted(resources.items())) + "}"


def plan(nodes: list[dict[str, float]], worker: dict[str, float], num_workers: int, *,
         keep_cpus: float = 0.0) -> Placement:
    """The placement of trials of `num_workers` × `worker` on nodes with these total resources
    (`keep_cpus`: CPUs of a one-node local Ray kept for Ray Data and scoring).
    Raises PlacementError when a single trial can never be placed."""
    per_node = [holds(n, worker) for n in nodes]
    total = sum(per_node)
    need = f"{num_workers} worker(s) of {_fmt(worker)}"
    shapes = "; ".join(f"node {i}: {_fmt({k: v for k, v in n.items() if k in worker or k == 'memory'})}"
                       for i, n in enumerate(nodes)) or "no nodes"
    if total < num_workers:
        raise PlacementError(
            f"one trial needs {need} at once but this Ray cluster's nodes hold only {total} such worker(s) "
            f"({shapes}): "
            "lower run.num_workers or run.cpus_per_worker, change run.worker_resources, or add nodes "
            "(an autoscaling cluster counts only the nodes up now: start them first, e.g. min_workers)")
    if not any(holds(n, TRIAL_BUNDLE) for n in nodes):
        raise PlacementError(f"a trial's own process needs {_fmt(TRIAL_BUNDLE)} on one node, and no node has it "
                             f"({shapes})")
    spare = total
    if keep_cpus and len(nodes) == 1:  # a local Ray: beyond the first trial, leave these CPUs free
        spare = holds({**nodes[0], "CPU": max(0.0, nodes[0].get("CPU", 0.0) - keep_cpus)}, worker)
    return Placement(worker=worker, workers_per_trial=num_workers, per_node=per_node,
                     max_trials=max(1, spare // num_workers))


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of every alive node of the connected Ray."""
    return [dict(n.get("Resources") or {}) for n in alive_nodes()]


def trial_resources() -> Any:
    """The `tune.with_resources` argument for one trial: its own small bundle only (see above)."""
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory([dict(TRIAL_BUNDLE)])
