"""Command line: ``python -m curvlin [check | demo]``.

``check`` (the default) lists the usable backends and checks every primitive on each against a
dense float64 reference, printing errors and timings; it exits with status 1 if any fails.
``demo`` trains a deep autoencoder on generated CURVES images with KFAC, K-BFGS, K-BFGS(L),
Adam and SGD with momentum (needs torch and matplotlib), prints a comparison table and writes
a PNG plot.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curvlin", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="check the primitives on every usable backend (default)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random test problems")
    sub.add_parser(
        "demo", help="second- vs first-order optimizers on a CURVES autoencoder", add_help=False
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from ._demo import main as demo

        return demo(argv[1:])
    args = parser.parse_args(argv)
    if args.command in (None, "check"):
        from ._check import run_check

        return 0 if run_check(seed=getattr(args, "seed", 0)) else 1
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
