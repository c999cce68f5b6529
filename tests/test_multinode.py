"""Cluster jobs on a real multi-node Ray cluster on this machine (slow: about 1–3 minutes each).

A head and a worker node, both on 127.0.0.1 (tests/multinode_cluster.py, in its own process),
an S3-compatible store on 127.0.0.1 (tests/s3_server.py) as run.storage_path, and jobs sent the
way a user sends them: `safedpo-ray submit ... -- train --config job.yaml ...`, followed with
`safedpo-ray jobs logs ID --follow`. Every node has one `slot` and each train worker takes one,
so a 2-worker run has a worker on each node; killing the worker node kills one of them.

Tolerance for "the same final metrics as an undisturbed run": rel 1e-5, abs 1e-6 (the restored
run trains exactly the same batches from the same optimizer state; on this CPU the numbers have
come out bit-identical, the tolerance only absorbs summation-order noise).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from s3_server import CREDENTIALS, S3Server
from safedpo_ray.runtime import storage
from safedpo_ray.cli.main import main as cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HELPER = Path(__file__).with_name("multinode_cluster.py")
JOB_CONFIG = {
    "data": {"synthetic_prompts": 80, "synthetic_eval_prompts": 16, "max_length": 128, "max_prompt_length": 48},
    "train": {"global_batch_size": 8, "micro_batch_size": 2, "learning_rate": 1e-3, "epochs": 2,
              "checkpoint_every": 4, "keep_checkpoints": 2, "record_pairs": True, "cache_reference": False},
    "run": {"num_workers": 2, "max_failures": 2, "node_wait_timeout_s": 120, "worker_resources": {"slot": 1}},
}
ENV_FLAGS: list[str] = []  # the store's credentials are in the cluster's own environment (submit refuses secrets)
REL, ABS = 1e-5, 1e-6


class ClusterHandle:
    """The helper process: a Ray head + worker nodes on 127.0.0.1, driven over stdin."""

    def __init__(self, temp_dir: str, env: dict[str, str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # Ray Train's placement-group cleaner asks "the" dashboard whether the controller lives; with
        # other Ray instances on this machine it may ask the wrong one. Pin ours.
        env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        self.proc = subprocess.Popen([sys.executable, str(HELPER), temp_dir, str(port)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        info = self._answer(timeout=180)
        self.dashboard, self.head, self.workers = info["dashboard"], info["head"], info["workers"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(line)

    def _answer(self, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while True:
            try:
                answer = json.loads(self.lines.get(timeout=1))
                break
            except queue.Empty:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"cluster helper did not answer (exit code {self.proc.poll()})") from None
        self.workers = answer["workers"]
        return answer

    def command(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def ensure_worker(self) -> None:
        if not self.workers:
            self.command("add")

    def close(self) -> None:
        try:
            self.command("quit")
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(s3):
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Unix socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(CREDENTIALS, RAY_TMPDIR=temp_dir, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),  # `safedpo-ray` for jobs
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",
               SAFEDPO_STORAGE_CACHE=os.path.join(temp_dir, "cache"),  # models fetched from the store
               SAFEDPO_STAGING_DIR=temp_dir)  # rank 0's staging (a killed node's stays behind)
    handle = ClusterHandle(temp_dir, env)  # sets RAY_API_SERVER_ADDRESS for its processes
    wait_for_job_agent(handle.dashboard)
    yield handle
    handle.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job_agent(dashboard: str, timeout: float = 300) -> None:
    """A just-started cluster takes a while (minutes on a busy 2-core machine) to register its job
    agent; until then the job server answers 'No available agent'. Run a no-op job once."""
    jobs, deadline = client(dashboard), time.time() + timeout
    while True:
        try:
            job_id = jobs.submit_job(entrypoint="true")
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)
    while str(jobs.get_job_status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < deadline:
        time.sleep(0.5)


@pytest.fixture
def job_dir(tmp_path):
    """The directory shipped with a job: just its config file."""
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(JOB_CONFIG))
    return tmp_path


def submit(cluster, job_dir: Path, capsys, *job_args: str, wait: bool = False) -> tuple[int, str, str]:
    """`safedpo-ray submit` as a user types it; returns (exit code, job id, output)."""
    capsys.readouterr()
    code = cli(["submit", "--address", cluster.dashboard, "--working-dir", str(job_dir), *ENV_FLAGS,
                *(["--wait"] if wait else []), "--", "train", "--config", str(job_dir / "job.yaml"), *job_args])
    out = capsys.readouterr()
    found = re.search(r"submitted job (\S+):", out.out)
    return code, found.group(1) if found else "", out.out + out.err


def client(dashboard: str):
    """A JobSubmissionClient for this cluster, whatever RAY_ADDRESS/RAY_API_SERVER_ADDRESS say
    (another test's local Ray sets the latter in this process)."""
    from safedpo_ray.cli.jobs import connect

    return connect(dashboard)


def job_info(cluster, job_id: str):
    return client(cluster.dashboard).get_job_info(job_id)


def read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def run_files(root: str) -> dict:
    summary = json.loads(storage.read_text(storage.join(root, "summary.json")))
    metrics = read_jsonl(storage.join(root, "metrics.jsonl"))
    losses = {}
    for r in metrics:
        if "loss" in r:
            assert r["step"] not in losses, f"step {r['step']} logged twice"
            losses[r["step"]] = r["loss"]
    pairs = read_jsonl(storage.join(root, "pairs.jsonl")) if storage.exists(storage.join(root, "pairs.jsonl")) else []
    return {"summary": summary, "losses": losses, "pairs": pairs}


def wait_for_checkpoint(root: str, job_id: str, cluster, timeout: float = 300) -> int:
    """Block until run `root` has a committed checkpoint; returns the step rank 0 had logged then."""
    import pyarrow.fs as pafs

    deadline = time.time() + timeout
    while time.time() < deadline:
        if storage.exists(root):
            fs, path = storage.resolve(root)
            names = [Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(path))]
            if any(n.startswith("checkpoint_2") for n in names) and "checkpoint_manager_snapshot.json" in names:
                marks = json.loads(storage.read_text(storage.join(root, "log_marks.json")))
                return max(int(k) for k in marks)
        status = str(job_info(cluster, job_id).status)
        assert status in ("PENDING", "RUNNING"), f"job ended ({status}) before its first checkpoint"
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint in {timeout} s")


def wait_for_progress(lines: list, *, past: int, job_id: str, cluster, timeout: float = 300) -> int:
    """Block until the followed logs show a training step after `past`; returns that step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(m.group(1)) for _, l in list(lines) for m in [re.search(r"\[safedpo\] step (\d+)/", l)] if m]
        later = [k for k in steps if k > past]
        if later:
            return max(later)
        status = str(job_info(cluster, job_id).status)
        assert status in ("PENDING", "RUNNING"), f"job ended ({status}) before step {past + 1}"
        time.sleep(0.2)
    raise AssertionError(f"no training step after {past} in {timeout} s")


def check_each_pair_once_per_epoch(pairs: list[dict], steps_per_epoch: int, batch: int) -> None:
    by_epoch: dict[int, list[int]] = {}
    for record in pairs:
        assert len(record["pair_ids"]) == batch
        by_epoch.setdefault(record["epoch"], []).extend(record["pair_ids"])
    for epoch, ids in by_epoch.items():
        assert len(ids) == steps_per_epoch * batch, f"epoch {epoch}: {len(ids)} pairs trained"
        assert len(set(ids)) == len(ids), f"epoch {epoch}: pairs trained twice: " \
            f"{sorted(i for i in set(ids) if ids.count(i) > 1)}"


# ------------------------------------------------------------------------------------------------


def test_submit_refuses_node_local_storage_on_two_nodes(cluster, job_dir, capsys):
    """Unset run.storage_path on a 2-node cluster: `submit` refuses before shipping (exit 2), and a
    job sent past it (plain Ray Jobs API, as `ray job submit` would) fails with the same advice."""
    cluster.ensure_worker()
    code, job_id, out = submit(cluster, job_dir, capsys, "run.name=nostorage")
    assert code == 2 and not job_id, out
    assert "run.storage_path is unset" in out and "nothing was submitted" in out

    job_id = client(cluster.dashboard).submit_job(entrypoint="safedpo-ray train --config job.yaml run.name=nostorage",
                               runtime_env={"working_dir": str(job_dir)})
    capsys.readouterr()
    assert cli(["jobs", "logs", job_id, "--follow", "--address", cluster.dashboard]) == 1
    out = capsys.readouterr()
    assert "run.storage_path is unset" in out.out and "s3://" in out.out
    assert "FAILED" in out.err


def test_lose_the_worker_node_and_finish_the_same(cluster, s3, job_dir, capsys):
    """A 2-node run loses its worker node mid-training; a new node joins; the job finishes from
    its last checkpoint with the same losses, pairs and final metrics as an undisturbed run."""
    cluster.ensure_worker()
    base = s3.uri("fault")
    # The undisturbed run, on the same two nodes.
    code, calm_id, out = submit(cluster, job_dir, capsys, f"run.storage_path={base}", "run.name=calm", wait=True)
    assert code == 0, out
    calm = run_files(storage.join(base, "calm"))
    assert set(calm["summary"]["worker_nodes"]) == {cluster.head, cluster.workers[0]}  # one worker per node

    # The same run, disturbed, followed with `jobs logs --follow` from the start.
    code, job_id, out = submit(cluster, job_dir, capsys, f"run.storage_path={base}", "run.name=storm",
                               "train.step_delay_s=1")  # ≥ 4 s between checkpoints to lose the node in
    assert code == 0 and job_id, out
    follower = subprocess.Popen([sys.executable, "-m", "safedpo_ray.cli", "jobs", "logs", job_id, "--follow",
                                 "--address", cluster.dashboard], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), l) for l in follower.stdout), daemon=True)
    reader.start()
    root = storage.join(base, "storm")
    first_checkpoint = wait_for_checkpoint(root, job_id, cluster)
    # Kill between checkpoints, so that the steps after the last one are trained again.
    step_at_kill = wait_for_progress(lines, past=first_checkpoint, job_id=job_id, cluster=cluster)
    lost = cluster.command("remove")["removed"]
    added = cluster.command("add")["added"]
    assert follower.wait(timeout=420) == 0
    reader.join(timeout=10)
    info = job_info(cluster, job_id)
    assert str(info.status) == "SUCCEEDED", info.message

    text = "".join(l for _, l in lines)
    progress = [(t, l) for t, l in lines if "[safedpo] step" in l]
    assert progress, text[-3000:]
    assert progress[0][0] < info.end_time / 1000  # progress was shown while the job ran
    assert re.search(r"resuming at step [1-9]", text), text[-3000:]

    storm = run_files(root)
    s = storm["summary"]
    total = calm["summary"]["last_step"]
    assert 0 < s["resumed_at_step"] < total  # restored from a checkpoint taken before the loss
    assert step_at_kill < total
    # The node was lost between two checkpoints: the steps after the last one were trained twice
    # (the console shows them twice), yet each is logged once and its pairs counted once.
    assert s["resumed_at_step"] < step_at_kill
    replayed = [k for k in range(s["resumed_at_step"] + 1, step_at_kill + 1)
                if len(re.findall(rf"\[safedpo\] step {k}/{total} ", text)) >= 2]
    assert replayed, text[-3000:]
    assert added in s["worker_nodes"] and lost not in s["worker_nodes"]  # the new node trained
    # Same losses at every step (each logged once), same final held-out metrics.
    assert sorted(storm["losses"]) == sorted(calm["losses"]) == list(range(1, total + 1))
    for step, loss in calm["losses"].items():
        assert storm["losses"][step] == pytest.approx(loss, rel=REL, abs=ABS), step
    for key, value in calm["summary"]["eval_after"].items():
        assert s["eval_after"][key] == pytest.approx(value, rel=REL, abs=ABS), key
    # Every pair exactly once per epoch, and the same batches in the same order as undisturbed.
    batch = JOB_CONFIG["train"]["global_batch_size"]
    steps_per_epoch = total // JOB_CONFIG["train"]["epochs"]
    assert [r["step"] for r in storm["pairs"]] == list(range(1, total + 1))
    check_each_pair_once_per_epoch(storm["pairs"], steps_per_epoch, batch)
    assert [r["pair_ids"] for r in storm["pairs"]] == [r["pair_ids"] for r in calm["pairs"]]
    print(f"{total} steps; worker node lost after step {step_at_kill}, resumed at step {s['resumed_at_step']}, "
          f"steps trained again: {replayed}; "
          f"undisturbed {calm['summary']['wall_time_s']} s, disturbed {s['wall_time_s']} s")


def test_nodes_that_do_not_come_back_fail_the_run_in_stated_time(cluster, s3, job_dir, capsys):
    """Lose the worker node and add none: the run fails after run.node_wait_timeout_s with a
    message naming the key and how to resume, instead of waiting forever."""
    cluster.ensure_worker()
    base = s3.uri("gone")
    code, job_id, out = submit(cluster, job_dir, capsys, f"run.storage_path={base}", "run.name=gone",
                               "run.node_wait_timeout_s=15")
    assert code == 0 and job_id, out
    wait_for_checkpoint(storage.join(base, "gone"), job_id, cluster)
    cluster.command("remove")
    killed = time.time()
    capsys.readouterr()
    assert cli(["jobs", "logs", job_id, "--follow", "--address", cluster.dashboard]) == 1
    ended = time.time() - killed
    out = capsys.readouterr()
    assert "run.node_wait_timeout_s=15 s" in out.out and "run.resume=true run.name=gone" in out.out
    assert "FAILED" in out.err
    assert ended < 15 + 120, f"took {ended:.0f} s after the node was lost"
    capsys.readouterr()
    assert cli(["jobs", "status", job_id, "--address", cluster.dashboard]) == 1
    assert "FAILED" in capsys.readouterr().out
    cluster.command("add")
    print(f"the run failed {ended:.0f} s after its worker node was lost (run.node_wait_timeout_s=15)")


def test_the_exactly_once_check_catches_replays_and_gaps():
    """(fast) The check above fails when a step's pairs are trained twice within an epoch or missed."""
    good = [{"step": 1, "epoch": 0, "pair_ids": [0, 1]}, {"step": 2, "epoch": 0, "pair_ids": [2, 3]},
            {"step": 3, "epoch": 1, "pair_ids": [3, 0]}, {"step": 4, "epoch": 1, "pair_ids": [1, 2]}]
    check_each_pair_once_per_epoch(good, steps_per_epoch=2, batch=2)
    replayed = good[:2] + [{"step": 2, "epoch": 0, "pair_ids": [2, 3]}] + good[2:]
    with pytest.raises(AssertionError, match="epoch 0"):
        check_each_pair_once_per_epoch(replayed, steps_per_epoch=2, batch=2)
    restarted_epoch = good[:2] + [{"step": 3, "epoch": 1, "pair_ids": [3, 0]}, {"step": 4, "epoch": 1, "pair_ids": [3, 0]}]
    with pytest.raises(AssertionError, match="trained twice"):
        check_each_pair_once_per_epoch(restarted_epoch, steps_per_epoch=2, batch=2)
