"""Choosing among finished trials: pure functions of plain rows (dicts), tested without Ray.

A row is one trial: {"trial": id, "status": ..., <params>, <metrics>}. A metric that is missing
or NaN makes a trial neither feasible nor part of the front (it is still listed in the table).
"""

from __future__ import annotations

import math
from typing import Any


def _value(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def select_best(rows: list[dict[str, Any]], *, helpfulness: str, safety: str,
                threshold: float) -> dict[str, Any] | None:
    """The most helpful trial whose safety is >= threshold; ties on helpfulness go to the safer
    trial, then to the earlier row. None when no trial is feasible."""
    best, best_key = None, None
    for i, row in enumerate(rows):
        h, s = _value(row, helpfulness), _value(row, safety)
        if h is None or s is None or s < threshold:
            continue
        key = (h, s, -i)
        if best_key is None or key > best_key:
            best, best_key = row, key
    return best


def pareto_front(rows: list[dict[str, Any]], *, helpfulness: str, safety: str) -> list[dict[str, Any]]:
    """Trials no other trial beats on both safety and helpfulness (at least as good on both and
    better on one), sorted by safety. Trials with identical metrics are all kept."""
    points = [(row, _value(row, safety), _value(row, helpfulness)) for row in rows]
    points = [(r, s, h) for r, s, h in points if s is not None and h is not None]
    front = []
    for row, s, h in points:
        dominated = any(s2 >= s and h2 >= h and (s2 > s or h2 > h) for _, s2, h2 in points)
        if not dominated:
            front.append((s, -h, row))
    return [row for _, _, row in sorted(front, key=lambda t: (t[0], t[1]))]


def safest(rows: list[dict[str, Any]], *, safety: str) -> dict[str, Any] | None:
    """The trial with the highest safety metric (to name when no trial meets the target)."""
    scored = [(v, -i, r) for i, r in enumerate(rows) if (v := _value(r, safety)) is not None]
    return max(scored, key=lambda t: (t[0], t[1]))[2] if scored else None
