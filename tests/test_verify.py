"""The synthetic world with a known optimum, and the trainer reaching it (issue 3).

    python -m pytest -q tests/test_verify.py              # unit tests in seconds, the e2e run in ~3 min
    python -m pytest -q tests/test_verify.py -k "not e2e"  # unit tests only
"""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from safedpo_ray.data.schema import validate_row
from safedpo_ray.data.transform import transform_with_outcome
from safedpo_ray.verify.world import (
    DEFAULT_WORLD, Candidate, Prompt, World, bt_fit, dpo_optimum, pi_star, safe_part, sample_rows,
    tv_distance, unsafe_mass,
)

TOY = Prompt("toy?", (Candidate("a", 0.0, True), Candidate("b", math.log(2.0), True), Candidate("c", 5.0, False)))


def test_pi_star_closed_form_by_hand():
    ref = [0.5, 0.25, 0.25]
    # β=1: safe weights 0.5·e^0 = 0.5 and 0.25·e^{ln 2} = 0.5; the unsafe candidate gets 0.
    assert pi_star(ref, TOY, beta=1.0) == pytest.approx([0.5, 0.5, 0.0])
    # β=0.5: 0.5·1 and 0.25·e^{2 ln 2} = 1  →  1/3, 2/3.
    assert pi_star(ref, TOY, beta=0.5) == pytest.approx([1 / 3, 2 / 3, 0.0])
    # Plain DPO's optimum keeps the unsafe candidate: weights 0.5, 0.5, 0.25·e^5.
    w = np.array([0.5, 0.5, 0.25 * math.exp(5.0)])
    assert dpo_optimum(ref, TOY, beta=1.0) == pytest.approx(w / w.sum())
    assert unsafe_mass(dpo_optimum(ref, TOY, 1.0), TOY) == pytest.approx(w[2] / w.sum())
    # β → ∞: π* → π_ref restricted to safe candidates.
    assert pi_star(ref, TOY, beta=1e9) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert safe_part([0.2, 0.2, 0.6], TOY) == pytest.approx([0.5, 0.5, 0.0])
    assert tv_distance([0.5, 0.5, 0.0], [1 / 3, 2 / 3, 0.0]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        pi_star(ref, TOY, beta=0.0)


def test_bt_sampling_frequencies():
    world = World((Prompt("p?", (Candidate("hi", 1.0, True), Candidate("lo", 0.0, False))),))
    rows = sample_rows(world, 4000, seed=3)
    assert len(rows) == 4000
    hi_wins = sum(r[f"response_{r['better_response_id']}"] == "hi" for r in rows) / len(rows)
    expected = 1 / (1 + math.exp(-1.0))  # σ(1) ≈ 0.731; sd of the mean ≈ 0.007
    assert abs(hi_wins - expected) < 0.03
    first = sum(r["response_0"] == "hi" for r in rows) / len(rows)
    assert abs(first - 0.5) < 0.03  # positions are random
    assert sample_rows(world, 50, seed=3) == sample_rows(world, 50, seed=3)
    assert sample_rows(world, 50, seed=3) != sample_rows(world, 50, seed=4)


def test_rows_are_valid_pku_with_consistent_labels():
    rows = sample_rows(DEFAULT_WORLD, 3, seed=0)
    n_cands = [len(p.candidates) for p in DEFAULT_WORLD.prompts]
    assert len(rows) == 3 * sum(k * (k - 1) // 2 for k in n_cands)
    safe = {c.text: c.safe for p in DEFAULT_WORLD.prompts for c in p.candidates}
    for row in rows:
        assert validate_row(row, "pku") == []
        assert row["is_response_0_safe"] == safe[row["response_0"]]
        assert row["is_response_1_safe"] == safe[row["response_1"]]
        s0, s1 = row["is_response_0_safe"], row["is_response_1_safe"]
        if s0 != s1:
            assert row["safer_response_id"] == (0 if s0 else 1)
        else:
            assert row["safer_response_id"] == row["better_response_id"]
    # Every prompt has an unsafe candidate with the top reward (plain DPO moves mass onto it),
    # and the transformation sees all four pair categories.
    for p in DEFAULT_WORLD.prompts:
        assert not p.candidates[int(np.argmax(p.rewards))].safe
    outcomes = Counter(transform_with_outcome(r)[1] for r in rows)
    assert set(outcomes) == {"kept", "swapped", "discarded"}


def test_bt_fit_recovers_rewards_and_world_round_trip():
    p = DEFAULT_WORLD.prompts[0]
    r_hat = bt_fit(sample_rows(World((p,)), 400, seed=1), p)
    true = p.rewards[p.safe] - p.rewards[p.safe].mean()
    assert np.isnan(r_hat[~p.safe]).all()
    assert np.abs(r_hat[p.safe] - true).max() < 0.2
    assert World.from_dict(DEFAULT_WORLD.to_dict()) == DEFAULT_WORLD


def test_commands_register_and_config_layers(tmp_path):
    from safedpo_ray.cli.main import build_parser
    from safedpo_ray.verify.run import load_verify_config

    parser = build_parser()
    args = parser.parse_args(["delta-study", "--deltas", "0,5", "--pairs", "7", "train.max_steps=3"])
    assert args.deltas == [0.0, 5.0] and args.pairs == 7 and args.overrides == ["train.max_steps=3"]
    assert parser.parse_args(["verify"]).fn.__name__ == "cmd_verify"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  beta: 0.5\n  learning_rate: 1.0e-3\n")
    cfg = load_verify_config(yaml_file, ["train.learning_rate=3e-3"])
    assert (cfg.train.beta, cfg.train.learning_rate, cfg.train.max_steps) == (0.5, 3e-3, 80)  # YAML > defaults
    assert cfg.run.name.startswith("verify-")


def test_delta_study_table_and_plot(tmp_path):
    from safedpo_ray.verify.run import format_delta_study, plot_delta_study

    results = [{"delta": d, "unsafe_mean": 10.0 ** -(2 + d / 5), "unsafe_max": 2 * 10.0 ** -(2 + d / 5),
                "tv_mean": 0.03 + d / 500, "tv_max": 0.05 + d / 400, "ref_unsafe_mean": 0.33,
                "ref_unsafe_max": 0.35, "ref_tv_mean": 0.3, "noise_tv_mean": 0.02, "wall_time_s": 60.0}
               for d in (0.0, 2.0, 5.0, 10.0, 20.0)]
    study = {"study_dir": str(tmp_path), "beta": 1.0, "max_steps": 80, "learning_rate": 2e-3, "rows": 6000,
             "results": results}
    text = format_delta_study(study)
    assert text.count("\n") >= 7 and "20" in text
    png = plot_delta_study(study, tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(600)
def test_e2e_safedpo_reaches_closed_form_optimum(ray_local, tmp_path):
    """Real training (Ray Train + DeepSpeed, 2 workers) on the world: SafeDPO lands on π*, plain DPO
    on the raw helpfulness pairs keeps the unsafe, high-reward candidates."""
    from safedpo_ray.verify.run import format_verify, load_verify_config, run_verify

    cfg = load_verify_config(None, [f"run.output_dir={tmp_path}", "run.name=verify"])
    report = run_verify(cfg, pairs=100)
    print(format_verify(report))
    s, d = report["runs"]["safedpo"], report["runs"]["dpo"]
    for qs, qd in zip(s["prompts"], d["prompts"]):
        ref_unsafe, safedpo_unsafe = qs["unsafe_mass"]["ref"], qs["unsafe_mass"]["policy"]
        assert ref_unsafe > 0.2  # the reference gives the unsafe candidates real mass
        assert safedpo_unsafe < 0.05 and safedpo_unsafe * 10 <= ref_unsafe, qs["prompt"]
        assert qs["tv_to_pi_star"]["policy"] < 0.1, qs["prompt"]
        assert qs["tv_to_pi_star"]["ref"] > 0.15  # π* is far from where training started
        assert qd["unsafe_mass"]["policy"] >= 5 * safedpo_unsafe, qd["prompt"]
        assert qd["unsafe_mass"]["policy"] > ref_unsafe  # plain DPO moves mass onto unsafe responses
    assert report["passed"]
    assert (Path(report["study_dir"]) / "verify.json").exists()
    assert (Path(report["study_dir"]) / "safedpo" / "model" / "model.safetensors").exists()
