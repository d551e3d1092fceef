"""Linearized networks: the first-order Taylor expansion of a model around its parameters."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, jvp

__all__ = ["LinearizedModule", "linearize"]


def _buffer_name(param_name: str) -> str:
    # register_buffer rejects dots; "__" keeps the mapping readable and reversible.
    return "theta0__" + param_name.replace(".", "__")


class LinearizedModule(nn.Module):
    """``g_θ(x) = f_θ0(x) + J_θ0(x) (θ − θ0)`` (JGH Def. IV.1.3).

    ``self.model`` is a private copy of the original module whose parameters are the
    trainable θ (so ``named_parameters()`` mirrors the original's names, prefixed by
    ``model.``); θ0 is kept as buffers. The Jacobian-vector product is computed in forward
    mode by ``torch.func.jvp``, one pass per call and never a materialised Jacobian; its
    result is differentiable in θ by ordinary autograd, so any torch optimizer trains it.
    Buffers of the original (e.g. BatchNorm statistics) are frozen at their θ0 values.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError("model has no trainable parameters (requires_grad=True) to "
                             "linearize around.")
        self.model = copy.deepcopy(model)
        self._names = names
        for name, p in self.model.named_parameters():
            self.register_buffer(_buffer_name(name), p.detach().clone())

    def theta0(self) -> dict[str, torch.Tensor]:
        """The expansion point θ0, by parameter name (as in the original model)."""
        return {name: getattr(self, _buffer_name(name)) for name in self._names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        theta0 = self.theta0()
        # Parameters the user froze stay at θ0 and carry no tangent.
        frozen = {name: getattr(self, _buffer_name(name)) for name in params
                  if name not in theta0}
        buffers = dict(self.model.named_buffers())
        tangents = {name: params[name] - theta0[name] for name in self._names}

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.model, {**p, **frozen, **buffers}, (x,))

        out, delta = jvp(f, (theta0,), (tangents,))
        return out + delta

    def extra_repr(self) -> str:
        return f"linearized around {len(self._names)} parameter tensors"


def linearize(model: nn.Module) -> LinearizedModule:
    """Return the linearization of ``model`` around its current parameters θ0.

    Args:
        model: any ``nn.Module``; it is copied, the original is left untouched.
    Returns:
        :class:`LinearizedModule` ``g`` with ``g(x) = f_θ0(x) + J_θ0(x)(θ − θ0)``, equal to
        ``model(x)`` at θ = θ0 and exactly linear in θ. Its NTK is the empirical NTK of
        ``model`` at θ0, constant during training, so gradient descent on it follows the
        closed forms of :func:`ntkit.predict.gradient_descent_mse` exactly.
    """
    return LinearizedModule(model)
