"""Searches keep everything under run.storage_path: a shared filesystem holds the experiment
itself; an object store gets Tune's state, every trial's outputs, the result files and the
shared caches (the driver stages under run.output_dir)."""

import json
import os
from pathlib import Path

import pytest
import yaml

from s3_server import S3Server
from safedpo_ray.runtime import storage
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


def test_an_object_store_gets_the_experiment(ray_local, tmp_path):
    if os.environ.get("AWS_ACCESS_KEY_ID") != "testing":
        pytest.skip("Ray was started without the test store's credentials (see conftest.py)")
    with S3Server() as s3:
        base = s3.uri("searches")
        s = experiment(tmp_path, "on-s3", f"run.storage_path={base}")
        remote = storage.join(base, "on-s3")
        for name in ("results.md", "results.csv", "best.yaml", "summary.json", "search.yaml"):
            assert storage.exists(storage.join(remote, name)), name
        fs, path = storage.resolve(remote)
        import pyarrow.fs as pafs

        listed = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
        assert any(p.endswith("tuner.pkl") or "experiment_state" in p for p in listed)  # Tune's state
        trial = s["rows"][0]["trial"]
        summary = storage.read_json(storage.join(remote, "trials", trial, "summary.json"))
        assert summary["eval_after"] and storage.exists(storage.join(remote, "trials", trial, "model", "config.json"))
        assert storage.exists(storage.join(base, ".cache", "prepared")) or any(
            ".cache/prepared" in i.path for i in fs.get_file_info(pafs.FileSelector(path.rsplit("/", 1)[0], recursive=True)))
        assert s["rows"][0]["status"] == "done"
        # every input a trial reads is addressed where any node reads it, not on the driver's disk
        shared = storage.read_json(storage.join(remote, "shared.json"))
        inputs = {"held_out_prompts": shared["held_out_prompts"], "pairs": shared["data"]["root"],
                  "reference": shared["reference"]["path"], "model": shared["model_path"]}
        assert all(v.startswith("s3://") for v in inputs.values()), inputs
        assert not any(str(tmp_path) in v for v in inputs.values()), inputs
        from safedpo_ray.evaluate.generate import read_prompt_file

        assert len(read_prompt_file(storage.localize(inputs["held_out_prompts"]))) > 0
