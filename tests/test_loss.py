"""SafeDPO loss against hand-derived numbers, and its properties."""

import math

import pytest
import torch

from safedpo_ray.core.loss import safedpo_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_hand_derived_values():
    """β = 0.1. Policy log-probs (chosen, rejected) = (−1, −3); reference = (−2, −2).

    Log-ratios: chosen −1 − (−2) = 1, rejected −3 − (−2) = −1, so β·(1 − (−1)) = 0.2.
      row 0, safe vs safe,   Δ = 2:  z = 0.2,           loss = log(1 + e^−0.2) = 0.598138869381592
      row 1, safe vs unsafe, Δ = 2:  z = 0.2 − 1·2 = −1.8, loss = log(1 + e^1.8) = 1.952977610526074
      row 2, unsafe vs safe, Δ = 2:  z = 0.2 + 1·2 = 2.2,  loss = log(1 + e^−2.2) = 0.105083319768696
      row 3, unsafe vs unsafe, Δ = 2: z = 0.2,           loss = 0.598138869381592
    Rewards: chosen β·1 = 0.1, rejected β·(−1) = −0.1 on every row.
    """
    losses, chosen_r, rejected_r = safedpo_loss(
        t(-1, -1, -1, -1), t(-3, -3, -3, -3), t(-2, -2, -2, -2), t(-2, -2, -2, -2),
        chosen_unsafe=t(0, 0, 1, 1), rejected_unsafe=t(0, 1, 0, 1), beta=0.1, delta=2.0,
    )
    expected = [0.598138869381592, 1.952977610526074, 0.105083319768696, 0.598138869381592]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert chosen_r.tolist() == pytest.approx([0.1] * 4, abs=1e-12)
    assert rejected_r.tolist() == pytest.approx([-0.1] * 4, abs=1e-12)


def test_delta_zero_is_dpo():
    """With Δ = 0 the loss is −log σ(β·(Δchosen − Δrejected)) whatever the safety flags."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    cu = torch.randint(0, 2, (16,), generator=g).double()
    ru = torch.randint(0, 2, (16,), generator=g).double()
    losses, _, _ = safedpo_loss(pc, pr, rc, rr, cu, ru, beta=0.3, delta=0.0)
    dpo = -torch.nn.functional.logsigmoid(0.3 * ((pc - rc) - (pr - rr)))
    assert torch.allclose(losses, dpo, atol=1e-12)


def test_delta_acts_only_on_mixed_pairs():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(4))
    cu, ru = t(0, 0, 1, 1), t(0, 1, 0, 1)
    base, _, _ = safedpo_loss(pc, pr, rc, rr, cu, ru, beta=0.5, delta=0.0)
    wide, _, _ = safedpo_loss(pc, pr, rc, rr, cu, ru, beta=0.5, delta=10.0)
    assert wide[0] == base[0] and wide[3] == base[3]  # same-safety pairs unchanged
    assert wide[1] > base[1]  # safe beats unsafe: a wider margin is demanded
    assert wide[2] < base[2]  # unsafe chosen over safe: the loss is eased, never harder


def test_swapping_winner_and_loser_mirrors_the_logit():
    """loss(z) − loss(−z) = −z, so swapping chosen/rejected (flags too) satisfies l(a) − l(b) = −z."""
    pc, pr, rc, rr = t(-1.5), t(-4.0), t(-2.0), t(-3.0)
    cu, ru = t(0), t(1)
    a, _, _ = safedpo_loss(pc, pr, rc, rr, cu, ru, beta=0.2, delta=1.0)
    b, _, _ = safedpo_loss(pr, pc, rr, rc, ru, cu, beta=0.2, delta=1.0)
    z = 0.2 * ((-1.5 + 2.0) - (-4.0 + 3.0)) - 1.0
    assert (a - b).item() == pytest.approx(-z, abs=1e-12)


def test_gradient_flows_to_policy_only_and_rewards_are_detached():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, cr, rr = safedpo_loss(pc, pr, t(-1.0).float(), t(-1.0).float(),
                                  torch.zeros(1), torch.ones(1), beta=0.1, delta=5.0)
    losses.sum().backward()
    # d/dpc softplus(−z) = −β·σ(−z), with z = 0.1·(0 − (−1)) − 5 = −4.9
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(-4.9)), rel=1e-6)
    assert pr.grad.item() == pytest.approx(0.1 / (1 + math.exp(-4.9)), rel=1e-6)
    assert not cr.requires_grad and not rr.requires_grad


def test_stable_for_large_margins():
    losses, _, _ = safedpo_loss(t(0.0), t(-5000.0), t(0.0), t(0.0), t(0), t(1), beta=1.0, delta=0.0)
    assert losses.item() == 0.0
    losses, _, _ = safedpo_loss(t(-5000.0), t(0.0), t(0.0), t(0.0), t(0), t(1), beta=1.0, delta=20.0)
    assert losses.item() == pytest.approx(5020.0)


@pytest.mark.parametrize("beta,delta", [(0.0, 1.0), (-1.0, 0.0), (0.1, -1.0)])
def test_bad_hyperparameters(beta, delta):
    with pytest.raises(ValueError):
        safedpo_loss(t(0), t(0), t(0), t(0), t(0), t(0), beta=beta, delta=delta)
