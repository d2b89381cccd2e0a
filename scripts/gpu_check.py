"""GPU evidence for the array adapter and the torch engine, in one run (``scripts/gpu_check.sh``).

1. ``sync``: torch KFAC and K-BFGS(L) steps on CUDA under
   ``torch.cuda.set_sync_debug_mode("warn")``; every synchronising call outside the driver's
   one finiteness check is recorded with the line that made it, for a step that only
   preconditions and for a full one. ``cupy_sync``: the same for the array adapter's KFAC on
   CuPy, under ``cupyx.allow_synchronize(False)``.
2. ``dlpack``: torch CUDA tensors handed to the CuPy adapter by ``from_dlpack`` share memory
   (same device pointer), and one step on them runs.
3. ``ratios``: the array adapter's step (manual forward and backward of the
   784-1000-500-250-30-250-500-1000-784 autoencoder at batch 1000, then the method) over an SGD
   step on the same arrays, for KFAC and K-BFGS(L), on CuPy.

``--cpu`` runs the same code on NumPy (and skips 1 and 2), with ``--smoke`` on small sizes:
that is how the script itself is tested without a GPU. Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings

import numpy as np

SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
BATCH = 1000


def _mlp(xp, sizes, seed=0):
    from curvlin.adapters.array import Linear

    rng = np.random.default_rng(seed)
    layers = {f"fc{i}": Linear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)}
    params = {
        n: [
            xp.asarray((rng.standard_normal(l.weight_shape) / l.d_in**0.5).astype(np.float32)),
            xp.zeros(l.d_out, dtype=xp.float32),
        ]
        for n, l in layers.items()
    }
    return layers, params


def _passes(xp, params, x, linear_after=()):
    """ReLU MLP (linear where listed and at the output), 0.5·mean squared error against x."""
    names = list(params)
    inputs, outputs, h = {}, {}, x
    for k, n in enumerate(names):
        w, b = params[n]
        inputs[n] = h
        outputs[n] = h @ w.T + b
        last = k == len(names) - 1 or n in linear_after
        h = outputs[n] if last else xp.maximum(outputs[n], 0)
    g = (h - x) / x.shape[0]
    grads, output_grads = {}, {}
    for k in reversed(range(len(names))):
        n = names[k]
        output_grads[n] = g
        grads[n] = (g.T @ inputs[n], xp.sum(g, axis=0))
        if k:
            g = g @ params[n][0]
            if names[k - 1] not in linear_after:
                g = g * xp.astype(inputs[n] > 0, g.dtype)
    return grads, inputs, outputs, output_grads


def _trainer(xp, method, sizes, batch, lr=1e-3, **options):
    from curvlin.adapters.array import ArrayPreconditioner

    layers, params = _mlp(xp, sizes)
    x = xp.asarray(np.random.default_rng(1).random((batch, sizes[0]), dtype=np.float32))
    code = f"fc{sizes.index(min(sizes)) - 1}"
    like = xp.empty(0, dtype=xp.float32)
    pre = None if method == "sgd" else ArrayPreconditioner(layers, method, like=like, **options)

    def step():
        grads, inputs, outputs, output_grads = _passes(xp, params, x, (code,))
        if pre is None:
            d = grads
        else:
            kw = dict(inputs=inputs, output_grads=output_grads)
            if "outputs" in pre.needs:
                kw["outputs"] = outputs
            d = pre.precondition(grads, **kw) if pre.stats_due else pre.precondition(grads)
        for n, (dw, db) in d.items():
            params[n][0] -= lr * dw
            params[n][1] -= lr * db
        if pre is not None and pre.second_pass_due:
            _, _, outputs, output_grads = _passes(xp, params, x, (code,))
            pre.second_pass(outputs=outputs, output_grads=output_grads)

    return step


def ratios(xp, sync, *, smoke: bool) -> dict:
    sizes = (64, 32, 8, 32, 64) if smoke else SIZES
    batch = 64 if smoke else BATCH
    steps = {m: _trainer(xp, m, sizes, batch) for m in ("sgd", "kfac", "kbfgsl")}
    for s in steps.values():  # warm up (first step: statistics, refresh, kernels compiled)
        s()
        s()
    sync()
    times = {m: [] for m in steps}
    for _ in range(2 if smoke else 5):
        for m, s in steps.items():  # interleaved, so load shifts hit every mode alike
            t = time.perf_counter()
            for _ in range(3 if smoke else 10):
                s()
            sync()
            times[m].append((time.perf_counter() - t) / (3 if smoke else 10))
    best = {m: min(v) for m, v in times.items()}
    return {
        "problem": f"MLP autoencoder {'-'.join(map(str, sizes))}, batch {batch}, float32",
        "seconds_per_step": best,
        "ratio_to_sgd": {m: best[m] / best["sgd"] for m in best if m != "sgd"},
    }


class _FinitenessAllowed:
    """Within the block, :meth:`Driver.all_finite` (the step's one intended host
    synchronisation) runs with ``allow`` entered and is counted; everything else is watched."""

    def __init__(self, allow):
        self.allow, self.calls = allow, 0

    def __enter__(self):
        from curvlin.blocks import Driver

        self._orig = Driver.all_finite
        orig, outer = self._orig, self

        def all_finite(arrays):
            outer.calls += 1
            with outer.allow():
                return orig(arrays)

        Driver.all_finite = staticmethod(all_finite)
        return self

    def __exit__(self, *exc):
        from curvlin.blocks import Driver

        Driver.all_finite = staticmethod(self._orig)


def sync_check() -> dict:
    """Host synchronisations of torch steps on CUDA outside the finiteness check, as the
    ``file:line`` torch's ``set_sync_debug_mode("warn")`` names (an empty list: none)."""
    import contextlib

    import torch
    from torch import nn
    from torch.nn import functional as F

    from curvlin.adapters.torch import KBFGSL, KFAC

    @contextlib.contextmanager
    def unwatched():
        torch.cuda.set_sync_debug_mode("default")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    out = {}
    torch.manual_seed(0)
    amortised = {"stats_every": 10, "refresh_every": 100}
    for name, make in (
        ("kfac stats_every=10 refresh_every=100", lambda m: KFAC(m, lr=1e-3, **amortised)),
        ("kbfgsl", lambda m: KBFGSL(m, lr=1e-3)),
    ):
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 784)).cuda()
        opt = make(model)
        x = torch.rand(256, 784, device="cuda")

        def closure(opt=opt, model=model, x=x):
            opt.zero_grad()
            loss = F.mse_loss(model(x), x)
            loss.backward()
            return loss

        for label in ("step 0 (statistics and refresh)", "step 1"):
            if "kbfgs" not in name:
                closure()  # the forward/backward is not the optimizer's: outside the watch
            torch.cuda.synchronize()
            with (
                warnings.catch_warnings(record=True) as caught,
                _FinitenessAllowed(unwatched) as finite,
            ):
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step(closure) if "kbfgs" in name else opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            where = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
            out[f"torch {name}: {label}"] = {"finiteness checks": finite.calls, "other": where}
    return out


def cupy_sync_check() -> dict:
    """The array adapter's KFAC steps on CuPy under ``cupyx.allow_synchronize(False)`` (CuPy's
    own detector: deprecated, with false negatives) outside the finiteness check."""
    import cupyx

    allow = getattr(cupyx, "allow_synchronize", None)
    if allow is None:
        return {"skipped": "this CuPy has no cupyx.allow_synchronize"}
    import cupy

    out = {}
    step = _trainer(cupy, "kfac", SIZES, BATCH, stats_every=10, refresh_every=100)
    for label in ("step 0 (statistics and refresh)", "step 1"):
        cupy.cuda.get_current_stream().synchronize()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # its deprecation
                with allow(False), _FinitenessAllowed(lambda: allow(True)) as finite:
                    step()
            out[label] = {"finiteness checks": finite.calls, "other": "none detected"}
        except Exception as e:  # DeviceSynchronized: where it happened
            tb = traceback.extract_tb(e.__traceback__)
            mine = [f"{f.filename}:{f.lineno}" for f in tb if "curvlin" in f.filename]
            out[label] = {"other": f"{type(e).__name__} at {mine[-1:] or tb[-1:]}"}
    return out


def dlpack_check() -> dict:
    import cupy
    import torch

    from curvlin.adapters.cupy import CuPyPreconditioner, Linear, from_dlpack

    t = torch.randn(8, 4, device="cuda")
    c = from_dlpack(t)
    same = int(c.data.ptr) == t.data_ptr()
    pre = CuPyPreconditioner({"fc": Linear(4, 3)}, "kfac")
    g = torch.randn(8, 3, device="cuda") / 8
    grads = from_dlpack({"fc": (g.T @ t, g.sum(0))})
    d = pre.precondition(grads, inputs={"fc": c}, output_grads={"fc": from_dlpack(g)})
    back = torch.from_dlpack(d["fc"][0])
    return {"shares_memory": same, "direction_device": str(back.device),
            "cupy": cupy.__version__}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="NumPy only (tests the script)")
    ap.add_argument("--smoke", action="store_true", help="small sizes")
    ap.add_argument("--out", default="gpu-check/results.json")
    args = ap.parse_args()
    result: dict = {}
    if args.cpu:
        xp, sync = np, lambda: None
    else:
        import cupy

        xp = cupy
        sync = cupy.cuda.get_current_stream().synchronize
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        result["gpu"] = (
            props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        )
        checks = (("sync", sync_check), ("cupy_sync", cupy_sync_check), ("dlpack", dlpack_check))
        for key, check in checks:
            try:
                result[key] = check()
            except Exception:  # record and go on: the other checks still give evidence
                result[key] = {"error": traceback.format_exc()}
    result["ratios"] = ratios(xp, sync, smoke=args.smoke)
    import os

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
