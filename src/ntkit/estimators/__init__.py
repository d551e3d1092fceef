"""scikit-learn estimators for infinitely wide networks: :class:`NTKRegressor`,
:class:`NNGPRegressor` and :class:`NTKClassifier`."""

from .kernel_machines import NNGPRegressor, NTKClassifier, NTKRegressor

__all__ = ["NNGPRegressor", "NTKClassifier", "NTKRegressor"]
