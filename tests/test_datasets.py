"""The bundled MNIST test set and the IDX reader."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from ntkit.datasets import ChecksumError, circle_points, jgh_regression_data, load_mnist, read_idx
from ntkit.datasets.mnist import _bundled


def test_bundled_test_set_loads_with_known_statistics():
    mnist = load_mnist()
    assert mnist.images.shape == (10000, 784) and mnist.images.dtype == np.float64
    assert mnist.images.min() == 0.0 and mnist.images.max() == 1.0
    assert mnist.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the published order
    assert np.bincount(mnist.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                  974, 1009]


def _copy_test_set(tmp_path):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(_bundled(f"{stem}.gz"), tmp_path / f"{stem}.gz")


def test_user_directory_and_uncompressed_files(tmp_path):
    _copy_test_set(tmp_path)
    a = load_mnist(path=tmp_path)
    # the same data uncompressed (no known checksum for raw files, still parsed)
    raw = tmp_path / "raw"
    raw.mkdir()
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / stem).write_bytes(gzip.decompress((tmp_path / f"{stem}.gz").read_bytes()))
    b = load_mnist(path=raw)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_corrupted_file_names_it(tmp_path):
    _copy_test_set(tmp_path)
    target = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[5000] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist(path=tmp_path)


def test_missing_files_and_train_split_need_a_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist("train", path=tmp_path)
    with pytest.raises(ValueError, match="path="):
        load_mnist("train")


def test_read_idx_roundtrip_and_truncation(tmp_path):
    values = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    header = bytes([0, 0, 0x0C, 3]) + b"".join(int(s).to_bytes(4, "big") for s in values.shape)
    path = tmp_path / "x.idx"
    path.write_bytes(header + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), values)
    path.write_bytes(header + values.tobytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_circle_data():
    x, y, _angles = jgh_regression_data()
    assert x.shape == (4, 2) and y.shape == (4, 1)
    np.testing.assert_allclose(x.norm(dim=1).numpy(), 1.0, rtol=1e-15)
    np.testing.assert_allclose(circle_points([0.0]).numpy(), [[1.0, 0.0]])


def test_bundled_digits_match_the_reference_kernels_inputs():
    """neural-tangents' depth-5 MNIST case stored its 24 input digits (pixels / 255) with
    their test-set indices: the bundled reader must return the same rows."""
    import json
    from pathlib import Path

    ref_dir = Path(__file__).parent / "reference" / "nt"
    case = next(c for c in json.loads((ref_dir / "cases.json").read_text())
                if c.get("file") == "jgh_relu_depth5_mnist.npz")
    ref = np.load(ref_dir / "jgh_relu_depth5_mnist.npz")
    mnist = load_mnist()
    np.testing.assert_allclose(mnist.images[case["mnist_index"]], ref["x1"], rtol=0,
                               atol=1e-7)
