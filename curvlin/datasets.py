"""Data sets for demos and tests: generated on the fly or read from local files (no downloads).

:func:`make_curves` draws CURVES-style images in the spirit of the data set of Hinton &
Salakhutdinov (2006): every image is a thin, smooth, anti-aliased curve through three random
points, rendered on a small square grid with intensities in [0, 1]. Such data lie near a
low-dimensional manifold (six numbers fix each image), which makes them the classic benchmark
for deep autoencoders such as 784-400-200-100-50-25-6 and for the second-order optimizers that
train them. :func:`load_curves` returns a train/test split of fixed size and seed.
:func:`load_digits` returns scikit-learn's small digits set (shipped with scikit-learn, so
nothing is downloaded either), scaled to [0, 1]. :func:`load_mnist` reads MNIST from the four
standard IDX files (optionally gzipped) in a directory the user names, and :func:`read_idx`
reads any one IDX file; curvlin never downloads them.

The module is pure NumPy; it imports neither torch nor CuPy (nor scikit-learn until
:func:`load_digits` is called).
"""

from __future__ import annotations

import gzip
import math
import os
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np

__all__ = [
    "MNIST_FILES",
    "CurvesDataset",
    "MnistDataset",
    "load_curves",
    "load_digits",
    "load_mnist",
    "make_curves",
    "read_idx",
]

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


#: IDX element types: the third byte of the magic number -> (NumPy big-endian dtype).
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: The four MNIST files, by role, under their standard names (each may also end in ``.gz``).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (the format of the MNIST distribution), gzipped or not.

    The file is a 4-byte magic number (two zero bytes, the element type, the number of
    dimensions ``k``), ``k`` big-endian uint32 sizes, then the elements in C order, big-endian.
    A name ending in ``.gz`` is decompressed first.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    numpy.ndarray
        Of the file's shape, in the native byte order of its element type (``uint8`` for
        MNIST's images and labels).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not IDX (bad magic number or element type), or is truncated or has
        trailing bytes: the message names the file and the byte counts.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from curvlin.datasets import read_idx
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny-idx2-ubyte")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6]))
    >>> read_idx(path)
    array([[1, 2, 3],
           [4, 5, 6]], dtype=uint8)
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"read_idx: cannot read {path!r}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(
            f"read_idx: {path!r} is not an IDX file (its first bytes {raw[:4].hex()!r} are not "
            "a magic number 00 00 <type> <ndim>)"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"read_idx: {path!r} is truncated: {len(raw)} bytes, shorter than its "
            f"{header}-byte header"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    want = header + math.prod(shape) * dtype.itemsize
    if len(raw) != want:
        what = "truncated" if len(raw) < want else "longer than its header says"
        raise ValueError(
            f"read_idx: {path!r} is {what}: {len(raw)} bytes, expected {want} for shape {shape}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


class MnistDataset(NamedTuple):
    """MNIST as returned by :func:`load_mnist`: images as rows in [0, 1], labels 0–9."""

    train: np.ndarray
    """Training images, shape (60000, 784)."""
    test: np.ndarray
    """Test images, shape (10000, 784)."""
    train_labels: np.ndarray
    """Training labels, shape (60000,), int64."""
    test_labels: np.ndarray
    """Test labels, shape (10000,), int64."""


def _mnist_path(directory: str, role: str) -> str:
    base = os.path.join(directory, MNIST_FILES[role])
    for candidate in (base, base + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    listing = "\n".join(f"  {name}[.gz]" for name in MNIST_FILES.values())
    raise FileNotFoundError(
        f"load_mnist: no {MNIST_FILES[role]} (nor {MNIST_FILES[role]}.gz) in {directory!r}. "
        f"curvlin does not download MNIST: put the four standard IDX files, gzipped or not, "
        f"in that directory under these names:\n{listing}"
    )


def load_mnist(directory, *, dtype=np.float32) -> MnistDataset:
    """MNIST from the four standard IDX files in ``directory``; nothing is downloaded.

    ``directory`` must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (:data:`MNIST_FILES`), each
    optionally gzipped (``.gz`` appended, as distributed). Pixel values 0–255 are divided by
    255 and each image is flattened to a row.

    Parameters
    ----------
    directory : str or os.PathLike
    dtype : NumPy floating dtype, optional
        Of the images. Default float32.

    Returns
    -------
    MnistDataset
        ``(train, test, train_labels, test_labels)``.

    Raises
    ------
    FileNotFoundError
        If ``directory`` or a file is missing; the message lists the files to put there.
    ValueError
        If a file is not IDX, is truncated, or images and labels disagree in number.

    Examples
    --------
    With the files in ``~/data/mnist``: ``load_mnist("~/data/mnist").train.shape`` is
    ``(60000, 784)``. A directory without them gets a message saying what to put where:

    >>> from curvlin.datasets import load_mnist
    >>> load_mnist("no-such-directory")
    Traceback (most recent call last):
    ...
    FileNotFoundError: load_mnist: no directory 'no-such-directory'. curvlin does not ...
    """
    work = _check_dtype(dtype, "load_mnist")
    directory = os.path.expanduser(os.fspath(directory))
    if not os.path.isdir(directory):
        listing = ", ".join(f"{name}[.gz]" for name in MNIST_FILES.values())
        raise FileNotFoundError(
            f"load_mnist: no directory {directory!r}. curvlin does not download MNIST: put the "
            f"four standard IDX files ({listing}) in a directory and pass its path"
        )
    parts = {role: read_idx(_mnist_path(directory, role)) for role in MNIST_FILES}
    out = {}
    for split in ("train", "test"):
        images, labels = parts[f"{split}_images"], parts[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"load_mnist: {split} images of shape {images.shape} and labels of shape "
                f"{labels.shape} in {directory!r} do not match (want (n, rows, cols) and (n,))"
            )
        out[split] = (images.reshape(images.shape[0], -1) / work.type(255)).astype(work)
        out[f"{split}_labels"] = labels.astype(np.int64)
    return MnistDataset(**out)


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
    # Weights below √tiny are exact zeros: products of the rest stay normal numbers, while
    # subnormal ones would slow the product below about 30× (float32); none reaches _FLOOR.
    cut = 0.5 * math.log(np.finfo(work).tiny)
    ex, ey = (scale * (centres - mid[:, :, k, None]) ** 2 for k in (0, 1))  # (b, n_quad, size)
    gx = np.exp(ex, out=np.zeros_like(ex), where=ex > cut)
    gy = np.exp(ey, out=np.zeros_like(ey), where=ey > cut)
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


def _check_dtype(dtype, func="make_curves"):
    message = f"{func}: dtype must be a real floating dtype, got {dtype!r}"
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
