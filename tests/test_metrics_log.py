import json
import sys
import types

from safedpo_ray.core.algorithm import MetricSums
from safedpo_ray.train.metrics_log import MetricsLog
import torch


def test_jsonl_console_and_mlflow(tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("uri", uri)),
        start_run=lambda run_name: calls.append(("start", run_name)),
        log_metrics=lambda m, step: calls.append(("log", m, step)),
        end_run=lambda: calls.append(("end",)),
    )
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    log = MetricsLog(tmp_path, total_steps=10, mlflow_tracking_uri="file:///x", run_name="r")
    m = {"loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.1, "lr": 1e-4,
         "tokens_per_s": 100.0, "step_time_s": 0.2, "epoch": 0}
    log.log(3, m)
    log.progress(3, m)
    log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["step"] == 3 and rec["loss"] == 0.5
    assert "step 3/10" in capsys.readouterr().out
    assert calls[0] == ("uri", "file:///x") and calls[-1] == ("end",)
    assert calls[2][1]["rewards_accuracies"] == 0.75 and calls[2][2] == 3


def test_metric_sums_split_by_pair_type():
    sums = MetricSums()
    per = {k: torch.tensor([1.0, 2.0, 4.0]) for k in
           ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")}
    sums.add(per, torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
    d = sums.as_dict()
    assert d["loss"] == 7 / 3 and d["loss/safe_safe"] == 1.0 and d["loss/safe_unsafe"] == 3.0
    assert d["pairs/safe_unsafe"] == 2 and "loss/unsafe_safe" not in d
