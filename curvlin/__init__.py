"""curvlin: the linear algebra of Kronecker-factored and structured second-order optimizers.

Written once against the Python array API; runs on NumPy/SciPy, PyTorch and CuPy arrays,
choosing a backend from the arrays it is given. Importing curvlin imports neither torch nor
CuPy.
"""

from ._errors import LinAlgError
from .kron import (
    KronFactorization,
    kron_apply,
    kron_dense,
    kron_factorize,
    kron_solve,
    pi_damping,
)
from .linalg import spd_inverse, spd_inverse_root, spd_solve

__version__ = "0.1.0.dev0"

__all__ = [
    "KronFactorization",
    "LinAlgError",
    "__version__",
    "kron_apply",
    "kron_dense",
    "kron_factorize",
    "kron_solve",
    "pi_damping",
    "spd_inverse",
    "spd_inverse_root",
    "spd_solve",
]
