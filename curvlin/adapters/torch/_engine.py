"""The torch engine: one way to run every curvlin method on a torch model.

:class:`Curvature` connects a model to a :class:`curvlin.blocks.Driver`: hooks and capture,
the sampled Fisher's extra backward, the second pass, the per-layer rows handed to the blocks,
and the ``"curvlin"`` entry of a checkpoint. :class:`CurvatureOptimizer` is the
``torch.optim.Optimizer`` every method's front derives from (parameter groups, closures,
momentum, weight decay, step control, the fallback for unsupported parameters, the non-finite
skip, ``state_dict``); :class:`Preconditioner` runs any method in front of another optimizer.
A front only says which block each layer gets.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..._errors import NonFiniteError
from ...blocks import Block, Driver, LayerBatch, Schedule
from ...damping import lm_adapt, predicted_change, reduction_ratio
from ...losses import output_hessian_sqrt
from ._capture import LayerCapture, check_unsupported, find_layers
from ._layers import LayerHandler
from ._params import UNITS, find_params
from ._sampling import LOSSES, REDUCTIONS, sample_output_grad

__all__ = ["MOMENTUM_FORMS", "Curvature", "CurvatureOptimizer", "Preconditioner"]

#: ``"gradient"``: ``M ← μ M + g`` on the gradient, then ``θ ← θ − lr·P(M)``. ``"direction"``:
#: ``v ← μ v + P(g)``, ``θ ← θ − lr·v`` on the preconditioned direction (torch's SGD applied to
#: ``P(g)``). Both are torch's heavy-ball accumulation; they differ in where ``P`` acts.
MOMENTUM_FORMS = ("gradient", "direction")
#: Where output gradients come from: the ordinary backward (``"empirical"``), sampled targets
#: (``"mc"``), or the columns of the output-Hessian square root (``"ggn"``, exact Gauss–Newton:
#: ``k`` output directions per example, for blocks with ``output_directions``).
FISHERS = ("empirical", "mc", "ggn")

#: The ``"curvlin"`` entry's layout version in every state_dict.
STATE_FORMAT = 1

BlockFactory = Callable[[str, LayerHandler], Block]


def check_hyper(owner: str, **values) -> None:
    """Hyperparameters: finite numbers in their range, with errors that name them."""
    rules = {
        "lr": (lambda v: v >= 0, ">= 0"),
        "damping": (lambda v: v > 0, "> 0"),
        "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "weight_decay": (lambda v: v >= 0, ">= 0"),
        "kl_clip": (lambda v: v > 0, "> 0 or None"),
        "relative_kl_clip": (lambda v: v > 0, "> 0 or None"),
    }
    for name, value in values.items():
        if name in ("kl_clip", "relative_kl_clip") and value is None:
            continue
        test, want = rules[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not test(value)
        ):
            raise ValueError(f"{owner}: {name} must be a finite number {want}, got {value!r}")


def default_factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Curvature dtype for parameters of ``dtype``: their own, float32 for half precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Curvature:
    """A model's supported layers, their blocks on one driver, and the capture that feeds them.

    Parameters
    ----------
    model : nn.Module
    make_block : callable ``(name, handler) -> Block``
        The method: which block each layer gets.
    owner : str
        The front's name, for messages and checkpoints.
    stats_every, refresh_every, check_every
        The :class:`~curvlin.blocks.Schedule`.
    fisher : {"empirical", "mc", "ggn"}
        Where output gradients come from: the ordinary ``loss.backward()``, the sampled
        Fisher's extra backward, or (``"ggn"``, for blocks with ``output_directions``) one
        batched backward of the columns of the output-Hessian square root, the exact
        Gauss–Newton's ``k`` output directions per example (both :meth:`backward_fisher`).
    fisher_samples : int
        Labels drawn per example for ``fisher="mc"``: with more than one, each draw's output
        gradients, scaled by ``1/√fisher_samples``, are one output direction per example
        (blocks with ``output_directions``), so the curvature averages the draws.
    loss, loss_reduction, seed
        The loss (for sampling and the output Hessian), how it reduces, and the sampling seed.
    subsample : int, optional
        Hand the blocks only the first ``subsample`` examples of each batch (the curvature's
        subsample; the gradient stays the whole batch's; :meth:`backward_fisher` may take a
        forward pass of the subsample alone). None: every example.
    factor_dtype : torch.dtype, optional
    unsupported : {"error", "sgd", "adam"} or callable
    units : {"layers", "parameters"}
        ``"layers"``: ``model`` is an ``nn.Module`` whose supported layers are the units
        (hooks capture their rows). ``"parameters"``: every trainable tensor of ``model`` (a
        module, or parameters or parameter groups as ``torch.optim`` takes them) is a unit
        with a :class:`~curvlin.adapters.torch._params.ParamHandler`, fed its gradient
        (``"grad"``) or its gradient at sampled labels (``"sampled_grad"``, from
        :meth:`backward_fisher`); no hook is registered and nothing is unsupported.
    """

    def __init__(
        self,
        model: nn.Module,
        make_block: BlockFactory,
        *,
        owner: str,
        stats_every: int = 1,
        refresh_every: int = 1,
        check_every: int | None = None,
        fisher: str = "empirical",
        fisher_samples: int = 1,
        loss: str | None = None,
        loss_reduction: str = "mean",
        factor_dtype: torch.dtype | None = None,
        unsupported="error",
        seed: int = 0,
        units: str = "layers",
        subsample: int | None = None,
        distributor=None,
    ):
        if units not in UNITS:
            raise ValueError(f"{owner}: units must be one of {UNITS}, got {units!r}")
        if fisher not in FISHERS:
            raise ValueError(f"{owner}: fisher must be one of {FISHERS}, got {fisher!r}")
        if fisher != "empirical" and loss not in LOSSES:
            raise ValueError(
                f"{owner}: fisher={fisher!r} needs loss, one of {LOSSES}; got {loss!r}"
            )
        whole = isinstance(fisher_samples, int) and not isinstance(fisher_samples, bool)
        if not whole or fisher_samples < 1:
            raise ValueError(
                f"{owner}: fisher_samples must be a positive int, got {fisher_samples!r}"
            )
        if fisher_samples > 1 and fisher != "mc":
            raise ValueError(
                f"{owner}: fisher_samples={fisher_samples} draws labels for fisher='mc', "
                f"not fisher={fisher!r}"
            )
        if subsample is not None and (
            isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1
        ):
            raise ValueError(
                f"{owner}: subsample must be a positive int or None, got {subsample!r}"
            )
        if subsample is not None and loss_reduction == "sum":
            raise ValueError(
                f"{owner}: subsample needs a batch-mean loss (loss_reduction 'mean' or "
                "'batchmean'): the curvature of a summed loss is not a mean over examples"
            )
        if loss_reduction not in REDUCTIONS:
            raise ValueError(
                f"{owner}: loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}"
            )
        if factor_dtype is not None and not (
            isinstance(factor_dtype, torch.dtype) and factor_dtype.is_floating_point
        ):
            raise ValueError(
                f"{owner}: factor_dtype must be a floating torch.dtype, got {factor_dtype!r}"
            )
        check_unsupported(unsupported, owner)
        schedule = Schedule(
            stats_every=stats_every, refresh_every=refresh_every, check_every=check_every
        )
        self.owner, self.fisher, self.units = owner, fisher, units
        self.fisher_samples = fisher_samples
        #: Output gradients carry a leading axis of output directions, (k, N, d_out): the
        #: Gauss–Newton's, or several sampled labels per example.
        self.output_directions = fisher == "ggn" or fisher_samples > 1
        self.subsample = subsample
        self.loss, self.loss_reduction = loss, loss_reduction
        if units == "parameters":
            self.layers, self.groups = find_params(model, owner=owner)
            self.other_params = []
            self.param_names = {id(h.weight): name for name, h in self.layers.items()}
        else:
            self.layers, self.other_params = find_layers(
                model, unsupported=unsupported, owner=owner
            )
            #: The curvature parameters' groups (one for layers; the given ones for units).
            trainable = [p for h in self.layers.values() for p in h.params if p is not None]
            self.groups = [{"params": [p for p in trainable if p.requires_grad]}]
            #: Parameter names as in ``model.named_parameters()``, by ``id``, for messages.
            self.param_names = {id(p): name for name, p in model.named_parameters()}
        #: Parameter units' gradients at sampled labels, from :meth:`backward_fisher`, and the
        #: number of examples behind them (1 for a summed loss).
        self.sampled_grads: dict[str, torch.Tensor] = {}
        self.sampled_examples = 1
        self.examples: int | None = None
        blocks, states = {}, {}
        for name, handler in self.layers.items():
            block = make_block(name, handler)
            weight = handler.weight.detach()
            dtype = factor_dtype or default_factor_dtype(weight.dtype)
            blocks[name], states[name] = block, block.init(weight, dtype=dtype)
        # Only under an initialised process group is anything distributed loaded.
        if distributor is None and _distributed():
            from .distributed import default_distributor

            distributor = default_distributor(model)
        self.driver = Driver(
            blocks, states, schedule=schedule, owner=owner, distributor=distributor
        )
        if self.output_directions and not all(b.output_directions for b in blocks.values()):
            what = "fisher='ggn'" if fisher == "ggn" else f"fisher_samples={fisher_samples}"
            raise ValueError(
                f"{owner}: {what} needs blocks that take output directions "
                "(Block.output_directions)"
            )
        self.needs = self.driver.needs
        # Parameter units register no hook: an empty capture keeps the same switches.
        if units == "parameters":
            self.capture = LayerCapture({})
        else:
            self.capture = LayerCapture(self.layers, root=model)
        self.capture.capture_grads = fisher == "empirical"
        self.capture.keep_outputs = {n for n, b in blocks.items() if "outputs" in b.needs}
        self.capture.mean_outputs = {n for n, b in blocks.items() if b.row_means}
        #: Rows of the last first pass per layer kept as means: a second pass must match.
        self.first_rows: dict[str, int] = {}
        self.input_probes: list[torch.Tensor] = []
        #: Layers captured at least once (or restored from a checkpoint).
        self.seen: set[str] = set()
        #: True while the closure runs only for the loss (adaptive damping's evaluation).
        self.evaluating = False
        device = next(iter(self.layers.values())).weight.device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.arm()

    # -- capture ---------------------------------------------------------------------------
    @property
    def second_pass_due(self) -> bool:
        return "second_pass" in self.needs and self.driver.stats_due()

    def arm(self) -> None:
        """Forget what was recorded; record the next passes only if the next step needs them."""
        self.capture.clear()
        self.input_probes = []
        self.sampled_grads = {}
        self.capture.root_outputs = False
        self.capture.active = self.driver.stats_due()
        #: Examples of a forward pass of the subsample alone handed to :meth:`backward_fisher`
        #: (None: the curvature's rows come from the batch's own forward pass).
        self.curvature_examples: int | None = None

    def backward_fisher(self, output: torch.Tensor) -> None:
        """The extra backward of the sampled Fisher (labels drawn from ``output``) or of the
        Gauss–Newton matrix (the output-Hessian square root's columns); δ captured. A
        forward pass of the subsample alone is the curvature's
        (:meth:`_note_curvature_forward`)."""
        if self.fisher == "empirical":
            raise RuntimeError(
                f"{self.owner}: backward_fisher() is for fisher='mc' or 'ggn'; the empirical "
                "Fisher uses the gradients of the ordinary loss.backward()"
            )
        if not self.capture.active or self.evaluating:
            return  # not a statistics step (or only the loss is wanted): nothing to sample
        if self.units == "parameters":
            self._sample_param_grads(output)
            return
        self._note_curvature_forward(output)
        records = [
            r
            for recs in self.capture.records.values()
            for r in recs
            if r.output is not None and r.output.requires_grad
        ]
        if not records:
            raise RuntimeError(
                f"{self.owner}: backward_fisher(): no layer was recorded in the forward pass; "
                "run the model in training mode with gradients enabled"
            )
        outputs = [r.output for r in records]
        if self.output_directions:
            grads = self._backward_directions(output, outputs, self._output_directions(output))
        else:
            delta = sample_output_grad(
                output, loss=self.loss, reduction=self.loss_reduction, generator=self.generator
            )
            grads = torch.autograd.grad(
                output, outputs, grad_outputs=delta, retain_graph=True, allow_unused=True
            )
        keep = self.capture.keep_outputs
        for name, recorded in self.capture.records.items():
            for record in recorded:
                if keep is not None and name not in keep:
                    record.output = None  # consumed: free the pre-activation now
        axis = 1 if self.output_directions else 0  # the example axis of a captured gradient
        sub = self.subsample
        for record, grad in zip(records, grads):
            if grad is not None and sub is not None and grad.shape[axis] > sub:
                # only the subsample's rows are read: keep a copy of them, free the rest now
                grad = grad.narrow(axis, 0, sub).clone()
            record.grad = grad  # None for a forward pass that did not lead to ``output``

    def _note_curvature_forward(self, output: torch.Tensor) -> None:
        """Recognise ``output`` as a forward pass of the subsample alone (``subsample`` rows,
        recorded besides the batch's): its records are the curvature's, and its examples are
        not the batch's (the gradient's example count, as a distributed average weighs it)."""
        sub, seen = self.subsample, self.capture.examples
        if output.ndim and sub is not None and output.shape[0] == sub and seen > sub:
            self.capture.examples = seen - sub
            self.curvature_examples = sub

    def _sample_param_grads(self, output: torch.Tensor) -> None:
        """Each trainable unit's gradient of the loss at sampled labels (batch-mean unless the
        loss is summed): one extra backward through the graph, which is kept."""
        names = [n for n, h in self.layers.items() if h.weight.requires_grad]
        if not output.requires_grad or not names:
            raise RuntimeError(
                f"{self.owner}: backward_fisher(): the output does not require grad; run the "
                "forward pass with gradients enabled"
            )
        delta = sample_output_grad(
            output, loss=self.loss, reduction=self.loss_reduction, generator=self.generator
        )
        grads = torch.autograd.grad(
            output,
            [self.layers[n].weight for n in names],
            grad_outputs=delta,
            retain_graph=True,
            allow_unused=True,
        )
        # δ are per-example: their backward is Σ_n ∇ℓ_n; the batch-mean loss's is 1/N of it.
        n = 1 if self.loss_reduction == "sum" else output.shape[0]
        self.sampled_grads = {name: g / n for name, g in zip(names, grads) if g is not None}
        self.sampled_examples = n

    def _param_batches(self) -> dict[str, LayerBatch]:
        """The parameter units' batches: their gradients (sampled, or ``.grad``)."""
        sampled, n = self.fisher == "mc", 1
        if sampled:
            grads, how = self.sampled_grads, "call opt.backward_fisher(output) after the forward"
            n = self.sampled_examples
        else:
            grads = {name: h.weight.grad for name, h in self.layers.items()}
            grads = {name: g for name, g in grads.items() if g is not None}
            how = "call loss.backward()"
        self.sampled_grads = {}
        if not grads:
            raise RuntimeError(
                f"{self.owner}: no parameter has a gradient on a statistics step: {how} "
                "before step()"
            )
        # n_examples: N for the batch-mean gradient at sampled labels (as a layer's batch
        # says it); 1 where the engine does not count examples (the ordinary gradient).
        return {name: LayerBatch(grad=g, n_examples=n) for name, g in grads.items()}

    def _output_directions(self, output):
        """The output directions of every example, shape (k, N, D): the columns ``q_na`` of
        the output-Hessian square root (``"ggn"``), or ``fisher_samples`` sampled output
        gradients scaled by ``1/√fisher_samples`` (``"mc"``)."""
        if output.ndim != 2:
            what = "fisher='ggn'" if self.fisher == "ggn" else "fisher_samples > 1"
            raise ValueError(
                f"{self.owner}: {what} needs the network output as (N, D), got "
                f"{tuple(output.shape)}"
            )
        f = output.detach()
        if self.fisher == "mc":
            draws = [
                sample_output_grad(
                    f, loss=self.loss, reduction=self.loss_reduction, generator=self.generator
                )
                for _ in range(self.fisher_samples)
            ]
            return torch.stack(draws).mul_(self.fisher_samples**-0.5)
        q = output_hessian_sqrt(
            f if f.dtype in (torch.float32, torch.float64) else f.float(),
            loss=self.loss,
            reduction=self.loss_reduction,
        )
        return q.permute(2, 0, 1).to(f.dtype)  # (k, N, D), one row per example

    def _backward_directions(self, output, outputs, directions):
        """Gradients of ``d_na · f_n`` for every output direction ``a`` (``directions``,
        (k, N, D)): shape (k, m, ...) per recorded output for the ``m`` examples of the
        subsample (all without one).

        With the whole batch, one batched backward (``is_grads_batched``; a loop where an
        operation has no batching rule). With a subsample, one backward per direction, each
        result cut to the subsample at once: the batched backward's ``(k, N, ...)``
        intermediates would cost ``N/m`` times the memory for rows that are never read."""
        f = output.detach()
        sub = self.subsample
        grad = functools.partial(torch.autograd.grad, output, outputs, retain_graph=True,
                                 allow_unused=True)  # fmt: skip
        if sub is None or sub >= f.shape[0]:
            try:
                return grad(grad_outputs=directions.contiguous(), is_grads_batched=True)
            except RuntimeError:  # an operation without a batching rule: one backward each
                sub = f.shape[0]
        cols = []
        for d in directions:
            d = d.clone()
            d[sub:] = 0
            cols.append([None if g is None else g[:sub].clone() for g in grad(grad_outputs=d)])
        return [None if c[0] is None else torch.stack(c) for c in zip(*cols)]

    def first_batches(self, *, lazy: bool = False) -> Mapping[str, LayerBatch] | None:
        """This step's batches if it gathers statistics (None otherwise, or once the hooks
        are removed: the last curvature then stays in use); ``lazy`` as in :meth:`collect`."""
        if not self.driver.stats_due() or self.capture.removed:
            return None
        return self.collect(lazy=lazy)

    def collect(self, *, plus: bool = False, lazy: bool = False) -> Mapping[str, LayerBatch]:
        """This step's rows per recorded layer, as the blocks need them; clears the capture.

        With ``lazy`` the rows of a layer are built when its batch is looked up, once: the
        lookup drops the layer's records, so for batches read once (the statistics of a
        method without a second pass) the rows and the captured inputs and gradients are
        freed layer by layer, and only one layer's rows (a convolution's patches) are built
        at a time.
        Raises if a statistics step recorded no layer with its output gradient.
        """
        if self.units == "parameters":
            return self._param_batches()
        plan = {}
        # The layer inputs as captured, for the finiteness check of a step whose batches
        # outlive it: a convolution's patches repeat each input entry k_h·k_w times, so its
        # input is the cheaper probe (and the stricter: it also sees entries no patch reads).
        self.input_probes = []
        sampled = self.fisher != "empirical" and not plus
        directions = self.output_directions and not plus  # output_grads (k, R, d_out)
        examples = self.capture.examples
        for name, recorded in self.capture.records.items():
            # Forward passes whose output never reached a backward (an extra evaluation with
            # gradients on, say) have no gradient and are left out.
            records = [r for r in recorded if r.grad is not None]
            if not records:
                continue
            if records[0].rows is not None:  # kept as means (Block.row_means)
                rows = sum(r.rows for r in records)
                if plus and rows != self.first_rows.get(name):
                    continue  # not reached the same way in the second pass: no pair
                if not plus:
                    self.first_rows[name] = rows
            plan[name] = records
            if "inputs" in self.driver.blocks[name].needs and not plus and not lazy:
                self.input_probes += [r.input for r in records]

        def build(name: str) -> LayerBatch:
            records = plan[name]
            handler, block = self.layers[name], self.driver.blocks[name]
            needs = block.needs
            rows_of = sum(handler.n_examples(r.input) for r in records)  # whatever the reduction
            # (a forward pass of the subsample alone: its own examples, every one of them)
            n = (not plus and self.curvature_examples) or examples or rows_of
            mean = self.loss_reduction != "sum"
            sub = n if self.subsample is None else min(self.subsample, n)
            by_example = block.coupled or sub < n
            if by_example:
                _check_examples(self.owner, name, handler, records, n)

            def inputs(r):
                return handler.input_rows(r.input[:sub] if sub < n else r.input)

            def input_batch():
                if block.inputs_as_rows and len(records) == 1:  # never built whole
                    r = records[0]
                    return handler.rows(r.input[:sub] if sub < n else r.input)
                return join([inputs(r) for r in records])

            # A block that takes several leading row axes gets a view where one call's
            # layout allows (no copy of a convolution's output gradients).
            view = not block.flat_outputs and len(records) == 1 and not by_example
            rows = handler.output_view if view else handler.output_rows

            def grads(r):
                g = r.grad
                if not directions:
                    return rows(g[:sub] if sub < n else g)
                g = g[:, :sub] if sub < n else g
                return rows(g.flatten(0, 1)).view(g.shape[0], -1, handler.d_out)

            # Several calls of one layer are concatenated as rows (for a coupled block or a
            # subsample, grouped by example: each example's rows stay consecutive); a
            # row-means block gets one row, the mean its hooks kept.
            join = functools.partial(_cat_examples, sub) if by_example else _cat
            outputs = None
            if records[0].rows is not None:
                counts = [r.rows for r in records]
                if "outputs" in needs:
                    outputs = _weighted_mean([r.output for r in records], counts)
                output_grads = _weighted_mean([r.grad for r in records], counts)
            else:
                if "outputs" in needs:
                    outputs = join([rows(r.output.detach()[:sub]) for r in records])
                output_grads = join([grads(r) for r in records])
            return LayerBatch(
                inputs=input_batch() if "inputs" in needs and not plus else None,
                outputs=outputs,
                output_grads=output_grads,
                n_examples=sub if mean else 1,
                # autograd's gradient of a batch-mean loss is δ / N; sampled δ are per-example
                grad_scale=float(n) if mean and not sampled else 1.0,
                examples=rows_of if sub == n else sub,
            )

        self.capture.clear()
        if not plan:
            how = (
                "opt.backward_fisher(output)"
                if self.fisher != "empirical" and not plus
                else "backward"
            )
            raise RuntimeError(
                f"{self.owner}: no layer was captured with its output gradient on a statistics "
                "step: run the forward pass in training mode (model.train()) with gradients "
                f"enabled, then {how}, before step()"
                + (" (in the closure's second call)" if plus else "")
            )
        if lazy:
            return _LazyBatches(plan, build)
        return {name: build(name) for name in plan}

    def run_closure(self, closure, *, second: bool = False, evaluate: bool = False):
        """Call ``closure`` with gradients on; for the second pass, freeze every parameter and
        make the first recorded outputs roots, so only output gradients are computed.

        ``evaluate`` (a second pass for the loss alone): nothing is kept and the sampled
        Fisher's extra backward is skipped.
        """
        # Parameter units have no hooks to make layer outputs roots of the backward graph:
        # their second (evaluation) pass keeps the parameters trainable.
        frozen = second and self.units == "layers"
        params = [p for p in self.all_params() if p.requires_grad] if frozen else []
        for p in params:
            p.requires_grad_(False)
        self.capture.clear()
        self.sampled_grads = {}
        self.capture.root_outputs = second
        self.capture.active = second or self.driver.stats_due()
        self.evaluating = evaluate
        try:
            with torch.enable_grad():
                return closure()
        finally:
            self.capture.active = False
            self.capture.root_outputs = False
            self.evaluating = False
            if evaluate:
                self.capture.clear()
            for p in params:
                p.requires_grad_(True)

    def all_params(self) -> list[nn.Parameter]:
        out = [p for h in self.layers.values() for p in h.params if p is not None]
        return out + self.other_params

    # -- gradients -------------------------------------------------------------------------
    def layer_grads(self, weight_decay: Mapping[int, float]):
        """``(∇W + τW, ∇b + τb)`` per layer with a gradient, as (d_out, d_in) and (d_out,).

        A missing gradient of one of the pair (a bias frozen after construction) counts as
        zero; such a parameter is not updated. ``weight_decay`` maps ``id(param)`` to ``τ``.
        """
        grads = {}
        for name, h in self.layers.items():
            w, b = h.params
            has_bias = self.driver.blocks[name].bias
            gw, gb = w.grad, b.grad if has_bias else None
            if gw is None and gb is None:
                continue
            gw = torch.zeros_like(w) if gw is None else _decayed(gw, w, weight_decay[id(w)])
            if has_bias:
                gb = torch.zeros_like(b) if gb is None else _decayed(gb, b, weight_decay[id(b)])
            grads[name] = (h.weight_grad(gw), gb)
        return grads

    def check_seen(self, grads, batches) -> None:
        """On a statistics step, a layer with a gradient that no forward pass has ever shown
        raises (its module was bypassed: e.g. a weight used through ``F.linear``); nothing is
        written before."""
        if batches is None:
            return
        self.seen.update(batches)
        for name in grads:
            if name not in self.seen and self.units == "parameters":
                raise RuntimeError(
                    f"{self.owner}: parameter {name!r} has a gradient but no statistics (it does "
                    "not reach the output handed to backward_fisher()); it would get no update. "
                    "Freeze it, or leave it to another optimizer"
                )
            if name not in self.seen:
                raise RuntimeError(
                    f"{self.owner}: layer {name!r} has a gradient but has never been seen in a "
                    "forward pass with its output gradient (is its weight used without calling "
                    "the module?); it would get no update. Freeze it, or exclude it and use "
                    "unsupported='sgd'/'adam'"
                )

    def first_pass(self, grads, probes, *, damping):
        extra = list(probes)  # the fallback's gradients: averaged across ranks with the rest
        #: This step's examples, where captured (read before the capture is cleared).
        self.examples = examples = self.capture.examples or (
            self.sampled_examples if self.sampled_grads else None
        )
        """A step up to the parameter update: statistics, the finiteness verdict on them, the
        gradients and ``probes``, then fold and refresh. Returns the new states (not
        committed) and the batches a second pass or a check will read, or None when the step
        is skipped (nothing changed but the skip counter)."""
        driver = self.driver
        # Coupled blocks precondition from the batches: they are kept (and checked) as well.
        keep = "second_pass" in self.needs or driver.check_due() or driver.coupled
        batches = self.first_batches(lazy=not keep)
        self.check_seen(grads, batches)
        stats = driver.statistics(batches) if batches else None
        probes = [t for pair in grads.values() for t in pair if t is not None] + list(probes)
        probes += driver.probes(stats)
        if ("second_pass" in self.needs or driver.coupled) and batches:
            probes += _batch_probes(self, batches)
        driver.distributor.reduce_gradients(
            [t for pair in grads.values() for t in pair if t is not None] + list(extra),
            examples,
        )
        if not driver.verdict(probes):
            driver.skip()
            return None
        del probes  # diagonals are views: they would keep every statistic alive
        self.input_probes = []
        if not keep:
            batches = None  # the rows are consumed: free them before the refresh
        # Past the verdict the step commits whatever follows (a failing second pass commits
        # the first pass): install each layer's new state as it is made, freeing the old.
        states = driver.fold_refresh(stats, damping=damping, consume=True, install=True)
        return states, batches

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "method": self.owner,
            "driver": self.driver.state_dict(),  # references, as torch's own state_dict
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, entry, *, commit=None) -> None:
        """Validate a ``"curvlin"`` entry, then (after ``commit``, if given) restore it."""
        where = f"{self.owner}.load_state_dict"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: not a curvlin state_dict (no 'curvlin' entry)")
        check_plain(entry, where)
        if entry.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{where}: state format {entry.get('format')!r}, expected {STATE_FORMAT}"
            )
        if entry.get("method") != self.owner:
            raise ValueError(
                f"{where}: the checkpoint is from {entry.get('method')!r}, not {self.owner!r}"
            )
        generator = entry.get("generator")
        if not (torch.is_tensor(generator) and generator.dtype == torch.uint8):
            raise ValueError(f"{where}: 'generator' must be a uint8 tensor")
        devices = {name: h.weight.device for name, h in self.layers.items()}

        def convert(layer, key, value):
            if not torch.is_tensor(value):
                raise ValueError(
                    f"{where}: layer {layer!r}: buffer {key!r} must be a tensor, got "
                    f"{type(value).__name__}"
                )
            # a copy: folds overwrite the factors in place, and the checkpoint's tensors may
            # be another optimizer's live state
            return value.to(devices[layer], copy=True)

        states = self.driver.validated(entry.get("driver"), convert)
        if commit is not None:
            commit()
        self.driver.restore(states)
        self.generator.set_state(generator)
        self.seen = set(self.layers)
        self.arm()


def check_plain(obj, where: str, path: str = "state_dict") -> None:
    """Only tensors, numbers, strings, None, and lists/tuples/dicts of them: what
    ``torch.load(weights_only=True)`` reads without running code."""
    if torch.is_tensor(obj) or obj is None or isinstance(obj, bool | int | float | str):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: {path} has a key of type {type(k).__name__}")
            check_plain(v, where, f"{path}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_plain(v, where, f"{path}[{i}]")
        return
    raise TypeError(
        f"{where}: {path} holds a {type(obj).__module__}.{type(obj).__name__}; a checkpoint "
        "holds only tensors, numbers, strings and containers of them"
    )


class CurvatureOptimizer(torch.optim.Optimizer):
    """The ``torch.optim.Optimizer`` every curvlin method's front derives from.

    Each supported layer gets ``Δ = P(∇W̄ + τW̄)``, the method's preconditioned gradient
    with L2 weight decay ``τ`` added first; with ``kl_clip`` the whole step is scaled by
    ``ν = min(1, √(kl_clip / (lr² |Σ Δ·M|)))``, ``M`` the vector ``Δ`` was made from (with
    ``relative_kl_clip`` the bound is also at most ``relative_kl_clip · |L|``, ``L`` the
    closure's loss); then ``momentum`` (see ``momentum_form``).
    Unsupported parameters get the fallback chosen by ``unsupported``. The front passes its
    block factory and options; see :class:`Curvature` for the engine options.
    """

    # The front's default relative_kl_clip (None: off), passed as that very object when the
    # user sets none: then a plain loop (no loss) runs without it and without a warning.
    default_relative_kl_clip: float | None = None

    def __init__(
        self,
        model: nn.Module,
        make_block: BlockFactory,
        *,
        owner: str,
        lr: float,
        damping: float,
        momentum: float,
        weight_decay: float,
        momentum_form: str = "gradient",
        kl_clip: float | None = None,
        relative_kl_clip: float | None = None,
        adaptive_damping: bool = False,
        adapt_every: int = 5,
        unsupported="error",
        **options,
    ):
        check_hyper(owner, lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        check_hyper(owner, kl_clip=kl_clip, relative_kl_clip=relative_kl_clip)
        if momentum_form not in MOMENTUM_FORMS:
            raise ValueError(
                f"{owner}: momentum_form must be one of {MOMENTUM_FORMS}, got {momentum_form!r}"
            )
        if not isinstance(adaptive_damping, bool):
            raise TypeError(f"{owner}: adaptive_damping must be a bool, got {adaptive_damping!r}")
        if isinstance(adapt_every, bool) or not isinstance(adapt_every, int) or adapt_every < 1:
            raise ValueError(f"{owner}: adapt_every must be a positive int, got {adapt_every!r}")
        if adaptive_damping and momentum_form != "gradient":
            raise ValueError(
                f"{owner}: adaptive_damping needs momentum_form='gradient' (its quadratic model "
                "of the step is exact only when the preconditioner acts on the whole momentum)"
            )
        self._curv = Curvature(model, make_block, owner=owner, unsupported=unsupported, **options)
        self._owner, self.momentum_form, self.kl_clip = owner, momentum_form, kl_clip
        self.relative_kl_clip = relative_kl_clip
        # a front's own default bound is off in a plain loop (no loss) without a warning; the
        # warning is for a bound the user asked for
        default = type(self).default_relative_kl_clip
        self._warned_unbounded = default is not None and relative_kl_clip is default
        self.adaptive_damping, self.adapt_every = adaptive_damping, adapt_every
        #: ``ρ`` of the last damping adaptation (actual over predicted change), or None.
        self.last_ratio: float | None = None
        groups = [{**g, "curvature": True} for g in self._curv.groups]
        self._fallback = None
        others = self._curv.other_params
        if others and unsupported != "sgd":
            factory = unsupported if callable(unsupported) else _adam
            self._fallback = factory(others)
            if not isinstance(self._fallback, torch.optim.Optimizer):
                raise TypeError(
                    f"{owner}: unsupported= must return a torch.optim.Optimizer, got "
                    f"{type(self._fallback).__name__}"
                )
            if len(self._fallback.param_groups) != 1:
                raise ValueError(
                    f"{owner}: the unsupported= optimizer must have one param group (its lr "
                    f"becomes this optimizer's last group's), got "
                    f"{len(self._fallback.param_groups)}"
                )
            lr_fallback = self._fallback.param_groups[0]["lr"]
            groups.append({"params": others, "curvature": False, "lr": lr_fallback})
        elif others:
            groups.append({"params": others, "curvature": False})
        defaults = {
            "lr": lr,
            "damping": damping,
            "momentum": momentum,
            "weight_decay": weight_decay,
        }
        super().__init__(groups, defaults)
        self._link_fallback()

    # -- introspection ---------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the layers the method preconditions."""
        return list(self._curv.layers)

    def curvature(self, layer: str):
        """A copy of one layer's curvature state (with ``refresh_every=1`` its inverse is
        rebuilt from the factors and the group's damping: steps do not keep it)."""
        name = self._layer(layer)
        weight = self._curv.layers[name].weight
        group = next(g for g in self.param_groups if any(p is weight for p in g["params"]))
        return _copy(self._curv.driver.current(name, damping=group["damping"]))

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because their gradients or statistics held NaN or inf."""
        return self._curv.driver.skipped

    @property
    def fisher(self) -> str:
        """Where the curvature's output gradients come from: ``"empirical"`` (the ordinary
        backward), ``"mc"`` or ``"ggn"`` (the closure calls :meth:`backward_fisher`)."""
        return self._curv.fisher

    @property
    def repaired_factors(self) -> int:
        """Factors rebuilt by the periodic check (``check_every``)."""
        return self._curv.driver.repaired

    @property
    def step_count(self) -> int:
        """Steps taken (skipped ones not counted)."""
        return self._curv.driver.step

    def remove_hooks(self) -> None:
        """Detach from the model (no more statistics can be gathered)."""
        self._curv.capture.remove()

    def backward_fisher(self, output: torch.Tensor) -> None:
        """The sampled Fisher's extra backward (``fisher="mc"``; the Gauss–Newton directions'
        for ``"ggn"``): call it after the forward pass and before ``loss.backward()``; it
        keeps the graph and leaves ``.grad`` alone. A no-op on steps that gather no
        statistics. With a ``subsample``, ``output`` may be a forward pass of the subsample
        alone (``model(x[:subsample])``, exactly ``subsample`` rows): the curvature then
        comes from that pass, and only its examples are backpropagated."""
        self._curv.backward_fisher(output)

    def _layer(self, layer) -> str:
        if layer in self._curv.layers:
            return layer
        raise KeyError(
            f"{layer!r} is not a layer handled by {self._owner}; known: {self.layer_names}"
        )

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One step; returns the closure's loss (None without a closure).

        Methods with a second pass need ``closure`` (it zeroes the gradients, runs the forward
        pass, calls ``loss.backward()`` and returns the loss) and call it twice on statistics
        steps; the others also work after a plain ``loss.backward()``.
        """
        curv = self._curv
        try:
            for group in self.param_groups:
                check_hyper(
                    self._owner,
                    **{k: group[k] for k in ("lr", "damping", "momentum", "weight_decay")},
                )
            if ("second_pass" in curv.needs or self.adaptive_damping) and closure is None:
                why = (
                    "the method evaluates the same minibatch twice, before and after the update"
                    if "second_pass" in curv.needs
                    else "adaptive_damping compares the loss before and after the update"
                )
                raise RuntimeError(
                    f"{self._owner}.step() needs a closure: {why}. Pass a function that zeroes "
                    "the gradients, runs the forward pass, calls loss.backward() and returns "
                    "the loss: opt.step(closure)"
                )
            loss = None if closure is None else curv.run_closure(closure)
            return self._step(loss, closure)
        finally:
            curv.arm()

    def _step(self, loss, closure):
        curv, driver = self._curv, self._curv.driver
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        grads = curv.layer_grads({k: g["weight_decay"] for k, g in group_of.items()})
        others = [p for p in curv.other_params if p.grad is not None]
        damping = self._layer_damping(group_of)
        first = curv.first_pass(grads, [p.grad for p in others], damping=damping)
        if first is None:
            return loss  # skipped: nothing changed
        states, batches = first
        first = None
        buffers = None
        if self.momentum_form == "gradient":
            # a coupled solve can still fail (below): its momentum is committed with the step
            buffers = self._buffers(grads, group_of, in_place=not driver.coupled)
        directions = driver.directions(
            states,
            grads if buffers is None else buffers,
            batches=batches if driver.coupled else None,
            damping=damping,
        )
        if driver.coupled:
            # One solve makes the coupled directions before any is applied. A kernel that
            # overflows from finite rows (NaN or inf products) skips the step, as a
            # non-finite batch does, where nothing has been written yet: every layer coupled
            # (a per-layer block's new state is installed with the statistics).
            try:
                directions = list(directions)
            except NonFiniteError:
                if not all(b.coupled for b in driver.blocks.values()):
                    raise
                driver.skip("its curvature kernel holds NaN or inf (the rows overflow)")
                return loss
        adapt = self.adaptive_damping and driver.step % self.adapt_every == 0
        bound = self._clip_bound(loss)
        model = None
        # The input-side update before the second pass needs only the first pass and the
        # state the direction used: in one process it runs as each layer's direction is
        # applied (and is installed, so the step stands with it), which frees that layer's
        # input rows before the next direction is made; across ranks once, for all layers,
        # in one gather. A check reads the inputs after the second pass.
        early = bool(batches) and curv.second_pass_due and not driver.check_due()
        per_layer = early and driver.distributor.world == 1
        if bound is None and not adapt:
            # Nothing couples the layers' steps: each is applied as soon as it is made, so
            # only one layer's direction is alive at a time.
            for name, pair in directions:
                for p, direction, _, new_buffer in self._layer_updates(name, pair, grads, buffers):
                    self._apply(p, direction, group_of[id(p)], new_buffer)
                if per_layer and name in batches:
                    pair = p = direction = new_buffer = None
                    states, batches = driver.before_second_pass(
                        states, batches, damping=damping, install=True, names=[name]
                    )
        else:
            updates, model = self._updates(
                dict(directions), grads, buffers, bound=bound, model=adapt
            )
            for p, direction, new_buffer in updates:
                self._apply(p, direction, group_of[id(p)], new_buffer)
        # The directions and the gradient views are spent: free them before a second pass
        # (the closure's zero_grad can only free ``.grad`` if nothing else holds it).
        updates = directions = buffers = grads = p = direction = new_buffer = pair = None
        if not (curv.second_pass_due or driver.check_due()):
            batches = None  # a coupled solve's rows are spent
        self._fallback_step(others, group_of)
        loss_plus = None
        if curv.second_pass_due and batches:
            first = states  # what the step commits if the second pass raises
            if early:  # the layers not updated above (none, or all after a KL clip)
                states, batches = driver.before_second_pass(
                    states, batches, damping=damping, install=True
                )
            try:
                loss_plus = curv.run_closure(closure, second=True)
                plus = curv.collect(plus=True)
                states = driver.second_pass(states, batches, plus, damping=damping)
            except BaseException:
                driver.commit(first)  # the step stands, without its second-pass update
                raise
        rebuilt = {}
        if batches and driver.check_due():
            states, rebuilt = driver.check(states, batches, damping=damping)
            driver.warn_rebuilt(rebuilt)
        driver.commit(states, repaired=sum(len(v) for v in rebuilt.values()))
        if adapt and model is not None:
            self._adapt_damping(loss, loss_plus, closure, model)
        return loss

    def _layer_damping(self, group_of=None) -> dict[str, float]:
        """Each layer's damping, from its weight's param group."""
        if group_of is None:
            group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        return {name: self.curvature_damping(group_of[id(h.weight)])
                for name, h in self._curv.layers.items()}  # fmt: skip

    def warm_start(self, closures: Iterable[Callable[[], torch.Tensor]]) -> int:
        """Before the first step, start the curvature at the mean statistics of several batches.

        Each closure runs the forward and backward pass of one batch as a step's closure does
        (``opt.backward_fisher(output)`` first for a sampled Fisher); for instance one pass
        over the training set, as TNT's paper does before its first step. No parameter
        changes and no step is counted: the batches' statistics, averaged by examples, become
        the first statistics (an EMA starts at their mean instead of at the first step's
        batch), and the first step folds its batch into them as any later step does. The
        gradients the closures leave are cleared. Returns the number of batches.

        A method whose curvature comes from its steps alone (K-BFGS's ``H_g``, SMW's kernel)
        starts only the part that statistics make (K-BFGS's ``H_a``). Under a process group
        every rank hands the same number of batches (each batch's statistics are reduced).
        """
        curv = self._curv

        def batches():
            for closure in closures:
                curv.run_closure(closure)
                yield curv.collect()

        try:
            return curv.driver.warm_start(batches(), damping=self._layer_damping())
        finally:
            curv.capture.clear()
            self.zero_grad(set_to_none=True)

    @staticmethod
    def curvature_damping(group) -> float:
        """The damping the blocks get from a curvature param group: its ``damping``. A front
        whose curvature absorbs the L2 term (its curvature ``τI`` is exact) returns
        ``damping + weight_decay`` instead."""
        return group["damping"]

    def _adapt_damping(self, loss, loss_plus, closure, model) -> None:
        """The Levenberg–Marquardt rule on the curvature groups' damping (one host sync)."""
        if loss_plus is None:  # evaluate θ_{k+1} on the same batch, without weight gradients
            loss_plus = self._curv.run_closure(closure, second=True, evaluate=True)
        g_dot_d, d_dot_m, nu = model
        lr = self.param_groups[0]["lr"]
        predicted = predicted_change(nu * g_dot_d, nu * nu * d_dot_m, lr=lr)
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in (
            loss, loss_plus, predicted)])  # fmt: skip
        # the losses are this rank's batch's: every rank must adapt alike
        self._curv.driver.distributor.average([values], self._curv.examples)
        values = values.cpu()
        before, after, predicted = (float(v) for v in values)
        self.last_ratio = reduction_ratio(after - before, predicted)
        factor = 0.95**self.adapt_every  # Martens & Grosse's (19/20)^T
        for group in self.param_groups:
            if group["curvature"]:
                group["damping"] = lm_adapt(group["damping"], self.last_ratio, factor=factor)

    def _buffers(self, grads, group_of, *, in_place=True):
        """``M ← μ M + g`` per layer (see :meth:`_momentum`)."""
        out = {}
        for name, pair in grads.items():
            h = self._curv.layers[name]
            new = [
                None
                if g is None
                else self._momentum(p, g.view_as(p), group_of[id(p)]["momentum"], in_place)
                for p, g in zip(h.params, pair)
            ]
            out[name] = (h.weight_grad(new[0]), new[1])
        return out

    def _momentum(self, p, g, mu, in_place=True):
        """``M ← μ M + g`` in place (a step past the finiteness verdict always commits), or
        in a new tensor that :meth:`_apply` installs (``in_place=False``: a step that may still
        be skipped), or a copy of ``g`` on the first step (``g`` itself may be ``p.grad``);
        ``g`` for μ = 0."""
        if not mu:
            return g
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            return g.clone()
        return buf.mul_(mu).add_(g) if in_place else buf.mul(mu).add_(g)

    def _clip_bound(self, loss):
        """The step's bound on ``lr²|ΔᵀM|``: ``kl_clip`` and ``relative_kl_clip·|loss|``
        (a 0-d tensor, no host synchronisation; the loss averaged over ranks, weighted by
        their examples; a non-finite loss gives 0, no move), the smaller of those set; None
        for no clip."""
        bound = self.kl_clip
        if self.relative_kl_clip is None:
            return bound
        if loss is None:
            if not self._warned_unbounded:
                self._warned_unbounded = True
                warnings.warn(
                    f"{self._owner}: relative_kl_clip bounds the step by the loss, which "
                    "opt.step() without a closure does not see: steps are bounded by kl_clip "
                    "only. Pass a closure (opt.step(closure)) or set relative_kl_clip=None",
                    UserWarning,
                    stacklevel=6,  # the caller of opt.step(), past torch's two wrappers
                )
            return bound
        loss = torch.as_tensor(loss).detach().clone()  # averaged in place
        # this rank's batch's loss: every rank must clip alike (a no-op in one process)
        self._curv.driver.distributor.average([loss], self._curv.examples)
        rel = self.relative_kl_clip * loss.abs()
        rel = torch.where(torch.isfinite(rel), rel, torch.zeros_like(rel))
        return rel if bound is None else rel.clamp(max=bound)

    def _updates(self, directions, grads, buffers, *, bound=None, model=False):
        """``(param, Δ, new momentum buffer or None)`` per parameter to update, scaled so
        that ``lr²|ΔᵀM| <= bound`` (no clip for None), and (with ``model``) the quadratic
        model's terms ``(gᵀΔ, ΔᵀM, ν)`` on the device."""
        out, g_dot_d, d_dot_m = [], [], []
        for name, pair in directions.items():
            for p, d, g, buf in self._layer_updates(name, pair, grads, buffers):
                out.append((p, d, buf))
                if model:
                    g_dot_d.append((d * g).sum())
                if bound is not None or model:
                    d_dot_m.append((d * (g if buf is None else buf)).sum())
        nu = 1.0
        if bound is not None and d_dot_m:
            lr = self.param_groups[0]["lr"]
            quad = torch.stack(d_dot_m).sum().abs() * lr**2
            nu = torch.clamp(torch.sqrt(bound / quad.clamp_min(1e-30)), max=1.0)
            for _, d, _ in out:  # directions are new arrays (Block.precondition)
                d.mul_(nu.to(d.dtype))
        if not model or not d_dot_m:
            return out, None
        return out, (torch.stack(g_dot_d).sum(), torch.stack(d_dot_m).sum(), nu)

    def _layer_updates(self, name, pair, grads, buffers):
        """``(param, Δ, gradient, momentum buffer or None)``, shaped like the parameter, for
        each parameter of layer ``name`` with a gradient and a direction."""
        h = self._curv.layers[name]
        bufs = (None, None) if buffers is None else buffers[name]
        for p, d, g, buf in zip(h.params, pair, grads[name], bufs):
            if p is None or p.grad is None or d is None:
                continue
            yield p, d.view_as(p), g.view_as(p), None if buf is None else buf.view_as(p)

    def _apply(self, p, direction, group, new_buffer):
        mu, slot = group["momentum"], self.state[p]
        if self.momentum_form == "gradient":
            if mu:
                slot["momentum_buffer"] = new_buffer
            p.add_(direction, alpha=-group["lr"])
            return
        if mu:
            buf = slot.get("momentum_buffer")
            if buf is None:
                buf = slot["momentum_buffer"] = direction.detach().clone()
            else:
                buf.mul_(mu).add_(direction)
            direction = buf
        p.add_(direction, alpha=-group["lr"])

    def _fallback_step(self, others, group_of):
        if not others:
            return
        if self._fallback is not None:
            self._fallback.param_groups[0]["lr"] = self.param_groups[-1]["lr"]
            self._fallback.step()
            return
        for p in others:  # "sgd": the same momentum on the identity preconditioner
            group = group_of[id(p)]
            g = _decayed(p.grad, p, group["weight_decay"])
            if self.momentum_form == "gradient":
                new = self._momentum(p, g, group["momentum"])
                self._apply(p, new, group, new)
            else:
                self._apply(p, g, group, None)

    def _link_fallback(self) -> None:
        """The fallback optimizer keeps its state in this optimizer's ``state``, so one
        ``state_dict`` holds everything."""
        if self._fallback is not None:
            self._fallback.state = self.state

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self):
        """Torch's optimizer state (momentum, the fallback's state) and the ``"curvlin"`` entry
        (every layer's curvature by name, counters, the sampling generator), loadable with
        ``torch.load(..., weights_only=True)``."""
        out = super().state_dict()
        out["curvlin"] = self._curv.state_dict()
        return out

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict` after checking all of it; on any error nothing changes.

        Layer names, buffer names, shapes, dtypes, counters and finiteness are checked, and so
        is the optimizer's own state (one entry per parameter, tensors of the parameter's
        shape); curvature buffers keep their own dtype. Every tensor is copied (torch's own
        optimizers would alias the checkpoint's), so a ``state_dict`` taken from a live
        optimizer can be loaded into another and both train on independently.
        """
        where = f"{self._owner}.load_state_dict"
        if not isinstance(state_dict, Mapping) or "curvlin" not in state_dict:
            raise ValueError(f"{where}: not a {self._owner} state_dict (no 'curvlin' entry)")
        check_plain(state_dict, where)
        rest = {k: copy.deepcopy(v) for k, v in state_dict.items() if k != "curvlin"}
        self._check_torch_state(rest, where)
        self._curv.load_state_dict(
            state_dict["curvlin"],
            commit=lambda: torch.optim.Optimizer.load_state_dict(self, rest),
        )
        self._link_fallback()

    def _check_torch_state(self, rest, where) -> None:
        groups = rest.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"{where}: the checkpoint has other parameter groups (a checkpoint of another "
                "model, or another unsupported= choice?)"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        for i, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(theirs.get("params", ())) != len(mine["params"]):
                raise ValueError(
                    f"{where}: parameter group {i} holds {len(theirs.get('params', ()))} "
                    f"parameters in the checkpoint and {len(mine['params'])} here (a checkpoint "
                    "of another model?)"
                )
            check_hyper(
                self._owner,
                **{
                    k: theirs[k]
                    for k in ("lr", "damping", "momentum", "weight_decay")
                    if k in theirs
                },
            )
        state = rest.get("state")
        if not isinstance(state, Mapping):
            raise ValueError(f"{where}: 'state' must be a dict")
        for key, slot in state.items():
            if not isinstance(key, int) or not 0 <= key < len(params):
                raise ValueError(f"{where}: state for unknown parameter {key!r}")
            p = params[key]
            what = f"{where}: parameter {self._curv.param_names.get(id(p), key)!r}"
            for name, value in slot.items():
                if not torch.is_tensor(value) or value.ndim == 0:
                    continue
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{what} buffer {name!r} has shape {tuple(value.shape)}, "
                        f"expected {tuple(p.shape)}"
                    )
                if value.is_floating_point() and not bool(value.isfinite().all()):
                    raise ValueError(f"{what} buffer {name!r} holds NaN or inf")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _copy(state):
    arrays = {k: v.detach().clone() for k, v in state.arrays().items()}
    return type(state).from_arrays(arrays, state.counters())


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def _decayed(grad, p, wd):
    return grad + wd * p if wd else grad


class _LazyBatches(Mapping):
    """Layer name → :class:`LayerBatch`, each built from its records when looked up, once:
    the lookup drops the records, so a layer's inputs and gradients are freed with its batch."""

    def __init__(self, plan: dict, build: Callable[[str], LayerBatch]):
        self._plan, self._build = plan, build

    def __getitem__(self, name: str) -> LayerBatch:
        if name not in self._plan:
            raise KeyError(name)
        batch = self._build(name)
        del self._plan[name]  # read once: the records (inputs, gradients) go with the batch
        return batch

    def __iter__(self):
        return iter(list(self._plan))

    def __len__(self) -> int:
        return len(self._plan)


def _batch_probes(curv: Curvature, batches) -> list[torch.Tensor]:
    """What the finiteness check reads of batches kept for a second pass: outputs and output
    gradients, and the captured layer inputs in place of their rows."""
    out = [a for b in batches.values() for a in (b.outputs, b.output_grads) if a is not None]
    return out + curv.input_probes


def _cat(rows: list[torch.Tensor]) -> torch.Tensor:
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _weighted_mean(means: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
    """One ``(1, d)`` row: the mean over all rows of several calls' row means."""
    if len(means) == 1:
        return means[0][None]
    return (sum(m * r for m, r in zip(means, rows)) / sum(rows))[None]


def _cat_examples(n: int, rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several calls of one layer on the same ``n`` examples, ``(..., n·T_i, d)``
    each, as ``(..., n·ΣT_i, d)`` with each example's rows consecutive."""
    if len(rows) == 1:
        return rows[0]
    lead = rows[0].shape[:-2]
    parts = [r.reshape(*lead, n, -1, r.shape[-1]) for r in rows]
    return torch.cat(parts, dim=-2).reshape(*lead, -1, rows[0].shape[-1])


def _check_examples(owner, name, handler, records, n) -> None:
    """Every call of a layer must see the batch's ``n`` examples on its leading axis."""
    for r in records:
        if handler.n_examples(r.input) != n:
            raise RuntimeError(
                f"{owner}: layer {name!r} saw {handler.n_examples(r.input)} examples in one "
                f"call and the batch has {n}: a subsample or a coupled method needs every "
                "call of a layer to see the whole batch on its leading axis"
            )


class Preconditioner:
    """Any curvlin method in front of any torch optimizer: :meth:`step` rewrites ``.grad``.

    Parameters
    ----------
    model : nn.Module
    method : a curvlin optimizer class (``KFAC``, ``KBFGS``, ``KBFGSL``, ...)
        The method whose curvature preconditions the gradients.
    damping : float
        The damping (an attribute you may change between steps).
    unsupported : {"error", "sgd", "adam"} or callable
        ``"error"`` raises for trainable parameters outside supported layers; anything else
        leaves them (and their gradients) to the optimizer.
    **options
        The method's block options (as its optimizer takes them, e.g. ``decay`` for KFAC) and
        the engine's (``stats_every``, ``refresh_every``, ``check_every``, ``fisher``,
        ``loss``, ``loss_reduction``, ``factor_dtype``, ``seed``).

    Notes
    -----
    The loop::

        loss = closure()          # zero_grad, forward, loss.backward()
        if precond.step():        # False: a NaN/inf step was skipped, do not step
            opt.step()
            precond.second_pass(closure)  # methods with a second pass; else a no-op

    Parameters outside the supported layers are left to the optimizer (their gradients are not
    touched). A skipped step leaves gradients and curvature untouched and warns.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KFAC, Preconditioner
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> precond = Preconditioner(model, KFAC, damping=1e-2)
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> opt.zero_grad()
    >>> ((model(x) - y) ** 2).mean().backward()
    >>> if precond.step():  # gradients are now KFAC directions
    ...     opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        method,
        damping: float | None = None,
        *,
        unsupported="error",
        **options,
    ):
        make_block, engine_options = method.block_factory(**options)
        if damping is None:
            damping = method.default_damping
        owner = f"Preconditioner({method.__name__})"
        check_hyper(owner, damping=damping)
        self.damping = damping
        self._curv = Curvature(
            model, make_block, owner=owner, unsupported=unsupported, **engine_options
        )
        self._pending = None

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers the method preconditions."""
        return list(self._curv.layers)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because their gradients or statistics held NaN or inf."""
        return self._curv.driver.skipped

    def curvature(self, layer: str):
        """A copy of one layer's curvature state."""
        if layer not in self._curv.layers:
            raise KeyError(f"{layer!r} is not a layer handled here; known: {self.layer_names}")
        return _copy(self._curv.driver.current(layer, damping=self.damping))

    def backward_fisher(self, output: torch.Tensor) -> None:
        """As :meth:`CurvatureOptimizer.backward_fisher`."""
        self._curv.backward_fisher(output)

    def remove_hooks(self) -> None:
        """Detach from the model."""
        self._curv.capture.remove()

    @torch.no_grad()
    def step(self) -> bool:
        """Update curvature and precondition the gradients; False if skipped (NaN or inf)."""
        curv, driver = self._curv, self._curv.driver
        self._pending = None
        try:
            check_hyper(curv.owner, damping=self.damping)
            grads = curv.layer_grads({id(p): 0.0 for p in curv.all_params()})
            damping = dict.fromkeys(curv.layers, self.damping)
            first = curv.first_pass(grads, [], damping=damping)
            if first is None:
                return False  # skipped: gradients and curvature untouched
            states, batches = first
            second = "second_pass" in curv.needs and batches
            directions = driver.directions(states, grads, batches=batches, damping=damping)
            for name, (dw, db) in directions:
                h = curv.layers[name]
                for p, d in zip(h.params, (dw, db)):
                    if p is not None and p.grad is not None and d is not None:
                        p.grad.copy_(d.view_as(p))
            driver.commit(states)
            if second:
                self._pending = (batches, damping)
            return True
        finally:
            curv.arm()

    def second_pass(self, closure) -> None:
        """After the optimizer's step: the closure again on the same batch (methods with a
        second pass; a no-op for the others and after a skipped step)."""
        if self._pending is None:
            return
        curv, driver = self._curv, self._curv.driver
        batches, damping = self._pending
        self._pending = None
        try:
            curv.run_closure(closure, second=True)
            plus = curv.collect(plus=True)
        finally:
            curv.arm()
        driver.second_pass_after_commit(batches, plus, damping=damping)

    def state_dict(self) -> dict:
        """The ``"curvlin"`` entry (curvature by layer, counters, generator) and the damping."""
        return {"curvlin": self._curv.state_dict(), "damping": self.damping}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` after checking all of it."""
        where = f"{self._curv.owner}.load_state_dict"
        if not isinstance(state_dict, Mapping) or "curvlin" not in state_dict:
            raise ValueError(f"{where}: not a Preconditioner state_dict (no 'curvlin' entry)")
        check_hyper(self._curv.owner, damping=state_dict.get("damping"))
        self._curv.load_state_dict(state_dict["curvlin"])
        self.damping = state_dict["damping"]


#: The options every optimizer front shares, for its docstring (``{common}``).
COMMON_DOC = """
    lr : float
        Learning rate (in every param group, so lr schedulers work).
    damping : float
        The method's damping ``λ > 0`` (per param group; see the damping table in the docs).
    momentum : float
        ``μ`` in ``[0, 1)``; its meaning is set by ``momentum_form``.
    weight_decay : float
        L2 coefficient ``τ`` added to the gradient before preconditioning.
    momentum_form : {"gradient", "direction"}
        Where torch's heavy-ball momentum acts. ``"gradient"`` (every curvlin optimizer's
        default): ``M ← μ M + (∇ + τθ)``, then ``θ ← θ − lr·P(M)``: the preconditioner of the
        current step acts on the whole momentum, so a preconditioner that is still learning
        its scale (K-BFGS's ``H_g`` starts at ``I``) cannot leave stale, oversized directions
        behind. The K-BFGS papers' EMA momentum ``M ← μ M + (1 − μ)∇`` at learning rate ``α``
        is exactly ``"gradient"`` at ``lr = α(1 − μ)``. ``"direction"``: ``v ← μ v + Δ``,
        ``θ ← θ − lr·v`` on the preconditioned direction ``Δ = P(∇ + τθ)`` (kfac-pytorch's
        form: ``torch.optim.SGD`` applied to ``Δ``). For a slowly changing ``P`` the two agree
        at the same ``lr``.
    kl_clip : float, optional
        If set, scale the step so that ``lr² · |Σ Δ·M| <= kl_clip`` (kfac-pytorch's KL
        clipping), on the device, without a host synchronisation. ``M`` is the vector that
        was preconditioned, ``Δ = P M``: the momentum buffer (``"gradient"``) or the gradient
        (``"direction"``). For a method whose ``P`` is the inverse of a damped curvature
        ``C + λI``, ``lr²·ΔᵀM`` is the step's squared length in that curvature's metric, so
        the clipped step is at most ``√(kl_clip / λ)`` long whatever the curvature does.
    relative_kl_clip : float, optional
        If set, the same bound with ``relative_kl_clip · |L|`` (``L`` the loss the closure
        returned) in place of ``kl_clip``, or the smaller of the two when both are set. Both
        sides grow alike when the loss is summed over more outputs (the Fisher with the
        loss), and the bound shrinks with the loss: once a batch is fitted, a collapsing
        curvature cannot throw it off. It is tight wherever the loss is small in absolute
        terms (a mean-reduced loss), so it is off by default but for TNT (``1e-2``;
        ``docs/benchmarks.md``, "Fitting one batch"). Needs ``opt.step(closure)``: without a
        closure the loss is unknown, a ``UserWarning`` says so once (not for TNT's default),
        and only ``kl_clip`` bounds the step. A NaN or infinite
        loss stops the step (``ν = 0``).
    adaptive_damping : bool
        Adapt the curvature groups' ``damping`` by the Levenberg–Marquardt rule
        (:func:`curvlin.lm_adapt`) every ``adapt_every`` steps: the loss after the step, on the
        same batch, over the change the method's own quadratic model predicted,
        ``−lr gᵀΔ + ½ lr² ΔᵀM`` (:func:`curvlin.predicted_change`; exact for the damped model
        whose inverse the preconditioner applies). ``ρ > 3/4`` shrinks the damping by
        ``(19/20)^adapt_every``, ``ρ < 1/4`` grows it by as much. Needs ``opt.step(closure)``
        and ``momentum_form="gradient"``. Costs one host synchronisation per adaptation, and
        for methods without a second pass one extra forward and backward (no weight
        gradients) on the batch. The model leaves out the L2 term and the fallback's
        parameters; :attr:`last_ratio` is the last ``ρ``.
    adapt_every : int
        Steps between adaptations (step 0 adapts).
    stats_every, refresh_every : int
        Gather statistics every ``stats_every`` steps, refresh the amortised part (inverses)
        every ``refresh_every`` steps; step 0 does both.
    check_every : int or None
        Check-and-repair the curvature every ``check_every`` statistics steps (one host
        synchronisation), for methods that have a check; None never checks.
    factor_dtype : torch.dtype, optional
        Dtype of the curvature state; by default the parameters' dtype, or float32 for
        float16/bfloat16 models.
    unsupported : {"error", "sgd", "adam"} or callable
        Trainable parameters outside supported layers (norm scales, embeddings, the
        projections of ``nn.MultiheadAttention``): raise (``"error"``), give them this
        optimizer's momentum SGD with its ``lr`` (``"sgd"``), ``torch.optim.Adam`` with
        ``lr=1e-3`` (``"adam"``), or the optimizer a callable makes from their list, e.g.
        ``lambda ps: torch.optim.AdamW(ps, lr=3e-4)``. They form the last param group, whose
        ``lr`` (the fallback's, scaled by schedulers) is handed to the fallback on every step;
        its state is saved in this optimizer's ``state_dict``.
"""

#: How every optimizer front behaves, for its docstring (``{behaviour}``).
BEHAVIOUR_DOC = """
    **Faults never corrupt the state.** A step whose gradients or statistics hold NaN or inf
    is skipped: parameters, curvature, momentum and counters stay as they were,
    :attr:`skipped_steps` grows and a ``RuntimeWarning`` says so. Hyperparameters are checked
    on every step (a scheduler or a hand edit can spoil them), before anything changes. A step
    that raises forgets what it captured, so the next one starts clean. A statistics step on
    which no layer was captured (the model in ``eval()`` mode, or under ``torch.no_grad()``)
    raises. A layer with a gradient but never seen in a forward pass raises. A parameter whose
    ``.grad`` is None is not updated (a missing bias gradient counts as zero in its layer's
    preconditioning). ``load_state_dict`` checks everything (layer and buffer names, shapes,
    dtypes, counters, finiteness, the method) before it changes anything; ``state_dict`` holds
    only tensors, numbers and strings, so ``torch.load(path, weights_only=True)`` reads it and
    a restored run continues bit for bit.
"""
