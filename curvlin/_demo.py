"""``python -m curvlin demo``: a deep autoencoder trained by every method, in iterations and time.

Problems (``--problem``): ``curves``, CURVES-style images drawn on the fly by
:func:`curvlin.datasets.load_curves` (no download), with Hinton & Salakhutdinov's CURVES
autoencoder 784-400-200-100-50-25-6 and its mirror; ``mnist``, the four MNIST IDX files in the
directory ``--data`` names (:func:`curvlin.datasets.load_mnist`), with their MNIST autoencoder
784-1000-500-250-30 and its mirror; ``digits``, scikit-learn's 8×8 digits with 64-128-64-16
and its mirror. The loss is that of the second-order literature: binary cross-entropy on the
logits, summed over pixels and averaged over the batch. Every optimizer of
:data:`curvlin._methods.SETTINGS` (at the settings tuned on the chosen problem,
:func:`curvlin._methods.settings`) trains the same initial model on the same mini-batches; the
demo shows progress bars, prints a table (loss at fixed iterations, iterations and seconds to
reach loss thresholds, time per step, peak memory), says where a method wins in iterations but
loses in time, and writes a PNG of the loss against iterations and against time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ._methods import SETTINGS, build, parse_names, settings, warmup_schedule

#: Layer widths of each problem's encoder (the decoder mirrors it); ReLU between layers, none
#: after the code layer and the output layer.
ARCHITECTURES = {
    "curves": (784, 400, 200, 100, 50, 25, 6),
    "mnist": (784, 1000, 500, 250, 30),
    "digits": (64, 128, 64, 16),
}
#: The default problem's encoder.
ARCHITECTURE = ARCHITECTURES["curves"]
#: Smoothing window of the reported training loss (the mean of the last so many batch losses).
WINDOW = 20


@dataclass
class Run:
    name: str
    iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    test_loss: float = float("nan")
    peak_mib: float = float("nan")


def build_model(sizes=ARCHITECTURE, *, seed: int = 0, device="cpu", dtype=None):
    """The symmetric autoencoder: ReLU between layers, linear code and output layers."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    dims = list(sizes) + list(reversed(sizes[:-1]))
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(n_in, n_out))
        if i not in (len(sizes) - 2, len(dims) - 2):  # linear code layer and output layer
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    for layer in model:
        if isinstance(layer, nn.Linear):  # He initialisation keeps signals alive through depth
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model.to(device=device, dtype=dtype or torch.float32)


def loss_fn(logits, target):
    """Binary cross-entropy on logits, summed over pixels, mean over the batch."""
    from torch.nn import functional as F

    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


class PeakMemory:
    """Peak memory of a stretch of work, in MiB over what was in use when it started.

    CUDA: torch's peak allocated bytes. CPU on Linux: the process's peak resident set size
    (``VmHWM``, reset through ``/proc/self/clear_refs``) after freed heap memory is returned to
    the system, so it counts the work's live memory plus allocator slack. Elsewhere: NaN.
    """

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) / 1024

    def __enter__(self):
        import torch

        gc.collect()
        self.start = float("nan")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
            return self
        # Return freed heap to the system first (glibc); elsewhere cached chunks are counted.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self._status("VmRSS")
        except OSError:
            pass
        return self

    def peak(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.start
        if self.start != self.start:  # NaN: no /proc
            return float("nan")
        return self._status("VmHWM") - self.start

    def __exit__(self, *exc):
        return False


def make_closure(opt, model, batch, sampled: bool, subsample: int | None = None):
    """zero_grad, forward, [backward_fisher], loss, backward: what every optimizer steps on.
    With a curvature ``subsample``, ``backward_fisher`` gets a forward pass of the subsample
    alone, so its output directions are backpropagated through ``subsample`` examples only."""

    def closure():
        opt.zero_grad()
        logits = model(batch)
        loss = loss_fn(logits, batch)
        if sampled:
            sub = subsample is not None and subsample < len(batch)
            opt.backward_fisher(model(batch[:subsample]) if sub else logits)
        loss.backward()
        return loss

    return closure


def train(
    name,
    data,
    test,
    *,
    sizes,
    iterations,
    batch_size,
    seed,
    device,
    progress=True,
    problem="curves",
) -> Run:
    """Train a fresh model with optimizer ``name`` at its settings for ``problem``
    (:func:`curvlin._methods.settings`); the batch losses, times and peak memory."""
    import torch
    from tqdm.auto import tqdm

    run = Run(name)
    order = np.random.default_rng(seed + 1)
    n = data.shape[0]
    perm = torch.as_tensor(order.permutation(n), device=data.device)
    with PeakMemory(device) as memory:
        model = build_model(sizes, seed=seed, device=device, dtype=data.dtype)
        opt = build(
            name, model, loss="bce_with_logits", loss_reduction="batchmean", problem=problem
        )
        sampled = SETTINGS[name].sampled
        subsample = settings(problem)[name].options.get("subsample")
        warmup = warmup_schedule(opt, settings(problem)[name].warmup)
        bar = tqdm(
            range(1, iterations + 1), desc=f"{name:<13}", unit="it", leave=True,
            disable=not progress, mininterval=0.5, file=sys.stdout,
        )  # fmt: skip
        start = time.perf_counter()
        for it in bar:
            lo = ((it - 1) * batch_size) % n
            if lo + batch_size > n:
                perm, lo = torch.as_tensor(order.permutation(n), device=data.device), 0
            batch = data[perm[lo : lo + batch_size]]
            loss = opt.step(make_closure(opt, model, batch, sampled, subsample))
            if warmup is not None:
                warmup.step()
            run.losses.append(loss.item())  # the demo's one host sync per step, for the record
            run.seconds.append(time.perf_counter() - start)
            run.iterations.append(it)
            if it % 10 == 0 or it == iterations:
                bar.set_postfix(loss=f"{np.mean(run.losses[-WINDOW:]):.2f}", refresh=False)
        bar.close()
        run.peak_mib = memory.peak()
    with torch.no_grad():
        run.test_loss = float(loss_fn(model(test), test))
    return run


def smoothed(losses, window: int = WINDOW) -> np.ndarray:
    """Running mean of the last ``window`` losses (of fewer at the start)."""
    losses = np.asarray(losses, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(losses)])
    idx = np.arange(1, losses.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def first_reach(run: Run, target: float) -> int | None:
    """The first iteration whose smoothed loss is at most ``target`` (1-based), or None."""
    hit = np.nonzero(smoothed(run.losses) <= target)[0]
    return int(hit[0]) + 1 if hit.size else None


def default_thresholds(runs: list[Run]) -> list[tuple[str, float]]:
    """The final smoothed losses of the first-order baselines run (else of every run)."""
    base = [r for r in runs if SETTINGS[r.name].baseline] or runs
    pairs = [(f"{r.name} final", float(smoothed(r.losses)[-1])) for r in base]
    return sorted(pairs, key=lambda p: -p[1])


def checkpoints(iterations: int) -> list[int]:
    """The iterations the table reports losses at: a quarter, half and all of the run."""
    return sorted({max(1, iterations // 4), max(1, iterations // 2), iterations})


def table(runs: list[Run], thresholds: list[tuple[str, float]]) -> str:
    """Loss at fixed iterations, iterations / seconds to each threshold, ms/step, peak MiB."""
    marks = checkpoints(len(runs[0].losses))
    head = f"{'optimizer':<14}" + "".join(f"{'loss@' + str(m):>11}" for m in marks)
    head += f"{'test':>9}{'ms/step':>9}{'peak MiB':>10}"
    head += "".join(f"{'T' + str(i + 1) + ' it / s':>16}" for i in range(len(thresholds)))
    lines = [head, "-" * len(head)]
    for run in runs:
        s = smoothed(run.losses)
        line = f"{run.name:<14}" + "".join(f"{s[m - 1]:>11.2f}" for m in marks)
        ms = 1e3 * run.seconds[-1] / len(run.seconds)
        line += f"{run.test_loss:>9.2f}{ms:>9.1f}{run.peak_mib:>10.1f}"
        for _, target in thresholds:
            hit = first_reach(run, target)
            cell = f"{hit} / {run.seconds[hit - 1]:.1f}" if hit else "—"
            line += f"{cell:>16}"
        lines.append(line)
    lines.append(
        f"loss: training BCE summed over pixels, mean of the last {WINDOW} batches; "
        "test: the held-out set after the last step; peak MiB: over the memory in use before "
        "the run (model, optimizer state, temporaries)"
    )
    for i, (label, target) in enumerate(thresholds):
        lines.append(f"T{i + 1}: {label} loss, {target:.2f} (iterations / seconds to reach it)")
    return "\n".join(lines)


def verdicts(runs: list[Run], thresholds: list[tuple[str, float]]) -> list[str]:
    """Per threshold, the curvature methods that beat the fastest first-order method (in
    seconds) in iterations but lose to it in time, and those that beat it in time."""
    out = []
    curvature = [r for r in runs if not SETTINGS[r.name].baseline]
    for label, target in thresholds:
        reached = [(r.seconds[h - 1], h, r) for r in runs if (h := first_reach(r, target))]
        fastest = min(((t, h, r) for t, h, r in reached if SETTINGS[r.name].baseline),
                      default=None, key=lambda x: x[0])  # fmt: skip
        if fastest is None:
            continue
        t_ref, h_ref, ref = fastest
        mine = [(t, h, r) for t, h, r in reached if r in curvature]
        fewer = [f"{r.name} ({h} / {t:.1f} s)" for t, h, r in mine if h < h_ref and t > t_ref]
        faster = [f"{r.name} ({h} / {t:.1f} s)" for t, h, r in mine if t <= t_ref]
        head = f"{label} ({target:.2f}), fastest first-order: {ref.name} ({h_ref} / {t_ref:.1f} s)"
        if fewer:
            out.append(f"{head}: fewer iterations but more time: {', '.join(fewer)}")
        if faster:
            out.append(f"{head}: faster in time: {', '.join(faster)}")
        if not fewer and not faster:
            out.append(f"{head}: no curvature method reaches it in fewer iterations")
    return out


def plot(runs: list[Run], path: str, title: str) -> None:
    """Two panels: smoothed training loss against iteration and against wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_it, ax_t) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for run in runs:
        style = "--" if SETTINGS[run.name].baseline else "-"
        ax_it.plot(run.iterations, smoothed(run.losses), style, label=run.name)
        ax_t.plot(run.seconds, smoothed(run.losses), style, label=run.name)
    ax_it.set_xlabel("iteration")
    ax_t.set_xlabel("wall-clock time (s)")
    ax_it.set_ylabel(f"training loss (BCE summed over pixels, mean of last {WINDOW})")
    for ax in (ax_it, ax_t):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m curvlin demo",
        description="Train a deep autoencoder with every optimizer from the same start and "
        "compare them in iterations and in seconds (docs/demo.md).",
    )
    p.add_argument(
        "--problem", choices=tuple(ARCHITECTURES), default="curves",
        help="generated CURVES (default), MNIST from --data, or scikit-learn's digits",
    )  # fmt: skip
    p.add_argument("--data", help="directory of the MNIST IDX files (--problem mnist)")
    p.add_argument(
        "--methods", "--optimizers", dest="methods", default="all",
        help=f"comma-separated subset of {', '.join(SETTINGS)}, or 'all' (the default)",
    )  # fmt: skip
    p.add_argument(
        "--iterations",
        type=int,
        default=int(os.environ.get("CURVLIN_DEMO_ITERATIONS", 300)),
        help="steps per optimizer (default 300, or $CURVLIN_DEMO_ITERATIONS: CI's short run)",
    )
    p.add_argument("--batch-size", type=int, default=250, help="default 250")
    p.add_argument("--train-size", type=int, default=20000, help="curves: generated images")
    p.add_argument("--test-size", type=int, default=2000, help="curves: held-out images")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument(
        "--thresholds", default=None,
        help="comma-separated loss thresholds (default: each baseline's final loss)",
    )  # fmt: skip
    p.add_argument("--out", default=".", help="directory for curvlin-demo.png and .json")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_problem(args):
    """Train and test images as float arrays in [0, 1], and a description."""
    from .datasets import load_curves, load_digits, load_mnist

    if args.problem == "mnist":
        if not args.data:
            raise SystemExit(
                "--problem mnist needs --data DIR: a directory holding train-images-idx3-ubyte, "
                "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
                "(each optionally .gz); curvlin does not download them"
            )
        try:
            mnist = load_mnist(args.data)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(str(exc)) from None
        return mnist.train, mnist.test, f"MNIST from {args.data}"
    if args.problem == "digits":
        x = load_digits()
        perm = np.random.default_rng(args.seed).permutation(x.shape[0])
        return x[perm[300:]], x[perm[:300]], "scikit-learn digits (1497 train, 300 test)"
    curves = load_curves(n_train=args.train_size, n_test=args.test_size, seed=args.seed)
    return curves.train, curves.test, f"CURVES-style images (generated, {args.train_size} train)"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_demo(args)


def run_demo(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = parse_names(args.methods)
    if args.iterations < 1 or args.batch_size < 1:
        raise SystemExit("--iterations and --batch-size must be >= 1")
    thresholds = None
    if args.thresholds:
        try:
            values = [float(v) for v in args.thresholds.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--thresholds must be numbers, got {args.thresholds!r}") from None
        thresholds = [(f"loss {v:g}", v) for v in values]
    dtype = getattr(torch, args.dtype)
    train_x, test_x, what = load_problem(args)
    data = torch.as_tensor(train_x, device=args.device, dtype=dtype)
    test = torch.as_tensor(test_x, device=args.device, dtype=dtype)
    sizes = ARCHITECTURES[args.problem]
    if sizes[0] != data.shape[1]:
        raise SystemExit(f"{what}: images of {data.shape[1]} pixels, expected {sizes[0]}")
    batch = min(args.batch_size, data.shape[0])
    print(
        f"{what}; autoencoder {'-'.join(map(str, sizes))}-mirror, batch {batch}, "
        f"{args.iterations} iterations per optimizer, {args.dtype} on {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    # A few untimed SGD steps first, so that torch's one-time set-up (kernels, thread pools,
    # allocator pools) is not charged to whichever optimizer runs first.
    train("SGD+momentum", data, test, sizes=sizes, iterations=3, batch_size=batch,
          seed=args.seed, device=args.device, progress=False)  # fmt: skip
    runs = []
    tuned = settings(args.problem)
    for name in names:
        warmup = f", lr warm-up over {tuned[name].warmup} steps" if tuned[name].warmup else ""
        print(f"{name}: {tuned[name].kind} {tuned[name].options}{warmup}")
        runs.append(
            train(
                name, data, test, sizes=sizes, iterations=args.iterations, batch_size=batch,
                seed=args.seed, device=args.device, progress=not args.no_progress,
                problem=args.problem,
            )
        )  # fmt: skip
    thresholds = thresholds or default_thresholds(runs)
    print()
    print(table(runs, thresholds))
    notes = verdicts(runs, thresholds)
    if notes:
        print("\nIterations against time (iterations / seconds to reach each threshold):")
        for note in notes:
            print(f"  {note}")
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "curvlin-demo.png")
    plot(runs, png, f"{what}: every optimizer from the same start, batch {batch}")
    with open(os.path.join(args.out, "curvlin-demo.json"), "w") as f:
        json.dump({"args": vars(args), "runs": [asdict(r) for r in runs]}, f)
    print(f"\nplot written to {png} (runs in curvlin-demo.json next to it)")
    return 0
