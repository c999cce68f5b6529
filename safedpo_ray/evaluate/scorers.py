"""Cost and reward models: loading, scoring with Ray Data actors (CPU or GPU), and the paper's arithmetic.

Two model formats, told apart by config.json:

* safe-rlhf score models (PKU-Alignment/beaver-7b-unified-cost / -reward): architectures
  ["LlamaForScore"]; loaded strictly by `score_model.load_score_model` (score_bias, score_dim,
  normaliser buffers, do_normalize; a missing or unexpected head weight is an error). The score
  is read at the last token of "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
  as safe-rlhf formats it, with BOS first and EOS last for a finished response; a truncated
  response (no stop token within generation.max_new_tokens) gets no EOS: it is scored as the
  unfinished text it is.
* any Hugging Face sequence-classification model: one label → that logit; two labels → logit 1 −
  logit 0 (positive means label 1). A tokenizer with a chat template gets the conversation (an
  unfinished assistant turn is left open). Missing weights are an error here too.

Weights load in `scoring.dtype` ('auto': bfloat16 on GPU, float32 on CPU); inputs go to the
device the model is on. The arithmetic (harmless ratio, win rate, intervals) is in metrics.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safedpo_ray.data.score_inputs import encode_for_score, pad_right, score_text, scoring_dtype
from safedpo_ray.evaluate.metrics import harmless_ratio, score_summary, win_rate
from safedpo_ray.models.loading import load_tokenizer
from safedpo_ray.models.resolve import EvalError, rows_dataset
from safedpo_ray.models.score_model import (
    LlamaForScore,
    ScoreModelError,
    check_loading_info,
    is_score_model,
    load_score_model,
)
from safedpo_ray.runtime import storage
from safedpo_ray.runtime.safe_loading import explain_refused_pickle, weights_kwargs

__all__ = ["LlamaForScore", "ScoreModelError", "Scorer", "ScoreActor", "score_with_ray", "encode_for_score",
           "score_text", "is_score_model", "harmless_ratio", "win_rate", "score_summary", "scoring_dtype"]


class Scorer:
    """One cost or reward model ready to score (prompt, response) pairs."""
    def __init__(self, path: str, *, dtype: str = "float32", device: str | torch.device = "cpu",
                 max_length: int = 1024, trust_remote_code: bool = False):
        self.path, self.max_length = str(path), max_length
        path = storage.localize(path)  # a storage URI: fetched once into this node's cache (not the driver's)
        if not Path(path).exists():
            raise EvalError(f"score model {path} does not exist (a local dir or a storage URI; hub ids are "
                            "not fetched at run time)")
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        self.safe_rlhf = is_score_model(path)
        # safe-rlhf models always read the PKU conversation; others their chat template if any
        self.template = "chat" if getattr(self.tokenizer, "chat_template", None) and not self.safe_rlhf else "pku"
        self.dtype = scoring_dtype(dtype, device)
        if self.safe_rlhf:
            self.model = load_score_model(path, dtype=self.dtype, device=device)
        else:
            from transformers import AutoModelForSequenceClassification


            with explain_refused_pickle(path):  # safetensors, or torch.load(weights_only=True)
                self.model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, dtype=self.dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
                    ignore_mismatched_sizes=True, **weights_kwargs(path))
            check_loading_info(path, info)
            if self.model.config.pad_token_id is None:
                self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self.model.to(device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 8,
              truncated: list[bool] | None = None) -> list[float]:
        truncated = list(truncated) if truncated is not None else [False] * len(prompts)
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            ids = encode_for_score(self.tokenizer, prompts[i:i + batch_size], responses[i:i + batch_size],
                                   self.max_length, template=self.template, truncated=truncated[i:i + batch_size])
            input_ids, mask = pad_right(ids, self.tokenizer.pad_token_id, self.device)
            result = self.model(input_ids=input_ids, attention_mask=mask)
            if self.safe_rlhf:
                values = result.end_scores[:, 0]
            else:
                logits = result.logits.float()
                values = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
            out.extend(float(v) for v in values.float().cpu())
        return out


def _flags(values) -> list[bool]:
    return [str(v).strip().lower() in ("true", "1") for v in values]


class ScoreActor:
    """Ray Data actor holding the cost and/or reward model; adds `cost` and `reward` columns."""
    def __init__(self, cost_model: str | None, reward_model: str | None, *, batch_size: int = 8,
                 max_length: int = 1024, dtype: str = "auto", trust_remote_code: bool = False):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        kw = dict(dtype=dtype, device=device, max_length=max_length, trust_remote_code=trust_remote_code)
        self.cost = Scorer(cost_model, **kw) if cost_model else None
        self.reward = Scorer(reward_model, **kw) if reward_model else None
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts, responses = [str(p) for p in batch["prompt"]], [str(r) for r in batch["response"]]
        truncated = _flags(batch["truncated"]) if "truncated" in batch else None
        nan = [math.nan] * len(prompts)
        out = dict(batch)
        for name, scorer in (("cost", self.cost), ("reward", self.reward)):
            out[name] = np.array(scorer.score(prompts, responses, self.batch_size, truncated) if scorer else nan)
        return out


def score_with_ray(rows: list[dict[str, Any]], *, cost_model: str | None, reward_model: str | None,
                   batch_size: int = 8, max_length: int = 1024, num_actors: int = 1, cpus_per_actor: float = 1.0,
                   gpus_per_actor: float = 0.0, dtype: str = "auto", trust_remote_code: bool = False,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Rows with prompt/response (and `truncated`) → the same rows plus `cost` and `reward` (NaN when no model)."""
    import ray.data

    if not rows:
        return []
    ds, _, blocks = rows_dataset(rows, batch_size, progress=progress)
    ds = ds.map_batches(
        ScoreActor, fn_constructor_args=(cost_model, reward_model),
        fn_constructor_kwargs={"batch_size": batch_size, "max_length": max_length, "dtype": dtype,
                               "trust_remote_code": trust_remote_code},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=min(num_actors, blocks)),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
    scored = {int(r["_order"]): r for r in ds.take_all()}
    return [{**rows[i], "cost": float(scored[i]["cost"]), "reward": float(scored[i]["reward"])} for i in range(len(rows))]
