"""What a training command prints at its end: the data statistics, held-out metrics before and
after, where the model is, or how to continue a stopped run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def format_run_summary(title: str, stats: str, summary: dict[str, Any], heading: str,
                       metrics: tuple[tuple[str, str], ...], model_hint: str = "") -> str:
    """`heading`: the line above the held-out metrics, with its before/after columns; `metrics`:
    (label, key) of the metrics shown before and after training."""
    lines = ["", f"== {title} ==", stats]
    before, after = summary.get("eval_before", {}), summary.get("eval_after")
    if after is not None:
        lines.append(heading)
        for label, key in metrics:
            if key in after:
                lines.append(f"  {label:<48} {before.get(key, float('nan')):>8.3f} {after[key]:>8.3f}")
        lines.append(f"model: {summary.get('model_dir')}{model_hint}")
    else:
        lines.append(f"stopped at step {summary.get('last_step')}; continue with run.resume=true "
                     f"run.name={Path(summary['run_dir'].split('?')[0]).name}")
    lines.append(f"run directory: {summary['run_dir']} ({summary['wall_time_s']} s)")
    return "\n".join(lines)
