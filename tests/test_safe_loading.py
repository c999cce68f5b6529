"""Weights load through safetensors, or torch.load(weights_only=True): a pickle that holds more
than tensors is refused with a clear message, and never runs."""

import os
from pathlib import Path

import pytest
import torch

from safedpo_ray.models.loading import build_tiny_model, load_model
from safedpo_ray.runtime.safe_loading import UnsafeWeightsError, weights_kwargs

TEXTS = ["a safe answer to a question", "an unsafe answer to a question", "hello world"] * 20


class _Payload:
    """A pickle that would run code when loaded without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TEXTS, seed=1)


def _pickle_only_copy(tiny: Path, out: Path, state) -> Path:
    out.mkdir()
    for f in tiny.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    torch.save(state, out / "pytorch_model.bin")
    return out


def test_safetensors_directory_reads_safetensors_only(tiny, tmp_path):
    assert weights_kwargs(tiny) == {"weights_only": True, "use_safetensors": True}
    assert weights_kwargs("org/some-hub-model") == {"weights_only": True}  # hub: prefers safetensors


def test_pickle_only_model_loads_with_weights_only(tiny, tmp_path):
    reference = load_model(str(tiny))
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    d = _pickle_only_copy(tiny, tmp_path / "bin-only", state)
    assert weights_kwargs(d) == {"weights_only": True, "use_safetensors": False}
    model = load_model(str(d))
    for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_pickle_with_code_is_refused_and_never_runs(tiny, tmp_path):
    marker = tmp_path / "ran"
    state = dict(load_model(str(tiny)).state_dict())
    state["payload"] = _Payload(str(marker))
    d = _pickle_only_copy(tiny, tmp_path / "evil", state)
    with pytest.raises(UnsafeWeightsError) as err:
        load_model(str(d))
    assert "weights_only=True" in str(err.value) and "safetensors" in str(err.value) and str(d) in str(err.value)
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_beside_them(tiny, tmp_path):
    """A directory with safetensors is read from them: a (malicious) pickle beside them is ignored."""
    marker = tmp_path / "ran"
    d = tmp_path / "both"
    d.mkdir()
    for f in tiny.iterdir():
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    torch.save({"payload": _Payload(str(marker))}, d / "pytorch_model.bin")
    load_model(str(d))
    assert not marker.exists()
