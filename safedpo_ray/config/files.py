"""Reading what the user typed: a YAML config file, an override's value, a run name.

    read_config_file("my.yaml")              # {} or a mapping; ConfigError naming the file otherwise
    override_value("train.beta", "0.05")     # 0.05; ConfigError for YAML that cannot be read
    check_run_name("../x")                   # ConfigError: a run name is one directory name

Each problem is one sentence naming the input and what to do (config.ConfigError, exit 2 at the
CLI). YAML is read with the safe loader only: a tag that would build a Python object
(`!!python/object/apply:...`) is refused, never run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from safedpo_ray.errors import ConfigError


def _error(message: str) -> Exception:
    return ConfigError(message)


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in str(exc.problem or ""):
        tag = str(exc.problem).split("tag", 1)[1].strip().strip("'").replace("tag:yaml.org,2002:", "!!")
        return f"the YAML tag {tag}{_where(exc)} is not allowed (config values are plain YAML: numbers, " \
               "strings, lists, mappings)"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"not valid YAML{_where(exc)}: {problem}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} for an empty file)."""
    p = Path(path)
    if not p.exists():
        raise _error(f"config file '{path}' does not exist: give --config an existing YAML file")
    if p.is_dir():
        raise _error(f"config file '{path}' is a directory: give --config a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _error(f"config file '{path}' is not UTF-8 text (byte {exc.start + 1}): give --config a YAML "
                     "file") from None
    except OSError as exc:
        raise _error(f"config file '{path}' cannot be read ({exc.strerror or exc}): check its permissions") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _error(f"config file '{path}': {_yaml_problem(exc)}; fix the file") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise _error(f"{path}: top level must be a mapping")
    return loaded


def override_value(key: str, raw: str) -> Any:
    """The value of `key=raw` on the command line, read as YAML (None for an empty value)."""
    if raw.strip() == "":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise _error(f"override '{key}={raw}': {_yaml_problem(exc)}; quote the value or fix it") from None


def check_run_name(name: str | None) -> None:
    """A run name is one directory name under run.output_dir (or run.storage_path): no path
    separator, not '.' or '..', not absolute, so a run never lands outside its root."""
    if name is None:
        return
    bad = (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or Path(name).is_absolute())
    if bad:
        raise _error(f"'run.name' must be a single directory name (no '/', '\\', '..' or absolute path), got "
                     f"'{name}': the run is written to run.output_dir/run.name; move it with run.output_dir")
