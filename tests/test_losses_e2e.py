"""`train.loss` end to end (Ray Train + DeepSpeed, tiny model, CPU): a reference-free loss runs with
no reference at all, and a reference-based one of the family trains through the same workers."""

from pathlib import Path

import pytest

from safedpo_ray.config.training import load_config
from safedpo_ray.train.trainer import train

pytestmark = pytest.mark.timeout(300)

SMALL = [
    "data.synthetic_prompts=64", "data.synthetic_eval_prompts=16", "data.max_length=128",
    "data.max_prompt_length=48", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.learning_rate=1e-3", "run.num_workers=1", "train.max_steps=6",
]


def test_simpo_holds_and_runs_no_reference(ray_local, tmp_path):
    # train.cache_reference=true (the default) asks for a reference pass: SimPO still runs none, and
    # its workers hold no reference model (the same worker branch as with cache_reference=false)
    s = train(load_config(None, SMALL + [f"run.output_dir={tmp_path}", "run.name=simpo", "train.loss=simpo",
                                         "train.beta=2.0", "train.cache_reference=true"]))
    assert s["reference_forwards"] == 0 and s["reference_model_held"] is False
    assert "reference" not in s  # no reference pass on the driver side either
    assert not (tmp_path / ".cache" / "reference").exists()
    # SimPO's rewards are β × mean log-prob: not 0 before training, and the safe one pulls ahead
    before, after = s["eval_before"], s["eval_after"]
    assert after["rewards/margins/safe_unsafe"] > before["rewards/margins/safe_unsafe"]
    assert (Path(s["model_dir"]) / "model.safetensors").exists()


def test_ipo_with_live_reference(ray_local, tmp_path):
    s = train(load_config(None, SMALL + [f"run.output_dir={tmp_path}", "run.name=ipo", "train.loss=ipo",
                                         "train.cache_reference=false", "train.delta=2.0",
                                         "train.eval_at_start=measured"]))
    assert s["reference_model_held"] is True and s["reference_forwards"] > 0
    before, after = s["eval_before"], s["eval_after"]
    assert before["rewards/margins"] == 0.0  # a live frozen copy: exactly the policy at step 0
    assert after["rewards/margins/safe_unsafe"] > 0
