"""Exceptions raised by curvlin."""


class LinAlgError(ValueError):
    """A factorisation failed and could not be recovered.

    Raised, for instance, when a matrix handed to :func:`curvlin.spd_inverse` holds NaN or inf
    or is not positive definite even after jitter and a float64 retry. A subclass of
    ``ValueError``, like ``numpy.linalg.LinAlgError``.

    Examples
    --------
    >>> import numpy as np
    >>> import curvlin
    >>> try:
    ...     curvlin.spd_inverse(-np.eye(2))
    ... except curvlin.LinAlgError as err:
    ...     print(str(err)[:40])
    spd_inverse: m is not positive definite:
    """
