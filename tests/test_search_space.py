"""Search spaces: shipped files, key and value checks, Tune's param_space, overrides."""

from pathlib import Path

import pytest
import yaml

from safedpo_ray.config.training import ConfigError, load_config
from safedpo_ray.search.space import (
    SPACES_DIR,
    apply_params,
    check_against_config,
    load_space,
    param_space,
    resolve_space_path,
    split_overrides,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, tree) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_shipped_spaces_load_and_match_the_top_level_folder():
    names = sorted(p.name for p in SPACES_DIR.glob("*.yaml"))
    assert {"paper-grid.yaml", "optuna.yaml", "quick.yaml"} <= set(names)
    assert sorted(p.name for p in (ROOT / "tune").glob("*.yaml")) == names
    base = load_config()
    for name in names:
        spec = load_space(Path(name).stem)
        check_against_config(spec, base)
    grid = load_space("paper-grid")
    assert grid.params == {"train.delta": {"grid": [0, 2, 5, 10, 20]}, "train.beta": {"grid": [0.05, 0.1]}}
    assert load_space("optuna").search == "optuna"
    assert resolve_space_path(str(ROOT / "tune" / "paper-grid.yaml")).name == "paper-grid.yaml"


def test_param_space_kinds():
    from ray.tune.search.sample import Float, Integer
    from ray.tune.search.sample import Categorical

    spec = load_space("optuna")
    space = param_space(spec)
    assert isinstance(space["train.beta"], Float) and isinstance(space["train.delta"], Float)
    assert space["train.beta"].lower == 0.01 and space["train.beta"].upper == 0.5
    grid = param_space(load_space("paper-grid"))
    assert grid["train.delta"] == {"grid_search": [0, 2, 5, 10, 20]}


def test_any_config_key_may_be_searched(tmp_path):
    spec = load_space(write(tmp_path, {"params": {"train.learning_rate": {"loguniform": ["1e-6", "1e-4"]},
                                                  "model.lora.r": {"choice": [4, 8]},
                                                  "train.max_steps": {"randint": [4, 9]}}}))
    check_against_config(spec, load_config())
    cfg = apply_params(load_config(), {"model.lora.r": 8, "train.learning_rate": 3e-5})
    assert cfg.model.lora.r == 8 and cfg.train.learning_rate == 3e-5


def test_unknown_key_is_an_error_naming_it(tmp_path):
    spec = load_space(write(tmp_path, {"params": {"train.dleta": {"grid": [0, 1]}}}))
    with pytest.raises(ConfigError, match=r"'train\.dleta' is not a config key.*delta"):
        check_against_config(spec, load_config())
    spec = load_space(write(tmp_path, {"params": {"train": {"grid": [0, 1]}}}))
    with pytest.raises(ConfigError, match="'train' is a section"):
        check_against_config(spec, load_config())


def test_invalid_values_fail_before_any_trial(tmp_path):
    spec = load_space(write(tmp_path, {"params": {"train.beta": {"grid": [0.1, -1]}}}))
    with pytest.raises(ConfigError, match=r"train\.beta=-1.*must be > 0"):
        check_against_config(spec, load_config())
    spec = load_space(write(tmp_path, {"params": {"train.zero_stage": {"grid": ["two"]}}}))
    with pytest.raises(ConfigError, match="must be an integer"):
        check_against_config(spec, load_config())


@pytest.mark.parametrize("params,match", [
    ({"train.beta": {"uniform": [0.5, 0.1]}}, "low < high"),
    ({"train.beta": {"loguniform": [0, 0.1]}}, "low > 0"),
    ({"train.beta": {"normal": [0, 1]}}, "unknown kind 'normal'"),
    ({"train.beta": {"grid": []}}, "non-empty list"),
    ({"train.beta": [0.1, 0.2]}, "expected one of"),
])
def test_bad_parameter_specs(tmp_path, params, match):
    with pytest.raises(ConfigError, match=match):
        load_space(write(tmp_path, {"params": params}))


def test_settings_are_checked_and_overridable(tmp_path):
    path = write(tmp_path, {"params": {"train.delta": {"grid": [0, 5]}}})
    spec = load_space(path, ["num_samples=3", "safety_threshold=0.75", "scoring.cost_model=/models/cost"])
    assert spec.num_samples == 3 and spec.safety_threshold == 0.75
    assert spec.safety == "score/harmless_ratio" and spec.helpfulness == "eval/rewards/accuracies/safe_safe"
    with pytest.raises(ConfigError, match="unknown config key 'tune.num_sample'"):
        load_space(path, ["num_sample=3"])
    with pytest.raises(ConfigError, match="'tune.scheduler'"):
        load_space(path, ["scheduler=hyperband"])
    with pytest.raises(ConfigError, match="'grid' does not work with tune.search=optuna"):
        load_space(path, ["search=optuna"])
    with pytest.raises(ConfigError, match="no 'params'"):
        load_space(write(tmp_path, {"search": "grid"}))
    with pytest.raises(ConfigError, match="not found"):
        load_space("no-such-space")


def test_split_overrides():
    assert split_overrides(["tune.num_samples=2", "train.beta=0.1"]) == (["num_samples=2"], ["train.beta=0.1"])
