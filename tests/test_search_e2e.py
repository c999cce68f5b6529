"""Ray Tune experiments end to end on the tiny model, on CPU: files, the shared reference pass,
failed trials, ASHA and resources, resume after the driver is killed."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from safedpo_ray.config.training import load_config
from safedpo_ray.search.experiment import run_experiment
from safedpo_ray.search.space import base_config, load_space

pytestmark = pytest.mark.timeout(900)

SMALL = [
    "data.synthetic_prompts=48", "data.synthetic_eval_prompts=16", "data.max_length=96",
    "data.max_prompt_length=40", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.learning_rate=1e-3", "run.num_workers=1", "train.max_steps=3",
]  # one worker per trial: two trials at once on the session's Ray (4 CPUs, 2 kept for Ray Data)


def space(tmp_path: Path, name: str, params: dict, **settings) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "params": params, **settings}))
    return path


def experiment(tmp_path, name, params, *extra, **settings):
    spec = load_space(space(tmp_path, name, params, **settings))
    base = base_config(None, spec, SMALL + [f"run.output_dir={tmp_path}", *extra])
    return run_experiment(spec, base)


def test_grid_scores_generations_writes_results_and_shares_one_reference_pass(ray_local, tmp_path):
    """Two trials at once, each scoring its generations with a cost and a reward model; result
    files; one reference pass shared by both."""
    import math

    from test_eval_score_model import TEXTS, beaver_config, write_beaver

    from safedpo_ray.models.loading import build_tiny_model, load_tokenizer
    from safedpo_ray.search.experiment import max_concurrent

    tok = load_tokenizer(build_tiny_model(tmp_path / "tok", TEXTS, seed=0, hidden_size=32, num_layers=1,
                                          num_heads=2, intermediate_size=64, vocab_size=400))
    cost = write_beaver(tmp_path / "cost", tok)
    reward = write_beaver(tmp_path / "reward", tok, config=beaver_config(tok, score_type="reward"))
    spec = load_space(space(tmp_path, "grid", {"train.delta": {"grid": [0, 5]}}))
    assert max_concurrent(base_config(None, spec, SMALL), spec, local=True) == 2  # both trials at once
    s = experiment(tmp_path, "grid", {"train.delta": {"grid": [0, 5]}}, safety_threshold=0.0,
                   scoring={"cost_model": str(cost), "reward_model": str(reward), "max_prompts": 3,
                            "max_new_tokens": 4})
    exp = Path(s["experiment_dir"])
    for name in ("results.csv", "results.md", "best.yaml", "pareto.png", "delta_sensitivity.png"):
        assert (exp / name).stat().st_size > 0, name
    rows = list(csv.DictReader((exp / "results.csv").open()))
    assert sorted(float(r["train.delta"]) for r in rows) == [0.0, 5.0]
    assert all(r["status"] == "done" for r in rows)
    assert all(r["eval/rewards/accuracies/safe_unsafe"] and r["eval/rewards/accuracies/safe_safe"] for r in rows)
    # the trials are compared on their scored generations
    assert (s["safety"], s["helpfulness"]) == ("score/harmless_ratio", "score/mean_reward")
    for row in s["rows"]:
        assert 0 <= row["score/harmless_ratio"] <= 1 and math.isfinite(row["score/mean_reward"])
        results = json.loads((exp / "trials" / row["trial"] / "evaluation" / "results.json").read_text())
        (model,) = results["models"].values()
        assert model["scores"]["responses"] == 3
        assert model["scores"]["harmless_ratio"] == row["score/harmless_ratio"]
    assert s["best"]["trial"] in {r["trial"] for r in s["rows"]}
    # one reference pass for the experiment; trials ran no reference forward at all
    assert s["reference"]["computed"] is True
    assert [r["reference_forwards"] for r in s["rows"]] == [0, 0]
    # best.yaml is a train config that reproduces the best trial
    best = load_config(exp / "best.yaml")
    assert best.train.delta == s["best"]["train.delta"] and best.train.max_steps == 3

    # The shared pass is each trial's own reference, pair by pair: at step 1 the policy is still the
    # reference, so every implicit reward is 0 (a pass misaligned with the trial's pairs is not).
    # (That a cached pass gives the losses a live reference model gives, for the same
    # reference_logps: test_train_e2e.py::test_cached_reference_equals_live_reference.)
    for trial_dir in (exp / "trials").iterdir():
        records = [json.loads(l) for l in (trial_dir / "metrics.jsonl").open()]
        assert sorted(r["step"] for r in records if "loss" in r) == [1, 2, 3]
        first = next(r for r in records if r.get("step") == 1 and "loss" in r)
        assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4, first
        assert abs(first["logps/chosen"]) > 1  # (real log-probs, not zeros on both sides)


def test_reference_pass_is_reused_on_the_same_inputs_and_recomputed_when_they_change(ray_local, tmp_path):
    import torch

    from safedpo_ray.data.prepared import cache_base
    from safedpo_ray.data.reference import reference_logps
    from safedpo_ray.models.loading import load_model, load_tokenizer
    from safedpo_ray.data.pairs import PairTable
    from safedpo_ray.search.experiment import _prepare_shared, prepare_experiment
    from safedpo_ray.train.trainer import attach_reference, prepare

    def prepared(name, *extra):
        cfg = load_config(None, SMALL + [f"run.output_dir={tmp_path}", f"run.name={name}", *extra])
        p = prepare(cfg, tmp_path / name)
        attach_reference(cfg, p, shared=True)
        return cfg, p

    cfg, first = prepared("first")
    assert first.reference.computed and first.reference.pairs > 0
    table = PairTable(first.data.split("train"), first.reference.split("train"))
    assert table.ref is not None and len(table.ref[0]) == len(table) and (table.ref[0] < 0).all()
    _, second = prepared("second")
    assert not second.reference.computed and second.reference.key == first.reference.key
    assert second.data.reused and second.data.key == first.data.key
    # a search on the same inputs reuses it too (the experiment's preparation, before any trial)
    spec = load_space(space(tmp_path, "again", {"train.beta": {"grid": [0.2]}}))
    spec, base, exp_dir = prepare_experiment(spec, base_config(None, spec, SMALL + [f"run.output_dir={tmp_path}"]),
                                             None)
    again = _prepare_shared(base, exp_dir)
    assert again["reference"]["computed"] is False and again["reference"]["key"] == first.reference.key
    # a changed max_length computes anew
    _, longer = prepared("longer", "data.max_length=120")
    assert longer.reference.computed and longer.reference.key != first.reference.key
    # so does another reference model on the very same pairs
    other = tmp_path / "other-model"
    model = load_model(first.model_path)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.01)
    model.save_pretrained(other)
    load_tokenizer(first.model_path).save_pretrained(other)
    info = reference_logps(first.data, model_path=str(other), precision="fp32", cache_base=cache_base(cfg.run),
                           local_base=tmp_path / "local", batch_size=2, num_actors=1)
    assert info.computed and info.key != first.reference.key
    other_logps = PairTable(first.data.split("train"), info.split("train")).ref[0]
    assert not (other_logps == table.ref[0]).all()


def test_asha_stops_a_trial_and_frees_its_resources(ray_local, tmp_path):
    import ray

    # lr 1e-9 cannot move the held-out accuracy from 0.5; lr 1e-3 does, so ASHA stops the former
    s = experiment(tmp_path, "asha", {"train.learning_rate": {"grid": [1e-3, 1e-9]}}, "train.max_steps=8",
                   scheduler="asha", asha_grace_period=2, asha_reduction_factor=2, report_every=2,
                   max_concurrent_trials=1)  # lr 1e-3 sets the rungs' bar before 1e-9 reaches them
    status = {r["train.learning_rate"]: r["status"] for r in s["rows"]}
    assert status == {1e-3: "done", 1e-9: "stopped"}
    stopped = next(r for r in s["rows"] if r["status"] == "stopped")
    assert stopped["step"] < 8
    deadline = time.time() + 30
    while time.time() < deadline:  # the stopped trial's workers and placement group are given back
        live = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live and ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            break
        time.sleep(1)
    assert not live, live
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


# peft refuses target modules the model does not have: that trial raises in its workers (no retry:
# the same error again). Run one at a time, the good one first.
KILL_PARAMS = {"model.lora.target_modules": {"grid": [["q_proj", "v_proj"], ["no_such_layer"]]}}


def _tune_cmd(tmp_path, *extra):
    return [sys.executable, "-m", "safedpo_ray.cli", "tune", "--space",
            str(space(tmp_path, "kill", KILL_PARAMS, max_concurrent_trials=1, trial_retries=0, safety_threshold=0.0)),
            *SMALL, "model.lora.enabled=true", "model.lora.r=2", f"run.output_dir={tmp_path}", *extra]


def test_resume_after_the_driver_is_killed_runs_only_unfinished_trials(ray_local, tmp_path, capsys):
    """The driver (`safedpo-ray tune`, its own process and local Ray) is killed after the first
    trial finished; `tune --resume` (here, on the session's Ray) runs only the other one, which
    fails: it is reported, the finished one completes the experiment."""
    from safedpo_ray.cli.main import main

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "60"  # its own local Ray, beside this session's
    proc = subprocess.Popen(_tune_cmd(tmp_path), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = tmp_path / "kill" / "trials"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(trials.glob("*/summary.json")):
            assert proc.poll() is None, "the experiment ended before it could be interrupted"
            time.sleep(0.5)
        (first,) = list(trials.glob("*/summary.json"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    assert yaml.safe_load((first.parent / "config.yaml").read_text())["model"]["lora"]["target_modules"] == \
        ["q_proj", "v_proj"]
    finished_at = first.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["tune", "--resume", "kill", f"run.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "kill" / "results.csv").open()))
    assert sorted(r["status"] for r in rows) == ["done", "error"]
    assert first.stat().st_mtime_ns == finished_at  # the finished trial was not run again
    summary = json.loads((tmp_path / "kill" / "summary.json").read_text())
    status = {tuple(r["model.lora.target_modules"]): r for r in summary["rows"]}
    assert status[("q_proj", "v_proj")]["status"] == "done"
    failed = status[("no_such_layer",)]
    assert failed["status"] == "error" and "no_such_layer" in failed["error"]
    md = (tmp_path / "kill" / "results.md").read_text()
    assert "## Failed trials" in md and "no_such_layer" in md
    assert summary["best"]["model.lora.target_modules"] == ["q_proj", "v_proj"]
    assert "best trial" in out


def test_resume_of_unknown_experiment_is_a_clear_error(tmp_path):
    from safedpo_ray.cli.main import main

    assert main(["tune", "--resume", "nope", f"run.output_dir={tmp_path}"]) == 2
