"""The `safedpo-ray` command: the verbs of cli/verbs.py (and cli/jobs.py) on one parser.

    safedpo-ray train                               # built-in default: synthetic data, tiny model, 2 workers, ZeRO-2
    safedpo-ray train --config my.yaml train.delta=5 run.num_workers=8 run.use_gpu=true
    safedpo-ray sft --config my.yaml                # supervised fine-tuning on safe responses (before train)
    safedpo-ray prepare --config my.yaml            # data pipeline only: prepared pairs + statistics
    safedpo-ray config [--config my.yaml] [k=v ...] # print the resolved configuration
    safedpo-ray evaluate --model runs/NAME ...      # implicit rewards, generation, scoring, XSTest
    safedpo-ray train-scorer ...                    # cost / reward models for evaluation
    safedpo-ray verify | delta-study                # check training against SafeDPO's closed-form optimum
    safedpo-ray submit -- train --config my.yaml    # the same as a job on a Ray cluster (safedpo_ray/cli/jobs.py)
    safedpo-ray jobs list | status ID | logs ID [--follow] | stop ID
"""

from __future__ import annotations

import argparse
import sys
import traceback

from safedpo_ray.cli.jobs import JOB_VERBS
from safedpo_ray.cli.verbs import VERBS
from safedpo_ray.errors import ConfigError, UserError
from safedpo_ray.runtime import console, run_dirs

ALL_VERBS = {v.name: v for v in VERBS + JOB_VERBS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedpo-ray", description="Ray-distributed SafeDPO training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in ALL_VERBS.values():
        verb.add_to(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if ALL_VERBS[args.command].on_ray:  # Ray's and the libraries' logs to a file, ours on the console
        console.start(args.command, verbose=args.verbose)
    run_dirs.forget()  # only what this command creates
    code = 1
    try:
        code = args.fn(args)
        run_dirs.forget()
        return code
    except UserError as exc:
        if getattr(args, "verbose", False):  # the traceback for whoever asks; one sentence otherwise
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
