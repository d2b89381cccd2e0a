"""Tiny torch models and independent dense references for the KFAC adapter tests.

Everything here is deliberately written without the library's handlers or hooks: layer inputs
are recomputed by running the ``nn.Sequential`` module by module, convolution patches are cut
out of the padded input by slicing (not ``F.unfold``), and per-example output gradients come
from ``torch.func.vmap(torch.func.grad(...))`` of each example's own loss ``ℓ_n``.

Conventions (those of ``curvlin.blocks.kfac``): factors ``[G, A]`` for row-major
``vec([W, b])``; ``A = (1/R) Σ_r ā_r ā_rᵀ`` over ``R = N·T`` rows, ``G = (1/N) Σ_r δ_r δ_rᵀ``
with per-example ``δ_r = ∂ℓ_n/∂s_r``.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from curvlin.adapters.torch import KFAC


@contextlib.contextmanager
def one_thread():
    """Run torch on one intra-op thread (restored afterwards).

    The tensors in these tests are tiny; on a busy machine torch's worker threads spin for
    cores other processes hold, which can make a 4 ms step take most of a second.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- models ---------------------------------------------------------------------------------


def curves_autoencoder(seed: int = 0) -> nn.Sequential:
    """The 144-64-16-64-144 Tanh autoencoder of the training tests (12×12 CURVES images)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(144, 64),
        nn.Tanh(),
        nn.Linear(64, 16),
        nn.Tanh(),
        nn.Linear(16, 64),
        nn.Tanh(),
        nn.Linear(64, 144),
    )


def mlp(*, bias: bool = True, d_in: int = 3, hidden: int = 5, d_out: int = 4, seed: int = 0):
    """``Linear - Tanh - Linear`` in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, d_out, bias=bias)
    ).double()


def deep_linear(*, bias: bool, dims=(4, 3, 3, 2), seed: int = 0):
    """A deep *linear* network (no nonlinearity) in float64."""
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(dims)]
    return nn.Sequential(*layers).double()


def cnn(*, in_shape=(2, 7, 6), c_out: int = 3, d_out: int = 4, seed: int = 0, **conv):
    """``Conv2d - Tanh - Flatten - Linear`` in float64; ``conv`` goes to ``nn.Conv2d``."""
    torch.manual_seed(seed)
    conv.setdefault("kernel_size", 3)
    layer = nn.Conv2d(in_shape[0], c_out, **conv)
    with torch.no_grad():
        flat = layer(torch.zeros(1, *in_shape)).numel()
    return nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(flat, d_out)).double()


# -- losses: batch loss as torch computes it, and one example's loss ℓ_n ---------------------


def batch_loss(name: str, out, y, *, reduction: str = "mean"):
    """The training loss of a batch: torch's reductions, and ``"batchmean"`` (sum / N)."""
    if reduction == "batchmean":
        return batch_loss(name, out, y, reduction="sum") / out.shape[0]
    if name == "cross_entropy":
        return F.cross_entropy(out, y, reduction=reduction)
    if name == "mse":
        return F.mse_loss(out, y, reduction=reduction)
    if name == "bce_with_logits":
        return F.binary_cross_entropy_with_logits(out, y, reduction=reduction)
    raise ValueError(name)


def example_loss(name: str, out_n, y_n, *, reduction: str = "mean"):
    """``ℓ_n`` of one example so that the batch loss is ``(1/N) Σ ℓ_n`` (or ``Σ ℓ_n``).

    For MSE and BCE with ``reduction="mean"`` torch also averages over the ``D`` outputs, so
    ``ℓ_n`` is the mean over them; with ``"sum"`` and ``"batchmean"`` it is their sum.
    """
    if name == "cross_entropy":
        return F.cross_entropy(out_n[None], y_n[None], reduction="sum")
    if name == "mse":
        per = (out_n - y_n) ** 2
    elif name == "bce_with_logits":
        per = F.binary_cross_entropy_with_logits(out_n, y_n, reduction="none")
    else:
        raise ValueError(name)
    return per.mean() if reduction == "mean" else per.sum()


def make_targets(name: str, n: int, d_out: int, *, generator=None, dtype=torch.float64):
    """Labels for the loss ``name``: class indices, real targets or probabilities."""
    if name == "cross_entropy":
        return torch.randint(0, d_out, (n,), generator=generator)
    if name == "mse":
        return torch.randn(n, d_out, generator=generator, dtype=dtype)
    return torch.rand(n, d_out, generator=generator, dtype=dtype)


# -- independent references ---------------------------------------------------------------


def conv_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """im2col by slicing the zero-padded input: shape (N, T, c_in·k_h·k_w).

    Column order ``(c_in, i, j)`` is that of ``conv.weight.reshape(c_out, -1)``; row order
    ``t = h_out · W_out + w_out`` is that of ``output.flatten(2)``.
    """
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = (0, 0, 0, 0)
        else:  # "same" (stride 1): total dilation·(k-1), the extra pixel on the right/bottom
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = conv.padding
        pads = (pw, pw, ph, ph)
    xp = F.pad(x, pads)
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = []
    for c in range(x.shape[1]):
        for i in range(kh):
            for j in range(kw):
                sl = xp[
                    :,
                    c,
                    i * dh : i * dh + sh * (h_out - 1) + 1 : sh,
                    j * dw : j * dw + sw * (w_out - 1) + 1 : sw,
                ]
                cols.append(sl.reshape(x.shape[0], -1))
    return torch.stack(cols, dim=-1)


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input rows ``a`` (without the 1) of a Linear or Conv2d, shape (N, T, d_in)."""
    if isinstance(module, nn.Conv2d):
        return conv_patches(x, module)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def reference_factors(model: nn.Sequential, X, y, loss: str, *, reduction: str = "mean"):
    """Empirical-Fisher KFAC factors ``{name: (G, A)}`` from dense per-example quantities.

    ``G = (1/N) Σ δδᵀ`` for a loss ``(1/N) Σ ℓ_n`` (``"mean"``, ``"batchmean"``) and
    ``G = Σ δδᵀ`` for ``Σ ℓ_n`` (``"sum"``: the curvature of the sum, spec §4).
    """
    from torch.func import grad, vmap

    out = {}
    h = X
    children = list(model.named_children())
    for idx, (name, module) in enumerate(children):
        if isinstance(module, nn.Linear | nn.Conv2d):
            rows = layer_rows(module, h)  # (N, T, d_in)
            n, t = rows.shape[0], rows.shape[1]
            if module.bias is not None:
                rows = torch.cat([rows, rows.new_ones(n, t, 1)], dim=-1)
            a = torch.einsum("nti,ntj->ij", rows, rows) / (n * t)
            s = module(h).detach()
            tail = nn.Sequential(*[m for _, m in children[idx + 1 :]])

            def ell(s_n, y_n, tail=tail):
                return example_loss(loss, tail(s_n[None])[0], y_n, reduction=reduction)

            delta = vmap(grad(ell))(s, y)  # (N, *s.shape[1:]), per-example ∂ℓ_n/∂s_n
            if isinstance(module, nn.Conv2d):
                delta = delta.flatten(2).transpose(1, 2)  # (N, T, c_out)
            delta = delta.reshape(n, -1, delta.shape[-1])
            g = torch.einsum("nti,ntj->ij", delta, delta)
            if reduction != "sum":  # the curvature of (1/N) Σ ℓ_n; of Σ ℓ_n for "sum"
                g = g / n
            out[name] = (g, a)
        h = module(h)
    return out


def block_ggn(model: nn.Sequential, X, name: str, *, hessian) -> torch.Tensor:
    """Dense GGN block ``(1/N) Σ_n J_nᵀ H J_n`` of layer ``name`` on row-major ``vec([W, b])``.

    ``hessian`` is the (D, D) output Hessian of ``ℓ_n`` (constant, e.g. MSE).
    """
    from torch.func import functional_call, jacrev

    module = dict(model.named_children())[name]
    keys = ["weight"] + (["bias"] if module.bias is not None else [])
    prefix = f"{name}."
    base = {k: v.detach() for k, v in model.named_parameters()}

    def f(*tensors):
        params = dict(base)
        params.update({prefix + k: t for k, t in zip(keys, tensors)})
        return functional_call(model, params, (X,))

    jac = jacrev(f, argnums=tuple(range(len(keys))))(*(getattr(module, k).detach() for k in keys))
    n, d = X.shape[0], jac[0].shape[1]
    jw = jac[0].reshape(n, d, module.weight.shape[0], -1)
    if len(keys) == 2:
        jw = torch.cat([jw, jac[1][..., None]], dim=-1)
    jmat = jw.reshape(n, d, -1)
    return torch.einsum("ndp,de,neq->pq", jmat, hessian, jmat) / n


# -- running the optimizer -----------------------------------------------------------------


def kfac_factors(model, X, y, loss_name: str, *, reduction: str = "mean", **kwargs):
    """One KFAC step with ``lr=0`` (parameters untouched) and its factors ``{name: (G, A)}``.

    ``kwargs`` go to :class:`KFAC`; with ``fisher="mc"`` its ``loss`` is ``loss_name``.
    """
    kwargs = {"lr": 0.0, "momentum": 0.0, "decay": 0.0, "loss_reduction": reduction, **kwargs}
    mc = kwargs.get("fisher") == "mc"
    if mc:
        kwargs["loss"] = loss_name
    opt = KFAC(model, **kwargs)
    opt.zero_grad()
    out = model(X)
    if mc:
        opt.backward_fisher(out)
    batch_loss(loss_name, out, y, reduction=reduction).backward()
    opt.step()
    opt.remove_hooks()
    return {name: (opt.curvature(name).g, opt.curvature(name).a) for name in opt.layer_names}


def layer_grad_vec(module: nn.Module) -> torch.Tensor:
    """Row-major ``vec([∇W, ∇b])`` of a Linear or Conv2d."""
    gw = module.weight.grad.reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        gw = torch.cat([gw, module.bias.grad[:, None]], dim=1)
    return gw.reshape(-1)


def dense_kron(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``G ⊗ A`` formed explicitly (tests only)."""
    return torch.kron(g.double(), a.double())


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ``‖x − ref‖ / ‖ref‖``."""
    x, ref = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float(torch.linalg.norm(x - ref) / max(float(torch.linalg.norm(ref)), math.ulp(1.0)))
