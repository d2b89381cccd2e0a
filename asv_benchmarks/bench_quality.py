"""Training quality on the digits protocol: the loss after 200 steps, per optimizer.

The protocol of the quality goals (docs/benchmarks.md, "Training quality"): scikit-learn's
digits (1797 images of 8×8, scaled to [0, 1]), the autoencoder 64-128-64-16-64-128-64 with
ReLU and a sigmoid output, squared error summed over pixels and averaged over the batch,
batch 256, shuffling seed 0, 200 steps, PyTorch's default initialisation, curvature every
step, float32 on the CPU with one thread. ``track_loss`` is the whole training set's loss
after 200 steps (initial loss 11.4). Each optimizer runs at the best point of the lr × damping
grid of docs/benchmarks.md (``*-best``), with ``adaptive_damping=True`` from damping 0.1 at the
best of lr ∈ {0.1, 0.01, 0.001} (``*-adaptive``), or as the first-order baseline.
Goals (never asserted): KFAC <= 0.40 (ASDL's KFAC: 0.43), K-BFGS and K-BFGS(L) <= 0.65 (half
of Adam's 1.31); the adaptive runs within 1.5× of their ``-best``; TNT and Shampoo <= 0.5
(docs/tnt_shampoo.md); MBF <= 0.6 (``mbf-default``: the front's defaults; ``mbf-best``: the
best point of docs/mbf.md's grid); SMW-NG <= 0.6 and SMW-GN <= 0.5 (docs/smw.md;
``smw-gn-default``, the front's defaults at a subsample of 32, takes about 50 s).
"""

from __future__ import annotations

import itertools
import math

from .common import SMOKE, cached

#: Steps of the protocol (a handful in CI's smoke run, which only checks that it runs).
_STEPS, _BATCH = (5 if SMOKE else 200), 256

#: name -> (optimizer class name, keyword arguments); None: torch.optim.Adam.
CONFIGS = {
    "kfac-best": ("KFAC", {"lr": 0.003, "damping": 1e-3}),
    "kfac-adaptive": ("KFAC", {"lr": 0.001, "damping": 0.1, "adaptive_damping": True}),
    "kbfgs-best": ("KBFGS", {"lr": 0.3, "damping": 0.1}),
    "kbfgs-adaptive": ("KBFGS", {"lr": 0.1, "damping": 0.1, "adaptive_damping": True}),
    "kbfgsl-best": ("KBFGSL", {"lr": 0.3, "damping": 0.1}),
    "kbfgsl-adaptive": ("KBFGSL", {"lr": 0.1, "damping": 0.1, "adaptive_damping": True}),
    "tnt-best": ("TNT", {"lr": 0.1, "damping": 0.1, "loss": "mse", "loss_reduction": "batchmean"}),
    "shampoo-best": ("Shampoo", {"lr": 0.01, "damping": 1e-3}),
    "mbf-default": ("MBF", {}),
    "mbf-best": ("MBF", {"lr": 1e-3, "damping": 1e-4}),
    "smw-ng-default": ("SMWNG", {"loss": "mse", "loss_reduction": "batchmean"}),
    "smw-ng-empirical-best": (
        "SMWNG",
        {
            "lr": 0.1,
            "damping": 0.01,
            "momentum": 0.8,
            "fisher": "empirical",
            "kl_clip": None,
        },
    ),
    "smw-gn-default": ("SMWGN", {"loss": "mse", "loss_reduction": "batchmean", "subsample": 32}),
    "adam-1e-2": (None, {"lr": 1e-2}),
}


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    dims = [64, 128, 64, 16, 64, 128, 64]
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers += [nn.Linear(a, b), nn.ReLU() if i < len(dims) - 2 else nn.Sigmoid()]
    return nn.Sequential(*layers)


def digits_loss_after(config: str, steps: int = _STEPS) -> float:
    """The protocol's final training-set loss for one configuration of :data:`CONFIGS`."""
    import numpy as np
    import torch

    import curvlin.adapters.torch as adapters
    from curvlin.datasets import load_digits

    data = cached("digits", lambda: torch.from_numpy(load_digits()))
    cls, kwargs = CONFIGS[config]
    torch.set_num_threads(1)
    model = _model()
    if cls is None:
        opt = torch.optim.Adam(model.parameters(), **kwargs)
    else:
        opt = getattr(adapters, cls)(model, **kwargs)

    def loss_of(out, x):
        return ((out - x) ** 2).sum() / x.shape[0]

    order = np.random.default_rng(0)
    perm, pos = order.permutation(len(data)), 0
    for _ in range(steps):
        if pos + _BATCH > len(data):
            perm, pos = order.permutation(len(data)), 0
        batch = data[perm[pos : pos + _BATCH]]
        pos += _BATCH

        def closure(batch=batch):
            opt.zero_grad()
            out = model(batch)
            # the sampled Fisher's (TNT's: loss="mse", loss_reduction="batchmean", the squared
            # error summed over pixels being a Gaussian's) or Gauss–Newton directions
            if getattr(opt, "fisher", "empirical") != "empirical":
                opt.backward_fisher(out)
            loss = loss_of(out, batch)
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        value = float(loss_of(model(data), data))
    return value if math.isfinite(value) else float("inf")


class DigitsQuality:
    """The digits protocol's loss after 200 steps (lower is better)."""

    params = (list(CONFIGS),)
    param_names = ("config",)
    timeout = 300

    def setup(self, config):
        try:
            import sklearn  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError(f"needs torch and scikit-learn: {exc}") from exc

    def track_loss(self, config):
        return digits_loss_after(config)

    track_loss.unit = "loss"
