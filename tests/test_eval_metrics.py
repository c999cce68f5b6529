"""The paper's arithmetic (normalised helpfulness, win rates, harmless ratio), bootstrap intervals,
counts, and what results.md / results.json report. Pure Python, no models."""

import json
import math
from pathlib import Path

import pytest

from safedpo_ray.evaluate.metrics import (
    bootstrap_ci,
    counts,
    harmless_ratio,
    normalized_helpfulness,
    score_summary,
    win_outcomes,
)

pytestmark = pytest.mark.timeout(60)


def test_normalized_helpfulness_by_hand():
    """Anchors: SFT mean reward (1 + 3)/2 = 2 → 0, DPO-HELPFUL (5 + 7)/2 = 6 → 10.
    A model with mean (4 + 4)/2 = 4 → 10·(4 − 2)/(6 − 2) = 5; one with 0 → 10·(0 − 2)/4 = −5.
    Prompt "c" is missing from an anchor, so it does not count."""
    sft, helpful = {"a": 1.0, "b": 3.0}, {"a": 5.0, "b": 7.0, "c": 100.0}
    assert normalized_helpfulness({"a": 4.0, "b": 4.0, "c": -50.0}, sft, helpful) == {
        "helpfulness": 5.0, "helpfulness_prompts": 2}
    assert normalized_helpfulness({"a": 0.0, "b": 0.0}, sft, helpful)["helpfulness"] == -5.0
    assert normalized_helpfulness(sft, sft, helpful)["helpfulness"] == 0.0
    assert normalized_helpfulness(helpful, sft, helpful)["helpfulness"] == 10.0
    with pytest.raises(ValueError, match="same mean reward"):
        normalized_helpfulness(sft, sft, sft)
    assert math.isnan(normalized_helpfulness({"z": 1.0}, sft, helpful)["helpfulness"])


def test_bootstrap_interval():
    assert bootstrap_ci([1.0] * 50) == [1.0, 1.0]
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    data = [1.0] * 200 + [0.0] * 200  # p = 0.5, n = 400: normal approximation ±1.96·sqrt(.25/400) = ±0.049
    low, high = bootstrap_ci(data, samples=2000, seed=1)
    assert low == pytest.approx(0.451, abs=0.01) and high == pytest.approx(0.549, abs=0.01)
    assert bootstrap_ci(data, seed=3) == bootstrap_ci(data, seed=3)  # seeded: same data, same interval
    narrow = bootstrap_ci(data, level=0.5, seed=3)
    wide = bootstrap_ci(data, level=0.95, seed=3)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    assert bootstrap_ci([0.0, 1.0, math.nan] * 10)[1] <= 1.0  # NaN dropped


def test_score_summary_with_intervals_and_baseline():
    rows = [{"prompt": str(i), "cost": -1.0 if i % 4 else 2.0, "reward": float(i)} for i in range(40)]
    base = {str(i): 20.0 for i in range(40)}
    s = score_summary(rows, base, ci={"samples": 500, "level": 0.95, "seed": 0})
    assert s["harmless_ratio"] == 0.75 and s["harmless_ratio_ci"][0] < 0.75 < s["harmless_ratio_ci"][1]
    assert (s["wins"], s["ties"], s["losses"]) == (19, 1, 20) and s["win_rate"] == pytest.approx(19.5 / 40)
    assert s["win_rate_ci"][0] < s["win_rate"] < s["win_rate_ci"][1]
    assert win_outcomes([1.0, 1.0, 0.0, math.nan], [0.0, 1.0, 1.0, 0.0]) == [1.0, 0.5, 0.0]
    assert harmless_ratio([0.0, 1e-9]) == 0.5


def test_counts():
    rows = [{"response": "ok", "truncated": True, "cost": 1.0, "reward": 0.0},
            {"response": "", "truncated": False, "cost": math.nan, "reward": 1.0},
            {"response": "fine", "truncated": False, "cost": -1.0, "reward": None}]
    assert counts(4, rows, need_cost=True, need_reward=False) == {
        "prompts": 4, "responses": 3, "truncated": 1, "empty": 1, "failed": 1 + 1}
    assert counts(3, rows, need_cost=True, need_reward=True)["failed"] == 2


def test_reports_carry_intervals_counts_and_decoding(tmp_path):
    from safedpo_ray.evaluate.report import write_reports

    results = {
        "name": "paper", "baseline": "sft",
        "decoding": {"engine": "vllm", "max_new_tokens": 512, "do_sample": False, "max_prompt_length": 512},
        "scoring": {"anchor_zero": "sft", "anchor_ten": "dpo-helpful", "interval": "95% percentile bootstrap"},
        "models": {
            "sft": {"scores": {"harmless_ratio": 0.5, "harmless_ratio_ci": [0.45, 0.55], "win_rate": 0.5,
                               "win_rate_ci": [0.5, 0.5], "helpfulness": 0.0, "mean_reward": 1.0},
                    "counts": {"prompts": 10, "responses": 10, "truncated": 2, "empty": 0, "failed": 0}},
            "safedpo": {"scores": {"harmless_ratio": 0.96875, "harmless_ratio_ci": [0.9, 1.0], "win_rate": 0.61,
                                   "win_rate_ci": [0.55, 0.67], "helpfulness": 7.25, "mean_reward": 2.5},
                        "judge_pairwise": {"baseline": "sft", "helpful_win_rate": 0.7,
                                           "helpful_win_rate_ci": [0.6, 0.8], "harmless_win_rate": 0.9},
                        "counts": {"prompts": 10, "responses": 10, "truncated": 0, "empty": 1, "failed": 1}}}}
    files = write_reports(results, tmp_path)
    md = Path(files["markdown"]).read_text()
    assert "| safedpo | 0.969 | [0.900, 1.000] | 7.250 |" in md
    assert "| sft | 10 | 10 | 2 | 0 | 0 |" in md and "| safedpo | 10 | 10 | 0 | 1 | 1 |" in md
    assert "- max_new_tokens: 512" in md and "- anchor_ten: dpo-helpful" in md
    assert "judge: more helpful" in md and "[0.600, 0.800]" in md
    data = json.loads(Path(files["json"]).read_text())
    assert data["models"]["safedpo"]["scores"]["win_rate_ci"] == [0.55, 0.67]
    assert data["decoding"]["max_new_tokens"] == 512
    from safedpo_ray.evaluate.report import tradeoff_points

    points, axis = tradeoff_points(results["models"])
    assert "normalised" in axis and ("safedpo", 7.25, 0.96875) in points
