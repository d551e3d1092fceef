"""``empirical_ntk``: validate once, pick a method from the table, check the result."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..._validation import Tensorish, check_choice, check_positive_int
from .auto import choose
from .blocks import Request, _budget
from .jacobian import JACOBIAN, NTK_VP
from .method import Method
from .setup import (
    _RANDOM_MESSAGE,
    _check_kernel_finite,
    _preserving_parameters,
    _Setup,
    _setup,
)
from .structured import STRUCTURED

# The dispatch table. A new method is a module defining a ``Method`` and one entry here; the
# order is the order in which ``"auto"`` tries specialised methods and breaks cost ties.
METHOD_TABLE: dict[str, Method] = {
    "structured": STRUCTURED,
    "jacobian": JACOBIAN,
    "ntk_vp": NTK_VP,
}
METHODS = ("auto", *METHOD_TABLE)
OUTPUTS = ("trace", "full", "diagonal")


@dataclass
class NTKParts:
    """The empirical NTK with its split over parameters (``per_param=True``).

    ``total`` has the shape set by ``output``; ``parts[name]`` is the contribution of the
    named parameter tensor (same shape), and ``sum(parts.values()) == total`` up to rounding.
    Unpacks as ``total, parts = nk.empirical_ntk(..., per_param=True)``.
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    method: str = ""

    def __iter__(self) -> Iterator[Any]:
        yield self.total
        yield self.parts


def _method_for(name: str, setup: _Setup, output: str, per_param: bool) -> str:
    """Resolve ``"auto"``; refuse a specialised method named for a model it cannot do."""
    if name == "auto":
        return choose(METHOD_TABLE, setup, output, per_param)
    method = METHOD_TABLE[name]
    reason = None if method.unsupported is None else method.unsupported(setup)
    if reason is not None:
        general = " or ".join(repr(n) for n, m in METHOD_TABLE.items() if m.unsupported is None)
        raise ValueError(f"method={name!r} needs {method.requirement}, but {reason}; use "
                         f"method={general} (or 'auto').")
    return name


def empirical_ntk(model: nn.Module, x1: Tensorish, x2: Tensorish | None = None, *,
                  method: str = "auto", output: str = "trace", params: Any = None,
                  per_param: bool = False, batch_size: int | None = None,
                  memory_budget: int | None = None) -> torch.Tensor | NTKParts:
    """The empirical NTK ``Θ(x, x') = Σ_p ∂_p f(x) ⊗ ∂_p f(x')`` of any module.

    Args:
        model: any ``torch.nn.Module`` mapping ``(N, *in)`` to ``(N, *out)``; its outputs are
            flattened to ``O = prod(out)`` per example. Buffers (BatchNorm running
            statistics, ...) are used as they are; BatchNorm and Dropout must be in eval
            mode, because the NTK is defined per example.
        x1: ``(N1, *in)`` inputs (tensor or array). The result lives on ``x1``'s device and
            has ``x1``'s floating dtype.
        x2: ``(N2, *in)`` inputs, or ``None`` for ``x2 = x1`` (only blocks on and above the
            diagonal are computed, and mirrored).
        method: ``"structured"`` (nn.Sequential whose differentiated parameters are in
            Linear/ntkit Dense, Conv1d/Conv2d/ntkit Conv or eval BatchNorm layers, all
            other modules parameter-free; per-layer gradient structure, no whole-model
            Jacobian), ``"jacobian"`` (per-example Jacobians via
            ``torch.func.vmap(jacrev)``, contracted per parameter), ``"ntk_vp"`` (Jacobian
            rows of an x2 block pushed forward through the x1 block with ``jvp``), or
            ``"auto"`` (the methods are the entries of ``METHOD_TABLE``). Cost model of
            ``"auto"`` (``auto.py``), with F the forward FLOPs of one example
            (counted by ``torch.utils.flop_counter``), P the number of selected parameters
            and k = O² for ``"full"``, O otherwise:

            * ``jacobian`` ≈ 3 F O (N1 + N2) + 2 N1 N2 P k;
            * ``ntk_vp`` ≈ 3 F O N2 + 3 F O N1 N2 (× the number of parameter tensors
              when ``per_param``);
            * ``structured`` (where the model qualifies) ≈ 3 F O (N1 + N2) + 2 N1 N2
              (Σ_dense (n_in + k n_out) + k P_conv): the same sweep as the Jacobian rows,
              but a Dense layer costs n_in + k n_out per pair instead of k n_in n_out;

            the smallest estimate wins. Weight sharing (convolutions) makes F ≫ P and
            disfavours ``ntk_vp``; a Dense readout of many features (Flatten) favours
            ``structured``; on convolution-only stacks it and ``jacobian`` do the same
            work.
        output: ``"trace"`` -> ``(N1, N2)``, the mean over outputs of Θ_{oo} (comparable with
            the infinite-width per-output kernel); ``"diagonal"`` -> ``(N1, N2, O)``;
            ``"full"`` -> ``(N1, N2, O, O)``.
        params: ``None`` (all trainable parameters), or names (as in
            ``model.named_parameters()``) or parameter tensors to restrict the sum to.
        per_param: also return each parameter tensor's contribution (see :class:`NTKParts`).
        batch_size: the most example rows per block (default: as many as the budget
            allows). Any value gives the same result up to rounding.
        memory_budget: bytes this call may allocate, result included (default: half of
            the memory available on the inputs' device). Blocks are sized to fit; if even a
            one-row block does not fit, :class:`MemoryBudgetError` (a ``ValueError``) says
            how much is needed.
    Returns:
        The kernel tensor, or :class:`NTKParts` ``(total, parts)`` when ``per_param``. With
        ``x2=None`` it is exactly symmetric (``K[i, j] == K[j, i]`` bit for bit; for
        ``"full"``, ``K[i, j, o, q] == K[j, i, q, o]``): the lower triangle is a copy.
    Raises:
        ValueError: for a model whose forward pass draws random numbers (train-mode
            dropout, functional or not: call ``model.eval()``), a model whose output for an
            example depends on the other examples in the batch (checked by evaluating up
            to 16 rows together and two alone; the NTK is defined per example), and a
            kernel that overflows (naming the rows).
    """
    check_choice(method, "method", METHODS)
    check_choice(output, "output", OUTPUTS)
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
    setup = _setup(model, x1, x2, params)
    budget = _budget(memory_budget, setup.x1.device)
    method = _method_for(method, setup, output, per_param)
    try:
        with _preserving_parameters(setup.model):
            total, parts = METHOD_TABLE[method].compute(
                setup, Request(output, bool(per_param), budget, batch_size))
    except RuntimeError as err:
        # Randomness from a private torch.Generator escapes the probe's global-RNG check;
        # vmap then refuses it with a message about vmap's flags, not about the model.
        if "randomness" not in str(err):
            raise
        raise ValueError(_RANDOM_MESSAGE) from err

    total = total.to(setup.out_dtype)
    _check_kernel_finite(total, setup.x1, setup.x2, "the empirical NTK")
    if not per_param:
        return total
    # Parameters that never reach the output have zero contribution.
    ordered = {k: parts[k].to(setup.out_dtype) if k in parts else torch.zeros_like(total)
               for k in setup.params}
    return NTKParts(total, ordered, method)
