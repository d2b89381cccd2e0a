"""Every curvlin torch optimizer, as the shared fault, checkpoint and training suites see it.

A new method joins those suites by being added to :data:`METHODS`: a name, how to build it
and whether its closure must call ``backward_fisher``. Every method is driven the same way,
``opt.step(closure)``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from curvlin.adapters.torch import (
    KBFGS,
    KBFGSL,
    KFAC,
    MBF,
    SMWGN,
    SMWNG,
    TNT,
    DiagonalFisher,
    Shampoo,
)


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable
    defaults: dict
    sampled: bool = False  # the closure calls opt.backward_fisher(output)
    #: Every trainable tensor is its own block (TNT, Shampoo): no hooks, nothing unsupported.
    per_parameter: bool = False
    #: Whether ``adaptive_damping`` applies: the preconditioner is a damped inverse curvature
    #: (Shampoo's roots are not, and it refuses the option).
    adaptive: bool = True
    #: A damping far too small for the step, from which the adaptation recovers (the
    #: adaptive-damping suite starts from it, lr 1, momentum 0.9). TNT damps every mode, so a
    #: weight's damping is about its square; a sampled Fisher of rank m < P (SMW-NG) steps by
    #: ‖M_⊥‖/λ off its span, so on the 8-example problem lr 1 diverges from any λ ≤ 0.1.
    tiny_damping: float = 1e-6

    def make(self, model, **overrides):
        return self.build(model, **{**self.defaults, **overrides})

    def closure(self, opt, model, x, t):
        """zero_grad, forward, [backward_fisher], MSE loss, backward; returns the loss."""

        def closure():
            opt.zero_grad()
            out = model(x)
            if self.sampled:
                opt.backward_fisher(out)
            loss = F.mse_loss(out, t)
            loss.backward()
            return loss

        return closure

    def step(self, opt, model, x, t):
        return opt.step(self.closure(opt, model, x, t))

    def __str__(self):
        return self.name


_COMMON = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}

METHODS = [
    Method("kfac", KFAC, {**_COMMON, "damping": 0.1, "stats_every": 2, "refresh_every": 3}),
    Method(
        "kfac-mc",
        KFAC,
        {**_COMMON, "damping": 0.1, "fisher": "mc", "loss": "mse", "decay": 0.5},
        sampled=True,
    ),
    Method("kfac-exact", KFAC, {**_COMMON, "damping": 0.1, "exact_damping": True}),
    Method("kbfgs", KBFGS, {**_COMMON, "damping": 0.3, "check_every": 2}),
    Method("kbfgsl", KBFGSL, {**_COMMON, "damping": 0.3, "memory": 4, "stats_every": 2}),
    Method(
        "diagonal",
        DiagonalFisher,
        {**_COMMON, "damping": 0.1, "stats_every": 2, "refresh_every": 3},
    ),
    Method(
        "tnt",
        TNT,
        {**_COMMON, "damping": 0.1, "loss": "mse", "stats_every": 2, "refresh_every": 3},
        sampled=True,
        per_parameter=True,
        tiny_damping=1e-2,
    ),
    Method(
        "shampoo",
        Shampoo,
        {**_COMMON, "damping": 1e-3, "graft": "adam"},
        per_parameter=True,
        adaptive=False,
    ),
    Method("mbf", MBF, {**_COMMON, "damping": 0.1, "stats_every": 2, "refresh_every": 3}),
    Method(
        "smw-ng",
        SMWNG,
        {
            **_COMMON,
            "damping": 0.1,
            "loss": "mse",
            "subsample": 5,
            "fisher": "mc",
            "momentum_form": "gradient",
        },
        sampled=True,
        tiny_damping=1.0,
    ),
    Method(
        "smw-ng-ef",
        SMWNG,
        {**_COMMON, "damping": 0.1, "fisher": "empirical", "momentum_form": "gradient"},
    ),
    Method(
        "smw-gn",
        SMWGN,
        {**_COMMON, "damping": 0.1, "loss": "mse", "subsample": 5, "momentum_form": "gradient"},
        sampled=True,
    ),
]


def roundtrip(obj):
    """``torch.save`` then ``torch.load(weights_only=True)``: a deep copy through bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a, b, path="state"):
    """Bit-identical nested containers of tensors and plain values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), path
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict), path
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def batches(model_in_shape, count, *, n=8, d_out=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn((n, *model_in_shape), generator=g, dtype=dtype),
            torch.randn((n, d_out), generator=g, dtype=dtype),
        )
        for _ in range(count)
    ]
