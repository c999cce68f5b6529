"""Signals, atomic checkpoints and process cleanup (train/preempt.py, train/checkpoints.py).

End to end, the `safedpo-ray train` command runs under tests/reaped_run.py: a child subreaper, so
every process the command starts stays its descendant even when its own parent dies (a Ray worker
whose raylet is gone is re-parented to the wrapper, not to init). "Nothing of ours is left" is
then exact and cannot confuse another Ray on the machine: the wrapper lists its live descendants
the moment the command exits, and the test asserts there are none.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from safedpo_ray.train import checkpoints, preempt

TESTS = Path(__file__).parent
SMALL = [
    "data.synthetic_prompts=64", "data.synthetic_eval_prompts=16", "data.max_length=128",
    "data.max_prompt_length=48", "train.global_batch_size=8", "train.micro_batch_size=2",
    "run.num_workers=2", "train.cache_reference=false",  # a live reference: no reference pass to wait for
]


# --------------------------------------------------------------------------- manifests (pure)


def _fake_checkpoint(d: Path, rank: int, world: int, files: dict[str, bytes]) -> None:
    part = d / f"rank{rank}"
    for rel, data in files.items():
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        (part / rel).write_bytes(data)
    checkpoints.write_manifest(part, rank=rank, world_size=world, step=4)
    for p in list(part.rglob("*")):  # Ray Train merges the ranks' directories into one
        if p.is_file():
            (d / p.relative_to(part)).parent.mkdir(parents=True, exist_ok=True)
            p.rename(d / p.relative_to(part))


def test_manifest_detects_truncation_corruption_and_partial_writes(tmp_path):
    d = tmp_path / "ckpt"
    _fake_checkpoint(d, 0, 2, {"latest": b"state", "state/model.pt": b"m" * 1000, "state/optim0.pt": b"a" * 500})
    _fake_checkpoint(d, 1, 2, {"state/optim1.pt": b"b" * 500})
    assert checkpoints.verify(d, rank=0, world_size=2) == [] and checkpoints.verify(d, rank=1, world_size=2) == []

    with open(d / "state/model.pt", "r+b") as f:  # truncated: every rank sees the size
        f.truncate(10)
    for rank in (0, 1):
        assert checkpoints.verify(d, rank=rank, world_size=2) == [
            "state/model.pt has 10 bytes, its manifest says 1000"]
    (d / "state/model.pt").write_bytes(b"m" * 1000)

    (d / "state/optim1.pt").write_bytes(b"c" * 500)  # same size, other bytes: the rank hashing it sees it
    assert checkpoints.verify(d, rank=1, world_size=2) == ["state/optim1.pt does not match its sha256"]
    assert checkpoints.verify(d, rank=0, world_size=2) == []
    assert checkpoints.verify(d, rank=0, world_size=1) == ["state/optim1.pt does not match its sha256"]
    (d / "state/optim1.pt").write_bytes(b"b" * 500)

    (d / "manifest.rank1.json").unlink()  # rank 1's part never arrived
    assert "written only in part" in checkpoints.verify(d)[0]
    (d / "manifest.rank0.json").unlink()
    assert "no manifest" in checkpoints.verify(d)[0]
    (d / "manifest.rank0.json").write_text('{"format": 1, "files": ')  # cut short
    assert "unreadable" in checkpoints.verify(d)[0]


class _FakeCheckpoint:
    def __init__(self, path: Path):
        self.path = str(path)

    def as_directory(self):
        from contextlib import nullcontext

        return nullcontext(self.path)


class _FakeStrategy:
    rank, world_size, is_rank0 = 0, 1, True

    def load(self, d):
        return json.loads((Path(d) / "state.json").read_text())


def _saved(d: Path, step: int) -> _FakeCheckpoint:
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step, "eval_before": {}}))
    checkpoints.write_manifest(d, rank=0, world_size=1, step=step)
    return _FakeCheckpoint(d)


def test_restore_skips_damaged_latest_and_says_so(tmp_path, monkeypatch, capsys):
    old, new = _saved(tmp_path / "checkpoint_a", 2), _saved(tmp_path / "checkpoint_b", 4)
    (Path(new.path) / "state.json").write_text("{}")  # damaged after its manifest was written
    monkeypatch.setattr(checkpoints, "candidates",
                        lambda: [checkpoints.Candidate(new, 4), checkpoints.Candidate(old, 2)])
    restored = checkpoints.restore(_FakeStrategy())
    assert (restored.step, restored.checkpoint) == (2, "checkpoint_a")
    assert restored.skipped[0]["checkpoint"] == "checkpoint_b" and restored.skipped[0]["step"] == 4
    out = capsys.readouterr().out
    assert "warning: checkpoint checkpoint_b (step 4) is damaged or incomplete: state.json has 2 bytes" in out
    assert "resuming from checkpoint_a (step 2)" in out

    (Path(old.path) / "manifest.rank0.json").unlink()
    with pytest.raises(checkpoints.NoIntactCheckpoint, match="none of the run's 2 checkpoint"):
        checkpoints.restore(_FakeStrategy())
    monkeypatch.setattr(checkpoints, "candidates", lambda: [])
    assert checkpoints.restore(_FakeStrategy()).step == 0  # a fresh run


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_deepspeed_checkpoints_load_weights_only(tmp_path):
    """DeepSpeed's TorchCheckpointEngine loads with weights_only=False; ours allows only tensors,
    builtins and DeepSpeed's few data classes."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from safedpo_ray.train.strategy import weights_only_loads

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    weights_only_loads(engine)
    torch.save({"w": torch.ones(2), "loss_scaler": LossScaler(1.0)}, tmp_path / "ok.pt")
    assert engine.checkpoint_engine.load(str(tmp_path / "ok.pt"))["w"].sum() == 2
    torch.save({"w": torch.ones(2), "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        engine.checkpoint_engine.load(str(tmp_path / "evil.pt"))


# --------------------------------------------------------------------------- signals (pure)


def test_driver_signal_handler(tmp_path):
    guard = preempt.DriverSignals(type("Run", (), {"name": "r1", "stop_timeout_s": 0.5})())
    with pytest.raises(preempt.Interrupted, match="before training started.*run.resume=true run.name=r1"):
        guard.handler(signal.SIGINT, None)

    guard = preempt.DriverSignals(type("Run", (), {"name": "r1", "stop_timeout_s": 0.5})())
    guard.marker = str(tmp_path / preempt.STOP_MARKER)
    guard.handler(signal.SIGTERM, None)  # during training: only recorded...
    guard.poll()  # ...the main thread writes the marker
    assert json.loads(Path(guard.marker).read_text())["signal"] == "SIGTERM"
    with pytest.raises(preempt.Interrupted, match="received again: stopped at once"):
        guard.handler(signal.SIGTERM, None)
    guard.count = 1
    time.sleep(0.6)
    with pytest.raises(preempt.Interrupted, match="did not stop within run.stop_timeout_s=0.5"):
        guard.poll()

    stopped = preempt.Stopped("x", signal.SIGTERM)
    assert stopped.exit_code == 143 and preempt.Stopped("x", signal.SIGINT).exit_code == 130


GUARD_SCRIPT = """
import os, signal, sys, threading, time
from pathlib import Path
from safedpo_ray.config.training import RunConfig
from safedpo_ray.errors import UserError
from safedpo_ray.train import preempt

scenario, root = sys.argv[1], Path(sys.argv[2])
marker = root / preempt.STOP_MARKER

def fit():  # stands in for trainer.fit(): the workers stop once they see the marker
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2 if scenario == "twice" else 0.1)
    return {"stopped_early": marker.exists(), "last_step": 3}

def send(sig, after, times=1):
    def go():
        time.sleep(after)
        for _ in range(times):
            os.kill(os.getpid(), sig)
            time.sleep(0.3)
    threading.Thread(target=go, daemon=True).start()

try:
    with preempt.command_guard(RunConfig(name="r")):
        if scenario == "early":
            send(signal.SIGINT, 0)
            time.sleep(5)
        if scenario == "preparing":  # a thread prepares the pairs while the workers start
            threading.Thread(target=lambda: (time.sleep(3), print("still preparing", flush=True)),
                             daemon=True).start()
            preempt.waiting_for_pairs(lambda: True)
            send(signal.SIGTERM, 0)
            time.sleep(5)
        send(signal.SIGTERM, 0.5, times=2 if scenario == "twice" else 1)
        summary = preempt.run_fit(fit, root=str(root))
        preempt.raise_if_stopped(summary, "r")
    print("finished")
except UserError as exc:
    print(f"exit {exc.exit_code}: {exc}")
"""


@pytest.mark.parametrize("scenario, code, says", [
    ("once", 143, "exit 143: stopped by SIGTERM after step 3 with a checkpoint; continue it with the same "
                  "command and run.resume=true run.name=r"),
    ("twice", 143, "SIGTERM received again: stopped at once"),
    ("early", 130, "exit 130: SIGINT received before training started"),
    ("preparing", 143, "SIGTERM received while the pairs were prepared: stopped, nothing to save"),
])
def test_command_guard(tmp_path, scenario, code, says):
    """The driver's paths, with a stand-in for trainer.fit() (no Ray): one signal stops after the
    workers' checkpoint (the marker is written, fit returns, 128 + signal); a second one leaves at
    once while fit is still running; a signal before training stops at once, and at once without
    the orderly shutdown while a thread still prepares the pairs (it would go on using Ray)."""
    out = subprocess.run([sys.executable, "-c", GUARD_SCRIPT, scenario, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    text = out.stdout + out.stderr
    assert says in text, text
    at_once = scenario in ("twice", "preparing")  # these leave through os._exit
    assert out.returncode == (code if at_once else 0), text
    assert "still preparing" not in text
    if scenario == "once":
        assert not (tmp_path / preempt.STOP_MARKER).exists()  # removed once fit() returned


class _World1:
    is_rank0, world_size, rank = True, 1, 0

    def all_reduce_sum(self, t):
        return t


def test_stop_check_requests(tmp_path, monkeypatch):
    monkeypatch.setattr(preempt, "_training_thread", None)
    check = preempt.StopCheck(str(tmp_path), _World1())
    assert check.poll(1, 10) is None
    preempt.write_marker(str(tmp_path / preempt.STOP_MARKER), signal.SIGINT)
    assert check.poll(9, 10) == preempt.StopRequest("driver", "SIGINT to the driver")
    assert check.poll(10, 10) is None  # the last step ends the run anyway: no collective needed
    assert check.poll(3, 10).ends_run

    check = preempt.StopCheck(str(tmp_path / "other"), _World1())
    monkeypatch.setattr(preempt, "_worker_signal", signal.SIGTERM)
    request = check.poll(2, 10)
    assert request.kind == "worker" and not request.ends_run
    with pytest.raises(preempt.WorkerStopped, match="got SIGTERM after step 2; its checkpoint was saved"):
        request.after_checkpoint(2)
    monkeypatch.setattr(preempt, "_worker_signal", None)
    monkeypatch.setattr(preempt, "node_drain_notice", lambda: True)
    assert check.poll(3, 10).kind == "drain" and check.poll(4, 10) is None  # one checkpoint per notice


def test_stop_descendants_also_kills_what_appears_after_the_first_sweep(monkeypatch):
    """A process forked while its parent was being killed is not in the first sweep's list: a
    later sweep finds and kills it."""
    import psutil

    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        real, calls = preempt.live_descendants, []

        def seen():
            calls.append(1)
            # only these two (this process's other descendants are the session's Ray), and the
            # second one missed at first
            return [p for p in real() if p.pid in (first.pid, later.pid) and (len(calls) > 1 or p.pid != later.pid)]

        monkeypatch.setattr(preempt, "live_descendants", seen)
        killed = preempt.stop_descendants(0.0)  # (it reaps them too)
        assert sorted(killed) == sorted(f"python (pid {p.pid})" for p in (first, later)), killed
        assert not psutil.pid_exists(first.pid) and not psutil.pid_exists(later.pid)
    finally:
        for proc in (first, later):
            if psutil.pid_exists(proc.pid):
                proc.kill()


def test_a_stop_at_once_kills_the_raylet_last_and_exits_with_its_code(monkeypatch):
    """Leaving at once while threads are inside Ray calls: every process is frozen before any is
    killed (none forks any more), the raylet and GCS are killed only once the others are gone,
    and the exit follows at once with the signal's code (a raylet killed among the others made
    Ray end the command with code 1 instead of 143)."""
    events: list[tuple[str, str]] = []

    class Proc:
        def __init__(self, pid, name):
            self.pid, self._name, self.dead = pid, name, False

        def name(self):
            return self._name

        def suspend(self):
            events.append(("stop", self._name))

        def kill(self):
            events.append(("kill", self._name))
            self.dead = True

    procs = [Proc(1, "raylet"), Proc(2, "ray::MapBatches"), Proc(3, "gcs_server"), Proc(4, "python")]
    monkeypatch.setattr(preempt, "live_descendants", lambda: [p for p in procs if not p.dead])

    def os_kill(pid, sig):
        events.append(("SIGKILL", next(p.name() for p in procs if p.pid == pid)))

    class Exited(Exception):
        pass

    def os_exit(code):
        events.append(("exit", str(code)))
        raise Exited

    monkeypatch.setattr(preempt.os, "kill", os_kill)
    monkeypatch.setattr(preempt.os, "_exit", os_exit)
    monkeypatch.setattr(preempt, "_reap_zombies", lambda: None)  # (this process's own children are not ours to reap)
    with pytest.raises(Exited):
        preempt.exit_killing_descendants(143)
    assert events[:4] == [("stop", "raylet"), ("stop", "ray::MapBatches"), ("stop", "gcs_server"), ("stop", "python")]
    assert sorted(events[4:6]) == [("kill", "python"), ("kill", "ray::MapBatches")]
    assert sorted(events[6:8]) == [("SIGKILL", "gcs_server"), ("SIGKILL", "raylet")]
    assert events[8:] == [("exit", "143")]


def test_stop_descendants_kills_what_outlives_the_wait():
    """In a process of its own (here it would also stop this session's Ray): a grandchild whose
    parent exited is still found (the subreaper) and killed after the wait."""
    script = (
        "import subprocess, sys, time\n"
        "from safedpo_ray.train import preempt\n"
        "assert preempt.set_child_subreaper()\n"
        "subprocess.Popen([sys.executable, '-c', 'import subprocess, sys; "
        "subprocess.Popen([sys.executable, \"-c\", \"import time; time.sleep(60)\"])'])\n"
        "time.sleep(2)\n"  # the middle process has exited: the sleeper is an orphan
        "t0 = time.monotonic()\n"
        "killed = preempt.stop_descendants(0.5)\n"
        "print(len(killed), round(time.monotonic() - t0), len(preempt.live_descendants()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "1", "0"], out.stdout + out.stderr


# --------------------------------------------------------------------------- in process: damaged checkpoints


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")  # one data / reference cache for this module's runs


def _train(out: Path, name: str, *extra: str) -> dict:
    from safedpo_ray.config.training import load_config
    from safedpo_ray.train.trainer import train

    return train(load_config(None, SMALL + [f"run.output_dir={out}", f"run.name={name}", "train.max_steps=6",
                                            "train.checkpoint_every=2", *extra]))


def _logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "eval/loss" not in r]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "eval/loss" not in r}


def _latest_checkpoint(out: Path, name: str) -> Path:
    snap = json.loads((out / name / "ray" / name / "checkpoint_manager_snapshot.json").read_text())
    return out / name / "ray" / name / snap["latest_checkpoint_result"]["checkpoint_dir_name"]


@pytest.mark.timeout(300)
def test_damaged_and_partial_checkpoints_fall_back_to_an_intact_one(ray_local, shared_out, capfd):
    """A run stopped after step 6 with checkpoints at steps 2, 4 and 6: the latest has a truncated
    shard, the one before lacks rank 1's manifest (its upload never finished); the resumed run
    skips both, says so, continues from step 2, and trains steps 3-6 to the losses the first,
    uninterrupted run had there. Without run.resume=true the run is refused."""
    from safedpo_ray.train.trainer import RunError

    first = _train(shared_out, "damaged", "train.max_steps=8", "train.stop_at_step=6", "train.keep_checkpoints=3")
    assert first["stopped_early"] and first["last_step"] == 6 and "eval_after" not in first
    uninterrupted = _losses(shared_out / "damaged")
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(RunError, match="resume"):
        _train(shared_out, "damaged", "train.max_steps=8", "train.keep_checkpoints=3")
    latest = _latest_checkpoint(shared_out, "damaged")
    kept = sorted(p for p in latest.parent.glob("checkpoint_*") if p.is_dir())  # named by time: steps 2, 4, 6
    assert len(kept) == 3 and kept[-1] == latest, kept
    partial = kept[1]
    shard = latest / "state" / "mp_rank_00_model_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    (partial / "manifest.rank1.json").unlink()
    resumed = _train(shared_out, "damaged", "train.max_steps=8", "train.keep_checkpoints=3", "run.resume=true")
    assert resumed["restored_from"]["step"] == 2 and resumed["resumed_at_step"] == 2
    damaged, unfinished = resumed["restored_from"]["skipped"]
    assert (damaged["checkpoint"], damaged["step"]) == (latest.name, 6)
    assert "mp_rank_00_model_states.pt has" in damaged["problems"][0]
    assert (unfinished["checkpoint"], unfinished["step"]) == (partial.name, 4)
    assert "written only in part" in unfinished["problems"][0]
    assert resumed["last_step"] == 8 and "eval_after" in resumed
    assert _logged_steps(shared_out / "damaged") == [1, 2, 3, 4, 5, 6, 7, 8]
    again = _losses(shared_out / "damaged")
    for step in range(1, 7):  # 1-2 kept from the first run, 3-6 trained again from step 2's checkpoint
        assert again[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step
    # checkpoints at steps 4, 6 and 8 added to the three: train.keep_checkpoints=3 kept three
    assert len([p for p in latest.parent.glob("checkpoint_*") if p.is_dir()]) == 3
    time.sleep(1)  # the workers' lines reach the driver through Ray's log monitor
    out = capfd.readouterr().out
    assert f"warning: checkpoint {latest.name} (step 6) is damaged or incomplete" in out
    assert f"warning: checkpoint {partial.name} (step 4) is damaged or incomplete" in out


@pytest.mark.timeout(300)
def test_sigterm_to_a_worker_checkpoints_then_ray_train_restarts(ray_local, shared_out):
    """A worker's SIGTERM (its node going away): the ranks checkpoint at the next step, end the
    attempt, and Ray Train (run.max_failures=1) restarts from that checkpoint."""
    import psutil

    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(s=_train(
        shared_out, "wsig", "train.checkpoint_every=0", "train.step_delay_s=0.4", "run.max_failures=1")))
    thread.start()
    metrics, worker = shared_out / "wsig" / "metrics.jsonl", None
    deadline = time.monotonic() + 200
    while thread.is_alive() and time.monotonic() < deadline and worker is None:
        if metrics.exists() and any('"loss"' in l for l in metrics.read_text().splitlines()):
            workers = [p for p in psutil.Process().children(recursive=True) if p.name() == "ray::RayTrainWorker"]
            if workers:
                worker = workers[-1]
                worker.send_signal(signal.SIGTERM)
        time.sleep(0.2)
    thread.join(timeout=240)
    assert worker is not None and "s" in box, box
    s = box["s"]
    assert 1 <= s["resumed_at_step"] < 6 and s["restored_from"]["step"] == s["resumed_at_step"]
    assert s["last_step"] == 6 and "eval_after" in s
    assert _logged_steps(shared_out / "wsig") == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- end to end: the CLI


def _cli(tmp: Path, name: str, *extra: str, signal_at_step: int | None = None, sig=signal.SIGTERM,
         timeout: float = 240) -> tuple[int, str, dict]:
    """`safedpo-ray train` under the reaping wrapper; optionally signal it once rank 0 has logged
    `signal_at_step`. Returns (exit code, output, the wrapper's report)."""
    report = tmp / f"{name}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(TESTS / "reaped_run.py"), str(report), "--",
           sys.executable, "-m", "safedpo_ray.cli", "train", *SMALL,
           f"run.output_dir={tmp}", f"run.name={name}", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "60"  # its own local Ray, beside this session's
    log = tmp / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if signal_at_step is not None:
                metrics = tmp / name / "metrics.jsonl"
                deadline = time.monotonic() + timeout
                while proc.poll() is None and time.monotonic() < deadline:
                    steps = [json.loads(l).get("step", 0) for l in metrics.read_text().splitlines()
                             if '"loss"' in l] if metrics.exists() else []
                    if steps and max(steps) >= signal_at_step:
                        proc.send_signal(sig)
                        break
                    time.sleep(0.2)
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return rc, log.read_text(), json.loads(report.read_text())


@pytest.mark.timeout(480)
def test_sigterm_checkpoints_stops_and_resumes(ray_local, shared_out):
    """`safedpo-ray train` stopped by SIGTERM exits 143 after a checkpoint, leaving nothing
    running; the run then continues from that checkpoint (in this process: a command's normal
    exit leaving nothing running is checked in test_console.py). Last in this module: the
    prepared pairs are in the shared cache by now."""
    from safedpo_ray.config.training import load_config
    from safedpo_ray.train.trainer import train

    tmp = shared_out
    run = ["train.max_steps=8", "train.checkpoint_every=5", "train.step_delay_s=0.4"]
    rc, out, report = _cli(tmp, "sig", *run, signal_at_step=2)
    assert rc == 143, out[-3000:]
    assert report["left_at_exit"] == [], report  # nothing of ours outlives the command
    assert "SIGTERM received: saving a checkpoint" in out
    assert "continue it with the same command and run.resume=true run.name=sig" in out
    summary = json.loads((tmp / "sig" / "summary.json").read_text())
    stopped_at = summary["last_step"]
    assert summary["stopped_early"] and 2 <= stopped_at < 8 and summary["stop_reason"] == "SIGTERM to the driver"
    snapshot = json.loads((tmp / "sig" / "ray" / "sig" / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["latest_checkpoint_result"]["metrics"]["step"] == stopped_at  # saved at the stop
    latest = tmp / "sig" / "ray" / "sig" / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert checkpoints.verify(latest, world_size=1) == []
    assert not (tmp / "sig" / preempt.STOP_MARKER).exists()

    summary = train(load_config(None, SMALL + [f"run.output_dir={tmp}", "run.name=sig", *run, "run.resume=true"]))
    assert summary["resumed_at_step"] == stopped_at and summary["last_step"] == 8 and "eval_after" in summary
    assert summary["restored_from"]["step"] == stopped_at and not summary["restored_from"]["skipped"]
    assert _logged_steps(tmp / "sig") == list(range(1, 9))  # every step once, up to the total
