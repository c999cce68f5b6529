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
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("before ", "after "))}
    rise = {k: float(v[3]) for k, v in rows.items()}
    private = {k: float(v[-1].split("/")[0]) for k, v in rows.items()}
    # ~39M parameters: float32 policy + a private copy (~310 MB) against bf16 ones that share the
    # checkpoint's pages. The private memory once loaded is the stable measure; the peak rise also
    # holds the loader's transient buffers and moves with the page cache (0.30-0.35 GiB seen
    # before and after within one suite), so it is only required not to grow.
    assert private["after"] < 0.8 * private["before"], out
    assert rise["after"] <= rise["before"], out
