"""scikit-learn estimators for infinitely wide networks: :class:`NTKRegressor`,
:class:`NNGPRegressor` and :class:`NTKClassifier`."""

from .classifier import NTKClassifier
from .kernel_machines import NNGPRegressor, NTKRegressor

__all__ = ["NNGPRegressor", "NTKClassifier", "NTKRegressor"]
