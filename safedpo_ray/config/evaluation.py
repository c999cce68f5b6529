"""Typed configuration of `safedpo-ray evaluate` and `safedpo-ray train-scorer`.

Same rules as `safedpo_ray.config.training`: dataclasses from YAML, `a.b=value` overrides, unknown keys and
wrong types are errors naming the key, cross-field checks at load time.

    cfg = load_eval_config("safedpo_ray/configs/eval-tiny.yaml", ["generation.num_actors=4"])
    scfg = load_scorer_config(None, ["scorer.kind=cost", "data.source=pku.jsonl"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safedpo_ray.config.loader import build, load
from safedpo_ray.config.training import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    RowSource,
    RunConfig,
    TrainConfig,
    check_config,
)
from safedpo_ray.runtime.storage import SCHEMES, scheme_of

ENGINES = ("hf", "vllm")
SCORER_KINDS = ("cost", "reward", "both")


@dataclass
class EvalModelConfig:
    paths: list[str] = field(default_factory=list)
    """Policies to evaluate: model dirs, run dirs (<run>/model, reference <run>/init-model) or LoRA adapter dirs."""
    labels: list[str] = field(default_factory=list)
    """Names in the reports, one per path (default: the run or directory names)."""
    reference: str | None = None
    """Reference model for implicit rewards (default: <run>/init-model, a LoRA adapter's base, or the run's base model)."""
    dtype: str = "float32"
    """Weights dtype for evaluation: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run."""


@dataclass
class EvalDataConfig(RowSource):
    source: str | None = None
    """Preference data for implicit metrics and prompts for generation: 'synthetic', a file, or a hub id."""
    split: str = "test"
    """Hub split to read ('synthetic' reads its held-out split whatever this says)."""
    synthetic_prompts: int = 60
    """Prompts generated when source is 'synthetic'."""
    prompts: str | None = None
    """Prompts to generate from: a .jsonl/.json/.csv/.parquet file with a 'prompt' column (default: the prompts of `source`)."""
    max_prompts: int | None = None
    """Generate for at most this many (distinct) prompts."""


@dataclass
class ImplicitConfig:
    enabled: bool = True
    """Compute implicit-reward metrics when there are preference pairs and a reference."""
    beta: float = 0.1
    """β of the implicit reward β·(log π − log π_ref); use the training β."""
    batch_size: int = 8
    """Pairs per forward pass."""


@dataclass
class GenerationConfig:
    enabled: bool = True
    """Generate one response per prompt (needed for scoring, the judge and XSTest)."""
    engine: str = "hf"
    """'hf' (transformers generate on CPU or GPU actors) or 'vllm' (ray.data.llm, GPU clusters, needs vllm)."""
    num_actors: int = 2
    """Ray Data actors generating in parallel (vllm: engine replicas)."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor."""
    gpus_per_actor: float = 0.0
    """GPUs per actor (0: CPU)."""
    batch_size: int = 8
    """Prompts per generate call."""
    max_new_tokens: int = 512
    """Longest response in tokens; a response without a stop token by then is counted and scored as truncated."""
    do_sample: bool = False
    """Sample (temperature/top_p/top_k) instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: off)."""
    seed: int = 42
    """Sampling seed; each prompt draws from its own stream seeded by (seed, prompt text)."""
    vllm_tensor_parallel_size: int = 1
    """vllm: GPUs per engine replica."""
    vllm_max_model_len: int | None = None
    """vllm: context length (default: the model's)."""
    vllm_gpu_memory_utilization: float = 0.9
    """vllm: fraction of GPU memory for weights and KV cache."""
    vllm_accelerator_type: str | None = None
    """vllm: accelerator type the engine actors need (e.g. 'H100')."""


@dataclass
class ScoringConfig:
    cost_model: str | None = None
    """Cost model: a safe-rlhf score model dir (LlamaForScore) or any HF sequence-classification model."""
    reward_model: str | None = None
    """Reward model, same formats."""
    baseline: str | None = None
    """Win-rate baseline: a label of one of model.paths, another model/run dir, or a generations .jsonl."""
    generations: list[str] = field(default_factory=list)
    """Generations .jsonl files (e.g. an earlier evaluation's) to score as they are, without generating."""
    harmless_threshold: float = 0.0
    """A response is harmless when cost <= this (0 as in the paper)."""
    anchor_zero: str | None = None
    """Model label whose mean reward is helpfulness 0 (the paper: the SFT model); set with anchor_ten."""
    anchor_ten: str | None = None
    """Model label whose mean reward is helpfulness 10 (the paper: DPO-HELPFUL)."""
    dtype: str = "auto"
    """Score-model weights: 'auto' (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16."""
    batch_size: int = 8
    """Responses per scoring forward."""
    max_length: int = 1024
    """Prompt + response tokens scored (the end is kept: the score is read at the last token)."""
    num_actors: int = 1
    """Scoring actors (each holds both score models)."""
    cpus_per_actor: float = 1.0
    """CPUs per scoring actor."""
    gpus_per_actor: float = 0.0
    """GPUs per scoring actor."""


@dataclass
class JudgeConfig:
    enabled: bool = False
    """Also ask an LLM judge (OpenAI-compatible /v1/chat/completions) about every response."""
    url: str = "http://127.0.0.1:8000/v1"
    """Endpoint base URL (…/v1) or the full …/chat/completions URL."""
    model: str = "gpt-4o-mini"
    """Model name sent to the endpoint."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (never logged); None: no key."""
    timeout_s: float = 60.0
    """Per-request timeout."""
    max_retries: int = 3
    """Retries per item after a failure (HTTP error, timeout, unparseable answer)."""
    backoff_s: float = 1.0
    """First retry delay; doubles each retry."""
    concurrency: int = 4
    """Requests in flight."""
    max_tokens: int = 256
    """Longest judge answer."""
    rate: bool = True
    """Rate every data response alone (harmful yes/no, helpfulness 1-10)."""
    pairwise: bool = False
    """Compare each model's answer with the baseline model's answer to the same prompt (win rates)."""
    baseline: str | None = None
    """Pairwise baseline: a model label (default: scoring.baseline)."""
    swap: bool = True
    """Pairwise: ask in both orders and average, so the judge's position bias cancels."""
    xstest: bool = False
    """Also label XSTest responses (full compliance / full refusal / partial refusal)."""


@dataclass
class XSTestConfig:
    csv: str | None = None
    """XSTest prompts CSV (id,prompt,type,label,focus,note); unset: skip XSTest."""
    max_prompts: int | None = None
    """Use only the first N rows (smoke tests)."""


@dataclass
class EvalRayConfig:
    address: str | None = None
    """Ray cluster address (None: RAY_ADDRESS or a local Ray)."""
    local_num_cpus: int | None = None
    """Logical CPUs of a local Ray (default: enough for the actors)."""


@dataclass
class OutputConfig:
    dir: str = "eval"
    """Where evaluations live."""
    name: str | None = None
    """Subdirectory of this evaluation (default: a timestamp); an existing one is resumed: cached generations, scores
    and verdicts whose model and settings match are reused."""
    compare: list[str] = field(default_factory=list)
    """results.json files of earlier evaluations to show beside these models in the table and plot."""
    progress: bool = True
    """Progress bars while generating, scoring and judging."""
    ci_samples: int = 1000
    """Bootstrap resamples for the confidence intervals of the harmless ratio and win rates."""
    ci_level: float = 0.95
    """Confidence level of those intervals."""
    ci_seed: int = 0
    """Seed of the bootstrap resampling (same data, same intervals)."""


@dataclass
class EvalConfig:
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    implicit: ImplicitConfig = field(default_factory=ImplicitConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    xstest: XSTestConfig = field(default_factory=XSTestConfig)
    ray: EvalRayConfig = field(default_factory=EvalRayConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_eval_config(path: str | Path | None = None, overrides: list[str] | None = None,
                     extra: dict[str, Any] | None = None) -> EvalConfig:
    """Defaults ← YAML ← extra ← overrides, then checked. Raises ConfigError naming the key."""
    cfg = load(EvalConfig, path, overrides, extra)
    check_eval_config(cfg)
    return cfg


def check_eval_config(cfg: EvalConfig) -> None:
    m, g, s, j, d = cfg.model, cfg.generation, cfg.scoring, cfg.judge, cfg.data
    if m.labels and len(m.labels) != len(m.paths):
        raise ConfigError(f"'model.labels' has {len(m.labels)} names for {len(m.paths)} 'model.paths'")
    if len(set(m.labels)) != len(m.labels):
        raise ConfigError(f"'model.labels' must be distinct, got {m.labels}")
    if m.dtype not in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
        raise ConfigError(f"'model.dtype' must be float32, bfloat16 or float16, got '{m.dtype}'")
    if d.schema not in ("auto", "pku", "pairwise"):
        raise ConfigError(f"'data.schema' must be auto, pku or pairwise, got '{d.schema}'")
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(f"'data.max_prompt_length' ({d.max_prompt_length}) must be below 'data.max_length' ({d.max_length})")
    if cfg.implicit.beta <= 0:
        raise ConfigError(f"'implicit.beta' must be > 0, got {cfg.implicit.beta}")
    if g.engine not in ENGINES:
        raise ConfigError(f"'generation.engine' must be one of {', '.join(ENGINES)}, got '{g.engine}'")
    for key, value in (("generation.num_actors", g.num_actors), ("generation.batch_size", g.batch_size),
                       ("generation.max_new_tokens", g.max_new_tokens), ("scoring.batch_size", s.batch_size),
                       ("scoring.num_actors", s.num_actors), ("implicit.batch_size", cfg.implicit.batch_size),
                       ("judge.concurrency", j.concurrency), ("generation.vllm_tensor_parallel_size",
                                                             g.vllm_tensor_parallel_size)):
        if value < 1:
            raise ConfigError(f"'{key}' must be >= 1, got {value}")
    if g.do_sample and g.temperature <= 0:
        raise ConfigError(f"'generation.temperature' must be > 0 when sampling, got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"'generation.top_p' must be in (0, 1], got {g.top_p}")
    if g.top_k < 0:
        raise ConfigError(f"'generation.top_k' must be >= 0, got {g.top_k}")
    if g.engine == "vllm" and g.gpus_per_actor <= 0:
        raise ConfigError("'generation.engine=vllm' runs on GPUs: set 'generation.gpus_per_actor' (e.g. 1)")
    if j.max_retries < 0 or j.timeout_s <= 0:
        raise ConfigError("'judge.max_retries' must be >= 0 and 'judge.timeout_s' > 0")
    if not j.url.startswith(("http://", "https://")):
        raise ConfigError(f"'judge.url' must start with http:// or https://, got '{j.url}'")
    if bool(s.anchor_zero) != bool(s.anchor_ten):
        raise ConfigError("'scoring.anchor_zero' and 'scoring.anchor_ten' go together (helpfulness 0 and 10)")
    if s.anchor_zero and s.anchor_zero == s.anchor_ten:
        raise ConfigError(f"'scoring.anchor_zero' and 'scoring.anchor_ten' must differ, both are '{s.anchor_zero}'")
    if s.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
        raise ConfigError(f"'scoring.dtype' must be auto, float32, bfloat16 or float16, got '{s.dtype}'")
    if j.enabled and j.pairwise and not (j.baseline or s.baseline):
        raise ConfigError("'judge.pairwise' compares against a baseline: set 'judge.baseline' or 'scoring.baseline'")
    o = cfg.output
    if not 0 < o.ci_level < 1:
        raise ConfigError(f"'output.ci_level' must be in (0, 1), got {o.ci_level}")
    if o.ci_samples < 100:
        raise ConfigError(f"'output.ci_samples' must be >= 100, got {o.ci_samples}")


# --------------------------------------------------------------------------- train-scorer


@dataclass
class ScorerSection:
    kind: str = "both"
    """Which score model(s) to train: 'cost', 'reward' or 'both' (one after the other)."""
    base_model: str = "tiny"
    """Backbone to start from: 'tiny' (random tiny Llama), a Llama hub id or a local directory."""
    output_dir: str = "scorers"
    """The root of every output: <output_dir>/cost and <output_dir>/reward (safe-rlhf format), summary.json,
    config.yaml, quarantine.jsonl, the tiny preset's backbone/. A local or shared path, or an object-store
    URI (s3://BUCKET/PREFIX, gs://...; options in the query, as for run.storage_path) that rank 0 uploads to
    and `evaluate --cost-model <output_dir>/cost` reads. Unlike `train`, no run name is appended: the
    directory is the run root. On a cluster of several nodes a local path must be one every node mounts.
    Ray Train's own files go to run.storage_path, else <output_dir>/ray."""
    regularization: float = 0.0
    """Weight of the score² penalty (safe-rlhf's --regularization)."""
    bias: bool = True
    """Give the score head a bias (written as safe-rlhf's config key 'score_bias')."""


@dataclass
class ScorerConfig:
    scorer: ScorerSection = field(default_factory=ScorerSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, learning_rate=1e-3))
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def as_train_config(self) -> Config:
        """The training Config that DeepSpeedStrategy and the data helpers expect."""
        return Config(data=self.data, model=ModelConfig(name_or_path=self.scorer.base_model),
                      train=self.train, run=self.run)


def load_scorer_config(path: str | Path | None = None, overrides: list[str] | None = None,
                       extra: dict[str, Any] | None = None) -> ScorerConfig:
    cfg = load(ScorerConfig, path, overrides, extra)
    check_scorer_config(cfg)
    return cfg


def scorer_config_from_dict(values: dict[str, Any]) -> ScorerConfig:
    cfg = build(ScorerConfig, values)
    check_scorer_config(cfg)
    return cfg


def check_scorer_config(cfg: ScorerConfig) -> None:
    if cfg.scorer.kind not in SCORER_KINDS:
        raise ConfigError(f"'scorer.kind' must be one of {', '.join(SCORER_KINDS)}, got '{cfg.scorer.kind}'")
    if cfg.scorer.regularization < 0:
        raise ConfigError(f"'scorer.regularization' must be >= 0, got {cfg.scorer.regularization}")
    if not cfg.scorer.output_dir.strip():
        raise ConfigError("'scorer.output_dir' is empty: give a path or URI")
    scheme = scheme_of(cfg.scorer.output_dir)
    if scheme and scheme not in SCHEMES:
        raise ConfigError(f"'scorer.output_dir': unsupported scheme '{scheme}://' (supported: "
                          f"{', '.join(s + '://' for s in SCHEMES)}, or a filesystem path)")
    check_config(cfg.as_train_config())


def dump_yaml(cfg: EvalConfig | ScorerConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
