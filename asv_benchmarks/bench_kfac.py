"""One KFAC or K-BFGS training step on the K-BFGS paper's MNIST autoencoder, against SGD.

The model is the deep autoencoder of Goldfarb, Ren & Bahamou (2020), "Practical quasi-Newton
methods for training deep neural networks" (and of Hinton & Salakhutdinov 2006, Martens 2010):
784-1000-500-250-30-250-500-1000-784, ReLU between layers except after the 30-unit code layer
and the output layer (both linear), float32, batch 1000. Inputs are ``torch.rand(1000, 784)``
(pixel intensities in [0, 1), no data set needed) and the loss is binary cross-entropy with
logits against the input (``F.binary_cross_entropy_with_logits(model(x), x)``, the paper's MNIST
loss, mean reduction), so the sampled Fisher uses ``loss="bce_with_logits"``.

A timed step is what a training loop does: ``zero_grad``, forward, loss, [``backward_fisher``
for the sampled Fisher], ``backward``, ``opt.step()``; on CUDA it synchronises before it
returns. The modes (the ``mode`` parameter):

============================ ===============================================================
``sgd``                      ``torch.optim.SGD(momentum=0.9)``: the baseline.
``kfac-empirical``           ``KFAC(fisher="empirical", stats_every=1, refresh_every=1)``.
``kfac-mc``                  ``KFAC(fisher="mc", loss="bce_with_logits")``, every step: one
                             extra backward (``opt.backward_fisher(output)``) per step.
``kfac-empirical-amortised`` ``KFAC(fisher="empirical", stats_every=10, refresh_every=100)``.
``kfac-mc-amortised``        the same with the sampled Fisher (the extra backward only on the
                             statistics steps).
``kbfgs``                    ``KBFGS`` (dense ``H_g``, minibatch ``A`` update), every step: the
                             closure runs forward and backward twice per step.
``kbfgsl``                   ``KBFGSL`` (L-BFGS ``H_g``, 100 pairs, matrix-free ``A`` update),
                             curvature every step.
============================ ===============================================================

:class:`CNNStep` runs the every-step modes (``sgd``, ``kfac-empirical``, ``kfac-mc``,
``kbfgs``, ``kbfgsl``) on a small CIFAR-like CNN (:func:`build_cnn`): random 3×32×32 images,
batch 128, three 3×3 convolutions (padding 1, bias) with 32, 64 and 64 channels, each followed
by ReLU and 2×2 max-pooling, then a Linear 1024 → 10 and the cross-entropy loss against random
labels (``loss="cross_entropy"`` for the sampled Fisher).

Memory: ``peakmem_steps`` is asv's peak resident memory of the benchmark process over the
warm-up and three more steps (compare each mode with ``sgd``); ``track_peak_over_sgd`` is the
extra peak memory in MiB over an SGD run, each optimizer in a fresh process that counts the
memory it allocates: its allocators return what is freed and the shared libraries' pages are
mapped before the run (:func:`peak_over_sgd_mib`).

Goals (targets to watch, never asserted anywhere), as ``track_ratio_to_sgd`` values, i.e.
KFAC step time over SGD step time measured in one process on the same machine:

- ``kfac-mc`` (sampled Fisher, every step): <= 3.0
- ``kfac-empirical`` (every step): <= 2.7
- ``kfac-empirical-amortised`` and ``kfac-mc-amortised``: <= 1.2
- ``kbfgs``: <= 3.0; ``kbfgsl``: <= 2.5

``track_state_over_params`` reports curvature-state bytes over parameter bytes (momentum
buffers excluded); K-BFGS(L)'s should stay near 1 (the CNN paper's "memory comparable to
first-order methods").

For scale (flop counts, not measured): forward + backward of SGD is about 15.4 GFLOP per step;
KFAC adds the statistics ``āᵀā`` and ``δᵀδ`` (13.0 GFLOP as full GEMMs, 6.5 as symmetric rank-k
updates; :meth:`curvlin.backends.Backend.gram` computes about 0.6 of the GEMM's flops on torch
CPU, which has no ``syrk``), about 5.5 GFLOP of Cholesky + ``cholesky_inverse`` (n³ per factor,
at LAPACK rather than GEMM speed) and 9.0 GFLOP of preconditioning (``G⁻¹ ∇W̄ A⁻¹``, two GEMMs
per layer, paid on every step, amortised or not), and the sampled Fisher's extra backward adds
about 4.1. The preconditioning alone puts a floor of about 1 + 9.0/15.4 ≈ 1.6 under the
amortised ratio at equal GEMM efficiency, so its 1.2 goal needs a cheaper per-step solve than
two dense GEMMs per layer. K-BFGS's second pass is a forward and a backward without weight
gradients (about 9.8 GFLOP), K-BFGS(L)'s preconditioning ``H_g M H_a`` one GEMM per layer with
``H_a`` (4.5 GFLOP) plus the compact L-BFGS products with 100 pairs (2.3 GFLOP).

How the ratio is measured (``track_ratio_to_sgd``)
------------------------------------------------------
Each track builds its own warmed-up SGD baseline next to the cached KFAC trainer (same
architecture, same seed, same input) and alternates their steps, so both see the same machine
state (clock, other load); garbage collection is off while timing.

- Every-step modes and ``sgd``: ``min(t_kfac) / min(t_sgd)`` over seven interleaved rounds
  of one step each (as :func:`common.min_times` with ``number=1``, without its extra warm-up
  calls: the trainers are warm). For ``mode="sgd"`` the "KFAC" side is a second, identical SGD
  trainer: that ratio is a control whose distance from 1.0 shows the measurement noise.
- Amortised modes: a 100-step cycle (90 plain steps, 9 statistics steps, 1 statistics step that
  also refreshes the inverses) costs too much for ``asv --quick`` on a CPU, so the cycle mean is
  assembled from its parts, ``0.9·t_plain + 0.1·t_stats + t_refresh/100``:
  ``t_plain`` and ``t_stats`` are the minima of individually timed steps over a window of
  consecutive steps (one statistics step per 10), interleaved with SGD steps; ``t_refresh`` is
  the extra cost of a refresh step, timed separately as the minimum over a few repeats of the
  work the optimizer adds on a refresh step, ``KFACBlock.refresh`` of every layer's current
  state (Cholesky, ``cholesky_inverse`` and the π-damping, with the one host synchronisation
  per factor). The minimum over only a few statistics steps is biased slightly high against the
  minimum over many plain steps; the statistics steps carry weight 0.1.

``time_step`` times one step with asv's own repeats. For the amortised modes consecutive timed
calls walk through the schedule, so asv's median is a plain (non-statistics) step; the
amortised mean is the track's business.

Timing on a busy CPU is noisy in the ratio too; each track is a minimum over interleaved
repeats, the estimator that is least disturbed by other load. On a 2-core machine shared with
other jobs, multi-threaded MKL/LAPACK calls can slow down several-fold when a thread is
descheduled, and KFAC (more, and more LAPACK-heavy, kernels) suffers more than SGD, so its ratio
is then overstated; compare ratios taken on a quiet machine.
"""

from __future__ import annotations

import gc
import itertools
import math
import time

from .common import SMOKE, backend_or_skip, cached

#: asv parameter: the device, ``cpu`` always and ``cuda`` where torch can use a GPU.
DEVICES = ("cpu", "cuda")
#: asv parameter: the optimizer under test (see the module docstring).
MODES = (
    "sgd",
    "kfac-empirical",
    "kfac-mc",
    "kfac-empirical-amortised",
    "kfac-mc-amortised",
    "kbfgs",
    "kbfgsl",
)

#: The problems a :class:`Trainer` can build.
PROBLEMS = ("autoencoder", "cnn")
#: Layer widths of the MNIST autoencoder; no activation after the code (30) and output layers.
SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
BATCH = 100 if SMOKE else 1000  # a smoke run only checks that the code runs
_CODE_LAYER = SIZES.index(30) - 1  # index of the Linear whose output is the code

#: The amortised schedule (both modes) and the every-step schedule.
_AMORTISED = {"stats_every": 10, "refresh_every": 100}
_EVERY = {"stats_every": 1, "refresh_every": 1}

#: Hyperparameters. Timing does not depend on them as long as every step is a full step: a
#: step skipped for NaN/inf would make KFAC look cheap (Trainer.check raises), and a Cholesky
#: that needs the jitter/float64 retry would make it look slow. With these values 120
#: amortised and 40 every-step KFAC steps on the fixed random batch stay finite and never
#: retry (checked with torch 2.13 on CPU); a benchmark process takes a few dozen steps.
_LR_SGD, _LR_KFAC, _DAMPING, _MOMENTUM = 1e-2, 1e-3, 1e-1, 0.9

#: Steps each trainer takes when it is built: step 0 gathers statistics and does the first
#: refresh, so it makes every first-call allocation (momentum buffers, factors, inverses,
#: MKL/cuBLAS/cuSOLVER workspaces); later steps of the same kind reuse them.
_WARMUP_STEPS = 1
#: Interleaved rounds (one KFAC step and one SGD step each) for the every-step modes: seven,
#: as in the numbers of docs/benchmarks.md (three left the minimum a few per cent high).
_REPEAT_EVERY = 1 if SMOKE else 7
#: Window of consecutive steps timed for the amortised modes: a multiple of ``stats_every``,
#: so it holds the cycle's 9:1 mix of plain and statistics steps.
_WINDOW_AMORTISED = 10
#: Repeats of the separately timed inverse refresh.
_REPEAT_REFRESH = 1 if SMOKE else 2


def _torch_device(device: str):
    """The torch device string for a ``device`` label, or NotImplementedError (asv: skip)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    # The cheap probes first: no GPU driver means no torch import just to skip.
    _, dev = backend_or_skip("torch" if device == "cpu" else "torch-cuda")
    return dev


#: The CNN problem: a small CIFAR-like network on random 3×32×32 images, batch 128. Three
#: 3×3 convolutions (padding 1, with bias) with channels 3→32→64→64, each followed by ReLU
#: and 2×2 max-pooling (32×32 → 16×16 → 8×8 → 4×4), then a Linear 64·4·4 = 1024 → 10 and the
#: cross-entropy loss against random labels; 75 178 parameters, float32.
CNN_CHANNELS = (3, 32, 64, 64)
CNN_IMAGE = 32
CNN_CLASSES = 10
CNN_BATCH = 16 if SMOKE else 128
#: asv parameter of :class:`CNNStep`: the modes run on the CNN (the amortised ones add
#: nothing new there).
CNN_MODES = ("sgd", "kfac-empirical", "kfac-mc", "kbfgs", "kbfgsl")


def build_cnn(device, *, seed: int = 0):
    """The 3-conv CNN of :data:`CNN_CHANNELS` (float32) on ``device``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for c_in, c_out in itertools.pairwise(CNN_CHANNELS):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    side = CNN_IMAGE // 2 ** (len(CNN_CHANNELS) - 1)
    layers += [nn.Flatten(), nn.Linear(CNN_CHANNELS[-1] * side * side, CNN_CLASSES)]
    return nn.Sequential(*layers).to(device=device, dtype=torch.float32)


def build_model(device, *, seed: int = 0):
    """The 784-1000-500-250-30-250-500-1000-784 autoencoder (float32) on ``device``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    n_linear = len(SIZES) - 1
    for i, (d_in, d_out) in enumerate(itertools.pairwise(SIZES)):
        layers.append(nn.Linear(d_in, d_out))
        if i != _CODE_LAYER and i != n_linear - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device=device, dtype=torch.float32)


class Trainer:
    """A model, its optimizer and one training step; counts its steps from 0.

    Parameters
    ----------
    mode : str
        One of :data:`MODES`.
    device : torch.device or str
    x : Tensor, shape (BATCH, 784)
        The input batch, also the target of the BCE-with-logits loss.
    problem : {"autoencoder", "cnn"}
        The autoencoder (BCE with logits against ``x``) or the CNN (cross-entropy against
        ``target``).
    target : Tensor, optional
        The CNN's labels.
    """

    def __init__(self, mode: str, device, x, *, problem: str = "autoencoder", target=None):
        import torch
        from torch.nn import functional as F

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if problem not in PROBLEMS:
            raise ValueError(f"unknown problem {problem!r}; expected one of {PROBLEMS}")
        self.mode, self.x = mode, x
        if problem == "cnn":
            self.model = build_cnn(device)
            self._loss_fn, self.target, mc_loss = F.cross_entropy, target, "cross_entropy"
        else:
            self.model = build_model(device)
            self._loss_fn, self.target = F.binary_cross_entropy_with_logits, x
            mc_loss = "bce_with_logits"
        self.mc = "-mc" in mode
        self.schedule_kwargs = None
        self.closure_driven = mode.startswith("kbfgs")
        if mode == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=_LR_SGD, momentum=_MOMENTUM)
        elif self.closure_driven:
            from curvlin.adapters.torch import KBFGS, KBFGSL

            cls = KBFGSL if mode == "kbfgsl" else KBFGS
            self.opt = cls(self.model, lr=_LR_KFAC, damping=_DAMPING, momentum=_MOMENTUM)
        else:
            from curvlin.adapters.torch import KFAC

            self.schedule_kwargs = _AMORTISED if mode.endswith("amortised") else _EVERY
            self.opt = KFAC(
                self.model,
                lr=_LR_KFAC,
                damping=_DAMPING,
                momentum=_MOMENTUM,
                fisher="mc" if self.mc else "empirical",
                loss=mc_loss if self.mc else None,
                **self.schedule_kwargs,
            )
        self.sync = torch.cuda.synchronize if x.device.type == "cuda" else _no_sync
        self.count = 0  # steps taken, as the optimizer's schedule counts them

    def step(self):
        """One training step; synchronises the device before it returns."""
        opt = self.opt
        if self.closure_driven:  # K-BFGS: two forward/backward passes through the closure
            loss = opt.step(self._closure)
        else:
            opt.zero_grad(set_to_none=True)
            output = self.model(self.x)
            loss = self._loss_fn(output, self.target)
            if self.mc:
                opt.backward_fisher(output)
            loss.backward()
            opt.step()
        self.count += 1
        self.sync()
        return loss

    def _closure(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss_fn(self.model(self.x), self.target)
        loss.backward()
        return loss

    def state_bytes_over_params(self) -> float:
        """Bytes of curvature state (everything but momentum buffers) over parameter bytes."""
        import torch

        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if not hasattr(self.opt, "layer_names"):  # SGD: no curvature
            return 0.0
        state = 0
        for name in self.opt.layer_names:
            for value in self.opt.curvature(name).arrays().values():
                if torch.is_tensor(value):
                    state += value.numel() * value.element_size()
        return state / params

    def check(self) -> None:
        """Raise if KFAC skipped a step (NaN/inf): its time would not be a real step's."""
        skipped = getattr(self.opt, "skipped_steps", 0)
        if skipped:
            raise RuntimeError(
                f"bench_kfac: {self.mode} skipped {skipped} of {self.count} steps (NaN or inf); "
                "the timings are meaningless, lower the learning rate"
            )

    def make_refresh(self):
        """A callable doing the work a refresh step adds.

        That is ``KFACBlock.refresh`` of every layer's current state (copies, so calling it
        leaves the optimizer alone), followed by a device synchronisation.
        """
        from curvlin.blocks import KFACBlock

        opt = self.opt
        group = opt.param_groups[0]
        work = []
        for name in opt.layer_names:
            state = opt.curvature(name)  # a copy: refreshing it leaves the optimizer alone
            d_out, d_a = state.g.shape[0], state.a.shape[0]
            block = KFACBlock(d_out, d_a - 1, bias=True)
            work.append((block, state))

        def run():
            for block, state in work:
                out = block.refresh(state, damping=group["damping"])
            self.sync()
            return out

        return run


def _no_sync(*args):
    return None


def build_trainer(mode: str, device: str, problem: str = "autoencoder") -> Trainer:
    """A warmed-up :class:`Trainer` for ``mode`` on the ``device`` label's torch device."""
    import torch

    dev = _torch_device(device)
    gen = torch.Generator().manual_seed(1234)
    if problem == "cnn":
        x = torch.rand(CNN_BATCH, CNN_CHANNELS[0], CNN_IMAGE, CNN_IMAGE, generator=gen).to(dev)
        target = torch.randint(CNN_CLASSES, (CNN_BATCH,), generator=gen).to(dev)
        trainer = Trainer(mode, dev, x, problem=problem, target=target)
    else:
        x = torch.rand(BATCH, SIZES[0], generator=gen).to(dev)
        trainer = Trainer(mode, dev, x)
    for _ in range(_WARMUP_STEPS):
        trainer.step()
    trainer.check()
    return trainer


def _interleaved_minima(funcs, repeat: int) -> list[float]:
    """Seconds of one call of each of ``funcs``: the minimum over ``repeat`` interleaved rounds.

    Like :func:`common.min_times` with ``number=1`` and without its warm-up and calibration
    calls (the trainers are warm already, and one training step is far above timer
    resolution): every round calls each function once, in turn, with garbage collection off.
    """
    best = [math.inf] * len(funcs)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for i, f in enumerate(funcs):
                start = time.perf_counter()
                f()
                best[i] = min(best[i], time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


def ratio_every_step(kfac: Trainer, sgd: Trainer, *, repeat: int = _REPEAT_EVERY) -> float:
    """``min(t_kfac) / min(t_sgd)`` over interleaved single steps (each step synchronises)."""
    t_kfac, t_sgd = _interleaved_minima([kfac.step, sgd.step], repeat)
    kfac.check()
    return t_kfac / t_sgd


def amortised_step_time(
    kfac: Trainer,
    sgd: Trainer,
    *,
    window: int = _WINDOW_AMORTISED,
    repeat_refresh: int = _REPEAT_REFRESH,
) -> tuple[float, float, dict]:
    """Mean KFAC step time over a full schedule cycle, and the SGD step time beside it.

    Returns ``(t_cycle_mean, t_sgd, parts)`` where ``t_cycle_mean`` is
    ``(1 - 1/s)·t_plain + (1/s)·t_stats + t_refresh/r`` for ``stats_every = s`` and
    ``refresh_every = r`` (a cycle of ``r`` steps has ``r - r/s`` plain steps, ``r/s - 1``
    statistics steps and one statistics step with a refresh), and ``parts`` holds the pieces.
    """
    from curvlin.blocks import Schedule

    sched = Schedule(**kfac.schedule_kwargs)
    s, r = sched.stats_every, sched.refresh_every
    if window % s or window >= r:
        raise ValueError(
            f"amortised_step_time: window must be a multiple of stats_every={s} and below "
            f"refresh_every={r}, got {window}"
        )
    # Do not time a refresh step inside the window: skip ahead past one if it is near.
    while any(sched.refresh_due(kfac.count + i) for i in range(window)):
        kfac.step()
    times = {"plain": [], "stats": []}
    t_sgd = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(window):
            kind = "stats" if sched.stats_due(kfac.count) else "plain"
            start = time.perf_counter()
            kfac.step()
            times[kind].append(time.perf_counter() - start)
            start = time.perf_counter()
            sgd.step()
            t_sgd.append(time.perf_counter() - start)
        refresh = kfac.make_refresh()
        refresh()  # warm-up (workspace allocation)
        t_refresh = math.inf
        for _ in range(repeat_refresh):
            start = time.perf_counter()
            refresh()
            t_refresh = min(t_refresh, time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    kfac.check()
    parts = {
        "plain": min(times["plain"]) if times["plain"] else math.nan,
        "stats": min(times["stats"]) if times["stats"] else math.nan,
        "refresh": t_refresh,
    }
    plain = parts["plain"] if times["plain"] else parts["stats"]
    mean = (1 - 1 / s) * plain + (1 / s) * parts["stats"] + t_refresh / r
    return mean, min(t_sgd), parts


#: Steps after the warm-up step in a peak-memory run (statistics and refresh every step in
#: the every-step modes; the amortised modes' window holds plain and statistics steps).
_PEAK_STEPS = 1 if SMOKE else 4


def peak_mib(
    mode: str, device: str, problem: str = "autoencoder", *, steps: int = _PEAK_STEPS, build=None
):
    """Peak memory in MiB of a fresh run: build the trainer (one warm-up step), ``steps`` more.

    On the CPU the process's peak resident set (``VmHWM`` of ``/proc/self/status`` where there
    is one: Linux's ``ru_maxrss`` keeps the parent's peak across ``fork`` and ``exec``, so a
    child of a large benchmark process would report the parent's; else ``ru_maxrss``), after
    :func:`map_library_pages`; on CUDA the peak of torch's allocator. Meant to run in a
    process of its own (:func:`peak_over_sgd_mib`). ``build(mode, device, problem)`` makes
    the trainer (default :func:`build_trainer`; other benchmark modules pass their own).
    """
    import os
    import re
    import resource
    import sys

    import torch

    if device == "cpu":  # on CUDA the allocator's peak is the figure
        map_library_pages()
    trainer = (build or build_trainer)(mode, device, problem)
    for _ in range(steps):
        trainer.step()
    trainer.check()
    if trainer.x.device.type == "cuda":
        return torch.cuda.max_memory_allocated(trainer.x.device) / 2**20
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            found = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if found:
            return int(found.group(1)) / 2**10
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB elsewhere


#: ``madvise`` advice that faults a mapping's pages in for reading (Linux 5.14).
_MADV_POPULATE_READ = 22


def map_library_pages() -> bool:
    """Map every page of the files this process has mapped (the shared libraries), so that
    code first run later does not raise the resident set; True if the kernel did it.

    A clean page of a shared library is shared with every process and reclaimable, and which
    pages a run touches depends on the code paths it takes (up to 7 MiB more for K-BFGS(L) on
    the CNN than for SGD): mapped whole in both runs, they drop out of the difference.
    """
    import ctypes
    import os

    if not os.path.exists("/proc/self/maps"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = True
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6 or not fields[5].startswith("/") or "r" not in fields[1]:
                continue
            start, end = (int(v, 16) for v in fields[0].split("-"))
            done &= libc.madvise(start, end - start, _MADV_POPULATE_READ) == 0
    return done


def _peak_in_subprocess(mode: str, device: str, problem: str, *, module: str = __name__) -> float:
    """:func:`peak_mib` of ``module`` (this one, or another bench module's) in a new process."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here) if "." in __name__ else here
    code = (
        "import json, sys, importlib\n"
        f"sys.path.insert(0, {root!r})\n"
        f"m = importlib.import_module({module!r})\n"
        f"print(json.dumps(m.peak_mib({mode!r}, {device!r}, {problem!r})))\n"
    )
    # Every allocation above 64 KiB its own mapping, returned when freed: the resident set
    # follows the live tensors. With glibc's adaptive threshold the peak moves by ±25 MiB
    # from run to run with the address-space layout (peakmem_steps shows that raw figure).
    # MKL keeps freed buffers for reuse unless told not to (2–3 MiB after K-BFGS(L)'s
    # factorisations on the CNN): the same kind of cache, left out the same way.
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"),
        "MKL_DISABLE_FAST_MM": os.environ.get("MKL_DISABLE_FAST_MM", "1"),
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def peak_over_sgd_mib(mode: str, device: str, problem: str = "autoencoder") -> float:
    """Extra peak memory of ``mode`` over SGD in MiB: :func:`peak_mib` of each in a fresh
    process (same model, data and number of steps), the difference. The processes run with
    ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MKL_DISABLE_FAST_MM=1`` (unless set) and map their
    libraries' pages first (:func:`map_library_pages`), so that the figure counts the memory
    the method allocates and repeats to about 1 MiB: glibc's and MKL's caches of freed
    blocks and the shared code pages a method touches are left out. curvlin's own import
    counts."""
    _torch_device(device)  # skip (NotImplementedError) before starting any process
    return _peak_in_subprocess(mode, device, problem) - _peak_in_subprocess("sgd", device, problem)


class AutoencoderStep:
    """One training step of the MNIST autoencoder: SGD, four KFAC modes, K-BFGS and K-BFGS(L).

    ``time_step(device, mode)`` times one step of ``mode``; ``track_ratio_to_sgd(device, mode)``
    reports that step's time over the SGD step's, measured in the same process (see the module
    docstring for the method, the amortised-cycle formula and the goals: ``kfac-mc`` <= 3.0,
    ``kfac-empirical`` <= 2.7, amortised <= 1.2, ``kbfgs`` <= 3.0, ``kbfgsl`` <= 2.5, never
    asserted).
    ``mode="sgd"`` in the track is a control (SGD against an identical SGD): 1.0 up to noise.
    """

    param_names = ("device", "mode")
    params = (DEVICES, MODES)
    # One step is a fraction of a second to a few seconds on a 2-core CPU; warm-up is done
    # once per process in setup (cached), so asv's own warm-up is off.
    number = 1
    repeat = (3, 10, 30.0)
    warmup_time = 0
    timeout = 600

    def setup(self, device, mode):
        # asv re-runs setup before every timed call: the warmed-up trainer is built once per
        # process. Consecutive timed calls keep training it (on the same batch).
        self.trainer = cached(
            ("AutoencoderStep", device, mode), lambda: build_trainer(mode, device)
        )

    def time_step(self, device, mode):
        self.trainer.step()

    def track_ratio_to_sgd(self, device, mode):
        kfac = self.trainer
        sgd = build_trainer("sgd", device)
        if mode.endswith("amortised"):
            mean, t_sgd, _ = amortised_step_time(kfac, sgd)
            return mean / t_sgd
        return ratio_every_step(kfac, sgd)

    track_ratio_to_sgd.unit = "ratio to SGD step"

    def track_state_over_params(self, device, mode):
        """Curvature-state bytes over parameter bytes (momentum buffers not counted).

        K-BFGS(L) with the matrix-free A update keeps ``H_a`` and the L-BFGS pairs only: the
        CNN paper's "memory comparable to first-order methods" is a value near 1.
        """
        return self.trainer.state_bytes_over_params()

    track_state_over_params.unit = "bytes / parameter bytes"

    def peakmem_steps(self, device, mode):
        """Peak resident memory of the process over the warm-up and three more steps (asv runs
        each benchmark in a fresh process: compare with ``mode="sgd"``)."""
        for _ in range(3):
            self.trainer.step()

    def track_peak_over_sgd(self, device, mode):
        """Extra peak memory over an SGD run, MiB: a fresh process per optimizer (the trainer,
        one warm-up and four more steps), peak RSS on the CPU, the allocator's peak on CUDA."""
        return peak_over_sgd_mib(mode, device)

    track_peak_over_sgd.unit = "MiB over SGD"


class CNNStep:
    """One training step of the 3-conv CNN (:func:`build_cnn`, batch 128): SGD, KFAC
    (empirical and sampled Fisher, every step), K-BFGS and K-BFGS(L).

    The same measurements as :class:`AutoencoderStep`: ``time_step``, ``track_ratio_to_sgd``
    (seven interleaved rounds, minimum), ``peakmem_steps`` and ``track_peak_over_sgd``. The
    learning rate, damping and momentum are the autoencoder's. Goals (watched, never
    asserted): every ratio at most 0.85× the best peer implementing the same method, K-BFGS(L)
    at most 0.75× ASDL's K-BFGS (docs/benchmarks.md).
    """

    param_names = ("device", "mode")
    params = (DEVICES, CNN_MODES)
    number = 1
    repeat = (3, 10, 30.0)
    warmup_time = 0
    timeout = 600

    def setup(self, device, mode):
        self.trainer = cached(("CNNStep", device, mode), lambda: build_trainer(mode, device, "cnn"))

    def time_step(self, device, mode):
        self.trainer.step()

    def track_ratio_to_sgd(self, device, mode):
        return ratio_every_step(self.trainer, build_trainer("sgd", device, "cnn"))

    track_ratio_to_sgd.unit = "ratio to SGD step"

    def peakmem_steps(self, device, mode):
        """As :meth:`AutoencoderStep.peakmem_steps`."""
        for _ in range(3):
            self.trainer.step()

    def track_peak_over_sgd(self, device, mode):
        """As :meth:`AutoencoderStep.track_peak_over_sgd`, on the CNN."""
        return peak_over_sgd_mib(mode, device, "cnn")

    track_peak_over_sgd.unit = "MiB over SGD"
