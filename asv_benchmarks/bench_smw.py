"""One SMW-NG or SMW-GN training step against an SGD step, on the problems of ``bench_kfac``.

The MNIST autoencoder (784-1000-500-250-30-250-500-1000-784, batch 1000, float32, BCE with
logits against the input; :func:`bench_kfac.build_model`) and the small CNN (three 3×3
convolutions, batch 128, cross-entropy; :func:`bench_kfac.build_cnn`). A timed step is
``zero_grad``, forward, [``backward_fisher``], loss, ``backward``, ``opt.step()``; with a
subsample ``m`` smaller than the batch, ``backward_fisher`` gets a forward pass of the ``m``
examples alone (``model(x[:m])``, as ``docs/smw.md`` recommends). Modes:

======================= ==================================================================
``sgd``                 ``torch.optim.SGD(momentum=0.9)``: the baseline (and, in the ratio
                        track, a control against a second SGD trainer).
``smw-ng-<m>``          ``SMWNG(fisher="mc", fisher_samples=1, subsample=m)``: one label per
                        example (Ren & Goldfarb's and ASDL's), the sampled Fisher's extra
                        backward, ``m × m`` kernel and solve.
``smw-ng-s<s>-<m>``     The same with ``fisher_samples=s`` (the class default is 4): ``s``
                        batched backwards and an ``m·s × m·s`` kernel.
``smw-ng-ef-<m>``       ``SMWNG(fisher="empirical", subsample=m)`` (ASDL's variant).
``smw-gn-<m>``          ``SMWGN(subsample=m)``: ``k`` batched output-direction backwards and
                        an ``m·k × m·k`` solve; on the CNN only (``k = 10``; the
                        autoencoder's ``k = 784`` would make the kernel ``784·m`` wide), at
                        ``m = 32`` (at ``m = 128`` the ``1280``-row kernel alone costs
                        ``Σ_l (m k)² P_l ≈ 1.2·10¹¹`` flops a step).
======================= ==================================================================

``track_ratio_to_sgd`` is ``min(t_smw) / min(t_sgd)`` over seven interleaved rounds
(:func:`bench_kfac.ratio_every_step`); ``track_peak_over_sgd`` the extra peak memory in MiB
over an SGD run, each in a fresh process (as ``bench_kfac``). Goals (watched, never asserted):
SMW-NG <= 1.3× at ``m = 100`` and <= 2.3× at ``m = 1000`` on the autoencoder; SMW-GN within
1.2× of SMW-NG at the same ``m``; ASDL's empirical SMW-NG measured 2.9× (autoencoder, full
batch) and 3.0× (CNN), +77 MiB on the autoencoder.
"""

from __future__ import annotations

import functools

from . import bench_kfac
from .bench_kfac import DEVICES, ratio_every_step
from .common import cached

AUTOENCODER_MODES = ("sgd", "smw-ng-100", "smw-ng-1000", "smw-ng-ef-100", "smw-ng-ef-1000",
                     "smw-ng-s4-100")  # fmt: skip
CNN_MODES = ("sgd", "smw-ng-32", "smw-ng-128", "smw-ng-ef-128", "smw-gn-32")
_LR_SGD, _LR_SMW, _DAMPING, _MOMENTUM = 1e-2, 1e-2, 1.0, 0.9


class SMWTrainer:
    """A model, its optimizer (SGD or an SMW mode) and one training step."""

    def __init__(self, mode: str, device: str, problem: str):
        import torch
        from torch.nn import functional as F

        dev = bench_kfac._torch_device(device)
        gen = torch.Generator().manual_seed(1234)
        if problem == "cnn":
            c, side = bench_kfac.CNN_CHANNELS[0], bench_kfac.CNN_IMAGE
            self.x = torch.rand(bench_kfac.CNN_BATCH, c, side, side, generator=gen).to(dev)
            self.target = torch.randint(
                bench_kfac.CNN_CLASSES, (bench_kfac.CNN_BATCH,), generator=gen
            ).to(dev)
            self.model = bench_kfac.build_cnn(dev)
            self.loss_fn, loss = F.cross_entropy, "cross_entropy"
        else:
            self.x = torch.rand(bench_kfac.BATCH, bench_kfac.SIZES[0], generator=gen).to(dev)
            self.target = self.x
            self.model = bench_kfac.build_model(dev)
            self.loss_fn, loss = F.binary_cross_entropy_with_logits, "bce_with_logits"
        self.mode, self.extra_backward, self.subsample = mode, False, None
        if mode == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=_LR_SGD, momentum=_MOMENTUM)
        else:
            from curvlin.adapters.torch import SMWGN, SMWNG

            kind, m = mode.rsplit("-", 1)
            common = {"lr": _LR_SMW, "damping": _DAMPING, "momentum": _MOMENTUM,
                      "subsample": int(m), "loss": loss}  # fmt: skip
            if kind == "smw-gn":
                self.opt = SMWGN(self.model, **common)
            elif kind == "smw-ng-ef":
                self.opt = SMWNG(self.model, fisher="empirical", **common)
            else:
                samples = int(kind.removeprefix("smw-ng-s")) if kind != "smw-ng" else 1
                self.opt = SMWNG(self.model, fisher="mc", fisher_samples=samples, **common)
            self.extra_backward = self.opt.fisher != "empirical"
            if int(m) < len(self.x):  # the directions' backward through the subsample alone
                self.subsample = int(m)
        self.sync = torch.cuda.synchronize if self.x.device.type == "cuda" else (lambda: None)
        self.step()
        self.check()

    def step(self):
        """One training step; synchronises the device before it returns."""
        self.opt.zero_grad(set_to_none=True)
        output = self.model(self.x)
        loss = self.loss_fn(output, self.target)
        if self.extra_backward and self.subsample:
            self.opt.backward_fisher(self.model(self.x[: self.subsample]))
        elif self.extra_backward:
            self.opt.backward_fisher(output)
        loss.backward()
        self.opt.step()
        self.sync()
        return loss

    def check(self) -> None:
        """Raise if a step was skipped (NaN/inf): its time would not be a real step's."""
        if getattr(self.opt, "skipped_steps", 0):
            raise RuntimeError(f"bench_smw: {self.mode} skipped steps (NaN or inf)")


def peak_mib(mode: str, device: str, problem: str) -> float:
    """Peak memory in MiB of a fresh run (:func:`bench_kfac.peak_mib` with this module's
    trainers)."""
    return bench_kfac.peak_mib(mode, device, problem, build=SMWTrainer)


def peak_over_sgd_mib(mode: str, device: str, problem: str) -> float:
    """Extra peak memory of ``mode`` over SGD, MiB (each in a fresh process)."""
    here = functools.partial(bench_kfac._peak_in_subprocess, module=__name__)
    return here(mode, device, problem) - here("sgd", device, problem)


class _Step:
    problem = "autoencoder"
    param_names = ("device", "mode")
    number = 1
    repeat = (3, 10, 30.0)
    warmup_time = 0
    timeout = 600

    def setup(self, device, mode):
        self.trainer = cached(
            (type(self).__name__, device, mode), lambda: SMWTrainer(mode, device, self.problem)
        )

    def time_step(self, device, mode):
        self.trainer.step()

    def track_ratio_to_sgd(self, device, mode):
        return ratio_every_step(self.trainer, SMWTrainer("sgd", device, self.problem))

    track_ratio_to_sgd.unit = "ratio to SGD step"

    def peakmem_steps(self, device, mode):
        """Peak resident memory of the process over the warm-up and three more steps."""
        for _ in range(3):
            self.trainer.step()

    def track_peak_over_sgd(self, device, mode):
        """Extra peak memory over an SGD run, MiB (fresh processes)."""
        return peak_over_sgd_mib(mode, device, self.problem)

    track_peak_over_sgd.unit = "MiB over SGD"


class SMWAutoencoderStep(_Step):
    """SMW-NG on the MNIST autoencoder (batch 1000) at ``m = 100`` and ``m = 1000``."""

    params = (DEVICES, AUTOENCODER_MODES)


class SMWCNNStep(_Step):
    """SMW-NG and SMW-GN on the CNN (batch 128)."""

    problem = "cnn"
    params = (DEVICES, CNN_MODES)
