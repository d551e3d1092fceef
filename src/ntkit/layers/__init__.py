"""Architecture declarations: each layer owns its forward map and its kernel map.

base (the Layer protocol), state (the PairKernel kernel state), dense, conv (convolutions,
pooling, Flatten; the numerical primitives in _conv_ops), combinators,
activations/ (one module per concept), evaluate (the analytic tile evaluator).
"""

from .activations import (ABReLU, Abs, Activation, ActivationModule, Cos, Elementwise, Erf, GELU,
                          Identity, LeakyReLU, ReLU, SiLU, Sigmoid, Sin, Softplus, Tanh,
                          activation_from_name)
from .base import Layer
from .conv import (AvgPool, AvgPool1dModule, AvgPool2dModule, Conv, Conv1dModule, Conv2dModule,
                   Flatten, GlobalAvgPool, GlobalAvgPoolModule, cnn, myrtle)
from .combinators import (FanInSum, FanOut, LayerNorm, Parallel, Serial, mlp, parallel,
                          serial)
from .dense import Dense, DenseModule
from .state import KernelState, PairKernel

__all__ = [
    "ABReLU", "Abs", "Activation", "ActivationModule", "AvgPool", "AvgPool1dModule",
    "AvgPool2dModule", "Conv", "Conv1dModule", "Conv2dModule", "Cos", "Dense", "DenseModule",
    "Flatten", "GlobalAvgPool", "GlobalAvgPoolModule", "cnn", "myrtle",
    "Elementwise", "Erf", "FanInSum", "FanOut", "GELU", "Identity", "KernelState", "Layer",
    "LayerNorm", "LeakyReLU", "PairKernel", "Parallel", "ReLU", "Serial", "SiLU", "Sigmoid",
    "Sin", "Softplus", "Tanh", "activation_from_name", "mlp", "parallel", "serial",
]
