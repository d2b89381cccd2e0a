"""The K-BFGS / K-BFGS(L) core blocks (``curvlin.blocks.kbfgs``): spec/kbfgs.md T10–T15.

The block sequences are checked against :class:`_Reference`, an independent dense float64
NumPy implementation of one layer's K-BFGS iteration (spec/kbfgs.md §2–§5) written out here
from the formulas; it does not call curvlin. Every test that takes ``xp`` runs on every
backend: float64 against the reference tightly, float32 loosely.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np
import pytest
from _helpers import assert_close, random_spd

from curvlin.blocks import KBFGSBlock, KBFGSLBlock, KBFGSState
from curvlin.quasi_newton import LBFGSState

LAM = 0.3


def _spd(rng, d, scale=1.0):
    q = rng.standard_normal((d, d))
    return scale * (q @ q.T / d + 0.5 * np.eye(d))


# -- the independent reference ----------------------------------------------------------------


def _bfgs_product_form(h, s, y):
    """``H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ``, ``ρ = 1/(sᵀy)`` (spec §3), dense."""
    rho = 1.0 / (s @ y)
    left = np.eye(len(s)) - rho * np.outer(s, y)
    return left @ h @ left.T + rho * np.outer(s, s)


def _two_loop(pairs, v):
    """L-BFGS ``H v`` from ``H⁰ = I`` and ``pairs`` (oldest first): Nocedal & Wright Alg. 7.4."""
    q = np.array(v, dtype=np.float64, copy=True)
    alphas = []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (s @ y)
        q = q - np.multiply.outer(y, alpha)
        alphas.append(alpha)
    r = q
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        beta = (y @ r) / (s @ y)
        r = r + np.multiply.outer(s, alpha - beta)
    return r


class _Reference:
    """One layer of K-BFGS (``memory=None``) or K-BFGS(L), dense float64, after spec/kbfgs.md.

    The defaults are the spec's (§7): ``μ1 = 0.2``, ``β_A = 0.9``, pair EMA 0.9, skip constant
    1e-4, and ``λ_A = μ2 = √λ``. ``events`` counts which branches the run took, so that a test
    can check the data really exercised them.
    """

    def __init__(
        self,
        d_out,
        d_in,
        *,
        bias=True,
        memory=None,
        a_update="ema",
        a_decay=0.9,
        pair_decay=0.9,
        mu1=0.2,
        variant="convex",
        skip_threshold=1e-4,
        lam=LAM,
    ):
        self.d_out, self.d_in, self.bias, self.memory = d_out, d_in, bias, memory
        self.a_update, self.a_decay, self.pair_decay = a_update, a_decay, pair_decay
        self.mu1, self.variant, self.skip = mu1, variant, skip_threshold
        self.lam_a = self.mu2 = math.sqrt(lam)
        self.d_a = d_in + int(bias)
        self.h_a = np.eye(self.d_a)
        self.h_g = np.eye(d_out) if memory is None else None
        self.pairs = []  # K-BFGS(L): accepted damped pairs, oldest first
        self.a = None
        self.first = True
        self.s_bar = np.zeros(d_out)
        self.y_bar = np.zeros(d_out)
        self.events = Counter()

    def _x_bar(self, x):
        x = np.asarray(x, dtype=np.float64)
        return np.concatenate([x, np.ones((len(x), 1))], axis=1) if self.bias else x

    def _apply_h_g(self, v):
        return self.h_g @ v if self.memory is None else _two_loop(self.pairs, v)

    def update_a(self, x, n):
        """§2 step 3: ``A ← βA + (1 − β)(1/n) X̄ᵀX̄``; the first call sets ``A`` and
        ``H_a = (A + √λ I)⁻¹``."""
        xb = self._x_bar(x)
        a_batch = xb.T @ xb / n
        if self.first:
            self.first = False
            self.a = a_batch
            self.h_a = np.linalg.inv(a_batch + self.lam_a * np.eye(self.d_a))
        elif self.a_update == "ema":
            self.a = self.a_decay * self.a + (1.0 - self.a_decay) * a_batch

    def direction(self, grad_w, grad_b):
        """§2 step 4: ``P = H_g M H_a`` with ``M = [grad_w, grad_b]``."""
        m = np.asarray(grad_w, dtype=np.float64)
        if self.bias:
            m = np.concatenate([m, np.asarray(grad_b, dtype=np.float64)[:, None]], axis=1)
        return self._apply_h_g(m) @ self.h_a

    def _double_damping(self, s, y):
        """§5: Powell on ``H_g`` (``s`` moves towards ``H_g y``), then LM (DD-v1 or DD-v2)."""
        hy = self._apply_h_g(y)
        yhy = y @ hy
        if yhy > 0 and s @ y < self.mu1 * yhy:
            theta1 = (1.0 - self.mu1) * yhy / (yhy - s @ y)
            s = theta1 * s + (1.0 - theta1) * hy
            self.events["powell"] += 1
        if self.variant == "additive":
            y = y + self.mu2 * s
        elif s @ y < self.mu2 * (s @ s):
            theta2 = (1.0 - self.mu2) * (s @ s) / (s @ s - s @ y)
            y = theta2 * y + (1.0 - theta2) * s
            self.events["lm"] += 1
        return s, y

    def update_g(self, h, h_plus, g, g_plus, g_mean):
        """§2 step 6 / §4: pair EMA, double damping of a copy, skip rules, BFGS or L-BFGS."""
        s = np.mean(np.asarray(h, np.float64) - h_plus, axis=0)
        y = np.mean(np.asarray(g, np.float64) - g_plus, axis=0)
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(y))):
            self.events["nonfinite"] += 1
            return
        c = self.pair_decay
        self.s_bar = c * self.s_bar + (1.0 - c) * s
        self.y_bar = c * self.y_bar + (1.0 - c) * y
        if not (np.any(self.s_bar != 0) and np.any(self.y_bar != 0)):
            self.events["dead"] += 1  # no curvature information: H_g is left alone
            return
        s_d, y_d = self._double_damping(self.s_bar, self.y_bar)
        sty, sts = s_d @ y_d, s_d @ s_d
        if sty <= 0 or sty <= self.skip * np.linalg.norm(g_mean) * sts:
            self.events["skip_g"] += 1
            return
        if self.memory is None:
            new = _bfgs_product_form(self.h_g, s_d, y_d)
            if not np.all(np.isfinite(new)):
                self.events["skip_g"] += 1
                return
            self.h_g = new
        else:
            self.pairs.append((s_d, y_d))
            if len(self.pairs) > self.memory:
                del self.pairs[0]
                self.events["evict"] += 1
        self.events["accept_g"] += 1

    def update_h_a(self, x, n):
        """§2 step 7 / §3 (A-ii), (A-iii): ``s_a = H_a u``, ``y_a = (A + √λ I) s_a``, BFGS."""
        xb = self._x_bar(x)
        u = xb.mean(axis=0)  # with a bias its last entry is 1
        a = self.a if self.a_update == "ema" else xb.T @ xb / n
        s_a = self.h_a @ u
        y_a = (a + self.lam_a * np.eye(self.d_a)) @ s_a
        if s_a @ y_a <= self.skip * np.linalg.norm(u) * (s_a @ s_a):
            self.events["skip_a"] += 1
            return
        self.h_a = _bfgs_product_form(self.h_a, s_a, y_a)
        self.events["accept_a"] += 1


# -- sequences ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    x: np.ndarray
    n: int
    grad_w: np.ndarray
    grad_b: np.ndarray | None
    h: np.ndarray
    h_plus: np.ndarray
    g: np.ndarray
    g_plus: np.ndarray
    g_mean: np.ndarray


#: Kinds of iterations: "normal" (``y ≈ B s``, B SPD), "negative" (``y ≈ −B s``: Powell must
#: repair it), "dead" (the layer did not move, ``s = 0``), "nan" (a non-finite pre-activation),
#: "skip" (``‖ḡ‖`` so large that the curvature threshold rejects the pair), "flat" (a large
#: step along which ``y ≈ 0.02 s``: LM damping must raise the curvature to ``μ2``).
KINDS = ("dead", "normal", "negative", "normal", "nan", "normal", "skip", "dead", "flat")
KINDS += ("flat", "negative", "normal", "normal")


def _steps(rng, d_out, d_in, *, bias=True, m=12, positions=1, kinds=KINDS):
    rows = m * positions  # a convolution's im2col rows: A is a sum over the positions
    # One curvature for the run, so that the pairs agree. Its eigenvalues span [0.1, 8]: the
    # small ones (< μ2 = √0.3) call for LM damping, the large ones (> 1/μ1 = 5) for Powell's.
    b = random_spd(rng, d_out, cond=80.0, scale=0.1)
    out = []
    for kind in kinds:
        x = rng.standard_normal((rows, d_in)) + 0.5
        h = rng.standard_normal((rows, d_out))
        g = rng.standard_normal((rows, d_out))
        dh = (1.0 if kind == "flat" else 0.1) * rng.standard_normal((rows, d_out))
        h_plus = h.copy() if kind == "dead" else h - dh
        dg = {"negative": -dh @ b, "flat": 0.02 * dh}.get(kind, dh @ b)
        g_plus = g - dg
        if kind == "nan":
            h_plus[1, 0] = np.nan
        g_mean = g.mean(axis=0) * (1e6 if kind == "skip" else 1.0)
        grad_b = rng.standard_normal(d_out) if bias else None
        grad_w = rng.standard_normal((d_out, d_in))
        out.append(_Step(x, m, grad_w, grad_b, h, h_plus, g, g_plus, g_mean))
    return out


def _as_float32(steps):
    """The same steps rounded to float32 (as a float32 run sees them), held in float64."""

    def rounded(v):
        return (
            v if v is None or isinstance(v, int) else np.asarray(v, np.float32).astype(np.float64)
        )

    return [_Step(*(rounded(getattr(st, f.name)) for f in fields(_Step))) for st in steps]


def _run_reference(ref, steps):
    """The reference's state after every step, with the direction computed in that step."""
    out = []
    for st in steps:
        ref.update_a(st.x, st.n)
        p = ref.direction(st.grad_w, st.grad_b)
        ref.update_g(st.h, st.h_plus, st.g, st.g_plus, st.g_mean)
        ref.update_h_a(st.x, st.n)
        snap = {"p": p, "h_a": ref.h_a, "s_bar": ref.s_bar, "y_bar": ref.y_bar}
        if ref.a_update == "ema":
            snap["a"] = ref.a
        if ref.memory is None:
            snap["h_g"] = ref.h_g
        else:
            snap["pairs"] = list(ref.pairs)
        out.append(snap)
    return out


def _run_block(block, steps, to_xp, to_np, dtype):
    """The block's state after every step (NumPy copies), in the same form."""

    def conv(v):
        return to_xp(v, dtype)

    state = block.init(conv(np.zeros(1)))
    out = []
    for st in steps:
        x = conv(st.x)
        state = block.update_a(state, x, n_examples=st.n, damping=LAM)
        dw, db = block.precondition(
            state, conv(st.grad_w), None if st.grad_b is None else conv(st.grad_b)
        )
        assert dw.dtype == x.dtype
        p = to_np(dw) if db is None else np.concatenate([to_np(dw), to_np(db)[:, None]], axis=1)
        s, y = block.pair(conv(st.h), conv(st.h_plus), conv(st.g), conv(st.g_plus))
        state = block.update_g(state, s, y, conv(st.g_mean), damping=LAM)
        state = block.update_h_a(state, x, n_examples=st.n, damping=LAM)
        arrays = {k: to_np(v) for k, v in state.arrays().items()}
        snap = {
            "p": p,
            **{k: arrays[k] for k in ("h_a", "s_bar", "y_bar", "a", "h_g") if k in arrays},
        }
        if "lbfgs_valid" in arrays:
            valid = arrays["lbfgs_valid"]
            # LBFGSState: rows by age, oldest first; the filled slots are the last ones.
            assert np.all(valid[: len(valid) - valid.sum()] == 0)
            snap["pairs"] = list(zip(arrays["lbfgs_s"][valid], arrays["lbfgs_y"][valid]))
            np.testing.assert_allclose(
                arrays["lbfgs_rho"][valid],
                [1.0 / float(np.dot(s_, y_)) for s_, y_ in snap["pairs"]],
                rtol=1e-5 if dtype == "float32" else 1e-12,
            )
        out.append(snap)
    return out


#: name: (block class, options shared by block and reference, sequence options). The reference
#: gets the spec's defaults for everything else, so the blocks' defaults are checked as well.
CONFIGS = {
    "dense-ema": (KBFGSBlock, {}, {}),
    "dense-ema-conv": (KBFGSBlock, {}, {"positions": 4, "m": 5}),
    "dense-minibatch-additive": (KBFGSBlock, {"a_update": "minibatch", "variant": "additive"}, {}),
    "dense-nobias-no-pair-ema": (
        KBFGSBlock,
        {"bias": False, "pair_decay": 0.0, "a_decay": 0.5},
        {},
    ),
    "lbfgs-minibatch-compact": (KBFGSLBlock, {"memory": 3}, {}),
    "lbfgs-ema-two-loop": (
        KBFGSLBlock,
        {"memory": 3, "a_update": "ema", "lbfgs_method": "two-loop"},
        {},
    ),
    "lbfgs-additive-conv-nobias": (
        KBFGSLBlock,
        {"memory": 2, "variant": "additive", "bias": False},
        {"positions": 3, "m": 6},
    ),
}
DIMS = {"dense-ema-conv": (2, 5), "lbfgs-additive-conv-nobias": (4, 3)}


def _config(name):
    """The block, a fresh reference and the steps (the same data on every backend)."""
    cls, options, seq = CONFIGS[name]
    d_out, d_in = DIMS.get(name, (3, 4))
    block = cls(d_out, d_in, **options)
    ref_options = {k: v for k, v in options.items() if k != "lbfgs_method"}
    if cls is KBFGSLBlock:  # its documented defaults: p = 100, minibatch Hessian action
        ref_options = {"memory": 100, "a_update": "minibatch", **ref_options}
    ref = _Reference(d_out, d_in, **ref_options)
    rng = np.random.default_rng(sum(ord(c) * (i + 1) for i, c in enumerate(name)))
    steps = _steps(rng, d_out, d_in, bias=options.get("bias", True), **seq)
    return block, ref, steps


#: float64: the reference forms the products and the inverse differently, so only roundoff
#: separates the two (observed: up to 2e-14); float32: the float32 run against float64 on the
#: rounded data (observed: up to 6e-6). Relative to the largest entry as well as elementwise.
RTOL = {"float64": 1e-11, "float32": 3e-4}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", CONFIGS)
def test_sequence_matches_dense_reference(name, dtype, xp, to_xp, to_np):
    """T14/T15: every step's ``A``, ``H_a``, ``H_g`` (or the L-BFGS pairs), EMAs and direction
    equal the dense float64 reference's, on every backend."""
    block, ref, steps = _config(name)
    if dtype == "float32":
        steps = _as_float32(steps)
    expected = _run_reference(ref, steps)
    got = _run_block(block, steps, to_xp, to_np, dtype)
    rtol = RTOL[dtype]
    for k, (want, have) in enumerate(zip(expected, got)):
        assert set(have) == set(want), k
        for key, value in want.items():
            what = f"{name} {dtype}, step {k} ({KINDS[k]}): {key}"
            if key != "pairs":
                assert_close(have[key], value, rtol=rtol, what=what)
                continue
            assert len(have[key]) == len(value), what
            for (s, y), (s_ref, y_ref) in zip(have[key], value):
                assert_close(s, s_ref, rtol=rtol, what=f"{what} s")
                assert_close(y, y_ref, rtol=rtol, what=f"{what} y")


@pytest.mark.parametrize("name", CONFIGS)
def test_reference_sequences_exercise_every_branch(name):
    """The data of the reference comparison take every branch of the iteration."""
    _, ref, steps = _config(name)
    _run_reference(ref, steps)
    events = ref.events
    assert events["nonfinite"] == 1
    assert events["dead"] >= 1
    assert events["skip_g"] >= 1
    assert events["accept_g"] >= 5
    assert events["powell"] >= 1
    assert events["accept_a"] >= 5
    if ref.variant == "convex":
        assert events["lm"] >= 1
    if ref.memory is not None:
        assert events["evict"] >= 1
    # The float32 data take the same branches.
    ref32 = _config(name)[1]
    _run_reference(ref32, _as_float32(steps))
    assert ref32.events == events


def test_reference_lbfgs_equals_dense_bfgs(rng):
    """The reference's two-loop recursion is dense BFGS from ``I`` on the same pairs (T8), and
    its BFGS update satisfies the secant equation (T3)."""
    d = 5
    b = _spd(rng, d)
    h, pairs = np.eye(d), []
    for _ in range(4):
        s = rng.standard_normal(d)
        y = b @ s
        h = _bfgs_product_form(h, s, y)
        np.testing.assert_allclose(h @ y, s, rtol=1e-12)
        pairs.append((s, y))
    v = rng.standard_normal((d, 3))
    np.testing.assert_allclose(_two_loop(pairs, v), h @ v, rtol=1e-12)
    np.testing.assert_allclose(_two_loop(pairs, v[:, 0]), h @ v[:, 0], rtol=1e-12)


@pytest.mark.parametrize("a_update", ["ema", "minibatch"])
def test_h_a_skip_rule_matches_reference(a_update, xp, to_xp, to_np, rng):
    """T10 for ``H_a``: ``s_aᵀy_a <= c‖u‖ s_aᵀs_a`` leaves ``H_a`` bit-identical; with ``c``
    10% below the reference's threshold value the update is the reference's."""
    m, d_in, d_out = 10, 3, 2
    x0, x1 = rng.standard_normal((m, d_in)) + 0.5, rng.standard_normal((m, d_in)) - 0.3
    probe = _Reference(d_out, d_in, a_update=a_update)
    probe.update_a(x0, m)
    probe.h_a = probe.h_a + 0.3 * np.eye(d_in + 1)  # not a fixed point
    probe.update_a(x1, m)
    xb = np.concatenate([x1, np.ones((m, 1))], axis=1)
    u = xb.mean(axis=0)
    a = probe.a if a_update == "ema" else xb.T @ xb / m
    s_a = probe.h_a @ u
    ratio = (s_a @ (a + math.sqrt(LAM) * np.eye(d_in + 1)) @ s_a) / (s_a @ s_a) / np.linalg.norm(u)
    for factor, skipped in ((1.1, True), (0.9, False)):
        c = factor * ratio
        ref = _Reference(d_out, d_in, a_update=a_update, skip_threshold=c)
        block = KBFGSBlock(d_out, d_in, a_update=a_update, skip_threshold=c)
        state = block.update_a(block.init(to_xp(np.zeros(1))), to_xp(x0), n_examples=m, damping=LAM)
        ref.update_a(x0, m)
        state = KBFGSState.from_arrays(
            {**state.arrays(), "h_a": to_xp(probe.h_a)}, {"a_updates": 1, "g_updates": 0}
        )
        ref.h_a = probe.h_a.copy()
        state = block.update_a(state, to_xp(x1), n_examples=m, damping=LAM)
        ref.update_a(x1, m)
        new = block.update_h_a(state, to_xp(x1), n_examples=m, damping=LAM)
        ref.update_h_a(x1, m)
        assert ref.events["skip_a" if skipped else "accept_a"] == 1
        if skipped:
            np.testing.assert_array_equal(to_np(new.h_a), to_np(state.h_a))
        else:
            assert not np.allclose(ref.h_a, probe.h_a)
            assert_close(new.h_a, ref.h_a, rtol=1e-10, what="H_a")


@pytest.mark.parametrize("bias", [True, False])
def test_descent_and_shape(bias, xp, to_xp, to_np, rng):
    """T13: ``P.shape == W̄.shape`` and ``⟨M, P⟩ > 0`` for SPD factors; identity factors: P = M."""
    block = KBFGSBlock(5, 4, bias=bias)
    state = block.init(to_xp(np.zeros(1)))
    grad_w = rng.standard_normal((5, 4))
    grad_b = rng.standard_normal(5) if bias else None
    dw, db = block.precondition(state, to_xp(grad_w), None if grad_b is None else to_xp(grad_b))
    np.testing.assert_array_equal(to_np(dw), grad_w)  # H_g = I, H_a = I: plain (momentum) SGD
    if bias:
        np.testing.assert_array_equal(to_np(db), grad_b)
    else:
        assert db is None
    d_a = 4 + int(bias)
    for _ in range(5):
        h_a, h_g = _spd(rng, d_a, 3.0), _spd(rng, 5, 0.2)
        st = KBFGSState(
            h_a=to_xp(h_a), h_g=to_xp(h_g), s_bar=to_xp(np.zeros(5)), y_bar=to_xp(np.zeros(5))
        )
        dw, db = block.precondition(st, to_xp(grad_w), None if grad_b is None else to_xp(grad_b))
        assert tuple(dw.shape) == (5, 4)
        m = grad_w if not bias else np.concatenate([grad_w, grad_b[:, None]], axis=1)
        p = to_np(dw) if not bias else np.concatenate([to_np(dw), to_np(db)[:, None]], axis=1)
        np.testing.assert_allclose(p, h_g @ m @ h_a, rtol=1e-10)
        assert float(np.sum(m * p)) > 0


def test_warm_start_and_conv_scale(xp, to_xp, to_np, rng):
    """T12: ``u`` ends in 1 and ``A`` is the spatial sum, ``|T|`` times the spatial mean."""
    m, t, d_in = 3, 5, 4
    patches = rng.standard_normal((m * t, d_in))
    block = KBFGSBlock(2, d_in)
    xb = to_np(block.homogeneous(to_xp(patches)))
    assert np.all(xb[:, -1] == 1.0)
    assert xb.mean(axis=0)[-1] == 1.0
    a_sum = xb.T @ xb / m
    a_mean = xb.T @ xb / (m * t)
    np.testing.assert_allclose(a_sum, t * a_mean, rtol=1e-12)
    state = block.update_a(
        block.init(to_xp(np.zeros(1))), to_xp(patches), n_examples=m, damping=LAM
    )
    np.testing.assert_allclose(to_np(state.a), a_sum, rtol=1e-10)
    np.testing.assert_allclose(
        to_np(state.h_a), np.linalg.inv(a_sum + math.sqrt(LAM) * np.eye(d_in + 1)), rtol=1e-8
    )
    # A fixed point: right after the warm start the Hessian-action update changes nothing.
    after = block.update_h_a(state, to_xp(patches), n_examples=m, damping=LAM)
    np.testing.assert_allclose(to_np(after.h_a), to_np(state.h_a), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("a_update", ["ema", "minibatch"])
def test_repair_rebuilds_indefinite_factors(a_update, xp, to_xp, to_np, rng):
    """§9.6: an ``H_a`` or dense ``H_g`` that lost positive definiteness is rebuilt."""
    m, d_in, d_out = 16, 3, 2
    x = rng.standard_normal((m, d_in)) + 0.5
    block = KBFGSBlock(d_out, d_in, a_update=a_update)
    state = block.update_a(block.init(to_xp(np.zeros(1))), to_xp(x), n_examples=m, damping=LAM)
    same, rebuilt = block.repair(state, to_xp(x), n_examples=m, damping=LAM)
    assert rebuilt == ()
    assert same is state
    x_bar = np.concatenate([x, np.ones((m, 1))], axis=1)
    fresh = np.linalg.inv(x_bar.T @ x_bar / m + math.sqrt(LAM) * np.eye(d_in + 1))
    broken = KBFGSState.from_arrays(
        {**state.arrays(), "h_a": to_xp(-np.eye(d_in + 1)), "h_g": to_xp(np.diag([1.0, -1.0]))},
        state.counters(),
    )
    new, rebuilt = block.repair(broken, to_xp(x), n_examples=m, damping=LAM)
    assert rebuilt == ("h_a", "h_g")
    np.testing.assert_allclose(to_np(new.h_a), fresh, rtol=1e-8)
    np.testing.assert_array_equal(to_np(new.h_g), np.eye(d_out))
    # The L-BFGS H_g is positive definite by construction: only H_a is tested.
    lblock = KBFGSLBlock(d_out, d_in, memory=3, a_update=a_update)
    lstate = lblock.update_a(lblock.init(to_xp(np.zeros(1))), to_xp(x), n_examples=m, damping=LAM)
    lbroken = KBFGSState.from_arrays(
        {**lstate.arrays(), "h_a": to_xp(-np.eye(d_in + 1))},
        lstate.counters(),
    )
    new, rebuilt = lblock.repair(lbroken, to_xp(x), n_examples=m, damping=LAM)
    assert rebuilt == ("h_a",)
    np.testing.assert_allclose(to_np(new.h_a), fresh, rtol=1e-8)
    with pytest.raises(ValueError, match="call update_a"):
        block.repair(block.init(to_xp(np.zeros(1))), to_xp(x), n_examples=m, damping=LAM)


def test_nonfinite_pair_leaves_state(xp, to_xp, to_np, rng):
    """A pair holding NaN leaves the EMAs and ``H_g`` (dense and L-BFGS) bit-identical, also
    after a damped pair (the last EMA pair must not be applied a second time)."""
    for block in (KBFGSBlock(3, 2), KBFGSLBlock(3, 2, memory=4)):
        state = block.init(to_xp(np.zeros(1)))
        s0 = rng.standard_normal(3)
        # Negative curvature: Powell and LM damping both act on this pair.
        state = block.update_g(state, to_xp(s0), to_xp(-s0), to_xp(np.ones(3)), damping=LAM)
        s = to_xp(np.array([1.0, np.nan, 0.0]))
        y = to_xp(np.array([1.0, 2.0, 0.0]))
        new = block.update_g(state, s, y, to_xp(np.ones(3)), damping=LAM)
        for key, value in state.arrays().items():
            np.testing.assert_array_equal(to_np(new.arrays()[key]), to_np(value), err_msg=key)
        assert new.g_updates == 2


def test_dead_pair_skipped(xp, to_xp, to_np):
    """``s = 0`` (a layer that did not move) does not change ``H_g``."""
    block = KBFGSBlock(3, 2)
    state = block.init(to_xp(np.zeros(1)))
    new = block.update_g(
        state, to_xp(np.zeros(3)), to_xp(np.ones(3)), to_xp(np.ones(3)), damping=LAM
    )
    np.testing.assert_array_equal(to_np(new.h_g), np.eye(3))


def test_state_round_trip():
    for block in (KBFGSBlock(3, 2), KBFGSLBlock(3, 2, memory=4)):
        state = block.init(np.zeros(1))
        again = KBFGSState.from_arrays(state.arrays(), {"a_updates": 2, "g_updates": 5})
        assert again.a_updates == 2
        assert again.g_updates == 5
        assert isinstance(again.h_g, LBFGSState) == isinstance(state.h_g, LBFGSState)
        assert set(again.arrays()) == set(state.arrays())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_out": 0, "d_in": 2}, "d_out"),
        ({"d_out": 2, "d_in": 2, "memory": 0}, "memory"),
        ({"d_out": 2, "d_in": 2, "a_update": "full"}, "a_update"),
        ({"d_out": 2, "d_in": 2, "variant": "v3"}, "variant"),
        ({"d_out": 2, "d_in": 2, "mu1": 1.0}, "mu1"),
        ({"d_out": 2, "d_in": 2, "pair_decay": 1.0}, "pair_decay"),
    ],
)
def test_block_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KBFGSBlock(**kwargs)


def test_argument_validation():
    block = KBFGSBlock(3, 2)
    state = block.init(np.zeros(1))
    with pytest.raises(ValueError, match="damping"):
        block.update_a(state, np.ones((4, 2)), n_examples=4, damping=0.0)
    with pytest.raises(ValueError, match=r"x must have shape \(R, 2\)"):
        block.update_a(state, np.ones((4, 3)), n_examples=4, damping=0.1)
    with pytest.raises(ValueError, match="grad_w"):
        block.precondition(state, np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="grad_b"):
        block.precondition(state, np.ones((3, 2)), None)
    with pytest.raises(ValueError, match="h_plus"):
        block.pair(np.ones((4, 3)), np.ones((5, 3)), np.ones((4, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="update_a"):
        block.update_h_a(state, np.ones((4, 2)), n_examples=4, damping=0.1)


@pytest.mark.parametrize("a_update", ["ema", "minibatch"])
def test_rows_give_the_same_states_as_arrays(a_update, xp, to_xp, to_np, rng):
    # The adapter may hand input rows as a Rows (a convolution's patches through products):
    # every input-side update is then the same as with the array.
    from curvlin.blocks import LayerBatch, Rows

    block = KBFGSLBlock(d_out=3, d_in=5, a_update=a_update)
    x = to_xp(rng.standard_normal((40, 5)))
    init = block.init(x)
    for inputs in (x, Rows(x)):
        batch = LayerBatch(inputs=inputs, n_examples=8)
        state = block.fold(init, block.statistics(init, batch), damping=LAM)
        state = block.before_second_pass(state, batch, damping=LAM)
        state, rebuilt = block.repair(state, inputs, n_examples=8, damping=LAM)
        assert rebuilt == ()
        if inputs is x:
            expected = to_np(state.h_a)
        else:
            np.testing.assert_allclose(to_np(state.h_a), expected, rtol=1e-12, atol=1e-12)
