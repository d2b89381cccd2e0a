"""``python -m curvlin bench``: what each method costs per step on your model and hardware.

For a model (``--model``: ``autoencoder``, the MNIST autoencoder 784-1000-500-250-30 and its
mirror on random images with binary cross-entropy; ``cnn``, a small CIFAR-like network of three
3×3 convolutions and a linear layer on random 3×32×32 images with cross-entropy; or a user's
``module:factory``), every optimizer of :data:`curvlin._methods.SETTINGS` takes training steps
on one fixed batch, and the bench prints the mean step time over a window of consecutive steps
(whole periods of the method's schedule, so that every window holds the amortised statistics
and refresh steps at their share, wherever it starts), its ratio to an SGD
step timed next to it (the minimum over interleaved repeats), and the peak memory over SGD's.
With ``--layers`` it adds, for every curvature method, a per-layer breakdown: the flops of the
cost formulas (:meth:`~curvlin.blocks.Block.statistics_flops` on the step's rows,
:meth:`~curvlin.blocks.Block.refresh_flops`, :meth:`~curvlin.blocks.Block.precondition_flops`)
next to the measured time of one statistics-and-fold on a captured batch (for SMW's coupled
blocks, the kernel and one
``J·v`` and ``Jᵀ·u``), one refresh and one direction, and the state bytes of the formula
(:meth:`~curvlin.blocks.Block.state_shapes`: every array a state may hold) next to the bytes the
state holds (less where inverses are released between refreshes).

A ``module:factory`` is imported and called as ``factory(batch_size)``; it returns
``(model, inputs, targets, loss)`` with ``loss`` one of ``"cross_entropy"``, ``"mse"`` and
``"bce_with_logits"`` (mean reduction).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import math
import time

from ._demo import PeakMemory
from ._methods import SETTINGS, build, parse_names

#: The MNIST autoencoder of the K-BFGS paper (and of Hinton & Salakhutdinov): encoder widths.
AUTOENCODER = (784, 1000, 500, 250, 30)
#: The small CNN: channels of three 3×3 convolutions (padding 1, ReLU, 2×2 max-pooling).
CNN_CHANNELS = (3, 32, 64, 64)


def autoencoder(batch_size: int):
    """The MNIST autoencoder on ``torch.rand`` images; BCE on the logits against the input."""
    import torch

    from ._demo import build_model

    model = build_model(AUTOENCODER, seed=0)
    x = torch.rand(batch_size, AUTOENCODER[0], generator=torch.Generator().manual_seed(1))
    return model, x, x, "bce_with_logits"


def cnn(batch_size: int):
    """Three conv-ReLU-pool stages (3→32→64→64 channels) and Linear 1024 → 10 on random images."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for c_in, c_out in itertools.pairwise(CNN_CHANNELS):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    layers += [nn.Flatten(), nn.Linear(CNN_CHANNELS[-1] * 4 * 4, 10)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    return nn.Sequential(*layers), x, y, "cross_entropy"


MODELS = {"autoencoder": autoencoder, "cnn": cnn}


def load_factory(spec: str):
    """A built-in model's factory, or ``module:factory`` imported."""
    if spec in MODELS:
        return MODELS[spec]
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise SystemExit(f"--model must be one of {list(MODELS)} or module:factory, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"--model {spec!r}: {exc}") from None


def loss_function(name: str):
    from torch.nn import functional as F

    functions = {
        "cross_entropy": F.cross_entropy,
        "mse": F.mse_loss,
        "bce_with_logits": F.binary_cross_entropy_with_logits,
    }
    if name not in functions:
        raise SystemExit(f"the factory's loss must be one of {list(functions)}, got {name!r}")
    return functions[name]


class Trainer:
    """One optimizer on a fresh copy of the model, stepping on the fixed batch."""

    def __init__(self, name, factory, batch_size, device, dtype):
        model, x, y, loss = factory(batch_size)
        self.model = model.to(device=device, dtype=dtype)
        self.x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        self.y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
        self.loss, self.sampled = loss_function(loss), SETTINGS[name].sampled
        sub = SETTINGS[name].options.get("subsample")
        #: A curvature subsample smaller than the batch: backward_fisher gets its own forward.
        self.subsample = sub if sub is not None and sub < len(self.x) else None
        self.opt = build(name, self.model, loss=loss, loss_reduction="mean")
        self.cuda = str(device).startswith("cuda")
        self.last = None

    def step(self):
        def closure():
            self.opt.zero_grad()
            out = self.model(self.x)
            if self.sampled:
                sub = self.subsample
                self.opt.backward_fisher(self.model(self.x[:sub]) if sub else out)
            loss = self.loss(out, self.y)
            loss.backward()
            return loss

        self.last = self.opt.step(closure)

    def window(self, steps: int) -> float:
        """Mean seconds per step over ``steps`` consecutive steps (synchronised)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps


def window_steps(name: str, steps: int) -> int:
    """``steps`` rounded up to whole periods of ``name``'s schedule (the least common multiple
    of its ``stats_every`` and ``refresh_every``): any window that long holds one refresh per
    ``refresh_every`` steps wherever it starts, so the best window is not one without."""
    options = SETTINGS[name].options
    period = math.lcm(options.get("stats_every", 1), options.get("refresh_every", 1))
    return -(-steps // period) * period


def measure(name, factory, args, device, dtype):
    """(trainer, mean step seconds, SGD step seconds, peak MiB) for optimizer ``name``."""
    sgd = Trainer("SGD+momentum", factory, args.batch_size, device, dtype)
    steps = window_steps(name, args.steps)
    with PeakMemory(device) as memory:
        trainer = Trainer(name, factory, args.batch_size, device, dtype)
        trainer.window(args.warmup)
        sgd.window(args.warmup)
        times, base = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same machine state
            times.append(trainer.window(steps))
            base.append(sgd.window(steps))
        peak = memory.peak()
    return trainer, min(times), min(base), peak


def _best_ms(fn, cuda: bool, repeat: int) -> float:
    """Milliseconds of the fastest of ``repeat`` calls of ``fn`` (synchronised on CUDA)."""
    import torch

    best = math.inf
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def statistics_times(trainer, *, repeat: int = 2, max_steps: int = 100) -> dict:
    """Per layer, ``(GFLOP of the formula, ms)`` of one statistics-and-fold on the batch of
    the next statistics step (the trainer steps until one comes; a coupled block: its kernel,
    one ``J·v`` and one ``Jᵀ·u``).
    """
    import torch

    driver = trainer.opt._curv.driver
    found = {}

    def timed(batches):
        batches = dict(batches.items())  # a lazy mapping builds each batch once
        for name, batch in batches.items():
            block, state = driver.blocks[name], driver.states[name]
            rows = 0 if batch.inputs is None else batch.inputs.shape[0]
            examples = batch.n_examples if batch.examples is None else batch.examples
            if block.coupled:
                v = torch.randn(
                    block.d_out, block.d_a, dtype=trainer.x.dtype, device=trainer.x.device
                )

                def call(block=block, batch=batch, v=v):
                    terms = block.terms(batch)
                    return terms.kernel(), terms.vjp(terms.jvp(v))

            else:

                def call(block=block, state=state, batch=batch):
                    return block.fold(state, block.statistics(state, batch), damping=1.0)

            flops = block.statistics_flops(rows, examples)
            found[name] = (flops / 1e9, _best_ms(call, trainer.cuda, repeat))
        return original(batches)

    original = driver.statistics
    driver.statistics = timed  # this instance only, for the steps below
    try:
        for _ in range(max_steps):
            trainer.step()
            if found:
                break
    finally:
        del driver.statistics
    return found


def layer_rows(trainer, *, repeat: int = 2):
    """Per layer: block type, weight shape, GFLOP (formula) and ms (measured) of statistics,
    refresh and preconditioning (on a random gradient; NaN for blocks coupled across layers,
    which precondition together), and state MiB (the formula's maximum and what is held)."""
    import torch

    opt = trainer.opt
    curv = getattr(opt, "_curv", None)
    if curv is None:
        return []
    stats = statistics_times(trainer, repeat=repeat)
    rows = []
    for name in opt.layer_names:
        block, state = curv.driver.blocks[name], curv.driver.states[name]
        weight = curv.layers[name].weight
        group = next(g for g in opt.param_groups if any(p is weight for p in g["params"]))
        damping = opt.curvature_damping(group)
        arrays = [a for a in state.arrays().values() if a is not None]
        itemsize = arrays[0].element_size() if arrays else weight.element_size()
        formula = sum(math.prod(s) for s in block.state_shapes().values()) * itemsize
        held = sum(a.numel() * a.element_size() for a in arrays)
        refresh = _best_ms(
            functools.partial(block.refresh, state, damping=damping), trainer.cuda, repeat
        )
        precond = math.nan
        if not block.coupled:  # timing does not depend on the gradient's values
            ready = curv.driver.current(name, damping=damping)
            # A parameter unit takes the gradient in its own shape, a layer block as a matrix.
            shape = weight.shape if curv.units == "parameters" else (block.d_out, block.d_in)
            g_w = torch.randn(shape, dtype=weight.dtype, device=weight.device)
            g_b = torch.randn_like(g_w[:, 0]) if block.bias else None
            call = functools.partial(block.precondition, ready, g_w, g_b)
            precond = _best_ms(call, trainer.cuda, repeat)
        rows.append(
            (name, type(block).__name__, "×".join(map(str, weight.shape)),
             *stats.get(name, (math.nan, math.nan)),
             block.refresh_flops() / 1e9, refresh, block.precondition_flops() / 1e9, precond,
             formula / 2**20, held / 2**20)
        )  # fmt: skip
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m curvlin bench",
        description="Step time and peak memory of every optimizer against SGD on one model, "
        "with a per-layer cost breakdown (docs/demo.md).",
    )
    p.add_argument("--model", default="autoencoder", help="autoencoder, cnn or module:factory")
    p.add_argument(
        "--methods", default="all", help=f"comma-separated subset of {', '.join(SETTINGS)}"
    )
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--steps", type=int, default=10,
        help="steps per timed window, rounded up to whole periods of each method's schedule",
    )  # fmt: skip
    p.add_argument("--repeat", type=int, default=3, help="interleaved windows per method")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--layers", action="store_true", help="add the per-layer breakdown")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parser().parse_args(argv)
    if min(args.batch_size, args.steps, args.repeat) < 1 or args.warmup < 0:
        raise SystemExit("--batch-size, --steps and --repeat must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = parse_names(args.methods)
    factory, dtype = load_factory(args.model), getattr(torch, args.dtype)
    print(
        f"model {args.model}, batch {args.batch_size}, {args.dtype} on {args.device}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; mean step over windows of "
        f"at least {args.steps} steps (whole schedule periods) after {args.warmup} warm-up "
        f"steps, best of {args.repeat} interleaved with SGD"
    )
    header = f"{'optimizer':<14}{'ms/step':>10}{'SGD ms':>9}{'ratio':>8}"
    header += f"{'peak MiB':>10}{'over SGD':>10}"
    print(header + "\n" + "-" * len(header), flush=True)
    # SGD first, twice: the first run also pays one-time allocations (BLAS workspaces).
    measure("SGD+momentum", factory, args, args.device, dtype)
    sgd_peak = measure("SGD+momentum", factory, args, args.device, dtype)[3]
    breakdowns = {}
    for name in names:
        trainer, t, t_sgd, peak = measure(name, factory, args, args.device, dtype)
        loss = float(trainer.last.detach()) if trainer.last is not None else math.nan
        flag = "" if math.isfinite(loss) else "  (loss not finite: steps may be skipped)"
        print(
            f"{name:<14}{1e3 * t:>10.1f}{1e3 * t_sgd:>9.1f}{t / t_sgd:>8.2f}{peak:>10.1f}"
            f"{peak - sgd_peak:>10.1f}{flag}",
            flush=True,
        )
        if args.layers:
            breakdowns[name] = layer_rows(trainer)
    print(
        "ratio: step time over an SGD step timed in the same process; peak MiB: over the "
        "memory in use before the model and optimizer were built (SGD's own run: "
        f"{sgd_peak:.1f}); over SGD: the difference"
    )
    for name, rows in breakdowns.items():
        if not rows:
            continue
        print(
            f"\n{name}: per layer, GFLOP of the cost formulas and ms measured (statistics: "
            "one statistics-and-fold on a captured batch, for SMW the kernel, J·v and Jᵀ·u; "
            "refresh: one; "
            "precond: one direction, — where all layers are solved together); state: every "
            "array the formula allows, and what the state holds now"
        )
        heads = ("stats GFLOP", "ms", "refresh GFLOP", "ms", "precond GFLOP", "ms")
        print(
            f"  {'layer':<12}{'block':<20}{'weight':>11}"
            + "".join(f"{h:>{15 if 'GFLOP' in h else 9}}" for h in heads)
            + f"{'state MiB max':>15}{'held':>9}"
        )
        total = ["total", "", ""] + [math.fsum(r[i] for r in rows) for i in range(3, 11)]
        for row in [*rows, total]:
            cells = "".join(
                f"{v:>15.4g}"
                if i % 2 == 0
                else ("{:>9}".format("—") if math.isnan(v) else f"{v:>9.2f}")
                for i, v in enumerate(row[3:9])
            )
            print(f"  {row[0]:<12}{row[1]:<20}{row[2]:>11}{cells}{row[9]:>15.2f}{row[10]:>9.2f}")
    return 0
