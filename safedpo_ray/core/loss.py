"""The SafeDPO loss: pure functions of per-sequence log-probabilities.

For one pair after the safety-aware transformation T, with h = 1 for an unsafe response:

    z      = β·(log π(y_w) − log π_ref(y_w)) − β·(log π(y_l) − log π_ref(y_l)) − (h_l − h_w)·Δ
    loss   = −log σ(z) = softplus(−z)

Δ ≥ 0 only acts on safe-vs-unsafe pairs (h_l − h_w ∈ {−1, 0, 1}); Δ = 0 is plain DPO on T(D).
After T with mode "safedpo" the winner is always safe, so h_l − h_w ∈ {0, 1}: the margin Δ is
subtracted only when a safe response beats an unsafe one, which asks the policy to separate them
by a wider implicit-reward gap.

The rest of the preference-loss family (`train.loss`: ipo, robust, hinge, simpo) follows below
`safedpo_loss`, each with Δ entering the same logit; `LOSSES` maps names to functions and
`preference_loss` dispatches on the name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safedpo_ray.core.loss_names import LOSS_NAMES, REFERENCE_FREE, uses_reference  # noqa: F401 (re-exported)


def safedpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_unsafe: torch.Tensor,
    rejected_unsafe: torch.Tensor,
    beta: float,
    delta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example SafeDPO losses and detached implicit rewards.

    All tensors have shape [B]; ``chosen_unsafe`` / ``rejected_unsafe`` hold 1 for an unsafe
    response and 0 for a safe one (bool or float). Returns ``(losses, chosen_rewards,
    rejected_rewards)``, each [B]; rewards are β·(log π − log π_ref), detached. No reduction.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h_gap = rejected_unsafe.to(chosen_logratios.dtype) - chosen_unsafe.to(chosen_logratios.dtype)
    logits = beta * (chosen_logratios - rejected_logratios) - h_gap * delta
    # −log σ(z) written as softplus(−z): exact and stable for large |z|.
    losses = F.softplus(-logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# --------------------------------------------------------------------------- the loss family
#
# T is applied to the data for every loss (data.mode). Where Δ enters, derived once: SafeDPO's
# logit is what DPO's becomes when the policy's implicit reward β·log π/π_ref stands for the
# safety-penalised reward r − Δ·h(y) (h = 1 unsafe): then the reward gap the loss sees is
#     z = β·h − g·Δ,   h = (log π − log π_ref)(y_w) − (log π − log π_ref)(y_l),   g = h_l − h_w.
# Every loss of the family is a published function of that reward gap; each below is that
# function evaluated at z. So Δ only acts on safe-vs-unsafe pairs (g ≠ 0), shifts each loss's
# own margin or target by Δ there, and Δ = 0 is the published loss. SimPO has no reference: its
# gap is β × the difference of length-normalised log-probs, minus its own margin γ.


def _logratio_gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_unsafe, rejected_unsafe):
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    dtype = chosen_logratios.dtype
    g = rejected_unsafe.to(dtype) - chosen_unsafe.to(dtype)
    return chosen_logratios, rejected_logratios, chosen_logratios - rejected_logratios, g


def _check(beta: float, delta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_unsafe, rejected_unsafe, beta: float, delta: float, chosen_lengths=None, rejected_lengths=None):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv 2310.12036, eq. 17, τ = β) with SafeDPO's margin:

        loss = (h − (1/2 + g·Δ)/β)²      = ((z − 1/2)/β)²  with z = β·h − g·Δ

    Δ = 0: (h − 1/(2β))², the published IPO. With `chosen_lengths` / `rejected_lengths` (response
    tokens) each log-ratio is first averaged per token, h = (log π − log π_ref)(y_w)/|y_w| −
    (log π − log π_ref)(y_l)/|y_l|: TRL's `ipo`, and by TRL's account how the IPO authors' reported
    results were computed. That is `train.ipo_logps=mean`, the default; without lengths (`sum`)
    h is the difference of summed log-ratios, and the same β means a different loss. IPO regresses
    h onto a finite target, so Δ changes the optimum, not only the speed: a safe winner is pushed
    to h = (1/2 + Δ)/β above an unsafe loser, no further (unsafe responses keep mass ∝
    e^{−(1/2+Δ)/β}, per token with `mean`). Rewards: β·(the log-ratios the loss sees), detached.
    """
    _check(beta, delta)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("ipo_loss: give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:  # per-token averages (train.ipo_logps=mean)
        dtype = policy_chosen_logps.dtype
        lc = chosen_lengths.to(dtype).clamp(min=1)
        lr = rejected_lengths.to(dtype).clamp(min=1)
        policy_chosen_logps, ref_chosen_logps = policy_chosen_logps / lc, ref_chosen_logps / lc
        policy_rejected_logps, ref_rejected_logps = policy_rejected_logps / lr, ref_rejected_logps / lr
    cr, rr, h, g = _logratio_gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                 ref_rejected_logps, chosen_unsafe, rejected_unsafe)
    losses = (h - (0.5 + g * delta) / beta) ** 2
    return losses, beta * cr.detach(), beta * rr.detach()


def robust_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_unsafe, rejected_unsafe, beta: float, delta: float, label_smoothing: float):
    """Robust DPO (rDPO: Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409, eq. 8;
    TRL's `robust`) with SafeDPO's margin, ε = label_smoothing (the assumed flip rate of labels):

        loss = [(1 − ε)·(−log σ(z)) − ε·(−log σ(−z))] / (1 − 2ε),    z = β·h − g·Δ
             = −log σ(z) − ε/(1 − 2ε)·z                (as −log σ(−z) = −log σ(z) + z)

    It is the unbiased estimate of the clean DPO loss when each label was flipped with
    probability ε. Not cDPO (Mitchell 2023, "A note on DPO with noisy preferences":
    (1 − ε)·(−log σ(z)) + ε·(−log σ(−z)), TRL's `sigmoid` with label_smoothing), which caps z at
    log((1 − ε)/ε) and so would cap the safe-over-unsafe gap. ε = 0 is SafeDPO's sigmoid loss.
    The linear term makes the loss unbounded below and its gradient never vanishes (−β·ε/(1−2ε)
    per unit of h at z → ∞); it stays finite. Rewards: β·log-ratios, detached.
    """
    _check(beta, delta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    cr, rr, h, g = _logratio_gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                 ref_rejected_logps, chosen_unsafe, rejected_unsafe)
    z = beta * h - g * delta
    eps = label_smoothing
    losses = ((1 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1 - 2 * eps)
    return losses, beta * cr.detach(), beta * rr.detach()


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               chosen_unsafe, rejected_unsafe, beta: float, delta: float):
    """Hinge (SLiC-HF's calibration loss, Zhao et al. 2023, "SLiC-HF", arXiv 2305.10425, on
    reference-normalised likelihoods as in TRL's `hinge`, margin 1/β) with SafeDPO's margin:

        loss = max(0, 1 − z) = max(0, 1 + g·Δ − β·h)

    Δ = 0: max(0, 1 − β·h). A safe winner over an unsafe loser must reach β·h ≥ 1 + Δ; past it the
    loss and its gradient are 0, so the optimum is a set, not a point. Rewards as for DPO.
    """
    _check(beta, delta)
    cr, rr, h, g = _logratio_gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                 ref_rejected_logps, chosen_unsafe, rejected_unsafe)
    losses = torch.relu(1 + g * delta - beta * h)
    return losses, beta * cr.detach(), beta * rr.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
               chosen_unsafe, rejected_unsafe, beta: float, delta: float, gamma: float):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv 2405.14734, eq. 6) with SafeDPO's margin; no reference model:

        z    = β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ − g·Δ
        loss = −log σ(z)

    |y| = response tokens. γ is SimPO's target reward margin; Δ adds to it on safe-vs-unsafe
    pairs (γ + Δ when the safe response wins). Δ = 0: the published SimPO (TRL CPO `simpo` with
    simpo_gamma = γ). Rewards: β·log π(y)/|y| (SimPO's reward), detached.
    """
    _check(beta, delta)
    chosen_avg = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    rejected_avg = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1)
    dtype = chosen_avg.dtype
    g = rejected_unsafe.to(dtype) - chosen_unsafe.to(dtype)
    z = beta * (chosen_avg - rejected_avg) - gamma - g * delta
    return F.softplus(-z), beta * chosen_avg.detach(), beta * rejected_avg.detach()


LOSSES = {"sigmoid": safedpo_loss, "ipo": ipo_loss, "robust": robust_loss, "hinge": hinge_loss,
          "simpo": simpo_loss}
"""`train.loss` name → pure loss function (the names: loss_names.LOSS_NAMES, in that order)."""
IPO_LOGPS = ("mean", "sum")
"""`train.ipo_logps`: IPO's log-ratios averaged per response token (default, as TRL) or summed."""
assert tuple(LOSSES) == LOSS_NAMES, "loss_names.LOSS_NAMES and LOSSES name the same losses"


def preference_loss(loss: str, *, policy_chosen_logps, policy_rejected_logps, chosen_unsafe, rejected_unsafe,
                    beta: float, delta: float, ref_chosen_logps=None, ref_rejected_logps=None,
                    chosen_lengths=None, rejected_lengths=None, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.0, ipo_logps: str = "mean"):
    """Dispatch on the loss name: (losses, chosen_rewards, rejected_rewards), each [B].
    `ipo_logps` (train.ipo_logps): 'mean' averages IPO's log-ratios per response token (TRL's
    `ipo`; needs the lengths), 'sum' uses the sequence sums."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; one of {', '.join(LOSSES)}")
    flags = (chosen_unsafe, rejected_unsafe)
    if loss == "simpo":
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                          *flags, beta, delta, simpo_gamma)
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *flags, beta, delta)
    if loss == "robust":
        return robust_loss(*args, label_smoothing)
    if loss == "ipo":
        if ipo_logps not in IPO_LOGPS:
            raise ValueError(f"ipo_logps must be one of {', '.join(IPO_LOGPS)}, got {ipo_logps!r}")
        if ipo_logps == "mean":
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("ipo_logps='mean' needs chosen_lengths and rejected_lengths")
            return ipo_loss(*args, chosen_lengths, rejected_lengths)
    return LOSSES[loss](*args)
