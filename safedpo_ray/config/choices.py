"""The choice lists that the configuration checks and the data side share."""

from __future__ import annotations

MODES: tuple[str, ...] = ("safedpo", "helpful", "harmless", "safebetter")
"""`data.mode`: the transformation T of SafeDPO, or one of the paper's baselines (data/transform.py)."""

SFT_RESPONSES: tuple[str, ...] = ("helpful_safe", "all_safe")
"""`sft.responses`: which responses SFT trains on (data/sft.py)."""
