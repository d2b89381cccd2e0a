"""Data-parallel training with a curvlin optimizer, launched by torchrun.

Run it with::

    torchrun --nproc_per_node=2 examples/distributed_train.py --method kfac --steps 50

Each process trains the same model on its shard of every batch. The model is wrapped in
``DistributedDataParallel`` (which averages the gradients); the optimizer sees the initialised
process group and averages its curvature statistics, refreshes each layer's inverses on one
rank and broadcasts them, so every rank takes the step one process would take on the whole
batch. Nothing else changes in the training loop. On GPUs the same script runs with
``--backend nccl`` (one device per process, ``LOCAL_RANK`` picks it).

It prints, on rank 0, the loss every tenth step, the mean step time and the entries (and
bytes) each rank handed to collectives per step.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from curvlin.adapters.torch import KBFGS, KFAC, SMWNG, DiagonalFisher, Shampoo

METHODS = {
    "kfac": lambda p: KFAC(p, lr=0.1, damping=0.1, momentum=0.9),
    "kbfgs": lambda p: KBFGS(p, lr=0.1, damping=0.3, momentum=0.9),
    "diagonal": lambda p: DiagonalFisher(p, lr=0.1, damping=0.1, momentum=0.9),
    "shampoo": lambda p: Shampoo(p, lr=0.1, damping=1e-3, momentum=0.9, graft="adam"),
    "smw-ng": lambda p: SMWNG(p, lr=0.1, damping=1.0, momentum=0.9, fisher="empirical"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="kfac")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args(argv)

    dist.init_process_group(args.backend)  # torchrun's environment: rank, world, address
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(
        nn.Linear(64, args.width), nn.Tanh(), nn.Linear(args.width, args.width), nn.Tanh(),
        nn.Linear(args.width, 64),
    ).to(device)  # fmt: skip
    model = nn.parallel.DistributedDataParallel(model)
    opt = METHODS[args.method](model)

    data = torch.Generator().manual_seed(1)  # every rank draws the same global batches
    times = []
    for step in range(args.steps):
        x = torch.randn(args.batch, 64, generator=data)
        x = torch.tensor_split(x, world)[rank].to(device)  # this rank's shard

        def closure(x=x):
            opt.zero_grad()
            loss = F.mse_loss(model(x), torch.tanh(x))
            loss.backward()
            return loss

        start = time.perf_counter()
        loss = opt.step(closure)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if rank == 0 and step % 10 == 0:
            print(f"step {step:4d}  loss {float(loss.detach()):.5f}")
    sent = opt._curv.driver.distributor
    if rank == 0:
        skip = min(5, len(times) - 1)  # warm-up
        mean = sum(times[skip:]) / max(len(times) - skip, 1)
        print(f"world {world}  mean step {1e3 * mean:.2f} ms")
        if hasattr(sent, "sent"):
            per = {k: v / args.steps for k, v in sent.sent.items() if v}
            print("entries sent per step:", {k: round(v) for k, v in per.items()},
                  f"= {sum(per.values()) * 4:.0f} bytes in float32")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
