"""`safedpo-ray sft` end to end on CPU (Ray Data + Ray Train + DeepSpeed, tiny model), and the
paper's chain SFT → SafeDPO from the shipped configs.

    python -m pytest -q tests/test_sft_chain.py          # about 5 minutes on 2 busy CPU cores
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

import safedpo_ray
from safedpo_ray.config.training import load_config
from safedpo_ray.data.synthetic import make_synthetic_rows
from safedpo_ray.models.loading import load_model
from safedpo_ray.train.sft import sft
from safedpo_ray.train.trainer import train

pytestmark = pytest.mark.timeout(300)

CONFIGS = Path(safedpo_ray.__file__).parent / "configs"
SMALL = [
    "data.synthetic_prompts=64", "data.synthetic_eval_prompts=16", "data.max_length=128",
    "data.max_prompt_length=48", "train.global_batch_size=8", "train.micro_batch_size=2",
    "run.num_workers=2", "train.epochs=100",
]


def step_losses(run_dir) -> dict[int, float]:
    records = [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").open()) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_chain_configs_point_at_each_other():
    for size in ("tiny", "pku"):
        first = load_config(CONFIGS / f"chain-sft-{size}.yaml")
        second = load_config(CONFIGS / f"chain-safedpo-{size}.yaml")
        def root(cfg):  # where a run's outputs live: run.storage_path, else run.output_dir
            return Path(cfg.run.storage_path or cfg.run.output_dir) / cfg.run.name

        assert Path(second.model.name_or_path) == root(first) / "model"
        assert first.data.source == second.data.source and second.data.mode == "safedpo"
        evaluation = yaml.safe_load((CONFIGS / f"chain-eval-{size}.yaml").read_text())
        assert evaluation["model"]["paths"] == [str(root(first)), str(root(second))]
        assert evaluation["implicit"]["beta"] == second.train.beta


def test_chain_sft_then_safedpo(ray_local, tmp_path):
    """The tiny chain as shipped, shortened: SFT on the synthetic data's safe responses, then
    SafeDPO from (and referenced to) the SFT model."""
    s = sft(load_config(CONFIGS / "chain-sft-tiny.yaml",
                        SMALL + [f"run.output_dir={tmp_path}", "train.max_steps=10", "train.learning_rate=3e-3"]))
    print(json.dumps({"sft_before": s["eval_before"], "sft_after": s["eval_after"]}, indent=1))
    assert s["data"]["train"]["selection"] == "all_safe"
    # never trains on an unsafe response; held-out examples have both kinds
    assert all(set(counts) == {"safe"} for counts in s["data"]["train"]["by_category"].values())
    held_out = s["data"]["eval"]["by_category"]
    assert set(held_out["unsafe_unsafe"]) == {"unsafe"} and held_out["safe_unsafe"]["safe"] == held_out["safe_unsafe"]["unsafe"]
    losses = step_losses(s["run_dir"])
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1] - 0.3, losses
    assert s["eval_after"]["loss"] < s["eval_before"]["loss"] - 0.3
    assert s["eval_after"]["loss/unsafe"] > s["eval_after"]["loss"]  # safe responses became likelier
    sft_model = Path(s["model_dir"])
    assert sft_model == Path(s["run_dir"]) / "model" and (sft_model / "model.safetensors").exists()

    d = train(load_config(CONFIGS / "chain-safedpo-tiny.yaml",
                          SMALL + [f"run.output_dir={tmp_path}", f"model.name_or_path={sft_model}",
                                   "train.max_steps=8", "train.learning_rate=1e-3",
                                   "train.eval_at_start=measured"]))
    print(json.dumps({"safedpo_before": d["eval_before"], "safedpo_after": d["eval_after"]}, indent=1))
    before, after = d["eval_before"], d["eval_after"]
    # π = π_ref = the SFT model at the start (reference log-probs come from a separate pass,
    # batched differently: equal up to float32 summation order)
    assert abs(before["rewards/margins"]) < 1e-5
    assert after["rewards/accuracies/safe_unsafe"] > 0.7 and after["rewards/margins/safe_unsafe"] > 0
    init = load_model(sft_model)
    final = load_model(d["model_dir"])
    assert any(not torch.equal(a, b) for a, b in zip(init.state_dict().values(), final.state_dict().values()))
    # the SafeDPO stage starts from the SFT weights, not from a fresh tiny model
    assert not (Path(d["run_dir"]) / "init-model").exists()


def _plain_file(tmp_path) -> Path:
    data = tmp_path / "sft.jsonl"
    with data.open("w") as f:
        for r in make_synthetic_rows(40, seed=1, split="train"):
            safe = [r[f"response_{i}"] for i in (0, 1) if r[f"is_response_{i}_safe"]]
            if safe:
                f.write(json.dumps({"prompt": r["prompt"], "response": safe[0], "source": "x"}) + "\n")
        f.write('{"prompt": "no response"}\n')
    return data


@pytest.fixture(scope="module")
def plain_lora(ray_local, tmp_path_factory):
    """SFT on a prompt/response file with LoRA, 4 steps, global batch 8 = 2 workers × 4 × 1."""
    tmp_path = tmp_path_factory.mktemp("plain")
    common = SMALL + [f"run.output_dir={tmp_path}", f"data.source={_plain_file(tmp_path)}", "data.eval_fraction=0.2",
                      "model.lora.enabled=true", "model.lora.r=4", "train.learning_rate=5e-3", "train.max_steps=4"]
    return common, sft(load_config(None, common + ["run.name=full", "train.micro_batch_size=4"]))


def test_sft_plain_file_with_lora_exports_a_full_model(plain_lora):
    _, full = plain_lora
    assert full["data"]["train"]["schema"] == "prompt_response"
    assert full["data"]["train"]["rows_quarantined"] + full["data"]["eval"]["rows_quarantined"] == 1
    assert (Path(full["run_dir"]) / "quarantine.jsonl").exists()
    assert (Path(full["run_dir"]) / "adapter" / "adapter_config.json").exists()
    merged = load_model(full["model_dir"])  # a full model: LoRA merged in, loadable as model.name_or_path
    assert not any("lora" in k for k in merged.state_dict())
    assert full["eval_after"]["loss"] < full["eval_before"]["loss"]


def test_sft_resume_equals_uninterrupted(plain_lora):
    """2 steps + resume, with 4 accumulation steps of 1 example, against the 4 uninterrupted steps
    of 1 accumulation step: the same losses, so resume is exact and the token-weighted loss does
    not depend on how the global batch is split."""
    common, full = plain_lora
    cut = common + ["run.name=cut", "train.micro_batch_size=1", "train.checkpoint_every=2"]
    first = sft(load_config(None, cut + ["train.stop_at_step=2"]))
    assert first.get("stopped_early") and "eval_after" not in first
    sft(load_config(None, cut + ["run.resume=true"]))
    a, b = step_losses(full["run_dir"]), step_losses(first["run_dir"])
    assert sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
