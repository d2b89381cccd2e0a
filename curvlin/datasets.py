"""Synthetic data sets for demos and tests, generated on the fly (nothing is downloaded).

:func:`make_curves` draws CURVES-style images in the spirit of the data set of Hinton &
Salakhutdinov (2006): every image is a thin, smooth, anti-aliased curve through three random
points, rendered on a small square grid with intensities in [0, 1]. Such data lie near a
low-dimensional manifold (six numbers fix each image), which makes them the classic benchmark
for deep autoencoders such as 784-400-200-100-50-25-6 and for the second-order optimizers that
train them. :func:`load_curves` returns a train/test split of fixed size and seed.
:func:`load_digits` returns scikit-learn's small digits set (shipped with scikit-learn, so
nothing is downloaded either), scaled to [0, 1].

The module is pure NumPy; it imports neither torch nor CuPy (nor scikit-learn until
:func:`load_digits` is called).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np

__all__ = ["CurvesDataset", "load_curves", "load_digits", "make_curves"]

# Images are rendered at most this many at a time, and fewer when one image needs many
# quadrature points: each Gaussian-weight temporary then holds at most _BUDGET elements.
_CHUNK = 512
_BUDGET = 1 << 22
# Smallest fraction of the curve's parameter interval given to either arc of the curve, so that
# a near-coincident pair of control points cannot make the quadratic blow up.
_MIN_T = 0.1
# Accumulated intensities below this are treated as background and shrunk to exactly zero.
_FLOOR = 1.0 / 256.0
# FWHM of a Gaussian = this many standard deviations.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def make_curves(
    n,
    /,
    *,
    image_size=28,
    seed=None,
    dtype=np.float32,
    thickness=1.5,
):
    """Draw ``n`` CURVES-style images: smooth, thin, anti-aliased curves through three points.

    For each image, three control points are drawn uniformly from the square
    ``[m, s - m]²`` (``s = image_size``, margin ``m = s / 14``, so 2 pixels at ``s = 28``). The
    curve is the quadratic ``P(t)``, ``0 <= t <= 1``, that starts and ends at the two points
    farthest apart and passes through the third at its chord-length parameter, so it is a
    single smooth arc (never a hairpin folded back on itself). The curve is drawn as a
    stroke whose cross-section is a Gaussian with full width at half maximum ``thickness`` and
    peak 1: pixel values are the line integral of that Gaussian along the curve, so strokes
    are anti-aliased, have soft rounded ends, and read 1 on the curve. Overlaps (a curve
    crossing itself) are clipped at 1 and the faint far tail (below 1/256) is shrunk to exactly
    0, so the background is exactly zero.

    Because a two-dimensional Gaussian is separable, the whole batch is rendered by one batched
    matrix product of per-row and per-column Gaussian weights, with no loop over images or
    pixels.

    Parameters
    ----------
    n : int
        Number of images, ``n >= 0``.
    image_size : int, optional
        Side of the square images in pixels, ``>= 4``. Default 28 (as in MNIST and CURVES).
    seed : None, int, numpy.random.SeedSequence or numpy.random.Generator, optional
        Randomness. An int or ``SeedSequence`` seeds :func:`numpy.random.default_rng`; a
        ``Generator`` is used (and advanced) as is; ``None`` draws fresh entropy. The same int
        seed always gives the same images, and the first ``k`` images of ``make_curves(n, ...)``
        are ``make_curves(k, ...)`` with the same seed.
    dtype : data-type, optional
        A real floating dtype for the result. Default ``numpy.float32``. Images are computed in
        float64 when ``dtype`` has 8 bytes or more and in float32 otherwise.
    thickness : float, optional
        Stroke width in pixels: the full width at half maximum of the stroke's cross-section.
        Must be finite and ``> 0``. Default 1.5. Strokes much thinner than a pixel are
        under-sampled by the pixel grid (and slower to draw).

    Returns
    -------
    numpy.ndarray, shape (n, image_size * image_size)
        One flattened image per row, in C order (reshape a row to
        ``(image_size, image_size)`` to get rows top to bottom); values in [0, 1].

    Raises
    ------
    TypeError
        If ``n`` or ``image_size`` is not an int, ``thickness`` is not a real number, ``dtype``
        is not a real floating dtype, or ``seed`` is of an unsupported type.
    ValueError
        If ``n < 0``, ``image_size < 4``, ``thickness`` is not finite and positive, or ``seed``
        is a negative int.

    See Also
    --------
    load_curves : a fixed train/test split.

    References
    ----------
    Hinton & Salakhutdinov (2006), "Reducing the dimensionality of data with neural networks",
    Science 313(5786):504–507 (the CURVES data set and its deep autoencoder).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlin.datasets import make_curves
    >>> x = make_curves(5, seed=0)
    >>> x.shape, x.dtype
    ((5, 784), dtype('float32'))
    >>> bool(x.min() >= 0.0 and x.max() <= 1.0)
    True
    >>> bool(np.array_equal(x, make_curves(5, seed=0)))
    True
    >>> bool(np.array_equal(x[:2], make_curves(2, seed=0)))
    True
    >>> make_curves(3, image_size=16, seed=1, dtype=np.float64).shape
    (3, 256)
    """
    n = _check_int(n, "n", minimum=0)
    image_size = _check_int(image_size, "image_size", minimum=4)
    if isinstance(thickness, bool) or not isinstance(thickness, Real):
        raise TypeError(f"make_curves: thickness must be a real number, got {thickness!r}")
    if not (math.isfinite(thickness) and thickness > 0):
        raise ValueError(f"make_curves: thickness must be finite and > 0, got {thickness!r}")
    out_dtype = _check_dtype(dtype)
    rng = _generator(seed, "make_curves")

    work = np.float64 if out_dtype.itemsize >= 8 else np.float32
    size = image_size
    margin = size / 14.0
    # Every control point at once, so that results do not depend on chunking and a shorter
    # call with the same seed gives a prefix of a longer one.
    points = rng.uniform(margin, size - margin, size=(n, 3, 2))

    sigma = float(thickness) / _FWHM_PER_SIGMA
    # Quadrature points along the curve. A curve here is well under 3·size long, so they are
    # at most ~1.5·sigma apart, which makes the sum of Gaussians a flat stroke (Poisson
    # summation puts the ripple below 2·exp(-2π²/1.5²) ≈ 3e-4 of the peak).
    n_quad = max(32, math.ceil(3.0 * size / sigma))
    chunk = max(1, min(_CHUNK, _BUDGET // (n_quad * size)))
    out = np.empty((n, size * size), dtype=out_dtype)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        images = _render(points[start:stop], size, sigma, n_quad, work)
        out[start:stop] = images.reshape(stop - start, size * size)
    return out


class CurvesDataset(NamedTuple):
    """A train/test split of CURVES-style images, as returned by :func:`load_curves`."""

    train: np.ndarray
    """Training images, shape (n_train, image_size * image_size)."""
    test: np.ndarray
    """Test images, shape (n_test, image_size * image_size)."""


def load_curves(
    *,
    n_train=20000,
    n_test=2000,
    seed=0,
    image_size=28,
    dtype=np.float32,
    thickness=1.5,
):
    """A reproducible train/test split of CURVES-style images, generated by :func:`make_curves`.

    The train and test sets come from independent streams spawned from ``seed``, so the
    training set does not depend on ``n_test`` nor the test set on ``n_train``.

    Parameters
    ----------
    n_train, n_test : int, optional
        Sizes of the two sets, each ``>= 0``. Defaults 20000 and 2000.
    seed : int or numpy.random.SeedSequence, optional
        Seed of the split. Default 0.
    image_size, dtype, thickness
        As for :func:`make_curves`.

    Returns
    -------
    CurvesDataset
        A named tuple ``(train, test)`` of arrays of shapes
        ``(n_train, image_size * image_size)`` and ``(n_test, image_size * image_size)``, with
        values in [0, 1].

    References
    ----------
    Hinton & Salakhutdinov (2006), "Reducing the dimensionality of data with neural networks",
    Science 313(5786):504–507.

    Examples
    --------
    >>> from curvlin.datasets import load_curves
    >>> data = load_curves(n_train=100, n_test=10)
    >>> data.train.shape, data.test.shape
    ((100, 784), (10, 784))
    >>> import numpy as np
    >>> bool(np.array_equal(data.test, load_curves(n_train=5, n_test=10).test))
    True
    """
    n_train = _check_int(n_train, "n_train", minimum=0, func="load_curves")
    n_test = _check_int(n_test, "n_test", minimum=0, func="load_curves")
    if isinstance(seed, np.random.SeedSequence):
        seq = seed
    elif isinstance(seed, Integral) and not isinstance(seed, bool):
        if seed < 0:
            raise ValueError(f"load_curves: seed must be >= 0, got {seed!r}")
        seq = np.random.SeedSequence(int(seed))
    else:
        raise TypeError(f"load_curves: seed must be an int or a SeedSequence, got {seed!r}")
    train_seq, test_seq = seq.spawn(2)
    kw = {"image_size": image_size, "dtype": dtype, "thickness": thickness}
    return CurvesDataset(
        train=make_curves(n_train, seed=np.random.default_rng(train_seq), **kw),
        test=make_curves(n_test, seed=np.random.default_rng(test_seq), **kw),
    )


def load_digits(*, dtype=np.float32) -> np.ndarray:
    """scikit-learn's digits, 1797 images of 8×8 pixels, as rows scaled to [0, 1].

    The images ship with scikit-learn (an optional dependency: ``pip install scikit-learn``,
    part of curvlin's ``test`` extra); the pixel counts 0–16 are divided by 16.

    Parameters
    ----------
    dtype : NumPy floating dtype, optional
        Default float32.

    Returns
    -------
    numpy.ndarray, shape (1797, 64)

    Raises
    ------
    ImportError
        If scikit-learn is not installed, saying how to install it.

    Examples
    --------
    >>> from curvlin.datasets import load_digits
    >>> x = load_digits()
    >>> x.shape, float(x.min()), float(x.max())
    ((1797, 64), 0.0, 1.0)
    """
    try:
        from sklearn.datasets import load_digits as _sklearn_digits
    except ImportError as exc:
        raise ImportError(
            "load_digits needs scikit-learn, which ships the digits images: "
            "pip install scikit-learn (or curvlin's 'test' extra)"
        ) from exc
    return (_sklearn_digits().data / 16.0).astype(_check_dtype(dtype))


def _render(points, size, sigma, n_quad, work):
    """Images of shape (b, size, size) for control points of shape (b, 3, 2) given as (x, y)."""
    points = points.astype(work)
    # The farthest-apart pair of points are the ends and the third point lies between them, so
    # the curve is a single arc rather than a hairpin folded back on itself.
    side = np.linalg.norm(points - np.roll(points, -1, axis=1), axis=-1)  # |q_i - q_{i+1}|
    end = np.argmax(side, axis=1)  # ends are points end and end + 1; the middle is end + 2
    rows = np.arange(points.shape[0])
    p0, p2, p1 = (points[rows, (end + k) % 3] for k in range(3))
    # Parameter of the middle point: its share of the chord length, kept off 0 and 1.
    c1 = np.linalg.norm(p1 - p0, axis=-1)
    c2 = np.linalg.norm(p2 - p1, axis=-1)
    total = c1 + c2
    t1 = np.divide(c1, total, out=np.full_like(c1, 0.5), where=total > 0)
    t1 = np.clip(t1, _MIN_T, 1.0 - _MIN_T)[:, None]
    # P(t) = p0 + a t + b t² with P(t1) = p1 and P(1) = p2.
    d = p2 - p0
    b = (d * t1 - (p1 - p0)) / (t1 * (1.0 - t1))
    a = d - b
    # The curve as a polyline; Gaussians sit at segment midpoints, weighted by segment length.
    t = np.linspace(0.0, 1.0, n_quad + 1, dtype=work)
    curve = p0[:, None, :] + a[:, None, :] * t[:, None] + b[:, None, :] * (t * t)[:, None]
    mid = 0.5 * (curve[:, 1:, :] + curve[:, :-1, :])  # (b, n_quad, 2)
    ds = np.linalg.norm(curve[:, 1:, :] - curve[:, :-1, :], axis=-1)  # (b, n_quad)
    # Pixel centres sit at half-integers; x runs along columns, y along rows.
    centres = np.arange(size, dtype=work) + work(0.5)
    scale = work(-0.5 / sigma**2)
    gx = np.exp(scale * (centres - mid[:, :, 0, None]) ** 2)  # (b, n_quad, size)
    gy = np.exp(scale * (centres - mid[:, :, 1, None]) ** 2)  # (b, n_quad, size)
    gx *= (ds / work(math.sqrt(2.0 * math.pi) * sigma))[:, :, None]
    images = np.matmul(gy.transpose(0, 2, 1), gx)  # (b, size [y], size [x])
    # Continuous shrink of the faint tail to exactly zero, then clip overlaps at 1.
    images -= work(_FLOOR)
    images *= work(1.0 / (1.0 - _FLOOR))
    return np.clip(images, 0.0, 1.0, out=images)


def _check_int(value, name, *, minimum, func="make_curves"):
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{func}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{func}: {name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_dtype(dtype):
    message = f"make_curves: dtype must be a real floating dtype, got {dtype!r}"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(message) from None
    if dt.kind != "f":
        raise TypeError(message)
    return dt


def _generator(seed, func):
    if seed is None or isinstance(seed, np.random.Generator | np.random.SeedSequence):
        return np.random.default_rng(seed)
    if isinstance(seed, Integral) and not isinstance(seed, bool):
        if seed < 0:
            raise ValueError(f"{func}: seed must be >= 0, got {seed!r}")
        return np.random.default_rng(int(seed))
    raise TypeError(
        f"{func}: seed must be None, an int, a SeedSequence or a Generator, got {seed!r}"
    )
