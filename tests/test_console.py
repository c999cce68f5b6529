"""The console a person reads (safedpo_ray/runtime/console.py): by default our own lines only, Ray's and
the libraries' logs in <run>/logs/console.log; `--verbose` brings them back. The runs go through
the real `safedpo-ray` command in a subprocess, with fake secrets in its environment that must
show up nowhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safedpo_ray.runtime import console

FAKE = {"OPENAI_API_KEY": "sk-fakejudgekey-0123456789abcdef", "HF_TOKEN": "hf_fakehubtoken0123456789abcdefgh"}
TINY = ["data.synthetic_prompts=48", "data.synthetic_eval_prompts=12", "data.max_length=128",
        "data.max_prompt_length=48", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=1", "run.num_workers=2"]
MAX_LINES = 40  # measured: 32 lines for this run (the default `safedpo-ray train`: 63, 36 of them steps)
RAY_NOISE = ("(RayTrainWorker", "(TrainController", "(ReferenceLogps", "(pid=", "INFO ", "Warning", "Started a local Ray",
             "deduplicates logs", "Dataset", "Loading weights", "Writing model shards", "core_worker")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """One output dir for both runs: the second reuses the first's prepared pairs and reference
    log-probs (<output_dir>/.cache), which are most of a tiny run's time."""
    return tmp_path_factory.mktemp("console")


def run_cli(tmp_path: Path, name: str, *flags: str, verb: str = "train") -> subprocess.CompletedProcess:
    """The `safedpo-ray` executable under tests/reaped_run.py (a child subreaper: it writes to
    <name>.reaped.json which of the command's processes were still alive when it exited)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(FAKE, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="60", PYTHONUNBUFFERED="1")
    exe = Path(sys.executable).with_name("safedpo-ray")
    wrapper = [sys.executable, str(Path(__file__).with_name("reaped_run.py")), str(tmp_path / f"{name}.reaped.json"), "--"]
    return subprocess.run([*wrapper, str(exe), verb, *flags, *TINY, f"run.output_dir={tmp_path}", f"run.name={name}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def assert_no_secret(*texts: str, root: Path | None = None) -> None:
    for f in (p for p in root.rglob("*") if p.is_file()) if root else ():
        data = f.read_bytes()
        assert not any(v.encode() in data for v in FAKE.values()), f"a secret was written to {f}"
    for text in texts:
        assert not any(v in text for v in FAKE.values()), "a secret in the output"


@pytest.mark.timeout(240)
def test_default_console_shows_our_lines_and_logs_the_rest(out_dir):
    tmp_path = out_dir
    done = run_cli(tmp_path, "quiet")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) <= MAX_LINES, done.stdout
    assert not [l for l in lines if any(n in l for n in RAY_NOISE)], done.stdout
    assert done.stderr.strip() == "", done.stderr  # nothing of Ray's or the libraries' on stderr either
    steps = [l for l in lines if l.startswith("[safedpo] step ")]
    assert [l.split()[2] for l in steps] == ["1/4", "2/4", "3/4", "4/4"], done.stdout
    for part in ("loss ", "acc ", "margin ", "tok/s", "ETA "):
        assert part in steps[0], steps[0]
    assert "[safedpo] checkpoint saved at step 2" in lines and "[safedpo] checkpoint saved at step 4" in lines
    assert "== SafeDPO run summary ==" in lines and any(l.startswith("train: ") for l in lines)  # data statistics
    run_dir = tmp_path / "quiet"
    log = run_dir / "logs" / "console.log"
    assert f"logs: {log}" in done.stdout
    text = log.read_text()
    assert "Started a local Ray instance" in text and "(TrainController pid=" in text  # Ray's own lines
    assert "(RayTrainWorker pid=" in text and "[safedpo] step 4/4" in text  # and the workers', ours included
    assert_no_secret(done.stdout, done.stderr, root=run_dir)  # config.yaml, metrics, summary, model, logs
    assert_no_secret(root=tmp_path / ".cache")  # prepared pairs, reference log-probs
    # nothing of ours outlives a command that ended normally (the local Ray it started included)
    assert json.loads((tmp_path / "quiet.reaped.json").read_text())["left_at_exit"] == []


@pytest.mark.timeout(240)
def test_verbose_brings_ray_back_to_the_console(out_dir):
    """`prepare --verbose` (no training workers, so cheaper): Ray's and the libraries' driver output
    is on the console again; the workers' lines go back to Ray's printer (next test). Its own output
    directory: the tiny model is built there (with the first test's cache it would be copied, and
    transformers would have nothing to say)."""
    own = out_dir / "verbose"
    own.mkdir(exist_ok=True)
    done = run_cli(own, "loud", "--verbose", verb="prepare")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    both = done.stdout + done.stderr
    assert "Started a local Ray instance" in both and "Writing model shards" in both, both
    assert "statistics: " in done.stdout and "logs: " not in done.stdout
    assert "Started a local Ray instance" in (own / "loud" / "logs" / "console.log").read_text()  # the file too
    assert_no_secret(done.stdout, done.stderr, root=own / "loud")


def test_verbose_session_passes_worker_output_to_ray(tmp_path, capsys):
    session = console.Session("train", verbose=True)
    printed = []
    session.ray_print = printed.append
    session.attach(tmp_path / "console.log")
    batch = {"pid": 11, "actor_name": "RayTrainWorker", "lines": ["Starting execution of Dataset x", "[safedpo] step 1/2"]}
    session.on_worker_output(batch)
    session.finish()
    assert printed == [batch] and capsys.readouterr().out == ""  # Ray prints them all, as before
    assert "Starting execution of Dataset x" in (tmp_path / "console.log").read_text()


def test_worker_output_is_sorted_without_ray(tmp_path, monkeypatch, capsys):
    """The log-monitor handler alone: tagged lines to stdout, every line to the file (with the
    process it came from), the autoscaler's monitor dump reduced to its events, secrets redacted."""
    monkeypatch.setenv("HF_TOKEN", FAKE["HF_TOKEN"])
    session = console.Session("train", verbose=False)
    printed = []
    session.ray_print = printed.append
    session.attach(tmp_path / "logs" / "console.log")
    session.on_worker_output({"pid": 11, "actor_name": "RayTrainWorker", "ip": "10.0.0.2", "localhost": "10.0.0.1",
                              "is_err": False, "lines": ["[safedpo] step 1/2 loss 0.6", "Starting execution of Dataset x",
                                                         f"token {FAKE['HF_TOKEN']}"]})
    session.on_worker_output({"pid": "autoscaler", "is_err": False, "lines": ["======== Autoscaler status ====="]})
    session.on_worker_output({"pid": 12, "task_name": "MapBatches", "is_err": True, "lines": ["FutureWarning: x"]})
    session.finish()
    out = capsys.readouterr().out
    assert out == "[safedpo] step 1/2 loss 0.6\n"
    text = (tmp_path / "logs" / "console.log").read_text()
    assert "(RayTrainWorker pid=11, ip=10.0.0.2) Starting execution of Dataset x" in text
    assert "(MapBatches pid=12) FutureWarning: x" in text and "Autoscaler status" not in text
    assert "token ***" in text and FAKE["HF_TOKEN"] not in text
    assert [d["pid"] for d in printed] == ["autoscaler"]  # Ray's own printer keeps the cluster's events


def test_only_ray_commands_get_a_console_and_verbose(monkeypatch):
    from safedpo_ray.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--verbose"]).verbose
    assert parser.parse_args(["evaluate", "--verbose"]).verbose and parser.parse_args(["tune", "--verbose"]).verbose
    assert "--verbose" not in parser.parse_args(["config"]) and "--verbose" not in parser.parse_args(["jobs", "list"])
    from safedpo_ray.cli.main import main

    started = []
    monkeypatch.setattr(console, "start", lambda *a, **k: started.append(a))
    assert main(["config", "train.beta=0.2"]) == 0
    assert started == []  # config runs no Ray: no console session


def test_a_command_leaves_running_a_ray_that_was_up_before_it(ray_local, tmp_path):
    """A command run in-process (a notebook, a test session) on a Ray its caller started stops
    nothing at its end: the last CI's order-dependent failures came from a command that shut the
    session's Ray down, after which the next test started a 2-CPU one."""
    from safedpo_ray.cli.main import main

    assert main(["prepare", "data.synthetic_prompts=8", "data.synthetic_eval_prompts=4", "data.max_length=32",
                 "data.max_prompt_length=16", f"run.output_dir={tmp_path}"]) == 0
    assert ray_local.is_initialized()

