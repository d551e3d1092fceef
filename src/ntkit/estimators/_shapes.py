"""The estimators' ``input_shape``: flat rows (scikit-learn's ``(N, n_features)``) reshaped
to examples of a given shape (images for convolutional networks) before the kernel."""

from __future__ import annotations

import math
from typing import Any


def check_input_shape(input_shape: Any, n_features: int | None) -> tuple[int, ...] | None:
    """``input_shape`` as a tuple of positive ints (or ``None``), checked against the number
    of features of the flat ``X`` (``None``: not known yet)."""
    if input_shape is None:
        return None
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if (not shape or any(isinstance(s, bool) or not isinstance(s, int) and not
                         hasattr(s, "__index__") for s in shape)
            or any(int(s) < 1 for s in shape)):
        raise ValueError("input_shape must be None or a tuple of positive integers, the shape "
                         f"of one example such as (C, H, W); got {input_shape!r}.")
    shape = tuple(int(s) for s in shape)
    if n_features is not None and math.prod(shape) != n_features:
        raise ValueError(
            f"input_shape={shape} holds {math.prod(shape)} values per example, but X has "
            f"{n_features} features (columns). X must be flat, shape (N, "
            f"{' * '.join(map(str, shape))}) = (N, {math.prod(shape)}): each row is "
            "reshaped to input_shape before the kernel.")
    return shape
