"""Under DeepSpeed ZeRO-2 and ZeRO-3 (with and without LoRA) the packed, chunked path gives the
padded, full-logits path's per-pair log-probs, losses and full gradients (tests/packing_zero_check.py,
in its own process: DeepSpeed's state is global)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_packed_chunked_equals_padded_under_zero2_and_zero3(layout):
    script = Path(__file__).with_name("packing_zero_check.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(script), layout], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {(c["stage"], c["lora"]) for c in cases} == {(2, False), (2, True), (3, False), (3, True)}
    for c in cases:
        assert c["layout"] == layout and c["rows"] < 8 and c["grads"] > 0 and c["grad_norm"] > 0, c  # packed, and gradients exist
        for key in ("logps/chosen", "logps/rejected", "loss", "grad"):
            assert c[key] < 1e-5, c
