"""`train` on pairs not prepared yet starts the workers while Ray Data prepares them
(run.start_workers_early): the hand-off, the decision, and whole runs (same losses as preparing
first; a preparation error reaches the user, not a hang)."""

import json
import threading
import time
from pathlib import Path

import pytest

from safedpo_ray.config.training import load_config
from safedpo_ray.data.synthetic import make_synthetic_rows
from safedpo_ray.data.stream import DataError
from safedpo_ray.train import handoff, preempt
from safedpo_ray.train.early_start import estimated_rows, reference_pass_expected
from safedpo_ray.train.trainer import DataPlan, plan_data


# ----------------------------------------------------------------------------------- hand-off


def test_announced_pairs_reach_a_worker_that_waits(tmp_path):
    root = str(tmp_path)
    got = {}
    waiter = threading.Thread(target=lambda: got.update(handoff.wait_for_pairs(root, poll_s=0.01)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # nothing announced: still waiting
    handoff.announce(root, pairs={"train": "/p/train.arrow", "eval": "/p/eval.arrow"}, has_eval=True)
    waiter.join(5)
    assert got == {"pairs": {"train": "/p/train.arrow", "eval": "/p/eval.arrow"}, "has_eval": True}


def test_a_preparation_error_or_a_stop_ends_the_wait(tmp_path):
    handoff.announce(str(tmp_path), error="preparation failed: no pairs")
    with pytest.raises(handoff.NoPairs, match="no pairs"):
        handoff.wait_for_pairs(str(tmp_path), poll_s=0.01)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / preempt.STOP_MARKER).write_text(json.dumps({"signal": "SIGTERM"}))
    with pytest.raises(handoff.NoPairs, match="signalled before the pairs were ready"):
        handoff.wait_for_pairs(str(stopped), poll_s=0.01)


def test_every_rank_gives_up_when_one_does(tmp_path):
    handoff.announce(str(tmp_path), pairs={"train": "t"}, has_eval=False)
    seen = []

    def agree(gave_up: bool) -> bool:  # another rank saw the stop marker
        seen.append(gave_up)
        return True

    with pytest.raises(handoff.NoPairs, match="another worker"):
        handoff.wait_for_pairs(str(tmp_path), agree, poll_s=0.01)
    assert seen == [False]
    assert handoff.wait_for_pairs(str(tmp_path), lambda gave_up: gave_up, poll_s=0.01)["pairs"] == {"train": "t"}


def test_a_half_written_announcement_is_read_again(tmp_path):
    path = tmp_path / handoff.READY
    path.write_text('{"pairs": {"tra')  # caught mid-write
    threading.Timer(0.2, lambda: handoff.announce(str(tmp_path), pairs={"train": "t"})).start()
    assert handoff.wait_for_pairs(str(tmp_path), poll_s=0.01)["pairs"] == {"train": "t"}
    handoff.withdraw(str(tmp_path))
    assert not path.exists()


def test_a_signal_while_the_workers_wait_stops_at_once(tmp_path):
    guard = preempt.DriverSignals()
    guard.marker = str(tmp_path / preempt.STOP_MARKER)
    guard.waiting_for_pairs = lambda: True
    guard.signum, guard.requested_at = 15, time.monotonic()
    with pytest.raises(preempt.Interrupted, match="while the pairs were prepared: stopped, nothing to save") as stop:
        guard.poll()  # not a wait for the workers to load their model and see the marker
    assert stop.value.signum == 15
    assert (tmp_path / preempt.STOP_MARKER).exists()  # what outlives the driver still stops on it
    # once the pairs are announced, a signal asks the workers for a checkpoint instead
    guard = preempt.DriverSignals()
    guard.marker = str(tmp_path / "other" / preempt.STOP_MARKER)
    guard.waiting_for_pairs = lambda: False
    guard.signum, guard.requested_at = 15, time.monotonic()
    guard.poll()
    assert (tmp_path / "other" / preempt.STOP_MARKER).exists()


def test_a_signal_before_fit_runs_while_the_pairs_are_prepared_says_so():
    """The driver announces that the workers start, then imports and builds the trainer before
    fit() runs: a signal in that window stops at once and says the pairs were being prepared."""
    guard = preempt.DriverSignals()
    guard.waiting_for_pairs = lambda: True
    with pytest.raises(preempt.Interrupted, match="while the pairs were prepared: stopped, nothing to save"):
        guard.handler(15, None)
    guard = preempt.DriverSignals()  # no early start: the message of a command that had not begun
    with pytest.raises(preempt.Interrupted, match="before training started: stopped, nothing to save"):
        guard.handler(15, None)


def test_workers_stopped_by_the_marker_say_nothing_was_saved():
    guard = preempt.DriverSignals()
    guard.signum = 2
    preempt._active = guard
    try:
        with pytest.raises(preempt.Stopped, match="before training started: stopped, nothing to save") as stop:
            preempt.raise_if_signalled("r1")
        assert stop.value.exit_code == 130
    finally:
        preempt._active = None
    preempt.raise_if_signalled("r1")  # no guard, no signal: nothing to raise


# ----------------------------------------------------------------------------------- decision


def write_rows(path: Path, n: int, *, seed: int = 0) -> Path:
    rows = make_synthetic_rows(200, seed=seed, split="train")
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({**rows[i % len(rows)], "prompt": f"{rows[i % len(rows)]['prompt']} #{i}"}) + "\n")
    return path


@pytest.mark.parametrize("chunk_mb", [1, 64])
def test_rows_are_estimated_from_the_files_bytes(tmp_path, chunk_mb):
    data = write_rows(tmp_path / "rows.jsonl", 3000)
    cfg = load_config(None, [f"data.source={data}", "data.eval_fraction=0.05", f"data.chunk_mb={chunk_mb}"])
    estimate = estimated_rows(plan_data(cfg))
    assert estimate == pytest.approx(3000, rel=0.15)
    synthetic = load_config(None, ["data.synthetic_prompts=640"])
    assert estimated_rows(plan_data(synthetic)) == 640


def test_rows_of_a_gzip_file_are_not_estimated(tmp_path):
    import gzip

    data = tmp_path / "rows.jsonl.gz"
    data.write_bytes(gzip.compress(write_rows(tmp_path / "plain.jsonl", 50).read_bytes()))
    cfg = load_config(None, [f"data.source={data}"])
    assert estimated_rows(plan_data(cfg)) is None
    assert reference_pass_expected(load_config(None, [f"data.source={data}", "train.max_steps=1"]),
                                   plan_data(cfg))  # not known: the cached pass, as before


def test_a_reference_pass_is_expected_unless_the_run_is_short_or_needs_none():
    plan = DataPlan(chunks=[], names=[], identity=[])
    synthetic = plan_data(load_config(None, ["data.synthetic_prompts=4000"]))
    expect = lambda *o, p=synthetic: reference_pass_expected(load_config(None, list(o)), p)  # noqa: E731
    assert expect()  # whole epochs: the cached pass pays off
    assert not expect("train.cache_reference=false")
    assert not expect("train.loss=simpo")
    assert not expect("train.max_steps=10")  # 160 pairs of ~4,000 rows
    assert expect("train.max_steps=100")  # 1,600 pairs: more than a quarter of the rows
    assert expect("train.max_steps=10", "data.max_rows=500")  # only 500 rows will be read
    assert expect("train.max_steps=10", p=plan)  # rows unknown


def test_workers_start_early_only_with_a_cpu_to_spare_and_pairs_to_prepare(ray_local, tmp_path):
    import ray

    from safedpo_ray.data.prepared import COMPLETE, prepared_root
    from safedpo_ray.train.early_start import overlaps_preparation

    data = write_rows(tmp_path / "rows.jsonl", 400)
    base = [f"data.source={data}", f"run.output_dir={tmp_path}", "train.max_steps=2", "run.num_workers=2"]
    cpus = ray.cluster_resources()["CPU"]
    decide = lambda *o: overlaps_preparation(cfg := load_config(None, base + list(o)), plan_data(cfg), "tok")  # noqa: E731
    assert decide()
    assert not decide("run.start_workers_early=false")
    assert not decide(f"run.cpus_per_worker={cpus / 2}")  # the workers would hold every CPU
    assert not decide("train.max_steps=20")  # 320 pairs of ~400 rows: the cached reference pass
    cfg = load_config(None, base)
    root = Path(prepared_root(cfg, plan_data(cfg).identity, "tok")[1])
    root.mkdir(parents=True)
    (root / COMPLETE).write_text("{}")  # prepared already: nothing to overlap
    assert not decide()


# ----------------------------------------------------------------------------------- whole runs

pytestmark_e2e = pytest.mark.timeout(300)

SMALL = ["data.max_length=96", "data.max_prompt_length=40", "train.global_batch_size=8", "train.micro_batch_size=2",
         "train.learning_rate=1e-3", "run.num_workers=2", "train.max_steps=3", "data.eval_fraction=0.1"]


def losses(summary: dict) -> dict[int, float]:
    path = Path(summary["run_dir"]) / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.open()) if "loss" in r}


def alive_train_workers() -> int:
    from ray.util.state import list_actors

    return sum("RayTrainWorker" in a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")]))


def prepare_once_workers_run(prepare):
    """`trainer.prepare` that says it has started (its first rows, as far as `train` knows) and
    then waits for both training workers before it reads anything."""

    def wrapped(*args, started=None, **kwargs):
        started.set()
        deadline = time.monotonic() + 90
        while alive_train_workers() < 2:
            assert time.monotonic() < deadline, "the training workers did not start before preparation"
            time.sleep(0.5)
        return prepare(*args, started=started, **kwargs)

    return wrapped


@pytestmark_e2e
def test_workers_start_before_the_pairs_and_train_as_if_prepared_first(ray_local, tmp_path, monkeypatch):
    from safedpo_ray.train import trainer

    data = write_rows(tmp_path / "rows.jsonl", 400)
    common = SMALL + [f"data.source={data}", f"run.output_dir={tmp_path / 'out'}"]
    later = trainer.train(load_config(None, common + ["run.name=later", "run.start_workers_early=false"]))
    assert "started_before_pairs" not in later

    # A fresh cache, and a preparation that only begins once the workers are up: a `train` that
    # prepared first would wait here forever (and fail after 90 s).
    monkeypatch.setattr(trainer, "prepare", prepare_once_workers_run(trainer.prepare))
    early = trainer.train(load_config(None, SMALL + [f"data.source={data}", f"run.output_dir={tmp_path / 'out2'}",
                                                    "run.name=early"]))
    assert early["started_before_pairs"] is True
    assert losses(early) == pytest.approx(losses(later), abs=1e-6)
    assert early["data"] == later["data"]  # the same statistics, in the summary
    run_dir = Path(early["run_dir"])
    assert json.loads((run_dir / "data_stats.json").read_text()) == later["data"]
    assert early["eval_after"] == pytest.approx(later["eval_after"], abs=1e-6)
    assert early["reference_forwards"] > 0 and "reference" not in early  # the live reference
    assert not (run_dir / preempt.STOP_MARKER).exists()


@pytestmark_e2e
def test_a_preparation_error_reaches_the_user_while_the_workers_wait(ray_local, tmp_path, monkeypatch):
    from safedpo_ray.train import trainer

    monkeypatch.setattr(trainer, "prepare", prepare_once_workers_run(trainer.prepare))

    rows = [r for r in make_synthetic_rows(200, seed=1) if r["is_response_0_safe"] or r["is_response_1_safe"]]
    unsafe = {**rows[0], "is_response_0_safe": False, "is_response_1_safe": False}
    data = tmp_path / "unsafe.jsonl"
    data.write_text("".join(json.dumps({**unsafe, "prompt": f"{unsafe['prompt']} #{i}"}) + "\n" for i in range(300)))
    cfg = load_config(None, SMALL + [f"data.source={data}", f"run.output_dir={tmp_path}", "run.name=bad"])
    t0 = time.monotonic()
    with pytest.raises(DataError, match="kept no training pairs"):
        trainer.train(cfg)
    assert time.monotonic() - t0 < 150
    assert json.loads((tmp_path / "bad" / handoff.READY).read_text())["error"].startswith("preparation failed")


@pytestmark_e2e
def test_a_preparation_error_before_any_row_arrives_starts_no_worker(ray_local, tmp_path, monkeypatch):
    from safedpo_ray.train import trainer

    def failing(*args, **kwargs):
        raise DataError("the source went away")

    monkeypatch.setattr(trainer, "prepare", failing)
    monkeypatch.setattr(trainer, "fit", lambda *a, **k: pytest.fail("workers started"))
    data = write_rows(tmp_path / "rows.jsonl", 400)
    cfg = load_config(None, SMALL + [f"data.source={data}", f"run.output_dir={tmp_path}", "run.name=gone"])
    with pytest.raises(DataError, match="the source went away"):
        trainer.train(cfg)
    assert not (tmp_path / "gone" / handoff.READY).exists()


@pytestmark_e2e
def test_a_signal_while_the_pairs_are_prepared_stops_the_command_at_once(tmp_path):
    """`safedpo-ray train` as a user runs it, SIGTERM as soon as its workers start (the pairs still
    being prepared): exit 143 within seconds, saying nothing was trained, and nothing left running."""
    import os
    import signal
    import subprocess
    import sys

    from safedpo_ray.data.prepared import COMPLETE

    data = write_rows(tmp_path / "rows.jsonl", 30_000)
    report, log = tmp_path / "report.json", tmp_path / "train.log"
    tests = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    cmd = [sys.executable, str(tests / "reaped_run.py"), str(report), "--", sys.executable, "-m", "safedpo_ray.cli",
           "train", *SMALL, f"data.source={data}", f"run.output_dir={tmp_path / 'out'}", "run.name=sig"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while "training workers start while the pairs are prepared" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rc = proc.wait(timeout=120)
            took = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert "SIGTERM received while the pairs were prepared: stopped, nothing to save" in text
    assert took < 8, f"{took:.1f} s from the signal to the exit"  # 17.9 s before: the workers had to load their model first
    assert json.loads(report.read_text())["left_at_exit"] == []
    assert not list((tmp_path / "out").glob(f".cache/prepared/*/{COMPLETE}"))  # preparation did not go on
    assert not (tmp_path / "out" / "sig" / "summary.json").exists()
    print(f"exit {took:.1f} s after the signal")
