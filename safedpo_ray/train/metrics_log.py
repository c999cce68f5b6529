"""Where metrics go on rank 0: a console progress line, metrics.jsonl, TensorBoard, MLflow."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, *, total_steps: int, tensorboard: bool = False,
                 mlflow_tracking_uri: str | None = None, run_name: str = "safedpo"):
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self._file = self.path.open("a")
        self._tb = None
        self._mlflow = None
        self._start = time.time()
        self._first_step: int | None = None
        self._first_time = self._start
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if mlflow_tracking_uri:
            try:
                import mlflow
            except ImportError as exc:  # a clear error beats a silent lack of logs
                raise RuntimeError("run.mlflow_tracking_uri is set but mlflow is not installed: "
                                   "pip install 'safedpo-ray[mlflow]'") from exc
            mlflow.set_tracking_uri(mlflow_tracking_uri)
            mlflow.start_run(run_name=run_name)
            self._mlflow = mlflow

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time() - self._start, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in numeric.items()}, step=step)

    def progress(self, step: int, m: dict[str, Any]) -> None:
        """One console line: loss, accuracy (and safe-over-unsafe accuracy on mixed pairs), margin,
        learning rate, throughput, and the time left at this attempt's pace so far."""
        now = time.time()
        if self._first_step is None:  # the pace is measured from the first step this attempt logged
            self._first_step, self._first_time = step, now - float(m.get("step_time_s", 0.0))
        done = step - self._first_step + 1
        per_step = (now - self._first_time) / max(done, 1)
        mixed = m.get("rewards/accuracies/safe_unsafe")
        line = (
            f"[safedpo] step {step}/{self.total_steps} epoch {m.get('epoch', 0)} "
            f"loss {m['loss']:.4f} acc {m['rewards/accuracies']:.3f}"
            + (f" (safe>unsafe {mixed:.3f})" if mixed is not None else "")
            + f" margin {m['rewards/margins']:+.3f} lr {m['lr']:.2e} "
            f"{m['tokens_per_s']:.0f} tok/s {m['step_time_s']:.2f} s/step "
            f"elapsed {_duration(now - self._start)} ETA {_duration(per_step * (self.total_steps - step))}"
        )
        print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run()


def _duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
