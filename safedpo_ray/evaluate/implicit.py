"""Implicit-reward metrics on held-out preference pairs: no generation.

The implicit reward of a response is β·(log π(y|x) − log π_ref(y|x)). Held-out pairs go through
SafeDPO's T (safe winner first; unsafe–unsafe pairs dropped), so:

* preference accuracy on safe–safe pairs: the more helpful safe response gets the higher reward;
* safe-over-unsafe accuracy on mixed pairs: the safe response gets the higher reward;
* reward margins per pair type. Ties count half (policy == reference scores 0.5).

Runs as one Ray task per model (a GPU task on a GPU cluster), reusing the training metrics code.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from safedpo_ray.config.evaluation import EvalDataConfig
from safedpo_ray.core.algorithm import MetricSums, concatenated_logps, safedpo_forward, tie_aware_accuracy
from safedpo_ray.data.pipeline import validate_rows
from safedpo_ray.data.sources import SYNTHETIC, read_rows
from safedpo_ray.data.tokenize import collate_pairs, tokenize_pairs
from safedpo_ray.data.transform import pair_category, transform_with_outcome
from safedpo_ray.models.loading import load_tokenizer, reference_logits_context
from safedpo_ray.models.resolve import EvalError, ModelSpec, load_policy, load_reference, tokenizer_source

SUMMARY_KEYS = {
    "preference_accuracy_safe_safe": "rewards/accuracies/safe_safe",
    "safe_over_unsafe_accuracy": "rewards/accuracies/safe_unsafe",
    "reward_margin_safe_safe": "rewards/margins/safe_safe",
    "reward_margin_safe_unsafe": "rewards/margins/safe_unsafe",
    "pairs_safe_safe": "pairs/safe_safe",
    "pairs_safe_unsafe": "pairs/safe_unsafe",
}


def read_source_rows(data: EvalDataConfig) -> list[dict[str, Any]]:
    if not data.source:
        return []
    split = "eval" if data.source == SYNTHETIC else data.split
    return read_rows(data.source, split=split, max_rows=data.max_rows, synthetic_prompts=data.synthetic_prompts,
                     subset=data.subset)


def load_pairs(rows: list[dict[str, Any]], schema: str = "auto") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Valid rows → pairs after T ("safedpo"), with counts of what was read, dropped and kept."""
    validated = validate_rows(rows, schema, split="eval")
    pairs, outcomes = [], Counter()
    for row in validated.rows:
        pair, outcome = transform_with_outcome(row, "safedpo")
        outcomes[f"{pair_category(row)}/{outcome}"] += 1
        if pair is not None:
            pairs.append(pair)
    stats = {"rows_read": validated.rows_read, "rows_quarantined": len(validated.quarantined),
             "pairs": len(pairs), "transform": dict(sorted(outcomes.items()))}
    return pairs, stats


def summarize(raw: dict[str, float]) -> dict[str, float]:
    out = {name: raw[key] for name, key in SUMMARY_KEYS.items() if key in raw}
    out.update({k: v for k, v in raw.items() if k.startswith(("rewards/", "pairs/"))})
    return out


@torch.no_grad()
def implicit_metrics(policy, reference, tokenizer, pairs: list[dict[str, Any]], *, beta: float,
                     batch_size: int, max_length: int, max_prompt_length: int,
                     device: str | torch.device = "cpu", progress: bool = False) -> dict[str, float]:
    """Metric means over `pairs` (dicts with prompt/chosen/rejected/chosen_unsafe/rejected_unsafe).

    `reference=None` means the policy is a PeftModel whose base (adapters off) is the reference.
    """

    if not pairs:
        raise EvalError("implicit metrics: no preference pairs left after T (all unsafe–unsafe or invalid?)")
    columns = {k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected", "chosen_unsafe", "rejected_unsafe")}
    tok = tokenize_pairs(columns, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    rows = [{k: tok[k][i] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_unsafe", "rejected_unsafe")}
            for i in range(len(pairs))]

    def reference_logps(batch):
        if reference is not None:
            return concatenated_logps(reference, batch)
        with reference_logits_context(policy):
            return concatenated_logps(policy, batch)

    sums = MetricSums()
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="implicit rewards", unit="batch")
    for i in starts:
        batch = {k: v.to(device) for k, v in collate_pairs(rows[i:i + batch_size], tokenizer.pad_token_id).items()}
        _, per_example = safedpo_forward(policy, reference_logps, batch, beta, 0.0)
        sums.add(tie_aware_accuracy(per_example), batch["chosen_unsafe"], batch["rejected_unsafe"])
    return summarize(sums.as_dict())


def run_implicit(spec: ModelSpec, pairs: list[dict[str, Any]], *, beta: float, batch_size: int,
                 max_length: int, max_prompt_length: int, dtype: str = "float32",
                 trust_remote_code: bool = False, progress: bool = False) -> dict[str, float]:
    """Load policy + reference for `spec` on this process's device and compute the metrics."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(tokenizer_source(spec), trust_remote_code=trust_remote_code)
    policy = load_policy(spec, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    reference = load_reference(spec, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    return implicit_metrics(policy, reference, tokenizer, pairs, beta=beta, batch_size=batch_size,
                            max_length=max_length, max_prompt_length=max_prompt_length, device=device,
                            progress=progress)


def run_implicit_on_ray(spec: ModelSpec, pairs: list[dict[str, Any]], *, num_gpus: float = 0.0,
                        num_cpus: float = 1.0, **kwargs) -> dict[str, float]:
    """`run_implicit` as a Ray task, so a GPU node does the work on a cluster."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(run_implicit)
    return ray.get(task.remote(spec, pairs, **kwargs))
