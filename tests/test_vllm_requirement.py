"""engine: vllm without vLLM names the machine that lacks it and the extra that installs it."""

import importlib.util
import socket

import pytest

from safedpo_ray.models.resolve import EvalError


def test_missing_vllm_names_this_machine_and_the_extra(monkeypatch):
    from safedpo_ray.evaluate.vllm_engine import require_vllm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(EvalError) as raised:
        require_vllm()
    message = str(raised.value)
    assert socket.gethostname() in message and "driver" in message
    assert "safedpo-ray[vllm]" in message and "pip install vllm" in message
