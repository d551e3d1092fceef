"""Training dynamics: linearized networks and real training with NTK tracking (JGH §I.3).

The closed-form predictions (kernel gradient flow/descent, infinite ensembles, GP inference)
live in :mod:`ntkit.predict`; their names are re-exported here for compatibility, and
``ntkit.dynamics.predict`` is the package :mod:`ntkit.predict` itself.
"""

from .. import predict
from ..predict import (EnsemblePrediction, EnsemblePredictor, FlowCoefficients, FlowPredictor,
                       GPPosterior, MSEPredictor, Prediction, ensemble, gp_inference,
                       gradient_descent_mse, gradient_flow, max_learning_rate)
from .linearize import LinearizedModule, linearize
from .train import TrainHistory, train

__all__ = ["EnsemblePrediction", "EnsemblePredictor", "FlowCoefficients", "FlowPredictor",
           "GPPosterior", "LinearizedModule", "MSEPredictor", "Prediction", "TrainHistory",
           "ensemble",
           "gp_inference", "gradient_descent_mse", "gradient_flow", "linearize",
           "max_learning_rate", "predict", "train"]
