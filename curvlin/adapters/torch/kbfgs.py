"""K-BFGS and K-BFGS(L) for torch models, as ``torch.optim.Optimizer`` subclasses.

The curvature mathematics lives in :class:`curvlin.blocks.KBFGSBlock`; this module captures
each supported layer's inputs, pre-activations and output gradients (with
:class:`~curvlin.adapters.torch.LayerCapture`) in the two forward/backward passes that the
closure given to :meth:`KBFGS.step` runs, and moves tensors between the model and the blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ...blocks import KBFGSBlock, KBFGSState
from ._capture import LayerCapture, find_layers
from ._layers import Conv2dHandler
from .kfac import _all_finite, _cat, _check_hyper, _default_factor_dtype, load_keeping_dtypes

__all__ = ["KBFGS", "KBFGSL"]

_PREFIX = "kbfgs_"
_VARIANTS = (None, "convex", "additive")


class _KBFGSBase(torch.optim.Optimizer):
    """What K-BFGS and K-BFGS(L) share; they differ only in the block's ``memory``."""

    _name = "KBFGS"

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        momentum: float,
        weight_decay: float,
        *,
        memory: int | None,
        a_update: str,
        curvature_every: int,
        pd_check_every: int | None,
        variant: str | None,
        mu1: float,
        a_decay: float,
        pair_decay: float,
        skip_threshold: float,
        lbfgs_method: str,
        factor_dtype: torch.dtype | None,
        unsupported: str,
    ):
        name = self._name
        _check_hyper(name, lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        if isinstance(curvature_every, bool) or not isinstance(curvature_every, int):
            raise ValueError(
                f"{name}: curvature_every must be an int >= 1, got {curvature_every!r}"
            )
        if curvature_every < 1:
            raise ValueError(
                f"{name}: curvature_every must be an int >= 1, got {curvature_every!r}"
            )
        if pd_check_every is not None and (
            isinstance(pd_check_every, bool)
            or not isinstance(pd_check_every, int)
            or pd_check_every < 1
        ):
            raise ValueError(
                f"{name}: pd_check_every must be None or an int >= 1, got {pd_check_every!r}"
            )
        if variant not in _VARIANTS:
            raise ValueError(f"{name}: variant must be one of {_VARIANTS}, got {variant!r}")
        self.curvature_every = curvature_every
        self.pd_check_every = pd_check_every
        self.layers, other_params = find_layers(model, unsupported=unsupported)
        self.blocks: dict[str, KBFGSBlock] = {}
        self.factor_dtypes: dict[str, torch.dtype] = {}
        for layer, h in self.layers.items():
            layer_variant = variant
            if layer_variant is None:
                layer_variant = "additive" if isinstance(h, Conv2dHandler) else "convex"
            self.blocks[layer] = KBFGSBlock(
                h.d_out,
                h.d_in,
                bias=h.bias is not None,
                memory=memory,
                a_update=a_update,
                a_decay=a_decay,
                pair_decay=pair_decay,
                mu1=mu1,
                variant=layer_variant,
                skip_threshold=skip_threshold,
                lbfgs_method=lbfgs_method,
            )
            self.factor_dtypes[layer] = factor_dtype or _default_factor_dtype(h.weight.dtype)
        self.capture = LayerCapture(self.layers, root=model)
        layer_params = [
            p for h in self.layers.values() for p in (h.weight, h.bias) if p is not None
        ]
        groups = [{"params": layer_params, "kbfgs": True}]
        if other_params:
            groups.append({"params": other_params, "kbfgs": False})
        defaults = {
            "lr": lr,
            "damping": damping,
            "momentum": momentum,
            "weight_decay": weight_decay,
        }
        super().__init__(groups, defaults)
        #: Steps taken (skipped ones not counted); curvature passes run when it is a multiple
        #: of ``curvature_every``.
        self.step_count = 0
        #: Steps skipped because of NaN or inf gradients or statistics.
        self.skipped_steps = 0
        #: Factors rebuilt because they were no longer positive definite (``pd_check_every``).
        self.repaired_factors = 0

    # -- introspection ------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the layers K-BFGS handles."""
        return list(self.layers)

    def curvature(self, layer: str) -> KBFGSState:
        """A copy of one layer's curvature state (``H_a``, ``H_g``, EMAs, counters)."""
        if layer not in self.layers:
            raise KeyError(
                f"{layer!r} is not a layer handled by {self._name}; known: {self.layer_names}"
            )
        state = self._load(layer)
        arrays = {k: v.detach().clone() for k, v in state.arrays().items()}
        return KBFGSState.from_arrays(arrays, a_updates=state.a_updates, g_updates=state.g_updates)

    def remove_hooks(self) -> None:
        """Detach from the model (no more curvature can be gathered)."""
        self.capture.remove()

    # -- per-layer state in self.state[weight] ----------------------------------------------
    def _load(self, layer: str) -> KBFGSState:
        slot = self.state[self.layers[layer].weight]
        if _PREFIX + "h_a" not in slot:
            weight = self.layers[layer].weight.detach()
            return self.blocks[layer].init(weight, dtype=self.factor_dtypes[layer])
        arrays = {k[len(_PREFIX) :]: v for k, v in slot.items() if k.startswith(_PREFIX)}
        a_updates, g_updates = arrays.pop("a_updates"), arrays.pop("g_updates")
        return KBFGSState.from_arrays(arrays, a_updates=a_updates, g_updates=g_updates)

    def _save(self, layer: str, state: KBFGSState) -> None:
        slot = self.state[self.layers[layer].weight]
        for key in [k for k in slot if k.startswith(_PREFIX)]:
            del slot[key]
        for key, value in state.arrays().items():
            slot[_PREFIX + key] = value
        slot[_PREFIX + "a_updates"] = state.a_updates
        slot[_PREFIX + "g_updates"] = state.g_updates

    # -- capture ------------------------------------------------------------------------------
    def _run(self, closure, *, record: bool):
        self.capture.clear()
        self.capture.active = record
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            self.capture.active = False
        return loss

    def _second_pass(self, closure) -> None:
        """The closure again at ``θ_{k+1}``, for ``h⁺`` and ``g⁺`` only.

        Every parameter is frozen meanwhile and the first recorded layers' outputs become the
        roots of the backward graph, so the closure's ``loss.backward()`` computes the output
        gradients without a single weight gradient; ``.grad`` stays as the closure's
        ``zero_grad`` left it.
        """
        frozen = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        self.capture.root_outputs = True
        try:
            self._run(closure, record=True)
        finally:
            self.capture.root_outputs = False
            for p in frozen:
                p.requires_grad_(True)

    def _collect(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """Per recorded layer: input rows, pre-activation rows, autograd's gradient rows, m."""
        out = {}
        for layer, recorded in self.capture.records.items():
            records = [r for r in recorded if r.grad is not None]
            if not records:
                continue
            handler, dtype = self.layers[layer], self.factor_dtypes[layer]
            x = _cat([handler.input_rows(r.input).to(dtype) for r in records])
            h = _cat([handler.output_rows(r.output.detach()).to(dtype) for r in records])
            g = _cat([handler.output_rows(r.grad).to(dtype) for r in records])
            n = self.capture.examples or sum(handler.n_examples(r.input) for r in records)
            # Autograd's gradient of a batch-mean loss is g / m: only means of g are needed
            # (y and ḡ), so the factor m is applied to them, not to every row.
            out[layer] = (x, h, g, n)
        self.capture.clear()
        return out

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One K-BFGS step; ``closure`` is required and is called twice on curvature steps.

        ``closure`` must zero the gradients, run the forward pass on the current minibatch,
        call ``loss.backward()`` on the batch-mean loss and return the loss. Returns the loss
        of the first call (at the parameters before the step).
        """
        name = self._name
        if closure is None:
            raise RuntimeError(
                f"{name}.step() needs a closure: K-BFGS evaluates the same minibatch twice, before "
                "and after the update. Pass a function that zeroes the gradients, runs the forward "
                "pass, calls loss.backward() and returns the loss: opt.step(closure)"
            )
        curvature = self.step_count % self.curvature_every == 0
        loss = self._run(closure, record=curvature)
        stats = self._collect() if curvature else {}
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        checked = [p.grad for p in params] + [t for v in stats.values() for t in v[:3]]
        if not _all_finite(checked):
            self.skipped_steps += 1
            warnings.warn(
                f"{name}: step {self.step_count} skipped, its gradients or curvature statistics "
                "hold NaN or inf (parameters and optimizer state left unchanged)",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        group = self.param_groups[0]
        damping = group["damping"]
        states = {layer: self._load(layer) for layer in self.layers}
        for layer, (x, _, _, n) in stats.items():
            states[layer] = self.blocks[layer].update_a(
                states[layer], x, n_examples=n, damping=damping
            )
        # Directions first (all from θ_k), then the parameter updates.
        updates = []
        for layer, handler in self.layers.items():
            w, b = handler.weight, handler.bias
            if w.grad is None:
                continue
            m_w = self._momentum(w, group)
            m_b = None if b is None or b.grad is None else self._momentum(b, group)
            if b is not None and m_b is None:
                m_b = torch.zeros_like(b)
            dw, db = self.blocks[layer].precondition(states[layer], handler.weight_grad(m_w), m_b)
            updates.append((w, group, dw.view_as(w)))
            if b is not None and b.grad is not None:
                updates.append((b, group, db))
        for other in self.param_groups[1:]:
            updates += [
                (p, other, self._momentum(p, other)) for p in other["params"] if p.grad is not None
            ]
        for p, g, direction in updates:
            p.add_(direction, alpha=-g["lr"])
        if curvature and stats:
            self._second_pass(closure)
            plus = self._collect()
            for layer, (x, h, g, n) in stats.items():
                if layer not in plus or plus[layer][1].shape != h.shape:
                    continue  # the layer was not reached in the second pass the same way
                block, state = self.blocks[layer], states[layer]
                s, y = block.pair(h, plus[layer][1], g, plus[layer][2])
                state = block.update_g(state, s, y * n, g.mean(dim=0) * n, damping=damping)
                state = block.update_h_a(state, x, n_examples=n, damping=damping)
                states[layer] = self._check_factors(layer, state, x, n, damping)
        for layer, state in states.items():
            self._save(layer, state)
        self.step_count += 1
        return loss

    def _check_factors(self, layer: str, state: KBFGSState, x, n: int, damping) -> KBFGSState:
        """Every ``pd_check_every`` curvature steps: rebuild factors no longer positive definite."""
        every = self.pd_check_every
        if every is None or state.a_updates % every:
            return state
        state, rebuilt = self.blocks[layer].repair(state, x, n_examples=n, damping=damping)
        if rebuilt:
            self.repaired_factors += len(rebuilt)
            what = {"h_a": "H_a re-inverted from A + √λ I", "h_g": "H_g reset to I"}
            warnings.warn(
                f"{self._name}: layer {layer!r}: {' and '.join(rebuilt)} no longer positive "
                f"definite at step {self.step_count}; {', '.join(what[r] for r in rebuilt)}",
                RuntimeWarning,
                stacklevel=3,
            )
        return state

    def _momentum(self, p: torch.Tensor, group) -> torch.Tensor:
        """``M ← ρ M + (1 − ρ)(∇f + τ θ)`` in place (EMA form, no bias correction); returns M."""
        wd, rho = group["weight_decay"], group["momentum"]
        grad = p.grad + wd * p if wd else p.grad
        if not rho:
            return grad
        slot = self.state[p]
        buf = slot.get("momentum_buffer")
        if buf is None:
            buf = slot["momentum_buffer"] = torch.zeros_like(p)
        buf.lerp_(grad, 1.0 - rho)  # ρ M + (1 − ρ) g in one pass
        return buf

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self):
        """Torch's optimizer state (every buffer, per layer) plus curvlin's counters."""
        out = super().state_dict()
        out["curvlin"] = {
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
            "repaired_factors": self.repaired_factors,
        }
        return out

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict`; curvature buffers keep their own dtype."""
        extra = load_keeping_dtypes(self, state_dict, prefix=_PREFIX, owner=self._name)
        self.step_count = int(extra["step_count"])
        self.skipped_steps = int(extra["skipped_steps"])
        # Absent from checkpoints written before the positive-definiteness check existed.
        self.repaired_factors = int(extra.get("repaired_factors", 0))


_COMMON_DOC = """
    Parameters
    ----------
    model : nn.Module
        The model; hooks are registered on its supported layers (``nn.Linear``, ``nn.Conv2d``
        and registered types).
    lr : float
        Learning rate ``α`` (in every param group, so lr schedulers work).
    damping : float
        ``λ > 0``. The input side inverts ``A + √λ I`` and the double damping of the
        output-side pairs uses ``μ2 = √λ``. Assumes per-example pre-activation gradients of a
        batch-mean loss (K-BFGS's convention).
    momentum : float
        ``ρ`` of the EMA momentum ``M ← ρ M + (1 − ρ)(∇f + τθ)`` (no bias correction), which
        is then preconditioned: ``θ ← θ − α H_g M H_a``. Unsupported parameters
        (``unsupported="sgd"``) get ``θ ← θ − α M``.
    weight_decay : float
        ``τ``, the L2 coefficient added to the gradient before the momentum.
    curvature_every : int
        Run the second forward/backward pass and the ``H_g``, ``H_a`` and ``A`` updates only
        every ``curvature_every`` steps (always on the first step, which warm-starts ``H_a``);
        the other steps call the closure once and precondition with the current factors.
    pd_check_every : int or None
        Every ``pd_check_every`` curvature steps, test ``H_a`` (and a dense ``H_g``) by a
        Cholesky factorisation and rebuild one that rounding has made indefinite (see the
        notes); None never tests.
    variant : {None, "convex", "additive"}
        The Levenberg–Marquardt step of the double damping; None picks ``"convex"`` (DD-v1)
        for linear layers and ``"additive"`` (DD-v2) for convolutions. Use ``"additive"`` when
        ``damping >= 1``.
    mu1 : float
        Powell threshold of the double damping.
    a_decay, pair_decay : float
        EMA decays of ``A`` and of the pair ``(s, y)``.
    skip_threshold : float
        ``c`` of the skip rule ``s̃ᵀỹ <= c·‖ḡ‖·s̃ᵀs̃``.
    factor_dtype : torch.dtype, optional
        Dtype of ``H_a``, ``H_g`` and the EMAs; by default the parameters' dtype, or float32
        for float16/bfloat16 models.
    unsupported : {"error", "sgd"}
        What to do with trainable parameters outside supported layers: raise, or give them the
        (EMA-)momentum SGD update.
"""

_NOTES_DOC = """
    Notes
    -----
    **The closure drives two passes.** :meth:`step` needs a closure that zeroes the
    gradients, runs the forward pass on the current minibatch, calls ``loss.backward()`` and
    returns the loss. It is called once at ``θ_k`` (layer inputs ``x̄``, pre-activations ``h``
    and their gradients ``g`` are recorded), the parameters are updated, and on curvature steps
    it is called again on the same minibatch at ``θ_{k+1}`` to record ``h⁺`` and ``g⁺``; then
    ``H_g`` is updated from ``s = mean(h − h⁺)``, ``y = mean(g − g⁺)`` and ``H_a`` by the
    Hessian-action update. The loss must be a mean over the examples of the batch (any mean
    over other axes too); per-example gradients are autograd's times the batch size. The
    second pass runs with every parameter frozen (``requires_grad=False``), so its backward
    computes output gradients only, no weight gradient; after :meth:`step`, ``.grad`` is what
    the closure's ``zero_grad`` left on curvature steps.

    **Dropout and BatchNorm.** The two passes must compute the same function of the
    parameters, or ``y`` measures noise. Make the closure deterministic per step: reseed the
    random number generator inside it with a seed drawn once per step (e.g. ``seed =
    torch.randint(2**62, ()).item()`` before ``step`` and ``torch.manual_seed(seed)`` at the
    top of the closure, or ``torch.random.fork_rng`` around it), so both passes draw the same
    dropout masks. BatchNorm's batch statistics are the same in both passes (same batch), but
    its running averages are updated twice; freeze them (momentum 0 in the second pass) or
    accept the double update. BatchNorm's own affine parameters are not Linear/Conv2d
    parameters: pass ``unsupported="sgd"`` or freeze them.

    A step whose gradients or first-pass statistics hold NaN or inf is skipped: parameters,
    factors, EMAs, momentum and counters stay as they were, :attr:`skipped_steps` grows and a
    ``RuntimeWarning`` says so. A non-finite pair from the second pass is skipped on the
    device (no synchronisation).

    Over long float32 runs, rank-two updates can round ``H_a`` or a dense ``H_g`` into a
    matrix that is not positive definite (``spec/kbfgs.md`` §9.6). Every ``pd_check_every``
    curvature steps each is tested by a Cholesky factorisation (one host synchronisation per
    layer); a failed ``H_a`` is re-inverted from ``A + √λ I`` (the EMA ``A``, or the batch's
    for the minibatch variant), a failed ``H_g`` reset to ``I``, with a ``RuntimeWarning``;
    :attr:`repaired_factors` counts them.

    ``state_dict`` carries every buffer (``H_a``, ``H_g`` or the L-BFGS memory, ``A``, the pair
    EMAs, momentum, counters), so a restored run continues bit for bit.
"""


class KBFGS(_KBFGSBase):
    """K-BFGS: Kronecker-factored BFGS with double damping, as a ``torch.optim.Optimizer``.

    Each supported layer's step is ``θ ← θ − α H_g M H_a`` with ``M`` the EMA momentum of the
    gradient, ``H_a ≈ (A + √λ I)⁻¹`` (warm-started from the first batch, then Hessian-action
    BFGS updates against an EMA of ``A``) and a dense ``H_g ≈ G⁻¹`` learned by double-damped
    BFGS from pre-activation changes between two passes on the same minibatch
    (:class:`curvlin.blocks.KBFGSBlock`).
    {common}
    a_update : {"ema", "minibatch"}
        ``"ema"`` (K-BFGS of 2020) keeps an EMA of ``A``; ``"minibatch"`` uses the batch's
        ``A`` matrix-free in the Hessian action and never stores ``A``.
    {notes}
    References
    ----------
    Goldfarb, Ren & Bahamou (2020), "Practical quasi-Newton methods for training deep neural
    networks", NeurIPS, Algorithm 1; ``spec/kbfgs.md``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KBFGS
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> opt = KBFGS(model, lr=0.3, damping=0.3)
    >>> x = torch.randn(64, 4)
    >>> y = x.sum(dim=1, keepdim=True)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = ((model(x) - y) ** 2).mean()
    ...     loss.backward()
    ...     return loss
    >>> first = closure().item()
    >>> for _ in range(30):
    ...     loss = opt.step(closure)
    >>> bool(closure() < first / 10)
    True
    """

    _name = "KBFGS"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        a_update: str = "ema",
        curvature_every: int = 1,
        pd_check_every: int | None = 100,
        variant: str | None = None,
        mu1: float = 0.2,
        a_decay: float = 0.9,
        pair_decay: float = 0.9,
        skip_threshold: float = 1e-4,
        factor_dtype: torch.dtype | None = None,
        unsupported: str = "error",
    ):
        super().__init__(
            model,
            lr,
            damping,
            momentum,
            weight_decay,
            memory=None,
            a_update=a_update,
            curvature_every=curvature_every,
            pd_check_every=pd_check_every,
            variant=variant,
            mu1=mu1,
            a_decay=a_decay,
            pair_decay=pair_decay,
            skip_threshold=skip_threshold,
            lbfgs_method="two-loop",
            factor_dtype=factor_dtype,
            unsupported=unsupported,
        )


class KBFGSL(_KBFGSBase):
    """K-BFGS(L): K-BFGS with ``H_g`` as an L-BFGS memory, as a ``torch.optim.Optimizer``.

    As :class:`KBFGS`, except that ``H_g`` is the L-BFGS operator of the last ``memory``
    accepted double-damped pairs (initial matrix ``I``) and, by default, the Hessian action on
    the input side uses each batch's ``A`` matrix-free, so ``A`` is never stored
    (:class:`curvlin.blocks.KBFGSLBlock`).
    {common}
    memory : int
        ``p``, the number of pairs kept per layer.
    a_update : {"minibatch", "ema"}
        As in :class:`KBFGS`; default ``"minibatch"``.
    lbfgs_method : {"compact", "two-loop"}
        How the L-BFGS operator is applied (:func:`curvlin.lbfgs_apply`). Both give the same
        operator; the compact form is a few matrix products instead of ``2p`` small steps
        (2.6× faster per K-BFGS(L) step on the demo's autoencoder on a 2-core CPU).
    {notes}
    References
    ----------
    Goldfarb, Ren & Bahamou (2020), NeurIPS (K-BFGS(L)); Ren, Bahamou & Goldfarb (2021),
    arXiv:2102.06737 (minibatch Hessian action, convolutions); ``spec/kbfgs.md``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlin.adapters.torch import KBFGSL
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> opt = KBFGSL(model, lr=0.1, memory=10)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = ((model(x) - y) ** 2).mean()
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)
    >>> opt.curvature("0").h_g.s.shape
    torch.Size([10, 8])
    """

    _name = "KBFGSL"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        memory: int = 100,
        a_update: str = "minibatch",
        curvature_every: int = 1,
        pd_check_every: int | None = 100,
        variant: str | None = None,
        mu1: float = 0.2,
        a_decay: float = 0.9,
        pair_decay: float = 0.9,
        skip_threshold: float = 1e-4,
        lbfgs_method: str = "compact",
        factor_dtype: torch.dtype | None = None,
        unsupported: str = "error",
    ):
        super().__init__(
            model,
            lr,
            damping,
            momentum,
            weight_decay,
            memory=memory,
            a_update=a_update,
            curvature_every=curvature_every,
            pd_check_every=pd_check_every,
            variant=variant,
            mu1=mu1,
            a_decay=a_decay,
            pair_decay=pair_decay,
            skip_threshold=skip_threshold,
            lbfgs_method=lbfgs_method,
            factor_dtype=factor_dtype,
            unsupported=unsupported,
        )


for _cls in (KBFGS, KBFGSL):
    _cls.__doc__ = _cls.__doc__.replace("    {common}\n", "\n" + _COMMON_DOC.lstrip("\n")).replace(
        "    {notes}\n", "\n" + _NOTES_DOC.strip("\n") + "\n\n"
    )
