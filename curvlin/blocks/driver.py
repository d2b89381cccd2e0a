"""The framework-free driver that runs blocks: schedule, states, the non-finite skip, checkpoints.

A :class:`Driver` owns one :class:`~curvlin.blocks.Block` and one state per layer and the step
counter. A framework adapter (torch, CuPy) captures a step's :class:`~curvlin.blocks.LayerBatch`
per layer and asks the driver, in this order:

1. :meth:`Driver.all_finite` on the step's gradients and batches; on False, :meth:`Driver.skip`
   and stop (nothing else changes);
2. :meth:`Driver.statistics` (reduced across ranks by the distributor), whose
   :meth:`Driver.probes` join the finiteness check of step 1, then :meth:`Driver.fold_refresh`:
   fold, and refresh when due; it returns the new states without committing them (or, with
   ``install``, puts each in place of the current one as it is made);
3. :meth:`Driver.precondition` with those states (and, for coupled blocks, the step's
   batches: their layers are solved together);
4. the adapter updates the parameters; then, on statistics steps of a method with a second
   pass, :meth:`Driver.before_second_pass` (which consumes the batches' inputs, so the
   adapter can free them before the second forward pass) and :meth:`Driver.second_pass`
   with the batch seen again;
5. :meth:`Driver.check` when due, and :meth:`Driver.commit`.

Without ``install`` nothing is written to the driver before :meth:`commit`, so an exception
anywhere before it leaves the optimizer's state as it was; an adapter that installs does so
only past the finiteness verdict, after which the step commits whatever follows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace

from ..backends import Array, get_backend
from ._schedule import Schedule
from .base import Block, BlockState, LayerBatch
from .kernel import kernel_solve

__all__ = ["CHECKPOINT_FORMAT", "Distributor", "Driver"]

#: Version of the layout of :meth:`Driver.state_dict`.
CHECKPOINT_FORMAT = 1


class Distributor:
    """The distribution hook point: what a driver asks of the other ranks. In one process,
    nothing (this class); a distributed adapter (e.g.
    :class:`curvlin.adapters.torch.distributed.TorchDistributor`) overrides the hooks.
    """

    #: Whether every rank preconditions every layer (else each layer's owner does, and
    #: :meth:`share_directions` hands the directions to the others).
    precondition_all: bool = True
    #: The number of ranks (1: this class). Collectives must come in the same order on every
    #: rank, so an adapter batches per-layer work over all layers when it is above 1.
    world: int = 1

    def assign(self, blocks: Mapping[str, Block], /) -> None:
        """Learn the layers (e.g. to give each an owning rank by its cost formulas)."""

    def refreshes(self, name: str, /) -> bool:
        """Whether this rank refreshes layer ``name`` (its owner does)."""
        return True

    def agree(self, finite: Array, /) -> Array:
        """The finiteness verdict of all ranks (finite only where every rank's is)."""
        return finite

    def shared_gradient(self, batch: LayerBatch, /) -> LayerBatch:
        """A parameter unit's batch with its gradient averaged over the ranks (its statistics
        are not linear in the gradient, and are not reduced again); any other batch as it
        is."""
        return batch

    def reduce_statistics(
        self,
        stats: dict[str, dict[str, Array]],
        examples: Mapping[str, int | None] | None = None,
        /,
    ) -> dict[str, dict[str, Array]]:
        """Average each layer's statistics over the ranks (they are means over examples),
        weighted by ``examples`` (this rank's count per layer; None: already global)."""
        return stats

    def average(self, arrays: list, /, examples: int | None = None) -> None:
        """Average ``arrays`` over the ranks in place, weighted by ``examples`` (this rank's
        count; None: equally), whatever else averages the gradients (a loss, say)."""

    def reduce_gradients(self, grads: list, /, examples: int | None = None) -> None:
        """Average the step's gradients over the ranks, in place, weighted by ``examples``
        (this rank's count, None if unknown), unless something else (DDP) does."""

    def share_states(self, states: dict[str, BlockState], /) -> dict[str, BlockState]:
        """Make every rank hold the refreshed states (e.g. broadcast from each layer's
        owner). ``states`` may be the driver's own dict (``install``): update it in place and
        return it."""
        return states

    def share_directions(self, directions: dict, grads: Mapping, /) -> dict:
        """Every layer's direction, from the ranks that made them (only called when not
        :attr:`precondition_all`)."""
        return directions

    def global_batches(
        self, blocks: Mapping[str, Block], batches: Mapping[str, LayerBatch], /
    ) -> Mapping[str, LayerBatch]:
        """``batches`` as one process would see the whole batch of all ranks (for what
        reads rows after the statistics: second passes, checks, coupled solves)."""
        return batches


class Driver:
    """Per-layer blocks and states, run on one :class:`Schedule`.

    Parameters
    ----------
    blocks : mapping of str to Block
        One block per layer, by layer name.
    states : mapping of str to BlockState
        The initial states (from each block's ``init``), by the same names.
    schedule : Schedule
    owner : str
        The name used in warnings and errors (the optimizer's class name).
    distributor : Distributor, optional
        Reduces statistics and shares states across ranks; by default a no-op.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.blocks import Driver, KFACBlock, LayerBatch, Schedule
    >>> rng = np.random.default_rng(0)
    >>> block = KFACBlock(d_out=3, d_in=4)
    >>> driver = Driver({"fc": block}, {"fc": block.init(np.zeros(0))}, schedule=Schedule())
    >>> batch = LayerBatch(inputs=rng.standard_normal((8, 4)),
    ...                    output_grads=rng.standard_normal((8, 3)), n_examples=8)
    >>> grads = {"fc": (np.ones((3, 4)), np.ones(3))}
    >>> stats = driver.statistics({"fc": batch})
    >>> driver.all_finite([*grads["fc"], *driver.probes(stats)])
    True
    >>> states = driver.fold_refresh(stats, damping={"fc": 0.1})
    >>> dw, db = driver.precondition(states, grads)["fc"]
    >>> driver.commit(states)
    >>> driver.step, dw.shape
    (1, (3, 4))
    """

    def __init__(
        self,
        blocks: Mapping[str, Block],
        states: Mapping[str, BlockState],
        *,
        schedule: Schedule,
        owner: str = "curvlin",
        distributor: Distributor | None = None,
    ):
        if set(blocks) != set(states):
            raise ValueError("Driver: blocks and states must have the same layer names")
        self.blocks = dict(blocks)
        self.states = dict(states)
        self.schedule = schedule
        self.owner = owner
        self.distributor = distributor or Distributor()
        self.distributor.assign(self.blocks)
        #: Steps taken (skipped ones not counted).
        self.step = 0
        #: Steps skipped because their gradients or statistics held NaN or inf.
        self.skipped = 0
        #: Factors rebuilt by a check (see :meth:`Block.check`).
        self.repaired = 0

    @property
    def needs(self) -> frozenset[str]:
        """What any block needs from a step."""
        return frozenset().union(*(b.needs for b in self.blocks.values()))

    @property
    def coupled(self) -> bool:
        """Whether some layers are preconditioned together (:attr:`Block.coupled`): their
        :meth:`precondition` then needs the step's batches."""
        return any(b.coupled for b in self.blocks.values())

    # -- the schedule ----------------------------------------------------------------------
    def stats_due(self) -> bool:
        """Whether this step gathers statistics (and runs a second pass where one is needed)."""
        return self.schedule.stats_due(self.step)

    def refresh_due(self) -> bool:
        """Whether this step refreshes the amortised part."""
        return self.schedule.refresh_due(self.step)

    def check_due(self) -> bool:
        """Whether this step checks and repairs the states."""
        return self.schedule.check_due(self.step)

    # -- the step --------------------------------------------------------------------------
    @staticmethod
    def all_finite(arrays) -> bool:
        """Whether every entry of every array is finite: one host synchronisation in all.

        A sum per array is one reduction with no boolean temporaries; NaN or inf anywhere
        makes it non-finite (so does a finite overflow, which deserves a skip as well).
        """
        arrays = [a for a in arrays if a is not None]
        if not arrays:
            return True
        xp = get_backend(arrays[0]).xp
        sums = xp.stack([xp.astype(xp.sum(a), xp.float32) for a in arrays])
        return bool(xp.all(xp.isfinite(sums)))

    def verdict(self, arrays) -> bool:
        """:meth:`all_finite`, agreed by every rank (:meth:`Distributor.agree`): all ranks skip
        a step or none does. Still one host synchronisation."""
        arrays = [a for a in arrays if a is not None]
        if not arrays:
            return True
        xp = get_backend(arrays[0]).xp
        sums = xp.stack([xp.astype(xp.sum(a), xp.float32) for a in arrays])
        return bool(self.distributor.agree(xp.all(xp.isfinite(sums))))

    def skip(self, why: str = "its gradients or curvature statistics hold NaN or inf") -> None:
        """Count a skipped step and warn; nothing else changes."""
        self.skipped += 1
        warnings.warn(
            f"{self.owner}: step {self.step} skipped, {why} (optimizer state left unchanged)",
            RuntimeWarning,
            stacklevel=3,
        )

    def statistics(self, batches: Mapping[str, LayerBatch], /) -> dict[str, dict[str, Array]]:
        """Each captured layer's :meth:`Block.statistics`, averaged across ranks (weighted by
        their examples; a parameter unit's gradient is averaged first)."""
        stats, examples = {}, {}
        for name, batch in batches.items():
            shared = self.distributor.shared_gradient(batch)
            # a parameter unit's statistics come from a gradient that is already global
            examples[name] = batch.n_examples if batch.grad is None else None
            stats[name] = self.blocks[name].statistics(self.states[name], shared)
            del batch, shared
        return self.distributor.reduce_statistics(stats, examples)

    @staticmethod
    def probes(stats: Mapping[str, Mapping[str, Array]] | None, /) -> list[Array]:
        """What :meth:`all_finite` must see of ``stats``: a square statistic's diagonal (a
        Gram matrix, where a NaN or inf row always lands), any other statistic whole."""
        out = []
        for layer_stats in (stats or {}).values():
            for a in layer_stats.values():
                square = a.ndim == 2 and a.shape[0] == a.shape[1]
                out.append(get_backend(a).xp.linalg.diagonal(a) if square else a)
        return out

    def fold_refresh(
        self,
        stats: Mapping[str, Mapping[str, Array]] | None,
        /,
        *,
        damping: Mapping[str, float],
        consume: bool = False,
        install: bool = False,
    ) -> dict[str, BlockState]:
        """Fold ``stats`` (layers not in it keep their state), then refresh when due.

        ``damping`` holds every layer's damping. With ``consume`` (a dict ``stats``), each
        layer's statistics are popped from ``stats`` as they are folded, so their memory is
        freed layer by layer instead of after the last refresh. Without ``install`` nothing
        is committed (the step's states are returned next to the current ones). With it,
        each new state replaces the current one as soon as it is made, so that the old
        factors and inverses are freed layer by layer and the step never holds two copies
        of the curvature: for an adapter that has passed the finiteness verdict and will
        commit whatever happens next (:meth:`commit` still counts the step). Installed folds
        update the factors in place (``Block.fold(..., overwrite=True)``), so arrays read from
        the states before are overwritten too, as torch's optimizers overwrite their buffers.
        """
        states = self.states if install else dict(self.states)
        for name in list(stats or {}):
            layer_stats = stats.pop(name) if consume else stats[name]
            states[name] = self.blocks[name].fold(
                states[name], layer_stats, damping=damping[name], overwrite=install
            )
            del layer_stats
        if self.refresh_due():
            for name, block in self.blocks.items():
                if self.distributor.refreshes(name):  # this rank owns the layer
                    states[name] = block.refresh(states[name], damping=damping[name])
            states = self.distributor.share_states(states)
        return states

    def warm_start(
        self, batches: Iterable[Mapping[str, LayerBatch]], /, *, damping: Mapping[str, float]
    ) -> int:
        """Before the first step, make the mean statistics of several batches the first ones.

        Each item of ``batches`` is one batch's :class:`LayerBatch` per layer. Their
        statistics (means over examples) are averaged, weighted by each batch's
        ``n_examples`` (1 where an adapter does not know it, e.g. a parameter unit's
        empirical gradient: then the arithmetic mean over batches), folded as one batch (a
        block's first fold takes its statistics as they are: an EMA starts at the mean) and
        refreshed; no step is counted, so the schedule is unchanged. The first step then
        folds its own batch as any later one does. A batch whose statistics hold NaN or inf
        raises before anything changes. Returns the number of batches.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlin.blocks import Driver, KFACBlock, LayerBatch, Schedule
        >>> rng = np.random.default_rng(0)
        >>> block = KFACBlock(d_out=2, d_in=3)
        >>> driver = Driver({"fc": block}, {"fc": block.init(np.zeros(0))}, schedule=Schedule())
        >>> parts = [{"fc": LayerBatch(inputs=rng.standard_normal((4, 3)),
        ...                            output_grads=rng.standard_normal((4, 2)), n_examples=4)}
        ...          for _ in range(3)]
        >>> driver.warm_start(parts, damping={"fc": 0.1}), driver.step
        (3, 0)
        >>> one = [Driver({"fc": block}, {"fc": block.init(np.zeros(0))}, schedule=Schedule())
        ...        for _ in parts]
        >>> for d, part in zip(one, parts):
        ...     _ = d.warm_start([part], damping={"fc": 0.1})
        >>> bool(np.allclose(driver.states["fc"].a, sum(d.states["fc"].a for d in one) / 3))
        True
        """
        if self.step != 0:
            raise RuntimeError(
                f"{self.owner}.warm_start: only before the first step (this is step {self.step})"
            )
        total: dict[str, dict[str, Array]] = {}
        weight: dict[str, float] = {}
        count = 0
        for part in batches:
            stats = self.statistics(part)
            if not self.verdict(self.probes(stats)):
                raise ValueError(
                    f"{self.owner}.warm_start: the statistics of batch {count} hold NaN or inf "
                    "(nothing was changed)"
                )
            for name, layer_stats in stats.items():
                w = float(part[name].n_examples)
                weight[name] = weight.get(name, 0.0) + w
                old = total.setdefault(name, {})
                for key, value in layer_stats.items():
                    old[key] = w * value if key not in old else old[key] + w * value
            count += 1
        mean = {name: {k: v / weight[name] for k, v in s.items()} for name, s in total.items()}
        self.update(self.fold_refresh(mean, damping=damping))
        if self.schedule.refresh_every == 1:  # the first step refreshes before it preconditions
            for name, block in self.blocks.items():
                self.states[name] = block.release(self.states[name])
        return count

    def precondition(
        self,
        states: Mapping[str, BlockState],
        grads: Mapping[str, tuple[Array, Array | None]],
        *,
        batches: Mapping[str, LayerBatch] | None = None,
        damping: Mapping[str, float] | None = None,
    ) -> dict[str, tuple[Array, Array | None]]:
        """Directions ``(dW, db)`` for the layers in ``grads`` whose state is ready.

        Layers of :attr:`Block.coupled` blocks are preconditioned together, in one
        :func:`~curvlin.blocks.kernel_solve` over this step's ``batches`` with their common
        ``damping``; a coupled layer with a gradient but no batch (not reached by this step's
        forward pass: its per-example gradients are zero) gets ``∇W̄ / λ``.
        """
        return dict(self.directions(states, grads, batches=batches, damping=damping))

    def directions(
        self,
        states: Mapping[str, BlockState],
        grads: Mapping[str, tuple[Array, Array | None]],
        *,
        batches: Mapping[str, LayerBatch] | None = None,
        damping: Mapping[str, float] | None = None,
    ) -> Iterator[tuple[str, tuple[Array, Array | None]]]:
        """:meth:`precondition` one layer at a time, for an adapter that applies each
        direction as it comes (only one layer's direction is alive at a time); the coupled
        layers come last, from their one solve.

        The per-layer directions come smallest first (by ``d_out·d_a``): an adapter that frees
        each layer's batch once its direction is applied (:meth:`before_second_pass` with
        ``names``) then makes the largest directions when the fewest batches are left.
        ``states`` is read as each layer comes, so it may be the dictionary such calls update.
        """
        coupled = []
        dist = self.distributor
        mine = {}
        for name in sorted(grads, key=lambda n: self.blocks[n].d_out * self.blocks[n].d_a):
            grad_w, grad_b = grads[name]
            block, state = self.blocks[name], states[name]
            if block.coupled:
                coupled.append(name)
            elif not dist.precondition_all:
                if dist.refreshes(name) and block.ready(state):
                    mine[name] = block.precondition(state, grad_w, grad_b)
            elif block.ready(state):
                yield name, block.precondition(state, grad_w, grad_b)
        if not dist.precondition_all:
            rest = {n: g for n, g in grads.items() if not self.blocks[n].coupled}
            yield from dist.share_directions(mine, rest).items()
        if coupled:
            yield from self._precondition_coupled(coupled, grads, batches, damping).items()

    def _precondition_coupled(self, names, grads, batches, damping):
        if batches is None or damping is None:
            raise RuntimeError(
                f"{self.owner}: coupled layers {names} need the step's batches and damping"
            )
        values = {damping[n] for n in names}
        if len(values) != 1:
            raise ValueError(
                f"{self.owner}: the layers are coupled through one solve and need one damping, "
                f"got {sorted(values)}"
            )
        lam = values.pop()
        parts, lone = [], []
        # the kernel couples the examples of every rank
        batches = self.distributor.global_batches(
            self.blocks, {n: batches[n] for n in names if n in batches}
        )
        for name in names:
            block = self.blocks[name]
            mat = block.joined(*grads[name])
            if name in batches:
                parts.append((name, (block, batches[name], mat)))
            else:
                lone.append((name, mat / lam))
        steps = kernel_solve([p for _, p in parts], damping=lam) if parts else []
        pairs = [(n, s) for (n, _), s in zip(parts, steps)] + lone
        return {n: self.blocks[n].split(s, dtype=grads[n][0].dtype) for n, s in pairs}

    def before_second_pass(
        self,
        states: Mapping[str, BlockState],
        batches: Mapping[str, LayerBatch],
        *,
        damping: Mapping[str, float],
        install: bool = False,
        names: Iterable[str] | None = None,
    ) -> tuple[dict[str, BlockState], dict[str, LayerBatch]]:
        """:meth:`Block.before_second_pass` of every layer with a second pass; returns the
        states and the batches to hand :meth:`second_pass`, without their inputs (they are
        consumed: an adapter frees them before the second forward pass). It runs whether or
        not the second pass then sees the layer again the same way (:meth:`second_pass` skips
        such a layer's pair update only). ``install`` as in :meth:`fold_refresh` (the new
        states replace the current ones at once). ``names``: only these layers (an adapter
        that applies directions one layer at a time frees each layer's inputs after its
        direction; the update reads the state the direction used, so the result is the same)."""
        states, rest = (self.states if install else dict(states)), dict(batches)
        due = {
            name: batches[name]
            for name in (batches if names is None else names)
            if "second_pass" in self.blocks[name].needs and batches[name].inputs is not None
        }
        for name, whole in self.distributor.global_batches(self.blocks, due).items():
            block = self.blocks[name]
            states[name] = block.before_second_pass(states[name], whole, damping=damping[name])
            rest[name] = replace(batches[name], inputs=None)
        return states, rest

    def second_pass(
        self,
        states: Mapping[str, BlockState],
        batches: Mapping[str, LayerBatch],
        batches_plus: Mapping[str, LayerBatch],
        *,
        damping: Mapping[str, float],
    ) -> dict[str, BlockState]:
        """Second-pass updates of the layers seen in both passes on the same rows."""
        states = dict(states)
        pairs = {}
        for name, batch in batches.items():
            plus = batches_plus.get(name)
            if "second_pass" not in self.blocks[name].needs or plus is None:
                continue
            if plus.outputs is not None and tuple(plus.outputs.shape) != tuple(batch.outputs.shape):
                continue  # the layer was not reached the same way in the second pass
            pairs[name] = (batch, plus)
        whole = self.distributor.global_batches(self.blocks, {n: b for n, (b, _) in pairs.items()})
        plus = self.distributor.global_batches(self.blocks, {n: p for n, (_, p) in pairs.items()})
        for name in pairs:
            block = self.blocks[name]
            states[name] = block.second_pass(
                states[name], whole[name], plus[name], damping=damping[name]
            )
        return states

    def second_pass_after_commit(
        self,
        batches: Mapping[str, LayerBatch],
        batches_plus: Mapping[str, LayerBatch],
        *,
        damping: Mapping[str, float],
    ) -> None:
        """The second pass of the step just committed, for an adapter whose parameter update
        happens outside its step (a preconditioner in front of another optimizer, a model in
        plain array code): :meth:`second_pass` on the current states, :meth:`check` when that
        step was due one (with a warning per rebuilt layer), then :meth:`update`."""
        states = self.second_pass(self.states, batches, batches_plus, damping=damping)
        rebuilt = {}
        if self.schedule.check_due(self.step - 1):  # the step this pass belongs to
            states, rebuilt = self.check(states, batches, damping=damping)
            self.warn_rebuilt(rebuilt)
        self.update(states, repaired=sum(len(v) for v in rebuilt.values()))

    def check(
        self,
        states: Mapping[str, BlockState],
        batches: Mapping[str, LayerBatch],
        *,
        damping: Mapping[str, float],
    ) -> tuple[dict[str, BlockState], dict[str, tuple[str, ...]]]:
        """:meth:`Block.check` of every captured layer; returns the states and what was rebuilt."""
        states = dict(states)
        rebuilt = {}
        for name, whole in self.distributor.global_batches(self.blocks, batches).items():
            block = self.blocks[name]
            states[name], what = block.check(states[name], whole, damping=damping[name])
            if what:
                rebuilt[name] = what
        return states, rebuilt

    def commit(self, states: Mapping[str, BlockState], *, repaired: int = 0) -> None:
        """Make ``states`` the current ones and count the step.

        With ``refresh_every = 1`` the next step refreshes before it preconditions, so what
        :meth:`Block.release` names (the inverses) is dropped here: between steps the state
        is the statistics alone, and the next step's statistics never sit next to two sets
        of inverses. :meth:`current` rebuilds them for a look between steps.
        """
        self.update(states, repaired=repaired)
        if self.schedule.refresh_every == 1:
            for name, block in self.blocks.items():
                self.states[name] = block.release(self.states[name])
        self.step += 1

    def current(self, name: str, /, *, damping) -> BlockState:
        """Layer ``name``'s state with its refresh in place: as stored, or, where
        :meth:`commit` released it, refreshed again with ``damping`` (the inverse the last
        step used, if its damping has not changed since). Nothing is stored."""
        block, state = self.blocks[name], self.states[name]
        if self.schedule.refresh_every == 1 and not block.ready(state):
            state = block.refresh(state, damping=damping)
        return state

    def update(self, states: Mapping[str, BlockState], *, repaired: int = 0) -> None:
        """Replace states without counting a step (a second pass after the step's commit)."""
        self.states.update(states)
        self.repaired += repaired

    def warn_rebuilt(self, rebuilt: Mapping[str, tuple[str, ...]]) -> None:
        """One ``RuntimeWarning`` per layer whose factors :meth:`check` rebuilt."""
        for name, what in rebuilt.items():
            warnings.warn(
                f"{self.owner}: layer {name!r}: {' and '.join(what)} no longer positive definite "
                f"at step {self.step}; rebuilt ({type(self.blocks[name]).__name__}.check)",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self, convert: Callable[[Array], object] = lambda a: a) -> dict:
        """Counters and every layer's arrays (passed through ``convert``) and counters."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "skipped": self.skipped,
            "repaired": self.repaired,
            "layers": {
                name: {
                    "arrays": {k: convert(v) for k, v in state.arrays().items()},
                    "counters": dict(state.counters()),
                }
                for name, state in self.states.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping, convert: Callable[[str, str, object], Array]):
        """Restore :meth:`state_dict` output, all or nothing.

        ``convert(layer, key, value)`` turns a saved value into an array of this driver's
        library and device. Every layer, array name, shape, dtype, counter and value is
        checked first (:meth:`validated`), with an error naming the layer and the buffer; only
        then is anything replaced (:meth:`restore`).
        """
        self.restore(self.validated(state_dict, convert))

    def restore(self, validated: tuple[dict[str, BlockState], dict[str, int]]) -> None:
        """Install what :meth:`validated` returned."""
        states, counts = validated
        self.states = dict(states)
        self.step, self.skipped, self.repaired = (
            counts[k] for k in ("step", "skipped", "repaired")
        )

    def validated(self, state_dict: Mapping, convert: Callable[[str, str, object], Array]):
        """Check a :meth:`state_dict` and build its states without installing them."""
        where = f"{self.owner}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(state_dict).__name__}")
        if state_dict.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{where}: checkpoint format {state_dict.get('format')!r}, expected "
                f"{CHECKPOINT_FORMAT}"
            )
        counts = {k: state_dict.get(k) for k in ("step", "skipped", "repaired")}
        for key, value in counts.items():
            _check_count(value, f"{where}: {key!r}")
        layers = state_dict.get("layers")
        if not isinstance(layers, Mapping) or set(layers) != set(self.blocks):
            got = sorted(layers) if isinstance(layers, Mapping) else layers
            raise ValueError(
                f"{where}: the checkpoint's layers {got} are not this optimizer's layers "
                f"{sorted(self.blocks)}"
            )
        new = {}
        for name, block in self.blocks.items():
            new[name] = self._load_layer(where, name, block, layers[name], convert)
        return new, counts

    def _load_layer(self, where, name, block, saved, convert) -> BlockState:
        current = self.states[name]
        if not isinstance(saved, Mapping) or set(saved) != {"arrays", "counters"}:
            raise ValueError(f"{where}: layer {name!r}: expected keys 'arrays' and 'counters'")
        arrays_in, counters = saved["arrays"], saved["counters"]
        shapes = block.state_shapes()
        if not isinstance(arrays_in, Mapping) or not set(arrays_in) <= set(shapes):
            unknown = sorted(set(arrays_in) - set(shapes)) if isinstance(arrays_in, Mapping) else []
            raise ValueError(
                f"{where}: layer {name!r}: unknown buffers {unknown} for {type(block).__name__}"
            )
        want_counters = set(current.counters())
        if not isinstance(counters, Mapping) or set(counters) != want_counters:
            raise ValueError(
                f"{where}: layer {name!r}: counters must be {sorted(want_counters)}, got "
                f"{sorted(counters) if isinstance(counters, Mapping) else counters!r}"
            )
        for key, value in counters.items():
            _check_count(value, f"{where}: layer {name!r}: counter {key!r}")
        dtype = block.work_dtype(current)
        arrays = {}
        for key, value in arrays_in.items():
            what = f"{where}: layer {name!r}: buffer {key!r}"
            array = convert(name, key, value)
            if tuple(array.shape) != shapes[key]:
                raise ValueError(f"{what} has shape {tuple(array.shape)}, expected {shapes[key]}")
            xp = get_backend(array).xp
            if xp.isdtype(array.dtype, "bool"):
                arrays[key] = array
                continue
            if array.dtype != dtype:
                raise ValueError(f"{what} has dtype {array.dtype}, expected {dtype}")
            if not bool(xp.all(xp.isfinite(array))):
                raise ValueError(f"{what} holds NaN or inf")
            arrays[key] = array
        try:
            state = type(current).from_arrays(arrays, dict(counters))
        except KeyError as missing:
            raise ValueError(f"{where}: layer {name!r}: missing buffer {missing}") from None
        if set(state.arrays()) != set(arrays):
            raise ValueError(
                f"{where}: layer {name!r}: buffers {sorted(arrays)} do not form a "
                f"{type(current).__name__}"
            )
        return state


def _check_count(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
