"""Points on the unit circle, the inputs of JGH's figures 1 and 2."""

from __future__ import annotations

import math

import torch


def circle_points(angles, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(len(angles), 2)`` points ``(cos γ, sin γ)``."""
    gamma = torch.as_tensor(angles, dtype=dtype)
    return torch.stack([gamma.cos(), gamma.sin()], dim=1)


def jgh_regression_data(dtype: torch.dtype = torch.float64):
    """The four training points of JGH Fig. 2, read off the paper's figure (it gives none):
    angles −2.2, −1, 1, 2.2 with targets −0.4, −0.2, 0.3, 0.3. Returns ``(x, y, angles)``
    with ``x`` of shape (4, 2) and ``y`` of shape (4, 1)."""
    angles = torch.tensor([-2.2, -1.0, 1.0, 2.2], dtype=dtype)
    y = torch.tensor([[-0.4], [-0.2], [0.3], [0.3]], dtype=dtype)
    return circle_points(angles, dtype), y, angles


def angle_grid(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` angles evenly spaced on [−π, π]."""
    return torch.linspace(-math.pi, math.pi, n, dtype=dtype)
