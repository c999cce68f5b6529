"""Weights load in the training precision, and the reference is cast before it moves.

What the workers held before: a float32 load whose parameters DeepSpeed (policy) or our code
(reference) cast to bf16, buffers left in float32. A bf16 load must give exactly that, in half the
host memory."""

from __future__ import annotations

import pytest
import torch

from safedpo_ray.models.loading import apply_lora, build_tiny_model, load_model
from safedpo_ray.models.precision import weights_dtype

TEXTS = [f"USER: is step {i} safe? ASSISTANT: step {i} is safe, take care with the {w}."
         for i in range(40) for w in ("door", "lamp")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TEXTS, seed=5, vocab_size=400)


def _cast_parameters(model, dtype):
    """As DeepSpeed's bf16 engine and the reference did: parameters only."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def test_weights_dtype():
    assert weights_dtype("bf16") == "bfloat16" and weights_dtype("fp32") == "float32"
    with pytest.raises(ValueError, match="precision"):
        weights_dtype("fp8")


def test_bf16_load_equals_float32_load_cast(tiny_dir):
    before = _cast_parameters(load_model(str(tiny_dir)), torch.bfloat16)
    now = load_model(str(tiny_dir), dtype=weights_dtype("bf16"))
    assert {p.dtype for p in now.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in now.named_buffers()} == {n: b.dtype for n, b in before.named_buffers()}
    assert all(b.dtype == torch.float32 for b in now.buffers())  # rotary inv_freq not rounded
    for (name, a), (_, b) in zip(before.state_dict().items(), now.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, now.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(before(input_ids=ids).logits, now(input_ids=ids).logits)


def test_lora_on_bf16_base_same_adapters(tiny_dir):
    """peft creates float32 adapters on a bf16 base; DeepSpeed then casts them as before."""
    torch.manual_seed(0)
    before = apply_lora(load_model(str(tiny_dir)), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(0)
    now = apply_lora(load_model(str(tiny_dir), dtype="bfloat16"), r=4, alpha=8, dropout=0.0,
                     target_modules="all-linear")
    _cast_parameters(before, torch.bfloat16), _cast_parameters(now, torch.bfloat16)
    for (name, a), (_, b) in zip(before.state_dict().items(), now.state_dict().items()):
        assert torch.equal(a, b), name


class _MoveRecorder(torch.nn.Module):
    """A module whose `.to(device)` records the parameter dtypes at the moment it moves."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.ones(2))
        self.moved_with: list[set[torch.dtype]] = []

    def to(self, *args, **kwargs):
        self.moved_with.append({p.dtype for p in self.parameters()})
        return super().to(*args, **kwargs)


def test_strategy_reference_cast_before_move():
    from safedpo_ray.config.training import load_config
    from safedpo_ray.train.strategy import DeepSpeedStrategy

    cfg = load_config(None, ["train.precision=bf16", "train.zero_stage=2"])
    ref = DeepSpeedStrategy(cfg, on_gpu=False).prepare_reference(_MoveRecorder())
    assert ref.moved_with == [{torch.bfloat16}]
    assert ref.inv_freq.dtype == torch.float32 and not ref.training


def test_reference_actor_loads_in_precision_and_casts_before_move(tiny_dir, monkeypatch):
    from safedpo_ray.data.reference import ReferenceLogps

    moved_with = []
    original_to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        if module.__class__.__name__.endswith("ForCausalLM"):
            moved_with.append({p.dtype for p in module.parameters()})
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    actor = ReferenceLogps(str(tiny_dir), "bf16", False, False)
    assert moved_with == [{torch.bfloat16}]
    assert {p.dtype for p in actor.model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in actor.model.buffers())
    before = _cast_parameters(load_model(str(tiny_dir)), torch.bfloat16)
    for (name, a), (_, b) in zip(before.state_dict().items(), actor.model.state_dict().items()):
        assert torch.equal(a, b), name


SHARED_PAGES = r"""
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safedpo_ray.models.loading import load_model, make_reference_copy


def anon_mib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


out = Path(sys.argv[1])
config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)  # ~39M parameters
model_mib = 39e6 * 2 / 2**20
policy = load_model(str(out), dtype="bfloat16")
before = anon_mib()
again = load_model(str(out), dtype="bfloat16").eval().requires_grad_(False)
loaded = anon_mib() - before
copied = make_reference_copy(policy)
deep = anon_mib() - before - loaded
assert loaded < 0.25 * model_mib < 0.75 * model_mib < deep, (loaded, deep, model_mib)
for (name, a), (_, b) in zip(copied.state_dict().items(), again.state_dict().items()):
    assert torch.equal(a, b), name
print("ok")
"""


def test_reference_loaded_again_shares_the_checkpoint_pages(tmp_path):
    """A bf16 checkpoint loaded in bf16 stays memory-mapped: a second load (the workers' live
    reference) adds no private memory, where a deep copy adds the model's size. Measured in a
    fresh interpreter: what earlier tests left allocated moves a process's private memory."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SHARED_PAGES, str(tmp_path / "m")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_sft_policy_loads_in_training_precision(tiny_dir, precision, dtype):
    from safedpo_ray.config.training import load_config
    from safedpo_ray.train.sft_worker import build_policy

    _, model = build_policy(load_config(None, [f"train.precision={precision}"]), str(tiny_dir))
    assert {p.dtype for p in model.parameters()} == {dtype}
