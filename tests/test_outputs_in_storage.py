"""`train-scorer` as its own command: its outputs under a shared path or an object store, where
rank 0 stages and uploads (the run itself, ZeRO-3 with 2 workers and a held-out set of 5 pairs
that the ranks split 3/2 with equal forwards per rank, writing to moto's S3 server, then read by
`evaluate` by URI: tests/test_eval_ray.py; `sft`'s outputs in S3, and `train` from the SFT
model's URI: tests/test_isolated_cluster.py, on a cluster), and a SIGTERM that stops it.
On this CPU/gloo setup the old uneven held-out loop did not hang in the one run tried (why was
not looked into): tests/test_sampler.py checks the batching itself.

    python -m pytest -q tests/test_outputs_in_storage.py      # about a minute on 2 busy CPU cores
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safedpo_ray.runtime import storage

pytestmark = pytest.mark.timeout(300)

def run_cli(tmp_path: Path, *argv: str, timeout: int = 420) -> subprocess.CompletedProcess:
    """`safedpo-ray ARGV` in a fresh process with its own local Ray (not the session's: in the
    whole suite, this module's SFT data tasks once waited forever for a node in the shared Ray),
    bounded by `timeout`: a hang is a failure here, not a stuck suite."""
    from s3_server import CREDENTIALS

    env = {**os.environ, **CREDENTIALS, "SAFEDPO_STORAGE_CACHE": str(tmp_path / "cache"),
           "SAFEDPO_STAGING_DIR": str(tmp_path / "staging")}
    env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    done = subprocess.run([sys.executable, "-m", "safedpo_ray.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


SMALL = ["data.max_length=128", "data.max_prompt_length=48", "train.global_batch_size=8",
         "train.micro_batch_size=2", "run.num_workers=2"]


def _listing(root: str) -> set[str]:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(root)
    return {i.path[len(path.rstrip("/")) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}


@pytest.mark.timeout(240)
def test_sigterm_stops_train_scorer_with_143(tmp_path):
    """SIGTERM to `safedpo-ray train-scorer` while it trains: the workers stop after their step and
    the command exits 143 saying so (no checkpoint to continue from: run it again)."""
    log = tmp_path / "scorer.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "60"
    cmd = [sys.executable, "-m", "safedpo_ray.cli", "train-scorer", "--kind", "cost", "--output", str(tmp_path / "sc"),
           "data.synthetic_prompts=16", "data.synthetic_eval_prompts=4", "train.epochs=100", "train.max_steps=200",
           "train.step_delay_s=0.3", "train.log_every=1", *SMALL]
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline:
                if "cost model step 2/" in log.read_text():
                    break
                time.sleep(0.2)
            assert proc.poll() is None, log.read_text()[-3000:]
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
            took = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert "stopped by SIGTERM after step" in text and "of the cost model" in text, text[-3000:]
    assert "SIGTERM received: stopping after this step (train-scorer keeps no checkpoints)" in text
    assert "train-scorer keeps no checkpoints: run the same command again" in text
    assert took < 30, took
    summary = json.loads((tmp_path / "sc" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["models"]["cost"]["last_step"] < summary["models"]["cost"]["steps"] == 200
    assert not (tmp_path / "sc" / "cost").exists()


def test_scorer_output_dir_scheme_is_checked():
    from safedpo_ray.config.evaluation import load_scorer_config
    from safedpo_ray.config.training import ConfigError

    assert load_scorer_config(None, ["scorer.output_dir=s3://b/scorers?region=us-east-1"]).scorer.output_dir.startswith("s3://")
    with pytest.raises(ConfigError, match="'scorer.output_dir': unsupported scheme 'ftp://'"):
        load_scorer_config(None, ["scorer.output_dir=ftp://host/x"])
