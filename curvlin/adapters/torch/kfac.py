"""KFAC for torch models: an optimizer and a gradient preconditioner.

Both share :class:`_KFACEngine`, which owns the hooks, the schedule and one
:class:`curvlin.blocks.KFACBlock` per supported layer; the curvature mathematics lives in the
core block, this module only moves tensors between the model and it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, MutableMapping

import torch
from torch import nn

from ...blocks import KFACBlock, KFACState, Schedule
from ._capture import LayerCapture, find_layers
from ._sampling import LOSSES, REDUCTIONS, sample_output_grad

__all__ = ["KFAC", "KFACPreconditioner"]

_PREFIX = "kfac_"


class _KFACEngine:
    """Hooks, schedule and per-layer KFAC blocks; state lives in a mapping the owner provides."""

    def __init__(
        self,
        model: nn.Module,
        *,
        fisher: str,
        loss: str | None,
        loss_reduction: str,
        decay: float,
        stats_every: int,
        inverse_every: int,
        exact_damping: bool,
        factor_dtype: torch.dtype | None,
        unsupported: str,
        seed: int,
    ):
        if fisher not in ("empirical", "mc"):
            raise ValueError(f"KFAC: fisher must be 'empirical' or 'mc', got {fisher!r}")
        if fisher == "mc" and loss not in LOSSES:
            raise ValueError(f"KFAC: fisher='mc' needs loss, one of {LOSSES}; got {loss!r}")
        if loss_reduction not in REDUCTIONS:
            raise ValueError(
                f"KFAC: loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}"
            )
        self.fisher, self.loss, self.loss_reduction = fisher, loss, loss_reduction
        self.exact_damping = bool(exact_damping)
        self.schedule = Schedule(stats_every=stats_every, inverse_every=inverse_every)
        self.layers, self.other_params = find_layers(model, unsupported=unsupported)
        self.blocks: dict[str, KFACBlock] = {}
        self.factor_dtypes: dict[str, torch.dtype] = {}
        for name, h in self.layers.items():
            self.blocks[name] = KFACBlock(h.d_out, h.d_in, bias=h.bias is not None, decay=decay)
            self.factor_dtypes[name] = factor_dtype or _default_factor_dtype(h.weight.dtype)
        self.capture = LayerCapture(self.layers, root=model)
        self.capture.capture_grads = fisher == "empirical"
        device = next(iter(self.layers.values())).weight.device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.step_count = 0
        self.arm()

    # -- state in the owner's mapping (one dict per layer, keyed by the weight) ----------
    def load_block(self, name: str, store: MutableMapping) -> KFACState:
        slot = store[self.layers[name].weight]
        if _PREFIX + "g" not in slot:
            weight = self.layers[name].weight
            return self.blocks[name].init(weight.detach(), dtype=self.factor_dtypes[name])
        arrays = {k[len(_PREFIX) :]: v for k, v in slot.items() if k.startswith(_PREFIX)}
        updates = arrays.pop("updates")
        return KFACState.from_arrays(arrays, int(updates))

    def save_block(self, name: str, state: KFACState, store: MutableMapping) -> None:
        slot = store[self.layers[name].weight]
        for key in [k for k in slot if k.startswith(_PREFIX)]:
            del slot[key]
        for key, value in state.arrays().items():
            slot[_PREFIX + key] = value
        slot[_PREFIX + "updates"] = state.updates

    # -- the step --------------------------------------------------------------------------
    def arm(self) -> None:
        """Capture during the next forward/backward only if the next step gathers statistics."""
        self.capture.clear()
        self.capture.active = self.schedule.stats_due(self.step_count)

    def backward_fisher(self, output: torch.Tensor) -> None:
        if self.fisher != "mc":
            raise RuntimeError(
                "backward_fisher() is for fisher='mc'; the empirical Fisher "
                "uses the gradients of the ordinary loss.backward()"
            )
        if not self.capture.active:
            return  # not a statistics step: nothing to sample
        records = [
            r for recs in self.capture.records.values() for r in recs if r.output.requires_grad
        ]
        if not records:
            raise RuntimeError(
                "backward_fisher(): no layer was recorded in the forward pass; "
                "run the model in training mode with gradients enabled"
            )
        delta = sample_output_grad(
            output, loss=self.loss, reduction=self.loss_reduction, generator=self.generator
        )
        grads = torch.autograd.grad(
            output,
            [r.output for r in records],
            grad_outputs=delta,
            retain_graph=True,
            allow_unused=True,
        )
        for record, grad in zip(records, grads):
            record.grad = grad  # None for a forward pass that did not lead to ``output``

    def batch_statistics(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """This step's ``(G, A)`` per recorded layer, or None when it gathers none."""
        if not self.capture.active:
            return None
        out = {}
        for name, recorded in self.capture.records.items():
            handler = self.layers[name]
            # Forward passes whose output never reached a backward (an extra evaluation with
            # gradients on, say) have no gradient and are left out.
            records = [r for r in recorded if r.grad is not None]
            if not records:
                continue
            dtype = self.factor_dtypes[name]
            a = _cat([handler.input_rows(r.input).to(dtype) for r in records])
            g = _cat([handler.output_rows(r.grad).to(dtype) for r in records])
            examples = self.capture.examples or sum(handler.n_examples(r.input) for r in records)
            if self.fisher == "empirical" and self.loss_reduction != "sum":
                g = g * examples  # autograd's gradient of a batch-mean loss is δ / N
            # A summed loss has the summed curvature, G = Σ δδᵀ; a mean loss the mean.
            n = 1 if self.loss_reduction == "sum" else examples
            out[name] = self.blocks[name].statistics(a, g, n_examples=n)
        if not out:
            raise RuntimeError(
                "KFAC: no layer was captured with its output gradient on a statistics step: run "
                "the forward pass in training mode with gradients enabled, then "
                + ("opt.backward_fisher(output)" if self.fisher == "mc" else "loss.backward()")
                + ", before step()"
            )
        return out

    def new_states(self, stats, store, damping_of: Callable[[str], float]) -> dict[str, KFACState]:
        """States after this step's statistics and (when due) refresh, without committing."""
        refresh = self.schedule.inverse_due(self.step_count)
        states = {}
        for name, block in self.blocks.items():
            state = self.load_block(name, store)
            if stats is not None and name in stats:
                g_new, a_new = stats[name]
                state = block.fold(state, g_new, a_new)
            if refresh and state.updates > 0:
                state = block.refresh(state, damping=damping_of(name), exact=self.exact_damping)
            states[name] = state
        return states

    def precondition(self, name: str, state: KFACState, grad_w, grad_b):
        handler = self.layers[name]
        dw, db = self.blocks[name].precondition(state, handler.weight_grad(grad_w), grad_b)
        return dw.view_as(grad_w), db

    def finish_step(self) -> None:
        self.step_count += 1
        self.arm()


def load_keeping_dtypes(opt: torch.optim.Optimizer, state_dict, *, prefix: str, owner: str):
    """``torch.optim.Optimizer.load_state_dict`` that keeps curvature buffers' own dtype.

    Torch casts every floating state tensor to its parameter's dtype; buffers whose key starts
    with ``prefix`` (factors, inverses) are put back as saved, on the parameter's device.
    Returns the ``"curvlin"`` entry (counters, generator state) for the caller to restore.
    """
    state_dict = dict(state_dict)
    extra = state_dict.pop("curvlin", None)
    if extra is None:
        raise ValueError(f"{owner}.load_state_dict: not a {owner} state_dict (no 'curvlin' entry)")
    params = [p for group in opt.param_groups for p in group["params"]]
    saved = {
        i: {k: v for k, v in slot.items() if k.startswith(prefix)}
        for i, slot in state_dict["state"].items()
    }
    torch.optim.Optimizer.load_state_dict(opt, state_dict)
    for i, buffers in saved.items():
        p = params[int(i)]
        for k, v in buffers.items():
            opt.state[p][k] = v.to(p.device) if torch.is_tensor(v) else v
    return extra


def _cat(rows: list[torch.Tensor]) -> torch.Tensor:
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _default_factor_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _all_finite(tensors) -> bool:
    """One host synchronisation for the whole step's finiteness check.

    A sum per tensor is one reduction kernel with no boolean temporaries; NaN or inf in any
    entry makes it non-finite (so does a finite overflow, which deserves a skip as well).
    """
    sums = [t.sum() for t in tensors]
    return bool(torch.stack(sums).isfinite().all()) if sums else True


_ENGINE_DOC = """
    fisher : {"empirical", "mc"}
        ``"empirical"``: curvature from the gradients of the ordinary ``loss.backward()``
        (true labels), so a plain training loop works. ``"mc"``: the sampled Fisher, one label
        per example drawn from the model's prediction; call :meth:`backward_fisher` with the
        network output before ``loss.backward()`` on each step.
    loss : {"cross_entropy", "bce_with_logits", "mse"}, optional
        The training loss (needed by ``fisher="mc"`` to sample labels).
    loss_reduction : {"mean", "batchmean", "sum"}
        How the training loss reduces: torch's ``"mean"`` (over all elements), ``"batchmean"``
        (summed over outputs, averaged over the batch) or ``"sum"``. Unless ``"sum"``, captured
        output gradients are multiplied by the number of examples to make them per-example
        (all forward passes since the last step count, so gradient accumulation works) and
        ``G`` is their mean; with ``"sum"``, ``G = Σ δδᵀ``, the curvature of the summed loss.
        The sampled Fisher also uses it to scale its draws (see :func:`sample_output_grad`).
    decay : float
        EMA decay of the Kronecker factors.
    stats_every, inverse_every : int
        Gather statistics every ``stats_every`` steps, refresh inverses every ``inverse_every``
        steps (both on step 0).
    exact_damping : bool
        False: π-split damping ``(G + γ_G I)⁻¹ ⊗ (A + γ_A I)⁻¹``; True: ``(G ⊗ A + λI)⁻¹``.
    factor_dtype : torch.dtype, optional
        Dtype of the factors and inverses; by default the parameters' dtype, or float32 for
        float16/bfloat16 models.
    unsupported : {"error", "sgd"}
        What to do with trainable parameters outside supported layers.
    seed : int
        Seed of the label sampling of ``fisher="mc"``.
"""


class _KFACFrontend:
    """What the optimizer and the preconditioner share: inspection and the sampled backward."""

    _engine: _KFACEngine

    def backward_fisher(self, output: torch.Tensor) -> None:
        """The sampled Fisher's extra backward: draws labels from ``output`` and captures δ.

        Call it after the forward pass and before ``loss.backward()`` (it keeps the graph).
        Parameters' ``.grad`` are not touched. A no-op on steps that gather no statistics.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from torch.nn import functional as F
        >>> from curvlin.adapters.torch import KFAC
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> opt = KFAC(model, lr=0.1, fisher="mc", loss="cross_entropy")
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> output = model(x)
        >>> opt.zero_grad()
        >>> opt.backward_fisher(output)
        >>> F.cross_entropy(output, y).backward()
        >>> opt.step()
        """
        self._engine.backward_fisher(output)

    @property
    def layer_names(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the layers KFAC handles."""
        return list(self._engine.layers)

    def curvature(self, layer: str) -> KFACState:
        """A copy of one layer's curvature state (factors, inverse, update count)."""
        name = self._layer_name(layer)
        state = self._engine.load_block(name, self._store())
        arrays = {k: v.detach().clone() for k, v in state.arrays().items()}
        return KFACState.from_arrays(arrays, state.updates)

    def curvature_operator(self, layer: str):
        """``G ⊗ A`` of one layer as a SciPy ``LinearOperator`` on ``vec([W, b])``."""
        name = self._layer_name(layer)
        return self._engine.blocks[name].curvature_operator(self.curvature(name))

    def inverse_operator(self, layer: str):
        """One layer's damped inverse as a SciPy ``LinearOperator`` on ``vec([W, b])``."""
        name = self._layer_name(layer)
        return self._engine.blocks[name].inverse_operator(self.curvature(name))

    def remove_hooks(self) -> None:
        """Detach from the model (no more statistics can be gathered)."""
        self._engine.capture.remove()

    def _layer_name(self, layer) -> str:
        if layer in self._engine.layers:
            return layer
        raise KeyError(f"{layer!r} is not a layer handled by KFAC; known: {self.layer_names}")

    def _store(self) -> MutableMapping:
        raise NotImplementedError


class KFAC(_KFACFrontend, torch.optim.Optimizer):
    """Kronecker-factored approximate curvature (KFAC) as a ``torch.optim.Optimizer``.

    Each supported layer (``nn.Linear``, ``nn.Conv2d`` and registered types) gets the update
    ``Δ = (G ⊗ A + damping)⁻¹ vec([∇W, ∇b])`` followed by heavy-ball momentum,
    ``v ← μ v + Δ``, ``θ ← θ − lr · v``; weight decay is added to the gradient first (L2).

    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers.
    lr : float
        Learning rate (in every param group, so lr schedulers work).
    damping : float
        Total Tikhonov damping λ (per param group).
    momentum : float
        Heavy-ball momentum μ.
    weight_decay : float
        L2 coefficient added to the gradient before preconditioning.
    kl_clip : float, optional
        If set, scale the update so that ``lr² · Δᵀ∇ <= kl_clip`` (kfac-pytorch's KL clipping),
        computed without a host synchronisation.
    {engine_options}
    Notes
    -----
    The statistics are gathered from the forward and backward passes that precede
    :meth:`step`, only on statistics steps and only while the model is in training mode. A step
    whose gradients or statistics hold NaN or inf is skipped: parameters, factors, inverses,
    momentum and counters stay as they were, :attr:`skipped_steps` grows and a
    ``RuntimeWarning`` says so. ``state_dict`` carries factors, inverses, counters and the
    sampling generator's state, so a restored run continues bit for bit.

    References
    ----------
    Martens & Grosse (2015), ICML; Grosse & Martens (2016), ICML (convolutions).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KFAC
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = KFAC(model, lr=0.3, damping=0.1)
    >>> x = torch.randn(64, 4)
    >>> y = x.sum(dim=1, keepdim=True)
    >>> first = ((model(x) - y) ** 2).mean().item()
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     loss = ((model(x) - y) ** 2).mean()
    ...     loss.backward()
    ...     opt.step()
    >>> bool(((model(x) - y) ** 2).mean() < first / 10)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        kl_clip: float | None = None,
        fisher: str = "empirical",
        loss: str | None = None,
        loss_reduction: str = "mean",
        decay: float = 0.95,
        stats_every: int = 1,
        inverse_every: int = 1,
        exact_damping: bool = False,
        factor_dtype: torch.dtype | None = None,
        unsupported: str = "error",
        seed: int = 0,
    ):
        _check_hyper(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"KFAC: kl_clip must be > 0 or None, got {kl_clip!r}")
        self.kl_clip = kl_clip
        self._engine = _KFACEngine(
            model,
            fisher=fisher,
            loss=loss,
            loss_reduction=loss_reduction,
            decay=decay,
            stats_every=stats_every,
            inverse_every=inverse_every,
            exact_damping=exact_damping,
            factor_dtype=factor_dtype,
            unsupported=unsupported,
            seed=seed,
        )
        layer_params = [
            p for h in self._engine.layers.values() for p in (h.weight, h.bias) if p is not None
        ]
        groups = [{"params": layer_params, "kfac": True}]
        if self._engine.other_params:
            groups.append({"params": self._engine.other_params, "kfac": False})
        defaults = {
            "lr": lr,
            "damping": damping,
            "momentum": momentum,
            "weight_decay": weight_decay,
        }
        super().__init__(groups, defaults)
        #: Steps skipped because of NaN or inf gradients or statistics.
        self.skipped_steps = 0

    def _store(self):
        return self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One KFAC step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        engine = self._engine
        stats = engine.batch_statistics()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        checked = [p.grad for p in params]
        if stats is not None:
            # Gram matrices: a NaN or inf row of a or g reaches the diagonal.
            checked += [f.diagonal() for pair in stats.values() for f in pair]
        if not _all_finite(checked):
            self.skipped_steps += 1
            warnings.warn(
                f"KFAC: step {engine.step_count} skipped, its gradients or curvature statistics "
                "hold NaN or inf (optimizer state left unchanged)",
                RuntimeWarning,
                stacklevel=2,
            )
            engine.arm()
            return loss
        kfac_group = self.param_groups[0]
        states = engine.new_states(stats, self.state, lambda name: kfac_group["damping"])
        for name, state in states.items():
            engine.save_block(name, state, self.state)
        updates = self._kfac_directions(states, kfac_group)
        for group in self.param_groups[1:]:
            wd = group["weight_decay"]
            updates += [
                (p, group, p.grad + wd * p if wd else p.grad)
                for p in group["params"]
                if p.grad is not None
            ]
        for p, group, direction in updates:
            self._momentum_update(p, group, direction)
        engine.finish_step()
        return loss

    def _kfac_directions(self, states, group):
        engine = self._engine
        wd = group["weight_decay"]
        out, dots = [], []
        for name, handler in engine.layers.items():
            w, b = handler.weight, handler.bias
            if w.grad is None or states[name].inverse is None:
                continue
            grad_w = w.grad + wd * w if wd else w.grad
            grad_b = None if b is None else (b.grad + wd * b if wd else b.grad)
            dw, db = engine.precondition(name, states[name], grad_w, grad_b)
            out.append((w, group, dw))
            if self.kl_clip is not None:
                dots.append((dw * grad_w).sum())
            if b is not None:
                out.append((b, group, db))
                if self.kl_clip is not None:
                    dots.append((db * grad_b).sum())
        if self.kl_clip is not None and dots:
            quad = torch.stack(dots).sum().abs() * group["lr"] ** 2
            nu = torch.clamp(torch.sqrt(self.kl_clip / quad.clamp_min(1e-30)), max=1.0)
            out = [(p, g, d * nu.to(d.dtype)) for p, g, d in out]
        return out

    def _momentum_update(self, p, group, direction):
        mu = group["momentum"]
        if mu:
            slot = self.state[p]
            buf = slot.get("momentum_buffer")
            if buf is None:
                buf = slot["momentum_buffer"] = direction.detach().clone()
            else:
                buf.mul_(mu).add_(direction)
            direction = buf
        p.add_(direction, alpha=-group["lr"])

    def state_dict(self):
        """Torch's optimizer state plus curvlin's counters and sampling generator state."""
        out = super().state_dict()
        out["curvlin"] = {
            "step_count": self._engine.step_count,
            "generator": self._engine.generator.get_state(),
            "skipped_steps": self.skipped_steps,
        }
        return out

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict`; factors keep their own dtype (torch would cast them)."""
        extra = load_keeping_dtypes(self, state_dict, prefix=_PREFIX, owner="KFAC")
        self._engine.step_count = int(extra["step_count"])
        self._engine.generator.set_state(extra["generator"])
        self.skipped_steps = int(extra["skipped_steps"])
        self._engine.arm()


KFAC.__doc__ = KFAC.__doc__.replace("{engine_options}", _ENGINE_DOC)


class KFACPreconditioner(_KFACFrontend):
    """KFAC in front of any torch optimizer: :meth:`step` rewrites ``.grad`` in place.

    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers.
    damping : float
        Total Tikhonov damping λ (an attribute you may change between steps).
    {engine_options}
    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KFACPreconditioner
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> precond = KFACPreconditioner(model, damping=1e-2)
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> opt.zero_grad()
    >>> ((model(x) - y) ** 2).mean().backward()
    >>> precond.step()  # gradients are now KFAC directions
    True
    >>> opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-2,
        *,
        fisher: str = "empirical",
        loss: str | None = None,
        loss_reduction: str = "mean",
        decay: float = 0.95,
        stats_every: int = 1,
        inverse_every: int = 1,
        exact_damping: bool = False,
        factor_dtype: torch.dtype | None = None,
        unsupported: str = "error",
        seed: int = 0,
    ):
        _check_hyper(damping=damping)
        self.damping = damping
        self._engine = _KFACEngine(
            model,
            fisher=fisher,
            loss=loss,
            loss_reduction=loss_reduction,
            decay=decay,
            stats_every=stats_every,
            inverse_every=inverse_every,
            exact_damping=exact_damping,
            factor_dtype=factor_dtype,
            unsupported=unsupported,
            seed=seed,
        )
        self._state: dict = {h.weight: {} for h in self._engine.layers.values()}

    def _store(self):
        return self._state

    @torch.no_grad()
    def step(self) -> bool:
        """Update curvature and precondition the gradients; False if skipped (NaN or inf).

        A skipped step leaves gradients and curvature state untouched and warns.
        """
        engine = self._engine
        stats = engine.batch_statistics()
        grads = [
            p.grad
            for h in engine.layers.values()
            for p in (h.weight, h.bias)
            if p is not None and p.grad is not None
        ]
        if stats is not None:
            grads += [f.diagonal() for pair in stats.values() for f in pair]
        if not _all_finite(grads):
            warnings.warn(
                f"KFACPreconditioner: step {engine.step_count} skipped, its gradients or "
                "statistics hold NaN or inf (state and gradients left unchanged)",
                RuntimeWarning,
                stacklevel=2,
            )
            engine.arm()
            return False
        states = engine.new_states(stats, self._state, lambda name: self.damping)
        for name, state in states.items():
            engine.save_block(name, state, self._state)
            handler = engine.layers[name]
            w, b = handler.weight, handler.bias
            if w.grad is None or state.inverse is None:
                continue
            dw, db = engine.precondition(name, state, w.grad, None if b is None else b.grad)
            w.grad.copy_(dw)
            if b is not None:
                b.grad.copy_(db)
        engine.finish_step()
        return True

    def state_dict(self) -> dict:
        """Factors, inverses and counters by layer name, and the sampling generator's state."""
        layers = {}
        for name, handler in self._engine.layers.items():
            layers[name] = dict(self._state[handler.weight])
        return {
            "layers": layers,
            "step_count": self._engine.step_count,
            "generator": self._engine.generator.get_state(),
            "damping": self.damping,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (tensors moved to each layer's device)."""
        missing = set(self._engine.layers) - set(state_dict["layers"])
        if missing:
            raise ValueError(f"KFACPreconditioner.load_state_dict: no state for layers {missing}")
        for name, handler in self._engine.layers.items():
            device = handler.weight.device
            self._state[handler.weight] = {
                k: v.to(device) if torch.is_tensor(v) else v
                for k, v in state_dict["layers"][name].items()
            }
        self._engine.step_count = int(state_dict["step_count"])
        self._engine.generator.set_state(state_dict["generator"])
        self.damping = state_dict["damping"]
        self._engine.arm()


KFACPreconditioner.__doc__ = KFACPreconditioner.__doc__.replace("{engine_options}", _ENGINE_DOC)


def _check_hyper(owner: str = "KFAC", **values) -> None:
    rules = {
        "lr": lambda v: v >= 0,
        "damping": lambda v: v > 0,
        "momentum": lambda v: 0 <= v < 1,
        "weight_decay": lambda v: v >= 0,
    }
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not rules[name](value):
            want = {
                "lr": ">= 0",
                "damping": "> 0",
                "momentum": "in [0, 1)",
                "weight_decay": ">= 0",
            }[name]
            raise ValueError(f"{owner}: {name} must be a number {want}, got {value!r}")
