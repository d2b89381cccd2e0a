"""The array adapter (``curvlin.adapters.array``): the torch engine's results from plain arrays.

Everything runs on NumPy, on torch CPU tensors through array-api-compat and on
array-api-strict; the CuPy test at the end runs only where a GPU answers (a skip there is not
a pass: the GPU path is untested until ``scripts/gpu_check.sh`` has run on one).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import ClassVar

import array_api_strict
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from curvlin.adapters.array import (
    METHODS,
    ArrayPreconditioner,
    Conv2d,
    Linear,
    Method,
    from_dlpack,
    im2col,
    register_method,
)
from curvlin.adapters.torch import KBFGS, KBFGSL, KFAC, MBF, DiagonalFisher, Preconditioner
from curvlin.blocks import DiagonalFisherBlock, KFACBlock

TORCH_METHODS = {
    "kfac": KFAC,
    "kbfgs": KBFGS,
    "kbfgsl": KBFGSL,
    "diagonal": DiagonalFisher,
    "mbf": MBF,
}


# -- namespaces -----------------------------------------------------------------------------
def _numpy(a):
    return np.array(a, dtype=np.float64)


def _torch(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def _strict(a):
    return array_api_strict.asarray(np.asarray(a, dtype=np.float64))


LIBS = {"numpy": _numpy, "torch": _torch, "array_api_strict": _strict}


def _np(a):
    if isinstance(a, torch.Tensor):
        return a.detach().numpy()
    return np.asarray(a)


# -- models: a torch twin gives the arrays and the torch engine's answer ------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)
    ).double()


def _specs(model) -> dict:
    out = {}
    for name, m in model.named_children():
        if isinstance(m, nn.Linear):
            out[name] = Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, nn.Conv2d):
            out[name] = Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                stride=m.stride,
                padding=m.padding,
                bias=m.bias is not None,
            )
    return out


def _data(model):
    gen = torch.Generator().manual_seed(1)
    shape = (8, 5) if isinstance(model[0], nn.Linear) else (8, 2, 5, 5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randn((8, model[-1].out_features), generator=gen, dtype=torch.float64)
    return x, y


def _passes(model, x, y, reduction="mean"):
    """Forward and backward of the batch-mean MSE: per layer its input, output (the
    pre-activation) and the loss's gradient with respect to it, and the weight gradients."""
    seen = {}
    hooks = []
    for name, m in model.named_children():
        if isinstance(m, nn.Linear | nn.Conv2d):

            def hook(mod, inp, out, name=name):
                out.retain_grad()
                seen[name] = (inp[0].detach(), out)

            hooks.append(m.register_forward_hook(hook))
    model.zero_grad()
    F.mse_loss(model(x), y, reduction=reduction).backward()
    for h in hooks:
        h.remove()
    inputs = {n: a for n, (a, _) in seen.items()}
    outputs = {n: o.detach() for n, (_, o) in seen.items()}
    output_grads = {n: o.grad for n, (_, o) in seen.items()}
    grads = {
        n: (m.weight.grad, None if m.bias is None else m.bias.grad)
        for n, m in model.named_children()
        if n in seen
    }
    return grads, inputs, outputs, output_grads


def _convert(tree, lib):
    if isinstance(tree, dict):
        return {k: _convert(v, lib) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_convert(v, lib) for v in tree)
    return None if tree is None else LIBS[lib](tree.numpy())


def _like(lib):
    return LIBS[lib](np.empty(0))


def _torch_run(model, method, x, y, steps, lr, **options):
    """The torch engine's directions per step (SGD on them)."""
    model = copy.deepcopy(model)
    precond = Preconditioner(model, TORCH_METHODS[method], damping=0.1, **options)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y, reduction=options.get("loss_reduction", "mean"))
        loss.backward()
        return loss

    out = []
    for _ in range(steps):
        closure()
        assert precond.step()
        out.append(
            {
                n: tuple(None if p is None else p.grad.clone() for p in (m.weight, m.bias))
                for n, m in model.named_children()
                if not isinstance(m, nn.Tanh | nn.Flatten)
            }
        )
        opt.step()
        precond.second_pass(closure)
    return out


def _array_run(model, method, x, y, steps, lr, lib, **options):
    """The same through the array adapter, the passes computed on a torch twin."""
    model = copy.deepcopy(model)
    precond = ArrayPreconditioner(_specs(model), method, damping=0.1, like=_like(lib), **options)
    out = []
    reduction = options.get("loss_reduction", "mean")
    for _ in range(steps):
        grads, inputs, outputs, output_grads = _convert(_passes(model, x, y, reduction), lib)
        if "outputs" not in precond.needs:
            outputs = None
        if precond.stats_due:
            d = precond.precondition(
                grads, inputs=inputs, outputs=outputs, output_grads=output_grads
            )
        else:
            d = precond.precondition(grads)
        assert d is not None
        out.append(d)
        with torch.no_grad():
            for name, (dw, db) in d.items():
                m = getattr(model, name)
                m.weight -= lr * torch.from_numpy(np.asarray(_np(dw)).copy())
                if db is not None:
                    m.bias -= lr * torch.from_numpy(np.asarray(_np(db)).copy())
        if precond.second_pass_due:
            _, _, outputs, output_grads = _convert(_passes(model, x, y, reduction), lib)
            assert precond.second_pass(outputs=outputs, output_grads=output_grads)
    return out, precond


@pytest.mark.parametrize("lib", list(LIBS))
@pytest.mark.parametrize("model", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("kfac", {}),
        ("kfac", {"stats_every": 2, "refresh_every": 2, "exact_damping": True}),
        ("kfac", {"loss_reduction": "sum"}),
        ("kbfgs", {}),
        ("kbfgs", {"stats_every": 2, "check_every": 1}),
        ("kbfgsl", {"memory": 3}),
        ("diagonal", {}),
        ("mbf", {"max_block_size": 4}),
    ],
    ids=[
        "kfac",
        "kfac-schedule",
        "kfac-sum",
        "kbfgs",
        "kbfgs-schedule",
        "kbfgsl",
        "diagonal",
        "mbf",
    ],
)
def test_matches_torch_engine(method, options, model, lib):
    model = model()
    x, y = _data(model)
    want = _torch_run(model, method, x, y, 4, 0.1, **options)
    got, precond = _array_run(model, method, x, y, 4, 0.1, lib, **options)
    assert precond.step_count == 4
    for step, (w, g) in enumerate(zip(want, got)):
        assert set(w) == set(g)
        for name in w:
            for a, b in zip(w[name], g[name]):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(
                        _np(b), a.numpy(), rtol=1e-10, atol=1e-12, err_msg=f"{step} {name}"
                    )


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [
        ((3, 3), (1, 1), (0, 0), (1, 1)),
        ((3, 2), (2, 1), (1, 2), (1, 1)),
        ((2, 2), (1, 2), (0, 1), (2, 1)),
        ((1, 1), (1, 1), (0, 0), (1, 1)),
    ],
)
@pytest.mark.parametrize("lib", list(LIBS))
def test_im2col_equals_unfold(kernel, stride, padding, dilation, lib, rng):
    x = rng.standard_normal((3, 2, 7, 6))
    rows = im2col(LIBS[lib](x), kernel, stride=stride, padding=padding, dilation=dilation)
    unfold = F.unfold(
        torch.from_numpy(x), kernel, dilation=dilation, padding=padding, stride=stride
    )  # (N, C·k_h·k_w, T)
    want = unfold.transpose(1, 2).reshape(-1, unfold.shape[1]).numpy()
    np.testing.assert_array_equal(_np(rows), want)


def test_conv_layer_geometry_matches_torch():
    conv = nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    spec = Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    out = conv(torch.randn(2, 2, 9, 7))
    assert spec.output_shape((2, 2, 9, 7)) == tuple(out.shape)
    assert spec.weight_shape == tuple(conv.weight.shape)


# -- helpers for the fault and error tests ---------------------------------------------------
def _step_arrays(rng, n=6):
    x = rng.standard_normal((n, 4))
    s = x @ rng.standard_normal((4, 3))
    g = rng.standard_normal((n, 3)) / n
    return {"fc": (g.T @ x, g.sum(0))}, {"fc": x}, {"fc": s}, {"fc": g}


def _snapshot(precond):
    sd = precond.state_dict()
    arrays = {
        (n, k): v.copy()
        for n, lay in sd["driver"]["layers"].items()
        for k, v in lay["arrays"].items()
    }
    counts = (sd["driver"]["step"], precond.damping)  # the skip counter may change
    return arrays, counts


def _assert_same(a, b):
    assert a[1] == b[1]
    assert set(a[0]) == set(b[0])
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k])


def _trained(method, rng, steps=2, **options):
    precond = ArrayPreconditioner({"fc": Linear(4, 3)}, method, **options)
    for _ in range(steps):
        grads, inputs, outputs, output_grads = _step_arrays(rng)
        assert (
            precond.precondition(grads, inputs=inputs, outputs=outputs, output_grads=output_grads)
            is not None
        )
        if precond.second_pass_due:
            _, _, outputs, output_grads = _step_arrays(rng)
            precond.second_pass(outputs=outputs, output_grads=output_grads)
    return precond


@pytest.mark.parametrize("method", ["kfac", "kbfgs", "kbfgsl", "diagonal", "mbf"])
@pytest.mark.parametrize("where", ["grads", "inputs", "output_grads"])
def test_nonfinite_step_is_skipped(method, where, rng):
    precond = _trained(method, rng)
    before = _snapshot(precond)
    grads, inputs, outputs, output_grads = _step_arrays(rng)
    bad = {"grads": grads, "inputs": inputs, "output_grads": output_grads}[where]
    if where == "grads":
        bad["fc"][0][1, 2] = np.nan
    else:
        bad["fc"][2, 1] = np.inf
    with pytest.warns(RuntimeWarning, match="skipped"), np.errstate(all="ignore"):
        out = precond.precondition(grads, inputs=inputs, outputs=outputs, output_grads=output_grads)
    assert out is None
    assert precond.skipped_steps == 1
    assert not precond.second_pass_due
    _assert_same(before, _snapshot(precond))


def test_nonfinite_second_pass_is_left_out(rng):
    precond = _trained("kbfgs", rng, steps=1)
    grads, inputs, outputs, output_grads = _step_arrays(rng)
    precond.precondition(grads, inputs=inputs, outputs=outputs, output_grads=output_grads)
    _, _, outputs, output_grads = _step_arrays(rng)
    output_grads["fc"][0, 0] = np.nan
    h_g = precond.driver.states["fc"].h_g.copy()
    with pytest.warns(RuntimeWarning, match="second pass"):
        assert not precond.second_pass(outputs=outputs, output_grads=output_grads)
    np.testing.assert_array_equal(precond.driver.states["fc"].h_g, h_g)


@pytest.mark.parametrize("method", ["kfac", "kbfgs", "kbfgsl", "diagonal", "mbf"])
def test_checkpoint_round_trip_bit_for_bit(method, rng, tmp_path):
    precond = _trained(method, rng, damping=0.2)
    path = tmp_path / "state"  # saved at this path exactly, without a suffix added
    precond.save(path)
    with np.load(path, allow_pickle=False) as f:  # no pickled object anywhere
        assert all(f[k].dtype != object for k in f.files)
    other = ArrayPreconditioner({"fc": Linear(4, 3)}, method)
    other.load(path)
    assert other.damping == 0.2
    assert other.step_count == precond.step_count
    _assert_same(_snapshot(precond), _snapshot(other))
    for _ in range(2):
        grads, inputs, outputs, output_grads = _step_arrays(rng)
        a = precond.precondition(grads, inputs=inputs, outputs=outputs, output_grads=output_grads)
        b = other.precondition(grads, inputs=inputs, outputs=outputs, output_grads=output_grads)
        for u, v in zip(a["fc"], b["fc"]):
            np.testing.assert_array_equal(u, v)
        if precond.second_pass_due:
            _, _, outputs, output_grads = _step_arrays(rng)
            precond.second_pass(outputs=outputs, output_grads=output_grads)
            other.second_pass(outputs=outputs, output_grads=output_grads)
    _assert_same(_snapshot(precond), _snapshot(other))


def test_foreign_files_are_refused(rng, tmp_path):
    precond = _trained("kfac", rng)
    before = _snapshot(precond)
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    with pytest.raises(ValueError, match="not an ArrayPreconditioner checkpoint"):
        precond.load(tmp_path / "other.npz")
    ArrayPreconditioner({"fc": Linear(4, 3)}, "kbfgs").save(tmp_path / "kbfgs.npz")
    with pytest.raises(ValueError, match="method is 'kbfgs'"):
        precond.load(tmp_path / "kbfgs.npz")
    _assert_same(before, _snapshot(precond))


def test_checkpoint_restores_onto_torch_tensors(rng):
    precond = _trained("kfac", rng)
    other = ArrayPreconditioner(
        {"fc": Linear(4, 3)}, "kfac", like=torch.empty(0, dtype=torch.float64)
    )
    other.load_state_dict(precond.state_dict())
    assert isinstance(other.driver.states["fc"].g, torch.Tensor)
    np.testing.assert_array_equal(
        other.driver.states["fc"].g.numpy(), precond.driver.states["fc"].g
    )


def _bad_checkpoints(sd):
    def edit(f):
        d = copy.deepcopy(sd)
        f(d)
        return d

    arrays = lambda d: d["driver"]["layers"]["fc"]["arrays"]  # noqa: E731
    return {
        "method": (edit(lambda d: d.update(method="kbfgs")), "method"),
        "layers": (edit(lambda d: d["layers"]["fc"].update(d_out=5)), "layers"),
        "damping": (edit(lambda d: d.update(damping=-1.0)), "damping"),
        "shape": (edit(lambda d: arrays(d).update(g=np.zeros((2, 2)))), "'fc'.*'g'.*shape"),
        "dtype": (
            edit(lambda d: arrays(d).update(g=arrays(d)["g"].astype(np.float32))),
            "'fc'.*'g'.*dtype",
        ),
        "nan": (edit(lambda d: arrays(d)["a"].__setitem__((0, 0), np.nan)), "'fc'.*'a'.*NaN"),
        "not numpy": (edit(lambda d: arrays(d).update(g=[[1.0]])), "'fc'.*'g'.*NumPy"),
        "step": (edit(lambda d: d["driver"].update(step=-1)), "step"),
    }


@pytest.mark.parametrize(
    "case", list(_bad_checkpoints(_trained("kfac", np.random.default_rng(0)).state_dict()))
)
def test_bad_checkpoint_changes_nothing(case, rng):
    precond = _trained("kfac", rng)
    bad, match = _bad_checkpoints(precond.state_dict())[case]
    precond.precondition(
        *_step_arrays(rng)[:1], inputs=_step_arrays(rng)[1], output_grads=_step_arrays(rng)[3]
    )
    before = _snapshot(precond)
    with pytest.raises((ValueError, TypeError), match=match):
        precond.load_state_dict(bad)
    _assert_same(before, _snapshot(precond))


# -- bad input: an error naming the layer and the argument, and no change ------------------
def _bad_inputs(rng):
    grads, inputs, outputs, output_grads = _step_arrays(rng)
    gw, gb = grads["fc"]
    t = torch.from_numpy
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    return {
        "unknown layer": (dict(grads={"fc": grads["fc"], "fc2": grads["fc"]}), "grads.*'fc2'"),
        "grad shape": (dict(grads={"fc": (gw.T, gb)}), "'fc'.*grads.*dW.*shape"),
        "grad dtype": (dict(grads={"fc": (f32(gw), gb)}), "'fc'.*grads.*dW.*dtype"),
        "grad library": (dict(grads={"fc": (t(gw), gb)}), "'fc'.*grads.*dW.*torch"),
        "bias missing": (dict(grads={"fc": (gw, None)}), "'fc'.*db.*missing"),
        "not a pair": (dict(grads={"fc": gw}), "'fc'.*grads.*pair"),
        "inputs missing": (dict(inputs={}), "'fc'.*inputs is missing"),
        "output_grads missing": (dict(output_grads=None), "'fc'.*output_grads is missing"),
        "outputs missing": (dict(outputs=None), "'fc'.*outputs is missing"),
        "inputs shape": (dict(inputs={"fc": inputs["fc"][:, :3]}), "'fc'.*inputs.*shape"),
        "inputs library": (dict(inputs={"fc": t(inputs["fc"])}), "'fc'.*inputs.*torch"),
        "rows differ": (
            dict(output_grads={"fc": output_grads["fc"][:4]}),
            "'fc'.*output_grads.*shape",
        ),
        "output dtype": (dict(outputs={"fc": f32(outputs["fc"])}), "'fc'.*outputs.*dtype"),
    }


#: Cases about ``outputs``, which only K-BFGS reads (KFAC ignores them).
_OUTPUT_CASES = {"outputs missing", "output dtype"}


@pytest.mark.parametrize(
    ("method", "case"),
    [
        (method, case)
        for method in ("kfac", "kbfgs")
        for case in _bad_inputs(np.random.default_rng(0))
        if method == "kbfgs" or case not in _OUTPUT_CASES
    ],
)
def test_bad_input_names_layer_and_argument(method, case, rng):
    precond = _trained(method, rng)
    grads, inputs, outputs, output_grads = _step_arrays(rng)
    kwargs = dict(grads=grads, inputs=inputs, outputs=outputs, output_grads=output_grads)
    change, match = _bad_inputs(rng)[case]
    kwargs.update(change)
    before = _snapshot(precond)
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        precond.precondition(kwargs.pop("grads"), **kwargs)
    _assert_same(before, _snapshot(precond))
    assert not precond.second_pass_due


def test_bad_conv_input_names_layer_and_argument(rng):
    precond = ArrayPreconditioner({"conv": Conv2d(2, 3, 3)}, "kfac")
    grads = {"conv": (np.zeros((3, 2, 3, 3)), np.zeros(3))}
    x = rng.standard_normal((4, 2, 6, 6))
    with pytest.raises(
        ValueError, match=r"'conv': output_grads has shape \(4, 3, 6, 6\), expected"
    ):
        precond.precondition(
            grads, inputs={"conv": x}, output_grads={"conv": np.zeros((4, 3, 6, 6))}
        )
    with pytest.raises(ValueError, match=r"'conv': inputs must have shape \(N, 2, H, W\)"):
        precond.precondition(grads, inputs={"conv": x[:, :1]}, output_grads={"conv": x})
    with pytest.raises(ValueError, match="'conv': inputs of spatial size"):
        precond.precondition(grads, inputs={"conv": x[:, :, :2]}, output_grads={"conv": x})
    with pytest.raises(ValueError, match=r"'conv': grads\[0\] \(dW\) has shape \(3, 18\)"):
        precond.precondition({"conv": (np.zeros((3, 18)), np.zeros(3))})
    with pytest.raises(TypeError, match="'conv': inputs is a array_api_strict"):
        precond.precondition(grads, inputs={"conv": _strict(x)}, output_grads={"conv": x})
    assert precond.step_count == 0


def test_state_dict_waits_for_a_pending_second_pass(rng):
    precond = _trained("kbfgs", rng, steps=1)
    grads, inputs, outputs, output_grads = _step_arrays(rng)
    precond.precondition(grads, inputs=inputs, outputs=outputs, output_grads=output_grads)
    with pytest.raises(RuntimeError, match="second pass is pending"):
        precond.state_dict()
    _, _, outputs, output_grads = _step_arrays(rng)
    precond.second_pass(outputs=outputs, output_grads=output_grads)
    assert precond.state_dict()["driver"]["step"] == 2


def test_other_device_is_refused():
    precond = ArrayPreconditioner(
        {"fc": Linear(2, 2)}, "kfac", like=torch.empty(0, dtype=torch.float64)
    )
    meta = torch.empty((2, 2), dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"'fc'.*dW.*device meta"):
        precond.precondition({"fc": (meta, torch.zeros(2, dtype=torch.float64))})
    assert precond.step_count == 0


@pytest.mark.parametrize("case", ["missing", "shape", "dtype"])
def test_bad_second_pass_names_layer_and_argument(case, rng):
    precond = _trained("kbfgs", rng, steps=1)
    grads, inputs, outputs, output_grads = _step_arrays(rng)
    precond.precondition(grads, inputs=inputs, outputs=outputs, output_grads=output_grads)
    _, _, outputs, output_grads = _step_arrays(rng)
    kwargs = dict(outputs=outputs, output_grads=output_grads)
    match = {
        "missing": "'fc'.*output_grads is missing.*second_pass",
        "shape": "'fc'.*outputs.*shape",
        "dtype": "'fc'.*output_grads.*dtype",
    }[case]
    if case == "missing":
        kwargs["output_grads"] = {}
    elif case == "shape":
        kwargs["outputs"] = {"fc": outputs["fc"][:3]}
    else:
        kwargs["output_grads"] = {"fc": output_grads["fc"].astype(np.float32)}
    before = _snapshot_states(precond)
    with pytest.raises((ValueError, TypeError), match=match):
        precond.second_pass(**kwargs)
    _assert_same(before, _snapshot_states(precond))
    assert precond.second_pass_due  # still due: a corrected call may follow
    assert precond.second_pass(outputs=outputs, output_grads=output_grads)


def _snapshot_states(precond):
    states = precond.driver.states
    arrays = {(n, k): np.array(v) for n, s in states.items() for k, v in s.arrays().items()}
    return arrays, (precond.step_count,)


def test_bad_construction():
    with pytest.raises(ValueError, match="unknown method 'lbfgs'"):
        ArrayPreconditioner({"fc": Linear(2, 2)}, "lbfgs")
    with pytest.raises(TypeError, match=r"unknown options \['decay'\]"):
        ArrayPreconditioner({"fc": Linear(2, 2)}, "kbfgs", decay=0.9)
    with pytest.raises(TypeError, match="layer 'fc' must be a Linear or a Conv2d"):
        ArrayPreconditioner({"fc": (2, 2)}, "kfac")
    with pytest.raises(ValueError, match="damping"):
        ArrayPreconditioner({"fc": Linear(2, 2)}, "kfac", damping=0.0)
    with pytest.raises(ValueError, match="Conv2d: padding"):
        Conv2d(1, 1, 3, padding=-1)


@pytest.mark.parametrize("method", ["kfac", "kbfgsl"])
def test_half_precision_model_keeps_float32_curvature(method, rng):
    half = ArrayPreconditioner({"fc": Linear(4, 3)}, method, like=np.empty(0, np.float16))
    single = ArrayPreconditioner({"fc": Linear(4, 3)}, method, like=np.empty(0, np.float32))
    assert half.factor_dtype == np.float32
    for _ in range(2):
        arrays = _step_arrays(rng)
        kw = [
            {
                k: tuple(a.astype(dt) for a in v) if isinstance(v, tuple) else v.astype(dt)
                for k, v in t.items()
            }
            for dt in (np.float16, np.float32)
            for t in arrays
        ]
        a = half.precondition(kw[0], inputs=kw[1], outputs=kw[2], output_grads=kw[3])
        b = single.precondition(kw[4], inputs=kw[5], outputs=kw[6], output_grads=kw[7])
        assert a["fc"][0].dtype == np.float16
        np.testing.assert_allclose(a["fc"][0], b["fc"][0], rtol=2e-2, atol=2e-2)
        if half.second_pass_due:
            _, _, s_, g_ = _step_arrays(rng)
            for p, dt in ((half, np.float16), (single, np.float32)):
                p.second_pass(
                    outputs={"fc": s_["fc"].astype(dt)}, output_grads={"fc": g_["fc"].astype(dt)}
                )
    floats = [a for a in half.driver.states["fc"].arrays().values() if a.dtype != bool]
    assert all(a.dtype == np.float32 for a in floats)


def test_blocks_without_rows_are_refused():
    @dataclass(frozen=True)
    class GradOnly(DiagonalFisherBlock):
        needs: ClassVar[frozenset[str]] = frozenset({"grad"})

    register_method("grad-only", Method(lambda layer: GradOnly(layer.d_out, layer.d_in), 0.1))
    try:
        with pytest.raises(ValueError, match="layer 'fc': GradOnly does not take a layer's rows"):
            ArrayPreconditioner({"fc": Linear(2, 2)}, "grad-only")
    finally:
        del METHODS["grad-only"]


def test_register_method(rng):
    register_method(
        "kfac-half",
        Method(
            lambda layer: KFACBlock(layer.d_out, layer.matrix_in, bias=layer.bias, decay=0.5),
            default_damping=0.1,
        ),
    )
    try:
        precond = ArrayPreconditioner({"fc": Linear(4, 3)}, "kfac-half")
        grads, inputs, _, output_grads = _step_arrays(rng)
        assert precond.precondition(grads, inputs=inputs, output_grads=output_grads)
        assert precond.driver.blocks["fc"].decay == 0.5
        assert precond.damping == 0.1
    finally:
        del METHODS["kfac-half"]


def test_dlpack_hand_over_without_copy(rng):
    """torch → NumPy through DLPack shares memory; the adapter takes the result as NumPy."""
    precond = ArrayPreconditioner({"fc": Linear(4, 3)}, "kfac")
    grads, inputs, _, output_grads = _step_arrays(rng)
    tensors = {"fc": torch.from_numpy(inputs["fc"].copy())}
    shared = from_dlpack(tensors, np)
    assert np.shares_memory(shared["fc"], tensors["fc"].numpy())
    grads_t = {"fc": tuple(torch.from_numpy(g.copy()) for g in grads["fc"])}
    want = precond.precondition(grads, inputs=inputs, output_grads=output_grads)
    other = ArrayPreconditioner({"fc": Linear(4, 3)}, "kfac")
    got = other.precondition(from_dlpack(grads_t, np), inputs=shared, output_grads=output_grads)
    for u, v in zip(want["fc"], got["fc"]):
        np.testing.assert_array_equal(u, v)


def test_pending_second_pass_survives_a_bad_call(rng):
    precond = _trained("kbfgs", rng, steps=1)
    grads, inputs, outputs, output_grads = _step_arrays(rng)
    precond.precondition(grads, inputs=inputs, outputs=outputs, output_grads=output_grads)
    with pytest.raises(ValueError, match=r"'fc'.*inputs is missing"):
        precond.precondition(grads, outputs=outputs, output_grads=output_grads)
    assert precond.second_pass_due


def test_cupy_adapter_imports_lazily():
    import subprocess
    import sys

    code = (
        "import sys, curvlin.adapters.cupy as c; "
        "assert 'cupy' not in sys.modules and 'torch' not in sys.modules; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


def test_gpu_check_script_runs_on_numpy(tmp_path):
    """scripts/gpu_check.py's timing code, on NumPy at small sizes (its GPU checks need one)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(script), "--cpu", "--smoke", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ratios = json.loads(out.read_text())["ratios"]["ratio_to_sgd"]
    assert set(ratios) == {"kfac", "kbfgsl"}
    assert all(r > 0 for r in ratios.values())


def _conv_step_arrays(rng, n=3):
    x = rng.standard_normal((n, 2, 5, 5))
    s = rng.standard_normal((n, 3, 3, 3))
    g = rng.standard_normal((n, 3, 3, 3)) / n
    grads = {"conv": (rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3))}
    return grads, {"conv": x}, {"conv": s}, {"conv": g}


@pytest.mark.parametrize("method", ["kfac", "kbfgs", "kbfgsl", "mbf"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_every_backend_matches_numpy(method, layer, xp, to_xp, to_np, rng, tmp_path):
    """The adapter on the ``xp`` fixture's backends (CuPy and torch CUDA where a GPU answers)
    against NumPy: directions, and a checkpoint saved there and loaded into NumPy."""

    def on(tree):
        if isinstance(tree, dict):
            return {k: on(v) for k, v in tree.items()}
        if isinstance(tree, tuple):
            return tuple(on(v) for v in tree)
        return to_xp(tree, "float64")

    spec = {"linear": {"fc": Linear(4, 3)}, "conv": {"conv": Conv2d(2, 3, 3, stride=1)}}[layer]
    draw = _step_arrays if layer == "linear" else _conv_step_arrays
    ref = ArrayPreconditioner(spec, method)
    mine = ArrayPreconditioner(spec, method, like=to_xp(np.empty(0), "float64"))
    for _ in range(3):
        grads, inputs, outputs, output_grads = draw(rng)
        kw = dict(inputs=inputs, outputs=outputs, output_grads=output_grads)
        a = ref.precondition(grads, **kw)
        b = mine.precondition(on(grads), **{k: on(v) for k, v in kw.items()})
        for name in a:
            for u, v in zip(a[name], b[name]):
                np.testing.assert_allclose(to_np(v), u, rtol=1e-9, atol=1e-12)
        if ref.second_pass_due:
            _, _, outputs, output_grads = draw(rng)
            ref.second_pass(outputs=outputs, output_grads=output_grads)
            assert mine.second_pass(outputs=on(outputs), output_grads=on(output_grads))
    mine.save(tmp_path / "s.npz")
    back = ArrayPreconditioner(spec, method)
    back.load(tmp_path / "s.npz")
    _assert_same(_snapshot(back), _snapshot(mine))


def _cupy_or_skip():
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not installed (GPU path untested here)")
    if not cupy.cuda.is_available():
        pytest.skip("no GPU answers (GPU path untested here)")
    return cupy


@pytest.mark.parametrize("method", ["kfac", "kbfgs", "kbfgsl"])
def test_cupy_matches_numpy(method, rng):
    cupy = _cupy_or_skip()
    from curvlin.adapters.cupy import CuPyPreconditioner

    def to(tree):
        return {
            k: tuple(map(cupy.asarray, v)) if isinstance(v, tuple) else cupy.asarray(v)
            for k, v in tree.items()
        }

    ref = ArrayPreconditioner({"fc": Linear(4, 3)}, method)
    gpu = CuPyPreconditioner({"fc": Linear(4, 3)}, method, dtype="float64")
    for _ in range(3):
        grads, inputs, outputs, output_grads = _step_arrays(rng)
        kw = dict(inputs=inputs, outputs=outputs, output_grads=output_grads)
        a = ref.precondition(grads, **kw)
        b = gpu.precondition(to(grads), **{k: to(v) for k, v in kw.items()})
        for u, v in zip(a["fc"], b["fc"]):
            np.testing.assert_allclose(cupy.asnumpy(v), u, rtol=1e-9, atol=1e-12)
        if ref.second_pass_due:
            _, _, outputs, output_grads = _step_arrays(rng)
            ref.second_pass(outputs=outputs, output_grads=output_grads)
            gpu.second_pass(outputs=to(outputs), output_grads=to(output_grads))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = gpu.state_dict()
    assert all(
        isinstance(v, np.ndarray)
        for lay in sd["driver"]["layers"].values()
        for v in lay["arrays"].values()
    )


def test_torch_cuda_tensors_reach_cupy_without_a_copy(rng):
    cupy = _cupy_or_skip()
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here (GPU path untested)")
    from curvlin.adapters.cupy import CuPyPreconditioner, from_dlpack

    grads, inputs, _, output_grads = _step_arrays(rng)
    on_gpu = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}
    handed = from_dlpack(on_gpu)
    assert int(handed["fc"].data.ptr) == on_gpu["fc"].data_ptr()
    precond = CuPyPreconditioner({"fc": Linear(4, 3)}, "kfac", dtype="float64")
    cuda = {k: tuple(torch.from_numpy(g).cuda() for g in v) for k, v in grads.items()}
    d = precond.precondition(
        from_dlpack(cuda),
        inputs=handed,
        output_grads=from_dlpack({k: torch.from_numpy(v).cuda() for k, v in output_grads.items()}),
    )
    ref = ArrayPreconditioner({"fc": Linear(4, 3)}, "kfac")
    want = ref.precondition(grads, inputs=inputs, output_grads=output_grads)
    np.testing.assert_allclose(
        torch.from_dlpack(d["fc"][0]).cpu().numpy(), want["fc"][0], rtol=1e-9, atol=1e-12
    )
    assert isinstance(d["fc"][0], cupy.ndarray)
