"""The one configuration loader: a dataclass from defaults ← YAML file ← flags ← `a.b=value`.

    cfg = load(EvalConfig, "eval.yaml", ["generation.seed=3"])

Every command's configuration (config/training.py, config/evaluation.py, search/space.py, verify)
is built here: unknown keys and values of the wrong type are errors that name the key, a config
file is read safely (config/files.py), and no value may be a secret (runtime/secret_guard.py).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from safedpo_ray.config.files import override_value, read_config_file
from safedpo_ray.errors import ConfigError
from safedpo_ray.runtime.secret_guard import check_config_tree

T = TypeVar("T")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return build(tp, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping (e.g. {{name: 1}}), got {value!r}")
        return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise ConfigError(f"'{key}': unsupported type {tp}")


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys under "
            f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(names))})"
        )
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def set_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value (e.g. train.beta=0.1)")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")

    node[parts[-1]] = override_value(key.strip(), raw)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_tree(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None, *, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The nested dict a config is built from: `base` (e.g. a command's own defaults) ← YAML file
    ← `extra` (e.g. CLI flags) ← overrides."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        tree = merge(tree, read_config_file(path))  # one sentence for a missing, unsafe or broken file
    tree = merge(tree, extra or {})
    for override in overrides or []:
        set_override(tree, override)
    check_config_tree(tree, ConfigError)  # secrets come from the environment, never from a config
    return tree


def overrides_tree(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "a.c=x"]` as the nested dict `{"a": {"b": 1, "c": "x"}}`."""
    tree: dict[str, Any] = {}
    for override in overrides:
        set_override(tree, override)
    return tree


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         extra: dict[str, Any] | None = None, *, base: dict[str, Any] | None = None) -> T:
    """`cls` built from `config_tree(...)`; the caller runs its command's cross-key checks."""
    return build(cls, config_tree(path, overrides, extra, base=base))
