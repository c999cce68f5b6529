"""The `verify` and `delta-study` verbs of `safedpo-ray` (their table: safedpo_ray/cli/verbs.py).

    safedpo-ray verify                                # SafeDPO and plain DPO vs the closed-form π*
    safedpo-ray verify --config my.yaml train.delta=10 --pairs 200
    safedpo-ray verify --world my_world.json          # a world of your own (World.to_dict() JSON)
    safedpo-ray verify train.loss=ipo                 # any loss with a known optimum: sigmoid, ipo, robust, simpo
    safedpo-ray delta-study --deltas 0,2,5,10,20 train.max_steps=80

`verify` exits 0 when every check passes (SafeDPO unsafe mass < 0.05 and ≤ reference/10, TV of
its safe part to π* < 0.1, plain DPO unsafe mass ≥ 5× SafeDPO's, on every prompt), 1 otherwise.

In safedpo_ray/cli/main.py:
    from safedpo_ray.verify.commands import register as register_verify
    register_verify(sub)          # `sub` = parser.add_subparsers(...)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safedpo_ray.verify.run import (
    DEFAULT_DELTAS,
    format_delta_study,
    format_verify,
    load_verify_config,
    run_delta_study,
    run_verify,
)
from safedpo_ray.verify.world import DEFAULT_WORLD, World


def _world(args: argparse.Namespace):
    if args.world is None:
        return DEFAULT_WORLD
    return World.from_dict(json.loads(Path(args.world).read_text()))


def load_verify(args: argparse.Namespace):
    return load_verify_config(args.config, args.overrides, name_prefix=args.command)


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = load_verify(args)
    report = run_verify(cfg, world=_world(args), pairs=args.pairs)
    print(format_verify(report))
    return 0 if report["passed"] else 1


def _deltas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--deltas must be comma-separated numbers, got '{text}'") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--deltas needs one or more values >= 0, got '{text}'")
    return values


def cmd_delta_study(args: argparse.Namespace) -> int:
    cfg = load_verify(args)
    study = run_delta_study(cfg, deltas=args.deltas, world=_world(args), pairs=args.pairs)
    print(format_delta_study(study))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=_positive, default=100,
                   help="Bradley–Terry pairs sampled per (prompt, candidate pair) (default 100)")
    p.add_argument("--world", type=Path, default=None, help="world JSON (default: the built-in world)")


def delta_study_arguments(p: argparse.ArgumentParser) -> None:
    verify_arguments(p)
    p.add_argument("--deltas", type=_deltas, default=list(DEFAULT_DELTAS),
                   help="comma-separated Δ values (default 0,2,5,10,20)")
