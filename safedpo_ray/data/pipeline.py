"""Small in-memory datasets (SFT examples, scorer pairs, evaluation pairs): read both splits,
validate with quarantine. Training pairs stream instead (data/stream.py, data/prepared.py); both
paths read through data/files.py and check rows with data/schema.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safedpo_ray.config.training import DataConfig
from safedpo_ray.data.schema import PKU_FIELDS, SchemaError, detect_schema, to_pku, validate_row
from safedpo_ray.data.sources import SYNTHETIC, is_hub_id, prompt_in_eval, read_rows
from safedpo_ray.data.stream import DataError  # noqa: F401  (re-exported)


@dataclass
class ValidatedRows:
    rows: list[dict[str, Any]]
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    rows_read: int = 0


def read_splits(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Training rows and held-out rows, as the config asks."""
    rows = read_rows(cfg.source, split=cfg.split, max_rows=cfg.max_rows,
                     synthetic_prompts=cfg.synthetic_prompts, seed=seed, subset=cfg.subset)
    if cfg.source == SYNTHETIC and not cfg.eval_source:
        return rows, read_rows(SYNTHETIC, split="eval", synthetic_prompts=cfg.synthetic_eval_prompts, seed=seed)
    if cfg.eval_source:
        return rows, read_rows(cfg.eval_source, split=cfg.eval_split or cfg.split)
    if cfg.eval_split and is_hub_id(cfg.source):
        return rows, read_rows(cfg.source, split=cfg.eval_split, subset=cfg.subset)
    train = [r for r in rows if not prompt_in_eval(r.get("prompt"), cfg.eval_fraction)]
    held = [r for r in rows if prompt_in_eval(r.get("prompt"), cfg.eval_fraction)]
    return train, held


def validate_rows(rows: list[dict[str, Any]], schema: str = "auto", *, strict: bool = False,
                  split: str = "train") -> ValidatedRows:
    """Valid rows in PKU form (with `pair_id` = row number); bad rows with their reasons."""
    if not rows:
        return ValidatedRows(rows=[])
    if schema == "auto":
        columns = set().union(*(r.keys() for r in rows if "__invalid__" not in r)) if rows else set()
        try:
            schema = detect_schema(columns)
        except SchemaError as exc:
            raise DataError(f"{split} data: {exc}") from exc
    out = ValidatedRows(rows=[], rows_read=len(rows))
    for row in rows:
        number = row.get("row_number")
        reasons = [row["__invalid__"]] if "__invalid__" in row else validate_row(row, schema)
        if reasons:
            if strict:
                raise DataError(f"{split} data, row {number}: {'; '.join(reasons)}")
            out.quarantined.append({"split": split, "row_number": number, "reasons": reasons, "row": row})
            continue
        pku = to_pku({k: v for k, v in row.items() if k != "row_number"}, schema)
        # Extra source columns travel as one JSON string: their types vary between sources and
        # rows, which Arrow blocks cannot hold as columns.
        extra = {k: v for k, v in pku.items() if k not in PKU_FIELDS}
        out.rows.append({**{k: pku[k] for k in PKU_FIELDS}, "pair_id": number,
                         "extra": json.dumps(extra, default=str)})
    return out


def write_quarantine(path: Path, quarantined: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for q in quarantined:
            f.write(json.dumps(q, default=str) + "\n")


def format_stats(stats: dict[str, Any]) -> str:
    """The T statistics and counts as a few readable lines."""
    lines = []
    for split, s in stats.items():
        lines.append(f"{split}: {s['rows_read']} rows read, {s['rows_quarantined']} quarantined, "
                     f"{s['pairs']} pairs after T ({s['mode']})")
        if s.get("rows_duplicate"):  # kept (or quarantined with data.drop_duplicates): said either way
            lines.append(f"  duplicates: {s['rows_duplicate']} rows repeat an earlier row of the split (trained "
                         "again, unless data.drop_duplicates=true quarantines them)")
        for cat in ("safe_safe", "safe_unsafe", "unsafe_safe", "unsafe_unsafe"):
            counts = s["transform"].get(cat)
            if counts:
                detail = ", ".join(f"{k} {counts.get(k, 0)}" for k in ("kept", "swapped", "discarded") if counts.get(k))
                lines.append(f"  {cat:<14} {detail}")
        t = s["truncated"]
        lines.append(f"  truncated: prompt {t['prompt']}, chosen {t['chosen']}, rejected {t['rejected']}")
    return "\n".join(lines)
