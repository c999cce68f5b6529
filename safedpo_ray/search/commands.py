"""The `tune` verb of `safedpo-ray` (`register(subparsers)` adds it).

    safedpo-ray tune                                        # built-in quick sweep (tune/quick.yaml)
    safedpo-ray tune --space paper-grid --config my.yaml    # the paper's Δ × β grid
    safedpo-ray tune --space tune/optuna.yaml tune.num_samples=32 train.max_steps=200
    safedpo-ray tune --resume NAME                          # continue an interrupted experiment
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safedpo_ray.search.experiment import format_summary, run_experiment
from safedpo_ray.search.space import base_config, load_space, split_overrides


def cmd_tune(args: argparse.Namespace) -> int:
    search_overrides, train_overrides = split_overrides(args.overrides)
    spec = load_space(args.space, search_overrides)
    base = base_config(args.config, spec, train_overrides)
    summary = run_experiment(spec, base, resume=args.resume)
    print(format_summary(summary))
    return 0


def register(sub) -> None:
    p = sub.add_parser("tune", help="search β, Δ or any config key with Ray Tune; pick the most helpful safe model")
    p.add_argument("--space", default=None,
                   help="search space: a YAML file or a shipped space (quick, paper-grid, optuna); default quick")
    p.add_argument("--config", type=Path, default=None, help="training config every trial starts from")
    p.add_argument("--resume", default=None, metavar="NAME",
                   help="continue experiment NAME (under run.output_dir): finished trials are kept")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training overrides (train.max_steps=50) or search settings (tune.num_samples=8)")
    p.set_defaults(fn=cmd_tune)
