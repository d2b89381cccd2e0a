"""The Woodbury primitives (spec §3 property tests 1, 2, 3, 4 (Q Qᵀ = H), 6 and 7).

Every backend of the ``xp`` fixture against dense float64 NumPy references built from explicit
per-example gradients; 7 (backend parity) is the same references on every backend.
"""

from __future__ import annotations

import numpy as np
import pytest

import curvlin
from curvlin import (
    linear_gram,
    linear_jvp,
    linear_terms,
    linear_vjp,
    patch_gram,
    woodbury_coefficients,
    woodbury_solve,
)
from curvlin.losses import LOSSES, REDUCTIONS, loss_scale, output_hessian, output_hessian_sqrt

TOL = {"rtol": 1e-10, "atol": 1e-10}


def _dense_u(a, delta, bias):
    """Columns of ``U``: per-example (and per-direction) gradients, flattened row-major.

    ``a`` (m, T, d_in), ``delta`` (k, m, T, d_out); column ``n·k + j`` is example n, direction j.
    """
    if bias:
        a = np.concatenate([a, np.ones((*a.shape[:-1], 1))], axis=-1)
    k, m = delta.shape[:2]
    cols = [(delta[j, n].T @ a[n]).ravel() for n in range(m) for j in range(k)]
    return np.stack(cols, axis=1)


@pytest.mark.parametrize(("p", "m"), [(30, 4), (6, 20)], ids=["m<P", "m>P"])
def test_woodbury_solve_matches_dense(xp, to_xp, to_np, rng, p, m):
    u, g = rng.standard_normal((p, m)), rng.standard_normal(p)
    lam = 0.3
    dense = np.linalg.solve(lam * np.eye(p) + u @ u.T / m, g)
    got = to_np(woodbury_solve(to_xp(u), to_xp(g), damping=lam))
    np.testing.assert_allclose(got, dense, rtol=1e-9, atol=1e-12)
    many = rng.standard_normal((p, 3))
    got = to_np(woodbury_solve(to_xp(u), to_xp(many), damping=lam))
    np.testing.assert_allclose(got, np.linalg.solve(lam * np.eye(p) + u @ u.T / m, many), 1e-9)


def test_weight_decay_folds_into_the_damping(xp, to_xp, to_np, rng):
    """§3 test 6: the L2 term's curvature is τI, so (F + (λ+τ)I)⁻¹(g + τθ) is one solve."""
    p, m, lam, tau = 12, 5, 0.2, 0.05
    u, g, theta = rng.standard_normal((p, m)), rng.standard_normal(p), rng.standard_normal(p)
    dense = np.linalg.solve(u @ u.T / m + (lam + tau) * np.eye(p), g + tau * theta)
    got = woodbury_solve(to_xp(u), to_xp(g + tau * theta), damping=lam + tau)
    np.testing.assert_allclose(to_np(got), dense, rtol=1e-9)


def test_coefficients_with_n_examples(xp, to_xp, to_np, rng):
    """``n_examples`` is the curvature's normaliser, not the kernel size (Gauss–Newton)."""
    p, m, k, lam = 20, 3, 2, 0.1
    u, g = rng.standard_normal((p, m * k)), rng.standard_normal(p)
    c = woodbury_coefficients(to_xp(u.T @ u), to_xp(u.T @ g), damping=lam, n_examples=m)
    got = (g - u @ to_np(c)) / lam
    np.testing.assert_allclose(got, np.linalg.solve(lam * np.eye(p) + u @ u.T / m, g), 1e-9)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("m", "t", "k"),
    [(5, 1, 1), (30, 1, 1), (4, 1, 3), (3, 4, 1), (3, 4, 2)],
    ids=["linear", "linear-m>P", "directions", "patches", "patches-directions"],
)
def test_terms_match_per_example_gradients(xp, to_xp, to_np, rng, bias, m, t, k):
    """§3 tests 2 and 3: kernel, J·v and Jᵀ·u == explicit per-example gradients."""
    d_in, d_out = 3, 2
    a = rng.standard_normal((m, t, d_in))
    delta = rng.standard_normal((k, m, t, d_out))
    u = _dense_u(a, delta, bias)
    v = rng.standard_normal((d_out, d_in + int(bias)))
    c = rng.standard_normal(m * k)
    a_in = a[:, 0] if t == 1 else a
    d_in_ = delta[:, :, 0] if t == 1 else delta
    d_in_ = d_in_[0] if k == 1 else d_in_
    methods = ["auto"] if t == 1 else ["double_sum", "per_example"]
    for method in methods:
        terms = linear_terms(to_xp(a_in), to_xp(d_in_), bias=bias, method=method)
        np.testing.assert_allclose(to_np(terms.kernel()), u.T @ u, **TOL)
        np.testing.assert_allclose(to_np(terms.jvp(to_xp(v))), u.T @ v.ravel(), **TOL)
        np.testing.assert_allclose(to_np(terms.vjp(to_xp(c))).ravel(), u @ c, **TOL)
        # Once the per-example gradients exist, J·v and Jᵀ·u use them: same results.
        terms.kernel()
        np.testing.assert_allclose(to_np(terms.jvp(to_xp(v))), u.T @ v.ravel(), **TOL)
        np.testing.assert_allclose(to_np(terms.vjp(to_xp(c))).ravel(), u @ c, **TOL)
    if t == 1:
        np.testing.assert_allclose(to_np(linear_gram(to_xp(a_in), to_xp(d_in_), bias=bias)),
                                   u.T @ u, **TOL)  # fmt: skip
        got = linear_jvp(to_xp(a_in), to_xp(d_in_), to_xp(v), bias=bias)
        np.testing.assert_allclose(to_np(got), u.T @ v.ravel(), **TOL)
        got = linear_vjp(to_xp(a_in), to_xp(d_in_), to_xp(c), bias=bias)
        np.testing.assert_allclose(to_np(got).ravel(), u @ c, **TOL)
    else:
        for method in ("auto", "double_sum", "per_example"):
            got = patch_gram(to_xp(a_in), to_xp(d_in_), bias=bias, method=method)
            np.testing.assert_allclose(to_np(got), u.T @ u, **TOL)


def test_kernel_sum_of_mixed_layers_matches_dense(xp, to_xp, to_np, rng):
    """``LinearTerms.kernel_sum``: Linear layers (through ``Backend.hadamard_kernel``, with and
    without a bias, wider and narrower outputs) and a patch layer, summed, == Σ UᵀU; Jᵀ·u for
    the narrow-input layer (the other weighting of ``Dᵀ diag(c) A``) against dense."""
    m = 6
    layers = [
        ((m, 1, 2), (m, 1, 5), True),
        ((m, 1, 4), (m, 1, 3), False),
        ((m, 3, 2), (m, 3, 2), True),
    ]
    terms, dense = [], 0.0
    for a_shape, d_shape, bias in layers:
        a, delta = rng.standard_normal(a_shape), rng.standard_normal(d_shape)
        u = _dense_u(a, delta[None], bias)
        dense = dense + u.T @ u
        squeeze = a_shape[1] == 1
        terms.append(
            linear_terms(
                to_xp(a[:, 0] if squeeze else a),
                to_xp(delta[:, 0] if squeeze else delta),
                bias=bias,
            )
        )
        if squeeze and bias:  # d_in 2 <= d_out 5: the weights go on A
            c = rng.standard_normal(m)
            np.testing.assert_allclose(to_np(terms[-1].vjp(to_xp(c))).ravel(), u @ c, **TOL)
    total = curvlin.LinearTerms.kernel_sum(terms)
    host = to_np(total)
    np.testing.assert_array_equal(host, host.T)
    np.testing.assert_allclose(host, dense, **TOL)
    with pytest.raises(ValueError, match="at least one layer"):
        curvlin.LinearTerms.kernel_sum([])


def test_kernel_sum_promotes_mixed_dtypes(rng):
    a, d = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    low = linear_terms(a.astype(np.float32), d.astype(np.float32))
    high = linear_terms(a, d)
    total = curvlin.LinearTerms.kernel_sum([low, high])
    assert total.dtype == np.float64
    np.testing.assert_allclose(total, low.kernel() + high.kernel(), rtol=1e-6)


def test_linear_gram_is_hadamard(rng):
    a, d = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    np.testing.assert_allclose(linear_gram(a, d), (d @ d.T) * (a @ a.T + 1), **TOL)
    np.testing.assert_allclose(linear_gram(a, d, bias=False), (d @ d.T) * (a @ a.T), **TOL)


def test_auto_picks_the_cheaper_kernel(rng):
    small = linear_terms(rng.standard_normal((2, 2, 50)), rng.standard_normal((2, 2, 50)))
    large = linear_terms(rng.standard_normal((8, 100, 9)), rng.standard_normal((8, 100, 4)))
    assert (small.method, large.method) == ("double_sum", "per_example")


def test_errors(rng):
    a, d = np.ones((4, 3)), np.ones((4, 2))
    with pytest.raises(ValueError, match="damping"):
        woodbury_solve(np.ones((5, 2)), np.ones(5), damping=0.0)
    with pytest.raises(ValueError, match="g must have shape"):
        woodbury_solve(np.ones((5, 2)), np.ones(4), damping=0.1)
    with pytest.raises(ValueError, match="kernel must have shape"):
        woodbury_coefficients(np.ones((3, 2)), np.ones(3), damping=0.1)
    with pytest.raises(ValueError, match="ug must have shape"):
        woodbury_coefficients(np.eye(3), np.ones(2), damping=0.1)
    with pytest.raises(ValueError, match="n_examples"):
        woodbury_coefficients(np.eye(3), np.ones(3), damping=0.1, n_examples=0)
    with pytest.raises(ValueError, match="do not match"):
        linear_terms(a, np.ones((5, 2)))
    with pytest.raises(ValueError, match="method"):
        linear_terms(a, d, method="fast")
    with pytest.raises(ValueError, match="v must have shape"):
        linear_jvp(a, d, np.ones((2, 3)))
    with pytest.raises(ValueError, match="c must have shape"):
        linear_vjp(a, d, np.ones(3))
    with pytest.raises(TypeError, match="mixed dtypes"):
        linear_gram(a, np.ones((4, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="patches"):
        patch_gram(a, d)
    with pytest.raises(curvlin.LinAlgError):
        woodbury_solve(np.full((5, 2), np.nan), np.ones(5), damping=0.1)


# -- output Hessians (§3 test 4, first part) ----------------------------------------------
def _reference_hessian(f, loss, reduction):
    """∇²ℓ by finite structure: CE c(diag p − ppᵀ), BCE c·diag(p(1−p)), MSE 2c·I."""
    c = loss_scale(loss, reduction, f.shape[1])
    if loss == "cross_entropy":
        p = np.exp(f - f.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return c * (np.einsum("ni,ij->nij", p, np.eye(f.shape[1])) - np.einsum("ni,nj->nij", p, p))
    if loss == "bce_with_logits":
        p = 1 / (1 + np.exp(-f))
        return c * np.einsum("ni,ij->nij", p * (1 - p), np.eye(f.shape[1]))
    return np.broadcast_to(2 * c * np.eye(f.shape[1]), (len(f), f.shape[1], f.shape[1]))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_output_hessian_sqrt(xp, to_xp, to_np, rng, loss, reduction):
    f = 3 * rng.standard_normal((5, 4))
    q = to_np(output_hessian_sqrt(to_xp(f), loss=loss, reduction=reduction))
    h = _reference_hessian(f, loss, reduction)
    np.testing.assert_allclose(q @ np.swapaxes(q, 1, 2), h, rtol=1e-10, atol=1e-12)
    got = to_np(output_hessian(to_xp(f), loss=loss, reduction=reduction))
    np.testing.assert_allclose(got, h, rtol=1e-10, atol=1e-12)


def test_output_hessian_matches_autograd():
    """The closed forms against torch's Hessian of the torch loss itself."""
    torch = pytest.importorskip("torch")
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y_cls = torch.tensor([0, 3, 1])
    y_bin = torch.rand(3, 4, generator=g, dtype=torch.float64)
    cases = {
        ("cross_entropy", "mean"): lambda z: F.cross_entropy(z, y_cls),
        ("bce_with_logits", "mean"): lambda z: F.binary_cross_entropy_with_logits(z, y_bin),
        ("bce_with_logits", "sum"): lambda z: F.binary_cross_entropy_with_logits(
            z, y_bin, reduction="sum"
        ),
        ("mse", "mean"): lambda z: F.mse_loss(z, y_bin),
        ("mse", "batchmean"): lambda z: F.mse_loss(z, y_bin, reduction="sum") / 3,
    }
    for (loss, reduction), fn in cases.items():
        full = torch.autograd.functional.hessian(fn, f)  # (N, D, N, D)
        # the batch-mean loss is (1/N) Σ ℓ_n except for "sum": ∇²ℓ_n = N·block (or the block)
        scale = 1.0 if reduction == "sum" else 3.0
        blocks = torch.stack([full[n, :, n, :] for n in range(3)]) * scale
        mine = output_hessian(f.numpy(), loss=loss, reduction=reduction)
        np.testing.assert_allclose(mine, blocks.numpy(), rtol=1e-10, atol=1e-12)


def test_loss_errors():
    with pytest.raises(ValueError, match="loss must be"):
        output_hessian_sqrt(np.zeros((2, 2)), loss="hinge")
    with pytest.raises(ValueError, match="reduction must be"):
        output_hessian_sqrt(np.zeros((2, 2)), loss="mse", reduction="none")
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        output_hessian_sqrt(np.zeros(2), loss="mse")
