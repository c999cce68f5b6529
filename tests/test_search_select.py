"""Constrained selection and the Pareto front on hand-made trial results."""

import math

from safedpo_ray.search.select import pareto_front, safest, select_best

S, H = "safety", "helpfulness"


def rows(*points):
    return [{"trial": f"t{i}", S: s, H: h} for i, (s, h) in enumerate(points)]


def test_best_is_most_helpful_above_the_safety_target():
    r = rows((0.95, 0.6), (0.80, 0.9), (0.92, 0.7), (0.99, 0.5))
    # t1 is the most helpful but unsafe (0.80 < 0.9): t2 wins
    assert select_best(r, helpfulness=H, safety=S, threshold=0.9)["trial"] == "t2"
    # a lower target admits t1
    assert select_best(r, helpfulness=H, safety=S, threshold=0.8)["trial"] == "t1"


def test_threshold_is_inclusive():
    r = rows((0.9, 0.7), (0.95, 0.6))
    assert select_best(r, helpfulness=H, safety=S, threshold=0.9)["trial"] == "t0"


def test_ties_on_helpfulness_go_to_the_safer_then_the_earlier_trial():
    r = rows((0.91, 0.7), (0.97, 0.7), (0.97, 0.7))
    assert select_best(r, helpfulness=H, safety=S, threshold=0.9)["trial"] == "t1"


def test_no_feasible_trial():
    r = rows((0.5, 0.9), (0.6, 0.8))
    assert select_best(r, helpfulness=H, safety=S, threshold=0.9) is None
    assert safest(r, safety=S)["trial"] == "t1"


def test_missing_or_nan_metric_is_neither_feasible_nor_on_the_front():
    r = rows((0.95, 0.6), (0.99, 0.99), (0.97, 0.9))
    del r[1][H]  # e.g. a failed trial that reported only its safety
    r[2][S] = math.nan
    assert select_best(r, helpfulness=H, safety=S, threshold=0.9)["trial"] == "t0"
    assert [x["trial"] for x in pareto_front(r, helpfulness=H, safety=S)] == ["t0"]
    assert select_best([{"trial": "x", S: None, H: 1.0}], helpfulness=H, safety=S, threshold=0) is None


def test_pareto_front():
    # t0 (0.9, 0.5) is dominated by t2 (0.95, 0.6); t1, t2, t3 trade safety for helpfulness;
    # t4 duplicates t3 exactly, so neither dominates the other and both stay.
    r = rows((0.9, 0.5), (0.8, 0.9), (0.95, 0.6), (0.99, 0.55), (0.99, 0.55), (0.8, 0.7))
    front = [x["trial"] for x in pareto_front(r, helpfulness=H, safety=S)]
    assert front == ["t1", "t2", "t3", "t4"]  # sorted by safety
    # equal safety, better helpfulness dominates (t5 under t1)
    assert "t5" not in front and "t0" not in front


def test_empty():
    assert select_best([], helpfulness=H, safety=S, threshold=0.5) is None
    assert pareto_front([], helpfulness=H, safety=S) == []
    assert safest([], safety=S) is None
