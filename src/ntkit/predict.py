"""``nk.predict``: closed-form and ODE predictions of kernel training dynamics.

A namespace module: ``nk.predict.gradient_descent_mse``, ``nk.predict.ensemble``,
``nk.predict.gp_inference``, ``nk.predict.gradient_flow``, ``nk.predict.max_learning_rate``.
The implementation lives in :mod:`ntkit.dynamics.predict`.
"""

from .dynamics.predict import (COSTS, EnsemblePrediction, EnsemblePredictor, FlowCoefficients,
                               FlowPredictor, GPPosterior, MSEPredictor, Prediction, ensemble,
                               gp_inference, gradient_descent_mse, gradient_flow,
                               max_learning_rate)

__all__ = ["COSTS", "EnsemblePrediction", "EnsemblePredictor", "FlowCoefficients",
           "FlowPredictor", "GPPosterior", "MSEPredictor", "Prediction", "ensemble",
           "gp_inference", "gradient_descent_mse", "gradient_flow", "max_learning_rate"]
