"""Exceptions raised by curvlin."""


class LinAlgError(ValueError):
    """A factorisation failed and could not be recovered.

    Raised, for instance, when a matrix handed to :func:`curvlin.spd_inverse` holds NaN or inf
    or is not positive definite even after jitter and a float64 retry. A subclass of
    ``ValueError``, like ``numpy.linalg.LinAlgError``.
    """
