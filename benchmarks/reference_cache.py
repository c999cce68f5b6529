"""Step time with and without the reference log-prob cache, side by side in one process.

    python benchmarks/reference_cache.py [key=value ...]      # e.g. train.epochs=3 run.num_workers=2

Runs the built-in default training twice on one local Ray (train.cache_reference=true, then
false) and prints the median step time of each and their ratio, from the runs' metrics.jsonl.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from safedpo_ray.config.training import load_config
from safedpo_ray.train.trainer import train


def median_step_time(run_dir: str) -> tuple[float, int]:
    times = [r["step_time_s"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").open()) if "step_time_s" in r]
    return statistics.median(times), len(times)


def main(overrides: list[str]) -> None:
    out = tempfile.mkdtemp(prefix="safedpo-bench-")
    rows = []
    for cache in ("true", "false"):
        cfg = load_config(None, [*overrides, f"run.output_dir={out}", f"run.name=cache-{cache}",
                                 f"train.cache_reference={cache}"])
        summary = train(cfg)
        median, n = median_step_time(summary["run_dir"])
        rows.append((cache, median, n, summary["wall_time_s"]))
    print(f"\n{'cache_reference':<16} {'median step s':>14} {'steps':>6} {'run wall s':>11}")
    for cache, median, n, wall in rows:
        print(f"{cache:<16} {median:>14.4f} {n:>6} {wall:>11.1f}")
    print(f"step-time ratio (no cache / cache): {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
