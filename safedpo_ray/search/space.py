"""Search spaces: what a `safedpo-ray tune` experiment varies, and how it chooses.

A space is a YAML file (shipped ones: `tune/` at the repository root, the same files inside the
package under `safedpo_ray/search/spaces/`):
    search: grid                      # grid | random | optuna
    params:                           # any key of the training config
      train.delta: {grid: [0, 2, 5, 10, 20]}
      train.beta: {grid: [0.05, 0.1]}
      train.learning_rate: {loguniform: [1e-6, 1e-4]}
    safety_threshold: 0.9

Parameter kinds: `grid` (every value), `choice` (one of the values), `uniform`, `loguniform`
([low, high]) and `randint` ([low, high), integers). Every other key is a field of `SearchSpec`;
`tune.KEY=VALUE` on the command line overrides them. Keys that do not exist, values of the wrong
type and kinds a search algorithm cannot use are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safedpo_ray.config.loader import build, set_override
from safedpo_ray.config.training import (
    Config,
    ConfigError,
    check_config,
    config_from_dict,
    load_config,
)

SPACES_DIR = Path(__file__).parent / "spaces"
DEFAULT_SPACE = "quick"
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
IMPLICIT_SAFETY = "eval/rewards/accuracies/safe_unsafe"
IMPLICIT_HELPFULNESS = "eval/rewards/accuracies/safe_safe"
SCORED_SAFETY = "score/harmless_ratio"
SCORED_HELPFULNESS = "score/mean_reward"


@dataclass
class TrialScoring:
    cost_model: str | None = None
    """Cost model for the end-of-trial harmless ratio (cost <= 0 is harmless); unset: implicit metrics only."""
    reward_model: str | None = None
    """Reward model for the end-of-trial helpfulness (mean reward of the generated responses)."""
    prompts: str | None = None
    """Prompts to generate from (.jsonl/.json/.csv/.parquet with a 'prompt' column); default: the held-out prompts."""
    max_prompts: int = 64
    """Generate for at most this many prompts per trial."""
    max_new_tokens: int = 128
    """Longest generated response, in tokens."""
    num_actors: int = 1
    """Generation and scoring actors per trial."""
    harmless_threshold: float = 0.0
    """A response is harmless when its cost is <= this (0 as in the paper)."""


@dataclass
class SearchSpec:
    name: str | None = None
    """Experiment name: its directory is <run.output_dir>/<name> (default: a timestamped name)."""
    search: str = "grid"
    """'grid' (every combination of grid values; choice/uniform/... sampled), 'random', or 'optuna' (TPE)."""
    num_samples: int = 1
    """Trials to run (grid: repetitions of the whole grid)."""
    metric: str | None = None
    """Metric Optuna and ASHA optimise (default: the helpfulness metric)."""
    mode: str = "max"
    """'max' or 'min' for `metric`."""
    scheduler: str = "fifo"
    """'fifo' (every trial runs to the end) or 'asha' (stop trials that fall behind at each rung)."""
    report_every: int = 4
    """Held-out implicit-reward metrics every N optimizer steps of a trial (sets train.eval_every when it is 0)."""
    asha_grace_period: int = 4
    """ASHA: optimizer steps a trial runs before it can be stopped (rungs at grace × factor^k steps)."""
    asha_reduction_factor: int = 2
    """ASHA: keep the best 1/factor of trials at each rung."""
    safety_metric: str | None = None
    """Safety metric of the constraint and the Pareto front (default: score/harmless_ratio with a cost model,
    else eval/rewards/accuracies/safe_unsafe, the held-out safe-over-unsafe accuracy)."""
    safety_threshold: float = 0.9
    """The best trial is the most helpful one whose safety metric is >= this."""
    helpfulness_metric: str | None = None
    """Helpfulness metric (default: score/mean_reward with a reward model, else eval/rewards/accuracies/safe_safe)."""
    max_concurrent_trials: int | None = None
    """Trials at once (default: what the cluster's CPUs or GPUs hold at run.num_workers workers per trial)."""
    trial_retries: int = 1
    """Times a trial that raises is retried before it is reported as failed."""
    overrides: list[str] = field(default_factory=list)
    """Training-config overrides every trial gets (key=value), applied before the command line's."""
    scoring: TrialScoring = field(default_factory=TrialScoring)
    """Optional end-of-trial generation and scoring with cost and reward models."""
    params: dict[str, Any] = field(default_factory=dict)
    """Searched keys: {config key: {kind: values}} (see the module docstring)."""
    @property
    def has_scorers(self) -> bool:
        return bool(self.scoring.cost_model or self.scoring.reward_model)

    @property
    def safety(self) -> str:
        return self.safety_metric or (SCORED_SAFETY if self.scoring.cost_model else IMPLICIT_SAFETY)

    @property
    def helpfulness(self) -> str:
        return self.helpfulness_metric or (SCORED_HELPFULNESS if self.scoring.reward_model else IMPLICIT_HELPFULNESS)

    @property
    def objective(self) -> str:
        return self.metric or self.helpfulness

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_space_path(space: str | Path | None) -> Path:
    """A file path, or the name of a shipped space (`paper-grid`, `optuna`, `quick`)."""
    if space is None:
        space = DEFAULT_SPACE
    path = Path(space)
    if path.exists():
        return path
    shipped = SPACES_DIR / f"{Path(str(space)).stem}.yaml"
    if shipped.exists() and path.parent == Path("."):
        return shipped
    names = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
    raise ConfigError(f"search space '{space}' not found (a YAML file, or one of the shipped spaces: {names})")


def _config_field_type(key: str) -> Any:
    """The type of a dotted training-config key, or a ConfigError naming it."""
    node: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"search key '{key}': '{'.'.join(parts[:i])}' is not a section")
        hints = typing.get_type_hints(node)
        if part not in hints:
            where = ".".join(parts[:i]) or "top level"
            valid = ", ".join(sorted(f.name for f in dataclasses.fields(node)))
            raise ConfigError(f"search key '{key}' is not a config key (valid keys under '{where}': {valid})")
        node = hints[part]
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"search key '{key}' is a section, not a value")
    return node


def _check_param(key: str, spec: Any) -> tuple[str, Any]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"search key '{key}': expected one of {{{', '.join(k + ': ...' for k in KINDS)}}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"search key '{key}': unknown kind '{kind}' (allowed: {', '.join(KINDS)})")
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search key '{key}': '{kind}' needs a non-empty list of values, got {values!r}")
    else:
        ok = (isinstance(values, list) and len(values) == 2
              and all(isinstance(_number(v), (int, float)) for v in values))
        if not ok or _number(values[0]) >= _number(values[1]):
            raise ConfigError(f"search key '{key}': '{kind}' needs [low, high] with low < high, got {values!r}")
        values = [_number(v) for v in values]
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"search key '{key}': 'loguniform' needs low > 0, got {values[0]}")
    return kind, values


def _number(v: Any) -> Any:
    if isinstance(v, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(v)
        except ValueError:
            return v
    return v


def check_against_config(spec: SearchSpec, base: Config) -> None:
    """Every searched value must make a valid training config: check each one now, before any
    trial starts, so a typo fails in a second instead of after an hour of trials."""
    for key, param in spec.params.items():
        _config_field_type(key)
        kind, values = _check_param(key, param)
        probes = values if kind in ("grid", "choice") else values[:1]
        for value in probes:
            apply_params(base, {key: value})


def apply_params(base: Config, params: dict[str, Any]) -> Config:
    """A copy of `base` with the trial's parameters set; a value the config refuses is a
    ConfigError naming the key and the value."""
    tree = base.to_dict()
    for key, value in params.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return config_from_dict(tree)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise ConfigError(f"searched values {shown}: {exc}") from exc


def load_space(space: str | Path | None, overrides: list[str] | None = None) -> SearchSpec:
    """Read a space file (or a shipped space's name) with `tune.KEY=VALUE` overrides applied."""
    path = resolve_space_path(space)
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for override in overrides or []:
        set_override(tree, override)
    params = tree.pop("params", None) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"'params' must map config keys to {{kind: values}}, got {params!r}")
    spec = build(SearchSpec, tree, "tune.")
    spec.params = dict(params)
    check_spec(spec)
    return spec


def check_spec(spec: SearchSpec) -> None:
    if spec.search not in SEARCHES:
        raise ConfigError(f"'tune.search' must be one of {', '.join(SEARCHES)}, got '{spec.search}'")
    if spec.scheduler not in SCHEDULERS:
        raise ConfigError(f"'tune.scheduler' must be one of {', '.join(SCHEDULERS)}, got '{spec.scheduler}'")
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"'tune.mode' must be max or min, got '{spec.mode}'")
    if spec.num_samples < 1:
        raise ConfigError(f"'tune.num_samples' must be >= 1, got {spec.num_samples}")
    if spec.trial_retries < 0:
        raise ConfigError(f"'tune.trial_retries' must be >= 0, got {spec.trial_retries}")
    if spec.max_concurrent_trials is not None and spec.max_concurrent_trials < 1:
        raise ConfigError(f"'tune.max_concurrent_trials' must be >= 1, got {spec.max_concurrent_trials}")
    if spec.report_every < 1:
        raise ConfigError(f"'tune.report_every' must be >= 1, got {spec.report_every}")
    if spec.asha_grace_period < 1 or spec.asha_reduction_factor < 2:
        raise ConfigError("'tune.asha_grace_period' must be >= 1 and 'tune.asha_reduction_factor' >= 2")
    if not spec.params:
        raise ConfigError("the search space has no 'params': nothing to search")
    for key, param in spec.params.items():
        kind, _ = _check_param(key, param)
        if spec.search == "optuna" and kind == "grid":
            raise ConfigError(f"search key '{key}': 'grid' does not work with tune.search=optuna "
                              "(use 'choice', or tune.search=grid)")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides: `tune.KEY=V` for the search, the rest for the training config."""
    search = [o[len("tune."):] for o in overrides if o.startswith("tune.")]
    return search, [o for o in overrides if not o.startswith("tune.")]


def param_space(spec: SearchSpec) -> dict[str, Any]:
    """Ray Tune's param_space for the spec (flat dotted keys)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, param in spec.params.items():
        kind, values = _check_param(key, param)
        out[key] = {
            "grid": lambda v: tune.grid_search(v),
            "choice": lambda v: tune.choice(v),
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(int(v[0]), int(v[1])),
        }[kind](values)
    return out


def base_config(path: str | Path | None, spec: SearchSpec, overrides: list[str]) -> Config:
    """The training config every trial starts from: file ← the space's overrides ← command line."""
    cfg = load_config(path, list(spec.overrides) + list(overrides))
    check_config(cfg)
    return cfg
