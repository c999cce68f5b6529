"""safe-rlhf score models (`LlamaForScore`), loaded exactly as safe-rlhf builds and saves them.

No safe-rlhf import: this mirrors `ScoreModelMixin.init_score_head` / `get_scores` and the
`Normalizer` of safe-rlhf (safe_rlhf/models/score_model/__init__.py, safe_rlhf/models/normalizer.py):

* head: `nn.Linear(hidden, config.score_dim, bias=config.score_bias)`; `score_dim` defaults to 1
  and `score_bias` to **true**. Released beaver configs carry both `"bias": false` (a key that
  safe-rlhf no longer reads) and `"score_bias": true`: `score_bias` wins; `bias` is read only
  when `score_bias` is absent (configs written before the rename, or by older versions of
  our own train-scorer);
* the score is the head's output (in float32) at the last position whose attention mask is 1;
* `score_type` picks the normaliser's function: reward → affine `(x − mean) / (std + 1e-8)`,
  cost → scale `x / (std + 1e-8)`, critic → identity; it is applied only when `do_normalize`
  is true. `mean`/`var` come from the checkpoint's `normalizer.*` buffers, or, for checkpoints
  without them, from the config's `mean`/`var` lists (safe-rlhf sets the buffers from the config
  first and then loads the state dict over them), else 0 and 1;
* a missing, unexpected or wrongly shaped weight is an error (`ScoreModelError`), never a
  transformers warning: a dropped head bias shifts every score and moves the harmless ratio.

    model = load_score_model("/models/beaver-7b-unified-cost", dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safedpo_ray.models.resolve import EvalError
from safedpo_ray.runtime.safe_loading import explain_refused_pickle, weights_kwargs

NORMALIZE_FUNCTIONS = {"reward": "affine", "cost": "scale", "critic": "identity"}
NORMALIZER_TYPES = (None, "RunningMeanStd", "ExponentialMovingAverage")
# Keys a safe-rlhf checkpoint may carry that the score model does not use.
_IGNORED_UNEXPECTED = (r"lm_head\.weight", r"(^|\.)rotary_emb\.inv_freq$")
_NORMALIZER_KEY = re.compile(r"^normalizer\.(mean|var|count)$")


class ScoreModelError(EvalError):
    """A score model whose weights do not match its config; the message names the keys."""


def _llama_classes():
    from transformers import LlamaModel, LlamaPreTrainedModel

    return LlamaModel, LlamaPreTrainedModel


LlamaModel, LlamaPreTrainedModel = _llama_classes()


def head_settings(config: Any) -> dict[str, Any]:
    """The score-head settings safe-rlhf derives from a config (see the module docstring)."""
    if getattr(config, "score_bias", None) is not None:
        bias = bool(config.score_bias)
    elif getattr(config, "bias", None) is not None:
        bias = bool(config.bias)
    else:
        bias = True
    score_type = getattr(config, "score_type", None) or "reward"
    if score_type not in NORMALIZE_FUNCTIONS:
        raise ScoreModelError(f"score_type must be reward, cost or critic, got {score_type!r}")
    normalizer_type = getattr(config, "normalizer_type", None)
    if normalizer_type not in NORMALIZER_TYPES:
        raise ScoreModelError(f"normalizer_type must be RunningMeanStd, ExponentialMovingAverage or null, "
                              f"got {normalizer_type!r}")
    return {"score_dim": int(getattr(config, "score_dim", None) or 1), "score_bias": bias, "score_type": score_type,
            "normalize_function": NORMALIZE_FUNCTIONS[score_type],
            "do_normalize": bool(getattr(config, "do_normalize", False)), "normalizer_type": normalizer_type}


def normalize(x: torch.Tensor, function: str, mean: torch.Tensor, var: torch.Tensor,
              epsilon: float = 1e-8) -> torch.Tensor:
    """safe-rlhf's Normalizer.normalize."""
    std = var.sqrt()
    if function == "affine":
        return (x - mean) / (std + epsilon)
    if function == "scale":
        return x / (std + epsilon)
    if function == "translate":
        return x - mean
    if function == "identity":
        return x
    raise ValueError(f"unknown normalize function {function!r}")


class ScoreNormalizer(nn.Module):
    """safe-rlhf's normaliser buffers (mean, var, count); evaluation never updates them."""
    def __init__(self, score_dim: int, mean: Any = None, var: Any = None):
        super().__init__()
        self.register_buffer("mean", self._vector(mean, score_dim, 0.0))
        self.register_buffer("var", self._vector(var, score_dim, 1.0))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def _vector(values: Any, dim: int, default: float) -> torch.Tensor:
        if values is None:
            return torch.full((dim,), default)
        t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if t.numel() != dim:
            raise ScoreModelError(f"config mean/var has {t.numel()} values for score_dim {dim}")
        return t


@dataclass
class ScoreOutput:
    scores: torch.Tensor  # [B, L, D], float32
    end_scores: torch.Tensor  # [B, D], float32


class LlamaForScore(LlamaPreTrainedModel):
    """A Llama backbone (`model.*`) with a linear score head (`score_head.*`) and normaliser
    buffers (`normalizer.*`), key for key as safe-rlhf saves it."""

    _keys_to_ignore_on_load_missing = [r"lm_head\.weight"]
    _keys_to_ignore_on_load_unexpected = list(_IGNORED_UNEXPECTED)

    def __init__(self, config):
        super().__init__(config)
        s = head_settings(config)
        config.architectures = ["LlamaForScore"]
        config.score_dim, config.score_bias, config.score_type = s["score_dim"], s["score_bias"], s["score_type"]
        config.do_normalize, config.normalizer_type = s["do_normalize"], s["normalizer_type"]
        self.normalize_function = s["normalize_function"]
        self.model = LlamaModel(config)
        self.score_head = nn.Linear(config.hidden_size, config.score_dim, bias=config.score_bias)
        self.normalizer = ScoreNormalizer(config.score_dim, getattr(config, "mean", None), getattr(config, "var", None))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> ScoreOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        scores = self.score_head(hidden).float()
        # last position with mask 1 (right or left padding alike), as safe-rlhf's get_scores
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        end = (attention_mask.bool() * positions).max(dim=1).values.to(scores.device)
        end_scores = scores[torch.arange(scores.shape[0], device=scores.device), end]
        if self.config.do_normalize:
            mean, var = self.normalizer.mean.float(), self.normalizer.var.float()
            scores = normalize(scores, self.normalize_function, mean, var)
            end_scores = normalize(end_scores, self.normalize_function, mean, var)
        return ScoreOutput(scores=scores, end_scores=end_scores)


def is_score_model(path: str | Path) -> bool:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        return False
    cfg = json.loads(cfg_file.read_text())
    return "LlamaForScore" in (cfg.get("architectures") or []) or "score_dim" in cfg


@contextmanager
def _quiet_transformers():
    """Silence transformers' load report: every mismatch it would warn about is raised below."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def check_loading_info(path: str | Path, info: dict[str, Any], *, allow_missing: tuple[str, ...] = ()) -> None:
    """Raise ScoreModelError for missing, unexpected or mismatched weights (see `load_score_model`)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not any(re.search(p, k) for p in allow_missing))
    unexpected = sorted(k for k in info.get("unexpected_keys", ())
                        if not any(re.search(p, k) for p in _IGNORED_UNEXPECTED))
    mismatched = sorted(str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys", ()))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {', '.join(unexpected[:8])}")
    if mismatched:
        problems.append(f"wrong shape: {', '.join(mismatched[:8])}")
    if problems:
        hint = ""
        if any(k.startswith("score_head.bias") for k in missing + unexpected):
            hint = (" (the head bias follows config 'score_bias', default true; 'bias' is read only when "
                    "'score_bias' is absent)")
        raise ScoreModelError(f"score model {path}: weights do not match its config.json: "
                              + "; ".join(problems) + hint)


def load_score_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> LlamaForScore:
    """A safe-rlhf Llama score model in eval mode, strictly loaded (see the module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "model_type", None) != "llama":
        raise ScoreModelError(f"score model {path}: model_type '{getattr(config, 'model_type', None)}' "
                              "(only safe-rlhf's Llama score models are supported; other architectures load as "
                              "Hugging Face sequence classifiers)")
    with _quiet_transformers():
        # mismatched shapes are collected (not raised by transformers) so the error below names them

        with explain_refused_pickle(path):  # safe-rlhf releases ship pickles: torch.load(weights_only=True)
            model, info = LlamaForScore.from_pretrained(str(path), config=config, dtype=dtype, output_loading_info=True,
                                                        ignore_mismatched_sizes=True, **weights_kwargs(path))
    check_loading_info(path, info, allow_missing=(_NORMALIZER_KEY.pattern,))
    # Buffers absent from the checkpoint come back uninitialised: set them as safe-rlhf would.
    absent = {k.split(".")[1] for k in info.get("missing_keys", ()) if _NORMALIZER_KEY.match(k)}
    fresh = ScoreNormalizer(config.score_dim, getattr(config, "mean", None), getattr(config, "var", None))
    norm = model.normalizer
    for name in ("mean", "var", "count"):
        value = getattr(fresh if name in absent else norm, name)
        # kept in float32 whatever the weights' dtype: they divide scores that are float32
        setattr(norm, name, value.to(torch.float32 if name != "count" else torch.long))
    model.to(device).eval().requires_grad_(False)
    return model
