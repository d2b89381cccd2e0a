"""``opt.warm_start(closures)``: the curvature starts at the mean statistics of several batches.

For every method: the parameters, the step counter and the schedule are untouched and the
gradients are cleared; for KFAC and TNT (spec §1 property 6): the factors are the example-
weighted mean of the batches' statistics, and the first step folds its batch into them by
the EMA recursion.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _methods import METHODS, batches
from _torch_models import mlp, one_thread

from curvlin.adapters.torch import KFAC, TNT


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_warm_start_changes_no_parameter_and_counts_no_step(method):
    model = mlp(seed=1)
    opt = method.make(model)
    items = batches((3,), 4, n=8, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.warm_start(method.closure(opt, model, x, t) for x, t in items[:3]) == 3
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert opt.step_count == 0
    for x, t in items:
        loss = method.step(opt, model, x, t)
    assert torch.isfinite(loss)
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _closure(opt, model, x, t):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), t)
        loss.backward()
        return loss

    return closure


def _factors(opt, make):
    return {name: make(opt.curvature(name)) for name in opt.layer_names}


@pytest.mark.parametrize(
    ("front", "options", "factors", "sizes"),
    [
        # uneven batches: KFAC's statistics are means over examples, weighted by them
        (KFAC, {"decay": 0.8}, lambda s: (s.g, s.a), (8, 8, 4)),
        # TNT's are estimates from each batch's mean gradient: their arithmetic mean (spec §1)
        (TNT, {"fisher": "empirical", "decay": 0.8}, lambda s: s.factors, (8, 8, 8)),
    ],
    ids=["kfac", "tnt"],
)
def test_warm_start_is_the_weighted_mean_then_the_ema(front, options, factors, sizes):
    data = [batches((3,), 1, n=n, seed=10 + i)[0] for i, n in enumerate(sizes)]
    model = mlp(seed=1)
    opt = front(model, lr=0.05, damping=0.1, **options)
    opt.warm_start(_closure(opt, model, x, t) for x, t in data)
    alone = []
    for x, t in data:  # each batch's statistics: a one-batch warm start of a fresh optimizer
        single = front(model, lr=0.05, damping=0.1, **options)
        single.warm_start([_closure(single, model, x, t)])
        alone.append(_factors(single, factors))
        single.remove_hooks()
    got = _factors(opt, factors)
    for name in opt.layer_names:
        for i, value in enumerate(got[name]):
            want = sum(n * a[name][i] for n, a in zip(sizes, alone)) / sum(sizes)
            torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-14)
    # the first step folds its own batch: β·(the mean) + (1 − β)·(its statistics)
    x, t = batches((3,), 1, n=8, seed=20)[0]
    step_alone = front(model, lr=0.05, damping=0.1, **options)
    step_alone.warm_start([_closure(step_alone, model, x, t)])
    one = _factors(step_alone, factors)
    step_alone.remove_hooks()
    opt.step(_closure(opt, model, x, t))
    beta = options["decay"]
    for name in opt.layer_names:
        for i, value in enumerate(_factors(opt, factors)[name]):
            want = beta * got[name][i] + (1 - beta) * one[name][i]
            torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-14)


def test_warm_start_only_before_the_first_step_and_never_with_nan():
    model = mlp(seed=1)
    opt = KFAC(model, lr=0.05, damping=0.1)
    (x, t), (x2, t2) = batches((3,), 2, n=8, seed=3)
    bad = x.clone()
    bad[0, 0] = float("nan")
    before = {k: v.clone() for k, v in opt.curvature(opt.layer_names[0]).arrays().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="batch 1 hold NaN or inf"):
            opt.warm_start([_closure(opt, model, x, t), _closure(opt, model, bad, t)])
    after = opt.curvature(opt.layer_names[0]).arrays()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    opt.step(_closure(opt, model, x2, t2))
    with pytest.raises(RuntimeError, match="only before the first step"):
        opt.warm_start([_closure(opt, model, x, t)])
