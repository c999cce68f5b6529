"""One SafeDPO forward on a collated batch, and the metrics it produces.

Knows nothing of Ray or DeepSpeed: `policy` is any callable module returning `.logits`, the
reference is a callable returning reference log-probs. The worker loop wires these to engines.
"""

from __future__ import annotations

from typing import Callable

import torch

from safedpo_ray import logp_head
from safedpo_ray.logprobs import per_sequence_sums, token_logps_from_logits
from safedpo_ray.loss import preference_loss, uses_reference

PAIR_TYPES = ("safe_safe", "safe_unsafe", "unsafe_safe", "unsafe_unsafe")
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a collated batch, padded or packed (data/packing.py)."""
    if "position_ids" in batch:  # packed: sequence boundaries are where the positions restart
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def _targets_of(batch: dict[str, torch.Tensor]):
    if "target_ids" in batch:
        return batch["target_ids"], batch["target_mask"], batch["seq_index"], int(batch["num_sequences"])
    # A padded batch built by hand (input_ids, attention_mask, loss_mask): position t targets t+1.
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    target_ids, target_mask = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    target_ids[:, :-1], target_mask[:, :-1] = ids[:, 1:], loss_mask[:, 1:].bool()
    n = ids.shape[0]
    return target_ids, target_mask, torch.arange(n, device=ids.device)[:, None].expand_as(ids), n


def sequence_logps_and_lengths(model: Callable, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of response-token log-probs and response token counts, [2B] each, from
    one forward over the batch's rows. When the model's output layer is a log-prob layer
    (logp_head.install) only response positions are projected onto the vocabulary, in chunks;
    otherwise from the full logits."""
    target_ids, target_mask, seq_index, n = _targets_of(batch)
    head = logp_head.find(model)
    if head is not None:
        with logp_head.targets(head, target_ids, target_mask):
            token_logps = model(**model_inputs(batch)).logits[target_mask]
    else:
        logits = model(**model_inputs(batch)).logits
        token_logps = token_logps_from_logits(logits, target_ids, target_mask)
    return per_sequence_sums(token_logps, seq_index[target_mask], n)


def packing_gap(model: Callable, packed: dict[str, torch.Tensor], padded: dict[str, torch.Tensor]) -> float:
    """Largest relative gap |packed − padded| / (1 + |padded|) between the per-sequence log-probs
    of the same pairs laid out packed and padded (no gradients). Rounding gives ~1e-6 in fp32; a
    model whose attention crosses the sequence boundaries of packed rows gives far more."""
    with torch.no_grad():
        a, _ = sequence_logps_and_lengths(model, packed)
        b, _ = sequence_logps_and_lengths(model, padded)
    return float(((a - b).abs() / (1 + b.abs())).max())


PACKING_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
"""Largest `packing_gap` still taken for rounding, by precision."""


def concatenated_logps_and_lengths(model: Callable, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Chosen and rejected sequence log-probs and response token counts, one forward over the batch."""
    logps, lengths = sequence_logps_and_lengths(model, batch)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:], lengths[:half], lengths[half:]


def concatenated_logps(model: Callable, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs from one forward over the [2B, L] batch."""
    chosen, rejected, _, _ = concatenated_logps_and_lengths(model, batch)
    return chosen, rejected


def pair_type_index(chosen_unsafe: torch.Tensor, rejected_unsafe: torch.Tensor) -> torch.Tensor:
    """0 safe_safe, 1 safe_unsafe, 2 unsafe_safe, 3 unsafe_unsafe (order of PAIR_TYPES)."""
    return (2 * chosen_unsafe + rejected_unsafe).long()


def safedpo_forward(
    policy: Callable,
    reference_logps: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    batch: dict[str, torch.Tensor],
    beta: float,
    delta: float,
    *,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch (for backward) and per-example values (for metrics).

    `loss` names a function of safedpo_ray.loss.LOSSES; a reference-free one (SimPO) never calls
    `reference_logps`, which may then be None."""
    ref_chosen = ref_rejected = None
    if uses_reference(loss):
        with torch.no_grad():
            ref_chosen, ref_rejected = reference_logps(batch)
    chosen, rejected, chosen_lengths, rejected_lengths = concatenated_logps_and_lengths(policy, batch)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        loss, policy_chosen_logps=chosen, policy_rejected_logps=rejected,
        ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        chosen_unsafe=batch["chosen_unsafe"], rejected_unsafe=batch["rejected_unsafe"],
        beta=beta, delta=delta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
    )
    per_example = {
        "loss": losses.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
    }
    return losses.mean(), per_example


def loss_options(train) -> dict:
    """The keyword arguments of `safedpo_forward` that `train.*` (a TrainConfig) selects."""
    return {"loss": train.loss, "label_smoothing": train.label_smoothing, "simpo_gamma": train.simpo_gamma}


def tie_aware_accuracy(per_example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Held-out accuracy counting ties as half: an untrained policy (all rewards 0) scores 0.5."""
    margins = per_example["rewards/margins"]
    return {**per_example, "rewards/accuracies": (margins > 0).float() + 0.5 * (margins == 0).float()}


class MetricSums:
    """Sums and counts of per-example metrics, overall and per pair type; one flat tensor, so a
    single all-reduce aggregates them across workers and accumulation steps."""

    def __init__(self) -> None:
        self.sums = torch.zeros(1 + len(PAIR_TYPES), len(METRICS) + 1, dtype=torch.float64)

    def add(self, per_example: dict[str, torch.Tensor], chosen_unsafe: torch.Tensor, rejected_unsafe: torch.Tensor) -> None:
        values = torch.stack([per_example[m].double().cpu() for m in METRICS], dim=1)
        values = torch.cat([values, torch.ones(values.shape[0], 1, dtype=torch.float64)], dim=1)
        self.sums[0] += values.sum(0)
        types = pair_type_index(chosen_unsafe.cpu(), rejected_unsafe.cpu())
        self.sums[1:].index_add_(0, types, values)

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row, suffix in enumerate(("",) + tuple("/" + t for t in PAIR_TYPES)):
            count = self.sums[row, -1].item()
            if count == 0:
                continue
            for col, name in enumerate(METRICS):
                out[name + suffix] = self.sums[row, col].item() / count
            if suffix:
                out["pairs" + suffix] = count
        return out
