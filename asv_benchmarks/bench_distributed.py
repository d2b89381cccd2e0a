"""Distributed steps on gloo (CPU): communication volume and step time for 1 and 2 processes.

Each measurement spawns ``world`` processes on 127.0.0.1 (a free port) that train the same
Tanh MLP (``64-W-W-64``, float32, a global batch of ``BATCH`` split over the ranks), wrapped in
``DistributedDataParallel``, with a curvlin optimizer or ``torch.optim.SGD(momentum=0.9)``,
timed step by step after a warm-up. Tracks:

- ``track_ratio_to_sgd``: the median curvlin step over the median SGD step, both measured in
  the same spawned processes (so the SGD step carries DDP's gradient all-reduce as well);
- ``track_bytes_per_step``: the bytes rank 0 handed to curvlin's collectives per step
  (``TorchDistributor.sent``; 0 for one process, where nothing is distributed).

Timings on a machine shared with other work are distorted by it; the ratio is what is
compared across commits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from .common import SMOKE

WIDTH = 64 if SMOKE else 256
BATCH = 32 if SMOKE else 256
STEPS, WARMUP = (3, 1) if SMOKE else (30, 5)
METHODS = ("kfac", "kbfgs", "diagonal")
WORLDS = (1, 2)


def _build(method, model):
    import torch

    from curvlin.adapters.torch import KBFGS, KFAC, DiagonalFisher

    make = {
        "sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        "kfac": lambda: KFAC(model, lr=0.1, damping=0.1, momentum=0.9),
        "kbfgs": lambda: KBFGS(model, lr=0.1, damping=0.3, momentum=0.9),
        "diagonal": lambda: DiagonalFisher(model, lr=0.1, damping=0.1, momentum=0.9),
    }
    return make[method]()


def _steps(method, rank, world):
    """Median step seconds and rank 0's bytes per step for ``method`` on this rank."""
    import time

    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 64)
    )
    model = nn.parallel.DistributedDataParallel(model)
    opt = _build(method, model)
    gen = torch.Generator().manual_seed(1)
    times = []
    for _ in range(STEPS):
        x = torch.tensor_split(torch.randn(BATCH, 64, generator=gen), world)[rank]

        def closure(x=x):
            opt.zero_grad()
            loss = F.mse_loss(model(x), torch.tanh(x))
            loss.backward()
            return loss

        start = time.perf_counter()
        opt.step(closure)
        times.append(time.perf_counter() - start)
    times = sorted(times[WARMUP:])
    sent = 0
    curv = getattr(opt, "_curv", None)
    dist = getattr(curv.driver, "distributor", None) if curv is not None else None
    if dist is not None and hasattr(dist, "sent"):
        sent = 4 * sum(dist.sent.values()) / STEPS  # float32 entries
    return times[len(times) // 2], sent


def worker(rank, world, port, method):
    """One rank: SGD then ``method``; rank 0 prints the JSON result."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        sgd, _ = _steps("sgd", rank, world)
        step, sent = _steps(method, rank, world)
        if rank == 0:
            print(json.dumps({"ratio": step / sgd, "bytes": sent, "step": step, "sgd": sgd}))
    finally:
        dist.destroy_process_group()


def measure(method: str, world: int) -> dict:
    """Spawn ``world`` ranks running :func:`worker`; rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here) if "." in __name__ else here
    code = (
        "import sys, importlib\n"
        f"sys.path.insert(0, {root!r})\n"
        f"m = importlib.import_module({__name__!r})\n"
        f"m.worker(int(sys.argv[1]), {world}, {port}, {method!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for r in range(world)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"bench_distributed: a rank failed:\n{err}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


_CACHE: dict = {}


def _result(method, world):
    key = (method, world)
    if key not in _CACHE:
        _CACHE[key] = measure(method, world)
    return _CACHE[key]


class DistributedStep:
    """A curvlin step on 1 or 2 gloo processes against an SGD step on as many."""

    param_names = ("method", "world")
    params = (METHODS, WORLDS)
    number, repeat, rounds = 1, 1, 1
    timeout = 600

    def track_ratio_to_sgd(self, method, world):
        return _result(method, world)["ratio"]

    track_ratio_to_sgd.unit = "ratio"

    def track_bytes_per_step(self, method, world):
        return _result(method, world)["bytes"]

    track_bytes_per_step.unit = "bytes"
