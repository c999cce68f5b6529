"""benchmarks/against_trl.py end to end on the tiny model: both tools run, one table, JSON numbers.

TRL is the optional `bench` extra: without it the benchmark runs ours only (--no-trl). The pairs
are the package's synthetic ones (--data synthetic), so the test does not read ../shared/data.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRL = importlib.util.find_spec("trl") is not None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_against_trl_tiny(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "against_trl.py"), "--tiny", "--data", "synthetic",
           "--reps", "1", "--steps", "2", "--pairs", "8", "--batch", "4", "--out", str(out)]
    if not HAVE_TRL:
        cmd.append("--no-trl")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=380)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| median of 1 rep(s) | TRL DPOTrainer | ours (safedpo-ray train) | ratio |")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table[1:]}
    assert "training time, s" in rows and "MFU (8·N·tokens/s ÷ matmul peak)" in rows
    assert all(cells[1].strip() not in ("", "—") for cells in rows.values() if cells[1])  # ours: every row
    if HAVE_TRL:
        assert rows["training time, s"][0].strip() != "—" and "TRL/ours" in rows["training time, s"][2]

    result = json.loads((out / "results.json").read_text())
    assert result["pairs"] == 8 and result["pairs_trained"] == 8 and result["flops_params"] > 0
    assert all(p > 0 for p in result["matmul_peak_flops"])
    tools = ["ours"] + (["trl"] if HAVE_TRL else [])
    for tool in tools:
        (run,) = result["runs"][tool]
        for key in ("train_s", "wall_s", "pairs_per_s", "tokens_per_s", "mfu", "peak_pss_gb", "peak_rss_gb"):
            assert run[key] > 0, (tool, key, run[key])
        assert len(run["step_times_s"]) == 2
        # both tools trained on exactly the tokens the benchmark counted from the tokenized pairs
        assert run["tokens_seen"] == result["tokens_trained"]
        assert result["medians"][tool]["train_s"] == pytest.approx(run["train_s"])
    assert result["runs"]["ours"][0]["pairs_trained"] == 8
    assert (out / "pairs.jsonl").read_text().count("\n") == 8
