"""``python -m curvlin demo``: a deep autoencoder on generated CURVES, second-order vs first-order.

The data set is drawn on the fly by :func:`curvlin.datasets.load_curves` (no download); the
autoencoder is Hinton & Salakhutdinov's CURVES architecture 784-400-200-100-50-25-6 and its
mirror, with the loss of the second-order literature: binary cross-entropy on the logits,
summed over pixels and averaged over the batch. KFAC (sampled Fisher), K-BFGS, K-BFGS(L), MBF,
SMW-NG (empirical Fisher), Adam and SGD with momentum each train the same initial model
on the same mini-batches; the demo prints progress and a comparison table and writes a PNG plot
of the training loss against iterations and against time.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

#: Tuned on this problem over 200 iterations (the grid and outcome are in docs/kfac.md). Every
#: curvlin optimizer accumulates torch's heavy-ball momentum of the gradient before
#: preconditioning: the K-BFGS learning rates are the papers' EMA-form 0.1 times ``1 − μ``.
OPTIMIZERS = {
    "KFAC": {"lr": 1.0, "damping": 0.3, "momentum": 0.9, "kl_clip": 0.1},
    "K-BFGS": {"lr": 0.01, "damping": 0.3, "momentum": 0.9},
    "K-BFGS(L)": {"lr": 0.01, "damping": 0.1, "momentum": 0.9},
    "MBF": {"lr": 3e-3, "damping": 1e-2, "momentum": 0.9, "kl_clip": 1e-2},  # docs/mbf.md
    "SMW-NG": {"lr": 1.0, "damping": 0.1, "momentum": 0.9, "momentum_form": "direction"},
    "Adam": {"lr": 3e-3},
    "SGD+momentum": {"lr": 3e-3, "momentum": 0.9},
}
ARCHITECTURE = (784, 400, 200, 100, 50, 25, 6)


@dataclass
class Run:
    name: str
    iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    test_loss: float = float("nan")


def build_model(sizes=ARCHITECTURE, *, seed: int = 0):
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
    return model


def loss_fn(logits, target):
    """Binary cross-entropy on logits, summed over pixels, mean over the batch."""
    from torch.nn import functional as F

    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def make_optimizer(name: str, model):
    import torch

    from .adapters.torch import KBFGS, KBFGSL, KFAC, MBF, SMWNG

    hyper = dict(OPTIMIZERS[name])
    if name == "KFAC":
        return KFAC(
            model,
            fisher="mc",
            loss="bce_with_logits",
            loss_reduction="batchmean",
            stats_every=1,
            refresh_every=5,
            **hyper,
        )
    if name == "K-BFGS":
        return KBFGS(model, **hyper)
    if name == "K-BFGS(L)":
        return KBFGSL(model, **hyper)
    if name == "MBF":
        return MBF(model, stats_every=5, refresh_every=5, **hyper)
    if name == "SMW-NG":  # the empirical Fisher of the whole batch: m = 250
        return SMWNG(model, fisher="empirical", **hyper)
    if name == "Adam":
        return torch.optim.Adam(model.parameters(), **hyper)
    return torch.optim.SGD(model.parameters(), **hyper)


def train(
    name: str,
    data,
    test,
    *,
    iterations: int,
    batch_size: int,
    seed: int,
    report_every: int,
    out=print,
) -> Run:
    import torch

    model = build_model(seed=seed)
    opt = make_optimizer(name, model)
    order = np.random.default_rng(seed + 1)
    run = Run(name)
    n = data.shape[0]
    perm = order.permutation(n)
    start = time.perf_counter()
    for it in range(1, iterations + 1):
        lo = ((it - 1) * batch_size) % n
        if lo + batch_size > n:
            perm, lo = order.permutation(n), 0
        batch = data[perm[lo : lo + batch_size]]

        def closure(batch=batch):  # every optimizer, curvlin's and torch's, takes a closure
            opt.zero_grad()
            logits = model(batch)
            loss = loss_fn(logits, batch)
            if getattr(opt, "fisher", "empirical") != "empirical":  # the sampled Fisher
                opt.backward_fisher(logits)
            loss.backward()
            return loss

        loss = opt.step(closure)
        run.iterations.append(it)
        run.seconds.append(time.perf_counter() - start)
        run.losses.append(loss.item())
        if it % report_every == 0 or it == iterations:
            recent = np.mean(run.losses[-report_every:])
            out(
                f"  {name:<13} iter {it:>5}/{iterations}  train loss {recent:8.3f}  "
                f"{run.seconds[-1]:6.1f}s"
            )
    with torch.no_grad():
        run.test_loss = float(loss_fn(model(test), test))
    return run


def smoothed(losses, window: int = 20) -> np.ndarray:
    losses = np.asarray(losses)
    if losses.size < window:
        return losses
    kernel = np.ones(window) / window
    head = np.cumsum(losses[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(losses, kernel, mode="valid")])


def iterations_to_reach(run: Run, target: float) -> int | None:
    hit = np.nonzero(smoothed(run.losses) <= target)[0]
    return int(hit[0]) + 1 if hit.size else None


def table(runs: list[Run]) -> str:
    """The comparison: final losses, time per iteration, iterations to reach SGD's final loss."""
    reference = runs[-1]
    target = float(smoothed(reference.losses)[-1])
    header = (
        f"{'optimizer':<14}{'train loss':>11}{'test loss':>11}{'ms/iter':>9}"
        f"{'iters to SGD final':>20}{'seconds to it':>15}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        hit = iterations_to_reach(run, target)
        secs = f"{run.seconds[hit - 1]:.1f}" if hit else "—"
        lines.append(
            f"{run.name:<14}{smoothed(run.losses)[-1]:>11.3f}{run.test_loss:>11.3f}"
            f"{1e3 * run.seconds[-1] / len(run.seconds):>9.1f}{(hit or '—'):>20}{secs:>15}"
        )
    lines.append(f"(target: SGD+momentum's final smoothed training loss, {target:.3f})")
    return "\n".join(lines)


def plot(runs: list[Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_it, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for run in runs:
        ax_it.plot(run.iterations, smoothed(run.losses), label=run.name)
        ax_t.plot(run.seconds, smoothed(run.losses), label=run.name)
    ax_it.set_xlabel("iteration")
    ax_t.set_xlabel("wall-clock time (s)")
    ax_it.set_ylabel("training loss (BCE summed over pixels, smoothed)")
    for ax in (ax_it, ax_t):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("CURVES autoencoder (generated data): second-order vs first-order optimizers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m curvlin demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--iterations", type=int, default=400, help="steps per optimizer")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated subset of {', '.join(OPTIMIZERS)}",
    )
    parser.add_argument("--plot", default="curvlin-demo.png", help="where to write the PNG plot")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    return run_demo(args)


def run_demo(args) -> int:
    import torch

    from .datasets import load_curves

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        raise SystemExit(f"unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}")
    print(f"generating CURVES: {args.train_size} train and {args.test_size} test images (28×28)")
    curves = load_curves(n_train=args.train_size, n_test=args.test_size, seed=args.seed)
    data, test = torch.from_numpy(curves.train), torch.from_numpy(curves.test)
    print(
        f"autoencoder {'-'.join(map(str, ARCHITECTURE))}-mirror, batch {args.batch_size}, "
        f"{args.iterations} iterations per optimizer, torch {torch.__version__} on "
        f"{torch.get_num_threads()} threads"
    )
    runs = []
    for name in names:
        print(f"\n{name} {OPTIMIZERS[name]}")
        runs.append(
            train(
                name,
                data,
                test,
                iterations=args.iterations,
                batch_size=args.batch_size,
                seed=args.seed,
                report_every=max(1, args.iterations // 6),
            )
        )
    print()
    print(table(runs))
    plot(runs, args.plot)
    print(f"\nplot written to {args.plot}")
    return 0
