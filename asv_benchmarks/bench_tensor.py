"""One TNT or Shampoo training step on the MNIST autoencoder, against SGD.

The problem, the timed step and the way ratios are measured are those of
:mod:`asv_benchmarks.bench_kfac` (784-1000-500-250-30-250-500-1000-784, float32, batch 1000,
``torch.rand`` inputs, BCE with logits against the input; every ratio is a minimum over
interleaved single steps with an SGD trainer in the same process, amortised schedules are
assembled from plain, statistics and refresh steps). The modes:

===================== =====================================================================
``sgd``               ``torch.optim.SGD(momentum=0.9)``: the baseline.
``tnt``               ``TNT(loss="bce_with_logits")``, statistics every step (one extra
                      backward for the sampled gradient), inverses every 20 steps.
``shampoo``           ``Shampoo``, statistics every step, roots every 20 steps.
``shampoo-amortised`` ``Shampoo``, statistics every 10 steps, roots every 100.
===================== =====================================================================

Goals (watched, never asserted), as ``track_ratio_to_sgd``: ``tnt`` <= 2.9, ``shampoo`` <=
2.5, ``shampoo-amortised`` <= 1.75; ``track_peak_over_sgd`` at most the Shampoo/SOAP peers'
+120–133 MiB. For scale: two GEMMs per layer to apply a two-sided Kronecker preconditioner are
about 0.58 of SGD's forward and backward here, a floor of about 1.6 under every ratio.
Measured figures (under load) are in docs/tnt_shampoo.md, "Step time and memory".
"""

from __future__ import annotations

from . import bench_kfac
from .common import cached

#: asv parameter: the optimizer under test.
MODES = ("sgd", "tnt", "shampoo", "shampoo-amortised")
_SCHEDULES = {
    "tnt": {"stats_every": 1, "refresh_every": 20},
    "shampoo": {"stats_every": 1, "refresh_every": 20},
    "shampoo-amortised": {"stats_every": 10, "refresh_every": 100},
}
#: Hyperparameters: finite, never-skipped steps on the fixed batch (timing does not depend on
#: them otherwise). Shampoo at lr 1e-3 went to NaN after about 18 steps on this batch (a
#: benchmark process takes 30 or more), its amortised mode at 1e-4 after 87; at these values
#: 150 steps of every mode stay finite (torch 2.13 CPU, one thread).
_LR = {"tnt": 1e-3, "shampoo": 1e-4, "shampoo-amortised": 1e-5}
_MOMENTUM = 0.9
_DAMPING = {"tnt": 0.1, "shampoo": 1e-4, "shampoo-amortised": 1e-4}


class TensorTrainer(bench_kfac.Trainer):
    """The autoencoder with TNT or Shampoo: :class:`bench_kfac.Trainer`'s step and check
    (what :func:`bench_kfac.ratio_every_step` and :func:`bench_kfac.amortised_step_time` use)
    with these optimizers."""

    def __init__(self, mode: str, device, x):
        import torch
        from torch.nn import functional as F

        from curvlin.adapters.torch import TNT, Shampoo

        if mode not in MODES[1:]:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES[1:]}")
        self.mode, self.x, self.target, self.closure_driven = mode, x, x, False
        self.model = bench_kfac.build_model(device)
        self.schedule_kwargs = _SCHEDULES[mode]
        self.mc = mode == "tnt"
        if self.mc:
            self.opt = TNT(self.model, lr=_LR[mode], damping=_DAMPING[mode], momentum=_MOMENTUM,
                           loss="bce_with_logits", **self.schedule_kwargs)  # fmt: skip
        else:
            self.opt = Shampoo(self.model, lr=_LR[mode], damping=_DAMPING[mode], momentum=_MOMENTUM,
                               **self.schedule_kwargs)  # fmt: skip
        self._loss_fn = F.binary_cross_entropy_with_logits
        self.sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        self.count = 0

    def make_refresh(self):
        """A callable doing the work a refresh step adds: every block's refresh, on copies."""
        driver = self.opt._curv.driver
        damping = self.opt.param_groups[0]["damping"]
        work = [(driver.blocks[n], self.opt.curvature(n)) for n in self.opt.layer_names]

        def run():
            for block, state in work:
                out = block.refresh(state, damping=damping)
            self.sync()
            return out

        return run


def build_trainer(mode: str, device: str):
    """A warmed-up trainer: :func:`bench_kfac.build_trainer` for ``sgd``, else TNT/Shampoo."""
    import torch

    if mode == "sgd":
        return bench_kfac.build_trainer("sgd", device)
    dev = bench_kfac._torch_device(device)
    x = torch.rand(bench_kfac.BATCH, bench_kfac.SIZES[0],
                   generator=torch.Generator().manual_seed(1234)).to(dev)  # fmt: skip
    trainer = TensorTrainer(mode, dev, x)
    trainer.step()
    trainer.check()
    return trainer


def peak_mib(mode: str, device: str, problem: str = "autoencoder") -> float:
    """As :func:`bench_kfac.peak_mib`, for this module's modes (run in a process of its own)."""
    return bench_kfac.peak_mib(mode, device, problem, build=lambda m, d, _: build_trainer(m, d))


def ratio_to_sgd(mode: str, device: str = "cpu", trainer=None) -> float:
    """The step time of ``mode`` over SGD's, measured in this process (interleaved)."""
    trainer = trainer or build_trainer(mode, device)
    sgd = bench_kfac.build_trainer("sgd", device)
    if mode == "sgd":
        return bench_kfac.ratio_every_step(trainer, sgd)
    mean, t_sgd, _ = bench_kfac.amortised_step_time(trainer, sgd)
    return mean / t_sgd


class TensorStep:
    """One training step of the MNIST autoencoder with TNT and Shampoo (see the module
    docstring for the modes and goals)."""

    param_names = ("device", "mode")
    params = (bench_kfac.DEVICES, MODES)
    number = 1
    repeat = (3, 10, 30.0)
    warmup_time = 0
    timeout = 600

    def setup(self, device, mode):
        self.trainer = cached(("TensorStep", device, mode), lambda: build_trainer(mode, device))

    def time_step(self, device, mode):
        self.trainer.step()

    def track_ratio_to_sgd(self, device, mode):
        return ratio_to_sgd(mode, device, self.trainer)

    track_ratio_to_sgd.unit = "ratio to SGD step"

    def peakmem_steps(self, device, mode):
        """Peak resident memory of the process over the warm-up and three more steps."""
        for _ in range(3):
            self.trainer.step()

    def track_peak_over_sgd(self, device, mode):
        """Extra peak memory over an SGD run, MiB, each in a fresh process."""
        bench_kfac._torch_device(device)
        here = bench_kfac._peak_in_subprocess
        return here(mode, device, "autoencoder", module=__name__) - here(
            "sgd", device, "autoencoder", module=__name__
        )

    track_peak_over_sgd.unit = "MiB over SGD"
