"""Cluster jobs on a multi-node Ray cluster whose nodes share one disk (slow: about 1 minute each).

A head and a worker node, both on 127.0.0.1 (tests/multinode_cluster.py, in its own process),
an S3-compatible store on 127.0.0.1 (tests/s3_server.py) as run.storage_path, and jobs sent the
way a user sends them: `safedpo-ray submit ... -- train --config job.yaml ...`, followed with
`safedpo-ray jobs logs ID --follow`. Every node has one `slot` and each train worker takes one,
so a 2-worker run has a worker on each node; killing the worker node kills one of them.

A node lost and replaced mid-run (same losses, pairs and metrics as undisturbed, the steps after
the last checkpoint trained again and logged once) is tested on the cluster whose nodes share no
disk: tests/test_isolated_cluster.py (a Tune trial, and `sft`).
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
