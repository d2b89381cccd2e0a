"""curvlin: the linear algebra of Kronecker-factored and structured second-order optimizers.

Written once against the Python array API; runs on NumPy/SciPy, PyTorch and CuPy arrays,
choosing a backend from the arrays it is given. Importing curvlin imports neither torch nor
CuPy.
"""

from typing import TYPE_CHECKING

from ._errors import LinAlgError, NonFiniteError
from ._lazy import lazy_attributes

__version__ = "0.1.0.dev0"

if TYPE_CHECKING:
    from .damping import lm_adapt, predicted_change, reduction_ratio
    from .kron import (
        KronFactorization,
        kron_apply,
        kron_dense,
        kron_factorize,
        kron_solve,
        pi_damping,
    )
    from .linalg import spd_inverse, spd_inverse_root, spd_solve
    from .losses import output_hessian_sqrt
    from .miniblock import (
        BlockGroup,
        Partition,
        block_apply,
        block_inverse,
        block_statistics,
        conv_kernel_blocks,
        gradient_statistics,
        tiled_blocks,
        unit_blocks,
    )
    from .quasi_newton import (
        LBFGSState,
        bfgs_inverse_update,
        double_damping,
        hessian_action_update,
        hessian_action_update_minibatch,
        lbfgs_apply,
        lbfgs_init,
        lbfgs_push,
        lm_damping,
        powell_damping,
    )
    from .tensor_normal import mode_covariances, mode_factorize, mode_solve, trace_normalize
    from .woodbury import (
        LinearTerms,
        linear_gram,
        linear_jvp,
        linear_terms,
        linear_vjp,
        patch_gram,
        woodbury_coefficients,
        woodbury_solve,
    )

# Each submodule is imported when one of its names is first used: a process pays (in
# memory and import time) only for what it runs.
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "damping": ["lm_adapt", "predicted_change", "reduction_ratio"],
        "kron": ["KronFactorization", "kron_apply", "kron_dense", "kron_factorize",
                 "kron_solve", "pi_damping"],
        "linalg": ["spd_inverse", "spd_inverse_root", "spd_solve"],
        "losses": ["output_hessian_sqrt"],
        "miniblock": ["BlockGroup", "Partition", "block_apply", "block_inverse",
                      "block_statistics", "conv_kernel_blocks", "gradient_statistics",
                      "tiled_blocks", "unit_blocks"],
        "quasi_newton": ["LBFGSState", "bfgs_inverse_update", "double_damping",
                         "hessian_action_update", "hessian_action_update_minibatch",
                         "lbfgs_apply", "lbfgs_init", "lbfgs_push", "lm_damping",
                         "powell_damping"],
        "tensor_normal": ["mode_covariances", "mode_factorize", "mode_solve",
                          "trace_normalize"],
        "woodbury": ["LinearTerms", "linear_gram", "linear_jvp", "linear_terms", "linear_vjp",
                     "patch_gram", "woodbury_coefficients", "woodbury_solve"],
    },
)  # fmt: skip

__all__ = [
    "BlockGroup",
    "KronFactorization",
    "LBFGSState",
    "LinAlgError",
    "LinearTerms",
    "NonFiniteError",
    "Partition",
    "__version__",
    "bfgs_inverse_update",
    "block_apply",
    "block_inverse",
    "block_statistics",
    "conv_kernel_blocks",
    "double_damping",
    "gradient_statistics",
    "hessian_action_update",
    "hessian_action_update_minibatch",
    "kron_apply",
    "kron_dense",
    "kron_factorize",
    "kron_solve",
    "lbfgs_apply",
    "lbfgs_init",
    "lbfgs_push",
    "linear_gram",
    "linear_jvp",
    "linear_terms",
    "linear_vjp",
    "lm_adapt",
    "lm_damping",
    "mode_covariances",
    "mode_factorize",
    "mode_solve",
    "output_hessian_sqrt",
    "patch_gram",
    "pi_damping",
    "powell_damping",
    "predicted_change",
    "reduction_ratio",
    "spd_inverse",
    "spd_inverse_root",
    "spd_solve",
    "tiled_blocks",
    "trace_normalize",
    "unit_blocks",
    "woodbury_coefficients",
    "woodbury_solve",
]
