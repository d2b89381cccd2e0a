"""The fault-injection suite: every fault against every curvlin optimizer.

Each fault must end in a clear error or a documented recovery, and never in a corrupted state:
after a fault the optimizer's ``state_dict`` and the parameters are what they were, and the next
ordinary step proceeds as if the fault had never happened (compared with a twin that never saw
it). Runs over :data:`_methods.METHODS`; a new method joins by being added there.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _methods import METHODS, assert_same, batches, params, roundtrip
from _torch_models import cnn, mlp, one_thread
from torch import nn
from torch.nn import functional as F

from curvlin.adapters.torch import KFAC, Preconditioner

SHAPE = (3,)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(params=METHODS, ids=str)
def method(request):
    return request.param


def _pair(method, **overrides):
    """A model and optimizer, and an identical twin, after two ordinary steps."""
    out = []
    for _ in range(2):
        model = mlp()
        opt = method.make(model, **overrides)
        for x, t in batches(SHAPE, 2):
            method.step(opt, model, x, t)
        out.append((model, opt))
    return out


def _snapshot(model, opt):
    return params(model), roundtrip(opt.state_dict())


def _assert_unchanged(model, opt, snapshot, *, skipped=0):
    before_params, before_state = snapshot
    for p, q in zip(before_params, model.parameters()):
        assert torch.equal(p, q)
    after = roundtrip(opt.state_dict())
    assert after["curvlin"]["driver"]["skipped"] == before_state["curvlin"]["driver"][
        "skipped"
    ] + int(skipped)
    for sd in (after, before_state):
        sd["curvlin"]["driver"].pop("skipped")
        sd["curvlin"].pop("generator")  # a sampled Fisher may have drawn for the bad batch
    assert_same(before_state, after)


def _assert_twins(method, a, b, steps=2):
    """The next ordinary steps of both give bit-identical parameters."""
    (m1, o1), (m2, o2) = a, b
    for x, t in batches(SHAPE, steps, seed=5):
        method.step(o1, m1, x, t)
        method.step(o2, m2, x, t)
    for p, q in zip(m1.parameters(), m2.parameters()):
        if not method.sampled:  # the sampler's draws differ after a skipped batch
            assert torch.equal(p, q)
        assert torch.isfinite(p).all()


# -- NaN and inf anywhere ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["input", "target", "grad-weight", "grad-bias", "inf-grad"])
def test_nonfinite_step_is_skipped_and_changes_nothing(method, where):
    (model, opt), twin = _pair(method)
    snap = _snapshot(model, opt)
    x, t = batches(SHAPE, 1, seed=3)[0]
    x, t = x.clone(), t.clone()
    if where == "input":
        x[1, 0] = math.nan
    if where == "target":
        t[0, 0] = math.inf
    inner = method.closure(opt, model, x, t)

    def closure():
        loss = inner()
        if where.startswith("grad") or where == "inf-grad":
            p = model[0].bias if where == "grad-bias" else model[0].weight
            p.grad.view(-1)[0] = math.inf if where == "inf-grad" else math.nan
        return loss

    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(closure)
    assert opt.skipped_steps == 1
    _assert_unchanged(model, opt, snap, skipped=1)
    _assert_twins(method, (model, opt), twin)


def test_dead_layer_gives_no_nan(method):
    """A layer whose every output gradient is zero (dead ReLUs): finite steps, no NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU is off: the first layer learns nothing
    opt = method.make(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, t in batches(SHAPE, 3):
            method.step(opt, model, x, t)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- hyperparameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", math.inf),
        ("lr", -1.0),
        ("lr", math.nan),
        ("weight_decay", math.inf),
        ("damping", 0.0),
        ("damping", math.nan),
        ("momentum", 1.0),
        ("kl_clip", 0.0),
        ("relative_kl_clip", 0.0),
        ("relative_kl_clip", math.inf),
    ],
)
def test_bad_hyperparameter_is_refused_at_construction(method, key, value):
    with pytest.raises(ValueError, match=key):
        method.make(mlp(), **{key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", math.inf), ("weight_decay", math.inf), ("damping", -1.0), ("momentum", math.nan)],
)
def test_bad_hyperparameter_set_later_raises_before_anything_changes(method, key, value):
    (model, opt), twin = _pair(method)
    snap = _snapshot(model, opt)
    opt.param_groups[0][key] = value
    x, t = batches(SHAPE, 1, seed=3)[0]
    with pytest.raises(ValueError, match=key):
        method.step(opt, model, x, t)
    opt.param_groups[0][key] = twin[1].param_groups[0][key]
    _assert_unchanged(model, opt, snap)
    _assert_twins(method, (model, opt), twin)


def test_extreme_hyperparameters_stay_finite(method):
    for overrides in ({"damping": 1e6}, {"lr": 0.0}, {"damping": 1e-10, "lr": 1e-4}):
        model = mlp()
        before = params(model)
        opt = method.make(model, **overrides)
        for x, t in batches(SHAPE, 3):
            method.step(opt, model, x, t)
        assert all(torch.isfinite(p).all() for p in model.parameters()), overrides
        if overrides.get("lr") == 0.0:
            assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


# -- a step that raises --------------------------------------------------------------------


def test_a_closure_that_raises_leaves_nothing_behind(method):
    (model, opt), twin = _pair(method)
    snap = _snapshot(model, opt)
    x, t = batches(SHAPE, 1, seed=3)[0]
    inner = method.closure(opt, model, x * 3, t)

    def closure():
        inner()  # the forward and backward ran and were captured
        raise KeyError("data loader failed")

    with pytest.raises(KeyError):
        opt.step(closure)
    assert not opt._curv.capture.records
    _assert_unchanged(model, opt, snap)
    _assert_twins(method, (model, opt), twin)


def test_a_step_that_raises_forgets_its_batch(method):
    """A bad damping at refresh raises; the captured batch must not leak into the next step."""
    (model, opt), twin = _pair(method)
    snap = _snapshot(model, opt)
    opt.param_groups[0]["damping"] = -1.0
    x, t = batches(SHAPE, 1, seed=3)[0]
    with pytest.raises(ValueError, match="damping"):
        method.step(opt, model, x * 3, t)
    opt.param_groups[0]["damping"] = twin[1].param_groups[0]["damping"]
    _assert_unchanged(model, opt, snap)
    _assert_twins(method, (model, opt), twin)


def test_sampled_fisher_without_backward_fisher_raises_and_forgets():
    method = next(m for m in METHODS if m.sampled)
    (model, opt), twin = _pair(method)
    snap = _snapshot(model, opt)
    x, t = batches(SHAPE, 1, seed=3)[0]
    opt.zero_grad()
    F.mse_loss(model(x * 3), t).backward()  # forgot opt.backward_fisher(output)
    with pytest.raises(RuntimeError, match="backward_fisher"):
        opt.step()
    _assert_unchanged(model, opt, snap)
    _assert_twins(method, (model, opt), twin)


def test_wrong_protocol_is_a_clear_error(method):
    model = mlp()
    opt = method.make(model)
    x, t = batches(SHAPE, 1)[0]
    if "second_pass" in opt._curv.needs:
        opt.zero_grad()
        F.mse_loss(model(x), t).backward()
        with pytest.raises(RuntimeError, match="needs a closure"):
            opt.step()
    if method.sampled:  # the sampled Fisher's step without its extra backward
        opt.zero_grad()
        F.mse_loss(model(x), t).backward()
        with pytest.raises(RuntimeError, match="backward_fisher"):
            opt.step()
    else:  # and the extra backward where there is no sampled Fisher
        with pytest.raises(RuntimeError, match="backward_fisher"):
            opt.backward_fisher(model(x))
    assert opt.step_count == 0


def test_eval_mode_raises_on_a_statistics_step(method):
    model = mlp()
    opt = method.make(model)
    x, t = batches(SHAPE, 1)[0]
    model.eval()
    before = params(model)
    if method.per_parameter:  # nothing is captured: a gradient is all they need
        method.step(opt, model, x, t)
        assert opt.step_count == 1
        return
    with pytest.raises(RuntimeError, match="training mode"):
        method.step(opt, model, x, t)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert opt.step_count == 0


# -- frozen, shared and unsupported parameters ---------------------------------------------


def test_bias_frozen_after_construction(method):
    (model, opt), _ = _pair(method)
    model[0].bias.requires_grad_(False)
    bias = model[0].bias.detach().clone()
    weight = model[0].weight.detach().clone()
    for x, t in batches(SHAPE, 3, seed=4):
        method.step(opt, model, x, t)
    assert torch.equal(model[0].bias, bias)
    assert not torch.equal(model[0].weight, weight)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_layer_frozen_after_construction_is_left_alone(method):
    (model, opt), _ = _pair(method)
    for p in model[2].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[2].parameters()]
    first = model[0].weight.detach().clone()
    for x, t in batches(SHAPE, 2, seed=4):
        method.step(opt, model, x, t)
    assert all(torch.equal(p, q) for p, q in zip(frozen, model[2].parameters()))
    assert not torch.equal(model[0].weight, first)


def test_shared_weight_is_refused(method):
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # two layers, one weight
    model = nn.Sequential(nn.Linear(3, 4), a, nn.Tanh(), b).double()
    if method.per_parameter:  # one parameter, one block, whoever uses it
        opt = method.make(model)
        assert "3.weight" not in opt.layer_names
        for x, t in batches(SHAPE, 2, d_out=4):
            method.step(opt, model, x, t)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return
    with pytest.raises(ValueError, match=r"layers '1' and '3' share a parameter"):
        method.make(model)


def test_module_called_twice_is_one_layer(method):
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mid, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.out(torch.tanh(self.mid(torch.tanh(self.mid(self.inp(x))))))

    model = Twice().double()
    opt = method.make(model)
    layers = ["inp", "mid", "out"]
    if method.per_parameter:
        layers = [f"{n}.{p}" for n in layers for p in ("weight", "bias")]
    assert opt.layer_names == layers
    for x, t in batches(SHAPE, 3):
        method.step(opt, model, x, t)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x).reshape(x.shape[0], 1, 8)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h[:, 0])


def test_attention_projections_are_unsupported_not_silently_skipped(method):
    model = _Attention().double()
    if method.per_parameter:  # every parameter is supported, each with its own curvature
        opt = method.make(model)
        assert opt.layer_names == [n for n, _ in model.named_parameters()]
    else:
        with pytest.raises(
            ValueError, match=r"attn\.out_proj\.weight.*attn\.in_proj_weight|in_proj"
        ):
            method.make(model)
        opt = method.make(model, unsupported="adam")
        assert "attn.out_proj" not in opt.layer_names
    before = params(model)
    for x, t in batches(SHAPE, 3):
        method.step(opt, model, x, t)
    changed = [not torch.equal(p, q) for p, q in zip(before, model.parameters())]
    assert all(changed), [n for (n, _), c in zip(model.named_parameters(), changed) if not c]


def test_a_bypassed_layer_raises_instead_of_getting_no_update(method):
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)  # b never called

    model = Bypass().double()
    opt = method.make(model)
    x, t = batches(SHAPE, 1)[0]
    before = params(model)
    if method.per_parameter:  # a parameter needs no module call: it gets its update
        method.step(opt, model, x, t)
        assert all(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
        return
    with pytest.raises(RuntimeError, match="layer 'b' has a gradient but has never been seen"):
        method.step(opt, model, x, t)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


@pytest.mark.parametrize("fallback", ["sgd", "adam", "factory"])
def test_unsupported_parameters_get_the_fallback(method, fallback):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4)).double()
    if method.per_parameter:  # the norm's scale and shift are parameters like any other
        opt = method.make(model)
        assert "1.weight" in opt.layer_names
        assert len(opt.param_groups) == 1
        with pytest.raises(TypeError, match="unsupported"):
            method.make(model, unsupported=fallback)
        ln = model[1].weight.detach().clone()
        method.step(opt, model, *batches(SHAPE, 1)[0])
        assert not torch.equal(model[1].weight, ln)
        return
    with pytest.raises(ValueError, match=r"1\.weight \(5,\), 1\.bias \(5,\)"):
        method.make(model)
    choice = (lambda ps: torch.optim.AdamW(ps, lr=3e-3)) if fallback == "factory" else fallback
    opt = method.make(model, unsupported=choice)
    assert opt.param_groups[-1]["curvature"] is False
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ln, lr0 = model[1].weight.detach().clone(), opt.param_groups[-1]["lr"]
    assert lr0 == {"sgd": opt.param_groups[0]["lr"], "adam": 1e-3, "factory": 3e-3}[fallback]
    for x, t in batches(SHAPE, 2):
        method.step(opt, model, x, t)
        if fallback != "sgd":  # the step handed the scheduled lr to the fallback
            assert opt._fallback.param_groups[0]["lr"] == opt.param_groups[-1]["lr"]
        sched.step()
    assert not torch.equal(model[1].weight, ln)
    assert opt.param_groups[-1]["lr"] == lr0 / 4


def test_unsupported_must_be_known(method):
    with pytest.raises(TypeError if method.per_parameter else ValueError, match="unsupported"):
        method.make(mlp(), unsupported="ignore")


# -- the preconditioner's loop ---------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["kfac", "kbfgsl"])
def test_preconditioner_safe_loop_never_applies_a_nonfinite_gradient(cls_name):
    method = next(m for m in METHODS if m.name == cls_name)
    model = cnn() if cls_name == "kfac" else mlp()
    shape = (2, 7, 6) if cls_name == "kfac" else SHAPE
    precond = Preconditioner(model, method.build, damping=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches(shape, 3)
    for i, (x, t) in enumerate(data):

        def closure(x=x, t=t, i=i):
            opt.zero_grad()
            F.mse_loss(model(x), t).backward()
            if i == 1:
                model[0].weight.grad.view(-1)[0] = math.nan

        closure()
        before = params(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if precond.step():  # the documented loop
                opt.step()
                precond.second_pass(closure)
        if i == 1:
            assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert precond.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kfac_refuses_unknown_fisher_and_loss():
    with pytest.raises(ValueError, match="fisher"):
        KFAC(mlp(), fisher="exact")
    with pytest.raises(ValueError, match="needs loss"):
        KFAC(mlp(), fisher="mc")
