"""Jobs on a test cluster, as a user sends and follows them (tests/test_isolated_cluster.py):
`safedpo-ray submit` and `jobs logs`, waiting for a job, its first checkpoint or a training step
in its followed logs, losing a node that holds a training worker, and reading results back from
storage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from safedpo_ray.cli.main import main as cli
from safedpo_ray.runtime import storage


def wait_for_job_agent(dashboard: str, timeout: float = 300) -> None:
    """The job server answers 'No available agent' until the head's job agent registers."""
    from safedpo_ray.cli.jobs import connect

    jobs, deadline = connect(dashboard), time.time() + timeout
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


def submit(cluster, job_dir: Path, capsys, *command: str, wait: bool = True) -> tuple[int, str, str]:
    """`safedpo-ray submit [--wait] -- VERB ...` from job_dir; (exit code, job id, output)."""
    capsys.readouterr()
    code = cli(["submit", "--address", cluster.dashboard, "--working-dir", str(job_dir),
                *(["--wait"] if wait else []), "--", *command])
    out = capsys.readouterr()
    found = re.search(r"submitted job (\S+):", out.out)
    return code, found.group(1) if found else "", out.out + out.err


def job_logs(cluster, job_id: str, capsys) -> str:
    capsys.readouterr()
    assert cli(["jobs", "logs", job_id, "--address", cluster.dashboard]) == 0
    return capsys.readouterr().out


def read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def listing(root: str) -> set[str]:
    """Every file under a storage root, relative to it."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(root)
    return {i.path[len(path.rstrip("/")) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def wait_for_job(cluster, job_id: str, timeout: float = 900) -> str:
    from safedpo_ray.cli.jobs import connect

    jobs, deadline = connect(cluster.dashboard), time.time() + timeout
    while time.time() < deadline:
        status = str(jobs.get_job_status(job_id))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def wait_for_checkpoint(cluster, job_id: str, root: str, timeout: float = 600) -> str:
    """Block until a checkpoint of a run under `root` is committed (Ray Train's snapshot beside
    it); returns the directory holding it."""
    from safedpo_ray.cli.jobs import connect

    jobs, deadline = connect(cluster.dashboard), time.time() + timeout
    snapshot = "checkpoint_manager_snapshot.json"
    while time.time() < deadline:
        files = listing(root) if storage.exists(root) else set()
        for name in files:
            run = name[:-len(snapshot)]  # "" or "<dir>/"
            if name.endswith(snapshot) and any(f.startswith(run + "checkpoint_2") for f in files):
                return run.rstrip("/")
        status = str(jobs.get_job_status(job_id))
        assert status in ("PENDING", "RUNNING"), f"job {job_id} ended ({status}) before its first checkpoint"
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint under {root} in {timeout} s")


def lose_a_training_node(cluster) -> tuple[str, str]:
    """SIGKILL the worker node that holds a Ray Train worker now, and start another node;
    (lost node id, added node id)."""
    from ray.util.state import list_actors

    from safedpo_ray.cli.jobs import _address_wins

    with _address_wins():
        actors = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                                 ("state", "=", "ALIVE")],
                             raise_on_missing_output=False)
    nodes = [a.node_id for a in actors if a.node_id in cluster.worker_ids()]
    assert nodes, f"no Ray Train worker alive on a worker node: {actors}"
    lost = cluster.remove(nodes[0])
    return lost, cluster.add()


def losses(root: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in read_jsonl(storage.join(root, "metrics.jsonl")):
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["loss"]
    return out


def follow_logs(cluster, job_id: str) -> tuple[subprocess.Popen, list[tuple[float, str]]]:
    """`safedpo-ray jobs logs ID --follow` in a subprocess; (it, the (time, line) pairs so far)."""
    follower = subprocess.Popen([sys.executable, "-m", "safedpo_ray.cli", "jobs", "logs", job_id, "--follow",
                                 "--address", cluster.dashboard], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: lines.extend((time.time(), l) for l in follower.stdout), daemon=True).start()
    return follower, lines


def wait_for_progress(cluster, job_id: str, lines: list, *, past: int, timeout: float = 300) -> int:
    """Block until the followed logs show a training step after `past`; returns that step."""
    from safedpo_ray.cli.jobs import connect

    jobs, deadline = connect(cluster.dashboard), time.time() + timeout
    while time.time() < deadline:
        steps = [int(m.group(1)) for _, l in list(lines) for m in [re.search(r"\[safedpo\] step (\d+)/", l)] if m]
        if any(k > past for k in steps):
            return max(steps)
        assert str(jobs.get_job_status(job_id)) in ("PENDING", "RUNNING"), f"job ended before step {past + 1}"
        time.sleep(0.2)
    raise AssertionError(f"no training step after {past} in {timeout} s")


def check_each_pair_once_per_epoch(pairs: list[dict], batch: int) -> None:
    by_epoch: dict[int, list[int]] = {}
    for record in pairs:
        assert len(record["pair_ids"]) == batch
        by_epoch.setdefault(record["epoch"], []).extend(record["pair_ids"])
    for epoch, ids in by_epoch.items():
        assert len(set(ids)) == len(ids), f"epoch {epoch}: pairs trained twice: " \
            f"{sorted(i for i in set(ids) if ids.count(i) > 1)}"


def alive_nodes(cluster) -> set[str]:
    from ray.util.state import list_nodes

    from safedpo_ray.cli.jobs import _address_wins

    with _address_wins():  # not the session's local Ray, whose address the environment holds
        nodes = list_nodes(address=cluster.dashboard, raise_on_missing_output=False)
    return {n.node_id for n in nodes if str(n.state) == "ALIVE"}
