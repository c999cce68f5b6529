"""The `tune` verb of `safedpo-ray` (its table: safedpo_ray/cli/verbs.py).

    safedpo-ray tune                                        # built-in quick sweep (tune/quick.yaml)
    safedpo-ray tune --space paper-grid --config my.yaml    # the paper's Δ × β grid
    safedpo-ray tune --space tune/optuna.yaml tune.num_samples=32 train.max_steps=200
    safedpo-ray tune --resume NAME                          # continue an interrupted experiment
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from safedpo_ray.config.training import Config
from safedpo_ray.search.experiment import format_summary, run_experiment
from safedpo_ray.search.space import SearchSpec, base_config, load_space, split_overrides


@dataclass
class TuneJob:
    spec: SearchSpec
    """The search space and the search's settings."""
    base: Config
    """The training config every trial starts from."""

    @property
    def run(self):
        return self.base.run


def load_tune(args: argparse.Namespace) -> TuneJob:
    search_overrides, train_overrides = split_overrides(args.overrides)
    spec = load_space(args.space, search_overrides)
    return TuneJob(spec, base_config(args.config, spec, train_overrides))


def cmd_tune(args: argparse.Namespace) -> int:
    job = load_tune(args)
    spec, base = job.spec, job.base
    summary = run_experiment(spec, base, resume=args.resume)
    print(format_summary(summary))
    return 0


def tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default=None,
                   help="search space: a YAML file or a shipped space (quick, paper-grid, optuna); default quick")
    p.add_argument("--resume", default=None, metavar="NAME",
                   help="continue experiment NAME (under run.output_dir): finished trials are kept")
