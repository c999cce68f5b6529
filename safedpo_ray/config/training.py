"""Typed configuration: dataclasses loaded from YAML, with ``a.b=value`` overrides.

    cfg = load_config("my.yaml", ["train.beta=0.05", "run.num_workers=4"])

Unknown keys and values of the wrong type are errors that name the key; cross-field checks
(batch sizes against the number of workers, lengths, modes) run at load time, before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safedpo_ray.config.files import check_run_name
from safedpo_ray.config.loader import build, load
from safedpo_ray.config.rules import check_rules
from safedpo_ray.errors import ConfigError
from safedpo_ray.runtime.storage import SCHEMES, scheme_of

TINY_PRESET = "tiny"
"""`model.name_or_path` of the tiny preset built from the training texts (safedpo_ray/models/loading.py)."""


@dataclass
class RowSource:
    """Where rows come from and how long a pair may be: the data keys of `train` (DataConfig) and
    `evaluate` (config/evaluation.py's EvalDataConfig)."""
    source: str | None = "synthetic"
    """'synthetic' (built-in generated data), a hub dataset id, or a local .jsonl/.json/.parquet/.csv file."""
    split: str = "train"
    """Split to read from a hub dataset."""
    subset: str | None = None
    """Hub dataset configuration (e.g. 'alpaca-7b' of PKU-Alignment/PKU-SafeRLHF; None: its default)."""
    schema: str = "auto"
    """Row schema: 'auto', 'pku' (PKU-SafeRLHF) or 'pairwise' (prompt, chosen, rejected, chosen_unsafe, rejected_unsafe)."""
    max_rows: int | None = None
    """Read at most this many rows of the source (None: all)."""
    synthetic_prompts: int = 240
    """Prompts generated when source is 'synthetic'."""
    max_length: int = 512
    """Maximum prompt + response tokens; longer responses are cut on the right."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; longer prompts keep their last tokens."""


@dataclass
class DataConfig(RowSource):
    source: str = "synthetic"
    """'synthetic' (built-in generated data), a hub dataset id, or a local .jsonl/.json/.parquet/.csv file."""
    eval_source: str | None = None
    """Held-out pairs: same forms as `source`; when unset, `eval_split` of a hub source or `eval_fraction` of the source."""
    eval_split: str | None = None
    """Hub split used for held-out pairs (e.g. 'test'); only with a hub source and no eval_source."""
    eval_fraction: float = 0.05
    """Fraction of prompts held out when there is no separate eval data (split by prompt hash, so no prompt is in both)."""
    mode: str = "safedpo"
    """Transformation T: 'safedpo', 'helpful', 'harmless' or 'safebetter'."""
    strict: bool = False
    """Stop at the first invalid row instead of quarantining bad rows."""
    synthetic_eval_prompts: int = 60
    """Held-out prompts generated when source is 'synthetic'."""
    tokenize_batch_size: int = 256
    """Rows per Ray Data tokenization batch (SFT and scorer data; training data streams in batches of 1024)."""
    drop_duplicates: bool = False
    """Quarantine a row identical to an earlier row of its split (prompt, responses, labels) as
    "duplicate of row N of FILE". False: duplicates are kept (counted in data_stats.json as
    rows_duplicate): a repeated pair can be deliberate weight, e.g. sampled data."""
    max_row_bytes: int = 8388608
    """A row (a .jsonl line) longer than this many bytes is quarantined unread."""
    chunk_mb: int = 32
    """A .jsonl file larger than this is read by several tasks, one per this many MB."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft); the reference is the same model with adapters disabled."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA alpha (scaling = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA path."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ['all-linear'] adapts every linear layer but the output head."""


@dataclass
class ModelConfig:
    name_or_path: str = TINY_PRESET
    """'tiny' (built-in random-init preset), a hub model id, or a local directory."""
    gguf_file: str | None = None
    """A GGUF file name inside name_or_path (or a path to one); converted once to safetensors before training."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings."""


@dataclass
class TrainConfig:
    beta: float = 0.1
    """β: strength of the KL tie to the reference policy."""
    delta: float = 10.0
    """Δ ≥ 0: extra margin demanded between a safe winner and an unsafe loser (0 = DPO on T(D))."""
    loss: str = "sigmoid"
    """Preference loss on T(D), Δ as its margin: 'sigmoid' (SafeDPO/DPO), 'ipo', 'robust' (rDPO),
    'hinge' (SLiC) or 'simpo' (reference-free: no reference model at all). See safedpo_ray/core/loss.py."""
    label_smoothing: float = 0.0
    """ε in [0, 0.5): assumed label-flip rate of the 'robust' loss (0 = the sigmoid loss)."""
    simpo_gamma: float = 0.5
    """γ ≥ 0: SimPO's target reward margin (loss 'simpo' only)."""
    ipo_logps: str = "mean"
    """Loss 'ipo' only: 'mean' averages each response's log-ratio per token before the loss (TRL's
    `ipo`, and by TRL's account the IPO authors' reported results), 'sum' uses the sequence sums
    (this package's `ipo` before; the same β then means a different loss)."""
    learning_rate: float = 5e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 3
    """Passes over the training pairs."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run all epochs)."""
    global_batch_size: int = 16
    """Pairs per optimizer step, summed over workers and accumulation steps."""
    micro_batch_size: int = 4
    """Pairs per worker per forward pass."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (bf16 weights and compute, fp32 master weights in the optimizer)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warmup; cosine decay after."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the cosine decay, as a fraction of the peak."""
    batch_layout: str = "shared"
    """How a micro-batch's sequences become model rows: 'shared' (each pair's prompt run once,
    both responses attending to it, pairs packed into shared rows), 'packed' (sequences packed
    into shared rows, position ids restarting per sequence) or 'padded' (one sequence per row).
    All give the same log-probs; 'shared' and 'packed' compute fewer tokens. Checked against
    'padded' on the first micro-batch: a model whose attention does not keep the sequences apart
    falls back to the next layout, with a note."""
    logits_chunk_tokens: int = 1024
    """Project only response positions onto the vocabulary, this many tokens at a time, and never
    hold a batch's full [tokens, vocab] logits (0: the model's full logits, as transformers
    computes them)."""
    cache_reference: bool = True
    """Compute reference log-probs once (a Ray actor pool before training) and keep them under
    <cache>/reference, keyed by the prepared pairs, model and precision: later runs on the same
    inputs reuse them, and workers hold no reference model. False: a live reference every step."""
    eval_at_start: str = "derived"
    """Held-out metrics before training: 'derived' (π = π_ref at step 0, so every implicit reward is
    0, margins 0 and accuracy ½: no forward pass; reference-free losses are measured), 'measured'
    (a forward pass over the held-out pairs), or 'off'."""
    eval_every: int = 0
    """Held-out implicit-reward metrics every N optimizer steps, also reported to Tune (0: only
    before and after training)."""
    seed: int = 42
    """Seed for the data order and any random init."""
    log_every: int = 1
    """Write metrics every N optimizer steps."""
    checkpoint_every: int = 0
    """Save a checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints Ray Train keeps."""
    stop_at_step: int | None = None
    """End the run after this step (checkpointed), as if interrupted; `run.resume=true` continues it."""
    record_pairs: bool = False
    """Debug: rank 0 writes the pair_ids of every optimizer step (all ranks) to <run>/pairs.jsonl."""
    step_delay_s: float = 0.0
    """Debug: pause this long after every optimizer step (fault-injection tests: lose a node between checkpoints)."""


@dataclass
class RunConfig:
    name: str | None = None
    """Run name; its directory is output_dir/name (default: a timestamped name)."""
    output_dir: str = "runs"
    """Where runs live when storage_path is unset (<output_dir>/<name>), and the driver's local caches."""
    storage_path: str | None = None
    """Root of every output of a run (<storage_path>/<name>: checkpoints, metrics, summary.json, the model):
    a filesystem all nodes mount or an object store (s3://, gs://, abfs://; options in the URI query).
    Required on a cluster of several nodes. Unset: <output_dir>/<name>, checkpoints under its ray/."""
    resume: bool = False
    """Continue the named run from its last checkpoint."""
    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """Give each worker a GPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    address: str | None = None
    """Ray cluster address (None: RAY_ADDRESS or a local Ray)."""
    local_num_cpus: int | None = None
    """Logical CPUs for a local Ray (default: enough for the workers plus Ray Data tasks)."""
    start_workers_early: bool = True
    """`train` on pairs not prepared yet: start the training workers (model load, process group)
    while Ray Data prepares the pairs; they wait for the prepared files. Used when no reference
    pass must run between the two (see train.cache_reference) and the cluster has CPUs beyond the
    workers' for preparation. False: prepare first, then start the workers."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may attempt (each resumes from the last checkpoint)."""
    stop_timeout_s: float = 120.0
    """After SIGTERM/SIGINT: how long the run may take to save its checkpoint and stop before it is
    stopped at once (a second signal also stops at once); also a signalled worker's grace period."""
    node_wait_timeout_s: float | None = None
    """How long the workers may wait for the nodes they need (at the start, and after a lost node)
    before the run fails with a message (None: $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, else 120 s)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each worker reserves, e.g. {accelerator_type:H100: 0.001} or a custom node resource."""
    tensorboard: bool = False
    """Also write TensorBoard event files into the run directory."""
    mlflow_tracking_uri: str | None = None
    """Also log metrics to this MLflow tracking URI (needs the mlflow package)."""
    export_merged: bool = False
    """With LoRA, also export merged full weights."""


@dataclass
class SftConfig:
    responses: str = "helpful_safe"
    """`safedpo-ray sft` on preference data: 'helpful_safe' (each pair's helpful winner, when it is
    safe) or 'all_safe' (every safe response). Prompt/response files train on every row."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    """Supervised fine-tuning (`safedpo-ray sft`); it also reads data.*, model.*, train.* and run.*."""
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.run.num_workers)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: dict[str, Any] | None = None) -> Config:
    """Defaults ← `base` ← YAML file ← overrides, then checked. Raises ConfigError naming the key."""
    cfg = load(Config, path, overrides, base=base)
    check_config(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (how workers receive it)."""
    cfg = build(Config, values)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Every key against its rule (config/rules.py: choices, ranges), then what no single key
    can say: the checks across keys."""
    check_rules(cfg)
    d, t, r = cfg.data, cfg.train, cfg.run
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"'data.max_prompt_length' ({d.max_prompt_length}) must be below 'data.max_length' ({d.max_length})"
        )
    if t.label_smoothing > 0 and t.loss != "robust":
        raise ConfigError(f"'train.label_smoothing' is used by train.loss=robust only (train.loss is '{t.loss}')")
    if t.ipo_logps != "mean" and t.loss != "ipo":
        raise ConfigError(f"'train.ipo_logps' is used by train.loss=ipo only (train.loss is '{t.loss}')")
    per_step = t.micro_batch_size * r.num_workers
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"'train.global_batch_size' ({t.global_batch_size}) must be a multiple of "
            f"'train.micro_batch_size' × 'run.num_workers' ({t.micro_batch_size} × {r.num_workers} = {per_step})"
        )
    if r.resume and not r.name:
        raise ConfigError("'run.resume' needs 'run.name' (the run to continue)")
    check_run_name(r.name)  # one directory name: a run never lands outside run.output_dir
    _check_cluster_keys(r)


def _check_cluster_keys(r: RunConfig) -> None:
    """run.storage_path and run.worker_resources (cluster runs)."""
    if r.storage_path is not None:
        if not r.storage_path.strip():
            raise ConfigError("'run.storage_path' is empty: unset it or give a path or URI")
        scheme = scheme_of(r.storage_path)
        if scheme and scheme not in SCHEMES:
            raise ConfigError(f"'run.storage_path': unsupported scheme '{scheme}://' (supported: "
                              f"{', '.join(s + '://' for s in SCHEMES)}, or a filesystem path)")
    for name, amount in r.worker_resources.items():
        if name in ("CPU", "GPU", "memory"):
            raise ConfigError(f"'run.worker_resources.{name}': set CPUs with run.cpus_per_worker and GPUs "
                              "with run.use_gpu")
        if amount < 0:
            raise ConfigError(f"'run.worker_resources.{name}' must be >= 0, got {amount}")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
