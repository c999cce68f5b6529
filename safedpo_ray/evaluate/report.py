"""Reports: results.json, results.md, and the harmless-vs-helpful plot (the paper's main figure).

    from safedpo_ray.evaluate.report import write_reports, plot_tradeoff
    write_reports(results, out_dir, compare=["eval/baseline/results.json"])

results.md holds the scores table (with bootstrap intervals of the harmless ratio and the win
rates), the counts per model (prompts, responses, truncated, empty, failed) and the decoding and
scoring settings. The plot puts each model at (helpfulness, harmless ratio): helpfulness is the
normalised helpfulness when anchors are set, else the reward win rate against the baseline,
else the mean reward; up and right is better.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = (
    ("harmless ratio", "scores", "harmless_ratio"),
    ("harmless CI", "scores", "harmless_ratio_ci"),
    ("helpfulness (0–10)", "scores", "helpfulness"),
    ("mean cost", "scores", "mean_cost"),
    ("mean reward", "scores", "mean_reward"),
    ("win rate", "scores", "win_rate"),
    ("win CI", "scores", "win_rate_ci"),
    ("judge: more helpful", "judge_pairwise", "helpful_win_rate"),
    ("judge helpful CI", "judge_pairwise", "helpful_win_rate_ci"),
    ("judge: more harmless", "judge_pairwise", "harmless_win_rate"),
    ("judge harmless CI", "judge_pairwise", "harmless_win_rate_ci"),
    ("acc. safe–safe", "implicit", "preference_accuracy_safe_safe"),
    ("acc. safe>unsafe", "implicit", "safe_over_unsafe_accuracy"),
    ("margin safe–safe", "implicit", "reward_margin_safe_safe"),
    ("margin safe>unsafe", "implicit", "reward_margin_safe_unsafe"),
    ("XSTest over-refusal", "xstest", "over_refusal_rate"),
    ("XSTest over-refusal (judge)", "xstest", "judge.over_refusal_rate"),
    ("XSTest classifier–judge agreement", "xstest", "classifier_vs_judge.accuracy"),
    ("XSTest unsafe harmless", "xstest", "harmless_ratio_unsafe"),
    ("judge harmless", "judge", "harmless_ratio"),
    ("judge helpfulness", "judge", "mean_helpfulness"),
)
COUNT_COLUMNS = ("prompts", "responses", "truncated", "empty", "failed")


def _get(section: dict[str, Any] | None, key: str) -> Any:
    """`key` may be dotted ('judge.over_refusal_rate')."""
    value: Any = section or {}
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _clean(value: Any) -> Any:
    """NaN/inf → None, so results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, default=str))
    tmp.replace(path)  # a crash never leaves half a file


def load_results(paths: list[str]) -> dict[str, dict[str, Any]]:
    """Models of earlier results.json files, labels prefixed when they clash."""
    models: dict[str, dict[str, Any]] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        for label, m in data.get("models", {}).items():
            key = label if label not in models else f"{Path(p).parent.name}/{label}"
            models[key] = m
    return models


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (list, tuple)) and len(value) == 2:  # an interval
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(models: dict[str, dict[str, Any]], baseline: str | None = None) -> str:
    """One row per model; columns that no model has are left out."""
    cols = [c for c in COLUMNS if any(_get(m.get(c[1]), c[2]) is not None for m in models.values())]
    lines = ["| model | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for label, m in models.items():
        name = f"{label} (baseline)" if label == baseline else label
        lines.append(f"| {name} | " + " | ".join(_fmt(_get(m.get(s), k)) for _, s, k in cols) + " |")
    notes = []
    if any(_get(m.get("scores"), "helpfulness") is not None for m in models.values()):
        notes.append("Helpfulness (0–10): mean reward normalised so that anchor_zero's is 0 and anchor_ten's 10 "
                     "(see Scoring), on the prompts the model and both anchors answered.")
    if any(_get(m.get("scores"), "harmless_ratio_ci") for m in models.values()):
        notes.append("CI: percentile-bootstrap confidence interval (responses resampled; prompts for win rates).")
    if any(m.get("judge_pairwise") for m in models.values()):
        base = next(m["judge_pairwise"].get("baseline") for m in models.values() if m.get("judge_pairwise"))
        notes.append(f"Judge: share of prompts where the LLM judge found the answer better than {base}'s "
                     "(ties half, both answer orders averaged).")
    if any((m.get("xstest") or {}).get("harmless_by") == "refusal" for m in models.values()):
        notes.append("XSTest unsafe harmless: refusal rate (no cost model configured).")
    if baseline:
        notes.append(f"Win rate: reward against {baseline}'s response to the same prompt (ties count half).")
    notes.append("Harmless: cost ≤ 0. Implicit-reward accuracies count ties as half.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def counts_table(models: dict[str, dict[str, Any]]) -> str:
    rows = [(label, m["counts"]) for label, m in models.items() if m.get("counts")]
    if not rows:
        return ""
    lines = ["| model | " + " | ".join(COUNT_COLUMNS) + " |", "|---|" + "---|" * len(COUNT_COLUMNS)]
    lines += [f"| {label} | " + " | ".join(str(c.get(k, "–")) for k in COUNT_COLUMNS) + " |" for label, c in rows]
    return ("\n".join(lines) + "\n\n- truncated: no stop token within max_new_tokens (scored without EOS); "
            "failed: no response, or a configured score missing.\n")


def settings_section(results: dict[str, Any]) -> str:
    lines = []
    for title, key in (("Decoding", "decoding"), ("Scoring", "scoring")):
        values = {k: v for k, v in (results.get(key) or {}).items() if v is not None}
        if values:
            lines.append(f"## {title}\n")
            lines += [f"- {k}: {v}" for k, v in values.items()]
            lines.append("")
    return "\n".join(lines)


def markdown_report(results: dict[str, Any], models: dict[str, dict[str, Any]]) -> str:
    parts = [f"# Evaluation {results.get('name', '')}\n", markdown_table(models, results.get("baseline"))]
    table = counts_table(results.get("models", {}))
    if table:
        parts += ["## Counts\n", table]
    settings = settings_section(results)
    if settings:
        parts.append(settings)
    return "\n".join(parts)


def tradeoff_points(models: dict[str, dict[str, Any]]) -> tuple[list[tuple[str, float, float]], str]:
    """(label, helpfulness, harmless) for models that have both; the x-axis name."""
    rated = [m.get("scores") or {} for m in models.values() if (m.get("scores") or {}).get("harmless_ratio") is not None]
    if rated and all(sc.get("helpfulness") is not None for sc in rated):
        key, axis = "helpfulness", "helpfulness (normalised, anchors 0 and 10)"
    elif all(sc.get("win_rate") is not None for sc in rated):
        key, axis = "win_rate", "helpfulness: reward win rate vs baseline"
    else:
        key, axis = "mean_reward", "helpfulness: mean reward"
    points = []
    for label, m in models.items():
        s = m.get("scores") or {}
        x, y = s.get(key), s.get("harmless_ratio")
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            points.append((label, float(x), float(y)))
    return points, axis


def plot_tradeoff(models: dict[str, dict[str, Any]], path: str | Path, title: str = "Harmlessness vs helpfulness") -> Path | None:
    """PNG scatter of harmless ratio against helpfulness, one labelled point per model."""
    points, axis = tradeoff_points(models)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], s=70, color=f"C{i % 10}", label=label, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel(axis)
    ax.set_ylabel("harmless ratio (cost ≤ 0)")
    ax.set_ylim(-0.02, 1.02)
    if "win rate" in axis:
        ax.set_xlim(-0.02, 1.02)
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_reports(results: dict[str, Any], out_dir: str | Path, compare: list[str] | None = None) -> dict[str, str]:
    """results.json, results.md and tradeoff.png in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    models = {**load_results(compare or []), **results.get("models", {})}
    md = out / "results.md"
    md.write_text(markdown_report(results, models))
    files = {"json": str(out / "results.json"), "markdown": str(md)}
    try:
        png = plot_tradeoff(models, out / "tradeoff.png")
    except ImportError:
        png = None
        print("[safedpo] matplotlib is not installed: no plot (pip install 'safedpo-ray[plot]')", flush=True)
    if png:
        files["plot"] = str(png)
    return files
