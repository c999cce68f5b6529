"""`safedpo-ray submit` / `jobs` without a cluster: what is checked before anything is shipped, what
is shipped, and the messages and exit codes (safedpo_ray/cli/jobs.py). Real jobs: tests/test_isolated_cluster.py."""

from __future__ import annotations

import shlex
import time

import pytest
import yaml

from safedpo_ray.cli.main import main as cli
from safedpo_ray.config.training import ConfigError
from safedpo_ray.cli.jobs import DEFAULT_EXCLUDES, JobsError, build_job

pytestmark = pytest.mark.timeout(120)
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text(yaml.safe_dump({"train": {"beta": 0.2}, "run": {"num_workers": 2}}))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"params": {"train.delta": {"grid": [0, 10]}}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def test_config_travels_inside_the_working_dir(project):
    job = build_job(["--", "train", "--config", str(project / "configs" / "run.yaml"), "train.delta=5",
                     "run.storage_path=s3://b/runs?region=us-east-1"],
                    working_dir=project, env={"SAFEDPO_FLAG": "x"})  # secrets are refused: tests/test_secrets.py
    argv = shlex.split(job["entrypoint"])
    assert argv == ["safedpo-ray", "train", "--config", "configs/run.yaml", "train.delta=5",
                    "run.storage_path=s3://b/runs?region=us-east-1"]
    env = job["runtime_env"]
    assert env["working_dir"] == str(project) and env["env_vars"] == {"SAFEDPO_FLAG": "x"}
    for heavy in (".git", ".venv", "runs"):
        assert heavy in env["excludes"] and heavy in DEFAULT_EXCLUDES
    job = build_job(["train", "--config=configs/run.yaml"], working_dir=project)
    assert shlex.split(job["entrypoint"])[2] == "--config=configs/run.yaml"


def test_every_submittable_verb_is_checked_here(project):
    build_job(["evaluate", "--model", "s3://b/runs/r1/model", "--data", "synthetic"], working_dir=project)
    build_job(["train-scorer", "--kind", "cost"], working_dir=project)
    build_job(["verify", "train.max_steps=5"], working_dir=project)
    job = build_job(["tune", "--space", "space.yaml", "--config", "configs/run.yaml"], working_dir=project)
    assert "--space space.yaml" in job["entrypoint"]
    with pytest.raises(ConfigError):
        build_job(["evaluate", "generation.num_actors=0"], working_dir=project)
    with pytest.raises(ConfigError):
        build_job(["tune", "--config", "configs/run.yaml", "train.bogus=1"], working_dir=project)


def test_every_verb_but_the_job_verbs_can_be_submitted(project, monkeypatch):
    """Each verb of the table ships, checked here first; on a cluster of several nodes, a job whose
    rank 0 writes its outputs and that has no run.storage_path is refused before anything is shipped."""
    from safedpo_ray.cli import jobs
    from safedpo_ray.cli.verbs import VERBS

    assert {v.name for v in VERBS if v.submittable} == {v.name for v in VERBS}
    for verb, args in (("sft", ["sft.responses=all_safe"]), ("delta-study", ["--deltas", "0,5"]), ("config", []),
                       ("prepare", []), ("train-scorer", ["--kind", "cost"])):
        job = build_job([verb, *args], working_dir=project)
        assert job["entrypoint"].startswith(f"safedpo-ray {verb}")
    with pytest.raises(ConfigError, match="sft.responses"):
        build_job(["sft", "sft.responses=bogus"], working_dir=project)
    monkeypatch.setattr(jobs, "alive_node_count", lambda address: 3)
    for verb, args in (("sft", []), ("tune", ["--config", "configs/run.yaml"]), ("verify", [])):
        with pytest.raises(JobsError, match=f"3 nodes and run.storage_path is unset: the {verb} job"):
            jobs._storage_unset_on_cluster(build_job([verb, *args], working_dir=project), "http://x:8265")
    jobs._storage_unset_on_cluster(build_job(["sft", "run.storage_path=s3://b/p"], working_dir=project), "http://x")
    for verb, args in (("evaluate", ["--data", "synthetic"]), ("prepare", []), ("train-scorer", ["--output", "s3://b/s"])):
        jobs._storage_unset_on_cluster(build_job([verb, *args], working_dir=project), "http://x")  # not refused


@pytest.mark.parametrize("argv, code, message", [
    (["--", "train", "train.beta=-1"], 2, "config error: 'train.beta' must be > 0"),
    (["--", "train", "--config", "missing.yaml"], 2, "--config missing.yaml: no such file"),
    (["--", "train", "--bogus"], 2, "is invalid (see above); nothing was submitted"),
    (["--", "jobs", "list"], 2, "cannot submit 'jobs': submit runs one of train, prepare, config, sft, tune, evaluate"),
    (["--", "prepare", "data.max_length=-1"], 2, "config error: 'data.max_length'"),
    (["--"], 2, "nothing to submit"),
    (["--env", "SAFEDPO_SURELY_UNSET", "--", "train"], 2, "--env SAFEDPO_SURELY_UNSET: not set here"),
])
def test_bad_jobs_stop_before_the_cluster_is_contacted(project, capsys, argv, code, message):
    started = time.time()
    assert cli(["submit", "--address", UNREACHABLE, *argv]) == code
    err = capsys.readouterr().err
    assert message in err and "cannot reach" not in err
    assert time.time() - started < 3  # no connection attempt (that one takes seconds)


def test_config_outside_the_shipped_dir(project, tmp_path_factory, capsys):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "x.yaml"
    elsewhere.write_text("train: {beta: 0.1}\n")
    assert cli(["submit", "--address", UNREACHABLE, "--", "train", "--config", str(elsewhere)]) == 2
    assert "outside the directory shipped with the job" in capsys.readouterr().err
    assert cli(["submit", "--address", UNREACHABLE, "--working-dir", str(elsewhere.parent), "--", "train",
                "--config", str(elsewhere)]) == 3  # shippable now; the cluster is what is missing


def test_unreachable_cluster_and_missing_address(project, capsys):
    assert cli(["submit", "--address", UNREACHABLE, "--", "train"]) == 3
    err = capsys.readouterr().err
    assert f"cannot reach the Ray job server at {UNREACHABLE}" in err and "port-forward" in err
    for argv in (["jobs", "list"], ["jobs", "status", "raysubmit_x"], ["jobs", "logs", "raysubmit_x", "--follow"],
                 ["jobs", "stop", "raysubmit_x"]):
        assert cli([*argv, "--address", "127.0.0.1:9"]) == 3, argv  # host:port means http://host:port
        assert "cannot reach the Ray job server at http://127.0.0.1:9" in capsys.readouterr().err
    assert cli(["submit", "--", "train"]) == 2
    assert "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS" in capsys.readouterr().err


def test_jobs_error_carries_its_exit_code():
    assert JobsError("x").exit_code == 2 and JobsError("x", exit_code=3).exit_code == 3
