"""Kernels: analytic infinite-width, empirical finite-width, Monte Carlo."""

from .analytic import Kernels, analytic_kernel

__all__ = ["Kernels", "analytic_kernel"]
