"""Distributed exactness: 2 and 3 gloo processes take the step of one process on the
concatenated batch, for every method of :data:`_methods.METHODS`.

Each case spawns its ranks once (on 127.0.0.1, a free port, bounded timeouts) and runs every
method inside them; the ranks save their parameters, which this process compares with one
process (no process group) fed the concatenated batches.

The sampled Fisher draws random targets, and ranks draw for their own examples, so the draws of
two processes cannot equal one process's. Here the draw is replaced, in the ranks and in the
reference alike, by a deterministic function of each example's output (the same "sampled"
gradients for the same example): what is tested is that the sampled statistics are reduced as
one process would form them.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from _methods import METHODS, batches, roundtrip
from _torch_models import mlp, one_thread
from torch import nn

import curvlin.adapters.torch._engine as engine
from curvlin.adapters.torch.distributed import TorchDistributor, assign_lpt
from curvlin.blocks import Distributor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

STEPS_EVEN, N = 4, 12  # 12 examples split evenly over 2 or 3 ranks
UNEVEN = 7  # then one last statistics-step batch of 7 examples (4 + 3, or 3 + 2 + 2)
JOIN_TIMEOUT = 120  # seconds for a whole spawned case (a hang fails the test, never blocks)
COLLECTIVE_TIMEOUT = 20


def fake_sample(output, *, loss, reduction="mean", generator=None):
    """A deterministic stand-in for the sampled targets' gradients: a function of each
    example's own output, so shards and the whole batch agree."""
    return torch.sin(3.0 * output.detach()) + 0.5


def data(world):
    """The batches: ``STEPS_EVEN`` of ``N`` examples, then one of ``UNEVEN``."""
    whole = batches((3,), STEPS_EVEN + 1, n=N, seed=3)
    x, t = whole[-1]
    whole[-1] = (x[:UNEVEN], t[:UNEVEN])
    return whole


def weighs_examples(method):
    """Whether the method's gradients come with their example count, so that an uneven
    batch's ranks are weighted by it. Shampoo's ``.grad`` of a parameter carries none (and
    no hook counts its examples): its ranks are weighted equally, and it is checked on the
    even batches only."""
    return not (method.per_parameter and not method.sampled)


def items_for(method, world):
    return data(world) if weighs_examples(method) else data(world)[:STEPS_EVEN]


_BY_NAME = {m.name: m for m in METHODS}
_ADAPT = {"adaptive_damping": True, "adapt_every": 1}
#: Options the exactness case also runs: adaptive damping, whose losses are averaged too (a
#: method without and one with a second pass), and K-BFGS with the EMA ``A``, whose second pass
#: reads the inputs only through their mean (averaged rather than gathered).
VARIANTS = [
    (_BY_NAME["kfac"], "/adaptive", _ADAPT),
    (_BY_NAME["kbfgs"], "/adaptive", _ADAPT),
    (_BY_NAME["kbfgs"], "/ema", {"a_update": "ema"}),
    # active on every step (the losses are near 1): the ranks must agree on the mean loss
    (_BY_NAME["kfac"], "/relative-clip", {"kl_clip": None, "relative_kl_clip": 1e-6}),
]


def conv_model(seed=1):
    """A small CNN: its K-BFGS inputs come as rows known through products (``ConvRows``),
    which the distributor gathers built."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4)
    ).double()


def conv_data():
    return batches((2, 4, 4), STEPS_EVEN, n=N, seed=4)


CONV_METHODS = [_BY_NAME["kbfgs"], _BY_NAME["kbfgsl"]]


def conv_reference(method):
    model = conv_model()
    opt = make(method, model)
    for x, t in conv_data():
        method.step(opt, model, x, t)
    return [p.detach().clone() for p in model.parameters()]


def shard(x, rank, world):
    return torch.tensor_split(x, world)[rank]


def subsample_of(method):
    return method.defaults.get("subsample")


def reference_batch(method, x, world):
    """The concatenated batch as one process must see it: a method with a curvature
    subsample ``m`` uses each rank's first ``m`` examples, so those come first."""
    sub = subsample_of(method)
    if sub is None:
        return x, {}
    parts = torch.tensor_split(x, world)
    head = [p[:sub] for p in parts]
    tail = [p[sub:] for p in parts]
    return torch.cat(head + tail), {"subsample": sum(len(h) for h in head)}


def make(method, model, **overrides):
    return method.make(model, **overrides)


def reference(method, world, **options):
    """Parameters after the steps of one process on the concatenated batches."""
    model = mlp(seed=1)
    opt = None
    for x, t in items_for(method, world):
        xb, over = reference_batch(method, x, world)
        tb, _ = reference_batch(method, t, world)
        if opt is None:
            opt = make(method, model, **over, **options)
        elif over:
            # the subsample grows and shrinks with the batch: one process sees the ranks' union
            opt._curv.subsample = over["subsample"]
        method.step(opt, model, xb, tb)
    return [p.detach().clone() for p in model.parameters()]


# -- the ranks ----------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys
    sys.path[:0] = {paths!r}
    import test_distributed as td
    td.worker(int(sys.argv[1]), {world}, {port}, {case!r}, {out!r})
    """
)


def worker(rank, world, port, case, out):
    torch.set_num_threads(1)
    engine.sample_output_grad = fake_sample
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT),
    )
    try:
        result = CASES[case](rank, world)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def run_steps(method, model, opt, rank, world, items):
    for x, t in items:
        method.step(opt, model, shard(x, rank, world), shard(t, rank, world))


def case_exact(rank, world):
    """Every method without DDP (the distributor averages gradients), with uneven last
    batch; and, for two ranks, every method again inside DDP on the even batches."""
    out = {}
    for method in METHODS:
        model = mlp(seed=1)
        opt = make(method, model)
        run_steps(method, model, opt, rank, world, items_for(method, world))
        out[method.name] = [p.detach().clone() for p in model.parameters()]
        out[method.name + "/sent"] = dict(opt._curv.driver.distributor.sent)
    for method, suffix, options in VARIANTS:
        model = mlp(seed=1)
        opt = make(method, model, **options)
        run_steps(method, model, opt, rank, world, items_for(method, world))
        out[method.name + suffix] = [p.detach().clone() for p in model.parameters()]
    out["preconditioner"] = _preconditioned(data(world), rank, world)
    for method in CONV_METHODS:
        model = conv_model()
        opt = make(method, model)
        run_steps(method, model, opt, rank, world, conv_data())
        out[method.name + "/conv"] = [p.detach().clone() for p in model.parameters()]
    if world == 2:
        for method in METHODS:
            model = nn.parallel.DistributedDataParallel(mlp(seed=1))
            opt = make(method, model)
            run_steps(method, model, opt, rank, world, data(world)[:STEPS_EVEN])
            out[method.name + "/ddp"] = [p.detach().clone() for p in model.parameters()]
    return out


def _preconditioned(items, rank=0, world=1):
    """KFAC's Preconditioner in front of torch's SGD (one process: ``world`` 1)."""
    from curvlin.adapters.torch import KFAC, Preconditioner

    model = mlp(seed=1)
    precond = Preconditioner(model, KFAC, damping=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, t in items:
        x, t = shard(x, rank, world), shard(t, rank, world)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        if precond.step():
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


def case_options(rank, world):
    """``grad_workers="owners"`` (exact) and ``comm_dtype=float32`` (close), and the
    checkpoint saved on rank 0 and resumed on every rank."""
    from curvlin.adapters.torch.distributed import distribute

    out = {}
    for method in METHODS:
        model = mlp(seed=1)
        opt = make(method, model)
        distribute(opt, grad_workers="owners")
        run_steps(method, model, opt, rank, world, items_for(method, world))
        out[method.name + "/owners"] = [p.detach().clone() for p in model.parameters()]
    for method in METHODS[:1]:
        model = mlp(seed=1)
        opt = make(method, model)
        distribute(opt, comm_dtype=torch.float32)
        run_steps(method, model, opt, rank, world, data(world))
        out[method.name + "/float32"] = [p.detach().clone() for p in model.parameters()]
    for method in METHODS:
        out[method.name + "/resume"] = _resume(method, rank, world)
    out["nan"] = _nan_on_one_rank(rank, world)
    return out


def _nan_on_one_rank(rank, world):
    """Rank 1's shard holds a NaN in step 1: every rank skips that step, none steps alone
    (the NaN reaches every rank through the reduced statistics and gradients, and the
    verdict is agreed as well)."""
    method = METHODS[0]
    model = mlp(seed=1)
    opt = make(method, model)
    for step, (x, t) in enumerate(data(world)[:3]):
        x = shard(x, rank, world).clone()
        if step == 1 and rank == 1:
            x[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            method.step(opt, model, x, shard(t, rank, world))
    return {
        "skipped": opt.skipped_steps,
        "params": [p.detach().clone() for p in model.parameters()],
    }


def _resume(method, rank, world):
    """Steps 0-1, rank 0's state_dict loaded by every rank into a fresh optimizer, steps
    2-3 (a statistics and a refresh step): equal, bit for bit, to steps 0-3 without the
    reload."""
    items = data(world)
    model = mlp(seed=1)
    opt = make(method, model)
    run_steps(method, model, opt, rank, world, items[:2])
    saved = [None]
    if rank == 0:
        saved = [roundtrip((opt.state_dict(), model.state_dict()))]  # a copy, not references
    torch.distributed.broadcast_object_list(saved, src=0)
    run_steps(method, model, opt, rank, world, items[2:4])
    fresh = mlp(seed=2)
    opt2 = make(method, fresh)
    fresh.load_state_dict(saved[0][1])
    opt2.load_state_dict(saved[0][0])
    run_steps(method, fresh, opt2, rank, world, items[2:4])
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def case_fail(rank, world):
    """Rank 1 raises in its second step; rank 0 must fail in a collective, not hang."""
    method = METHODS[0]
    model = mlp(seed=1)
    opt = make(method, model)
    items = data(world)
    run_steps(method, model, opt, rank, world, items[:1])
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    run_steps(method, model, opt, rank, world, items[1:])
    return {}


CASES = {"exact": case_exact, "options": case_options, "fail": case_fail}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(case, world, tmp_path):
    """Run ``case`` on ``world`` ranks; returns each rank's exit code and saved result."""
    paths = [os.path.dirname(__file__), *sys.path]
    script = WORKER.format(paths=paths, world=world, port=_free_port(), case=case,
                           out=str(tmp_path))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    codes, logs = [], []
    try:
        for p in procs:
            log, _ = p.communicate(timeout=JOIN_TIMEOUT)
            codes.append(p.returncode)
            logs.append(log)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        if (tmp_path / f"rank{r}.pt").exists()
        else None
        for r in range(world)
    ]
    return codes, logs, results


def _close(a, b):
    return all(torch.allclose(p, q, rtol=1e-9, atol=1e-11) for p, q in zip(a, b))


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_step_equals_one_process_on_the_whole_batch(world, tmp_path, monkeypatch):
    codes, logs, results = spawn("exact", world, tmp_path)
    assert codes == [0] * world, "\n".join(logs)
    monkeypatch.setattr(engine, "sample_output_grad", fake_sample)
    with one_thread():
        for method in METHODS:
            want = reference(method, world)
            for rank, got in enumerate(results):
                assert _close(got[method.name], want), (method.name, rank)
                # every rank holds the same parameters, bit for bit
                first = results[0][method.name]
                assert all(torch.equal(p, q) for p, q in zip(got[method.name], first)), method.name
            for variant, suffix, options in VARIANTS:
                if variant is method:
                    want = reference(method, world, **options)
                    assert _close(results[0][method.name + suffix], want), method.name + suffix
                    first = results[0][method.name + suffix]
                    for got in results[1:]:
                        pairs = zip(got[method.name + suffix], first)
                        assert all(torch.equal(p, q) for p, q in pairs), method.name + suffix
            if method is METHODS[0]:
                assert _close(results[0]["preconditioner"], _preconditioned(data(world)))
            if method in CONV_METHODS:
                got = results[0][method.name + "/conv"]
                assert _close(got, conv_reference(method)), method.name + "/conv"
            sent = results[0][method.name + "/sent"]
            assert sent["gradients"] > 0, method.name  # no DDP: the distributor averaged them
            if not method.per_parameter:  # statistics, or SMW's gathered rows, travelled
                assert sent["statistics"] + sent["rows"] > 0, method.name
            if world == 2:
                ddp_want = _reference_even(method, world)
                assert _close(results[0][method.name + "/ddp"], ddp_want), method.name


def _reference_even(method, world):
    model = mlp(seed=1)
    opt = None
    for x, t in data(world)[:STEPS_EVEN]:
        xb, over = reference_batch(method, x, world)
        tb, _ = reference_batch(method, t, world)
        opt = opt or make(method, model, **over)
        method.step(opt, model, xb, tb)
    return [p.detach().clone() for p in model.parameters()]


def test_owners_float32_resume_and_an_agreed_skip(tmp_path, monkeypatch):
    codes, logs, results = spawn("options", 2, tmp_path)
    assert codes == [0, 0], "\n".join(logs)
    monkeypatch.setattr(engine, "sample_output_grad", fake_sample)
    with one_thread():
        for method in METHODS:
            want = reference(method, 2)
            for got in results:
                assert _close(got[method.name + "/owners"], want), method.name
                assert got[method.name + "/resume"] is True, method.name
        assert [r["nan"]["skipped"] for r in results] == [1, 1]
        for p, q in zip(results[0]["nan"]["params"], results[1]["nan"]["params"]):
            assert torch.equal(p, q)
        want = reference(METHODS[0], 2)
        got = results[0][METHODS[0].name + "/float32"]
        assert all(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(got, want))


def test_a_failing_rank_makes_the_others_fail_not_hang(tmp_path):
    codes, logs, _ = spawn("fail", 2, tmp_path)
    assert codes[1] != 0
    assert "fails on purpose" in logs[1]
    assert codes[0] != 0, logs[0]  # rank 0 raised (a closed connection or the timeout)


# -- the driver's hooks, in one process ------------------------------------------------------


class _Halves(Distributor):
    """A stand-in for two ranks, seen from rank 0: it owns every other layer, and
    ``share_states`` records what it is handed."""

    def __init__(self):
        self.handed = []

    def refreshes(self, name):
        return name == "0"

    def share_states(self, states):
        self.handed.append(states)
        return states


def test_driver_refreshes_owned_layers_only_and_shares_its_own_states_dict():
    model = mlp(seed=1)
    opt = METHODS[0].make(model, refresh_every=1, stats_every=1)
    driver = opt._curv.driver
    hooks = _Halves()
    driver.distributor = hooks
    x, t = batches((3,), 1, n=8)[0]
    METHODS[0].step(opt, model, x, t)
    # the engine installs: the distributor is handed the driver's own dict, to update in place
    assert hooks.handed
    assert hooks.handed[0] is driver.states
    blocks = driver.blocks
    # the owned layer was refreshed (and released at the commit), the other never was
    assert set(driver.states) == {"0", "2"}
    assert not blocks["2"].ready(driver.states["2"])


def test_assign_lpt_balances_by_cost_and_is_deterministic():
    costs = {"a": 1.0, "b": 7.0, "c": 3.0, "d": 3.0, "e": 2.0}
    owners = assign_lpt(costs, 2)
    loads = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(2)]
    assert sorted(loads) == [8.0, 8.0]
    assert owners == assign_lpt(costs, 2)
    assert set(assign_lpt(costs, 3).values()) == {0, 1, 2}
    with pytest.raises(ValueError, match="ranks"):
        assign_lpt(costs, 0)


def test_nothing_distributed_without_a_process_group():
    assert not torch.distributed.is_initialized()
    opt = METHODS[0].make(mlp())
    assert type(opt._curv.driver.distributor) is Distributor
    with pytest.raises(RuntimeError, match="no process group"):
        TorchDistributor()
    code = (
        "import sys, torch; from curvlin.adapters.torch import KFAC; "
        "KFAC(torch.nn.Linear(2, 2)); "
        "sys.exit('curvlin.adapters.torch.distributed' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


def test_example_runs_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           os.path.join(ROOT, "examples", "distributed_train.py"), "--steps", "3",
           "--width", "16", "--batch", "32"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOIN_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "world 2" in done.stdout
    assert "statistics" in done.stdout
