"""Resolving an activation given by name, ntkit layer, torch function or torch module."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..base import Layer
from .closed_form import GELU, Cos, Erf, Sin
from .elementwise import Elementwise, Sigmoid, SiLU, Softplus, Tanh
from .identity import Identity
from .protocol import Activation
from .relu import Abs, LeakyReLU, ReLU

_BY_NAME: dict[str, Callable[[], Layer]] = {
    "relu": ReLU, "abs": Abs, "erf": Erf, "gelu": GELU, "sin": Sin, "cos": Cos,
    "tanh": Tanh, "sigmoid": Sigmoid, "softplus": Softplus, "silu": SiLU, "swish": SiLU,
    "identity": Identity, "linear": Identity, "leaky_relu": LeakyReLU,
}


def _torch_functions() -> dict[Callable, Callable[[], Layer]]:
    """torch's spellings of the activations that have a named ntkit layer."""
    table: dict[Callable, Callable[[], Layer]] = {}
    pairs = [
        (("relu",), ReLU), (("erf",), Erf), (("tanh",), Tanh), (("sigmoid",), Sigmoid),
        (("sin",), Sin), (("cos",), Cos), (("abs", "absolute"), Abs),
    ]
    for names, layer in pairs:
        for name in names:
            for space in (torch, torch.special, F):
                fn = getattr(space, name, None)
                if fn is not None:
                    table[fn] = layer
    table[torch.special.expit] = Sigmoid
    table[torch.relu_] = ReLU
    table[F.silu] = SiLU
    return table


def _from_module(m: torch.nn.Module) -> Layer | None:
    """The ntkit layer for a parameter-free torch activation module, if there is one."""
    nn = torch.nn
    simple = {nn.ReLU: ReLU, nn.Tanh: Tanh, nn.Sigmoid: Sigmoid, nn.SiLU: SiLU,
              nn.Identity: Identity}
    if type(m) in simple:
        return simple[type(m)]()
    if type(m) is nn.GELU:
        return GELU() if m.approximate == "none" else None
    if type(m) is nn.LeakyReLU:
        return LeakyReLU(float(m.negative_slope))
    if type(m) is nn.Softplus:
        # torch's module returns x above `threshold`/beta (a jump of ~2e-9 at 20); the ntkit
        # layer is the exact log(1 + e^x), which the kernel integrates.
        return Softplus() if m.beta == 1 else None
    return None


def activation_from_name(activation: str | Layer | Callable) -> Layer:
    """Resolve an activation given by name, ntkit layer, torch function or torch module.

    * ``"relu"``-style names (see ``_BY_NAME``) and ntkit layers;
    * torch spellings of activations with a closed-form or named layer map to it, so the
      kernel uses the closed form: ``torch.relu``, ``F.relu``, ``nn.ReLU()``, ``torch.erf``,
      ``torch.special.erf``, ``torch.tanh``, ``nn.Tanh()``, ``torch.sigmoid``,
      ``nn.Sigmoid()``, ``torch.sin``, ``torch.cos``, ``torch.abs``, ``F.gelu`` and
      ``nn.GELU()`` (exact GELU; ``approximate='tanh'`` stays an ``Elementwise``),
      ``F.silu``/``nn.SiLU()``, ``nn.Softplus()`` (beta 1), ``nn.LeakyReLU(a)`` (slope a),
      ``F.leaky_relu`` (its default slope 0.01), ``nn.Identity()``;
    * any other callable becomes ``Elementwise(fn)`` (dual by quadrature).

    A class (``torch.nn.ReLU``) instead of an instance is refused with a ValueError.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        if activation.lower() in _BY_NAME:
            return _BY_NAME[activation.lower()]()
        raise ValueError(f"Unknown activation {activation!r}; use one of {sorted(_BY_NAME)}, "
                         "an ntkit activation such as nk.LeakyReLU(0.2), or a torch function.")
    if isinstance(activation, type):
        raise ValueError(
            f"activation is the class {activation.__module__}.{activation.__qualname__}; pass an "
            f"instance, {activation.__qualname__}(), or a name such as 'relu', or an ntkit "
            "layer such as nk.ReLU().")
    if isinstance(activation, torch.nn.Module):
        layer = _from_module(activation)
        if layer is not None:
            return layer
        if any(True for _ in activation.parameters()):
            raise ValueError(f"activation {activation!r} has parameters; the analytic kernel "
                             "needs a fixed elementwise function.")
        return Elementwise(activation)
    if callable(activation) and not isinstance(activation, Layer):
        try:
            layer = _torch_functions().get(activation)
        except TypeError:  # an unhashable callable
            layer = None
        if layer is not None:
            return layer()
        if activation is F.gelu:
            return GELU()
        if activation is F.softplus:
            return Softplus()
        if activation is F.leaky_relu:
            return LeakyReLU(0.01)
        return Elementwise(activation)
    raise ValueError(f"Unknown activation {activation!r}; use one of {sorted(_BY_NAME)}, an "
                     "ntkit activation such as nk.LeakyReLU(0.2), or a torch function.")
