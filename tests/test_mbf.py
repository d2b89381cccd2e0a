"""MBF through the torch engine: statistics, directions and training against dense references.

The references take per-example gradients from ``torch.func.vmap(grad)``, form the dense
empirical Fisher ``(1/N) Σ_n vec γ_n vec γ_nᵀ`` of each layer's ``W̄ = [W, b]`` and solve its
diagonal blocks explicitly (float64). The core primitives are tested on every backend in
``tests/test_miniblock.py``; the shared fault, checkpoint and contract suites run MBF from
their method lists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from curvlin import Partition, conv_kernel_blocks, unit_blocks
from curvlin.adapters.torch import MBF, Preconditioner
from curvlin.blocks import LayerBatch, MBFBlock

DTYPE = torch.float64


def _per_example_wbar(model, layer, x, y, loss_fn):
    """Per-example gradients of ``layer``'s ``W̄ = [W.reshape(d_out, -1), b]``, (N, d_out·d_a)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    w = g[f"{layer}.weight"].reshape(len(x), model.get_submodule(layer).weight.shape[0], -1)
    if f"{layer}.bias" in g:
        w = torch.cat([w, g[f"{layer}.bias"][:, :, None]], dim=2)
    return w.reshape(len(x), -1).numpy()


def _mse(out, y):
    return ((out - y) ** 2).sum() / out.shape[0]  # summed over outputs, mean over the batch


def _conv_net(bias, **conv):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=bias, **conv),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(2, bias=bias),
    ).to(DTYPE)


CONVS = {
    "plain": {},
    "stride2-pad1": {"stride": 2, "padding": 1},
    "dilation2-pad2": {"dilation": 2, "padding": 2},
    "stride(2,1)-dil(1,2)": {"stride": (2, 1), "dilation": (1, 2), "padding": (0, 1)},
}


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_blocks_are_diagonal_blocks_of_dense_empirical_fisher(conv, bias, reduction):
    model = _conv_net(bias, **CONVS[conv])
    x = torch.randn(6, 2, 7, 8, dtype=DTYPE)
    y = torch.randn(6, 2, dtype=DTYPE)
    model(x)  # materialise the lazy layer
    opt = MBF(model, lr=0.0, damping=0.1, loss_reduction=reduction, max_block_size=4)
    loss = _mse(model(x), y) * (len(x) if reduction == "sum" else 1)
    loss.backward()
    opt.step()
    scale = 1.0 if reduction == "batchmean" else float(len(x))  # sum: Σ_n, not the mean
    for layer in ("0", "3"):
        grads = _per_example_wbar(model, layer, x, y, _mse)
        fisher = grads.T @ grads / len(x) * scale
        block = opt._curv.driver.blocks[layer]
        state = opt.curvature(layer)
        for g, got in zip(block.partition.groups, state.blocks):
            want = np.stack([fisher[np.ix_(i, i)] for i in g.index])
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-13)
    assert opt.curvature("0").blocks[0].shape == (3 * 2, 9, 9)  # kernel blocks


def test_first_direction_is_dense_block_solve():
    """Through the preconditioner: ∇ ← (blockdiag EF + λ)⁻¹ ∇, in vec(W̄) order."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(DTYPE)
    x, y = torch.randn(10, 5, dtype=DTYPE), torch.randn(10, 3, dtype=DTYPE)
    lam = 0.05
    whole = lambda name, h: (  # noqa: E731 - the second layer is one dense block
        Partition.from_index(3, 5, np.arange(15)[None]) if name == "2" else None
    )
    precond = Preconditioner(model, MBF, damping=lam, max_block_size=None, partition=whole)
    _mse(model(x), y).backward()
    g = {n: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for n, m in model.named_children()
         if isinstance(m, nn.Linear)}  # fmt: skip
    g = {n: v.detach().clone().reshape(-1).numpy() for n, v in g.items()}
    assert precond.step()
    for name, parts in (("0", unit_blocks(4, 5)), ("2", None)):
        grads = _per_example_wbar(model, name, x, y, _mse)
        fisher = grads.T @ grads / len(x)
        m = model.get_submodule(name)
        got = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).reshape(-1).numpy()
        if parts is None:  # one block: the dense layer solve
            want = np.linalg.solve(fisher + lam * np.eye(len(fisher)), g[name])
        else:
            want = np.empty_like(got)
            for idx in parts.groups[0].index:
                block = fisher[np.ix_(idx, idx)] + lam * np.eye(len(idx))
                want[idx] = np.linalg.solve(block, g[name][idx])
        np.testing.assert_allclose(got, want, rtol=1e-9)


def test_sequence_rows_are_grouped_by_example():
    """A Linear on (N, L, d) inputs: the per-example gradient sums over the L tokens."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 2), nn.Flatten(), nn.Linear(8, 1)).to(DTYPE)
    x, y = torch.randn(5, 4, 3, dtype=DTYPE), torch.randn(5, 1, dtype=DTYPE)
    opt = MBF(model, lr=0.0, max_block_size=None)
    _mse(model(x), y).backward()
    opt.step()
    grads = _per_example_wbar(model, "0", x, y, _mse)
    fisher = grads.T @ grads / len(x)
    got = opt.curvature("0").blocks[0].numpy()
    want = np.stack([fisher[:4, :4], fisher[4:, 4:]])
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_ema_and_large_damping_limit():
    rng = np.random.default_rng(0)
    p = conv_kernel_blocks(2, 2, 2, 2)
    block = MBFBlock(2, 8, bias=True, partition=p, decay=0.7)
    state = block.init(np.zeros(0))
    seen = []
    for _ in range(3):
        batch = LayerBatch(
            inputs=rng.standard_normal((12, 8)),
            output_grads=rng.standard_normal((4, 3, 2)) / 4,  # (N, T, d_out), autograd's δ/N
            n_examples=4,
            grad_scale=4.0,
        )
        stats = block.statistics(state, batch)
        seen.append(stats)
        state = block.fold(state, stats)
    want = seen[0]["m0"]
    for s in seen[1:]:
        want = 0.7 * want + 0.3 * s["m0"]
    np.testing.assert_allclose(state.blocks[0], want, rtol=1e-13)
    assert state.updates == 3
    big = block.refresh(state, damping=1e9)
    gw, gb = rng.standard_normal((2, 8)), rng.standard_normal(2)
    dw, db = block.precondition(big, gw, gb)
    np.testing.assert_allclose(dw * 1e9, gw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db * 1e9, gb, rtol=1e-6, atol=1e-7)


def test_dead_channels_give_finite_steps():
    """A dead ReLU channel and an all-zero input channel: zero blocks, finite steps."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    with torch.no_grad():
        model[0].bias[1] = -1e3  # output channel 1 never fires
    x = torch.randn(8, 2, 6, 6)
    x[:, 0] = 0.0  # input channel 0 is dead
    y = torch.randn(8, 2)
    opt = MBF(model, lr=0.1, damping=1e-3)
    for _ in range(3):
        opt.zero_grad()
        _mse(model(x), y).backward()
        opt.step()
    assert opt.skipped_steps == 0
    m = opt.curvature("0").blocks[0].reshape(3, 2, 9, 9)
    assert torch.all(m[1] == 0)  # dead output channel
    assert torch.all(m[:, 0] == 0)  # dead input channel
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sampled_fisher_option():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = MBF(model, lr=0.1, fisher="mc", loss="cross_entropy")
    first = None
    for _ in range(20):
        opt.zero_grad()
        out = model(x)
        opt.backward_fisher(out)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert F.cross_entropy(model(x), y).item() < first
    with pytest.raises(ValueError, match="fisher='mc' needs loss"):
        MBF(model, fisher="mc")


def test_trains_a_small_cnn():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 16, 3),
    )  # fmt: skip
    x = torch.randn(64, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()
    opt = MBF(model, lr=0.1, damping=1e-2, momentum=0.9)
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < 0.5 * first


def test_options_are_checked():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="max_block_size must be a positive int or None"):
        MBF(model, max_block_size=0)
    with pytest.raises(ValueError, match="decay must be in"):
        MBF(model, decay=1.0)
    with pytest.raises(TypeError, match="partition must be a callable"):
        MBF(model, partition="unit")
    with pytest.raises(TypeError, match=r"must return a curvlin\.Partition"):
        MBF(model, partition=lambda name, h: "unit")
    with pytest.raises(ValueError, match="partition is for"):
        MBF(model, partition=lambda name, h: unit_blocks(3, 3))
    with pytest.raises(TypeError, match=r"partition must be a curvlin\.Partition"):
        MBFBlock(2, 3, bias=True)
