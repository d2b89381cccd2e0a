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


class NonFiniteError(LinAlgError):
    """A matrix or right-hand side handed to a factorisation or solve holds NaN or inf.

    A subclass of :class:`LinAlgError`: nothing was factorised. The torch optimizers catch it
    where a step's own curvature overflows (SMW-NG's and SMW-GN's kernel from finite rows) and
    skip the step as they skip a non-finite batch.

    Examples
    --------
    >>> import numpy as np
    >>> import curvlin
    >>> try:
    ...     curvlin.spd_solve(np.eye(2), np.array([1.0, np.nan]))
    ... except curvlin.NonFiniteError as err:
    ...     print(str(err)[:40])
    spd_solve: b of shape (2,) holds NaN or
    """
