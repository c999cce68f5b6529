"""The safety-aware preference transformation T (pure functions, one row at a time).

A PKU-schema row holds two responses with safety labels and a helpfulness winner
(``better_response_id``).  Let ``w`` be the helpful winner, ``l`` the loser, and
``h(y) = 1`` when ``y`` is unsafe.  SafeDPO's transformation is::

    T(x, w, l) = (x, w, l)   if h(w) = 0             (winner safe: keep)
                 (x, l, w)   if h(w) = 1, h(l) = 0   (winner unsafe, loser safe: swap)
                 discarded   if h(w) = h(l) = 1      (both unsafe: drop)

Modes (:data:`MODES`):

* ``safedpo``    -- T above.
* ``helpful``    -- chosen = response[better_response_id]; every pair kept.
* ``harmless``   -- chosen = response[safer_response_id]; every pair kept.
* ``safebetter`` -- helpful order, only pairs whose helpful winner is safe.

Output pairs are ``{"prompt", "chosen", "rejected", "chosen_unsafe",
"rejected_unsafe"}`` with python bools; a discarded pair is ``None``.
"""

from __future__ import annotations

from safedpo_ray.config.choices import MODES

__all__ = [
    "MODES",
    "OUTCOMES",
    "CATEGORIES",
    "safety_transform",
    "transform_with_outcome",
    "pair_category",
    "pair_type",
]

OUTCOMES: tuple[str, ...] = ("kept", "swapped", "discarded")
CATEGORIES: tuple[str, ...] = ("safe_safe", "safe_unsafe", "unsafe_safe", "unsafe_unsafe")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown transform mode {mode!r}; valid modes: {', '.join(MODES)}")


def _unsafe_flags(row: dict) -> tuple[bool, bool]:
    """(response_0 unsafe, response_1 unsafe) as python bools."""
    return (not bool(row["is_response_0_safe"]), not bool(row["is_response_1_safe"]))


def _pair(row: dict, chosen_id: int) -> dict:
    responses = (row["response_0"], row["response_1"])
    unsafe = _unsafe_flags(row)
    rejected_id = 1 - chosen_id
    return {
        "prompt": row["prompt"],
        "chosen": responses[chosen_id],
        "rejected": responses[rejected_id],
        "chosen_unsafe": unsafe[chosen_id],
        "rejected_unsafe": unsafe[rejected_id],
    }


def transform_with_outcome(row: dict, mode: str = "safedpo") -> tuple[dict | None, str]:
    """Apply the transformation for ``mode``; also report ``kept``/``swapped``/``discarded``.

    ``kept`` means the pair is in helpful order (chosen = helpful winner),
    ``swapped`` means chosen is the helpful loser.
    """
    _check_mode(mode)
    better = int(row["better_response_id"])
    worse = 1 - better
    unsafe = _unsafe_flags(row)
    winner_unsafe, loser_unsafe = unsafe[better], unsafe[worse]

    if mode == "helpful":
        return _pair(row, better), "kept"
    if mode == "harmless":
        safer = int(row["safer_response_id"])
        return _pair(row, safer), ("kept" if safer == better else "swapped")
    if mode == "safebetter":
        if winner_unsafe:
            return None, "discarded"
        return _pair(row, better), "kept"
    # safedpo
    if not winner_unsafe:
        return _pair(row, better), "kept"
    if not loser_unsafe:
        return _pair(row, worse), "swapped"
    return None, "discarded"


def safety_transform(row: dict, mode: str = "safedpo") -> dict | None:
    """The transformed pair for ``mode``, or ``None`` when the pair is discarded."""
    return transform_with_outcome(row, mode)[0]


def pair_type(chosen_unsafe: bool, rejected_unsafe: bool) -> str:
    """Label category of an ordered pair: ``<chosen>_<rejected>`` with safe/unsafe."""
    first = "unsafe" if chosen_unsafe else "safe"
    second = "unsafe" if rejected_unsafe else "safe"
    return f"{first}_{second}"


def pair_category(row: dict) -> str:
    """Label category of a raw PKU row in helpful order (winner first)."""
    better = int(row["better_response_id"])
    unsafe = _unsafe_flags(row)
    return pair_type(unsafe[better], unsafe[1 - better])
