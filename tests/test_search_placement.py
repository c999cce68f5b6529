"""Where Tune trials go (search/placement.py): how many trials the cluster's nodes hold, a trial
that can never fit stops the command, and the trial's own process reserves no CPU or GPU."""

import pytest

from safedpo_ray.config.training import load_config
from safedpo_ray.search.experiment import max_concurrent, trial_placement
from safedpo_ray.search.placement import TRIAL_BUNDLE, PlacementError, holds, plan
from safedpo_ray.search.space import SearchSpec
from safedpo_ray.train.launch import resources_per_worker

GiB = float(2**30)
HEAD = {"memory": 8 * GiB, "object_store_memory": 2 * GiB}  # KubeRay head: num-cpus "0"
GPU_POD = {"CPU": 32.0, "GPU": 8.0, "memory": 200 * GiB, "object_store_memory": 50 * GiB}


def cfg(*overrides):
    return load_config(None, ["train.micro_batch_size=1", "train.global_batch_size=24", *overrides])


def minus(node, bundle):
    return {k: v - bundle.get(k, 0.0) for k, v in node.items()}


def test_kuberay_head_without_cpus_and_a_gpu_pod_of_exactly_its_workers():
    c = cfg("run.num_workers=8", "run.cpus_per_worker=4", "run.use_gpu=true")
    worker = resources_per_worker(c.run)
    assert worker == {"CPU": 4.0, "GPU": 1.0}
    p = trial_placement(c, local=False, nodes=[HEAD, GPU_POD])
    assert p.per_node == [0, 8] and p.max_trials == 1
    # the trial's own process takes nothing the 8 workers need, wherever it lands
    assert not {"CPU", "GPU"} & set(TRIAL_BUNDLE) and holds(HEAD, TRIAL_BUNDLE) >= 1
    assert holds(minus(GPU_POD, TRIAL_BUNDLE), worker) == 8
    assert holds(minus(GPU_POD, {"CPU": 0.01}), worker) == 7  # what {"cpu": 0.01} per trial did
    # two GPU pods: two trials at once; the user's own limit wins
    assert max_concurrent(c, SearchSpec(), local=False, nodes=[HEAD, GPU_POD, GPU_POD]) == 2
    assert max_concurrent(c, SearchSpec(max_concurrent_trials=1), local=False, nodes=[HEAD, GPU_POD, GPU_POD]) == 1


def test_two_node_cpu_cluster():
    nodes = [{"CPU": 8.0, "memory": 16 * GiB}, {"CPU": 8.0, "memory": 16 * GiB}]
    assert trial_placement(cfg("run.num_workers=2", "run.cpus_per_worker=3"), False, nodes).max_trials == 2
    # a trial's workers may span nodes (Train's PACK is soft): 3 × 4 CPUs on two 8-CPU nodes
    p = trial_placement(cfg("run.num_workers=3", "run.cpus_per_worker=4"), False, nodes)
    assert p.per_node == [2, 2] and p.max_trials == 1
    # custom worker resources count too
    p = trial_placement(cfg("run.num_workers=1", "run.worker_resources={fast: 1}"), False,
                        [{**nodes[0], "fast": 1.0}, nodes[1]])
    assert p.per_node == [1, 0] and p.max_trials == 1


def test_a_local_ray_keeps_two_cpus_beyond_the_first_trial():
    node = [{"CPU": 4.0, "memory": 8 * GiB}]
    assert trial_placement(cfg("run.num_workers=1"), True, node).max_trials == 2
    # 2 cores: one trial at a time, never an error for the CPUs kept
    assert trial_placement(cfg("run.num_workers=2"), True, [{"CPU": 2.0, "memory": 8 * GiB}]).max_trials == 1


def test_a_trial_that_can_never_fit_is_one_clear_sentence():
    c = cfg("run.num_workers=8", "run.cpus_per_worker=4", "run.use_gpu=true")
    with pytest.raises(PlacementError) as err:
        trial_placement(c, False, [HEAD, {**GPU_POD, "GPU": 4.0}])
    msg = str(err.value)
    assert "needs 8 worker(s) of {CPU: 4, GPU: 1}" in msg and "hold only 4" in msg and "GPU: 4" in msg
    assert "\n" not in msg
    # enough CPUs in total, but no node holds one 4-CPU worker
    with pytest.raises(PlacementError, match="hold only 0"):
        plan([{"CPU": 3.0, "memory": GiB}, {"CPU": 3.0, "memory": GiB}], {"CPU": 4.0}, 1)
    with pytest.raises(PlacementError, match="own process needs"):
        plan([{"CPU": 4.0}], {"CPU": 1.0}, 1)


def test_the_experiment_stops_before_any_work_when_a_trial_cannot_fit(ray_local, tmp_path, monkeypatch):
    from safedpo_ray.search import placement
    from safedpo_ray.search.experiment import run_experiment
    from safedpo_ray.search.space import base_config

    # The nodes as this machine's local Ray has them (in the whole suite, the nodes read through
    # the state API once gave no error here: not looked into; what is tested is the order, no
    # work before the check)
    monkeypatch.setattr(placement, "cluster_nodes", lambda: [{"CPU": 4.0, "memory": 8 * 2**30}])

    spec = SearchSpec(name="nofit", params={"train.delta": {"grid": [0, 5]}})
    base = base_config(None, spec, [f"run.output_dir={tmp_path}", "run.num_workers=8", "run.cpus_per_worker=4",
                                    "train.micro_batch_size=1", "train.global_batch_size=8"])
    with pytest.raises(PlacementError, match="needs 8 worker"):
        run_experiment(spec, base)
    assert not (tmp_path / ".cache").exists()  # no data prepared, no reference pass


@pytest.mark.timeout(180)
def test_tune_runs_a_trial_that_reserves_no_cpu(ray_local, tmp_path):
    import ray
    from ray import tune

    from safedpo_ray.search.placement import trial_resources

    def trainable(config):
        tune.report({"assigned": ray.get_runtime_context().get_assigned_resources()})

    grid = tune.Tuner(tune.with_resources(trainable, trial_resources()),
                      run_config=tune.RunConfig(storage_path=str(tmp_path), name="noop", verbose=0)).fit()
    (result,) = list(grid)
    assert result.error is None
    assigned = result.metrics["assigned"]
    assert not assigned.get("CPU") and not assigned.get("GPU")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_on_a_head_without_cpus_a_trial_reserving_no_cpu_leaves_the_node_to_its_workers():
    """A real 2-node Ray (tests/tune_placement_cluster.py, its own processes): head 0 CPUs, a node
    of exactly the trial's 3 worker CPUs. With {"CPU": 0.01} per trial the same script's worker
    group never started (timed out after 15 s)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    script = Path(__file__).with_name("tune_placement_cluster.py")
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rtp", dir="/tmp")}  # short socket paths
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(script), "new"], env=env, capture_output=True, text=True, timeout=280)
    line = next((l for l in reversed(out.stdout.splitlines()) if l.startswith("{")), None)
    assert line, (out.stdout[-2000:], out.stderr[-2000:])
    result = json.loads(line)
    # The trial reserves no CPU, so wherever Tune puts it (the head or the node: both were seen) its
    # 3 workers still fit the node's 3 CPUs and the trial finishes.
    assert result["error"] is None and result["workers_on_head"] is False, result
