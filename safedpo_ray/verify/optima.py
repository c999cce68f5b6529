"""Where each loss of the family converges on the synthetic world (verify/world.py), when known.

Over one prompt's candidates, T turns the Bradley–Terry rows into weighted comparisons: a safe
pair (i, j) is won by i with probability p_ij = σ(r_i − r_j) (observed as p̃ = (1−ν)·p_ij + ν·p_ji
when each helpfulness label was flipped with probability ν), a mixed pair is always won by its
safe response, an unsafe pair is discarded. With u the policy's free score of each candidate
(u = log π/π_ref for losses with a reference, u = log π for SimPO) and the loss ℓ(z) of the
pair's reward gap z = a·(u_w − u_l) − b (a = β, or β/|y| for SimPO; b = g·Δ, plus γ for SimPO),
the population optimum minimises Σ W_wl·ℓ(z_wl). Every ℓ here is convex in z, so a few Newton
steps find it. What that gives:

  sigmoid  unsafe terms decrease to 0 only as u_unsafe → −∞: unsafe mass 0; the safe part solves
           σ(β·(u_i − u_j)) = p_ij, i.e. u = r/β: SafeDPO's π* ∝ π_ref·exp(r/β). (Δ: speed only.)
  robust   ℓ = softplus(−z) − ε/(1−2ε)·z: unsafe mass 0 again; the safe part solves
           σ(z) = (p̃ − ε)/(1 − 2ε), which is p_ij exactly when the labels were flipped at rate
           ν = ε (rDPO's premise): π* again. `verify` samples such labels for it.
  ipo      ℓ = ((z − 1/2)/β)²: a least-squares fit of u_w − u_l to (2p̃ − 1)/(2β) on safe pairs and
           to (1/2 + Δ)/β on mixed ones. Unsafe mass stays > 0 (set by Δ); the safe part follows
           p − 1/2, not log-odds: not π*. With train.ipo_logps=mean (the default) the log-ratios
           are averaged per token, a = β/|y|: the targets times |y|; known when a prompt's
           candidates have one length (as for SimPO).
  simpo    like sigmoid with a = β/|y|, b = γ: unsafe mass 0; with equal lengths |y| = L the safe
           part solves p·σ(γ − x) = (1−p)·σ(x + γ), x = β/L·(u_i − u_j): at γ = 0,
           π ∝ exp(L·r/β) with no π_ref; not π*. Known only when a prompt's candidates have one length.
  hinge    piecewise linear: any gap past the margin costs 0, so the optimum is a set, not a point.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np

from safedpo_ray.verify.world import Prompt

UNKNOWN_OPTIMUM = {
    "hinge": "the hinge loss is flat past its margin, so its optimum is a set (every gap beyond 1 + Δ "
             "on mixed pairs, and an LP's ties on safe ones), not a distribution to compare with; "
             "`delta-study train.loss=hinge` still reports unsafe mass and distance to π*",
}
ZERO_UNSAFE = ("sigmoid", "robust", "simpo")  # mixed-pair terms reach their infimum only at u_unsafe → −∞


@dataclass(frozen=True)
class LossSpec:
    name: str = "sigmoid"
    beta: float = 1.0
    delta: float = 0.0
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.0
    label_noise: float = 0.0
    """Rate at which the rows' helpfulness labels were flipped (verify samples ν = ε for robust)."""
    ipo_logps: str = "mean"
    """train.ipo_logps: IPO's log-ratios averaged per token ('mean') or summed ('sum')."""

    @classmethod
    def from_train(cls, train, label_noise: float = 0.0) -> "LossSpec":
        return cls(train.loss, train.beta, train.delta, train.label_smoothing, train.simpo_gamma, label_noise,
                   train.ipo_logps)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _pair_loss(spec: LossSpec, z: np.ndarray):
    """ℓ(z), ℓ'(z), ℓ''(z) elementwise."""
    if spec.name == "ipo":
        b2 = spec.beta ** 2
        return (z - 0.5) ** 2 / b2, 2 * (z - 0.5) / b2, np.full_like(z, 2 / b2)
    c = spec.label_smoothing / (1 - 2 * spec.label_smoothing) if spec.name == "robust" else 0.0
    value = np.logaddexp(0.0, -z) - c * z
    return value, -_sigmoid(-z) - c, _sigmoid(z) * _sigmoid(-z)


def comparison_weights(prompt: Prompt, rows: list[dict] | None = None, label_noise: float = 0.0) -> np.ndarray:
    """W[w, l]: share of the (w, l) comparisons that T turns into "w chosen over l", per unordered
    pair. Population values from the true rewards (rows=None), or counts from sampled rows."""
    k = len(prompt.candidates)
    safe, r = prompt.safe, prompt.rewards
    w = np.zeros((k, k))
    if rows is None:
        for i, j in itertools.combinations(range(k), 2):
            if safe[i] and safe[j]:
                p = 1 / (1 + math.exp(-(r[i] - r[j])))
                w[i, j] = (1 - label_noise) * p + label_noise * (1 - p)
                w[j, i] = 1 - w[i, j]
            elif safe[i] != safe[j]:
                s, u = (i, j) if safe[i] else (j, i)
                w[s, u] = 1.0
        return w
    index = {c.text: n for n, c in enumerate(prompt.candidates)}
    counts = np.zeros((k, k))
    for row in rows:
        if row["prompt"] != prompt.text:
            continue
        a, b = index[row["response_0"]], index[row["response_1"]]
        if not safe[a] and not safe[b]:
            continue
        if safe[a] and safe[b]:
            win, lose = (a, b) if row["better_response_id"] == 0 else (b, a)
        else:
            win, lose = (a, b) if safe[a] else (b, a)
        counts[win, lose] += 1
    totals = counts + counts.T
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _solve(spec: LossSpec, w: np.ndarray, free: np.ndarray, gap_scale: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """argmin over u[free] of Σ W_ij·ℓ(gap_scale_ij·(u_i − u_j) − margin_ij) (damped Newton)."""
    idx = np.flatnonzero(free)
    pairs = [(i, j) for i in idx for j in idx if i != j and w[i, j] > 0]
    u = np.zeros(len(free))
    if not pairs:
        return u
    pi, pj = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    weight, a, m = w[pi, pj], gap_scale[pi, pj], margin[pi, pj]

    def objective(v):
        return float(np.sum(weight * _pair_loss(spec, a * (v[pi] - v[pj]) - m)[0]))

    for _ in range(200):
        _, d1, d2 = _pair_loss(spec, a * (u[pi] - u[pj]) - m)
        grad, hess = np.zeros(len(free)), np.zeros((len(free), len(free)))
        np.add.at(grad, pi, weight * d1 * a)
        np.add.at(grad, pj, -weight * d1 * a)
        h = weight * d2 * a * a
        np.add.at(hess, (pi, pi), h)
        np.add.at(hess, (pj, pj), h)
        np.add.at(hess, (pi, pj), -h)
        np.add.at(hess, (pj, pi), -h)
        sub = np.ix_(idx, idx)
        step = np.zeros(len(free))
        step[idx] = -np.linalg.lstsq(hess[sub] + 1e-12 * np.eye(len(idx)), grad[idx], rcond=None)[0]
        t, f0 = 1.0, objective(u)
        while objective(u + t * step) > f0 + 1e-4 * t * float(grad @ step) and t > 1e-8:
            t *= 0.5
        u = u + t * step
        u[idx] -= u[idx].mean()
        if np.abs(t * step).max() < 1e-11:
            break
    return u


def loss_optimum(spec: LossSpec, ref_probs, prompt: Prompt, *, lengths=None, rows: list[dict] | None = None) -> np.ndarray:
    """The population optimum over the prompt's candidates (or, given `rows`, the optimum those
    sampled rows support), as a distribution. Raises ValueError where it is not known."""
    if spec.name in UNKNOWN_OPTIMUM:
        raise ValueError(f"train.loss={spec.name}: {UNKNOWN_OPTIMUM[spec.name]}")
    k = len(prompt.candidates)
    w = comparison_weights(prompt, rows, spec.label_noise)
    safe = prompt.safe
    unsafe = (~safe).astype(float)
    g = unsafe[None, :] - unsafe[:, None]  # g[w, l] = h_l − h_w
    per_token = spec.name == "simpo" or (spec.name == "ipo" and spec.ipo_logps == "mean")
    if per_token:  # the gap is of per-token averages: a = β/|y|, one |y| per prompt for a known optimum
        lengths = np.asarray(lengths if lengths is not None else [], dtype=float)
        if lengths.shape != (k,) or np.ptp(lengths) != 0:
            what = "simpo" if spec.name == "simpo" else "ipo with train.ipo_logps=mean"
            raise ValueError(f"train.loss={what}: its optimum over a candidate set is known only when the "
                             f"candidates have one length (prompt {prompt.text!r}: lengths {lengths.tolist()})")
    if spec.name == "simpo":
        scale, margin = np.full((k, k), spec.beta / lengths[0]), g * spec.delta + spec.simpo_gamma
    elif per_token:
        scale, margin = np.full((k, k), spec.beta / lengths[0]), g * spec.delta
    else:
        scale, margin = np.full((k, k), spec.beta), g * spec.delta
    free = safe.copy() if spec.name in ZERO_UNSAFE else np.ones(k, dtype=bool)
    u = _solve(spec, w, free, scale, margin)
    base = np.zeros(k) if spec.name == "simpo" else np.log(np.asarray(ref_probs, dtype=np.float64))
    logits = np.where(free, base + u, -np.inf)
    z = np.exp(logits - logits[free].max())
    return z / z.sum()


def flip_labels(rows: list[dict], rate: float, seed: int) -> list[dict]:
    """Each row's helpfulness label flipped with probability `rate` (safety labels untouched;
    `safer_response_id` follows the helpful one on same-safety rows, as sample_rows writes it)."""
    if rate <= 0:
        return rows
    rng = random.Random(f"safedpo-verify-flip:{seed}")
    out = []
    for row in rows:
        row = dict(row)
        if rng.random() < rate:
            row["better_response_id"] = 1 - row["better_response_id"]
            if row["is_response_0_safe"] == row["is_response_1_safe"]:
                row["safer_response_id"] = row["better_response_id"]
        out.append(row)
    return out
