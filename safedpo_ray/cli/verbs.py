"""Every verb of `safedpo-ray`, in one table: its arguments, what it runs, how its configuration
is loaded, whether it runs on Ray (the console routes Ray's logs; `--verbose`) and whether
`safedpo-ray submit` can ship it to a cluster. The parser (cli/main.py), the console and the
job checks (cli/jobs.py) all read this table; a new verb is one row.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safedpo_ray.evaluate import commands as evaluate_commands
from safedpo_ray.search import commands as search_commands
from safedpo_ray.train import commands as train_commands
from safedpo_ray.verify import commands as verify_commands

DEFAULT_CONFIG_HELP = "YAML config file (default: built-in defaults)"


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    load: Callable[[argparse.Namespace], Any] | None
    """The verb's configuration from its parsed arguments, as the command loads it (a job is
    checked with it before anything is shipped); None: the verb has no configuration."""
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    """Adds the verb's own flags (beside --config and the key=value overrides)."""
    config_help: str = DEFAULT_CONFIG_HELP
    overrides_help: str = "overrides, e.g. train.beta=0.05"
    on_ray: bool = True
    submittable: bool = True
    rank0_writes_to_storage: bool = False
    """Its outputs are written by rank 0 of a Ray Train job under run.storage_path: `submit` refuses
    the job without one on a cluster of several nodes (rank 0 may run on any node)."""

    def add_to(self, subparsers) -> argparse.ArgumentParser:
        p = subparsers.add_parser(self.name, help=self.help, description=self.help)
        if self.arguments is not None:
            self.arguments(p)
        if self.load is not None:
            p.add_argument("--config", type=Path, default=None, help=self.config_help)
            p.add_argument("overrides", nargs="*", metavar="key=value", help=self.overrides_help)
        if self.on_ray:
            p.add_argument("--verbose", action="store_true",
                           help="also print Ray's and the libraries' logs here (they always go to "
                                "<run>/logs/console.log)")
        p.set_defaults(fn=self.run, command=self.name)
        return p


VERBS: tuple[Verb, ...] = (
    Verb("train", "train a model with SafeDPO (Ray Train + DeepSpeed)",
         train_commands.cmd_train, train_commands.load_training, rank0_writes_to_storage=True),
    Verb("prepare", "run the data pipeline; write prepared pairs and statistics",
         train_commands.cmd_prepare, train_commands.load_training),
    Verb("config", "print the resolved configuration",
         train_commands.cmd_config, train_commands.load_training, on_ray=False),
    Verb("sft", "supervised fine-tuning on safe responses (Ray Train + DeepSpeed): the step before SafeDPO",
         train_commands.cmd_sft, train_commands.load_training, overrides_help="overrides, e.g. sft.responses=all_safe",
         rank0_writes_to_storage=True),
    Verb("tune", "search β, Δ or any config key with Ray Tune; pick the most helpful safe model",
         search_commands.cmd_tune, search_commands.load_tune, search_commands.tune_arguments,
         config_help="training config every trial starts from",
         overrides_help="training overrides (train.max_steps=50) or search settings (tune.num_samples=8)",
         rank0_writes_to_storage=True),
    Verb("evaluate", "implicit-reward metrics, generation, cost/reward scoring, XSTest, judge",
         evaluate_commands.cmd_evaluate, evaluate_commands.load_evaluate, evaluate_commands.evaluate_arguments,
         overrides_help="overrides, e.g. generation.num_actors=4"),
    Verb("train-scorer", "train cost/reward score models (safe-rlhf format) with Ray Train",
         evaluate_commands.cmd_train_scorer, evaluate_commands.load_train_scorer,
         evaluate_commands.train_scorer_arguments, overrides_help="overrides, e.g. generation.num_actors=4"),
    Verb("verify", "train SafeDPO and plain DPO on a synthetic world; compare with the closed-form optimum",
         verify_commands.cmd_verify, verify_commands.load_verify, verify_commands.verify_arguments,
         config_help="YAML config file (over the verify defaults)", overrides_help="overrides, e.g. train.max_steps=120",
         rank0_writes_to_storage=True),
    Verb("delta-study", "SafeDPO on the synthetic world at several Δ: unsafe mass and distance to π*",
         verify_commands.cmd_delta_study, verify_commands.load_verify, verify_commands.delta_study_arguments,
         config_help="YAML config file (over the verify defaults)", overrides_help="overrides, e.g. train.max_steps=120",
         rank0_writes_to_storage=True),
)
BY_NAME = {v.name: v for v in VERBS}
SUBMIT_VERBS = tuple(v.name for v in VERBS if v.submittable)


def parser_for(name: str) -> argparse.ArgumentParser:
    """The parser of one verb alone (`safedpo-ray NAME ...`), as the whole command line parses it."""
    top = argparse.ArgumentParser(prog="safedpo-ray")
    return BY_NAME[name].add_to(top.add_subparsers(dest="command"))
