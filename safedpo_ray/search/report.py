"""An experiment's outputs: results.csv / results.md (one row per trial), best.yaml, pareto.png,
delta_sensitivity.png, and the table printed at the end."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import yaml

from safedpo_ray.config.training import Config
from safedpo_ray.search.select import pareto_front, safest, select_best
from safedpo_ray.search.space import SearchSpec, apply_params


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def columns(rows: list[dict[str, Any]], spec: SearchSpec) -> list[str]:
    lead = ["trial", "status", *spec.params]
    for key in ("train.beta", "train.delta"):
        if key not in lead:
            lead.append(key)
    metrics = [spec.safety, spec.helpfulness]
    extra = sorted({k for r in rows for k in r} - set(lead) - set(metrics) - {"error"})
    return lead + metrics + extra + ["error"]


def write_results(exp_dir: Path, rows: list[dict[str, Any]], spec: SearchSpec, base: Config) -> dict[str, Any]:
    """Write every output file; returns what the summary needs (best row, front, file paths)."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    cols = columns(rows, spec)
    with (exp_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in cols})
    best = select_best(rows, helpfulness=spec.helpfulness, safety=spec.safety, threshold=spec.safety_threshold)
    front = pareto_front(rows, helpfulness=spec.helpfulness, safety=spec.safety)
    files = {"results.csv": str(exp_dir / "results.csv"), "results.md": str(exp_dir / "results.md")}
    best_yaml = exp_dir / "best.yaml"
    if best is not None:
        cfg = apply_params(base, {k: best[k] for k in spec.params})
        cfg.run.name, cfg.run.resume = None, False
        header = (f"# Best trial {best['trial']} of {exp_dir.name}: most helpful ({spec.helpfulness} = "
                  f"{_fmt(best.get(spec.helpfulness))}) with {spec.safety} = {_fmt(best.get(spec.safety))} "
                  f">= {spec.safety_threshold}.\n# Reproduce it: safedpo-ray train --config {best_yaml}\n")
        best_yaml.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        files["best.yaml"] = str(best_yaml)
    elif best_yaml.exists():
        best_yaml.unlink()  # a resumed experiment whose old best no longer stands
    (exp_dir / "results.md").write_text(markdown(rows, spec, best, front, cols))
    files.update(plots(exp_dir, rows, spec, front, best))
    return {"best": best, "front": front, "files": files}


SUMMARY_METRICS = ("eval/rewards/margins/safe_unsafe", "eval/rewards/margins/safe_safe", "score/mean_cost", "step")


def markdown(rows, spec: SearchSpec, best, front, cols) -> str:
    """The table a person reads (results.csv has every metric)."""
    front_ids = {r["trial"] for r in front}
    lead = cols[: cols.index(spec.safety) + 2]  # trial, status, parameters, β, Δ, safety, helpfulness
    shown = lead + [m for m in SUMMARY_METRICS if m not in lead and any(m in r for r in rows)]
    lines = [f"# Search results ({len(rows)} trials)", "",
             f"Safety: `{spec.safety}` (target >= {spec.safety_threshold}); helpfulness: `{spec.helpfulness}`. "
             "★ best, ◆ on the Pareto front.", "",
             "| | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for row in rows:
        mark = ("★" if best is not None and row["trial"] == best["trial"] else "") + ("◆" if row["trial"] in front_ids else "")
        lines.append(f"| {mark} | " + " | ".join(_fmt(row.get(c)) for c in shown) + " |")
    lines.append("")
    if best is not None:
        lines.append(f"Best: **{best['trial']}** ({', '.join(f'{k}={_fmt(best.get(k))}' for k in spec.params)}); "
                     "`best.yaml` reproduces it.")
    else:
        s = safest(rows, safety=spec.safety)
        lines.append(f"No trial reached {spec.safety} >= {spec.safety_threshold}"
                     + (f"; the safest was {s['trial']} ({_fmt(s.get(spec.safety))})." if s else "."))
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "## Failed trials"] + [f"- {r['trial']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]], spec: SearchSpec, best) -> str:
    """The console table: one line per trial."""
    keys = ["trial", "status", *spec.params, spec.safety, spec.helpfulness]
    heads = [k.split(".")[-1] if k in spec.params else k.split("/")[-1] if "/" in k else k for k in keys]
    heads[-2:] = ["safety", "helpfulness"]
    cells = [[("*" if best is not None and r["trial"] == best["trial"] else "") + _fmt(r.get(k)) if i == 0
              else _fmt(r.get(k)) for i, k in enumerate(keys)] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(out)


def plots(exp_dir: Path, rows, spec: SearchSpec, front, best=None) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[safedpo] matplotlib is not installed: no plots (pip install 'safedpo-ray[plot]')", flush=True)
        return {}
    out: dict[str, str] = {}
    pts = [(r, r.get(spec.safety), r.get(spec.helpfulness)) for r in rows]
    pts = [(r, s, h) for r, s, h in pts if isinstance(s, (int, float)) and isinstance(h, (int, float))
           and not (math.isnan(s) or math.isnan(h))]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if pts:
        ax.scatter([s for _, s, _ in pts], [h for _, _, h in pts], color="tab:gray", label="trials")
        for r, s, h in pts:
            ax.annotate(f"β={_fmt(r.get('train.beta'))} Δ={_fmt(r.get('train.delta'))}", (s, h), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        fs = [(r[spec.safety], r[spec.helpfulness]) for r in front]
        ax.plot([s for s, _ in fs], [h for _, h in fs], "o-", color="tab:red", label="Pareto front")
        if best is not None:
            ax.plot([best[spec.safety]], [best[spec.helpfulness]], "*", color="gold", markersize=18,
                    markeredgecolor="black", label=f"best: {best['trial']}")
    ax.axvline(spec.safety_threshold, ls="--", color="tab:blue", lw=1, label=f"safety target {spec.safety_threshold}")
    ax.set_xlabel(f"safety: {spec.safety}")
    ax.set_ylabel(f"helpfulness: {spec.helpfulness}")
    ax.set_title("Safety against helpfulness, one point per trial")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(exp_dir / "pareto.png", dpi=120)
    plt.close(fig)
    out["pareto.png"] = str(exp_dir / "pareto.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    betas = sorted({r.get("train.beta") for r, _, _ in pts}, key=lambda b: (b is None, b))
    for beta in betas:
        line = sorted(((r.get("train.delta"), s, h) for r, s, h in pts if r.get("train.beta") == beta),
                      key=lambda t: t[0])
        for ax, idx in zip(axes, (1, 2)):
            ax.plot([t[0] for t in line], [t[idx] for t in line], "o-", label=f"β = {_fmt(beta)}")
    for ax, name in zip(axes, (f"safety: {spec.safety}", f"helpfulness: {spec.helpfulness}")):
        ax.set_xlabel("Δ")
        ax.set_ylabel(name, fontsize=8)
        ax.legend(fontsize=8)
    axes[0].set_title("Safety against Δ")
    axes[1].set_title("Helpfulness against Δ")
    fig.tight_layout()
    fig.savefig(exp_dir / "delta_sensitivity.png", dpi=120)
    plt.close(fig)
    out["delta_sensitivity.png"] = str(exp_dir / "delta_sensitivity.png")
    return out
