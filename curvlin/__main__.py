"""Command line: ``python -m curvlin [check | demo | bench]`` (also the ``curvlin`` script).

``check`` (the default) lists the usable backends and checks every primitive on each against a
dense float64 reference, printing errors and timings; it exits with status 1 if any fails.
``demo`` trains a deep autoencoder (generated CURVES, MNIST from local files, or digits) with
every curvlin method, Adam, Muon and SGD with momentum (needs torch, tqdm and matplotlib),
prints a comparison in iterations and in time and writes a PNG plot. ``bench`` times a step of
every method against SGD on a chosen model, with peak memory and a per-layer cost breakdown.
Each command's ``--help`` lists its options.
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
        "demo", help="every optimizer on a deep autoencoder: iterations and time", add_help=False
    )
    sub.add_parser(
        "bench", help="step time and peak memory of every method against SGD", add_help=False
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from ._demo import main as demo

        return demo(argv[1:])
    if argv and argv[0] == "bench":
        from ._bench import main as bench

        return bench(argv[1:])
    args = parser.parse_args(argv)
    if args.command in (None, "check"):
        from ._check import run_check

        return 0 if run_check(seed=getattr(args, "seed", 0)) else 1
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
