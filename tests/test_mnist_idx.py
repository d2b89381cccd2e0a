"""The IDX reader and load_mnist on small files written by the test (no MNIST needed)."""

import gzip

import numpy as np
import pytest

from curvlin.datasets import MNIST_FILES, load_mnist, read_idx


def idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    header = bytes([0, 0, type_code, array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def write_mnist(directory, *, n_train=5, n_test=3, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for role, array in arrays.items():
        data = idx_bytes(array, 0x08)
        path = directory / (MNIST_FILES[role] + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize(
    ("dtype", "code"),
    [(np.uint8, 0x08), (np.int8, 0x09), (">i2", 0x0B), (">i4", 0x0C), (">f4", 0x0D), (">f8", 0x0E)],
)
def test_read_idx_every_type(tmp_path, dtype, code):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if np.dtype(dtype).kind == "u":
        array = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    path = tmp_path / "x-idx3"
    path.write_bytes(idx_bytes(array, code))
    got = read_idx(path)
    assert got.shape == (2, 3, 4)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_read_idx_gzipped(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    (tmp_path / "x.gz").write_bytes(gzip.compress(idx_bytes(array, 0x08)))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), array)


@pytest.mark.parametrize("cut", [3, 6, 9, 20])
def test_read_idx_truncated(tmp_path, cut):
    data = idx_bytes(np.zeros((2, 3), dtype=np.uint8), 0x08)  # 12-byte header + 6 bytes
    path = tmp_path / "short"
    path.write_bytes(data[: len(data) - cut] if cut < len(data) else data[:1])
    with pytest.raises(ValueError, match=r"short.*(truncated|not an IDX file)"):
        read_idx(path)


def test_read_idx_trailing_bytes_and_bad_magic(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8), 0x08) + b"\0")
    with pytest.raises(ValueError, match=r"long.*longer than its header says: 13 bytes"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04 a zip, not IDX")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(path)


def test_read_idx_missing_and_broken_gzip(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"cannot read .*bad\.gz"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    data = load_mnist(tmp_path)
    assert data.train.shape == (5, 784)
    assert data.test.shape == (3, 784)
    assert data.train.dtype == np.float32
    np.testing.assert_allclose(data.train * 255, arrays["train_images"].reshape(5, 784), atol=1e-4)
    np.testing.assert_array_equal(data.test_labels, arrays["test_labels"])
    assert data.train_labels.dtype == np.int64
    assert load_mnist(tmp_path, dtype=np.float64).test.dtype == np.float64


def test_load_mnist_missing_file_says_what_to_put_where(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(tmp_path)
    message = str(err.value)
    assert "no t10k-labels-idx1-ubyte (nor t10k-labels-idx1-ubyte.gz)" in message
    assert "does not download" in message
    for name in MNIST_FILES.values():
        assert name in message
    with pytest.raises(FileNotFoundError, match="no directory"):
        load_mnist(tmp_path / "nowhere")


def test_load_mnist_truncated_and_mismatched(tmp_path):
    write_mnist(tmp_path)
    images = tmp_path / MNIST_FILES["train_images"]
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte' is truncated"):
        load_mnist(tmp_path)
    write_mnist(tmp_path, n_train=4)
    (tmp_path / MNIST_FILES["train_labels"]).write_bytes(
        idx_bytes(np.zeros(5, dtype=np.uint8), 0x08)
    )
    with pytest.raises(ValueError, match=r"train images of shape \(4, 28, 28\) and labels"):
        load_mnist(tmp_path)
    with pytest.raises(TypeError, match="load_mnist: dtype must be a real floating dtype"):
        load_mnist(tmp_path, dtype=np.int32)
