"""Per-layer curvature blocks on one protocol, and the driver that runs them.

:class:`Block` is the protocol (statistics, fold, refresh, precondition, second pass, check),
:class:`Driver` runs any set of blocks on one :class:`Schedule` with the non-finite skip and
checkpoints; one module per method holds its block and state. Methods that couple all layers
through one m×m kernel use the second protocol, :class:`KernelBlock` and :func:`kernel_solve`.
"""

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
from .diagonal import DiagonalFisherBlock, DiagonalFisherState
from .driver import CHECKPOINT_FORMAT, Distributor, Driver
from .kbfgs import KBFGSBlock, KBFGSLBlock, KBFGSState
from .kernel import KernelBlock, KernelState, LinearKernelBlock, kernel_solve
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
