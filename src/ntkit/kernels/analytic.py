"""Analytic infinite-width NNGP and NTK kernels (``net.kernel``).

The evaluator lives in :mod:`ntkit.layers.evaluate`, beside the layers whose kernel maps it
folds over tiles, so that ``layers/`` needs nothing from ``kernels/``; this module is its
public home under ``ntkit.kernels``.
"""

from ..layers.evaluate import KERNEL_NAMES, Kernels, analytic_kernel, normalize_get

__all__ = ["KERNEL_NAMES", "Kernels", "analytic_kernel", "normalize_get"]
