"""Per-layer curvature blocks on one protocol, and the driver that runs them.

:class:`Block` is the protocol (statistics, fold, refresh, precondition, second pass, check),
:class:`Driver` runs any set of blocks on one :class:`Schedule` with the non-finite skip and
checkpoints; one module per method holds its block and state. Methods that couple all layers
through one m×m kernel use the second protocol, :class:`KernelBlock` and :func:`kernel_solve`.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from ._schedule import Schedule
from .base import (
    NEEDS,
    Block,
    BlockState,
    LayerBatch,
    Rows,
    as_rows,
    ema,
    homogeneous,
    homogeneous_gram,
)
from .driver import CHECKPOINT_FORMAT, Distributor, Driver
from .kernel import KernelBlock, KernelState, LinearKernelBlock, kernel_solve

if TYPE_CHECKING:
    from .diagonal import DiagonalFisherBlock, DiagonalFisherState
    from .kbfgs import KBFGSBlock, KBFGSLBlock, KBFGSState
    from .kfac import KFACBlock, KFACState
    from .mbf import MBFBlock, MBFState
    from .tensor import (
        CONV_RESHAPES,
        GRAFTS,
        ShampooBlock,
        TensorBlock,
        TensorState,
        TNTBlock,
        tensor_modes,
    )

# A method's block module is imported when one of its names is first used: a process pays
# (in memory and import time) only for the methods it runs.
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "diagonal": ["DiagonalFisherBlock", "DiagonalFisherState"],
        "kbfgs": ["KBFGSBlock", "KBFGSLBlock", "KBFGSState"],
        "kfac": ["KFACBlock", "KFACState"],
        "mbf": ["MBFBlock", "MBFState"],
        "tensor": ["CONV_RESHAPES", "GRAFTS", "ShampooBlock", "TensorBlock", "TensorState",
                   "TNTBlock", "tensor_modes"],
    },
)  # fmt: skip

__all__ = [
    "CHECKPOINT_FORMAT",
    "CONV_RESHAPES",
    "GRAFTS",
    "NEEDS",
    "Block",
    "BlockState",
    "DiagonalFisherBlock",
    "DiagonalFisherState",
    "Distributor",
    "Driver",
    "KBFGSBlock",
    "KBFGSLBlock",
    "KBFGSState",
    "KFACBlock",
    "KFACState",
    "KernelBlock",
    "KernelState",
    "LayerBatch",
    "LinearKernelBlock",
    "MBFBlock",
    "MBFState",
    "Rows",
    "Schedule",
    "ShampooBlock",
    "TNTBlock",
    "TensorBlock",
    "TensorState",
    "as_rows",
    "ema",
    "homogeneous",
    "homogeneous_gram",
    "kernel_solve",
    "tensor_modes",
]
