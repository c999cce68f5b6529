"""The combinations a 7B run uses, end to end on CPU in bf16: a live reference (loaded again
from the checkpoint, not deep-copied) under ZeRO-2 and ZeRO-3, and LoRA + ZeRO-3 + gradient
checkpointing with use_reentrant=False."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("extra", [  # ZeRO-2 with a live reference: test_train_e2e.py
    ("train.zero_stage=3", "train.cache_reference=false"),
    ("train.zero_stage=3", "model.lora.enabled=true", "model.lora.r=4", "model.gradient_checkpointing=true",
     "train.learning_rate=5e-3"),
], ids=["zero3-live-reference", "zero3-lora-checkpointing"])
def test_bf16_trains_from_the_reference(ray_local, tmp_path, extra):
    from test_train_e2e import run

    s = run(tmp_path, "run", "train.precision=bf16", "train.max_steps=6", "train.eval_at_start=measured", *extra)
    assert s["eval_before"]["rewards/margins"] == 0.0  # the reference is the step-0 policy, bit for bit
    assert s["eval_after"]["rewards/margins/safe_unsafe"] > s["eval_before"]["rewards/margins/safe_unsafe"]
