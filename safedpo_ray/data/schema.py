"""Row schemas for safety-preference data and per-row validation.

Two input schemas are supported:

* ``pku`` -- the PKU-SafeRLHF layout::

      prompt, response_0, response_1,
      is_response_0_safe, is_response_1_safe,
      better_response_id, safer_response_id

* ``pairwise`` -- a generic pairwise layout::

      prompt, chosen, rejected, chosen_unsafe, rejected_unsafe

  where ``chosen`` is the more *helpful* response and ``*_unsafe`` are booleans.

Extra columns are allowed in both schemas and are carried along.  Everything here is
pure Python (numpy scalars are accepted when present, but numpy is not required).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

from safedpo_ray.errors import UserError

__all__ = [
    "PKU_FIELDS",
    "PAIRWISE_FIELDS",
    "SCHEMAS",
    "SchemaError",
    "detect_schema",
    "validate_row",
    "to_pku",
    "normalize_pku",
]

PKU_FIELDS: tuple[str, ...] = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "better_response_id",
    "safer_response_id",
)

PAIRWISE_FIELDS: tuple[str, ...] = (
    "prompt",
    "chosen",
    "rejected",
    "chosen_unsafe",
    "rejected_unsafe",
)

SCHEMAS: dict[str, tuple[str, ...]] = {"pku": PKU_FIELDS, "pairwise": PAIRWISE_FIELDS}

# Field roles per schema.
_TEXT_FIELDS = {
    "pku": ("prompt", "response_0", "response_1"),
    "pairwise": ("prompt", "chosen", "rejected"),
}
_LABEL_FIELDS = {
    "pku": ("is_response_0_safe", "is_response_1_safe"),
    "pairwise": ("chosen_unsafe", "rejected_unsafe"),
}
_ID_FIELDS = {
    "pku": ("better_response_id", "safer_response_id"),
    "pairwise": (),
}
_RESPONSE_FIELDS = {
    "pku": ("response_0", "response_1"),
    "pairwise": ("chosen", "rejected"),
}


class SchemaError(UserError):
    """Raised when a table's columns (or a schema name) match no known schema."""


# --------------------------------------------------------------------------- helpers


def _is_missing(value: Any) -> bool:
    """None, float NaN (python or numpy) and pandas' NA/NaT count as missing."""
    if value is None:
        return True
    if type(value).__name__ in ("NAType", "NaTType"):
        return True
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        try:
            return math.isnan(value)
        except (TypeError, ValueError):
            return False
    return False


def _is_bool_like(value: Any) -> bool:
    """python bool or numpy.bool_ (numpy is not imported)."""
    if isinstance(value, bool):
        return True
    t = type(value)
    return t.__module__ == "numpy" and t.__name__ in ("bool_", "bool")


def _is_int_like(value: Any) -> bool:
    """A true integer (python int or numpy integer), never a bool."""
    return isinstance(value, numbers.Integral) and not _is_bool_like(value)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _label_reason(field: str, value: Any) -> str | None:
    if _is_bool_like(value):
        return None
    if _is_int_like(value):
        if int(value) in (0, 1):
            return None
        return f"field '{field}' must be a bool (or 0/1), got {int(value)}"
    return f"field '{field}' must be a bool, got {_describe(value)}"


def _id_reason(field: str, value: Any) -> str | None:
    if _is_int_like(value):
        ivalue = int(value)
    elif (
        isinstance(value, numbers.Real)
        and not _is_bool_like(value)
        and not isinstance(value, numbers.Integral)
        and math.isfinite(float(value))
        and float(value).is_integer()
    ):
        ivalue = int(float(value))
    else:
        return f"field '{field}' must be an integer 0 or 1, got {_describe(value)}"
    if ivalue not in (0, 1):
        return f"field '{field}' must be 0 or 1, got {ivalue}"
    return None


def _schema_fields(schema: str) -> tuple[str, ...]:
    try:
        return SCHEMAS[schema]
    except KeyError:
        raise SchemaError(
            f"unknown schema {schema!r}; expected one of {sorted(SCHEMAS)}"
        ) from None


# --------------------------------------------------------------------------- API


def detect_schema(columns: Iterable[str]) -> str:
    """Return ``"pku"`` or ``"pairwise"`` for a set of column names.

    PKU wins when a table carries both sets of columns.  When neither matches, a
    :class:`SchemaError` names the columns missing for the closest schema.
    """
    cols = set(columns)
    missing = {name: [f for f in fields if f not in cols] for name, fields in SCHEMAS.items()}
    for name in ("pku", "pairwise"):
        if not missing[name]:
            return name
    # Closest: fewest missing columns, then the larger share present; ties -> pku.
    def score(name: str) -> tuple[int, float]:
        fields = SCHEMAS[name]
        return (len(missing[name]), len(missing[name]) / len(fields))

    closest = min(("pku", "pairwise"), key=score)
    found = ", ".join(sorted(cols)) if cols else "(none)"
    raise SchemaError(
        f"columns match no known schema; closest is {closest!r}, missing columns: "
        f"{', '.join(repr(f) for f in missing[closest])} (found columns: {found})"
    )


def validate_row(row: dict, schema: str) -> list[str]:
    """Return every reason why ``row`` is not a valid ``schema`` row (empty = valid)."""
    _schema_fields(schema)
    reasons: list[str] = []

    def present(field: str) -> bool:
        value = row.get(field)
        if _is_missing(value) and value is not None and type(value).__name__ not in ("NAType", "NaTType"):
            reasons.append(f"field '{field}' is NaN (not a number), not a value")  # JSON's NaN: present, not missing
            return False
        if field not in row or _is_missing(row[field]):
            reasons.append(f"missing field '{field}'")
            return False
        return True

    for field in _TEXT_FIELDS[schema]:
        if not present(field):
            continue
        value = row[field]
        if not isinstance(value, str):
            reasons.append(f"field '{field}' must be a string, got {_describe(value)}")
        elif not value.strip():
            reasons.append(f"field '{field}' is empty")

    for field in _LABEL_FIELDS[schema]:
        if present(field):
            reason = _label_reason(field, row[field])
            if reason:
                reasons.append(reason)

    for field in _ID_FIELDS[schema]:
        if present(field):
            reason = _id_reason(field, row[field])
            if reason:
                reasons.append(reason)

    a_field, b_field = _RESPONSE_FIELDS[schema]
    a, b = row.get(a_field), row.get(b_field)
    if isinstance(a, str) and isinstance(b, str) and a.strip() and a.strip() == b.strip():
        reasons.append("responses are identical")
    return reasons


def normalize_pku(row: dict) -> dict:
    """Copy of a valid PKU row with python ``bool`` labels and python ``int`` ids."""
    out = dict(row)
    for field in _LABEL_FIELDS["pku"]:
        out[field] = bool(row[field])
    for field in _ID_FIELDS["pku"]:
        value = row[field]
        out[field] = int(float(value)) if not _is_int_like(value) else int(value)
    return out


def to_pku(row: dict, schema: str | None = None) -> dict:
    """Convert a valid row to PKU form.

    PKU rows are returned unchanged (shallow copy).  Pairwise rows become
    ``response_0 = chosen`` (the helpful winner, so ``better_response_id = 0``),
    ``response_1 = rejected``; ``safer_response_id`` is 1 only when the chosen
    response is unsafe and the rejected one is safe.  Extra columns are kept; the
    pairwise columns themselves are dropped.  ``schema`` defaults to detection
    from the row's keys.
    """
    if schema is None:
        schema = detect_schema(row.keys())
    _schema_fields(schema)
    if schema == "pku":
        return dict(row)
    chosen_unsafe = bool(row["chosen_unsafe"])
    rejected_unsafe = bool(row["rejected_unsafe"])
    out: dict = {
        "prompt": row["prompt"],
        "response_0": row["chosen"],
        "response_1": row["rejected"],
        "is_response_0_safe": not chosen_unsafe,
        "is_response_1_safe": not rejected_unsafe,
        "better_response_id": 0,
        "safer_response_id": 1 if (chosen_unsafe and not rejected_unsafe) else 0,
    }
    for key, value in row.items():
        if key not in PAIRWISE_FIELDS and key not in out:
            out[key] = value
    return out
