"""What each configuration key allows, in one table: choices and ranges, checked at load time.

    check_rules(cfg)   # ConfigError: "'train.learning_rate' must be > 0, got -0.001"

Every message names the key, the value given and what is allowed. `config.check_config` calls
this first; its own checks (those across keys: batch sizes against workers, lengths, modes
that need other keys) come after. tests/test_config_checks.py walks the config dataclasses: a key
with a number or a fixed set of values must have a rule here or be listed in FREE, so a new key
cannot slip through unchecked.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from safedpo_ray.config.choices import MODES, SFT_RESPONSES
from safedpo_ray.core.loss_names import LOSS_NAMES
from safedpo_ray.errors import ConfigError


@dataclass(frozen=True)
class Choice:
    values: tuple

    def ok(self, value: Any) -> bool:
        return value in self.values

    def allowed(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself not allowed
    hi_open: bool = False  # hi itself not allowed

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def allowed(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}"


def _modes() -> tuple:
    return tuple(MODES)


def _losses() -> tuple:
    return tuple(LOSS_NAMES)


def _sft_responses() -> tuple:
    return tuple(SFT_RESPONSES)


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range(0, lo_open=True), Range(0), Range(1)
FRACTION = Range(0, 1, hi_open=True)

# key -> rule, or a function returning one (choices that live in other modules).
RULES: dict[str, Any] = {
    "data.eval_fraction": FRACTION,
    "data.schema": Choice(("auto", "pku", "pairwise")),
    "data.mode": _modes,
    "data.max_rows": AT_LEAST_ONE,
    "data.synthetic_prompts": AT_LEAST_ONE,
    "data.synthetic_eval_prompts": NON_NEGATIVE,
    "data.max_length": Range(2),
    "data.max_prompt_length": AT_LEAST_ONE,
    "data.tokenize_batch_size": AT_LEAST_ONE,
    "data.max_row_bytes": AT_LEAST_ONE,
    "data.chunk_mb": AT_LEAST_ONE,
    "model.lora.r": AT_LEAST_ONE,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": FRACTION,
    "train.beta": POSITIVE,
    "train.delta": NON_NEGATIVE,
    "train.loss": _losses,
    "train.label_smoothing": Range(0, 0.5, hi_open=True),
    "train.simpo_gamma": NON_NEGATIVE,
    "train.ipo_logps": Choice(("mean", "sum")),
    "train.learning_rate": POSITIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.epochs": AT_LEAST_ONE,
    "train.max_steps": AT_LEAST_ONE,
    "train.global_batch_size": AT_LEAST_ONE,
    "train.micro_batch_size": AT_LEAST_ONE,
    "train.zero_stage": Choice((0, 1, 2, 3)),
    "train.precision": Choice(("fp32", "bf16")),
    "train.max_grad_norm": NON_NEGATIVE,
    "train.warmup_ratio": FRACTION,
    "train.min_lr_ratio": Range(0, 1),
    "train.eval_every": NON_NEGATIVE,
    "train.logits_chunk_tokens": NON_NEGATIVE,
    "train.batch_layout": Choice(("shared", "packed", "padded")),
    "train.eval_at_start": Choice(("derived", "measured", "off")),
    "train.log_every": AT_LEAST_ONE,
    "train.checkpoint_every": NON_NEGATIVE,
    "train.keep_checkpoints": AT_LEAST_ONE,
    "train.stop_at_step": AT_LEAST_ONE,
    "train.step_delay_s": NON_NEGATIVE,
    "run.num_workers": AT_LEAST_ONE,
    "run.cpus_per_worker": POSITIVE,
    "run.local_num_cpus": AT_LEAST_ONE,
    "run.max_failures": Range(-1),
    "run.node_wait_timeout_s": POSITIVE,
    "run.stop_timeout_s": POSITIVE,
    "sft.responses": _sft_responses,
}

# Keys whose values are free by design (names, paths, seeds, switches): no rule.
FREE = {
    "data.source", "data.split", "data.subset", "data.eval_source", "data.eval_split", "data.strict",
    "data.drop_duplicates",
    "model.name_or_path", "model.gguf_file", "model.trust_remote_code", "model.gradient_checkpointing",
    "model.lora.enabled", "model.lora.target_modules",
    "train.seed", "train.cache_reference", "train.record_pairs",
    "run.name", "run.output_dir", "run.storage_path", "run.resume", "run.use_gpu", "run.address",
    "run.worker_resources", "run.tensorboard", "run.mlflow_tracking_uri", "run.export_merged", "run.start_workers_early",
}


def rule_for(key: str):
    rule = RULES[key]
    if callable(rule) and not isinstance(rule, (Choice, Range)):
        rule = Choice(rule())
    return rule


def value_at(cfg: Any, key: str, default: Any = dataclasses.MISSING) -> Any:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            if default is dataclasses.MISSING:
                raise KeyError(key)
            return default
        node = getattr(node, part)
    return node


def message(key: str, value: Any, rule) -> str:
    shown = f"'{value}'" if isinstance(value, str) else f"{value}"
    return f"'{key}' must be {rule.allowed()}, got {shown}"


def check_rules(cfg: Any, error: Callable[[str], Exception] | None = None) -> None:
    """Raise ConfigError (or `error(msg)`) for the first key whose value breaks its rule. A key
    whose value is None is unset (optional keys); a key the config does not have is skipped."""
    if error is None:
        error = ConfigError
    missing = object()
    for key in RULES:
        value = value_at(cfg, key, missing)
        if value is missing or value is None:
            continue
        rule = rule_for(key)
        if not rule.ok(value):
            raise error(message(key, value, rule))
