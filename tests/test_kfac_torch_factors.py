"""KFAC factors of the torch adapter against independent references.

- a dense reference from per-example output gradients (``torch.func``) and sliced patches;
- curvlinops 3.0.1's ``KFACLinearOperator`` (empirical, deterministic; type-2 for the
  expectation of the sampled Fisher);
- exact cases: one datum (``G ⊗ A = g gᵀ``) and deep linear networks with MSE (type-2 KFAC
  equals the block-diagonal GGN, which the average of many MC draws approaches).

Convention mapping to curvlinops (``separate_weight_and_bias=False``, ``kfac_approx="expand"``):
its ``_gradient_covariances[name]`` is our ``G`` and ``_input_covariances[name]`` our ``A`` for
cross-entropy and for every loss with ``fisher_type="type-2"``; for its empirical Fisher of an
MSE/BCE loss with ``reduction="mean"`` it multiplies the loss by ``√D`` (``D`` outputs), so its
``G`` is ``D ×`` ours there.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import needs_test_dep, optional_test_dep
from _torch_models import (
    batch_loss,
    block_ggn,
    cnn,
    deep_linear,
    dense_kron,
    kfac_factors,
    layer_grad_vec,
    make_targets,
    mlp,
    one_thread,
    reference_factors,
    rel_err,
)
from torch import nn

from curvlin.adapters.torch import KFAC

# The only independent check of the sampled Fisher for cross-entropy and BCE. Without it the
# tests that compare with it are skipped, unless CURVLIN_REQUIRE_TEST_DEPS lists curvlinops
# (CI does): then they fail.
curvlinops = optional_test_dep("curvlinops")
needs_curvlinops = needs_test_dep("curvlinops")

LOSS_MODULES = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


CONVS = {
    "s2-p1": {"stride": 2, "padding": 1},
    "s1-p2-d2-nobias": {"stride": 1, "padding": 2, "dilation": 2, "bias": False},
    "rect-s12-p10": {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 0)},
    "same-k3": {"padding": "same"},
    "same-k2-asym": {"kernel_size": (2, 3), "padding": "same", "dilation": (1, 2)},
    "valid": {"padding": "valid", "dilation": (2, 1)},
}


def _model(kind: str):
    if kind == "mlp":
        return mlp(), (3,)
    if kind == "mlp-nobias":
        return mlp(bias=False), (3,)
    return cnn(**CONVS[kind]), (2, 7, 6)


def _data(loss: str, shape, n: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    return X, make_targets(loss, n, 4, generator=gen)


def _curvlinops_factors(model, X, y, loss, *, fisher_type, reduction="mean", **kwargs):
    op = curvlinops.KFACLinearOperator(
        model,
        LOSS_MODULES[loss](reduction=reduction),
        [p for p in model.parameters() if p.requires_grad],
        [(X, y)],
        fisher_type=fisher_type,
        kfac_approx="expand",
        separate_weight_and_bias=False,
        check_deterministic=False,
        **kwargs,
    )
    op.compute_kronecker_factors()
    return {n: (op._gradient_covariances[n], op._input_covariances[n]) for n in op._mapping}


# -- 1a: dense reference ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kind", ["mlp", "mlp-nobias", *CONVS])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_empirical_factors_equal_dense_reference(kind, loss):
    model, shape = _model(kind)
    X, y = _data(loss, shape)
    ref = reference_factors(model, X, y, loss)
    ours = kfac_factors(model, X, y, loss)
    assert set(ours) == set(ref)
    for name, (g_ref, a_ref) in ref.items():
        g, a = ours[name]
        assert g.dtype == a.dtype == torch.float64
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "s2-p1"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_empirical_factors_batchmean_equal_dense_reference(kind, loss):
    """``loss_reduction="batchmean"``: the loss is ``(1/N) Σ_n ℓ_n`` with ``ℓ_n`` summed over
    the outputs (for cross-entropy the same as ``"mean"``)."""
    model, shape = _model(kind)
    X, y = _data(loss, shape)
    ref = reference_factors(model, X, y, loss, reduction="batchmean")
    ours = kfac_factors(model, X, y, loss, reduction="batchmean")
    for name, (g_ref, a_ref) in ref.items():
        torch.testing.assert_close(ours[name][1], a_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[name][0], g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kind", "loss"), [("mlp", "cross_entropy"), ("s2-p1", "mse")])
def test_empirical_factors_sum_reduction_equal_dense_reference(kind, loss):
    """``loss_reduction="sum"``: autograd's output gradients are per-example already; ``A`` is
    the mean over rows, ``G = Σ_n δ_n δ_nᵀ`` is the curvature of the summed loss."""
    model, shape = _model(kind)
    X, y = _data(loss, shape)
    ref = reference_factors(model, X, y, loss, reduction="sum")
    ours = kfac_factors(model, X, y, loss, reduction="sum")
    for name, (g_ref, a_ref) in ref.items():
        torch.testing.assert_close(ours[name][1], a_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[name][0], g_ref, rtol=1e-10, atol=1e-12)


def test_parameters_unchanged_with_zero_lr():
    """The factor tests rely on one ``lr=0`` step leaving the model as it was."""
    model, shape = _model("s2-p1")
    before = [p.detach().clone() for p in model.parameters()]
    X, y = _data("cross_entropy", shape)
    kfac_factors(model, X, y, "cross_entropy")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# -- 1b: curvlinops --------------------------------------------------------------------------


@needs_curvlinops
@pytest.mark.parametrize("kind", ["mlp", "mlp-nobias", "s2-p1", "s1-p2-d2-nobias", "same-k3"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_empirical_factors_equal_curvlinops(kind, loss):
    model, shape = _model(kind)
    X, y = _data(loss, shape)
    theirs = _curvlinops_factors(model, X, y, loss, fisher_type="empirical")
    ours = kfac_factors(model, X, y, loss)
    assert set(ours) == set(theirs)
    scale = 1.0 if loss == "cross_entropy" else 1.0 / 4  # curvlinops' √D loss scaling
    for name, (g_ref, a_ref) in theirs.items():
        torch.testing.assert_close(ours[name][1], a_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[name][0], scale * g_ref, rtol=1e-10, atol=1e-12)


@needs_curvlinops
@pytest.mark.parametrize("kind", ["s2-p1"])
def test_sum_reduction_curvature_matches_curvlinops(kind):
    """For a summed loss the curvature is that of the sum: ``G = Σ_n δ_n δ_nᵀ``.

    Spec §4 ("sum loss: G not divided by N", curvlinops' convention). Dividing by ``N`` here
    makes the KFAC step of a summed loss ``N`` times the natural-gradient step, so the step
    size depends on the batch size.
    """
    model, shape = _model(kind)
    X, y = _data("cross_entropy", shape)
    theirs = _curvlinops_factors(
        model, X, y, "cross_entropy", fisher_type="empirical", reduction="sum"
    )
    ours = kfac_factors(model, X, y, "cross_entropy", reduction="sum")
    for name, (g_ref, a_ref) in theirs.items():
        torch.testing.assert_close(
            dense_kron(*ours[name]), dense_kron(g_ref, a_ref), rtol=1e-10, atol=1e-12
        )


# -- 1c / 6: the mean of many MC draws approaches the type-2 factors ---------------------------


def _replicated_mc_factors(model, X, y, loss, *, copies: int, seed: int = 0):
    """MC KFAC on the batch repeated ``copies`` times = the mean of ``copies`` MC draws of G.

    A is unchanged by the repetition (identical rows), G averages independent draws.
    """
    Xr = X.repeat(copies, *([1] * (X.ndim - 1)))
    yr = y.repeat(copies, *([1] * (y.ndim - 1)))
    return kfac_factors(model, Xr, yr, loss, fisher="mc", seed=seed)


@needs_curvlinops
@pytest.mark.parametrize("kind", ["mlp", "s2-p1"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_mc_factors_average_to_type2(kind, loss):
    model, shape = _model(kind)
    X, y = _data(loss, shape, n=5)
    if loss == "bce_with_logits":  # curvlinops' type-2 wants 0/1 targets (H does not use y)
        y = torch.bernoulli(y, generator=torch.Generator().manual_seed(0))
    theirs = _curvlinops_factors(model, X, y, loss, fisher_type="type-2")
    # 5 examples x copies draws (x T positions for the conv); the observed relative errors at
    # these sizes are 0.002-0.05 over seeds, the test uses one fixed seed.
    ours = _replicated_mc_factors(model, X, y, loss, copies=2000 if kind == "mlp" else 1000)
    for name, (g_ref, a_ref) in theirs.items():
        g, a = ours[name]
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12)
        assert rel_err(g, g_ref) < 0.08, (name, rel_err(g, g_ref))


@needs_curvlinops
@pytest.mark.parametrize("loss", ["mse", "bce_with_logits"])
def test_mc_factors_batchmean_average_to_type2(loss):
    """``loss_reduction="batchmean"``: ``ℓ_n`` sums over the outputs, so ``E[δδᵀ]`` is the
    Hessian of the sum; curvlinops' type-2 of the summed loss is ``N ×`` that."""
    model, shape = _model("mlp")
    X, y = _data(loss, shape, n=5)
    if loss == "bce_with_logits":
        y = torch.bernoulli(y, generator=torch.Generator().manual_seed(0))
    theirs = _curvlinops_factors(model, X, y, loss, fisher_type="type-2", reduction="sum")
    Xr, yr = X.repeat(2000, 1), y.repeat(2000, 1)
    ours = kfac_factors(model, Xr, yr, loss, reduction="batchmean", fisher="mc")
    for name, (g_ref, a_ref) in theirs.items():
        g, a = ours[name]
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12)
        assert rel_err(g, g_ref / 5) < 0.08, (name, rel_err(g, g_ref / 5))


@needs_curvlinops
def test_mc_single_draw_is_not_type2():
    """Guard for the statistical test: one draw is visibly different from the expectation."""
    model, shape = _model("mlp")
    X, y = _data("cross_entropy", shape, n=5)
    theirs = _curvlinops_factors(model, X, y, "cross_entropy", fisher_type="type-2")
    ours = _replicated_mc_factors(model, X, y, "cross_entropy", copies=1)
    assert rel_err(ours["2"][0], theirs["2"][0]) > 0.2


# -- 2: exact cases --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_single_datum_empirical_is_gradient_outer_product(bias, loss):
    """One datum: the gradient is ``δ āᵀ``, so ``g gᵀ = (δδᵀ) ⊗ (āāᵀ) = G ⊗ A`` exactly."""
    model = mlp(bias=bias)
    X, y = _data(loss, (3,), n=1)
    opt = KFAC(model, lr=0.0, momentum=0.0, decay=0.0)
    opt.zero_grad()
    batch_loss(loss, model(X), y).backward()
    opt.step()
    for name in opt.layer_names:
        module = dict(model.named_children())[name]
        g = layer_grad_vec(module)
        op = opt.curvature_operator(name)
        dense = torch.from_numpy(op @ torch.eye(g.numel(), dtype=torch.float64).numpy())
        torch.testing.assert_close(dense, torch.outer(g, g), rtol=1e-10, atol=1e-14)


@needs_curvlinops
@pytest.mark.parametrize("bias", [True, False])
def test_deep_linear_mse_type2_is_block_ggn(bias):
    """Sanity of the dense GGN reference: curvlinops' type-2 KFAC equals it exactly here."""
    model = deep_linear(bias=bias)
    X, y = _data("mse", (4,), n=7)
    y = y[:, :2]
    theirs = _curvlinops_factors(model, X, y, "mse", fisher_type="type-2")
    hessian = 2.0 / 2 * torch.eye(2, dtype=torch.float64)  # ℓ_n = (1/D)‖f − y‖², D = 2
    for name, (g, a) in theirs.items():
        torch.testing.assert_close(
            dense_kron(g, a), block_ggn(model, X, name, hessian=hessian), rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("bias", [True, False])
def test_deep_linear_mse_mc_average_approaches_block_ggn(bias):
    """Deep linear net + MSE: E[MC KFAC] = block-diagonal GGN; the mean of many draws is close."""
    model = deep_linear(bias=bias)
    X, y = _data("mse", (4,), n=7)
    y = y[:, :2]
    ours = _replicated_mc_factors(model, X, y, "mse", copies=4000, seed=3)
    hessian = torch.eye(2, dtype=torch.float64)  # 2/D with D = 2
    for name, (g, a) in ours.items():
        ggn = block_ggn(model, X, name, hessian=hessian)
        assert rel_err(dense_kron(g, a), ggn) < 0.05, (name, rel_err(dense_kron(g, a), ggn))


# -- gradient accumulation over micro-batches --------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "s2-p1"])
def test_gradient_accumulation_matches_full_batch(kind):
    """Two micro-batches, each ``loss/2`` backpropagated, then one step == one full-batch step.

    The standard accumulation recipe gives the full batch's gradient; the per-example scaling
    of the captured output gradients must then use the total number of examples that the
    step's statistics come from (here 6), not each forward's own batch size (3).
    """
    loss = "cross_entropy"
    model, shape = _model(kind)
    X, y = _data(loss, shape)
    full = kfac_factors(model, X, y, loss)

    opt = KFAC(model, lr=0.0, momentum=0.0, decay=0.0)
    opt.zero_grad()
    for chunk in (slice(0, 3), slice(3, 6)):
        (batch_loss(loss, model(X[chunk]), y[chunk]) / 2).backward()
    opt.step()
    for name, (g_full, a_full) in full.items():
        state = opt.curvature(name)
        torch.testing.assert_close(state.a, a_full, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state.g, g_full, rtol=1e-10, atol=1e-12)


class _Tied(nn.Module):
    """One Linear applied to T = 2 positions: in one call on (N, T, d), or in T calls."""

    def __init__(self, *, split: bool):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(3, 4).double()
        self.head = nn.Linear(8, 4).double()
        self.split = split

    def forward(self, x):  # x: (N, 2, 3)
        if self.split:
            h = torch.stack([self.shared(x[:, 0]), self.shared(x[:, 1])], dim=1)
        else:
            h = self.shared(x)
        return self.head(torch.tanh(h).flatten(1))


def test_layer_called_several_times_equals_one_weight_shared_call():
    """KFAC-expand: a layer applied at T positions in one call (rows ``N·T``, ``A`` over them,
    ``G`` summed over positions per example) is the same curvature as the layer called T
    times on the same N examples; ``G ⊗ A`` must not depend on how the calls are split."""
    X, y = _data("cross_entropy", (2, 3))
    one = kfac_factors(_Tied(split=False), X, y, "cross_entropy")
    two = kfac_factors(_Tied(split=True), X, y, "cross_entropy")
    for name in ("shared", "head"):
        torch.testing.assert_close(
            dense_kron(*two[name]), dense_kron(*one[name]), rtol=1e-10, atol=1e-12
        )
