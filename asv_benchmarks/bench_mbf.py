"""MBF (mini-block Fisher): batched block inverses, MBF training steps, the CNN protocol.

:class:`BlockInverse` times :func:`curvlin.block_inverse` on a ``(B, b, b)`` stack of SPD
blocks (B = 10⁴ and 10⁶ blocks of sizes b = 9, a 3×3 kernel, and 64, a Linear tile) and
compares it with

- a Python loop that inverts the blocks one by one with the library's own ``inv``
  (``track_loop_over_batched``: the loop's time over the batched time, > 1 when batching
  wins); the loop runs over the first 2000 blocks and is extrapolated linearly to B;
- one dense solve with the block-diagonal matrix (``track_dense_over_batched``): a dense
  Cholesky solve of ``k`` blocks, ``n = k·b <= 2048``, extrapolated by ``(B/k)³`` (a dense
  ``B·b × B·b`` matrix would not fit in memory);
- a matmul of 1024×1024 (``track_gemm_fraction``: the inverse's flop rate, ``B·b³`` flops
  for Cholesky, triangular inverse and product, over the matmul's ``2n³`` rate, as
  ``bench_kron`` reports).

A point whose stack (times six: input, damped copy, factor, inverse and workspace) does not
fit in the free memory of its device is skipped (10⁶ blocks of 64×64 in float32 are 16 GiB).

:class:`MBFStep` is one MBF training step (empirical Fisher, statistics and inverses every
step, the front's defaults) on ``bench_kfac``'s CNN (batch 128) and MNIST autoencoder (batch
1000), its time over an SGD step measured in the same process (``track_ratio_to_sgd``, the
minimum over interleaved rounds) and its peak memory over SGD (``track_peak_over_sgd``, a
fresh process each). Goal (watched, never asserted): at most 2× SGD on the CNN. The
autoencoder on the CPU (about a minute per MBF step) runs only with ``CURVLIN_BENCH_FULL=1``.

:func:`cnn_protocol` is the CNN quality protocol of ``docs/mbf.md``: scikit-learn's digits
upsampled to 3×32×32, the same CNN, batches of 128; it returns the whole set's loss at every
``eval_every`` steps. It is a function, not an asv benchmark (minutes on a CPU).
"""

from __future__ import annotations

import math
import os

import numpy as np

from . import bench_kfac
from .bench_kfac import DEVICES, Trainer, _interleaved_minima, _torch_device, build_trainer
from .common import SMOKE, XPBenchmark, cached, min_times

#: asv parameters of :class:`BlockInverse`.
BLOCK_BACKENDS = ("numpy", "torch", "torch-cuda", "cupy")
BLOCK_COUNTS = (10_000,) if SMOKE else (10_000, 1_000_000)
BLOCK_SIZES = (9, 64)
_LOOP_BLOCKS = 2000
_DENSE_MAX = 2048
_DAMPING = 1e-3


def _free_bytes(backend: str) -> int:
    if backend == "torch-cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    if backend == "cupy":
        import cupy

        return cupy.cuda.Device().mem_info[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class BlockInverse(XPBenchmark):
    """:func:`curvlin.block_inverse` of B SPD blocks b×b (float32) against a loop and a
    dense solve (see the module docstring)."""

    param_names = ("backend", "blocks", "size")
    params = (BLOCK_BACKENDS, BLOCK_COUNTS, BLOCK_SIZES)
    timeout = 300

    def setup(self, backend, blocks, size):
        super().setup(backend)
        need = 6 * blocks * size * size * 4
        if need > _free_bytes(backend):
            raise NotImplementedError(
                f"{blocks} blocks of {size}×{size} need {need / 2**30:.1f} GiB"
            )

        def build():
            rng = np.random.default_rng(0)
            # SPD blocks B Bᵀ/b + 0.1 I, built in float32 with NumPy
            f = rng.standard_normal((blocks, size, size), dtype=np.float32)
            m = np.matmul(f, np.swapaxes(f, 1, 2))
            m /= size
            m += np.float32(0.1) * np.eye(size, dtype=np.float32)
            stack = self.asarray(m, "float32")
            del f, m
            v = self.random((blocks, size, 1), "float32", seed=1)
            x = self.random((1024, 1024), "float32", seed=2)
            sync = self.make_sync(stack)
            inv = self._inverse(stack)
            sync(inv)
            return stack, inv, v, x, sync

        key = (type(self).__name__, backend, blocks, size)
        self.stack, self.inv, self.v, self.x, self.sync = cached(key, build)

    @staticmethod
    def _inverse(stack):
        from curvlin import block_inverse

        return block_inverse([stack], damping=_DAMPING)[0]

    def time_inverse(self, backend, blocks, size):
        self.sync(self._inverse(self.stack))

    def time_apply(self, backend, blocks, size):
        """The per-step part: one batched product of the inverses with a vector per block."""
        self.sync(self.inv @ self.v)

    def _loop(self):
        xp, stack = self.xp, self.stack
        eye = xp.eye(stack.shape[-1], dtype=stack.dtype, device=self.device)
        k = min(_LOOP_BLOCKS, stack.shape[0])

        def run():
            out = None
            for i in range(k):
                out = xp.linalg.inv(stack[i, ...] + _DAMPING * eye)
            return out

        return run, stack.shape[0] / k

    def track_loop_over_batched(self, backend, blocks, size):
        loop, scale = self._loop()
        t_batched, t_loop = min_times(
            [lambda: self._inverse(self.stack), loop], self.sync, repeat=3
        )
        return t_loop * scale / t_batched

    track_loop_over_batched.unit = "loop time / batched time"

    def track_dense_over_batched(self, backend, blocks, size):
        from curvlin import spd_solve

        xp = self.xp
        k = max(1, min(blocks, _DENSE_MAX // size))
        dense = xp.zeros((k * size, k * size), dtype=self.stack.dtype, device=self.device)
        for i in range(k):  # setup: the block-diagonal matrix of the first k blocks
            dense[i * size : (i + 1) * size, i * size : (i + 1) * size] = self.stack[i, ...]
        rhs = xp.ones((k * size, 1), dtype=dense.dtype, device=self.device)
        t_batched, t_dense = min_times(
            [lambda: self._inverse(self.stack), lambda: spd_solve(dense, rhs, damping=_DAMPING)],
            self.sync,
            repeat=3,
        )
        return t_dense * (blocks / k) ** 3 / t_batched

    track_dense_over_batched.unit = "dense solve time / batched time"

    def track_gemm_fraction(self, backend, blocks, size):
        x = self.x
        t_inv, t_mm = min_times([lambda: self._inverse(self.stack), lambda: x @ x], self.sync)
        return (blocks * size**3 / t_inv) / (2 * x.shape[0] ** 3 / t_mm)

    track_gemm_fraction.unit = "fraction of GEMM rate"


# -- MBF training steps ---------------------------------------------------------------------

#: asv parameter of :class:`MBFStep`.
STEP_PROBLEMS = ("cnn", "autoencoder")
_LR_MBF, _DAMPING_MBF, _MOMENTUM = 1e-3, 1e-1, 0.9
#: Interleaved rounds of the ratio.
_ROUNDS = 1 if SMOKE else 5
#: Environment variable that enables the autoencoder on the CPU.
_FULL = "CURVLIN_BENCH_FULL"


def build_mbf_trainer(device: str, problem: str) -> Trainer:
    """``bench_kfac``'s trainer for ``problem`` (warmed up) with MBF (the front's defaults)."""
    from curvlin.adapters.torch import MBF

    trainer = build_trainer("sgd", device, problem)
    trainer.opt = MBF(trainer.model, lr=_LR_MBF, damping=_DAMPING_MBF, momentum=_MOMENTUM)
    trainer.mode = "mbf"
    trainer.step()  # MBF's first step: blocks, inverses and workspaces allocated
    trainer.check()
    return trainer


def peak_mib(mode: str, device: str, problem: str) -> float:
    """Peak memory (MiB) of a fresh ``mode`` run ("sgd" or "mbf"); see ``bench_kfac.peak_mib``."""

    def build(mode, device, problem):
        if mode == "mbf":
            return build_mbf_trainer(device, problem)
        return build_trainer("sgd", device, problem)

    return bench_kfac.peak_mib(mode, device, problem, build=build)


def _peak_in_subprocess(mode: str, device: str, problem: str) -> float:
    return bench_kfac._peak_in_subprocess(mode, device, problem, module=__name__)


class MBFStep:
    """One MBF step (every step: statistics and inverses) on the CNN and the autoencoder."""

    param_names = ("device", "problem")
    params = (DEVICES, STEP_PROBLEMS)
    number = 1
    repeat = (2, 5, 60.0)
    warmup_time = 0
    timeout = 900

    def setup(self, device, problem):
        if not os.path.exists("/proc/self/status") and device == "cpu":
            raise NotImplementedError("peak memory needs /proc/self/status")
        if device == "cpu" and problem == "autoencoder" and not os.environ.get(_FULL):
            # about a minute per step on a CPU core (docs/mbf.md): minutes per track
            raise NotImplementedError(f"the autoencoder on the CPU runs only with {_FULL}=1")
        self.trainer = cached(
            ("MBFStep", device, problem), lambda: build_mbf_trainer(device, problem)
        )

    def time_step(self, device, problem):
        self.trainer.step()

    def track_ratio_to_sgd(self, device, problem):
        sgd = build_trainer("sgd", device, problem)
        t_mbf, t_sgd = _interleaved_minima([self.trainer.step, sgd.step], _ROUNDS)
        self.trainer.check()
        return t_mbf / t_sgd

    track_ratio_to_sgd.unit = "ratio to SGD step"

    def track_state_over_params(self, device, problem):
        """Curvature-state bytes (blocks and inverses) over parameter bytes."""
        return self.trainer.state_bytes_over_params()

    track_state_over_params.unit = "bytes / parameter bytes"

    def track_peak_over_sgd(self, device, problem):
        _torch_device(device)
        return _peak_in_subprocess("mbf", device, problem) - _peak_in_subprocess(
            "sgd", device, problem
        )

    track_peak_over_sgd.unit = "MiB over SGD"


# -- the CNN quality protocol -----------------------------------------------------------------


def digits_images(side: int = 32):
    """scikit-learn's digits as 3×side×side float32 images (bilinear upsampling, the grey
    image in every channel, scaled to [0, 1]) and their labels."""
    import torch
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target).long()


def cnn_protocol(make, *, steps: int, eval_every: int = 10, batch: int = 128, seed: int = 0):
    """Train ``bench_kfac``'s CNN on the upsampled digits; the whole set's loss every
    ``eval_every`` steps (and at step 0), as a list of ``(step, loss)``.

    ``make(model)`` builds the optimizer; batches of ``batch`` in a shuffled order (NumPy seed
    ``seed``), reshuffled after each pass; cross-entropy; float32 on the CPU, one thread.
    """
    import torch
    from torch.nn import functional as F

    from .bench_kfac import build_cnn

    x, y = cached("digits-images", digits_images)
    torch.set_num_threads(1)
    model = build_cnn("cpu", seed=seed)
    opt = make(model)

    def full_loss():
        with torch.no_grad():
            return float(sum(F.cross_entropy(model(xb), yb, reduction="sum")
                             for xb, yb in zip(x.split(512), y.split(512))) / len(x))  # fmt: skip

    order = np.random.default_rng(seed)
    perm, pos = order.permutation(len(x)), 0
    curve = [(0, full_loss())]
    for step in range(1, steps + 1):
        if pos + batch > len(x):
            perm, pos = order.permutation(len(x)), 0
        idx = torch.from_numpy(perm[pos : pos + batch])
        pos += batch
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step % eval_every == 0:
            value = full_loss()
            curve.append((step, value if math.isfinite(value) else math.inf))
    return curve
