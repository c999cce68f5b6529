from pathlib import Path

import pytest

import safedpo_ray
from safedpo_ray.config.training import Config, ConfigError, load_config

CONFIGS = Path(safedpo_ray.__file__).parent / "configs"


def test_defaults_are_the_builtin_default_run():
    cfg = load_config()
    assert cfg.data.source == "synthetic" and cfg.model.name_or_path == "tiny"
    assert cfg.run.num_workers == 2 and cfg.train.zero_stage == 2 and not cfg.run.use_gpu
    assert load_config(CONFIGS / "default.yaml") == cfg


def test_paper_config_is_the_papers_setting():
    cfg = load_config(CONFIGS / "paper-7b-zero3.yaml")
    assert cfg.data.source == "PKU-Alignment/PKU-SafeRLHF-30K"
    assert (cfg.data.max_length, cfg.train.beta, cfg.train.delta) == (512, 0.1, 10.0)
    assert cfg.train.zero_stage == 3 and cfg.run.num_workers == 8 and cfg.run.use_gpu


def test_overrides_are_typed():
    cfg = load_config(None, ["train.beta=0.05", "train.learning_rate=1e-3", "model.lora.enabled=true",
                             "model.lora.target_modules=q_proj,v_proj", "data.max_rows=100", "run.address=auto"])
    assert cfg.train.beta == 0.05 and cfg.train.learning_rate == 0.001
    assert cfg.model.lora.enabled and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_rows == 100 and cfg.run.address == "auto"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: 0.2\n  delta: 5\nrun:\n  num_workers: 4\n")
    cfg = load_config(path, ["train.delta=2"])
    assert (cfg.train.beta, cfg.train.delta, cfg.run.num_workers) == (0.2, 2.0, 4)


@pytest.mark.parametrize("override,message", [
    ("train.betta=0.1", "unknown config key 'train.betta'"),
    ("trian.beta=0.1", "unknown config key 'trian'"),
    ("model.lora.rank=8", "unknown config key 'model.lora.rank'"),
    ("train.zero_stage=two", "'train.zero_stage' must be an integer"),
    ("train.zero_stage=4", "'train.zero_stage' must be one of 0, 1, 2, 3, got 4"),
    ("model.lora.enabled=maybe", "'model.lora.enabled' must be true or false"),
    ("data.mode=safest", "'data.mode' must be one of"),
    ("train.delta=-1", "'train.delta' must be >= 0"),
    ("train.global_batch_size=10", "'train.global_batch_size' (10) must be a multiple"),
    ("data.max_prompt_length=600", "'data.max_prompt_length' (600) must be below 'data.max_length'"),
    ("run.resume=true", "'run.resume' needs 'run.name'"),
    ("train.beta", "not of the form key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_batch_size_checked_against_world_size():
    cfg = load_config(None, ["run.num_workers=4", "train.micro_batch_size=2", "train.global_batch_size=16"])
    assert cfg.gradient_accumulation_steps == 2
    with pytest.raises(ConfigError, match="run.num_workers"):
        load_config(None, ["run.num_workers=3", "train.micro_batch_size=2", "train.global_batch_size=16"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rat"):
        load_config(path)


def test_round_trip_for_workers():
    from safedpo_ray.config.training import config_from_dict

    cfg = load_config(None, ["train.delta=3"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg, Config)
