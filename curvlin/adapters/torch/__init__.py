"""The torch adapter: the engine, every method's optimizer front, the preconditioner, capture.

Importing this subpackage imports torch; ``import curvlin`` alone never does.
"""

from typing import TYPE_CHECKING

from ..._lazy import lazy_attributes
from ._capture import UNSUPPORTED, LayerCapture, find_layers
from ._engine import MOMENTUM_FORMS, Curvature, CurvatureOptimizer, Preconditioner
from ._layers import Conv2dHandler, LayerHandler, LinearHandler, handler_for, register_layer
from ._sampling import LOSSES, sample_output_grad

if TYPE_CHECKING:
    from .diagonal import DiagonalFisher
    from .kbfgs import KBFGS, KBFGSL
    from .kfac import KFAC, KFACPreconditioner
    from .mbf import MBF
    from .smw import SMWGN, SMWNG
    from .tensor import TNT, Shampoo

# Each method's front is imported when first used: a process training with one method
# carries only that front's code (it shows in the peak memory benchmarks).
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "diagonal": ["DiagonalFisher"],
        "kbfgs": ["KBFGS", "KBFGSL"],
        "kfac": ["KFAC", "KFACPreconditioner"],
        "mbf": ["MBF"],
        "smw": ["SMWGN", "SMWNG"],
        "tensor": ["TNT", "Shampoo"],
    },
)

__all__ = [
    "KBFGS",
    "KBFGSL",
    "KFAC",
    "LOSSES",
    "MBF",
    "MOMENTUM_FORMS",
    "SMWGN",
    "SMWNG",
    "TNT",
    "UNSUPPORTED",
    "Conv2dHandler",
    "Curvature",
    "CurvatureOptimizer",
    "DiagonalFisher",
    "KFACPreconditioner",
    "LayerCapture",
    "LayerHandler",
    "LinearHandler",
    "Preconditioner",
    "Shampoo",
    "find_layers",
    "handler_for",
    "register_layer",
    "sample_output_grad",
]
