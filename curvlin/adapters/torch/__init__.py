"""The torch adapter: layer capture, KFAC and K-BFGS optimizers, KFAC preconditioner, sampling.

Importing this subpackage imports torch; ``import curvlin`` alone never does.
"""

from ._capture import LayerCapture, find_layers
from ._layers import Conv2dHandler, LayerHandler, LinearHandler, handler_for, register_layer
from ._sampling import LOSSES, sample_output_grad
from .kbfgs import KBFGS, KBFGSL
from .kfac import KFAC, KFACPreconditioner

__all__ = [
    "KBFGS",
    "KBFGSL",
    "KFAC",
    "LOSSES",
    "Conv2dHandler",
    "KFACPreconditioner",
    "LayerCapture",
    "LayerHandler",
    "LinearHandler",
    "find_layers",
    "handler_for",
    "register_layer",
    "sample_output_grad",
]
