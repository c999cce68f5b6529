"""Every configuration key with a fixed set of values or a range is checked, and a bad value's
message names the key, the value and what is allowed (safedpo_ray/config/rules.py)."""

import dataclasses
import math
import types
import typing

import pytest

from safedpo_ray.config.training import Config, ConfigError, load_config
from safedpo_ray.config.rules import FREE, RULES, Choice, Range, rule_for


def leaf_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def base_type(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


KEYS = dict(leaf_keys(Config))


def test_every_key_has_a_rule_or_is_free_by_design():
    unclassified = sorted(k for k in KEYS if k not in RULES and k not in FREE)
    assert not unclassified, f"new config keys without a rule in rules.RULES (or listed in FREE): {unclassified}"
    assert not [k for k in RULES if k not in KEYS] and not [k for k in FREE if k not in KEYS]
    numeric = [k for k, tp in KEYS.items() if base_type(tp) in (int, float)]
    assert all(k in RULES for k in numeric if k not in ("train.seed",)), "every number has a range"


def bad_values(key):
    rule, tp = rule_for(key), base_type(KEYS[key])
    if isinstance(rule, Choice):
        return [max(rule.values) + 1] if tp is int else ["no-such-choice"]
    values = []
    if rule.lo is not None:
        values.append(rule.lo if rule.lo_open else rule.lo - 1)
    if rule.hi is not None:
        values.append(rule.hi if rule.hi_open else rule.hi + 1)
    if tp is float:
        values.append(math.nan)
    return [tp(v) if not (isinstance(v, float) and math.isnan(v)) else v for v in values]


def yaml_text(value):
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    return str(value)


@pytest.mark.parametrize("key", sorted(RULES))
def test_bad_value_names_key_value_and_what_is_allowed(key):
    rule = rule_for(key)
    for bad in bad_values(key):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={yaml_text(bad)}"])
        message = str(err.value)
        shown = f"'{bad}'" if isinstance(bad, str) else f"{bad}"
        assert f"'{key}'" in message and rule.allowed() in message and message.endswith(f"got {shown}"), message


def test_allowed_values_read_well():
    assert Range(0, lo_open=True).allowed() == "> 0" and Range(1).allowed() == ">= 1"
    assert Range(0, 1, hi_open=True).allowed() == "in [0, 1)" and Range(0, 1).allowed() == "in [0, 1]"
    assert rule_for("data.mode").allowed() == "one of safedpo, helpful, harmless, safebetter"
    assert rule_for("train.loss").allowed().startswith("one of sigmoid, ")


def test_good_values_pass():
    load_config(None, ["train.max_steps=3", "run.max_failures=-1", "train.min_lr_ratio=1.0", "data.max_rows=5",
                       "model.lora.dropout=0.1", "train.log_every=2", "run.cpus_per_worker=0.5"])


def test_type_errors_name_key_value_and_type():
    for override, expected in (("train.beta=abc", "'train.beta' must be a number, got 'abc'"),
                               ("train.epochs=1.5", "'train.epochs' must be an integer, got 1.5"),
                               ("run.use_gpu=yes please", "'run.use_gpu' must be true or false, got 'yes please'")):
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            load_config(None, [override])
