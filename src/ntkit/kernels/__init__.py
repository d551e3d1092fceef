"""Kernels: analytic infinite-width, empirical finite-width, Monte Carlo."""

from .analytic import Kernels, analytic_kernel
from .empirical import MemoryBudgetError, NTKParts, empirical_nngp, empirical_ntk
from .monte_carlo import MonteCarloKernels, monte_carlo_kernel

__all__ = ["Kernels", "MemoryBudgetError", "MonteCarloKernels", "NTKParts", "analytic_kernel",
           "empirical_nngp", "empirical_ntk", "monte_carlo_kernel"]
