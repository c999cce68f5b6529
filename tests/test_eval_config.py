"""Evaluation config, model resolution, the vLLM engine mapping, CLI flags and reports (no Ray)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from safedpo_ray.config.training import ConfigError
from safedpo_ray.config.evaluation import GenerationConfig, load_eval_config, load_scorer_config
from safedpo_ray.models.resolve import EvalError, resolve_model

pytestmark = pytest.mark.timeout(60)

CONFIGS = Path(__file__).resolve().parents[1] / "safedpo_ray" / "configs"


def test_defaults_yaml_and_overrides():
    cfg = load_eval_config(None, ["generation.num_actors=4", "generation.top_p=0.9", "model.paths=[a, b]"])
    assert cfg.generation.num_actors == 4 and cfg.generation.top_p == 0.9 and cfg.model.paths == ["a", "b"]
    for path in sorted(CONFIGS.glob("eval-*.yaml")):
        loader = load_scorer_config if "train-scorer" in path.name else load_eval_config
        loader(path)  # every shipped eval config loads
    assert len(list(CONFIGS.glob("eval-*.yaml"))) >= 3


@pytest.mark.parametrize("override,match", [
    ("generation.num_actor=2", "generation.num_actor"),
    ("generation.engine=tgi", "generation.engine"),
    ("generation.batch_size=0", "generation.batch_size"),
    ("generation.do_sample=maybe", "generation.do_sample"),
    ("model.labels=[x]", "model.labels"),
    ("generation.engine=vllm", "gpus_per_actor"),
    ("judge.url=ftp://x", "judge.url"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_eval_config(None, [override])


def test_scorer_config_checks_batches():
    cfg = load_scorer_config(None, ["scorer.kind=cost", "run.num_workers=2", "train.global_batch_size=8",
                                    "train.micro_batch_size=2"])
    assert cfg.as_train_config().gradient_accumulation_steps == 2
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_scorer_config(None, ["train.global_batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="scorer.kind"):
        load_scorer_config(None, ["scorer.kind=helpful"])


def test_vllm_engine_mapping():
    from ray.data.llm import vLLMEngineProcessorConfig

    from safedpo_ray.evaluate.generate import prompt_seed
    from safedpo_ray.evaluate.vllm_engine import vllm_processor_kwargs, vllm_sampling_params

    gen = GenerationConfig(engine="vllm", num_actors=3, gpus_per_actor=1, batch_size=16, max_new_tokens=64,
                           do_sample=True, temperature=0.7, top_p=0.9, top_k=0, seed=5,
                           vllm_tensor_parallel_size=2, vllm_max_model_len=2048, vllm_accelerator_type="H100")
    kwargs = vllm_processor_kwargs("/models/policy", gen)
    processor_config = vLLMEngineProcessorConfig(**kwargs)  # accepted by the installed Ray
    assert processor_config.model_source == "/models/policy" and processor_config.batch_size == 16
    assert processor_config.concurrency == 3 and processor_config.accelerator_type == "H100"
    assert kwargs["engine_kwargs"]["tensor_parallel_size"] == 2 and kwargs["engine_kwargs"]["max_model_len"] == 2048
    assert kwargs["chat_template_stage"] is False  # prompts are templated by our own code
    seed = prompt_seed(5, "hi")
    assert vllm_sampling_params(gen, seed) == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 64,
                                               "seed": seed}
    greedy = dataclasses.replace(gen, do_sample=False)
    assert vllm_sampling_params(greedy, seed) == {"temperature": 0.0, "max_tokens": 64, "seed": seed}
    assert prompt_seed(5, "hi") == seed != prompt_seed(6, "hi")


def test_vllm_missing_is_a_clear_error(monkeypatch):
    import importlib.util

    from safedpo_ray.evaluate.generate import check_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(EvalError, match="pip install vllm"):
        check_engine(GenerationConfig(engine="vllm", gpus_per_actor=1))
    check_engine(GenerationConfig(engine="hf"))  # the hf engine needs nothing more


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_resolve_run_dirs_and_adapters(tmp_path):
    run = tmp_path / "run1"
    _model_dir(run / "model")
    _model_dir(run / "init-model")
    spec = resolve_model(str(run))
    assert spec.label == "run1" and spec.path == str(run / "model") and spec.reference == str(run / "init-model")
    assert resolve_model(str(run / "model")).reference == str(run / "init-model")
    assert resolve_model(str(run / "init-model")).reference is None  # a plain model dir

    lora = tmp_path / "lora-run"
    _model_dir(lora / "init-model")
    (lora / "model" / "adapter").mkdir(parents=True)
    (lora / "model" / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone"}))
    spec = resolve_model(str(lora), label="lora")
    assert spec.adapter == str(lora / "model" / "adapter") and spec.path == str(lora / "init-model")
    assert spec.reference is None and spec.label == "lora"  # reference = the adapter-free base

    other = tmp_path / "run2"
    _model_dir(other / "model")
    (other / "config.yaml").write_text("model:\n  name_or_path: org/base-7b\n")
    assert resolve_model(str(other)).reference == "org/base-7b"
    with pytest.raises(EvalError, match="config.json"):
        resolve_model(str(tmp_path))


def test_cli_flags_map_to_config():
    from safedpo_ray.cli.main import build_parser
    from safedpo_ray.evaluate.commands import eval_flags

    parser = build_parser()
    args = parser.parse_args(["evaluate", "--model", "runs/a", "--model", "runs/b", "--data", "pku.jsonl",
                              "--xstest", "xs.csv", "--cost-model", "c", "--baseline", "a", "--generations", "g.jsonl",
                              "generation.seed=3"])
    cfg = load_eval_config(None, args.overrides, eval_flags(args))
    assert cfg.model.paths == ["runs/a", "runs/b"] and cfg.data.source == "pku.jsonl" and cfg.xstest.csv == "xs.csv"
    assert cfg.scoring.cost_model == "c" and cfg.scoring.baseline == "a" and cfg.generation.seed == 3
    assert cfg.scoring.generations == ["g.jsonl"]
    args = parser.parse_args(["train-scorer", "--kind", "cost", "--output", "s"])
    assert args.kind == "cost" and args.fn.__name__ == "cmd_train_scorer"


def test_reports_json_markdown_png(tmp_path):
    from safedpo_ray.evaluate.report import markdown_table, write_reports

    earlier = tmp_path / "old"
    earlier.mkdir()
    (earlier / "results.json").write_text(json.dumps({"models": {"sft": {"scores": {
        "harmless_ratio": 0.4, "win_rate": 0.5, "mean_reward": 1.0}}}}))
    results = {"name": "t", "baseline": "sft", "models": {
        "safedpo": {"scores": {"harmless_ratio": 0.9, "win_rate": 0.62, "mean_cost": -1.0, "mean_reward": math.nan},
                    "xstest": {"over_refusal_rate": 0.1, "harmless_ratio_unsafe": 0.95, "harmless_by": "refusal"}}}}
    files = write_reports(results, tmp_path / "new", compare=[str(earlier / "results.json")])
    data = json.loads(Path(files["json"]).read_text())  # strict JSON: NaN became null
    assert data["models"]["safedpo"]["scores"]["mean_reward"] is None
    md = Path(files["markdown"]).read_text()
    assert "| safedpo | 0.900 |" in md and "sft (baseline)" in md and "refusal rate" in md
    assert Path(files["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "judge" not in markdown_table(results["models"])  # columns nobody has are left out


def test_paper_protocol_config():
    """configs/eval-paper-7b.yaml: the training data's test prompts (PKU-SafeRLHF-30K), beaver
    scorers in bf16, helpfulness anchors sft → 0 and dpo-helpful → 10, the judge against sft."""
    cfg = load_eval_config(CONFIGS / "eval-paper-7b.yaml")
    assert cfg.data.source == "PKU-Alignment/PKU-SafeRLHF-30K" and cfg.data.split == "test"
    assert cfg.data.subset is None  # the key exists and is settable
    assert load_eval_config(CONFIGS / "eval-paper-7b.yaml", ["data.subset=default"]).data.subset == "default"
    assert (cfg.scoring.anchor_zero, cfg.scoring.anchor_ten, cfg.scoring.baseline) == ("sft", "dpo-helpful", "sft")
    assert cfg.scoring.dtype == "bfloat16" and cfg.generation.max_new_tokens == 512 and not cfg.generation.do_sample
    assert cfg.judge.enabled and cfg.judge.pairwise and cfg.judge.swap and cfg.judge.xstest
    text = (CONFIGS / "eval-paper-7b.yaml").read_text()
    assert "ASSUMPTION" in text  # decoding values not checked against the paper say so


@pytest.mark.parametrize("override,match", [
    ("scoring.anchor_zero=sft", "anchor_ten"),
    ("scoring.dtype=int8", "scoring.dtype"),
    ("output.ci_level=1.5", "output.ci_level"),
    ("output.ci_samples=10", "output.ci_samples"),
])
def test_new_config_checks(override, match):
    with pytest.raises(ConfigError, match=match):
        load_eval_config(None, [override])
    with pytest.raises(ConfigError, match="judge.pairwise"):
        load_eval_config(None, ["judge.enabled=true", "judge.pairwise=true"])
    assert load_eval_config(None, ["scoring.anchor_zero=a", "scoring.anchor_ten=b"]).scoring.dtype == "auto"


def test_cli_anchor_and_resume_flags():
    from safedpo_ray.cli.main import build_parser
    from safedpo_ray.evaluate.commands import eval_flags

    parser = build_parser()
    args = parser.parse_args(["evaluate", "--model", "a", "--anchor-zero", "sft", "--anchor-ten", "dpo-helpful",
                              "--resume", "eval/e1"])
    assert eval_flags(args)["scoring"] == {"anchor_zero": "sft", "anchor_ten": "dpo-helpful"}
    assert args.resume == "eval/e1"
