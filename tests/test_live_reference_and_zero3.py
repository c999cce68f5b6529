"""The combinations a 7B run uses, end to end on CPU in bf16 under ZeRO-3: a live reference (loaded
again from the checkpoint, not deep-copied), and LoRA + gradient checkpointing with
use_reentrant=False (the reference: the base model, adapters off); each exports what it trained."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("extra", [  # ZeRO-2 with a live reference: test_train_e2e.py
    ("train.zero_stage=3", "train.cache_reference=false"),
    ("train.zero_stage=3", "model.lora.enabled=true", "model.lora.r=4", "model.gradient_checkpointing=true",
     "train.learning_rate=5e-3", "run.export_merged=true"),
], ids=["zero3-live-reference", "zero3-lora-checkpointing"])
def test_bf16_trains_from_the_reference(ray_local, tmp_path, extra):
    from test_train_e2e import run

    from safedpo_ray.models.loading import load_model

    s = run(tmp_path, "run", "train.precision=bf16", "train.max_steps=6", "train.eval_at_start=measured", *extra)
    assert s["eval_before"]["rewards/margins"] == 0.0  # the reference is the step-0 policy, bit for bit
    assert s["eval_after"]["rewards/margins/safe_unsafe"] > s["eval_before"]["rewards/margins/safe_unsafe"]
    model_dir = Path(s["model_dir"])
    if "model.lora.enabled=true" in extra:
        assert (model_dir / "adapter" / "adapter_model.safetensors").exists()
        model_dir = model_dir / "merged"
    model = load_model(str(model_dir))
    assert (model_dir / "model.safetensors").exists()
    assert sum(p.numel() for p in model.parameters()) > 10_000  # whole weights, not ZeRO-3 stubs
