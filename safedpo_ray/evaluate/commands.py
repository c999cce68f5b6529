"""The `evaluate` and `train-scorer` verbs of `safedpo-ray` (their table: safedpo_ray/cli/verbs.py).

    safedpo-ray evaluate --model runs/r1 --data pku_test.jsonl                       # implicit + generation
    safedpo-ray evaluate --model runs/base --model runs/safedpo --data pku_test.jsonl \
        --xstest xstest_prompts.csv --cost-model scorers/cost --reward-model scorers/reward --baseline base
    safedpo-ray evaluate --generations eval/<name>/generations.jsonl --cost-model c --reward-model r  # rescore
    safedpo-ray evaluate --config safedpo_ray/configs/eval-paper-7b.yaml \
        --model /mnt/shared/runs/sft --model /mnt/shared/runs/dpo-helpful --model /mnt/shared/runs/safedpo \
        --label sft --label dpo-helpful --label safedpo --anchor-zero sft --anchor-ten dpo-helpful   # the paper's protocol
    safedpo-ray evaluate --name e1 ...            # an existing eval/e1 is resumed: only what is missing is computed
    safedpo-ray evaluate --resume eval/e1         # the same, with the configuration saved in eval/e1/config.yaml
    safedpo-ray train-scorer --data pku_train.jsonl --kind both --output scorers
    safedpo-ray train-scorer --config safedpo_ray/configs/eval-train-scorer-tiny.yaml

On a cluster: the same commands with `ray.address=auto` (evaluate) / `run.address=auto`
(train-scorer), or shipped with `ray job submit -- safedpo-ray evaluate ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from safedpo_ray.config.evaluation import load_eval_config, load_scorer_config
from safedpo_ray.evaluate.judge import JudgeError
from safedpo_ray.train.preempt import command_guard


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None or value == []:
        return
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


EVAL_FLAGS = (("model.paths", "model"), ("model.labels", "label"), ("model.reference", "reference"),
              ("data.source", "data"), ("data.prompts", "prompts"), ("xstest.csv", "xstest"),
              ("scoring.cost_model", "cost_model"), ("scoring.reward_model", "reward_model"),
              ("scoring.baseline", "baseline"), ("scoring.generations", "generations"),
              ("scoring.anchor_zero", "anchor_zero"), ("scoring.anchor_ten", "anchor_ten"),
              ("output.dir", "output"), ("output.name", "name"), ("output.compare", "compare"))


def eval_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config tree the `evaluate` flags stand for (flags absent from `args` count as unset)."""
    tree: dict[str, Any] = {}
    for key, attr in EVAL_FLAGS:
        _set(tree, key, getattr(args, attr, None))
    return tree


def load_evaluate(args: argparse.Namespace):
    return load_eval_config(args.config, args.overrides, eval_flags(args))


def scorer_flags(args: argparse.Namespace) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, attr in (("data.source", "data"), ("scorer.base_model", "base"), ("scorer.kind", "kind"),
                      ("scorer.output_dir", "output")):
        _set(tree, key, getattr(args, attr, None))
    return tree


def load_train_scorer(args: argparse.Namespace):
    return load_scorer_config(args.config, args.overrides, scorer_flags(args))


def _report_error(exc: BaseException, code: int = 2) -> int:
    print(f"safedpo-ray: {exc}", file=sys.stderr)
    return code


def cmd_evaluate(args: argparse.Namespace) -> int:
    from safedpo_ray.evaluate.runner import evaluate, format_results  # lazy: imports pyarrow, torch

    config, flags = args.config, eval_flags(args)
    if getattr(args, "resume", None):
        run = Path(args.resume)
        if args.config or args.name or args.output:
            return _report_error("--resume DIR takes the configuration and place of DIR: drop --config/--name/--output")
        if not (run / "config.yaml").exists():
            return _report_error(f"--resume {run}: no config.yaml there (not an evaluation directory)")
        config = run / "config.yaml"
        flags.setdefault("output", {}).update({"dir": str(run.resolve().parent), "name": run.resolve().name})
    cfg = load_eval_config(config, args.overrides, flags)
    try:
        results = evaluate(cfg)
    except JudgeError as exc:
        where = Path(exc.path).parent if exc.path else Path(cfg.output.dir)
        return _report_error(f"judge: {exc}\neverything else was measured and kept: {where / 'results.json'}\n"
                             f"to judge the rest: safedpo-ray evaluate --resume {where}", 1)
    print(format_results(results))
    return 0


def cmd_train_scorer(args: argparse.Namespace) -> int:
    from safedpo_ray.train.scorer import format_scorer_summary, train_scorer  # lazy: imports pandas, torch

    cfg = load_train_scorer(args)
    # SIGTERM/SIGINT: the workers stop after their step, exit 143/130; nothing we started keeps running
    with command_guard(cfg.run):
        summary = train_scorer(cfg)
    print(format_scorer_summary(summary))
    return 0


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", help="model dir, run dir or LoRA adapter (repeat for several)")
    p.add_argument("--label", action="append", help="report name for each --model, in order")
    p.add_argument("--reference", help="reference model for implicit rewards (default: from the run dir)")
    p.add_argument("--data", help="preference pairs / prompts: 'synthetic', a .jsonl/.json/.csv/.parquet file, or a hub id")
    p.add_argument("--prompts", help="prompts to generate from, if not those of --data")
    p.add_argument("--xstest", help="XSTest prompts CSV (id,prompt,type,label,focus,note)")
    p.add_argument("--cost-model", dest="cost_model", help="cost model dir (safe-rlhf score model or HF classifier)")
    p.add_argument("--reward-model", dest="reward_model", help="reward model dir")
    p.add_argument("--baseline", help="win-rate baseline: a --model label, a model/run dir, or a generations .jsonl")
    p.add_argument("--generations", action="append", help="a generations .jsonl to score as is (repeatable)")
    p.add_argument("--output", help="output directory (default: eval)")
    p.add_argument("--name", help="name of this evaluation (default: timestamp); an existing one is resumed")
    p.add_argument("--resume", help="an evaluation directory to continue, with the configuration saved there")
    p.add_argument("--anchor-zero", dest="anchor_zero", help="model label whose mean reward is helpfulness 0 (e.g. sft)")
    p.add_argument("--anchor-ten", dest="anchor_ten", help="model label whose mean reward is helpfulness 10 (e.g. dpo-helpful)")
    p.add_argument("--compare", action="append", help="results.json of an earlier evaluation to plot beside")


def train_scorer_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--data", help="PKU-SafeRLHF-style preference data: 'synthetic', a file, or a hub id")
    q.add_argument("--base", help="backbone: 'tiny', a Llama hub id or directory")
    q.add_argument("--kind", choices=("cost", "reward", "both"), help="which model(s) to train")
    q.add_argument("--output", help="where cost/ and reward/ are written")
