"""Searches keep everything under run.storage_path: a shared filesystem holds the experiment
itself and its caches. (An object store getting Tune's state, every trial's outputs, the result
files and the shared caches: the journey's `tune`, tests/test_isolated_cluster.py.)"""

import json
from pathlib import Path

import pytest
import yaml

from safedpo_ray.search.experiment import run_experiment
from safedpo_ray.search.space import base_config, load_space

pytestmark = pytest.mark.timeout(900)

SMALL = [
    "data.synthetic_prompts=48", "data.synthetic_eval_prompts=16", "data.max_length=96",
    "data.max_prompt_length=40", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.learning_rate=1e-3", "run.num_workers=1", "train.max_steps=2",
]


def experiment(tmp_path, name, *extra):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "params": {"train.delta": {"grid": [2.0]}}}))
    spec = load_space(path)
    return run_experiment(spec, base_config(None, spec, SMALL + [f"run.output_dir={tmp_path / 'local'}", *extra]))


def test_a_shared_filesystem_holds_the_experiment_and_its_caches(ray_local, tmp_path):
    shared = tmp_path / "shared"
    s = experiment(tmp_path, "on-shared", f"run.storage_path={shared}")
    exp = Path(s["experiment_dir"])
    assert exp == shared / "on-shared"
    assert (exp / "results.md").exists() and (exp / "best.yaml").exists()
    trial = next((exp / "trials").iterdir())
    assert json.loads((trial / "summary.json").read_text())["eval_after"]
    assert list((shared / ".cache" / "prepared").glob("*/train.arrow"))
    assert list((shared / ".cache" / "reference").glob("*/train.arrow"))
    assert not (tmp_path / "local" / ".cache").exists()  # nothing node-local


# A search whose run.storage_path is an object store (S3): the journey's `tune` on a cluster whose
# nodes share no disk, tests/test_isolated_cluster.py (result files, Tune's state, trials and the
# inputs trials read, all in the store).
