"""What a method of the empirical NTK is, as ``empirical_ntk``'s dispatch table sees it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .blocks import Request
from .setup import _Setup

Compute = Callable[[_Setup, Request], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Method:
    """One way to evaluate the empirical NTK.

    ``compute(setup, request)`` returns ``(total, parts)``: the ``(N1, N2, *tail)`` kernel in
    the setup's computation dtype, and each selected parameter tensor's contribution when
    ``request.per_param`` (``{}`` otherwise; a parameter that never reaches the output may
    be missing). It plans its blocks within ``request.budget``.

    ``unsupported(setup)`` is ``None`` for a method that handles any model; otherwise it
    returns ``None`` when the model qualifies and else says which module prevents it, and
    ``requirement`` (a phrase after "needs") is what a qualifying model looks like. Such a
    specialised method is exact and cheaper than the general ones wherever it applies, so
    ``"auto"`` takes the first one that applies, in table order.

    ``cost(setup, output, per_param)`` estimates a general method's FLOPs (see
    ``auto.py``); ``"auto"`` takes the cheapest general method.
    """

    compute: Compute
    unsupported: Callable[[_Setup], str | None] | None = None
    requirement: str = ""
    cost: Callable[[_Setup, str, bool], float] | None = None
