"""Architecture declarations: each layer owns its forward map and its kernel map."""

from .activations import (ABReLU, Abs, Activation, ActivationModule, Cos, Elementwise, Erf, GELU,
                          Identity, LeakyReLU, ReLU, SiLU, Sigmoid, Sin, Softplus, Tanh,
                          activation_from_name)
from .base import Layer, PairKernel
from .combinators import (FanInSum, FanOut, LayerNorm, Parallel, Serial, mlp, parallel,
                          serial)
from .dense import Dense, DenseModule

__all__ = [
    "ABReLU", "Abs", "Activation", "ActivationModule", "Cos", "Dense", "DenseModule",
    "Elementwise", "Erf", "FanInSum", "FanOut", "GELU", "Identity", "Layer", "LayerNorm",
    "LeakyReLU", "PairKernel", "Parallel", "ReLU", "Serial", "SiLU", "Sigmoid", "Sin",
    "Softplus", "Tanh", "activation_from_name", "mlp", "parallel", "serial",
]
