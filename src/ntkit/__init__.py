"""ntkit: Neural Tangent Kernels in PyTorch.

Declare an architecture once and get its finite-width ``torch.nn.Module``
(``net.module``), its analytic infinite-width NNGP and NTK (``net.kernel``) and, for any
module, its empirical NTK.

>>> import torch, ntkit as nk
>>> x = torch.randn(5, 2, dtype=torch.float64)
>>> net = nk.mlp(depth=4, width=512)          # JGH's network
>>> k = net.kernel(x)                          # k.nngp, k.ntk: (N, N) float64
>>> k.ntk.shape
torch.Size([5, 5])

Convolutional networks take ``(N, C, H, W)`` images:

>>> cnn = nk.cnn(depth=3, channels=64, pool="gap")
>>> cnn.kernel(torch.rand(4, 1, 8, 8, dtype=torch.float64)).ntk.shape
torch.Size([4, 4])
"""

from .kernels import Kernels
from .kernels import (MemoryBudgetError, MonteCarloKernels, NTKParts, empirical_nngp,
                      empirical_ntk, monte_carlo_kernel)
from .layers import (ABReLU, Abs, AvgPool, Conv, Cos, Dense, Elementwise, Erf, FanInSum, FanOut,
                     Flatten, GELU, GlobalAvgPool, Identity, Layer, LayerNorm, LeakyReLU, ReLU,
                     SiLU, Sigmoid, Sin, Softplus, Tanh, cnn, mlp, myrtle, parallel, serial)
from . import datasets, spectral
from . import predict  # nk.predict.gradient_descent_mse, .ensemble, .gp_inference, ...
from .dynamics import LinearizedModule, TrainHistory, linearize, train

# Kernel machines: scikit-learn estimators, and kernels past memory (ntkit.scale).
from . import scale
from .estimators import NNGPRegressor, NTKClassifier, NTKRegressor

__version__ = "0.1.0"

__all__ = [
    # layers and architectures
    "ABReLU", "Abs", "Cos", "Dense", "Elementwise", "Erf", "FanInSum", "FanOut", "GELU",
    "Identity", "Layer", "LayerNorm", "LeakyReLU", "ReLU", "SiLU", "Sigmoid", "Sin",
    "Softplus", "Tanh", "mlp", "parallel", "serial",
    # convolutional networks
    "AvgPool", "Conv", "Flatten", "GlobalAvgPool", "cnn", "myrtle",
    # kernels
    "Kernels", "MemoryBudgetError", "MonteCarloKernels", "NTKParts", "empirical_nngp",
    "empirical_ntk", "monte_carlo_kernel",
    # dynamics
    "LinearizedModule", "TrainHistory", "linearize", "predict", "train",
    # kernel machines and the rest
    "NNGPRegressor", "NTKClassifier", "NTKRegressor", "datasets", "scale", "spectral",
]
