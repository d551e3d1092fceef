"""Training dynamics: closed-form kernel gradient flow/descent, infinite ensembles,
linearized networks, and real training with NTK tracking (JGH §I.3, §IV)."""

from . import predict
from .linearize import LinearizedModule, linearize
from .predict import (EnsemblePrediction, EnsemblePredictor, FlowCoefficients, FlowPredictor,
                      GPPosterior, MSEPredictor, Prediction, ensemble, gp_inference,
                      gradient_descent_mse, gradient_flow, max_learning_rate)
from .train import TrainHistory, train

__all__ = ["EnsemblePrediction", "EnsemblePredictor", "FlowCoefficients", "FlowPredictor",
           "GPPosterior", "LinearizedModule", "MSEPredictor", "Prediction", "TrainHistory",
           "ensemble",
           "gp_inference", "gradient_descent_mse", "gradient_flow", "linearize",
           "max_learning_rate", "predict", "train"]
