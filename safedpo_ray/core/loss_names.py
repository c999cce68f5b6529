"""The names of the preference losses (`train.loss`), without torch: a config is checked against
them before anything imports torch (a command's first seconds). The functions are in loss.py,
whose `LOSSES` has exactly these keys (tests/test_losses.py)."""

from __future__ import annotations

LOSS_NAMES = ("sigmoid", "ipo", "robust", "hinge", "simpo")
REFERENCE_FREE = frozenset({"simpo"})
"""Losses that never look at a reference model (no reference copy, pass or cache)."""


def uses_reference(loss: str) -> bool:
    return loss not in REFERENCE_FREE
