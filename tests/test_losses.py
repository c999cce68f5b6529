"""The preference-loss family with SafeDPO's margin: hand-derived values, the published forms at
Δ = 0, Δ acting only on safe-vs-unsafe pairs, finite gradients at extreme log-ratios."""

import math

import pytest
import torch
import torch.nn.functional as F

from safedpo_ray.core.algorithm import safedpo_forward
from safedpo_ray.core.loss import (
    LOSSES, REFERENCE_FREE, hinge_loss, ipo_loss, preference_loss, robust_loss, safedpo_loss, simpo_loss,
    uses_reference,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# The rows of test_loss.py: β = 0.1, policy (chosen, rejected) = (−1, −3), reference (−2, −2):
# log-ratios 1 and −1, h = 2, β·h = 0.2. Flags (chosen, rejected) = safe/safe, safe/unsafe,
# unsafe/safe, unsafe/unsafe, so g = h_l − h_w = 0, 1, −1, 0; Δ = 2: z = β·h − g·Δ = 0.2, −1.8, 2.2, 0.2.
ROWS = dict(policy_chosen_logps=t(-1, -1, -1, -1), policy_rejected_logps=t(-3, -3, -3, -3),
            ref_chosen_logps=t(-2, -2, -2, -2), ref_rejected_logps=t(-2, -2, -2, -2),
            chosen_unsafe=t(0, 0, 1, 1), rejected_unsafe=t(0, 1, 0, 1))


def rows_args():
    r = ROWS
    return (r["policy_chosen_logps"], r["policy_rejected_logps"], r["ref_chosen_logps"], r["ref_rejected_logps"],
            r["chosen_unsafe"], r["rejected_unsafe"])


def test_ipo_hand_derived():
    """loss = (h − (1/2 + g·Δ)/β)², h = 2, β = 0.1, Δ = 2:
      g = 0:  (2 − 0.5/0.1)²       = (2 − 5)²  = 9
      g = 1:  (2 − (0.5 + 2)/0.1)² = (2 − 25)² = 529
      g = −1: (2 − (0.5 − 2)/0.1)² = (2 + 15)² = 289
    Δ = 0 gives IPO's (h − 1/(2β))² = 9 on every row."""
    losses, cr, rr = ipo_loss(*rows_args(), beta=0.1, delta=2.0)
    assert losses.tolist() == pytest.approx([9.0, 529.0, 289.0, 9.0], abs=1e-9)
    assert cr.tolist() == pytest.approx([0.1] * 4) and rr.tolist() == pytest.approx([-0.1] * 4)
    plain, _, _ = ipo_loss(*rows_args(), beta=0.1, delta=0.0)
    assert plain.tolist() == pytest.approx([9.0] * 4, abs=1e-9)


def test_ipo_per_token_mean_hand_derived():
    """train.ipo_logps=mean (the default): each log-ratio averaged over its response's tokens.
    Chosen log-ratio 1 over 4 tokens = 0.25, rejected −1 over 2 tokens = −0.5: h = 0.75; β = 0.1:
      g = 0:  (0.75 − 5)²  = 18.0625      g = 1:  (0.75 − 25)² = 588.0625
      g = −1: (0.75 + 15)² = 248.0625
    'sum' (no lengths) keeps h = 2: 9, 529, 289 as above. Rewards: β × the averaged log-ratios."""
    lc, lr = t(4, 4, 4, 4), t(2, 2, 2, 2)
    losses, cr, rr = preference_loss("ipo", **ROWS, chosen_lengths=lc, rejected_lengths=lr, beta=0.1, delta=2.0)
    assert losses.tolist() == pytest.approx([18.0625, 588.0625, 248.0625, 18.0625], abs=1e-9)
    assert cr.tolist() == pytest.approx([0.025] * 4) and rr.tolist() == pytest.approx([-0.05] * 4)
    summed, _, _ = preference_loss("ipo", **ROWS, chosen_lengths=lc, rejected_lengths=lr, beta=0.1, delta=2.0,
                                   ipo_logps="sum")
    assert summed.tolist() == pytest.approx([9.0, 529.0, 289.0, 9.0], abs=1e-9)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        preference_loss("ipo", **ROWS, beta=0.1, delta=2.0)


def test_robust_hand_derived():
    """ε = 0.1: loss = [0.9·softplus(−z) − 0.1·softplus(z)]/0.8 = softplus(−z) − (0.1/0.8)·z.
      z = 0.2:  0.598138869381592 − 0.025 = 0.573138869381592
      z = −1.8: 1.952977610526074 + 0.225 = 2.177977610526074
      z = 2.2:  0.105083319768696 − 0.275 = −0.169916680231304   (below 0: rDPO is unbounded below)
    (softplus values as in test_loss.py's hand derivation)."""
    losses, _, _ = robust_loss(*rows_args(), beta=0.1, delta=2.0, label_smoothing=0.1)
    expected = [0.573138869381592, 2.177977610526074, -0.169916680231304, 0.573138869381592]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_hinge_hand_derived():
    """loss = max(0, 1 − z): z = 0.2 → 0.8, z = −1.8 → 2.8, z = 2.2 → 0; Δ = 0: max(0, 1 − 0.2) = 0.8."""
    losses, _, _ = hinge_loss(*rows_args(), beta=0.1, delta=2.0)
    assert losses.tolist() == pytest.approx([0.8, 2.8, 0.0, 0.8], abs=1e-12)
    plain, _, _ = hinge_loss(*rows_args(), beta=0.1, delta=0.0)
    assert plain.tolist() == pytest.approx([0.8] * 4, abs=1e-12)


def test_simpo_hand_derived():
    """log π(y_w) = −2 over 4 tokens (mean −0.5), log π(y_l) = −6 over 3 tokens (mean −2); β = 2,
    γ = 0.5, Δ = 1: β·(−0.5 − (−2)) = 3, z = 3 − 0.5 − g·1 = 2.5, 1.5, 3.5 for g = 0, 1, −1.
      −log σ(2.5) = log(1 + e^−2.5) = 0.0788897342925496
      −log σ(1.5) = log(1 + e^−1.5) = 0.2014132779827524
      −log σ(3.5) = log(1 + e^−3.5) = 0.0297504182726206
    Rewards β·mean log-prob: chosen −1, rejected −4."""
    losses, cr, rr = simpo_loss(t(-2, -2, -2, -2), t(-6, -6, -6, -6), t(4, 4, 4, 4), t(3, 3, 3, 3),
                                chosen_unsafe=t(0, 0, 1, 1), rejected_unsafe=t(0, 1, 0, 1), beta=2.0, delta=1.0, gamma=0.5)
    expected = [0.0788897342925496, 0.2014132779827524, 0.0297504182726206, 0.0788897342925496]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert cr.tolist() == pytest.approx([-1.0] * 4) and rr.tolist() == pytest.approx([-4.0] * 4)


def random_pairs(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(n, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    cu = torch.randint(0, 2, (n,), generator=g).double()
    ru = torch.randint(0, 2, (n,), generator=g).double()
    lc = torch.randint(1, 50, (n,), generator=g).double()
    lr = torch.randint(1, 50, (n,), generator=g).double()
    return pc, pr, rc, rr, cu, ru, lc, lr


def test_delta_zero_is_the_published_loss():
    """Δ = 0 against the papers' formulas written as TRL writes them (DPOTrainer / CPOTrainer)."""
    pc, pr, rc, rr, cu, ru, lc, lr = random_pairs()
    beta, eps, gamma = 0.3, 0.2, 0.7
    logits = (pc - pr) - (rc - rr)  # TRL: chosen_logratios − rejected_logratios
    published = {
        "sigmoid": -F.logsigmoid(beta * logits),
        # Azar et al. eq. 17, τ = β, on per-token averages as TRL's `ipo` (train.ipo_logps=mean)
        "ipo": (((pc - rc) / lc - (pr - rr) / lr) - 1 / (2 * beta)) ** 2,
        "robust": (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps),
        "hinge": torch.relu(1 - beta * logits),
        # SimPO eq. 6; TRL CPO: logits = π_logratios − γ/β, loss = −log σ(β·logits)
        "simpo": -F.logsigmoid(beta * ((pc / lc - pr / lr) - gamma / beta)),
    }
    for name, expected in published.items():
        losses, _, _ = preference_loss(
            name, policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
            chosen_lengths=lc, rejected_lengths=lr, chosen_unsafe=cu, rejected_unsafe=ru, beta=beta, delta=0.0,
            label_smoothing=eps if name == "robust" else 0.0, simpo_gamma=gamma)
        assert torch.allclose(losses, expected, atol=1e-10), name


def test_robust_at_zero_smoothing_is_safedpo():
    pc, pr, rc, rr, cu, ru, _, _ = random_pairs(seed=3)
    a, _, _ = robust_loss(pc, pr, rc, rr, cu, ru, beta=0.5, delta=3.0, label_smoothing=0.0)
    b, _, _ = safedpo_loss(pc, pr, rc, rr, cu, ru, beta=0.5, delta=3.0)
    assert torch.allclose(a, b, atol=1e-12)


def call(name, pc, pr, rc, rr, cu, ru, lc, lr, delta, beta=0.5):
    return preference_loss(name, policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                           ref_rejected_logps=rr, chosen_lengths=lc, rejected_lengths=lr, chosen_unsafe=cu,
                           rejected_unsafe=ru, beta=beta, delta=delta,
                           label_smoothing=0.1 if name == "robust" else 0.0, simpo_gamma=0.3)[0]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_delta_acts_only_on_mixed_pairs(name):
    """Same-safety pairs: identical losses at any Δ. Mixed pairs: Δ is exactly a shift of the
    margin, loss_Δ(β·h) = loss_0(β·h − g·Δ) (for SimPO, of β·(mean log-prob gap)). Safe over
    unsafe: strictly harder where the loss is not saturated. Unsafe over safe: never harder for
    the losses monotone in z; IPO, a regression, moves its target to β·h = 1/2 − Δ instead."""
    pc, pr, rc, rr, _, _, lc, lr = random_pairs(n=8, seed=1)
    pc, pr, rc, rr = pc / 50, pr / 50, rc / 50, rr / 50  # small log-ratios: nothing saturated
    beta, delta = 0.5, 3.0
    for cu, ru in ((0, 0), (1, 1), (0, 1), (1, 0)):
        g = ru - cu
        flags = (torch.full((8,), float(cu), dtype=torch.float64), torch.full((8,), float(ru), dtype=torch.float64))
        base = call(name, pc, pr, rc, rr, *flags, lc, lr, delta=0.0, beta=beta)
        wide = call(name, pc, pr, rc, rr, *flags, lc, lr, delta=delta, beta=beta)
        # the same pairs with the chosen response's score lowered by g·Δ/β (per token for SimPO)
        shift = g * delta / beta * (lc if name in ("simpo", "ipo") else 1.0)
        shifted = call(name, pc - shift, pr, rc, rr, *flags, lc, lr, delta=0.0, beta=beta)
        assert torch.allclose(wide, shifted, atol=1e-9), (name, cu, ru)
        if g == 0:
            assert torch.equal(base, wide), (name, cu, ru)
        elif g > 0:
            assert (wide > base).all(), (name, cu, ru)
        elif name != "ipo":
            assert (wide <= base).all(), (name, cu, ru)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("gap", [5000.0, -5000.0])
def test_gradients_finite_at_extreme_logratios(name, gap):
    pc = torch.tensor([gap / 2, gap, 0.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-gap / 2, 0.0, -gap], dtype=torch.float64, requires_grad=True)
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    losses = call(name, pc, pr, zeros, zeros, zeros, ones, ones * 7, ones * 2, delta=20.0, beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # float32 too (what the workers use)
    pc32 = pc.detach().float().requires_grad_()
    losses32 = call(name, pc32, pr.detach().float(), zeros.float(), zeros.float(), zeros.float(), ones.float(),
                    ones.float() * 7, ones.float() * 2, delta=20.0, beta=1.0)
    losses32.sum().backward()
    assert torch.isfinite(losses32).all() and torch.isfinite(pc32.grad).all()


def test_robust_gradient_never_vanishes():
    """rDPO = softplus(−z) − ε/(1−2ε)·z: at z → ∞ the gradient in z tends to −ε/(1−2ε), not 0."""
    pc = torch.tensor([1000.0], dtype=torch.float64, requires_grad=True)
    losses, _, _ = robust_loss(pc, t(0), t(0), t(0), t(0), t(1), beta=1.0, delta=0.0, label_smoothing=0.2)
    losses.backward()
    assert pc.grad.item() == pytest.approx(-0.2 / 0.6)


def test_registry_and_reference_free():
    assert set(LOSSES) == {"sigmoid", "ipo", "robust", "hinge", "simpo"}
    from safedpo_ray.core.loss_names import LOSS_NAMES

    assert tuple(LOSSES) == LOSS_NAMES  # what a config is checked against, without torch
    assert LOSSES["sigmoid"] is safedpo_loss
    assert REFERENCE_FREE == {"simpo"} and not uses_reference("simpo") and uses_reference("ipo")
    with pytest.raises(ValueError, match="unknown loss"):
        preference_loss("kto", policy_chosen_logps=t(0), policy_rejected_logps=t(0), chosen_unsafe=t(0),
                        rejected_unsafe=t(0), beta=0.1, delta=0.0)
    for bad in (dict(beta=0.0, delta=1.0), dict(beta=0.1, delta=-1.0)):
        for fn in (ipo_loss, hinge_loss):
            with pytest.raises(ValueError):
                fn(t(0), t(0), t(0), t(0), t(0), t(0), **bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(t(0), t(0), t(0), t(0), t(0), t(0), beta=0.1, delta=0.0, label_smoothing=0.5)


class _Model(torch.nn.Module):
    """Logits that depend on a parameter; the forward counts its calls."""

    def __init__(self, vocab=5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, vocab))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.calls += 1
        logits = self.w[None, None, :] * (1 + input_ids[..., None].float())

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_forward_dispatch_and_reference_free_skips_reference():
    from safedpo_ray.data.tokenize import collate_pairs

    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 0], "rejected_ids": [2], "chosen_unsafe": False,
             "rejected_unsafe": True}]
    batch = collate_pairs(rows, pad_token_id=0)
    policy, reference = _Model(), _Model()
    calls = []

    def reference_logps(b):
        calls.append(1)
        from safedpo_ray.core.algorithm import concatenated_logps
        return concatenated_logps(reference, b)

    loss, per = safedpo_forward(policy, reference_logps, batch, 0.5, 1.0, loss="simpo", simpo_gamma=0.2)
    assert calls == [] and policy.calls == 1
    assert torch.isfinite(loss)
    # SimPO's reward: β × mean log-prob over the 3 chosen / 1 rejected response tokens
    assert per["rewards/chosen"].item() == pytest.approx(0.5 * per["logps/chosen"].item() / 3)
    assert per["rewards/rejected"].item() == pytest.approx(0.5 * per["logps/rejected"].item() / 1)
    loss_ipo, per_ipo = safedpo_forward(policy, reference_logps, batch, 0.5, 1.0, loss="ipo")
    assert calls == [1]
    # policy == reference (same init): h = 0, g = 1 → (0 − (0.5 + 1)/0.5)² = 9
    assert loss_ipo.item() == pytest.approx(9.0)
    loss_default, _ = safedpo_forward(policy, reference_logps, batch, 0.5, 1.0)
    assert loss_default.item() == pytest.approx(math.log1p(math.exp(1.0)))  # softplus(−(0 − 1))
