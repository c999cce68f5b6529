"""A Tune trial fitting a Train V2 `TorchTrainer` on a cluster shaped like KubeRay's: a head
with 0 CPUs and one node whose CPUs are exactly the trial's workers'. Run as a script (its own
Ray cluster, apart from the test session's Ray):

    python tests/tune_placement_cluster.py new   # the trial's bundle of search/placement.py
    python tests/tune_placement_cluster.py old   # {"CPU": 0.01}, as before

Prints one JSON line: the trial's error (if any), the trial's node, the workers' nodes.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

WORKERS = 3


def main(mode: str) -> None:
    import ray
    from ray import tune
    from ray.cluster_utils import Cluster

    from safedpo_ray.search.placement import trial_resources

    tmp = tempfile.mkdtemp(prefix="tune-place-")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=WORKERS, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    head_id = next(n["NodeID"] for n in ray.nodes() if not n["Resources"].get("CPU"))

    def trial(config):
        import ray.train
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        def loop():
            return ray.get_runtime_context().get_node_id()

        result = TorchTrainer(
            loop, scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"t-{tune.get_context().get_trial_id()}", storage_path=tmp,
                                 failure_config=FailureConfig(controller_failure_limit=0),
                                 callbacks=[TuneReportCallback()])).fit()
        tune.report({"trial_node": ray.get_runtime_context().get_node_id(),
                     "worker_node": result.return_value})

    resources = trial_resources() if mode == "new" else {"cpu": 0.01}
    grid = tune.Tuner(tune.with_resources(trial, resources),
                      tune_config=tune.TuneConfig(max_concurrent_trials=1),
                      run_config=tune.RunConfig(storage_path=tmp, name="place", verbose=0,
                                                failure_config=tune.FailureConfig(max_failures=0))).fit()
    (r,) = list(grid)
    m = r.metrics or {}
    print(json.dumps({"error": None if r.error is None else str(r.error).strip().splitlines()[-1][:300],
                      "trial_on_head": m.get("trial_node") == head_id if m.get("trial_node") else None,
                      "workers_on_head": m.get("worker_node") == head_id if m.get("worker_node") else None}),
          flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
