"""The checkpoint suite: every curvlin optimizer resumes bit for bit, and refuses bad checkpoints.

Runs over :data:`_methods.METHODS`; a new method joins by being added there.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from _methods import METHODS, assert_same, batches, roundtrip
from _torch_models import cnn, mlp, one_thread
from torch import nn


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _model(kind, dtype, seed=0):
    model = (mlp(seed=seed) if kind == "mlp" else cnn(seed=seed)).to(dtype)
    return model, (3,) if kind == "mlp" else (2, 7, 6)


@pytest.mark.parametrize("method", METHODS, ids=str)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_resume_is_bit_exact(method, kind, dtype):
    model, shape = _model(kind, dtype)
    data = batches(shape, 8, dtype=dtype)
    opt = method.make(model, seed=7) if "kfac" in method.name else method.make(model)
    for x, t in data[:4]:
        method.step(opt, model, x, t)
    saved_opt, saved_model = roundtrip(opt.state_dict()), roundtrip(model.state_dict())
    for x, t in data[4:]:
        method.step(opt, model, x, t)

    fresh, _ = _model(kind, dtype, seed=123)  # other weights, other sampling seed
    opt2 = method.make(fresh, seed=99) if "kfac" in method.name else method.make(fresh)
    fresh.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for x, t in data[4:]:
        method.step(opt2, fresh, x, t)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert_same(opt.state_dict(), opt2.state_dict())
    # the curvature keeps its own dtype (torch would cast it to the parameters')
    for name in opt.layer_names:
        for value in opt2.curvature(name).arrays().values():
            assert value.dtype in (dtype, torch.bool)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_a_live_state_dict_loaded_elsewhere_shares_no_buffer(method):
    """Folds update the factors in place: a second optimizer loaded straight from the first's
    ``state_dict`` (no copy through a file) must own its buffers, so both continue alike."""
    model, shape = _model("mlp", torch.float64)
    data = batches(shape, 6)
    opt = method.make(model)
    for x, t in data[:3]:
        method.step(opt, model, x, t)
    twin, _ = _model("mlp", torch.float64, seed=123)
    twin.load_state_dict(model.state_dict())
    opt2 = method.make(twin)
    opt2.load_state_dict(opt.state_dict())
    for x, t in data[3:]:
        method.step(opt, model, x, t)
        method.step(opt2, twin, x, t)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert_same(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_half_precision_model_keeps_float32_curvature_through_a_checkpoint(method):
    model = mlp().to(torch.bfloat16)
    opt = method.make(model)
    (x, t), *_ = batches((3,), 1, dtype=torch.bfloat16)
    method.step(opt, model, x, t)
    opt2 = method.make(model)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    for name in opt.layer_names:
        for value in opt2.curvature(name).arrays().values():
            assert value.dtype in (torch.float32, torch.bool)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_state_dict_loads_with_weights_only_and_holds_no_objects(method):
    model, shape = _model("mlp", torch.float64)
    opt = method.make(model)
    x, t = batches(shape, 1)[0]
    method.step(opt, model, x, t)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # raises on anything that would run code
    opt.load_state_dict(loaded)


class _Payload:
    def __reduce__(self):
        return (print, ("a checkpoint ran code",))


@pytest.mark.parametrize("method", [m for m in METHODS if m.name in ("kfac", "kbfgs")], ids=str)
def test_a_checkpoint_carrying_a_pickled_object_is_refused(method):
    model, shape = _model("mlp", torch.float64)
    opt = method.make(model)
    x, t = batches(shape, 1)[0]
    method.step(opt, model, x, t)
    bad = opt.state_dict()
    bad["curvlin"]["payload"] = _Payload()
    buf = io.BytesIO()
    torch.save(bad, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf, weights_only=True)
    before = roundtrip(opt.state_dict())
    with pytest.raises(TypeError, match="payload"):  # and if loaded by other means
        opt.load_state_dict(bad)
    assert_same(before, opt.state_dict())


def _corrupt(sd, how, layer):
    arrays = sd["curvlin"]["driver"]["layers"][layer]["arrays"]
    counters = sd["curvlin"]["driver"]["layers"][layer]["counters"]
    if (not arrays and how in ("nan", "shape", "dtype", "missing")) or (
        not counters and how == "counter"
    ):
        pytest.skip(
            f"the method keeps no per-layer {'counters' if how == 'counter' else 'buffers'}"
        )
    key = next(iter(arrays), "bogus")
    if how == "nan":
        arrays[key] = arrays[key].clone()
        arrays[key][(0,) * arrays[key].ndim] = float("nan")
    elif how == "shape":
        arrays[key] = torch.zeros(*(s + 1 for s in arrays[key].shape), dtype=arrays[key].dtype)
    elif how == "dtype":
        arrays[key] = arrays[key].to(torch.float16)
    elif how == "missing":
        del arrays[key]
    elif how == "unknown":
        arrays["bogus"] = arrays.get(key, torch.zeros(1))
    elif how == "counter":
        counters[next(iter(counters))] = -1
    elif how == "momentum":
        slot = next(iter(sd["state"].values()))
        slot["momentum_buffer"] = torch.zeros(7, dtype=torch.float64)
    elif how == "method":
        sd["curvlin"]["method"] = "Other"
    elif how == "format":
        sd["curvlin"]["format"] = 99
    return key


@pytest.mark.parametrize("method", METHODS, ids=str)
@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("nan", "holds NaN or inf"),
        ("shape", "has shape"),
        ("dtype", "has dtype"),
        ("missing", "missing buffer|do not form"),
        ("unknown", "unknown buffers"),
        ("counter", "must be an int >= 0"),
        ("momentum", "momentum_buffer"),
        ("method", "is from 'Other'"),
        ("format", "format"),
    ],
)
def test_corrupted_checkpoint_is_refused_naming_the_buffer_and_changes_nothing(method, how, match):
    model, shape = _model("mlp", torch.float64)
    opt = method.make(model)
    for x, t in batches(shape, 2):
        method.step(opt, model, x, t)
    sd = roundtrip(opt.state_dict())
    layer = opt.layer_names[0]  # "0" (a layer) or "0.weight" (a parameter)
    key = _corrupt(sd, how, layer)
    before = roundtrip(opt.state_dict())
    with pytest.raises(ValueError, match=match) as info:
        opt.load_state_dict(sd)
    if how in ("nan", "shape", "dtype"):
        assert repr(layer) in str(info.value)
        assert repr(key) in str(info.value)
    assert_same(before, opt.state_dict())


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_checkpoint_of_another_model_is_refused(method):
    model, shape = _model("mlp", torch.float64)
    opt = method.make(model)
    x, t = batches(shape, 1)[0]
    method.step(opt, model, x, t)
    wider = mlp(hidden=6)
    other = method.make(wider)
    before = roundtrip(other.state_dict())
    with pytest.raises(ValueError, match=r"'0\.weight'.*shape|layer '0'.*shape") as info:
        other.load_state_dict(roundtrip(opt.state_dict()))
    assert "expected" in str(info.value)
    assert_same(before, other.state_dict())
    deeper = nn.Sequential(*mlp(), nn.Linear(4, 4)).double()
    with pytest.raises(ValueError, match="another model"):
        method.make(deeper).load_state_dict(roundtrip(opt.state_dict()))


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_checkpoint_of_another_method_is_refused(method):
    other = next(m for m in METHODS if m.build is not method.build)  # another optimizer class
    model, shape = _model("mlp", torch.float64)
    opt = method.make(model)
    x, t = batches(shape, 1)[0]
    method.step(opt, model, x, t)
    target = other.make(model)
    before = roundtrip(target.state_dict())
    mine, theirs = type(opt).__name__, type(target).__name__
    with pytest.raises(ValueError, match=f"is from '{mine}', not '{theirs}'"):
        target.load_state_dict(roundtrip(opt.state_dict()))
    assert_same(before, target.state_dict())
    with pytest.raises(ValueError, match="no 'curvlin' entry"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_fallback_optimizer_state_resumes_bit_exact(method):
    def make(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4))
        return model.double()

    data = batches((3,), 6)
    model = make(0)
    if method.per_parameter:  # no fallback: the norm's parameters have curvature
        fallback = {}
    else:
        fallback = {"unsupported": lambda ps: torch.optim.AdamW(ps, lr=1e-2)}
    opt = method.make(model, **fallback)
    for x, t in data[:3]:
        method.step(opt, model, x, t)
    if not method.per_parameter:
        assert any("exp_avg" in slot for slot in opt.state_dict()["state"].values())
    saved, saved_model = roundtrip(opt.state_dict()), roundtrip(model.state_dict())
    for x, t in data[3:]:
        method.step(opt, model, x, t)
    fresh = make(1)
    fresh.load_state_dict(saved_model)
    opt2 = method.make(fresh, **fallback)
    opt2.load_state_dict(saved)
    for x, t in data[3:]:
        method.step(opt2, fresh, x, t)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
