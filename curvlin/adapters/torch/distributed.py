"""Data-parallel curvature on ``torch.distributed``: the :class:`TorchDistributor`.

The engine builds one automatically when a process group is initialised
(:func:`default_distributor`); nothing here is imported otherwise. Every rank runs the same
optimizer on its own shard of the batch, and the distributor makes every rank take the step one
process would take on the concatenated batch:

- the statistics (means over examples) are averaged, each rank weighted by its example count,
  in one all-reduce per dtype (a bucket; square statistics travel as upper triangles);
- parameter units' gradients (TNT, Shampoo), whose statistics are not linear in them, are
  averaged before their statistics are formed;
- the refresh (inverses, roots, eigenbases) of each layer runs on one rank, assigned by
  its refresh and preconditioning flops longest-processing-time first, and its new
  state is broadcast from that rank (one bucket per rank), or, with ``grad_workers="owners"``,
  kept there: the owner preconditions the layer and broadcasts the direction;
- what a second pass, a check or a coupled solve reads of the rows (K-BFGS's pairs and
  matrix-free ``A``, SMW's per-example gradients) is gathered across ranks, so the kernel of
  SMW is the global subsample's;
- the finiteness verdict is the ranks' minimum, so all ranks skip a step or none does;
- gradients are averaged (weighted by examples) unless DDP already does it.

Only ``torch.distributed`` collectives are used (all_reduce, broadcast, all_gather).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.distributed as dist

from ...blocks.base import Block, BlockState, LayerBatch, Rows
from ...blocks.driver import Distributor

__all__ = ["GRAD_WORKERS", "TorchDistributor", "assign_lpt", "default_distributor", "distribute"]

#: ``"all"``: every rank receives every refreshed state and preconditions every layer;
#: ``"owners"``: a layer's refreshed state stays on its owner, which preconditions it and
#: broadcasts the direction (less memory and refresh traffic, a direction broadcast per step).
GRAD_WORKERS = ("all", "owners")


def assign_lpt(costs: Mapping[str, float], ranks: int) -> dict[str, int]:
    """Each layer's owner: longest processing time first onto the least-loaded rank.

    Ties are broken by layer order and rank number, so every rank computes the same
    assignment.

    Examples
    --------
    >>> from curvlin.adapters.torch.distributed import assign_lpt
    >>> assign_lpt({"a": 8.0, "b": 5.0, "c": 4.0, "d": 3.0}, 2)
    {'a': 0, 'b': 1, 'c': 1, 'd': 0}
    """
    if ranks < 1:
        raise ValueError(f"assign_lpt: ranks must be >= 1, got {ranks!r}")
    order = sorted(range(len(costs)), key=lambda i: -list(costs.values())[i])
    names = list(costs)
    loads = [(0.0, r) for r in range(ranks)]
    out = {}
    for i in order:
        load, rank = heapq.heappop(loads)
        out[names[i]] = rank
        heapq.heappush(loads, (load + float(costs[names[i]]), rank))
    return {n: out[n] for n in names}


def default_distributor(model) -> Distributor | None:
    """A :class:`TorchDistributor` when a process group is initialised, else None.

    Gradients are averaged by the distributor unless ``model`` is a
    ``DistributedDataParallel`` (which averages them already).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None  # one process: nothing to share
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return TorchDistributor(reduce_gradients=not ddp)


def distribute(optimizer, **options) -> TorchDistributor:
    """Give a curvlin optimizer (or :class:`~curvlin.adapters.torch.Preconditioner`) a
    :class:`TorchDistributor` built with ``options`` (``grad_workers``, ``comm_dtype``,
    ``reduce_gradients``, ``group``) in place of the default one; returns it. Call it before
    the first step, on every rank alike.

    Examples
    --------
    One process in a gloo group (torchrun starts several the same way):

    >>> import torch
    >>> import torch.distributed as dist
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KFAC
    >>> from curvlin.adapters.torch.distributed import distribute
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> opt = KFAC(model, lr=0.1, damping=0.1)
    >>> distributor = distribute(opt, comm_dtype=torch.float32)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 2)
    >>> opt.zero_grad()
    >>> torch.nn.functional.mse_loss(model(x), y).backward()
    >>> opt.step()
    >>> distributor.owners, distributor.sent["statistics"]  # 4 triangles (99), 4 counts
    ({'0': 0, '2': 0}, 103)
    >>> dist.destroy_process_group()
    """
    curv = getattr(optimizer, "_curv", None)
    if curv is None:
        raise TypeError(
            "distribute: optimizer must be a curvlin optimizer or Preconditioner, got "
            f"{type(optimizer).__name__}"
        )
    driver = curv.driver
    distributor = TorchDistributor(**options)
    distributor.assign(driver.blocks)
    driver.distributor = distributor
    return distributor


class TorchDistributor(Distributor):
    """The :class:`~curvlin.blocks.Distributor` hooks on ``torch.distributed`` collectives.

    Parameters
    ----------
    group : ProcessGroup, optional
        The ranks to work with (default: the world).
    grad_workers : {"all", "owners"}
        Who preconditions a layer (:data:`GRAD_WORKERS`).
    comm_dtype : torch.dtype, optional
        Dtype in which floating arrays travel (statistics, states, gathered rows, directions);
        by default their own (exact). ``torch.float32`` halves the traffic of a float64 model
        at the cost of float32 rounding of what is communicated.
    reduce_gradients : bool
        Average the layers' gradients across ranks (weighted by examples on statistics steps,
        equally otherwise). False when DDP does it.

    Notes
    -----
    Bytes per step (``b`` bytes per communicated entry; ``d`` a statistic's size, ``d(d+1)/2``
    for a square one): statistics ``b · Σ d`` all-reduced on statistics steps; refreshed states
    ``b · Σ |state|`` broadcast on refresh steps (``"all"``), or the directions ``b · Σ |W̄|``
    broadcast every step (``"owners"``); gradients ``b · Σ |W̄|`` all-reduced when
    ``reduce_gradients``; for gathering methods (second pass, check, coupled solve) the
    gathered rows. :attr:`sent` counts the entries of each kind this rank has handed to a
    collective.
    """

    def __init__(
        self,
        *,
        group=None,
        grad_workers: str = "all",
        comm_dtype: torch.dtype | None = None,
        reduce_gradients: bool = True,
    ):
        if grad_workers not in GRAD_WORKERS:
            raise ValueError(
                f"TorchDistributor: grad_workers must be one of {GRAD_WORKERS}, "
                f"got {grad_workers!r}"
            )
        if comm_dtype is not None and not (
            isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point
        ):
            raise ValueError(
                f"TorchDistributor: comm_dtype must be a floating torch.dtype, got {comm_dtype!r}"
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchDistributor: no process group is initialised "
                "(call torch.distributed.init_process_group first)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.grad_workers = grad_workers
        self.comm_dtype = comm_dtype
        self.reduce_gradients_ = reduce_gradients
        self.owners: dict[str, int] = {}
        self.symmetric: dict[str, bool] = {}
        self.blocks: dict[str, Block] = {}
        #: Entries handed to collectives by this rank, by kind.
        self.sent = {"statistics": 0, "states": 0, "gradients": 0, "rows": 0, "directions": 0}

    # -- ownership -----------------------------------------------------------------------
    def assign(self, blocks: Mapping[str, Block], /) -> None:
        """Owners by :func:`assign_lpt` over each block's refresh and preconditioning flops
        (:meth:`Block.refresh_flops`, :meth:`Block.precondition_flops`): what an owner does."""
        costs = {n: b.refresh_flops() + b.precondition_flops() for n, b in blocks.items()}
        self.owners = assign_lpt(costs, self.world)
        self.symmetric = {n: b.symmetric_statistics for n, b in blocks.items()}
        self.blocks = dict(blocks)

    def refreshes(self, name: str, /) -> bool:
        """Whether this rank owns layer ``name`` (and so refreshes it)."""
        return self.owners.get(name, 0) == self.rank

    @property
    def precondition_all(self) -> bool:
        """Whether every rank preconditions every layer (``grad_workers="all"``)."""
        return self.grad_workers == "all"

    # -- reductions ----------------------------------------------------------------------
    def agree(self, finite):
        """The verdict of every rank: finite only where all are (a MIN all-reduce)."""
        flag = finite.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return flag[0] > 0

    def shared_gradient(self, batch: LayerBatch, /) -> LayerBatch:
        """A parameter unit's batch with its gradient averaged over the ranks' examples.

        Under DDP an ordinary gradient (``n_examples`` 1: the ``.grad`` DDP averaged) is
        global already; a gradient at sampled labels (TNT) never is.
        """
        if batch.grad is None or (not self.reduce_gradients_ and batch.n_examples == 1):
            return batch
        grad = batch.grad
        w = grad.new_tensor([float(batch.n_examples)])
        dist.all_reduce(w, group=self.group)
        buf = self._to_comm(grad.reshape(-1) * (batch.n_examples / w))
        self.sent["gradients"] += buf.numel()
        dist.all_reduce(buf, group=self.group)
        # the batch is now every rank's: its count too (1 stays 1, "not known")
        n = batch.n_examples if batch.n_examples == 1 else round(float(w[0]))
        return replace(batch, grad=buf.to(grad.dtype).reshape(grad.shape), n_examples=n)

    def reduce_statistics(self, stats, examples=None):
        """Example-weighted means over the ranks, one all-reduce per dtype.

        ``examples`` maps layer names to this rank's example count behind their statistics;
        a layer mapped to None is already global (a parameter unit's shared gradient) and
        is left as it is.
        """
        examples = examples or {}
        names = [n for n in stats if examples.get(n, 1) is not None]
        count = [float(examples.get(n, 1)) for n in names]
        if not names:
            return stats
        counts = dict(zip(names, count))
        items = [(n, k, a) for n in names for k, a in stats[n].items()]
        for dtype in _ordered(a.dtype for _, _, a in items):
            group = [it for it in items if it[2].dtype == dtype]
            # n_r·s_r and n_r in one buffer: the sum over ranks, divided, is the weighted mean
            parts = [_pack(a, self.symmetric.get(n, False)) * counts[n] for n, _, a in group]
            weights = group[0][2].new_tensor([counts[n] for n, _, _ in group])
            flat = self._to_comm(torch.cat([*parts, weights]))
            self.sent["statistics"] += flat.numel()
            dist.all_reduce(flat, group=self.group)
            flat = flat.to(dtype)
            totals = flat[-len(group) :]
            offset = 0
            for i, ((name, key, a), part) in enumerate(zip(group, parts)):
                mean = flat[offset : offset + part.numel()] / totals[i]
                stats[name][key] = _unpack(mean, a, self.symmetric.get(name, False))
                offset += part.numel()
        return stats

    def reduce_gradients(self, grads: list, /, examples: int | None = None) -> None:
        """Average gradients in place (:meth:`average`); nothing when DDP does it."""
        if self.reduce_gradients_:
            self.average(grads, examples, kind="gradients")

    def average(self, arrays: list, /, examples: int | None = None, *, kind="gradients"):
        """Average ``arrays`` in place, weighted by each rank's ``examples`` (equally where
        a rank does not know them): one all-reduce per dtype, the weight travelling with the
        arrays."""
        grads = [g for g in arrays if g is not None]
        if not grads:
            return
        n = 1.0 if examples is None else float(examples)
        for dtype in _ordered(g.dtype for g in grads):
            group = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in group] + [group[0].new_ones(1)]) * n
            flat = self._to_comm(flat)
            self.sent[kind] += flat.numel()
            dist.all_reduce(flat, group=self.group)
            flat = (flat[:-1] / flat[-1]).to(dtype)
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    # -- states --------------------------------------------------------------------------
    def share_states(self, states, /):
        """Broadcast each refreshed state from its owner, in place (``states`` is returned).

        With ``grad_workers="owners"`` nothing travels: each owner keeps its layers' states.
        """
        if not self.precondition_all:
            return states
        meta = {
            n: (
                type(s),
                {k: (tuple(a.shape), a.dtype) for k, a in self._refreshed(n, s).items()},
                s.counters(),
            )
            for n, s in states.items()
            if self.owners.get(n, 0) == self.rank and self._refreshing(n)
        }
        metas = [None] * self.world
        dist.all_gather_object(metas, meta, group=self.group)
        device = _device_of(states)
        for rank, owned in enumerate(metas):
            received: dict[str, dict] = {n: {} for n in owned}
            for dtype in _ordered(
                dt for _, shapes, _ in owned.values() for _, dt in shapes.values()
            ):
                keys = [
                    (n, k, shape)
                    for n, (_, shapes, _) in owned.items()
                    for k, (shape, dt) in shapes.items()
                    if dt == dtype
                ]
                size = sum(_numel(shape) for _, _, shape in keys)
                if size == 0:
                    continue
                wire = self._wire(dtype)
                if rank == self.rank:
                    arrays = {n: states[n].arrays() for n in owned}
                    flat = torch.cat([arrays[n][k].reshape(-1).to(wire) for n, k, _ in keys])
                    self.sent["states"] += flat.numel()
                else:
                    flat = torch.empty(size, dtype=wire, device=device)
                dist.broadcast(flat, src=_global_rank(rank, self.group), group=self.group)
                offset = 0
                for n, k, shape in keys:
                    part = flat[offset : offset + _numel(shape)]
                    # a copy: MKL's results depend on alignment, and every rank must agree
                    received[n][k] = part.reshape(shape).to(dtype, copy=True)
                    offset += _numel(shape)
            # The owner too takes its states from the bytes sent: the same values in the same
            # layout on every rank (a matmul's rounding depends on strides and alignment).
            for n, arrays in received.items():
                cls, shapes, counters = owned[n]
                for k, (shape, dtype) in shapes.items():  # an empty array travels as nothing
                    arrays.setdefault(k, torch.empty(shape, dtype=dtype, device=device))
                # what the refresh did not touch is the same on every rank already
                states[n] = cls.from_arrays({**states[n].arrays(), **arrays}, dict(counters))
        return states

    def _refreshing(self, name) -> bool:
        """Whether the layer's block has a refresh at all (K-BFGS has none: nothing to share)."""
        block = self.blocks.get(name)
        return block is None or type(block).refresh is not Block.refresh

    def _refreshed(self, name, state):
        """The arrays a refresh made (those :meth:`Block.release` drops); all of them for a
        block that releases nothing."""
        arrays = state.arrays()
        block = self.blocks.get(name)
        if block is None:
            return arrays
        kept = block.release(state).arrays()
        made = {k: a for k, a in arrays.items() if k not in kept}
        return made or arrays

    def share_directions(self, directions, grads, /):
        """``grad_workers="owners"``: every layer's direction, broadcast from its owner
        (``directions`` holds this rank's layers; a layer its owner could not precondition
        yet arrives as zeros)."""
        out = {}
        for rank in range(self.world):
            names = [n for n in grads if self.owners.get(n, 0) == rank]
            if not names:
                continue
            parts = []
            for n in names:
                for g, d in zip(grads[n], directions.get(n, (None, None))):
                    if g is None:
                        continue
                    if rank == self.rank:
                        parts.append(
                            torch.zeros_like(g).reshape(-1) if d is None else d.reshape(-1)
                        )
                    else:
                        parts.append(torch.empty_like(g).reshape(-1))
            dtype = parts[0].dtype
            flat = self._to_comm(torch.cat([p.to(dtype) for p in parts]))
            if rank == self.rank:
                self.sent["directions"] += flat.numel()
            dist.broadcast(flat, src=_global_rank(rank, self.group), group=self.group)
            flat = flat.to(dtype)
            offset = 0
            for n in names:
                pair = []
                for g in grads[n]:
                    if g is None:
                        pair.append(None)
                        continue
                    part = flat[offset : offset + g.numel()].view(g.shape)
                    pair.append(part.to(g.dtype, copy=True))
                    offset += g.numel()
                out[n] = tuple(pair)
        return out

    # -- rows ------------------------------------------------------------------------------
    def global_batches(self, blocks, batches, /):
        """``batches`` as one process would see the concatenated batch of all ranks: rows
        gathered (rank-major), each rank's ``grad_scale`` folded into its output gradients;
        what a block reads only as a mean over rows (``Block.row_means``,
        ``Block.input_means``) averaged instead, weighted by each rank's examples.

        Every layer at once: one all-gather of the example counts (read on the host), one
        all-reduce of the row means, one all-gather of the rows per dtype.
        """
        names = list(batches)
        if not names:
            return {}
        like = next(a for b in batches.values() for a in b.arrays())
        local = torch.tensor(
            [[b.examples or b.n_examples, b.n_examples] for b in batches.values()],
            dtype=torch.int64,
            device=like.device,  # NCCL reduces device tensors only
        )
        every = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(every, local, group=self.group)
        every = torch.stack(every).tolist()  # (rank, layer, 2): one small host read
        means, rows = [], []  # (name, key, array) to average / to gather
        fields = {}
        for i, name in enumerate(names):
            block, batch = blocks[name], batches[name]
            grads = batch.output_grads
            if grads is not None and batch.grad_scale != 1.0:
                grads = grads * batch.grad_scale  # per example, so ranks' rows can be joined
            inputs = batch.inputs
            if isinstance(inputs, Rows):  # rows known through products are gathered built
                inputs = inputs.array()
            fields[name] = {"inputs": inputs, "outputs": batch.outputs,
                            "output_grads": grads}  # fmt: skip
            total = sum(r[i][0] for r in every)
            for key, a in fields[name].items():
                if a is None:
                    continue
                if block.input_means if key == "inputs" else block.row_means:
                    share = (batch.examples or batch.n_examples) / total
                    means.append((name, key, torch.mean(a, dim=tuple(range(a.ndim - 1))) * share))
                else:
                    rows.append((i, name, key, a, block.output_directions))
        for (name, key, _), mean in zip(means, self._sum(x for *_, x in means)):
            fields[name][key] = mean.reshape(1, -1)
        for (_, name, key, _, _), joined in zip(rows, self._gather(rows, every)):
            fields[name][key] = joined
        return {
            name: replace(
                batches[name],
                **fields[name],
                grad_scale=1.0,
                n_examples=sum(r[i][1] for r in every),
                examples=sum(r[i][0] for r in every),
            )
            for i, name in enumerate(names)
        }

    def _sum(self, arrays) -> list:
        """The sums over ranks of ``arrays``, in one all-reduce per dtype."""
        arrays = list(arrays)
        out = [None] * len(arrays)
        for dtype in _ordered(a.dtype for a in arrays):
            idx = [j for j, a in enumerate(arrays) if a.dtype == dtype]
            flat = self._to_comm(torch.cat([arrays[j].reshape(-1) for j in idx]))
            self.sent["rows"] += flat.numel()
            dist.all_reduce(flat, group=self.group)
            flat, offset = flat.to(dtype), 0
            for j in idx:
                out[j] = flat[offset : offset + arrays[j].numel()].view_as(arrays[j])
                offset += arrays[j].numel()
        return out

    def _gather(self, rows, every) -> list:
        """Every rank's rows of each array, joined along the example axis: padded to the
        largest rank's, gathered in one all-gather per dtype, cut back and concatenated."""
        out = [None] * len(rows)
        plans = []
        for i, _, key, a, directions in rows:
            # (k, R, d_out): k output directions per example (exact Gauss-Newton)
            axis = 1 if key == "output_grads" and directions and a.ndim == 3 else 0
            counts = [r[i][0] for r in every]
            per = a.shape[axis] // max(counts[self.rank], 1)  # rows per example
            shape = list(a.shape)
            shape[axis] = max(counts) * per
            plans.append((axis, per, counts, shape))
        for dtype in _ordered(a.dtype for _, _, _, a, _ in rows):
            idx = [j for j, r in enumerate(rows) if r[3].dtype == dtype]
            parts = []
            for j in idx:
                a, (axis, _, _, shape) = rows[j][3], plans[j]
                pad = shape[axis] - a.shape[axis]
                if pad:
                    fill = list(shape)
                    fill[axis] = pad
                    a = torch.cat([a, a.new_zeros(fill)], dim=axis)
                parts.append(a.reshape(-1))
            flat = self._to_comm(torch.cat(parts))
            self.sent["rows"] += flat.numel()
            gathered = [torch.empty_like(flat) for _ in range(self.world)]
            dist.all_gather(gathered, flat, group=self.group)
            offset = 0
            for j in idx:
                axis, per, counts, shape = plans[j]
                size = _numel(shape)
                pieces = [
                    g[offset : offset + size].view(shape).narrow(axis, 0, c * per)
                    for g, c in zip(gathered, counts)
                ]
                out[j] = torch.cat(pieces, dim=axis).to(dtype)
                offset += size
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _wire(self, dtype):
        if self.comm_dtype is not None and dtype.is_floating_point:
            return self.comm_dtype
        return dtype if dtype.is_floating_point else torch.float64

    def _to_comm(self, a):
        wire = self._wire(a.dtype)
        return a if a.dtype == wire else a.to(wire)


def _square(a, symmetric: bool) -> bool:
    return symmetric and a.ndim == 2 and a.shape[0] == a.shape[1] and a.shape[0] > 1


def _pack(a, symmetric: bool):
    """A symmetric statistic as its upper triangle, anything else flat."""
    if _square(a, symmetric):
        i, j = torch.triu_indices(a.shape[0], a.shape[0], device=a.device)
        return a[i, j]
    return a.reshape(-1)


def _unpack(flat, like, symmetric: bool):
    if _square(like, symmetric):
        d = like.shape[0]
        i, j = torch.triu_indices(d, d, device=flat.device)
        out = flat.new_empty((d, d))
        out[i, j] = flat
        out[j, i] = flat
        return out
    return flat.reshape(like.shape).clone()  # aligned like a local array


def _ordered(dtypes) -> list:
    """Distinct dtypes in an order every rank agrees on (a set's order is per process)."""
    return sorted(set(dtypes), key=str)


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _device_of(states: Mapping[str, BlockState]):
    for s in states.values():
        for a in s.arrays().values():
            return a.device
    return torch.device("cpu")


def _global_rank(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)
