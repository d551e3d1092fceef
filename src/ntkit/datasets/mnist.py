"""MNIST in IDX format: the bundled test set, and any full MNIST files a user points at.

The test set (10,000 digits, 1.6 MB) ships inside ntkit so that the reproduction runs
offline. Its files are verified against SHA-256 checksums before use; a corrupted or
truncated file raises an error naming it. The reader is general: ``read_idx`` parses any IDX
file (gzip or not), and ``load_mnist(path=...)`` reads the training set too.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

# SHA-256 of the gzip files as distributed (the bundled copies are these bytes).
CHECKSUMS = {
    "t10k-images-idx3-ubyte.gz":
        "fa1df4cb74e6e16586f395ed87c5759f799135c5fd1515996bc02340fba92f5f",
    "t10k-labels-idx1-ubyte.gz":
        "604e4e0dcbdf2b978afd53c607ab784f8c99e680fd61d7983bc70839ed6528bb",
}
_FILES = {
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
}
# IDX type codes -> numpy dtypes (big-endian on disk)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class ChecksumError(ValueError):
    """A data file does not have the expected SHA-256 digest."""


@dataclass(frozen=True)
class MNIST:
    """``images``: ``(N, 784)`` float64 pixels / 255 in [0, 1]; ``labels``: ``(N,)`` int64."""

    images: np.ndarray
    labels: np.ndarray


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: str | Path, expected: str) -> None:
    """Raise :class:`ChecksumError` naming ``path`` unless its SHA-256 is ``expected``."""
    actual = sha256(path)
    if actual != expected:
        raise ChecksumError(f"Checksum mismatch for {path}: SHA-256 is {actual}, expected "
                            f"{expected}. The file is corrupted or not the MNIST release; "
                            "reinstall ntkit or download the file again.")


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (``.gz`` or raw) into an array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:  # bad gzip stream, truncated file
        raise ValueError(f"Could not read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}).")
    dtype = np.dtype(_IDX_TYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path} is truncated or padded: header says shape {shape} "
                         f"({expected} bytes) but {len(data) - header} bytes follow.")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(
        dtype.newbyteorder("="))


def _bundled(name: str) -> Path:
    return Path(str(resources.files("ntkit.datasets") / "data" / name))


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"No {stem}[.gz] in {directory}; download MNIST's IDX files there.")


def load_mnist(split: str = "test", path: str | Path | None = None, *,
               verify: bool = True) -> MNIST:
    """Load MNIST as ``images / 255`` (float64, ``(N, 784)``) and integer labels.

    Args:
        split: ``"test"`` (10,000 digits, bundled) or ``"train"`` (60,000; needs ``path``).
        path: a directory holding the IDX files (``.gz`` or uncompressed); ``None`` uses the
            bundled test set.
        verify: check the SHA-256 of files whose digest is known (the test set).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'test' or 'train'; got {split!r}.")
    if path is None:
        if split != "test":
            raise ValueError("Only the MNIST test set is bundled; pass path= to a directory "
                             "holding train-images-idx3-ubyte[.gz] and "
                             "train-labels-idx1-ubyte[.gz].")
        files = [_bundled(f"{stem}.gz") for stem in _FILES[split]]
    else:
        files = [_find(Path(path), stem) for stem in _FILES[split]]
    if verify:
        for file in files:
            if file.name in CHECKSUMS:
                verify_checksum(file, CHECKSUMS[file.name])
    images, labels = (read_idx(f) for f in files)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Unexpected MNIST shapes: images {images.shape}, labels {labels.shape}.")
    return MNIST(images=images.reshape(images.shape[0], -1).astype(np.float64) / 255.0,
                 labels=labels.astype(np.int64))
