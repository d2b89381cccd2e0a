"""``python -m curvlin check``: every primitive against a dense float64 reference, per backend."""

from __future__ import annotations

import time

import numpy as np

from . import (
    kron_apply,
    kron_dense,
    kron_solve,
    pi_damping,
    spd_inverse,
    spd_inverse_root,
    spd_solve,
)
from .backends import available_backends, get_backend

#: Largest relative error accepted per dtype (the problems below are well conditioned).
TOLERANCE = {"float64": 1e-10, "float32": 1e-3}


def _spd(rng, n: int) -> np.ndarray:
    a = rng.standard_normal((n, 2 * n))
    return a @ a.T / (2 * n) + 0.1 * np.eye(n)


def _cases(rng):
    """(name, primitive, NumPy arguments, keyword arguments, dense float64 reference)."""
    g, a = _spd(rng, 48), _spd(rng, 32)
    f3 = [_spd(rng, n) for n in (6, 5, 4)]
    x = rng.standard_normal((3, 48, 32))
    y = rng.standard_normal((6, 5, 4))
    stack = np.stack([_spd(rng, 40) for _ in range(8)])
    b = rng.standard_normal((8, 40, 3))
    lam = 1e-2
    gg, ga = (float(v) for v in pi_damping([g, a], lam))
    pi_ref = np.stack(
        [
            np.linalg.solve(np.kron(g + gg * np.eye(48), a + ga * np.eye(32)), v.reshape(-1))
            for v in x
        ]
    )
    evals, evecs = np.linalg.eigh(stack)
    kron3 = np.kron(np.kron(f3[0], f3[1]), f3[2])
    return [
        (
            "kron_apply (k=2, batch 3)",
            kron_apply,
            ([g, a], x),
            {},
            (x.reshape(3, -1) @ np.kron(g, a).T).reshape(x.shape),
        ),
        ("kron_dense (k=3)", kron_dense, (f3,), {}, kron3),
        ("kron_solve π-damped", kron_solve, ([g, a], x), {"damping": lam}, pi_ref.reshape(x.shape)),
        (
            "kron_solve exact (k=3)",
            kron_solve,
            (f3, y),
            {"damping": lam, "exact": True},
            np.linalg.solve(kron3 + lam * np.eye(120), y.reshape(-1)).reshape(y.shape),
        ),
        (
            "spd_inverse (8×40×40)",
            spd_inverse,
            (stack,),
            {"damping": lam},
            np.linalg.inv(stack + lam * np.eye(40)),
        ),
        ("spd_solve (8×40×40, k=3)", spd_solve, (stack, b), {}, np.linalg.solve(stack, b)),
        (
            "spd_inverse_root p=4",
            spd_inverse_root,
            (stack, 4),
            {},
            (evecs * evals[:, None, :] ** -0.25) @ np.swapaxes(evecs, -1, -2),
        ),
    ]


def run_check(*, dtypes=("float64", "float32"), seed: int = 0, out=print) -> bool:
    """Run every case on every usable backend; print errors and timings; True if all pass."""
    backends = available_backends()
    out(f"usable backends: {', '.join(backends)}")
    ok = True
    header = f"{'backend':<18}{'dtype':<9}{'primitive':<28}{'rel. error':>12}{'time':>11}  status"
    for label, (xp, device) in backends.items():
        for dtype_name in dtypes:
            out("")
            out(header)
            rng = np.random.default_rng(seed)
            dtype = getattr(xp, dtype_name)

            def convert(arg, xp=xp, device=device, dtype=dtype):
                if isinstance(arg, list):
                    return [convert(a) for a in arg]
                if isinstance(arg, np.ndarray):
                    return xp.asarray(arg, dtype=dtype, device=device)
                return arg

            for name, primitive, args, kwargs, reference in _cases(rng):
                args = [convert(arg) for arg in args]
                result = primitive(*args, **kwargs)  # warm-up (and lazy imports) untimed
                backend = get_backend(result)
                backend.synchronize(result)
                start = time.perf_counter()
                result = primitive(*args, **kwargs)
                backend.synchronize(result)
                elapsed = time.perf_counter() - start
                got = backend.to_numpy(result).astype(np.float64)
                err = np.linalg.norm(got - reference) / np.linalg.norm(reference)
                passed = bool(np.isfinite(err) and err <= TOLERANCE[dtype_name])
                ok &= passed
                out(
                    f"{label:<18}{dtype_name:<9}{name:<28}{err:>12.2e}{elapsed * 1e3:>9.2f}ms  "
                    f"{'ok' if passed else 'FAIL'}"
                )
    out("")
    out("all primitives match their dense references" if ok else "SOME CHECKS FAILED")
    return ok
