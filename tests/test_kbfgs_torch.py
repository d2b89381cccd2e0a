"""The torch K-BFGS / K-BFGS(L) optimizers: reference replay (T14), conv scale (T12), momentum
reduction (T13), checkpoints, NaN skipping and argument errors.

The reference of T14 is a plain-NumPy implementation of spec/kbfgs.md §2 written for this test:
its own forward/backward of ``Linear - Tanh - Linear``, Powell and LM damping, dense BFGS, a
two-loop L-BFGS over a list of pairs, and the Hessian-action update. It uses nothing from
curvlin.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import warnings

import numpy as np
import pytest
import torch
from _torch_models import cnn, conv_patches, mlp, one_thread
from torch import nn

from curvlin.adapters.torch import KBFGS, KBFGSL

LR, LAM, RHO, TAU = 0.2, 0.3, 0.9, 1e-3


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


# -- the NumPy reference of §2 ------------------------------------------------------------


def _bfgs(h, s, y, threshold):
    sty = s @ y
    if not (sty > 0 and sty > threshold * (s @ s)):
        return h
    rho = 1.0 / sty
    v = np.eye(len(s)) - rho * np.outer(s, y)
    return v @ h @ v.T + rho * np.outer(s, s)


def _two_loop(pairs, v):
    q, alphas = v.copy(), []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q = q - a * y
    r = q
    for (s, y), a in zip(pairs, reversed(alphas)):
        b = (y @ r) / (s @ y)
        r = r + s * (a - b)
    return r


def _double_damp(s, y, hy, mu2):
    sty, yhy = s @ y, y @ hy
    if sty < 0.2 * yhy:
        theta = 0.8 * yhy / (yhy - sty)
        s = theta * s + (1 - theta) * hy
    sty, sts = s @ y, s @ s
    if sty < mu2 * sts:
        theta = (1 - mu2) * sts / (sts - sty)
        y = theta * y + (1 - theta) * s
    return s, y


def _forward(ws, x, t):
    """Per layer (x̄, h, per-example g) and the weight gradients of ½‖out − t‖² (batch mean)."""
    m = x.shape[0]
    xb1 = np.hstack([x, np.ones((m, 1))])
    h1 = xb1 @ ws[0].T
    a1 = np.tanh(h1)
    xb2 = np.hstack([a1, np.ones((m, 1))])
    h2 = xb2 @ ws[1].T
    g2 = h2 - t
    g1 = (g2 @ ws[1][:, :-1]) * (1 - a1**2)
    layers = [(xb1, h1, g1), (xb2, h2, g2)]
    return layers, [g.T @ xb / m for xb, _, g in layers]


def _reference(ws, batches, *, limited, minibatch_a, memory=3):
    ws = [w.copy() for w in ws]
    lam_a = mu2 = math.sqrt(LAM)
    n = len(ws)
    mom = [np.zeros_like(w) for w in ws]
    a = [None] * n
    h_a = [None] * n
    h_g = [np.eye(w.shape[0]) for w in ws]
    pairs = [[] for _ in ws]
    s_bar = [np.zeros(w.shape[0]) for w in ws]
    y_bar = [np.zeros(w.shape[0]) for w in ws]
    for k, (x, t) in enumerate(batches):
        m = x.shape[0]
        layers, grads = _forward(ws, x, t)
        for i, (xb, _, _) in enumerate(layers):
            mom[i] = RHO * mom[i] + (1 - RHO) * (grads[i] + TAU * ws[i])
            a_batch = xb.T @ xb / m
            if k == 0:
                a[i] = a_batch
                h_a[i] = np.linalg.inv(a_batch + lam_a * np.eye(len(a_batch)))
            else:
                a[i] = 0.9 * a[i] + 0.1 * a_batch
        for i in range(n):
            left = (
                np.stack([_two_loop(pairs[i], c) for c in mom[i].T], 1)
                if limited
                else h_g[i] @ mom[i]
            )
            ws[i] = ws[i] - LR * left @ h_a[i]
        plus, _ = _forward(ws, x, t)
        for i, ((xb, h, g), (_, hp, gp)) in enumerate(zip(layers, plus)):
            s_bar[i] = 0.9 * s_bar[i] + 0.1 * (h - hp).mean(0)
            y_bar[i] = 0.9 * y_bar[i] + 0.1 * (g - gp).mean(0)
            hy = _two_loop(pairs[i], y_bar[i]) if limited else h_g[i] @ y_bar[i]
            s_d, y_d = _double_damp(s_bar[i], y_bar[i], hy, mu2)
            threshold = 1e-4 * np.linalg.norm(g.mean(0))
            if limited:
                if s_d @ y_d > 0 and s_d @ y_d > threshold * (s_d @ s_d):
                    pairs[i] = (pairs[i] + [(s_d, y_d)])[-memory:]
            else:
                h_g[i] = _bfgs(h_g[i], s_d, y_d, threshold)
            u = xb.mean(0)
            s_a = h_a[i] @ u
            if minibatch_a:
                y_a = xb.T @ (xb @ s_a) / m + lam_a * s_a
            else:
                y_a = (a[i] + lam_a * np.eye(len(u))) @ s_a
            h_a[i] = _bfgs(h_a[i], s_a, y_a, 1e-4 * np.linalg.norm(u))
    if limited:
        h_g = [np.stack([_two_loop(p, c) for c in np.eye(len(hg))], 1) for p, hg in zip(pairs, h_g)]
    return ws, h_a, h_g


def _closure(opt, model, x, t):
    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - t) ** 2).sum(dim=1).mean()
        loss.backward()
        return loss

    return closure


def _set_curvature(opt, layer, **arrays):
    """Overwrite some of one layer's curvature arrays (as rounding or a bug might)."""
    driver = opt._curv.driver
    driver.states[layer] = dataclasses.replace(driver.states[layer], **arrays)


def _batches(steps=5, m=16):
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(m, 3, generator=gen, dtype=torch.float64),
            torch.randn(m, 4, generator=gen, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def _weights(model):
    return [
        torch.cat([lin.weight, lin.bias[:, None]], 1).detach().numpy().copy()
        for lin in (model[0], model[2])
    ]


@pytest.mark.parametrize(
    ("cls", "kwargs", "limited", "minibatch_a"),
    [
        (KBFGS, {"a_update": "ema"}, False, False),
        (KBFGS, {}, False, True),
        (KBFGSL, {"memory": 3}, True, True),
        (KBFGSL, {"memory": 3, "a_update": "ema"}, True, False),
    ],
    ids=["kbfgs-ema", "kbfgs", "kbfgsl", "kbfgsl-ema"],
)
def test_reference_replay(cls, kwargs, limited, minibatch_a):
    """T14: 5 float64 steps of a 2-layer MLP match the NumPy reference (θ, H_a, H_g)."""
    model = mlp()
    ws0 = _weights(model)
    # The papers' EMA momentum at lr α is curvlin's gradient momentum at lr α(1 − ρ).
    opt = cls(model, lr=LR * (1 - RHO), damping=LAM, momentum=RHO, weight_decay=TAU, **kwargs)
    batches = _batches()
    for x, t in batches:
        opt.step(_closure(opt, model, x, t))
    ref_ws, ref_ha, ref_hg = _reference(
        ws0, [(x.numpy(), t.numpy()) for x, t in batches], limited=limited, minibatch_a=minibatch_a
    )
    for i, name in enumerate(["0", "2"]):
        np.testing.assert_allclose(_weights(model)[i], ref_ws[i], rtol=1e-9, atol=1e-12)
        state = opt.curvature(name)
        np.testing.assert_allclose(state.h_a.numpy(), ref_ha[i], rtol=1e-9, atol=1e-12)
        if limited:
            assert state.h_g.valid.any()
            from curvlin.quasi_newton import lbfgs_apply

            h_g = lbfgs_apply(state.h_g, torch.eye(state.h_g.dim, dtype=torch.float64)).numpy()
        else:
            h_g = state.h_g.numpy()
        if name == "0":  # pairs were accepted (the output layer of ½‖·‖² has G = I exactly)
            assert not np.allclose(h_g, np.eye(len(h_g)))
        np.testing.assert_allclose(h_g, ref_hg[i], rtol=1e-8, atol=1e-11)


def test_identity_factors_give_momentum_sgd():
    """T13 in the optimizer: with ``H_g = H_a = I`` frozen, K-BFGS is torch's SGD with the
    same momentum and lr (the papers' EMA momentum at lr α is this at lr ``α(1 − ρ)``)."""
    model, twin = mlp(), mlp()
    opt = KBFGS(model, lr=LR * (1 - RHO), damping=LAM, momentum=RHO, stats_every=10**6)
    sgd = torch.optim.SGD(twin.parameters(), lr=LR * (1 - RHO), momentum=RHO)
    # Step 0 warm-starts H_a from the batch; make the next steps use identity factors.
    (x, t), *rest = _batches()
    opt.step(_closure(opt, model, x, t))
    for name in opt.layer_names:
        state = opt.curvature(name)
        eye = functools.partial(torch.eye, dtype=torch.float64)
        _set_curvature(opt, name, h_a=eye(state.h_a.shape[0]), h_g=eye(state.h_g.shape[0]))
    twin.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), twin.parameters()):  # the same momentum buffers
        sgd.state[q]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
    for x, t in rest:
        opt.step(_closure(opt, model, x, t))
        _closure(sgd, twin, x, t)()
        sgd.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def _conv_rows(model, x, t):
    """The first layer's output rows ``h`` and per-example gradient rows ``g`` (N × autograd's),
    one row per example and output position, from a plain forward/backward with
    ``retain_grad`` (no curvlin hook)."""
    model = copy.deepcopy(model)
    seen = {}

    def hook(module, args, output):
        output.retain_grad()
        seen["h"] = output

    model[0].register_forward_hook(hook)
    (0.5 * ((model(x) - t) ** 2).sum(dim=1).mean()).backward()
    h = seen["h"]
    rows = lambda z: z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # noqa: E731
    return rows(h), rows(h.grad) * x.shape[0]


def test_conv_uses_spatial_sum_and_additive_damping():
    """T12 end to end: a Conv2d's warm-started ``H_a`` inverts ``(1/m)ΣΣ x̄x̄ᵀ + √λ I`` built
    from independently sliced patches; convolutions default to DD-v2; the pair is the mean over
    examples and output positions of ``h − h⁺`` and ``g − g⁺``, and ``H_g`` its DD-v2 damped
    BFGS update of ``I``, all computed here without curvlin."""
    model = cnn(stride=2, padding=1, dilation=1)
    conv = model[0]
    x = torch.randn(4, 2, 7, 6, dtype=torch.float64)
    t = torch.randn(4, 4, dtype=torch.float64)
    opt = KBFGS(model, lr=0.1, damping=LAM, a_update="ema")
    blocks = opt._curv.driver.blocks
    assert blocks["0"].variant == "additive"
    assert blocks["3"].variant == "convex"
    patches = conv_patches(x, conv).reshape(-1, conv.weight[0].numel())
    xb = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    u = xb.mean(0)
    assert u[-1] == 1.0
    a_sum = xb.T @ xb / 4
    h, g = _conv_rows(model, x, t)
    opt.step(_closure(opt, model, x, t))
    h_plus, g_plus = _conv_rows(model, x, t)
    expected = torch.linalg.inv(a_sum + math.sqrt(LAM) * torch.eye(len(a_sum), dtype=torch.float64))
    state = opt.curvature("0")
    torch.testing.assert_close(state.a, a_sum)
    # After the Hessian-action update from the warm start (a fixed point), H_a is still the inverse.
    torch.testing.assert_close(state.h_a, expected, rtol=1e-8, atol=1e-10)
    s_bar = 0.1 * (h - h_plus).mean(0).numpy()  # pair EMA 0.9 from zero
    y_bar = 0.1 * (g - g_plus).mean(0).numpy()
    np.testing.assert_allclose(state.s_bar.numpy(), s_bar, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(state.y_bar.numpy(), y_bar, rtol=1e-9, atol=1e-14)
    s_d, y_d = s_bar, y_bar  # DD-v2 against H_g = I: Powell on s, then y + μ2 s
    sty, yy = s_d @ y_d, y_d @ y_d
    if sty < 0.2 * yy:
        theta = 0.8 * yy / (yy - sty)
        s_d = theta * s_d + (1 - theta) * y_d
    y_d = y_d + math.sqrt(LAM) * s_d
    h_g = _bfgs(np.eye(len(s_d)), s_d, y_d, 1e-4 * np.linalg.norm(g.mean(0).numpy()))
    assert not np.allclose(h_g, np.eye(len(h_g)))  # the pair was accepted
    np.testing.assert_allclose(state.h_g.numpy(), h_g, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(("cls", "kwargs"), [(KBFGS, {}), (KBFGSL, {"memory": 3})])
def test_nonfinite_second_pass_leaves_h_g_alone(cls, kwargs):
    """A NaN in the second pass only (the closure's second call): the step is taken, the pair
    is skipped on the device, ``H_g`` / the L-BFGS memory and the pair EMAs stay."""
    model = mlp()
    opt = cls(model, lr=LR, damping=LAM, **kwargs)
    (x, t), (x2, t2) = _batches(steps=2)
    opt.step(_closure(opt, model, x, t))
    before = {name: opt.curvature(name) for name in opt.layer_names}
    calls = []

    def closure():
        calls.append(1)
        bad = x2.clone()
        if len(calls) == 2:
            bad[0, 0] = float("nan")
        return _closure(opt, model, bad, t2)()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    assert opt.step_count == 2
    for name in opt.layer_names:
        old, new = before[name], opt.curvature(name)
        for key in ("s_bar", "y_bar"):
            assert torch.equal(getattr(old, key), getattr(new, key)), (cls, name, key)
        old_g, new_g = old.arrays(), new.arrays()
        for key in [k for k in old_g if k == "h_g" or k.startswith("lbfgs")]:
            assert torch.equal(old_g[key], new_g[key]), (cls, name, key)


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_indefinite_factor_is_rebuilt_on_check_steps(cls):
    """§9.6: every ``check_every`` curvature steps an indefinite ``H_a`` is re-inverted."""
    model = mlp()
    opt = cls(model, lr=LR, damping=LAM, check_every=2)
    (x, t), (x2, t2) = _batches(steps=2)
    opt.step(_closure(opt, model, x, t))  # statistics step 1: no check
    _set_curvature(opt, "0", h_a=-opt.curvature("0").h_a)  # as if rounding had destroyed it
    with pytest.warns(RuntimeWarning, match=r"layer '0': h_a no longer positive definite"):
        opt.step(_closure(opt, model, x2, t2))  # statistics step 2: checked and rebuilt
    assert opt.repaired_factors == 1
    torch.linalg.cholesky(opt.curvature("0").h_a)  # positive definite again
    assert opt.state_dict()["curvlin"]["driver"]["repaired"] == 1
    # None switches the test off: the broken factor stays.
    model = mlp()
    opt = cls(model, lr=LR, damping=LAM, check_every=None)
    opt.step(_closure(opt, model, x, t))
    _set_curvature(opt, "0", h_a=-opt.curvature("0").h_a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(_closure(opt, model, x2, t2))
    assert opt.repaired_factors == 0
    assert torch.linalg.cholesky_ex(opt.curvature("0").h_a).info != 0  # still indefinite


def test_closure_required():
    opt = KBFGS(mlp())
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_unsupported_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="outside supported layers"):
        KBFGSL(model)
    opt = KBFGSL(model, lr=0.1, unsupported="sgd")
    assert len(opt.param_groups) == 2
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ln_before = model[1].weight.detach().clone()
    opt.step(_closure(opt, model, x, t))
    assert not torch.equal(model[1].weight, ln_before)


def test_stats_every_calls_closure_once_in_between():
    model = mlp()
    opt = KBFGS(model, lr=LR, stats_every=3)
    x, t = _batches(steps=1)[0]
    inner = _closure(opt, model, x, t)
    calls = []

    def closure():
        calls.append(1)
        return inner()

    for _ in range(4):
        opt.step(closure)
    assert len(calls) == 2 + 1 + 1 + 2  # steps 0 and 3 have the second pass
    assert opt.curvature("0").g_updates == 2


def test_second_pass_computes_no_weight_gradient_and_allows_in_place_ops():
    # ReLU(inplace=True) right after the first layer acts on the output the second pass turns
    # into a root of the backward graph: it must stay legal there.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)
    ).double()
    reference = copy.deepcopy(model)
    opt = KBFGS(model, lr=LR, damping=LAM)
    x, t = _batches(steps=1)[0]
    inner = _closure(opt, model, x, t)
    seen = []

    def closure():
        loss = inner()
        seen.append([p.grad for p in model.parameters()])
        return loss

    opt.step(closure)
    first, second = seen
    assert all(g is not None for g in first)
    assert all(g is None for g in second)  # zero_grad(set_to_none) and nothing recomputed
    assert all(p.requires_grad for p in model.parameters())
    # The same step with the second pass as it used to be (a plain run of the closure, every
    # gradient computed) gives the same parameters and curvature.
    ref_opt = KBFGS(reference, lr=LR, damping=LAM)
    curv = ref_opt._curv
    plain = curv.run_closure

    def full_second_pass(closure, *, second=False):  # record, but compute every gradient
        if not second:
            return plain(closure)
        curv.capture.clear()
        curv.capture.active = True
        try:
            with torch.enable_grad():
                return closure()
        finally:
            curv.capture.active = False

    curv.run_closure = full_second_pass
    ref_opt.step(_closure(ref_opt, reference, x, t))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for name in opt.layer_names:
        ours, theirs = opt.curvature(name).arrays(), ref_opt.curvature(name).arrays()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-12, atol=1e-14)


def test_second_pass_unfreezes_parameters_when_the_closure_raises():
    model = mlp()
    opt = KBFGS(model, lr=LR)
    x, t = _batches(steps=1)[0]
    inner = _closure(opt, model, x, t)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return inner()

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(p.requires_grad for p in model.parameters())
    capture = opt._curv.capture
    assert not capture.root_outputs
    assert not capture.records
    # The step stands without its second-pass update: parameters moved, counters agree.
    assert opt.step_count == 1
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.curvature("0").a_updates == 1
    assert opt.curvature("0").g_updates == 0
    opt.step(inner)  # and training goes on
    assert opt.step_count == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"damping": 0.0}, "damping"),
        ({"momentum": 1.0}, "momentum"),
        ({"stats_every": 0}, "stats_every"),
        ({"check_every": 0}, "check_every"),
        ({"check_every": 2.0}, "check_every"),
        ({"variant": "v3"}, "variant"),
    ],
)
def test_hyperparameter_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KBFGS(mlp(), **kwargs)


def test_lr_scheduler_sets_the_step_taken():
    """After ``StepLR`` halves the lr, the step taken is half the unscheduled one (same state)."""
    (x, t), (x2, t2) = _batches(steps=2)
    runs = []
    for scheduled in (True, False):
        model = mlp()
        opt = KBFGSL(model, lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        opt.step(_closure(opt, model, x, t))
        if scheduled:
            sched.step()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(_closure(opt, model, x2, t2))
        runs.append([p.detach() - q for p, q in zip(model.parameters(), before)])
    assert opt.param_groups[0]["lr"] == 0.1
    for half, full in zip(*runs):
        assert full.abs().max() > 0
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-12, atol=1e-15)
