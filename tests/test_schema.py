"""Tests for row schemas, validation and pairwise -> PKU conversion."""

import math

import numpy as np
import pytest

from safedpo_ray.data.schema import (
    PAIRWISE_FIELDS,
    PKU_FIELDS,
    SchemaError,
    detect_schema,
    normalize_pku,
    to_pku,
    validate_row,
)
from safedpo_ray.data.transform import safety_transform, transform_with_outcome


def pku_row(**overrides):
    row = {
        "prompt": "How do I bake bread?",
        "response_0": "Mix flour and water, knead, let it rise, then bake.",
        "response_1": "I'm sorry, I can't help with that.",
        "is_response_0_safe": True,
        "is_response_1_safe": True,
        "better_response_id": 0,
        "safer_response_id": 0,
    }
    row.update(overrides)
    return row


def pairwise_row(**overrides):
    row = {
        "prompt": "How can I break into a car?",
        "chosen": "First get a slim tool, then ...",
        "rejected": "I can't help with that; it is illegal. Call a locksmith.",
        "chosen_unsafe": True,
        "rejected_unsafe": False,
    }
    row.update(overrides)
    return row


# --------------------------------------------------------------------- fields/detect


def test_field_tuples():
    assert PKU_FIELDS == (
        "prompt", "response_0", "response_1", "is_response_0_safe",
        "is_response_1_safe", "better_response_id", "safer_response_id",
    )
    assert PAIRWISE_FIELDS == ("prompt", "chosen", "rejected", "chosen_unsafe", "rejected_unsafe")


def test_detect_schema():
    assert detect_schema(PKU_FIELDS) == "pku"
    assert detect_schema(list(PKU_FIELDS) + ["category", "extra"]) == "pku"
    assert detect_schema(iter(PAIRWISE_FIELDS)) == "pairwise"
    assert detect_schema(set(PAIRWISE_FIELDS) | {"source"}) == "pairwise"


def test_detect_schema_error_names_missing_columns_of_closest():
    cols = [f for f in PKU_FIELDS if f != "safer_response_id"]
    with pytest.raises(SchemaError) as err:
        detect_schema(cols)
    assert isinstance(err.value, ValueError)
    assert "pku" in str(err.value) and "safer_response_id" in str(err.value)

    with pytest.raises(SchemaError) as err:
        detect_schema(["prompt", "chosen", "rejected", "chosen_unsafe"])
    msg = str(err.value)
    assert "pairwise" in msg and "rejected_unsafe" in msg and "response_0" not in msg

    with pytest.raises(SchemaError):
        detect_schema([])


# --------------------------------------------------------------------- validation


def test_valid_rows():
    assert validate_row(pku_row(), "pku") == []
    assert validate_row(pku_row(extra="kept"), "pku") == []
    assert validate_row(pairwise_row(), "pairwise") == []


def test_unknown_schema_name():
    with pytest.raises(SchemaError):
        validate_row(pku_row(), "nope")


@pytest.mark.parametrize("field", PKU_FIELDS)
def test_missing_field_absent(field):
    row = pku_row()
    del row[field]
    assert validate_row(row, "pku") == [f"missing field '{field}'"]


@pytest.mark.parametrize("value", [None, float("nan"), np.float64("nan"), np.float32("nan")])
def test_missing_field_none_or_nan(value):
    """None is a missing field; NaN is a value that is not a number, and says so (issue 25)."""
    def expected(field):
        return f"missing field '{field}'" if value is None else f"field '{field}' is NaN (not a number), not a value"

    assert validate_row(pku_row(response_1=value), "pku") == [expected("response_1")]
    assert validate_row(pku_row(better_response_id=value), "pku") == [expected("better_response_id")]


@pytest.mark.parametrize("field", ["prompt", "response_0", "response_1"])
@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_text(field, value):
    reasons = validate_row(pku_row(**{field: value}), "pku")
    assert reasons == [f"field '{field}' is empty"]


def test_text_must_be_str():
    reasons = validate_row(pku_row(prompt=123), "pku")
    assert len(reasons) == 1
    assert "field 'prompt' must be a string" in reasons[0]
    reasons = validate_row(pairwise_row(chosen=["a"]), "pairwise")
    assert len(reasons) == 1 and "field 'chosen'" in reasons[0]


def test_np_str_text_ok():
    assert validate_row(pku_row(prompt=np.str_("hi there")), "pku") == []


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.bool_(False), 0, 1, np.int64(1)])
def test_label_accepts_bool_and_01(value):
    assert validate_row(pku_row(is_response_0_safe=value), "pku") == []
    assert validate_row(pairwise_row(chosen_unsafe=value), "pairwise") == []


@pytest.mark.parametrize("value", ["true", "True", "1", "0", "safe", 0.5, [True]])
def test_label_rejects_strings_and_others(value):
    reasons = validate_row(pku_row(is_response_1_safe=value), "pku")
    assert len(reasons) == 1
    assert reasons[0].startswith("field 'is_response_1_safe' must be a bool")


def test_label_int_out_of_range():
    reasons = validate_row(pku_row(is_response_0_safe=2), "pku")
    assert reasons == ["field 'is_response_0_safe' must be a bool (or 0/1), got 2"]


@pytest.mark.parametrize("value", [0, 1, np.int64(1), np.int32(0), 1.0, 0.0, np.float64(1.0)])
def test_id_accepts_ints_and_integral_floats(value):
    assert validate_row(pku_row(safer_response_id=value), "pku") == []


@pytest.mark.parametrize("value", [2, -1, 2.0, np.int64(3)])
def test_id_out_of_range(value):
    reasons = validate_row(pku_row(better_response_id=value), "pku")
    assert reasons == [f"field 'better_response_id' must be 0 or 1, got {int(value)}"]


@pytest.mark.parametrize("value", [True, False, np.bool_(True), "1", "0", 0.5, float("inf")])
def test_id_rejects_bools_strings_fractions(value):
    reasons = validate_row(pku_row(better_response_id=value), "pku")
    assert len(reasons) == 1
    assert reasons[0].startswith("field 'better_response_id' must be an integer 0 or 1, got")


def test_identical_responses():
    assert validate_row(pku_row(response_1="Same text"), "pku") == []
    row = pku_row(response_0="Same text", response_1="  Same text \n")
    assert validate_row(row, "pku") == ["responses are identical"]
    assert validate_row(pairwise_row(chosen="x y", rejected="x y"), "pairwise") == [
        "responses are identical"
    ]


def test_multiple_reasons_collected():
    row = pku_row(prompt="  ", better_response_id=2, is_response_1_safe="yes")
    del row["response_1"]
    reasons = validate_row(row, "pku")
    assert len(reasons) == 4
    assert "field 'prompt' is empty" in reasons
    assert "missing field 'response_1'" in reasons
    assert "field 'better_response_id' must be 0 or 1, got 2" in reasons
    assert any(r.startswith("field 'is_response_1_safe' must be a bool") for r in reasons)


def test_pairwise_missing_and_bad():
    row = pairwise_row(rejected=None, rejected_unsafe="no")
    del row["chosen_unsafe"]
    reasons = validate_row(row, "pairwise")
    assert "missing field 'rejected'" in reasons
    assert "missing field 'chosen_unsafe'" in reasons
    assert any(r.startswith("field 'rejected_unsafe' must be a bool") for r in reasons)
    assert len(reasons) == 3


# --------------------------------------------------------------------- conversion


def test_normalize_pku():
    row = pku_row(
        is_response_0_safe=np.bool_(False), is_response_1_safe=1,
        better_response_id=1.0, safer_response_id=np.int64(1), extra="x",
    )
    out = normalize_pku(row)
    assert out["is_response_0_safe"] is False and out["is_response_1_safe"] is True
    assert type(out["better_response_id"]) is int and out["better_response_id"] == 1
    assert type(out["safer_response_id"]) is int and out["safer_response_id"] == 1
    assert out["extra"] == "x"
    assert row["better_response_id"] == 1.0 and isinstance(row["better_response_id"], float)


def test_to_pku_passes_pku_rows_through_as_copy():
    row = pku_row(extra=1)
    out = to_pku(row)
    assert out == row and out is not row
    assert to_pku(row, "pku") == row


@pytest.mark.parametrize(
    "chosen_unsafe,rejected_unsafe,safer",
    [(False, False, 0), (False, True, 0), (True, False, 1), (True, True, 0)],
)
def test_to_pku_pairwise(chosen_unsafe, rejected_unsafe, safer):
    row = pairwise_row(chosen_unsafe=chosen_unsafe, rejected_unsafe=rejected_unsafe, source="s")
    out = to_pku(row)
    assert out == {
        "prompt": row["prompt"],
        "response_0": row["chosen"],
        "response_1": row["rejected"],
        "is_response_0_safe": not chosen_unsafe,
        "is_response_1_safe": not rejected_unsafe,
        "better_response_id": 0,
        "safer_response_id": safer,
        "source": "s",
    }
    assert validate_row(out, "pku") == []


def test_to_pku_normalizes_numpy_and_int_labels():
    out = to_pku(pairwise_row(chosen_unsafe=np.bool_(True), rejected_unsafe=0), "pairwise")
    assert out["is_response_0_safe"] is False and out["is_response_1_safe"] is True
    assert type(out["better_response_id"]) is int and type(out["safer_response_id"]) is int


def test_pairwise_round_trip_through_transform():
    # winner unsafe, loser safe -> SafeDPO swaps so the safe refusal is chosen
    row = pairwise_row()
    pair, outcome = transform_with_outcome(to_pku(row), "safedpo")
    assert outcome == "swapped"
    assert pair == {
        "prompt": row["prompt"],
        "chosen": row["rejected"],
        "rejected": row["chosen"],
        "chosen_unsafe": False,
        "rejected_unsafe": True,
    }
    # helpful mode restores the original pairwise row
    back = safety_transform(to_pku(row), "helpful")
    assert back == {k: row[k] for k in PAIRWISE_FIELDS}
    # winner safe -> kept; both unsafe -> discarded
    kept = pairwise_row(chosen_unsafe=False, rejected_unsafe=True)
    assert transform_with_outcome(to_pku(kept), "safedpo")[1] == "kept"
    both = pairwise_row(chosen_unsafe=True, rejected_unsafe=True)
    assert safety_transform(to_pku(both), "safedpo") is None
    # harmless picks the safe one too
    assert safety_transform(to_pku(row), "harmless")["chosen"] == row["rejected"]


def test_nan_not_confused_with_valid_float():
    assert math.isnan(float("nan"))
    assert validate_row(pku_row(safer_response_id=float("nan")), "pku") == [
        "field 'safer_response_id' is NaN (not a number), not a value"
    ]
