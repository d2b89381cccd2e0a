"""Conv2d conventions of the torch adapter: im2col rows, output rows, unsupported options."""

from __future__ import annotations

import pytest
import torch
from _torch_models import conv_patches, one_thread
from torch import nn

from curvlin.adapters.torch import (
    KBFGS,
    KBFGSL,
    KFAC,
    Conv2dHandler,
    KFACPreconditioner,
    handler_for,
)
from curvlin.adapters.torch._layers import ConvRows
from curvlin.blocks import Rows


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


CONVS = [
    {"kernel_size": 3},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (2, 3), "stride": (2, 1), "padding": (0, 2), "dilation": (2, 1)},
    {"kernel_size": 3, "padding": 2, "dilation": 2, "bias": False},
    {"kernel_size": 3, "padding": "same"},
    {"kernel_size": (2, 4), "padding": "same"},  # even kernels: asymmetric padding
    {"kernel_size": (3, 2), "padding": "same", "dilation": (1, 3)},
    {"kernel_size": (3, 2), "padding": "valid", "stride": (1, 2)},
    {"kernel_size": 1, "stride": 3},
]


def _conv(kwargs, c_in=3, c_out=4):
    torch.manual_seed(0)
    return nn.Conv2d(c_in, c_out, **kwargs).double()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kwargs", CONVS, ids=str)
def test_input_rows_times_reshaped_weight_is_conv_output(kwargs):
    conv = _conv(kwargs)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    handler = handler_for(conv)
    assert isinstance(handler, Conv2dHandler)
    assert (handler.d_out, handler.d_in) == (4, conv.weight[0].numel())
    rows = handler.input_rows(x)
    out = conv(x)
    n, c_out, h, w = out.shape
    assert rows.shape == (n * h * w, handler.d_in)
    lin = rows @ conv.weight.reshape(c_out, -1).T
    if conv.bias is not None:
        lin = lin + conv.bias
    # rows are (example, h_out, w_out) in C order
    torch.testing.assert_close(
        lin.reshape(n, h, w, c_out).permute(0, 3, 1, 2), out, rtol=1e-12, atol=1e-12
    )
    # and they are the patches cut out independently by slicing
    torch.testing.assert_close(rows, conv_patches(x, conv).reshape(-1, handler.d_in))
    # output rows: the same (example, position) order, channels as columns
    out_rows = handler.output_rows(out)
    assert out_rows.shape == (n * h * w, c_out)
    torch.testing.assert_close(out_rows, lin, rtol=1e-12, atol=1e-12)
    assert handler.n_examples(x) == n
    torch.testing.assert_close(
        handler.weight_grad(conv.weight), conv.weight.reshape(c_out, -1), rtol=0, atol=0
    )


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kwargs", CONVS, ids=str)
def test_conv_rows_reductions_equal_those_of_the_patches(kwargs):
    conv = _conv(kwargs)
    x = torch.randn(5, 3, 9, 8, dtype=torch.float64)
    handler = handler_for(conv)
    patches = handler.input_rows(x)
    rows = handler.rows(x)
    assert isinstance(rows, ConvRows)
    assert rows.shape == tuple(patches.shape)
    assert rows.dtype == torch.float64
    v = torch.randn(patches.shape[1], dtype=torch.float64)
    w = torch.randn(patches.shape[0], dtype=torch.float64)
    close = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(rows.matvec(v), patches @ v, **close)
    torch.testing.assert_close(rows.rmatvec(w), w @ patches, **close)
    torch.testing.assert_close(rows.sum(), patches.sum(0), **close)
    torch.testing.assert_close(rows.gram(scale=0.5), 0.5 * patches.T @ patches, **close)
    # per-example products of examples 1…3 (one grouped weight gradient) against the patches'
    t = patches.shape[0] // 5
    delta = torch.randn(3, t, 4, dtype=torch.float64)
    want = delta.mT @ patches[t : 4 * t].view(3, t, -1)
    torch.testing.assert_close(rows.examples(1, 4, n=5).example_grads(delta), want, **close)
    torch.testing.assert_close(Rows(patches).examples(1, 4, n=5).example_grads(delta), want)
    assert torch.equal(rows.array(), patches)
    single = rows.astype(torch.float32)
    assert single.dtype == torch.float32
    assert single.matvec(v).dtype == torch.float32


@pytest.mark.parametrize("method", [KBFGS, KBFGSL])
def test_kbfgs_builds_no_batch_of_patches_whole(method, monkeypatch):
    # After the warm start (whose Gram matrix is built over chunks of examples), K-BFGS reads
    # a convolution's rows through products only: no patches at all.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 2))
    x, t = torch.randn(16, 3, 6, 6), torch.randn(16, 2)
    built = []
    patches = Conv2dHandler.patches
    monkeypatch.setattr(
        Conv2dHandler, "patches", lambda self, x: built.append(x.shape[0]) or patches(self, x)
    )
    opt = method(model, lr=0.01, check_every=1000)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), t)
        loss.backward()
        return loss

    opt.step(closure)
    assert built
    assert max(built) < 16
    built.clear()
    for _ in range(3):
        opt.step(closure)
    assert built == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": 2}, "groups=2"),
        ({"padding_mode": "reflect"}, "padding_mode='reflect'"),
        ({"padding_mode": "circular"}, "padding_mode='circular'"),
        ({"padding_mode": "replicate"}, "padding_mode='replicate'"),
    ],
)
@pytest.mark.parametrize("frontend", [KFAC, KFACPreconditioner])
def test_unsupported_conv_options_raise(kwargs, match, frontend):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, **kwargs), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(ValueError, match=match):
        frontend(model)
