"""Spectra of kernels: eigenpairs of Π = K/N, Nyström eigenfunctions, projections,
positive-definiteness diagnostics and Hermite coefficients (JGH §III.3, §IV.2)."""

from .eigen import ConvergenceWarning, Eigen, condition_number, eigen, min_eigenvalue
from .functions import Eigenfunctions, eigenfunctions, project
from .hermite import HermiteReport, hermite_coefficients

__all__ = ["ConvergenceWarning", "Eigen", "Eigenfunctions", "HermiteReport", "condition_number",
           "eigen", "eigenfunctions", "hermite_coefficients", "min_eigenvalue", "project"]
