"""Data: the bundled MNIST test set (IDX reader with checksums) and JGH's circle data."""

from .circle import circle_points, jgh_regression_data
from .mnist import MNIST, ChecksumError, load_mnist, read_idx, verify_checksum

__all__ = ["MNIST", "ChecksumError", "circle_points", "jgh_regression_data", "load_mnist",
           "read_idx", "verify_checksum"]
