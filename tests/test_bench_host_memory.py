"""benchmarks/host_memory.py runs, and a bf16 load peaks lower than the old float32 one."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.timeout(300)


def test_host_memory_benchmark_small_model(capsys):
    import host_memory

    args = ["--hidden", "512", "--intermediate", "1024", "--layers", "2", "--heads", "8", "--vocab", "32000"]
    host_memory.main(args)
    out = capsys.readouterr().out
    assert "policy + live reference" in out
    rows = {line.split()[0]: float(line.split()[3]) for line in out.splitlines()
            if line.startswith(("before ", "after "))}
    # ~39M parameters: float32 policy + copy (~310 MB) against bf16 ones (~155 MB)
    assert rows["after"] < 0.8 * rows["before"], out
