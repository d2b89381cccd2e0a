"""Tests of the CURVES-style data generator in curvlin.datasets."""

import subprocess
import sys

import numpy as np
import pytest

from curvlin.datasets import CurvesDataset, load_curves, make_curves


@pytest.fixture(scope="module")
def curves():
    return make_curves(2000, seed=0)


def test_shape_dtype_range(curves):
    assert curves.shape == (2000, 784)
    assert curves.dtype == np.float32
    assert np.all(np.isfinite(curves))
    assert curves.min() >= 0.0
    assert curves.max() <= 1.0
    # The stroke peaks at 1 on the curve; the nearest pixel centre can be up to half a pixel
    # off the curve, so ask only that almost every image reaches a bright value.
    assert np.mean(curves.max(axis=1) > 0.7) > 0.99


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("image_size", [4, 16, 28, 33])
def test_sizes_and_dtypes(dtype, image_size):
    x = make_curves(7, image_size=image_size, seed=3, dtype=dtype)
    assert x.shape == (7, image_size * image_size)
    assert x.dtype == dtype
    assert x.min() >= 0.0
    assert x.max() <= 1.0
    assert np.all((x > 0).any(axis=1))


def test_float64_matches_float32():
    x32 = make_curves(50, seed=4, dtype=np.float32)
    x64 = make_curves(50, seed=4, dtype=np.float64)
    np.testing.assert_allclose(x32, x64, atol=1e-4)


def test_empty():
    x = make_curves(0, seed=0)
    assert x.shape == (0, 784)
    assert x.dtype == np.float32


def test_deterministic_and_seed_dependent():
    a = make_curves(64, seed=123)
    assert np.array_equal(a, make_curves(64, seed=123))
    assert np.array_equal(a, make_curves(64, seed=np.random.default_rng(123)))
    assert np.array_equal(a, make_curves(64, seed=np.random.SeedSequence(123)))
    b = make_curves(64, seed=124)
    assert not np.array_equal(a, b)
    # Every image differs, not just some of them.
    assert np.all(np.abs(a - b).max(axis=1) > 0.1)


def test_prefix_is_independent_of_chunking():
    # 1300 images span three rendering chunks; any prefix equals the shorter call.
    big = make_curves(1300, seed=5)
    assert np.array_equal(big[:700], make_curves(700, seed=5))
    assert np.array_equal(big[:1], make_curves(1, seed=5))


def test_generator_is_advanced():
    rng = np.random.default_rng(9)
    a = make_curves(10, seed=rng)
    b = make_curves(10, seed=rng)
    assert not np.array_equal(a, b)


def test_images_are_distinct(curves):
    # No two images coincide (six continuous parameters per image).
    assert len(np.unique(curves, axis=0)) == len(curves)


def test_every_image_has_ink_but_is_not_all_ink(curves):
    ink = (curves > 0).sum(axis=1)
    assert ink.min() >= 5
    # A thin curve covers a small part of the image: background is exactly zero.
    assert ink.max() < 0.5 * curves.shape[1]
    assert 0.05 < (curves > 0).mean() < 0.3


def test_anti_aliased(curves):
    mid = (curves > 0) & (curves < 1)
    # Most inked pixels take intermediate values, and every image has some.
    assert mid.sum() > 0.8 * (curves > 0).sum()
    assert np.all(mid.any(axis=1))
    # Values are spread over (0, 1) rather than piled at a few levels.
    hist, _ = np.histogram(curves[mid], bins=10, range=(0.0, 1.0))
    assert np.all(hist > 0.02 * mid.sum())


def test_strokes_are_thin_and_smooth(curves):
    imgs = curves.reshape(-1, 28, 28).astype(np.float64)
    # Neighbouring pixels differ by much less than the full range on average: strokes fade out
    # over about a pixel instead of jumping from 0 to 1.
    dx = np.abs(np.diff(imgs, axis=2))
    ink = (imgs[:, :, 1:] > 0) | (imgs[:, :, :-1] > 0)
    assert dx[ink].mean() < 0.4
    assert dx.max() < 1.0


def test_thickness_controls_ink():
    thin = make_curves(200, seed=6, thickness=1.0)
    thick = make_curves(200, seed=6, thickness=3.0)
    assert (thick > 0).sum() > 1.8 * (thin > 0).sum()
    assert thick.sum() > 2.0 * thin.sum()


def test_straight_stroke_profile():
    # A straight vertical line far from the ends: rows are equal, and the cross-section is the
    # Gaussian of full width at half maximum `thickness`, peak 1 (minus the background shrink).
    from curvlin.datasets import _render

    size, thickness = 28, 2.0
    sigma = thickness / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    pts = np.array([[[14.5, 2.0], [14.5, 14.0], [14.5, 26.0]]])
    img = _render(pts, size, sigma, 200, np.float64)[0]
    row = img[14]
    np.testing.assert_allclose(img[10:18], np.broadcast_to(row, (8, size)), atol=1e-6)
    assert row[14] == pytest.approx(1.0, abs=1e-3)
    assert row[13] == pytest.approx(row[15], abs=1e-9)
    centres = np.arange(size) + 0.5
    expected = np.exp(-0.5 * ((centres - 14.5) / sigma) ** 2)
    floor = 1.0 / 256.0
    expected = np.clip((expected - floor) / (1.0 - floor), 0.0, 1.0)
    np.testing.assert_allclose(row, expected, atol=1e-3)


def test_pca_spectrum(curves):
    # Thin curves are a curved six-parameter manifold: no handful of linear components explains
    # them (hence the deep autoencoder), yet far fewer than 784 directions carry almost all of
    # the variance.
    x = curves.astype(np.float64)
    x -= x.mean(axis=0)
    s2 = np.linalg.svd(x, compute_uv=False) ** 2
    explained = np.cumsum(s2) / s2.sum()
    assert explained[1] < 0.2  # top 2
    assert explained[5] < 0.35  # a rank-6 PCA
    assert explained[49] > 0.55  # top 50
    assert explained[99] > 0.75  # top 100
    assert explained[199] > 0.9  # top 200 of 784
    # Far more concentrated than isotropic data of the same size: white noise needs over 500
    # components for 90% of its variance, the curves under 200.
    white = np.random.default_rng(0).standard_normal(x.shape)
    w2 = np.linalg.svd(white - white.mean(axis=0), compute_uv=False) ** 2
    white_explained = np.cumsum(w2) / w2.sum()
    assert np.searchsorted(white_explained, 0.9) > 500
    assert np.searchsorted(explained, 0.9) < 200


def test_load_curves():
    data = load_curves(n_train=300, n_test=40)
    assert isinstance(data, CurvesDataset)
    train, test = data
    assert train.shape == (300, 784)
    assert test.shape == (40, 784)
    assert train.dtype == test.dtype == np.float32
    again = load_curves(n_train=300, n_test=40)
    assert np.array_equal(train, again.train)
    assert np.array_equal(test, again.test)
    # Each set is independent of the other's size, and the two sets do not overlap.
    assert np.array_equal(load_curves(n_train=10, n_test=40).test, test)
    assert np.array_equal(load_curves(n_train=300, n_test=0).train, train)
    assert not np.any((train[:, None, :] == test[None, :, :]).all(axis=-1))
    other = load_curves(n_train=300, n_test=40, seed=1)
    assert not np.array_equal(other.train, train)


def test_load_curves_passes_options():
    data = load_curves(n_train=3, n_test=2, image_size=12, dtype=np.float64, thickness=2.0)
    assert data.train.shape == (3, 144)
    assert data.test.shape == (2, 144)
    assert data.train.dtype == np.float64


def test_load_curves_defaults():
    data = load_curves(n_train=0, n_test=0)
    assert data.train.shape == (0, 784)
    assert data.test.shape == (0, 784)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"n": -1}, ValueError, r"n must be >= 0, got -1"),
        ({"n": 2.0}, TypeError, r"n must be an int, got 2\.0"),
        ({"n": True}, TypeError, r"n must be an int, got True"),
        ({"n": "3"}, TypeError, r"n must be an int"),
        ({"image_size": 3}, ValueError, r"image_size must be >= 4, got 3"),
        ({"image_size": 28.0}, TypeError, r"image_size must be an int, got 28\.0"),
        ({"thickness": 0.0}, ValueError, r"thickness must be finite and > 0, got 0\.0"),
        ({"thickness": -1}, ValueError, r"thickness must be finite and > 0, got -1"),
        ({"thickness": float("nan")}, ValueError, r"thickness must be finite and > 0, got nan"),
        ({"thickness": float("inf")}, ValueError, r"thickness must be finite and > 0, got inf"),
        ({"thickness": "1"}, TypeError, r"thickness must be a real number, got '1'"),
        ({"thickness": None}, TypeError, r"thickness must be a real number, got None"),
        ({"dtype": np.int32}, TypeError, r"dtype must be a real floating dtype"),
        ({"dtype": np.complex64}, TypeError, r"dtype must be a real floating dtype"),
        ({"dtype": "not a dtype"}, TypeError, r"dtype must be a real floating dtype"),
        ({"seed": -5}, ValueError, r"seed must be >= 0, got -5"),
        ({"seed": 1.5}, TypeError, r"seed must be None, an int, a SeedSequence or a Generator"),
        ({"seed": "0"}, TypeError, r"seed must be None, an int"),
    ],
)
def test_make_curves_argument_errors(kwargs, exc, match):
    kwargs = {"n": 2, **kwargs}
    n = kwargs.pop("n")
    with pytest.raises(exc, match=r"make_curves: " + match):
        make_curves(n, **kwargs)


def test_n_is_positional_only():
    with pytest.raises(TypeError):
        make_curves(n=3)


def test_numpy_integers_accepted():
    x = make_curves(np.int64(3), image_size=np.int32(8), seed=np.uint8(1), thickness=np.float32(2))
    assert x.shape == (3, 64)
    assert np.array_equal(x, make_curves(3, image_size=8, seed=1, thickness=2.0))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"n_train": -1}, ValueError, r"load_curves: n_train must be >= 0, got -1"),
        ({"n_test": 1.0}, TypeError, r"load_curves: n_test must be an int, got 1\.0"),
        ({"seed": -1}, ValueError, r"load_curves: seed must be >= 0, got -1"),
        ({"seed": None}, TypeError, r"load_curves: seed must be an int or a SeedSequence"),
        ({"thickness": 0}, ValueError, r"thickness must be finite and > 0, got 0"),
    ],
)
def test_load_curves_argument_errors(kwargs, exc, match):
    kwargs = {"n_train": 2, "n_test": 2, **kwargs}
    with pytest.raises(exc, match=match):
        load_curves(**kwargs)


def test_import_does_not_import_torch_or_cupy():
    code = (
        "import sys, curvlin.datasets; "
        "bad = [m for m in ('torch', 'cupy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
