"""The training verbs of `safedpo-ray`: train, prepare, config, sft (their table: safedpo_ray/cli/verbs.py).

    safedpo-ray train --config my.yaml train.delta=5
    safedpo-ray prepare --config my.yaml
    safedpo-ray config --config my.yaml
    safedpo-ray sft --config safedpo_ray/configs/chain-sft-tiny.yaml
"""

from __future__ import annotations

import argparse

from safedpo_ray.config.training import Config, dump_config, load_config
from safedpo_ray.train.preempt import command_guard


def load_training(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from safedpo_ray.train.trainer import format_summary, train  # lazy: imports pyarrow

    cfg = load_training(args)
    # SIGTERM/SIGINT: checkpoint, stop, exit 143/130; at the end nothing we started keeps running
    with command_guard(cfg.run):
        print(format_summary(train(cfg)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from safedpo_ray.data.pipeline import format_stats  # lazy: imports pyarrow
    from safedpo_ray.train.trainer import plan_data, prepare, run_dir_for  # lazy: imports pyarrow

    cfg = load_training(args)
    plan = plan_data(cfg)  # a bad source is reported before Ray starts
    run_dir = run_dir_for(cfg)
    prepared = prepare(cfg, run_dir, plan, dashboard=False)  # no Ray Train here: no dashboard needed
    print(format_stats(prepared.stats))
    print(f"prepared pairs: {prepared.data.root} (train.arrow, eval.arrow; reused by later runs)\n"
          f"statistics: {run_dir / 'data_stats.json'}  tokenizer/model: {prepared.model_path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_config(load_training(args)), end="")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from safedpo_ray.train.sft import format_sft_summary, sft  # lazy: imports pyarrow

    cfg = load_training(args)
    with command_guard(cfg.run):  # SIGTERM/SIGINT: checkpoint, stop; nothing of ours left after
        print(format_sft_summary(sft(cfg)))
    return 0
