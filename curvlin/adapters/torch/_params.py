"""Per-parameter units: the engine's view of methods whose blocks see one tensor each.

A method whose blocks need only a parameter's gradient (``"grad"`` or ``"sampled_grad"`` in
their needs: Shampoo, TNT) runs with ``units="parameters"``: every trainable tensor is its own
unit, handled by a :class:`ParamHandler` in the place of a layer's handler, and no hook is
registered. :func:`find_params` reads what ``torch.optim`` optimizers take (parameters, named
parameters or parameter groups) or a whole model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["UNITS", "ParamHandler", "find_params"]

#: What an engine's units are: supported layers (hooks, rows) or single parameters.
UNITS = ("layers", "parameters")


class ParamHandler:
    """One parameter as a unit: the ``weight`` slot holds it, there is no bias, and its
    gradient keeps its shape (the block reshapes it to its modes)."""

    def __init__(self, param: nn.Parameter):
        self.weight = param

    @property
    def params(self) -> tuple[nn.Parameter, None]:
        """``(param, None)``, as a layer's ``(weight, bias)``."""
        return self.weight, None

    @property
    def bias(self) -> None:
        return None

    def weight_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient as it is (its own shape)."""
        return grad


def find_params(params, *, owner: str = "curvlin"):
    """Trainable parameters by name and the parameter groups, from a model or torch's forms.

    ``params`` is an ``nn.Module`` (names as in ``named_parameters()``), an iterable of
    tensors (names ``"0"``, ``"1"``, … in order), of ``(name, tensor)`` pairs, or of dicts
    (parameter groups, each with ``"params"`` in any of those forms and its own options).
    Parameters that do not require a gradient are left out; one listed twice raises.

    Returns
    -------
    units : dict of str to ParamHandler
    groups : list of dict
        The groups with ``"params"`` replaced by the kept tensors (options kept as given).
    """
    if isinstance(params, nn.Module):
        raw = [{"params": list(params.named_parameters())}]
    elif torch.is_tensor(params):
        raise TypeError(
            f"{owner}: params must be an iterable of tensors or dicts, or a model; got a tensor"
        )
    else:
        raw = list(params) if isinstance(params, Iterable) else None
        if raw is None:
            raise TypeError(
                f"{owner}: params must be a model or an iterable of parameters, got "
                f"{type(params).__name__}"
            )
        if not raw or not isinstance(raw[0], dict):
            raw = [{"params": raw}]
    units: dict[str, ParamHandler] = {}
    groups, seen, index = [], {}, 0
    for gi, group in enumerate(raw):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{owner}: parameter group {gi} must be a dict with 'params'")
        members = group["params"]
        members = [members] if torch.is_tensor(members) else list(members)
        kept = []
        for item in members:
            name, p = item if isinstance(item, tuple) else (str(index), item)
            index += 1
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"{owner}: parameter {name!r} is a {type(p).__name__}, not a tensor"
                )
            if id(p) in seen:
                raise ValueError(
                    f"{owner}: parameter {name!r} is listed twice (as {seen[id(p)]!r})"
                )
            seen[id(p)] = name
            if p.requires_grad:
                units[name] = ParamHandler(p)
                kept.append(p)
        groups.append({**group, "params": kept})
    if not units:
        raise ValueError(f"{owner}: no trainable parameter was given")
    return units, groups
