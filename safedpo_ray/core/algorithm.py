"""One SafeDPO forward on a collated batch, and the metrics it produces.

Knows nothing of Ray or DeepSpeed: `policy` is any callable module returning `.logits`, the
reference is a callable returning reference log-probs. The worker loop wires these to engines.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from safedpo_ray.core import logp_head
from safedpo_ray.core.logprobs import per_sequence_sums, token_logps_from_logits
from safedpo_ray.core.loss import preference_loss, uses_reference

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


def model_inputs(model: Callable, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a collated batch of any layout (data/packing.py)."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_mask_4d" in batch:  # shared prompts: a boolean [R, 1, C, C] mask, True = attend
        inputs.update(position_ids=batch["position_ids"],
                      attention_mask=attention_mask_4d(model, batch["attention_mask_4d"]))
    elif "position_ids" in batch:  # packed: sequence boundaries are where the positions restart
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def attention_implementation(model: Any) -> str | None:
    """The attention implementation a (wrapped) transformers model runs, e.g. 'sdpa', 'eager'."""
    module = model
    for _ in range(4):  # DeepSpeed engine → PEFT model → LoRA model → transformers model
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            return config._attn_implementation
        module = getattr(module, "module", None) or getattr(module, "base_model", None) or getattr(module, "model", None)
        if module is None:
            break
    return None


SHARED_PROMPT_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a custom 4D mask (the shared-prompt layout)."""


def attention_mask_4d(model: Any, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean [R, 1, C, C] mask in the form the model's attention takes: sdpa uses it as is;
    eager adds it to the scores (0 where allowed, the dtype's minimum elsewhere)."""
    impl = attention_implementation(model)
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"the shared-prompt layout needs attention that takes a 4D mask ({', '.join(SHARED_PROMPT_ATTENTION)}); "
                     f"this model runs {impl!r}: use train.batch_layout=packed")


def _targets_of(batch: dict[str, torch.Tensor]):
    if "target_pos" in batch:
        return batch["target_pos"], batch["target_ids"], batch["seq_index"], int(batch["num_sequences"])
    # A padded batch built by hand (input_ids, attention_mask, loss_mask): position t targets t+1.
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    rows, cols = torch.nonzero(loss_mask[:, 1:], as_tuple=True)
    return rows * ids.shape[1] + cols, ids[rows, cols + 1], rows, ids.shape[0]


def sequence_logps_and_lengths(model: Callable, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of response-token log-probs and response token counts, [2B] each, from
    one forward over the batch's rows. When the model's output layer is a log-prob layer
    (logp_head.install) only the scored positions are projected onto the vocabulary, in chunks;
    otherwise from the full logits."""
    target_pos, target_ids, seq_index, n = _targets_of(batch)
    head = logp_head.find(model)
    if head is not None:
        with logp_head.targets(head, target_pos, target_ids):
            token_logps = model(**model_inputs(model, batch)).logits
    else:
        logits = model(**model_inputs(model, batch)).logits
        token_logps = token_logps_from_logits(logits.flatten(0, 1), target_pos, target_ids)
    return per_sequence_sums(token_logps, seq_index, n)


def layout_gap(model: Callable, laid_out: dict[str, torch.Tensor], padded: dict[str, torch.Tensor]) -> float:
    """Largest relative gap |a − b| / (1 + |b|) between the per-sequence log-probs of the same
    pairs in another layout (a) and padded (b), without gradients. Rounding gives ~1e-6 in fp32;
    a model whose attention crosses the boundaries of packed or shared rows gives far more."""
    with torch.no_grad():
        a, _ = sequence_logps_and_lengths(model, laid_out)
        b, _ = sequence_logps_and_lengths(model, padded)
    return float(((a - b).abs() / (1 + b.abs())).max())


LAYOUT_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
"""Largest `layout_gap` still taken for rounding, by precision."""

LAYOUT_FALLBACK = {"shared": "packed", "packed": "padded"}
"""The layout to try when one is not supported or not exact for a model."""


def usable_layout(model: Callable, layout: str, collate: Callable[[str], dict[str, torch.Tensor]],
                  precision: str, agree: Callable[[float], float] = lambda gap: gap) -> tuple[str, str]:
    """The first of `layout` and its fallbacks whose log-probs match the padded layout's on the
    batch `collate(layout)` gives, and a note when it is not `layout` itself. `agree` combines
    the gap over workers (all must call this together: the forwards are collective under ZeRO-3)."""
    tried = []
    while layout != "padded":
        supported = layout != "shared" or attention_implementation(model) in SHARED_PROMPT_ATTENTION
        gap = agree(layout_gap(model, collate(layout), collate("padded")) if supported else float("inf"))
        if gap <= LAYOUT_TOLERANCE[precision]:
            break
        tried.append(f"{layout}: " + ("its attention takes no 4D mask" if not supported else
                                      f"log-probs {gap:.2g} (relative) away from padded ones"))
        layout = LAYOUT_FALLBACK[layout]
    return layout, (f"batch layout {layout} ({'; '.join(tried)})" if tried else "")


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
    ipo_logps: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch (for backward) and per-example values (for metrics).

    `loss` names a function of safedpo_ray.core.loss.LOSSES; a reference-free one (SimPO) never calls
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
        ipo_logps=ipo_logps,
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
    return {"loss": train.loss, "label_smoothing": train.label_smoothing, "simpo_gamma": train.simpo_gamma,
            "ipo_logps": train.ipo_logps}


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
