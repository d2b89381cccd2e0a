"""Adaptive damping in the engine (``adaptive_damping=True``), for every method of METHODS.

The Levenberg–Marquardt rule itself is tested on a quadratic in ``test_damping.py``; here: the
engine's ratio is the method's own model (a Newton step on a quadratic loss gives ρ = 1), a
far too small damping grows and a far too large one shrinks, checkpoints carry the adapted
damping bit for bit, and misuse is a clear error.
"""

from __future__ import annotations

import math

import pytest
import torch
from _methods import METHODS, assert_same, batches, roundtrip
from _torch_models import mlp, one_thread
from torch import nn
from torch.nn import functional as F

from curvlin.adapters.torch import KFAC

SHAPE = (3,)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(params=[m for m in METHODS if m.adaptive], ids=str)
def method(request):
    return request.param


@pytest.mark.parametrize("other", [m for m in METHODS if not m.adaptive], ids=str)
def test_a_method_without_a_curvature_model_refuses(other):
    with pytest.raises(ValueError, match="adaptive_damping"):
        other.make(mlp(), adaptive_damping=True)


def _train(method, damping, steps=15, **overrides):
    model = mlp()
    opt = method.make(model, damping=damping, adaptive_damping=True, adapt_every=1, **overrides)
    for x, t in batches(SHAPE, steps, seed=2):
        method.step(opt, model, x, t)
    return model, opt


def test_a_large_damping_shrinks(method):
    _, opt = _train(method, 1e3)
    assert opt.param_groups[0]["damping"] < 1e3 * 0.95**10
    assert opt.last_ratio is not None


def test_a_tiny_damping_grows_when_the_steps_overshoot(method):
    # lr 1 with a momentum of 0.9: the early steps are far longer than the model trusts
    tiny = method.tiny_damping
    model, opt = _train(method, tiny, steps=20, lr=1.0, kl_clip=None, relative_kl_clip=None)
    assert opt.param_groups[0]["damping"] > tiny / 0.95**5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adapted_damping_resumes_bit_exact(method):
    model = mlp()
    opt = method.make(model, adaptive_damping=True, adapt_every=2)
    data = batches(SHAPE, 6, seed=4)
    for x, t in data[:3]:
        method.step(opt, model, x, t)
    saved, saved_model = roundtrip(opt.state_dict()), roundtrip(model.state_dict())
    for x, t in data[3:]:
        method.step(opt, model, x, t)
    fresh = mlp(seed=9)
    fresh.load_state_dict(saved_model)
    opt2 = method.make(fresh, adaptive_damping=True, adapt_every=2)
    opt2.load_state_dict(saved)
    for x, t in data[3:]:
        method.step(opt2, fresh, x, t)
    assert_same(opt.state_dict(), opt2.state_dict())


def test_misuse_is_a_clear_error(method):
    with pytest.raises(ValueError, match="momentum_form='gradient'"):
        method.make(mlp(), adaptive_damping=True, momentum_form="direction")
    with pytest.raises(ValueError, match="adapt_every"):
        method.make(mlp(), adaptive_damping=True, adapt_every=0)
    with pytest.raises(TypeError, match="adaptive_damping"):
        method.make(mlp(), adaptive_damping="yes")
    model = mlp()
    opt = method.make(model, adaptive_damping=True)
    x, t = batches(SHAPE, 1)[0]
    opt.zero_grad()
    F.mse_loss(model(x), t).backward()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_a_newton_step_on_a_quadratic_has_ratio_one():
    """One linear layer, squared error, empirical Fisher = Gauss–Newton = the Hessian (up to
    the π-split damping, here negligible): the model's prediction is the loss change."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    x = torch.randn(256, 4, dtype=torch.float64)
    t = x @ torch.randn(4, 1, dtype=torch.float64)
    opt = KFAC(model, lr=1.0, momentum=0.0, damping=1e-9, decay=0.0, adaptive_damping=True,
               adapt_every=1, fisher="mc", loss="mse", loss_reduction="sum")  # fmt: skip

    def closure():
        opt.zero_grad()
        out = model(x)
        loss = 0.5 * ((out - t) ** 2).sum()
        opt.backward_fisher(out)
        loss.backward()
        return loss

    torch.manual_seed(1)
    opt.step(closure)
    # mc with one draw per example is noisy: the ratio is near, not at, 1
    assert 0.5 < opt.last_ratio < 1.5
    assert math.isfinite(opt.last_ratio)
