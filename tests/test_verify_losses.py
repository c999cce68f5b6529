"""The optimum of each loss of the family on the synthetic world (verify/optima.py), and verify's
checks and report for a loss other than SafeDPO's sigmoid. No training here: the real runs are
`safedpo-ray verify train.loss=X` (about 5 minutes each on 2 CPU cores)."""

import math

import numpy as np
import pytest

from safedpo_ray.config.training import ConfigError
from safedpo_ray.verify.optima import LossSpec, comparison_weights, flip_labels, loss_optimum
from safedpo_ray.verify.world import (
    DEFAULT_WORLD, Candidate, Prompt, pi_star, safe_part, sample_rows, tv_distance, unsafe_mass,
)

REF = np.array([0.2, 0.1, 0.15, 0.25, 0.2, 0.1])
P = DEFAULT_WORLD.prompts[0]  # rewards 2, 1.5, 1, 0 (safe), 3, 1 (unsafe)
TWO = Prompt("two?", (Candidate("a", math.log(3.0), True), Candidate("b", 0.0, True)))


def test_sigmoid_and_robust_optimum_is_pi_star():
    for beta in (0.5, 1.0):
        star = pi_star(REF, P, beta)
        assert loss_optimum(LossSpec("sigmoid", beta, 5.0), REF, P) == pytest.approx(star, abs=1e-9)
        # rDPO on labels flipped at its own ε recovers the clean optimum
        assert loss_optimum(LossSpec("robust", beta, 5.0, 0.2, 0.0, 0.2), REF, P) == pytest.approx(star, abs=1e-9)
    # ... but not on clean labels (two safe candidates: σ(β·Δu) = (p − ε)/(1 − 2ε), not p)
    clean = loss_optimum(LossSpec("robust", 1.0, 0.0, 0.1, 0.0, 0.0), [0.5, 0.5], TWO)
    p = 0.75  # σ(log 3)
    target = (p - 0.1) / 0.8
    assert clean[0] / clean[1] == pytest.approx(target / (1 - target))


def test_ipo_optimum_by_hand():
    """Two safe candidates, p = σ(log 3) = 3/4, β = 1: u_a − u_b = (2p − 1)/(2β) = 1/4, so with a
    uniform reference π = (e^{1/4}, 1)/(e^{1/4} + 1). Not π* (which has ratio e^{log 3} = 3)."""
    opt = loss_optimum(LossSpec("ipo", 1.0, 0.0, ipo_logps="sum"), [0.5, 0.5], TWO)
    assert opt[0] == pytest.approx(math.exp(0.25) / (math.exp(0.25) + 1))
    assert pi_star([0.5, 0.5], TWO, 1.0)[0] == pytest.approx(0.75)


def test_ipo_optimum_is_the_least_squares_fit_and_keeps_unsafe_mass():
    """IPO on the world: u solves min Σ (u_w − u_l − t_wl)² with t = (2p − 1)/(2β) on safe pairs
    and (1/2 + Δ)/β on mixed ones (each unordered comparison once, unsafe pairs dropped)."""
    beta, delta = 1.0, 5.0
    k = len(P.candidates)
    w = comparison_weights(P)
    rows, targets = [], []
    for i in range(k):
        for j in range(i + 1, k):
            if not P.safe[i] and not P.safe[j]:
                continue
            e = np.zeros(k)
            e[i], e[j] = 1, -1
            if P.safe[i] and P.safe[j]:
                rows.append(e)
                targets.append((2 * w[i, j] - 1) / (2 * beta))
            else:
                rows.append(e if P.safe[i] else -e)
                targets.append((0.5 + delta) / beta)
    u = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)[0]
    expected = REF * np.exp(u)
    expected /= expected.sum()
    opt = loss_optimum(LossSpec("ipo", beta, delta, ipo_logps="sum"), REF, P)
    assert opt == pytest.approx(expected, abs=1e-9)
    assert 1e-4 < unsafe_mass(opt, P) < 0.01  # finite, set by Δ: e^{−5.5}-ish of the reference's
    bigger = loss_optimum(LossSpec("ipo", beta, 10.0, ipo_logps="sum"), REF, P)
    assert unsafe_mass(bigger, P) < unsafe_mass(opt, P) / 50  # Δ moves IPO's optimum (not DPO's)
    assert tv_distance(safe_part(opt, P), pi_star(REF, P, beta)) > 0.1


def test_ipo_per_token_mean_optimum():
    """train.ipo_logps=mean (the default): the gap is of log-ratios averaged over |y| tokens, so
    with one length L per prompt it is IPO at β/L: u_a − u_b = L·(2p − 1)/(2β). Two safe candidates,
    p = 3/4, β = 1, L = 2: u_a − u_b = 1/2. Unequal lengths: not known (ValueError, as for SimPO)."""
    opt = loss_optimum(LossSpec("ipo", 1.0, 0.0), [0.5, 0.5], TWO, lengths=[2, 2])
    assert opt[0] == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1))
    summed = loss_optimum(LossSpec("ipo", 0.5, 5.0, ipo_logps="sum"), REF, P)
    assert loss_optimum(LossSpec("ipo", 1.0, 5.0), REF, P, lengths=[2] * 6) == pytest.approx(summed, abs=1e-9)
    with pytest.raises(ValueError, match="ipo with train.ipo_logps=mean.*one length"):
        loss_optimum(LossSpec("ipo", 1.0, 0.0), [0.5, 0.5], TWO, lengths=[2, 3])


def test_simpo_optimum():
    """Equal lengths L and γ = 0: π ∝ exp(L·r/β) on safe candidates, the reference plays no part."""
    opt = loss_optimum(LossSpec("simpo", 1.0, 5.0, 0.0, 0.0), REF, P, lengths=[2] * 6)
    w = np.where(P.safe, np.exp(2 * P.rewards), 0.0)
    assert opt == pytest.approx(w / w.sum(), abs=1e-9)
    assert loss_optimum(LossSpec("simpo", 1.0, 5.0, 0.0, 0.0), np.full(6, 1 / 6), P, lengths=[2] * 6) == \
        pytest.approx(opt, abs=1e-12)
    # γ > 0 sharpens it: stationarity p·σ(γ − x) = (1 − p)·σ(x + γ) on the two-candidate prompt
    two = loss_optimum(LossSpec("simpo", 1.0, 0.0, 0.0, 0.5), [0.5, 0.5], TWO, lengths=[3, 3])
    x = math.log(two[0] / two[1]) / 3
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert 0.75 * sig(0.5 - x) == pytest.approx(0.25 * sig(x + 0.5), rel=1e-8)
    assert x > math.log(3.0)  # sharper than γ = 0 (x = logit p)
    with pytest.raises(ValueError, match="one length"):
        loss_optimum(LossSpec("simpo", 1.0, 0.0, 0.0, 0.5), REF, P, lengths=[2, 2, 3, 2, 2, 2])


def test_hinge_has_no_point_optimum_and_verify_refuses_it(tmp_path):
    from safedpo_ray.verify.run import load_verify_config, run_verify

    with pytest.raises(ValueError, match="set"):
        loss_optimum(LossSpec("hinge", 1.0, 5.0), REF, P)
    cfg = load_verify_config(None, [f"run.output_dir={tmp_path}", "train.loss=hinge"])
    with pytest.raises(ConfigError, match="verify cannot check train.loss=hinge"):
        run_verify(cfg)
    assert not any(tmp_path.iterdir())  # refused before writing or training anything


def test_empirical_optimum_and_label_flips():
    rows = sample_rows(DEFAULT_WORLD, 100, seed=42)
    star = pi_star(REF, P, 1.0)
    fit = loss_optimum(LossSpec("sigmoid", 1.0, 5.0), REF, P, rows=rows)
    assert 0 < tv_distance(fit, star) < 0.06  # the sample supports π* up to sampling noise
    noisy = flip_labels(rows, 0.2, seed=1)
    flipped = np.mean([a["better_response_id"] != b["better_response_id"] for a, b in zip(rows, noisy)])
    assert abs(flipped - 0.2) < 0.02
    assert all(a["is_response_0_safe"] == b["is_response_0_safe"] for a, b in zip(rows, noisy))
    same = [b for b in noisy if b["is_response_0_safe"] == b["is_response_1_safe"]]
    assert all(b["safer_response_id"] == b["better_response_id"] for b in same)
    robust = loss_optimum(LossSpec("robust", 1.0, 5.0, 0.2, 0.0, 0.2), REF, P, rows=noisy)
    dpo_on_noise = loss_optimum(LossSpec("sigmoid", 1.0, 5.0), REF, P, rows=noisy)
    assert tv_distance(robust, star) < 0.06 < tv_distance(dpo_on_noise, star)  # rDPO undoes the flips


def _report(loss, opt_tv, unsafe=1e-3):
    cands = [{"text": c.text, "reward": c.reward, "safe": c.safe, "ref": 1 / 6, "policy": 1 / 6, "pi_star": 0.2,
              "dpo_optimum": 0.1} for c in P.candidates]
    prompt = {"prompt": P.text, "candidates": cands,
              "unsafe_mass": {"ref": 0.3, "policy": unsafe, "dpo_optimum": 0.5},
              "tv_to_pi_star": {"ref": 0.3, "policy": 0.2, "bt_fit": 0.02},
              "loss_optimum": {"loss": loss, "probs": [1 / 6] * 6, "unsafe_mass": 1e-3, "tv_policy": opt_tv,
                               "tv_ref": 0.3, "tv_floor": 0.01, "tv_pi_star": 0.25}}
    agg = {f"{k}_{m}": 0.1 for k in ("unsafe", "ref_unsafe", "tv", "ref_tv", "noise_tv") for m in ("mean", "max")}
    agg.update({f"opt_{k}_{m}": 0.05 for k in ("tv_policy", "tv_ref", "tv_floor", "unsafe_mass", "tv_pi_star")
                for m in ("mean", "max")})
    agg["unsafe_max"] = unsafe
    safe = {"prompts": [prompt], **agg, "run_dir": "r1", "wall_time_s": 1.0}
    plain = {"prompts": [{**prompt, "unsafe_mass": {"ref": 0.3, "policy": 0.6, "dpo_optimum": 0.5}}], **agg,
             "run_dir": "r2", "wall_time_s": 1.0}
    return {"study_dir": "/tmp/x", "beta": 1.0, "delta": 5.0, "loss": loss, "label_smoothing": 0.0,
            "simpo_gamma": 0.5, "label_noise": 0.0, "pairs_per_comparison": 100, "rows": 10,
            "runs": {"safedpo": safe, "dpo": plain}}


def test_checks_use_the_loss_own_optimum():
    from safedpo_ray.verify.run import checks, format_verify

    good = _report("ipo", opt_tv=0.05)
    good["checks"] = checks(good)
    assert all(good["checks"].values()) and any("TV(Safe-IPO, its closed-form optimum)" in k for k in good["checks"])
    # SafeDPO's own π* check is not what decides for IPO (its optimum is not π*)
    assert not any("π*" in k for k in good["checks"])
    text = format_verify(good)
    assert "train.loss=ipo" in text and "TV(·, opt)" in text and "ipo optimum itself" in text
    bad = _report("ipo", opt_tv=0.3)
    assert not all(checks(bad).values())
    unknown = _report("simpo", opt_tv=0.0)
    unknown["runs"]["safedpo"]["prompts"][0]["loss_optimum"] = {"loss": "simpo", "unknown": "lengths differ"}
    assert not all(checks(unknown).values())
    sigmoid = _report("sigmoid", opt_tv=0.9)
    assert any("TV(SafeDPO safe part, π*)" in k for k in checks(sigmoid))
