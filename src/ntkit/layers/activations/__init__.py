"""Elementwise activations: each owns its forward map, derivative and Gaussian dual.

One module per concept:

* :mod:`.protocol`: the :class:`Activation` protocol (``fn``, ``derivative``, ``dual``,
  ``variance``; the kernel map shared by all) and the correlation helper;
* :mod:`.relu`: the ReLU family (ABReLU, ReLU, LeakyReLU, Abs), arc-cosine duals;
* :mod:`.closed_form`: smooth closed-form duals (Erf, GELU, Sin, Cos);
* :mod:`.quadrature`: the quadrature engine (rules, panels, error estimate);
* :mod:`.elementwise`: duals by quadrature (Elementwise, Tanh, Sigmoid, Softplus, SiLU);
* :mod:`.identity`: Identity;
* :mod:`.names`: :func:`activation_from_name` (names, torch functions and modules).

Every activation is a frozen dataclass (equality, hashing and ``repr`` over its
parameters).
"""

from .closed_form import GELU, Cos, Erf, Sin
from .elementwise import Elementwise, Sigmoid, SiLU, Softplus, Tanh
from .identity import Identity
from .names import activation_from_name
from .protocol import Activation, ActivationModule
from .relu import ABReLU, Abs, LeakyReLU, ReLU

__all__ = [
    "ABReLU", "Abs", "Activation", "ActivationModule", "Cos", "Elementwise", "Erf", "GELU",
    "Identity", "LeakyReLU", "ReLU", "SiLU", "Sigmoid", "Sin", "Softplus", "Tanh",
    "activation_from_name",
]
