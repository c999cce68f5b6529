"""Train on the synthetic world (verify/world.py) with the real trainer and compare with π*.

    safedpo-ray verify                                   # SafeDPO (Δ=5) and plain DPO: ~2.5 min, 2 CPU cores
    safedpo-ray verify train.delta=0 train.max_steps=120 --pairs 200
    safedpo-ray delta-study                              # Δ ∈ {0, 2, 5, 10, 20}, table + PNG plot
    safedpo-ray delta-study --deltas 0,10 run.name=my-study
    safedpo-ray verify train.loss=ipo                    # another loss: checked against its own optimum

Both verbs call `train(cfg)` unchanged (same loss, Ray Data pipeline, Ray Train + DeepSpeed
workers) on PKU rows sampled from the world, then read the exported model and the run's reference
(`init-model`) and score each prompt's candidate distribution (renormalized over the candidates)
against the closed-form optimum π*: unsafe probability mass, and total-variation distance between
the policy's safe part (renormalized) and π*. Everything lands in `run.output_dir/run.name`:
world.json, train.jsonl/eval.jsonl, one sub-run directory per training run, verify.{json,txt}
or delta_study.{json,txt,png}.

Configuration layers: package defaults ← VERIFY_DEFAULTS ← --config YAML ← key=value overrides;
data.source/eval_source/mode and the sub-runs' run.name are set here.

`train.loss` picks the loss of both runs (verify/optima.py says where each converges); verify
refuses a loss whose optimum is not known (hinge), delta-study runs any.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from safedpo_ray.config.loader import overrides_tree
from safedpo_ray.config.training import Config, ConfigError, load_config
from safedpo_ray.data.tokenize import tokenize_pairs
from safedpo_ray.runtime.ray_env import shutdown
from safedpo_ray.verify.optima import UNKNOWN_OPTIMUM, ZERO_UNSAFE, LossSpec, flip_labels, loss_optimum
from safedpo_ray.verify.world import (
    DEFAULT_WORLD,
    Candidate,
    Prompt,
    World,
    bt_fit,
    candidate_distributions,
    dpo_optimum,
    pi_star,
    safe_part,
    sample_rows,
    tv_distance,
    unsafe_mass,
    write_jsonl,
)

# Tuned on 2 CPU cores: ~1 min per training run (80 steps), TV to π* ≈ 0.04 (noise floor ≈ 0.02).
VERIFY_DEFAULTS = [
    "train.beta=1.0", "train.delta=5.0", "train.learning_rate=2e-3", "train.max_steps=80",
    "train.epochs=1000", "train.global_batch_size=64", "train.micro_batch_size=32",
    "data.max_length=96", "data.max_prompt_length=80", "data.tokenize_batch_size=4096",
    "model.name_or_path=tiny",
]
DEFAULT_DELTAS = (0.0, 2.0, 5.0, 10.0, 20.0)
# What `verify` demands (and tests/test_verify.py asserts).
MAX_UNSAFE, UNSAFE_VS_REF, MAX_TV, DPO_VS_SAFEDPO = 0.05, 10.0, 0.1, 5.0


def load_verify_config(path: str | Path | None = None, overrides: list[str] | None = None,
                       name_prefix: str = "verify") -> Config:
    """Defaults ← VERIFY_DEFAULTS ← YAML file ← overrides (a YAML file wins over our defaults)."""
    cfg = load_config(path, overrides, base=overrides_tree(VERIFY_DEFAULTS))
    if not cfg.run.name:
        cfg.run.name = time.strftime(f"{name_prefix}-%Y%m%d-%H%M%S")
    if cfg.model.gguf_file:
        raise ConfigError("'model.gguf_file': verify needs a plain model directory or 'tiny'")
    return cfg


def _sub_config(cfg: Config, study_dir: Path, name: str, overrides: list[str]) -> Config:
    """`cfg` pointed at the world's files, as sub-run `name` of the study directory."""
    extra = [f"run.output_dir={json.dumps(str(study_dir))}", f"run.name={name}", "run.resume=false",
             f"data.source={json.dumps(str(study_dir / 'train.jsonl'))}", "data.schema=pku",
             f"data.eval_source={json.dumps(str(study_dir / 'eval.jsonl'))}", "data.eval_split=null"]
    if cfg.model.lora.enabled:
        extra.append("run.export_merged=true")  # scored on the merged full weights
    return load_config(None, extra + overrides, base=cfg.to_dict())


def label_noise(cfg: Config) -> float:
    """The rate at which the world's helpfulness labels are flipped: rDPO's premise, ε, for the
    robust loss (its optimum is π* exactly then), else 0."""
    return cfg.train.label_smoothing if cfg.train.loss == "robust" else 0.0


def write_world(cfg: Config, study_dir: Path, world: World, pairs: int) -> list[dict]:
    """Sample the training rows (seed = train.seed; helpfulness labels flipped at `label_noise`)
    and one held-out row per comparison."""
    study_dir.mkdir(parents=True, exist_ok=True)
    rows = flip_labels(sample_rows(world, pairs, seed=cfg.train.seed), label_noise(cfg), seed=cfg.train.seed)
    write_jsonl(rows, study_dir / "train.jsonl")
    write_jsonl(sample_rows(world, 1, seed=cfg.train.seed + 1), study_dir / "eval.jsonl")
    (study_dir / "world.json").write_text(json.dumps(
        {"world": world.to_dict(), "pairs_per_comparison": pairs, "rows": len(rows), "seed": cfg.train.seed,
         "label_noise": label_noise(cfg)},
        indent=2))
    return rows


def _model_dirs(cfg: Config, summary: dict[str, Any]) -> tuple[str, str]:
    """(reference, trained) model directories in plain HF form."""
    run_dir = Path(summary["run_dir"])
    ref = str(run_dir / "init-model") if cfg.model.name_or_path == "tiny" else cfg.model.name_or_path
    trained = Path(summary["model_dir"])
    return ref, str(trained / "merged" if cfg.model.lora.enabled else trained)


def candidate_lengths(model_dir: str, world: World, **kw) -> list[list[int]]:
    """Per prompt, each candidate's response length in tokens (EOS included), as training sees it."""
    from safedpo_ray.models.loading import load_tokenizer  # lazy: imports torch

    tok = load_tokenizer(model_dir)
    out = []
    for p in world.prompts:
        texts = [c.text for c in p.candidates]
        cols = tokenize_pairs({"prompt": [p.text] * len(texts), "chosen": texts, "rejected": texts}, tok, **kw)
        out.append([len(ids) for ids in cols["chosen_ids"]])
    return out


def optimum_entry(spec: LossSpec, ref, pol, p: Prompt, star, lengths, rows: list[dict]) -> dict[str, Any]:
    """The loss's own optimum on this prompt and the trained policy's distance to it."""
    try:
        opt = loss_optimum(spec, ref, p, lengths=lengths)
        fit = loss_optimum(spec, ref, p, lengths=lengths, rows=rows)  # what the sampled rows support
    except ValueError as exc:
        return {"loss": spec.name, "unknown": str(exc)}
    # An optimum with no unsafe mass: compare safe parts (unsafe mass is checked on its own).
    dist = (lambda a, b: tv_distance(safe_part(a, p), safe_part(b, p))) if spec.name in ZERO_UNSAFE else tv_distance
    return {"loss": spec.name, "probs": opt.tolist(), "unsafe_mass": unsafe_mass(opt, p),
            "tv_policy": dist(pol, opt), "tv_ref": dist(ref, opt), "tv_floor": dist(fit, opt),
            "tv_pi_star": tv_distance(safe_part(opt, p), star)}


def score(world: World, rows: list[dict], ref_dir: str, model_dir: str, beta: float,
          max_length: int, max_prompt_length: int, spec: LossSpec | None = None) -> dict[str, Any]:
    """Per prompt: each candidate's π_ref, trained π, π*, DPO optimum; unsafe masses; TVs; with
    `spec`, also the distance to that loss's own optimum (verify/optima.py) where it is known."""
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    ref_all, pol_all = candidate_distributions(ref_dir, world, **kw), candidate_distributions(model_dir, world, **kw)
    lengths = candidate_lengths(ref_dir, world, **kw) if spec is not None else [None] * len(world.prompts)
    prompts = []
    for p, ref, pol, lens in zip(world.prompts, ref_all, pol_all, lengths):
        star, dpo = pi_star(ref, p, beta), dpo_optimum(ref, p, beta)
        r_hat = bt_fit(rows, p)
        fitted = Prompt(p.text, tuple(Candidate(c.text, float(r_hat[i]) if c.safe else 0.0, c.safe)
                                      for i, c in enumerate(p.candidates)))
        fit = pi_star(ref, fitted, beta)  # the optimum the sampled rows support: the noise floor
        prompts.append({
            "prompt": p.text,
            "candidates": [{"text": c.text, "reward": c.reward, "safe": c.safe, "ref": float(ref[i]),
                            "policy": float(pol[i]), "pi_star": float(star[i]), "dpo_optimum": float(dpo[i])}
                           for i, c in enumerate(p.candidates)],
            "unsafe_mass": {"ref": unsafe_mass(ref, p), "policy": unsafe_mass(pol, p),
                            "dpo_optimum": unsafe_mass(dpo, p)},
            "tv_to_pi_star": {"ref": tv_distance(safe_part(ref, p), star),
                              "policy": tv_distance(safe_part(pol, p), star),
                              "bt_fit": tv_distance(fit, star)},
        })
        if spec is not None:
            prompts[-1]["loss_optimum"] = optimum_entry(spec, ref, pol, p, star, lens, rows)
    agg = {}
    for key, group, sub in (("unsafe", "unsafe_mass", "policy"), ("ref_unsafe", "unsafe_mass", "ref"),
                            ("tv", "tv_to_pi_star", "policy"), ("ref_tv", "tv_to_pi_star", "ref"),
                            ("noise_tv", "tv_to_pi_star", "bt_fit")):
        vals = [q[group][sub] for q in prompts]
        agg[f"{key}_mean"], agg[f"{key}_max"] = float(np.mean(vals)), float(np.max(vals))
    opts = [q["loss_optimum"] for q in prompts if "loss_optimum" in q]
    if opts and all("unknown" not in o for o in opts):
        for key in ("tv_policy", "tv_ref", "tv_floor", "unsafe_mass", "tv_pi_star"):
            vals = [o[key] for o in opts]
            agg[f"opt_{key}_mean"], agg[f"opt_{key}_max"] = float(np.mean(vals)), float(np.max(vals))
    return {"prompts": prompts, **agg}


def _train_and_score(cfg: Config, study_dir: Path, name: str, overrides: list[str], world: World,
                     rows: list[dict], with_optimum: bool = True) -> dict[str, Any]:
    from safedpo_ray.train.trainer import train  # lazy: imports pyarrow

    sub = _sub_config(cfg, study_dir, name, overrides)
    summary = train(sub)
    ref_dir, model_dir = _model_dirs(sub, summary)
    spec = LossSpec.from_train(sub.train, label_noise(sub)) if with_optimum else None
    result = score(world, rows, ref_dir, model_dir, sub.train.beta, sub.data.max_length, sub.data.max_prompt_length,
                   spec=spec)
    result.update(run_dir=summary["run_dir"], mode=sub.data.mode, delta=sub.train.delta, loss=sub.train.loss,
                  steps=summary.get("last_step"), wall_time_s=summary.get("wall_time_s"))
    return result


def _with_ray(fn):
    """Shut Ray down afterwards only when this call started it (tests share one Ray)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        import ray

        started = not ray.is_initialized()
        try:
            return fn(*args, **kwargs)
        finally:
            if started and ray.is_initialized():
                shutdown()
    return wrapped


def run_labels(loss: str) -> tuple[str, str]:
    """What the two runs are called: SafeDPO / plain DPO, or e.g. Safe-IPO / plain IPO."""
    return ("SafeDPO", "plain DPO") if loss == "sigmoid" else (f"Safe-{loss.upper()}", f"plain {loss.upper()}")


def checks(report: dict[str, Any]) -> dict[str, bool]:
    s, d = report["runs"]["safedpo"], report["runs"]["dpo"]
    per = list(zip(s["prompts"], d["prompts"]))
    loss = report.get("loss", "sigmoid")
    safe, plain = run_labels(loss)
    if loss == "sigmoid":  # its optimum is π*: the checks verify has always made
        target = (f"TV(SafeDPO safe part, π*) < {MAX_TV} on every prompt", s["tv_max"] < MAX_TV)
    else:
        opts = [a.get("loss_optimum", {}) for a, _ in per]
        known = all("tv_policy" in o for o in opts)
        target = (f"TV({safe}, its closed-form optimum) < {MAX_TV} on every prompt",
                  known and all(o["tv_policy"] < MAX_TV for o in opts))
    return {
        f"{safe} unsafe mass < {MAX_UNSAFE} on every prompt": s["unsafe_max"] < MAX_UNSAFE,
        f"{safe} unsafe mass <= reference / {UNSAFE_VS_REF:g} on every prompt":
            all(a["unsafe_mass"]["policy"] * UNSAFE_VS_REF <= a["unsafe_mass"]["ref"] for a, _ in per),
        target[0]: target[1],
        f"{plain} unsafe mass >= {DPO_VS_SAFEDPO:g} × {safe}'s on every prompt":
            all(b["unsafe_mass"]["policy"] >= DPO_VS_SAFEDPO * a["unsafe_mass"]["policy"] for a, b in per),
    }


@_with_ray
def run_verify(cfg: Config, *, world: World = DEFAULT_WORLD, pairs: int = 100) -> dict[str, Any]:
    """SafeDPO (data.mode=safedpo, Δ=train.delta) and plain DPO (helpful, Δ=0) on the same rows,
    both with train.loss; a loss whose optimum is not known (hinge) is refused before training."""
    if cfg.train.loss in UNKNOWN_OPTIMUM:
        raise ConfigError(f"verify cannot check train.loss={cfg.train.loss}: {UNKNOWN_OPTIMUM[cfg.train.loss]}")
    study_dir = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    rows = write_world(cfg, study_dir, world, pairs)
    runs = {"safedpo": _train_and_score(cfg, study_dir, "safedpo", ["data.mode=safedpo"], world, rows),
            "dpo": _train_and_score(cfg, study_dir, "dpo", ["data.mode=helpful", "train.delta=0"], world, rows,
                                    with_optimum=False)}
    report = {"study_dir": str(study_dir), "beta": cfg.train.beta, "delta": cfg.train.delta,
              "loss": cfg.train.loss, "label_smoothing": cfg.train.label_smoothing,
              "simpo_gamma": cfg.train.simpo_gamma, "ipo_logps": cfg.train.ipo_logps,
              "label_noise": label_noise(cfg),
              "pairs_per_comparison": pairs, "rows": len(rows), "runs": runs}
    report["checks"] = checks(report)
    report["passed"] = all(report["checks"].values())
    (study_dir / "verify.json").write_text(json.dumps(report, indent=2))
    (study_dir / "verify.txt").write_text(format_verify(report) + "\n")
    return report


def format_verify(report: dict[str, Any]) -> str:
    s, d = report["runs"]["safedpo"], report["runs"]["dpo"]
    loss = report.get("loss", "sigmoid")
    safe, plain = run_labels(loss)
    own = loss != "sigmoid"  # a loss whose optimum is not π*: show that optimum too
    detail = {"robust": f", ε={report.get('label_smoothing', 0):g}, labels flipped at {report.get('label_noise', 0):g}",
              "simpo": f", γ={report.get('simpo_gamma', 0):g}",
              "ipo": ", log-ratios " + {"mean": "averaged per token", "sum": "summed"}.get(report.get("ipo_logps", "sum"), "?")}.get(loss, "")
    lines = [f"== {safe} vs closed-form optimum: train.loss={loss}{detail}, β={report['beta']:g}, Δ={report['delta']:g}, "
             f"{report['rows']} Bradley–Terry pairs ({report['pairs_per_comparison']} per comparison) ==",
             "distributions over each prompt's candidates (renormalized); π* = safe-only ∝ π_ref·exp(r/β)"
             + (f"; opt = {loss}'s own optimum (verify/optima.py)" if own else "")]
    head = (f"  {'candidate':<11}{'r':>5} {'safe':>5} {'π_ref':>8} {safe[:9]:>9} {'π*':>8} "
            + (f"{'opt':>8} " if own else "") + f"{plain.split()[-1]:>8} {'DPO opt':>8}")
    for qs, qd in zip(s["prompts"], d["prompts"]):
        lines += ["", qs["prompt"], head]
        opt = qs.get("loss_optimum", {}).get("probs")
        for n, (cs, cd) in enumerate(zip(qs["candidates"], qd["candidates"])):
            lines.append(f"  {cs['text']:<11}{cs['reward']:>5.1f} {'yes' if cs['safe'] else 'NO':>5} {cs['ref']:>8.3f} "
                         f"{cs['policy']:>9.4f} {cs['pi_star']:>8.3f} " + (f"{opt[n]:>8.4f} " if own and opt else "")
                         + f"{cd['policy']:>8.3f} {cd['dpo_optimum']:>8.3f}")
        u, ud = qs["unsafe_mass"], qd["unsafe_mass"]
        lines.append(f"  {'unsafe mass':<22}{u['ref']:>8.3f} {u['policy']:>9.2e} {0:>8.3f} {ud['policy']:>8.3f} "
                     f"{ud['dpo_optimum']:>8.3f}")
        t, td = qs["tv_to_pi_star"], qd["tv_to_pi_star"]
        lines.append(f"  {'TV(safe part, π*)':<22}{t['ref']:>8.3f} {t['policy']:>9.3f} {'':>8} {td['policy']:>8.3f}"
                     f"   (BT-sample floor {t['bt_fit']:.3f})")
        o = qs.get("loss_optimum", {})
        if own and "tv_policy" in o:
            lines.append(f"  {'TV(·, opt)':<22}{o['tv_ref']:>8.3f} {o['tv_policy']:>9.3f}   (opt: unsafe mass "
                         f"{o['unsafe_mass']:.2e}, TV to π* {o['tv_pi_star']:.3f}; sample floor {o['tv_floor']:.3f})")
        elif own:
            lines.append(f"  no known optimum: {o.get('unknown')}")
    lines += ["", f"{'over prompts (mean / max)':<34}{'π_ref':>17} {safe:>17} {plain + ' (helpful)':>17}",
              f"{'unsafe mass':<34}{s['ref_unsafe_mean']:>8.3f} /{s['ref_unsafe_max']:>7.3f} "
              f"{s['unsafe_mean']:>8.1e} /{s['unsafe_max']:>7.1e} {d['unsafe_mean']:>8.3f} /{d['unsafe_max']:>7.3f}",
              f"{'TV(safe part, π*)':<34}{s['ref_tv_mean']:>8.3f} /{s['ref_tv_max']:>7.3f} "
              f"{s['tv_mean']:>8.3f} /{s['tv_max']:>7.3f} {d['tv_mean']:>8.3f} /{d['tv_max']:>7.3f}",
              f"BT sampling-noise floor of the TV (π from BT-fitted rewards vs π*): mean {s['noise_tv_mean']:.3f}, "
              f"max {s['noise_tv_max']:.3f}" + ("  (fitted to the flipped labels: no floor for robust; see below)"
                                                 if report.get("label_noise") else ""), ""]
    if own and "opt_tv_policy_mean" in s:
        lines[-1:-1] = [
            f"{'TV(·, ' + loss + ' optimum)':<34}{s['opt_tv_ref_mean']:>8.3f} /{s['opt_tv_ref_max']:>7.3f} "
            f"{s['opt_tv_policy_mean']:>8.3f} /{s['opt_tv_policy_max']:>7.3f}",
            f"{loss} optimum itself: unsafe mass mean {s['opt_unsafe_mass_mean']:.2e}, TV of its safe part to π* "
            f"mean {s['opt_tv_pi_star_mean']:.3f}; sampling floor of TV(·, optimum) mean {s['opt_tv_floor_mean']:.3f}"]
    lines += [f"[{'PASS' if ok else 'FAIL'}] {name}" for name, ok in report["checks"].items()]
    lines.append(f"runs: {s['run_dir']} ({s['wall_time_s']} s), {d['run_dir']} ({d['wall_time_s']} s)")
    lines.append(f"report: {Path(report['study_dir']) / 'verify.json'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- Δ study


@_with_ray
def run_delta_study(cfg: Config, *, deltas=DEFAULT_DELTAS, world: World = DEFAULT_WORLD,
                    pairs: int = 100) -> dict[str, Any]:
    """SafeDPO (with train.loss) at each Δ with the same world, rows, seed and training budget."""
    study_dir = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    rows = write_world(cfg, study_dir, world, pairs)
    results = []
    for delta in deltas:
        r = _train_and_score(cfg, study_dir, f"delta-{delta:g}", ["data.mode=safedpo", f"train.delta={delta}"],
                             world, rows)
        results.append({k: v for k, v in r.items() if k != "prompts"} | {
            "unsafe_per_prompt": [q["unsafe_mass"]["policy"] for q in r["prompts"]],
            "tv_per_prompt": [q["tv_to_pi_star"]["policy"] for q in r["prompts"]]})
    study = {"study_dir": str(study_dir), "beta": cfg.train.beta, "max_steps": cfg.train.max_steps,
             "loss": cfg.train.loss, "label_noise": label_noise(cfg),
             "learning_rate": cfg.train.learning_rate, "pairs_per_comparison": pairs, "rows": len(rows),
             "results": results}
    (study_dir / "delta_study.json").write_text(json.dumps(study, indent=2))
    (study_dir / "delta_study.txt").write_text(format_delta_study(study) + "\n")
    plot_delta_study(study, study_dir / "delta_study.png")
    return study


def format_delta_study(study: dict[str, Any]) -> str:
    res = study["results"]
    loss = study.get("loss", "sigmoid")
    own = loss != "sigmoid" and all("opt_tv_policy_mean" in r for r in res)
    lines = [f"== Δ study: train.loss={loss}, β={study['beta']:g}, {study['max_steps']} steps at lr "
             f"{study['learning_rate']:g}, {study['rows']} Bradley–Terry pairs; π* is the same for every Δ"
             + (f"; {loss}'s own optimum (opt) moves with Δ" if own else "") + " ==",
             f"π_ref unsafe mass: mean {res[0]['ref_unsafe_mean']:.3f}, max {res[0]['ref_unsafe_max']:.3f}; "
             f"TV(π_ref safe part, π*): mean {res[0]['ref_tv_mean']:.3f}; "
             f"BT sampling-noise floor: mean {res[0]['noise_tv_mean']:.3f}",
             f"{'Δ':>6} {'unsafe mass mean':>17} {'max':>10} {'TV to π* mean':>14} {'max':>7} {'wall s':>7}"
             + (f" {'opt unsafe':>10} {'TV to opt mean':>15}" if own else "")]
    for r in res:
        lines.append(f"{r['delta']:>6g} {r['unsafe_mean']:>17.3e} {r['unsafe_max']:>10.3e} {r['tv_mean']:>14.3f} "
                     f"{r['tv_max']:>7.3f} {r['wall_time_s'] or 0:>7.1f}"
                     + (f" {r['opt_unsafe_mass_mean']:>10.2e} {r['opt_tv_policy_mean']:>15.3f}" if own else ""))
    lines.append(f"plot: {Path(study['study_dir']) / 'delta_study.png'}")
    return "\n".join(lines)


def plot_delta_study(study: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = study["results"]
    x = [r["delta"] for r in res]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    floor = 1e-300
    a.semilogy(x, [max(r["unsafe_mean"], floor) for r in res], "o-", label="SafeDPO (mean over prompts)")
    a.semilogy(x, [max(r["unsafe_max"], floor) for r in res], "v--", alpha=0.6, label="SafeDPO (worst prompt)")
    a.axhline(res[0]["ref_unsafe_mean"], color="gray", ls=":", label="reference policy")
    a.set(xlabel="Δ", ylabel="unsafe probability mass", title="Unsafe mass vs Δ")
    b.plot(x, [r["tv_mean"] for r in res], "o-", label="SafeDPO (mean over prompts)")
    b.plot(x, [r["tv_max"] for r in res], "v--", alpha=0.6, label="SafeDPO (worst prompt)")
    b.axhline(res[0]["ref_tv_mean"], color="gray", ls=":", label="reference policy")
    b.axhline(res[0]["noise_tv_mean"], color="green", ls="-.", label="BT sampling-noise floor")
    b.set(xlabel="Δ", ylabel="TV(safe part, π*)", title="Distance to the (Δ-independent) optimum π*", ylim=(0, None))
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"SafeDPO (train.loss={study.get('loss', 'sigmoid')}) on the synthetic world: "
                 f"β={study['beta']:g}, {study['max_steps']} steps each")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
