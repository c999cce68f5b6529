"""The DeepSpeed config built from our dataclasses."""

import pytest

from safedpo_ray.config.training import load_config
from safedpo_ray.train.strategy import build_ds_config


def test_batch_sizes_stage_and_precision():
    cfg = load_config(None, ["run.num_workers=4", "train.micro_batch_size=2", "train.global_batch_size=32",
                             "train.zero_stage=3", "train.precision=bf16", "train.max_grad_norm=0.5"])
    ds = build_ds_config(cfg, on_gpu=False)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 32 = 2 × 4 workers × 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["torch_adam"] is True
    on_gpu = build_ds_config(cfg, on_gpu=True)["optimizer"]["params"]
    assert on_gpu["torch_adam"] is True and on_gpu["fused"] is True  # no DeepSpeed op to compile


def test_schedule_warms_up_from_nonzero_and_decays():
    """10 steps, warmup 2: multipliers 1/2, 1, then cosine over steps 2..9 toward min_ratio at step 10."""
    from safedpo_ray.train.strategy import warmup_cosine

    lrs = [warmup_cosine(k, warmup=2, total=10, min_ratio=0.1) for k in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    # step 6 is half-way (4 of 8): 0.1 + 0.9 · (1 + cos(π/2)) / 2 = 0.55
    assert lrs[6] == pytest.approx(0.55)
    # last step, 7 of 8: 0.1 + 0.9 · (1 + cos(7π/8)) / 2 = 0.1 + 0.45 · (1 − 0.9238795) = 0.1342542
    assert lrs[-1] == pytest.approx(0.1342542, abs=1e-6)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert warmup_cosine(0, warmup=0, total=5, min_ratio=0.0) == 1.0
