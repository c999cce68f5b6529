"""The `safedpo-ray` command: one thin function per verb.

    safedpo-ray train                               # built-in default: synthetic data, tiny model, 2 workers, ZeRO-2
    safedpo-ray train --config my.yaml train.delta=5 run.num_workers=8 run.use_gpu=true
    safedpo-ray sft --config my.yaml                # supervised fine-tuning on safe responses (before train)
    safedpo-ray prepare --config my.yaml            # data pipeline only: prepared pairs + statistics
    safedpo-ray config [--config my.yaml] [k=v ...] # print the resolved configuration
    safedpo-ray evaluate --model runs/NAME ...      # implicit rewards, generation, scoring, XSTest
    safedpo-ray train-scorer ...                    # cost / reward models for evaluation
    safedpo-ray verify | delta-study                # check training against SafeDPO's closed-form optimum
    safedpo-ray submit -- train --config my.yaml    # the same as a job on a Ray cluster (safedpo_ray/jobs.py)
    safedpo-ray jobs list | status ID | logs ID [--follow] | stop ID
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safedpo_ray.config import ConfigError, dump_config, load_config
from safedpo_ray.errors import UserError


def _load(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from safedpo_ray.train.preempt import command_guard
    from safedpo_ray.train.trainer import format_summary, train

    cfg = _load(args)
    # SIGTERM/SIGINT: checkpoint, stop, exit 143/130; at the end nothing we started keeps running
    with command_guard(cfg.run):
        print(format_summary(train(cfg)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from safedpo_ray.data.pipeline import format_stats
    from safedpo_ray.train.trainer import plan_data, prepare, run_dir_for

    cfg = _load(args)
    plan = plan_data(cfg)  # a bad source is reported before Ray starts
    run_dir = run_dir_for(cfg)
    prepared = prepare(cfg, run_dir, plan, dashboard=False)  # no Ray Train here: no dashboard needed
    print(format_stats(prepared.stats))
    print(f"prepared pairs: {prepared.data.root} (train.arrow, eval.arrow; reused by later runs)\n"
          f"statistics: {run_dir / 'data_stats.json'}  tokenizer/model: {prepared.model_path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_config(_load(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedpo-ray", description="Ray-distributed SafeDPO training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("train", cmd_train, "train a model with SafeDPO (Ray Train + DeepSpeed)"),
        ("prepare", cmd_prepare, "run the data pipeline; write prepared pairs and statistics"),
        ("config", cmd_config, "print the resolved configuration"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", type=Path, default=None, help="YAML config file (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.beta=0.05")
        p.set_defaults(fn=fn)
    from safedpo_ray.evaluate.commands import register as register_evaluate
    from safedpo_ray.verify.commands import register as register_verify

    from safedpo_ray.train.sft import register as register_sft

    register_sft(sub)
    register_evaluate(sub)
    from safedpo_ray.search.commands import register as register_tune

    register_tune(sub)
    register_verify(sub)
    __import__("safedpo_ray.jobs", fromlist=["register"]).register(sub)  # submit, jobs (Ray Jobs API)
    __import__("safedpo_ray.console", fromlist=["x"]).add_verbose_flag(sub)  # --verbose on the Ray commands
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from safedpo_ray import console  # our lines on the console; Ray's and the libraries' in <run>/logs

    console.start(args.command, verbose=getattr(args, "verbose", False))
    from safedpo_ray import run_dirs

    run_dirs.forget()  # only what this command creates
    code = 1
    try:
        code = args.fn(args)
        run_dirs.forget()
        return code
    except UserError as exc:
        if getattr(args, "verbose", False):  # the traceback for whoever asks; one sentence otherwise
            import traceback

            traceback.print_exc()
        kind = "config error: " if isinstance(exc, ConfigError) else ""
        print(f"safedpo-ray: {kind}{exc}", file=sys.stderr)
        code = getattr(exc, "exit_code", 2)
        run_dirs.discard_unstarted()  # a run directory this command created, before Ray: removed
        return code  # jobs: 1 failed, 3 unreachable, 4 no such job
    finally:
        console.finish(failed=code != 0)


def entry() -> None:
    """The `safedpo-ray` executable: `main`, then the exit without the interpreter's teardown of
    its modules (with Ray, torch and transformers loaded it took ~1.7 s after all work was done).
    Before it: our threads are joined, the atexit handlers run (Ray's, logging's), output flushed."""
    code = main()
    import atexit
    import os
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
