"""The ``pyobc`` command line.

Examples:
    pyobc demo                 # score, prune and evaluate the built-in ResNet-20 on digits
    pyobc demo --methods jacobian obd --ratio 0.3
    pyobc info                 # versions, op backends, available criteria
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


class UserError(Exception):
    """A mistake on the command line: printed as one line, exit status 2, no traceback."""


def _demo(args: argparse.Namespace) -> int:
    from .criteria import methods
    from .demo import run_demo

    known = methods()
    for m in args.methods or []:
        if m not in known and m != "obc":
            raise UserError(f"unknown method {m!r}; available: {', '.join(known)}")
    if not 0.0 <= args.ratio < 1.0:
        raise UserError(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.batches < 1:
        raise UserError(f"--batches must be at least 1, got {args.batches}")
    run_demo(args.methods, ratio=args.ratio, batches=args.batches, progress=args.progress)
    return 0


def _info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyobc", description="Structured pruning with exact second-order criteria.",
        epilog="Examples:\n  pyobc demo\n  pyobc demo --methods jacobian obd\n  pyobc info --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="score, prune (by zeroing) and evaluate ResNet-20 on the built-in digits data",
        description="Trains ResNet-20 on the UCI digits once (cached under $PYOBC_CACHE or ~/.cache/pyobc), "
                    "scores it with every criterion, zeroes the lowest-scored channels and prints a table.",
        epilog="Examples:\n  pyobc demo\n  pyobc demo --methods magnitude jacobian --ratio 0.3 --batches 4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--methods", nargs="+", metavar="NAME", help="criteria to run (default: all)")
    demo.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's channels to zero (0.5)")
    demo.add_argument("--batches", type=int, default=8, help="batches of 64 training images to score on (8)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bars (default: when stderr is a terminal)")
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="versions, op backends and available criteria",
                          epilog="Example:\n  pyobc info --json", formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyobc`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"pyobc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyobc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
