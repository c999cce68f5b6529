"""End-to-end Ray Train + DeepSpeed runs on a tiny model, on CPU."""

import json
from pathlib import Path

import pytest
import torch

from safedpo_ray.config.training import load_config
from safedpo_ray.models.loading import load_model
from safedpo_ray.train.trainer import train

pytestmark = pytest.mark.timeout(300)

SMALL = [
    "data.synthetic_prompts=64", "data.synthetic_eval_prompts=16", "data.max_length=128",
    "data.max_prompt_length=48", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.learning_rate=1e-3", "run.num_workers=2",
]


def run(tmp_path: Path, name: str, *extra: str) -> dict:
    cfg = load_config(None, SMALL + [f"run.output_dir={tmp_path}", f"run.name={name}", *extra])
    return train(cfg)


def losses(summary: dict) -> dict[int, float]:
    """Training loss per step; a step logged twice (a resume that restarted) is an error."""
    path = Path(summary["run_dir"]) / "metrics.jsonl"
    records = [r for r in map(json.loads, path.open()) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_zero2_trains_exports_and_logs(ray_local, tmp_path):
    s = run(tmp_path, "z2", "train.zero_stage=2", "train.precision=bf16", "train.max_steps=12",
            "run.tensorboard=true", "train.eval_at_start=measured")
    before, after = s["eval_before"], s["eval_after"]
    # policy == reference at the start, bit for bit: the cached reference pass uses the workers'
    # evaluation batches (a bf16 reference cast differently, or other batch shapes, drift)
    assert before["rewards/margins"] == 0.0
    assert before["rewards/accuracies/safe_unsafe"] == 0.5 and before["rewards/accuracies/safe_safe"] == 0.5
    assert after["rewards/accuracies/safe_unsafe"] > 0.7
    assert after["rewards/margins/safe_unsafe"] > 0
    records = [json.loads(l) for l in (Path(s["run_dir"]) / "metrics.jsonl").open()]
    step1 = next(r for r in records if r.get("step") == 1 and "loss" in r)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "tokens_per_s", "step_time_s", "lr"):
        assert key in step1
    assert any(k.endswith("/safe_unsafe") for k in step1) and any(k.endswith("/safe_safe") for k in step1)
    assert list((Path(s["run_dir"]) / "tensorboard").glob("events.out.tfevents.*"))
    model = load_model(s["model_dir"])  # HF format, safetensors
    assert (Path(s["model_dir"]) / "model.safetensors").exists()
    init = load_model(str(Path(s["run_dir"]) / "init-model"))
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values()))
    assert changed
    assert s["data"]["train"]["transform"]["unsafe_unsafe"]["discarded"] > 0
    # a local Ray (one machine) runs no preemption watcher: no node of it can be drained alone
    from ray.util.state import list_actors

    assert not list_actors(filters=[("class_name", "=", "PreemptionWatcher")], raise_on_missing_output=False)
    assert list_actors(filters=[("class_name", "=", "TrainController")], raise_on_missing_output=False)


# ZeRO-3 in bf16 (cached and live reference), LoRA with its reference and exports: test_live_reference_and_zero3.py


# resume equals an uninterrupted run, and is refused without run.resume=true:
# test_preemption.py::test_damaged_and_partial_checkpoints_fall_back_to_an_intact_one


def test_accumulation_zero_stage_and_the_cached_reference_leave_the_numbers_unchanged(ray_local, tmp_path):
    """One epoch at global batch 8, two ways: 2 workers × 1 pair × 4 accumulation steps with
    ZeRO-1 and the cached reference pass, or 2 workers × 4 pairs × 1 step with ZeRO-0 and a live
    reference model. Neither accumulation, nor the ZeRO stage, nor where the reference log-probs
    come from may change the numbers: the same loss at every step, the same final held-out margin."""
    cached = run(tmp_path, "cached", "train.epochs=1", "train.micro_batch_size=1", "train.zero_stage=1")
    assert cached["reference"]["computed"] and cached["reference_forwards"] == 0  # a whole epoch: the pass is used
    # held-out metrics at the start are derived (π = π_ref): no forward, the values a measurement gives
    before = cached["eval_before"]
    assert "loss" not in before and before["rewards/margins"] == 0.0 and before["rewards/accuracies"] == 0.5
    assert before["pairs/safe_safe"] + before["pairs/safe_unsafe"] == cached["data"]["eval"]["pairs"]
    live = run(tmp_path, "live", "train.epochs=1", "train.micro_batch_size=4", "train.zero_stage=0",
               "train.cache_reference=false")
    assert "reference" not in live and live["reference_forwards"] > 0
    a, b = losses(cached), losses(live)
    assert sorted(a) == sorted(b) and len(a) >= 3, (sorted(a), sorted(b))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4), step
    assert cached["eval_after"]["rewards/margins"] == pytest.approx(live["eval_after"]["rewards/margins"], rel=1e-4)


def test_a_short_run_computes_its_reference_live_and_an_epoch_gets_the_pass(monkeypatch, capsys):
    """(fast) A run that trains fewer pairs than it has gets no pass over every pair; one that
    trains them all does."""
    from safedpo_ray.train import trainer

    calls = []

    class Pass:
        def describe(self):
            return "reference log-probs: a pass"

    monkeypatch.setattr(trainer, "reference_logps", lambda *args, **kwargs: calls.append(kwargs) or Pass())
    short = trainer.Prepared(data=None, stats={"train": {"pairs": 100}}, model_path="m")
    trainer.attach_reference(load_config(None, SMALL + ["train.max_steps=3"]), short)
    assert short.reference is None and not calls
    assert "computed live: this run trains on 24 of 100 pairs" in capsys.readouterr().out
    whole = trainer.Prepared(data=None, stats={"train": {"pairs": 100}}, model_path="m")
    trainer.attach_reference(load_config(None, SMALL + ["train.max_steps=13"]), whole)
    assert isinstance(whole.reference, Pass) and len(calls) == 1
