"""The ``structured`` method: no Jacobian, for Sequential stacks of Dense layers.

For ``nn.Sequential`` stacks of ``nn.Linear`` / ntkit ``DenseModule`` and elementwise
activations. Writing ``z_l = s_w W_l a_l + s_b b_l`` for Dense layer ``l`` (``a_l`` its
input, ``s_w``, ``s_b`` its weight and bias scales) and ``δ_l(x) ∈ R^{O×n_l}`` for the
backward signal ``∂f/∂z_l``, the gradients are ``∂f_o/∂W_l = s_w δ_{l,o} ⊗ a_l`` and
``∂f_o/∂b_l = s_b δ_{l,o}``, hence

    Θ(x, x')_{o o'} = Σ_l ⟨δ_{l,o}(x), δ_{l,o'}(x')⟩ · (s_w² ⟨a_l(x), a_l(x')⟩ + s_b²).

One forward and one backward sweep per example (the backward carries the O output signals at
once) plus two Gram matrices per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...layers.activations import ABReLU, ActivationModule
from ...layers.dense import DenseModule
from .blocks import Request, _plan_kernel, _run_blocks, _tail
from .gram import _gram, _matmul_t
from .method import Method
from .setup import _Setup

# Elementwise torch activations the structured path accepts (their derivative comes from
# autograd on the pre-activations, so any elementwise map is exact).
ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Tanhshrink, nn.LogSigmoid, nn.Identity, ActivationModule,
)
# nn.PReLU has a parameter, so it is not a plain activation for the structured path.
_PARAMETER_FREE_ACTS = tuple(t for t in ELEMENTWISE_MODULES if t is not nn.PReLU)


@dataclass
class _DenseStep:
    module: nn.Module
    weight: str | None   # parameter name if selected, else None
    bias: str | None
    w_scale: float
    b_scale: float


def _flatten_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            out.extend(_flatten_sequential(child, full + "."))
        else:
            out.append((full, child))
    return out


def structured_plan(model: nn.Module, params: Iterable[str] | None = None,
                    example_ndim: int = 2) -> tuple[list[tuple[str, Any]], str | None]:
    """Decompose ``model`` for the structured path.

    Returns ``(steps, reason)``: ``steps`` is a list of ``("dense", _DenseStep)``,
    ``("act", module)`` and ``("flatten", module)``; ``reason`` is ``None`` when the model
    qualifies and otherwise says which module prevents it. ``example_ndim`` is the number of
    dimensions of the input batch (the first Dense layer needs ``(B, features)``).
    """
    if type(model) is not nn.Sequential:
        return [], f"model is {type(model).__name__}, not an nn.Sequential"
    chosen = set(params) if params is not None else None
    steps: list[tuple[str, Any]] = []
    seen_dense = False
    for name, m in _flatten_sequential(model):
        if m._forward_hooks or m._forward_pre_hooks:
            return [], f"module {name!r} has forward hooks"
        if isinstance(m, (nn.Linear, DenseModule)) and not isinstance(m, nn.LazyLinear):
            if not seen_dense and example_ndim != 2:
                return [], (f"module {name!r} receives {example_ndim}-dimensional batches; "
                            "put nn.Flatten() before it")
            names = {k: f"{name}.{k}" for k in ("weight", "bias")}
            trainable = {k: (getattr(m, k, None) is not None and getattr(m, k).requires_grad
                             and (chosen is None or names[k] in chosen)) for k in names}
            if isinstance(m, DenseModule):
                ws, bs = m.weight_scale, m.bias_scale
            else:
                ws, bs = 1.0, 1.0
            steps.append(("dense", _DenseStep(m, names["weight"] if trainable["weight"] else None,
                                              names["bias"] if trainable["bias"] else None,
                                              ws, bs)))
            seen_dense = True
        elif isinstance(m, _PARAMETER_FREE_ACTS):
            steps.append(("act", m))
        elif isinstance(m, nn.Flatten) and not seen_dense and m.end_dim == -1 \
                and m.start_dim == 1:
            steps.append(("flatten", m))
            example_ndim = 2
        else:
            return [], (f"module {name!r} ({type(m).__name__}) is not a Linear/DenseModule or "
                        "an elementwise activation")
    if not any(kind == "dense" for kind, _ in steps):
        return [], "model has no Linear/DenseModule layer"
    return steps, None


def _activation_derivative(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Identity):
        return torch.ones_like(z)
    if isinstance(m, nn.ReLU):
        return (z > 0).to(z.dtype)
    if isinstance(m, ActivationModule):
        act = m.activation
        if isinstance(act, ABReLU):  # a + (b − a)·1[z > 0], without full-size constants
            step = (z > 0).to(z.dtype)
            return step.mul_(act.b - act.a).add_(act.a) if (act.a, act.b) != (0.0, 1.0) else step
        return act.derivative(z)
    # Any other elementwise module: its exact derivative by autograd (diagonal Jacobian).
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(m(leaf).sum(), leaf)
    return grad


def _is_relu(m: nn.Module) -> bool:
    return isinstance(m, nn.ReLU) or (isinstance(m, ActivationModule)
                                       and isinstance(m.activation, ABReLU)
                                       and (m.activation.a, m.activation.b) == (0.0, 1.0))


def _dense_forward(s: _DenseStep, a: torch.Tensor) -> torch.Tensor:
    m = s.module
    if a.ndim != 2:
        raise ValueError(f"structured path: a Dense layer received inputs of shape "
                         f"{tuple(a.shape)}; it needs (B, features). Put nn.Flatten() first "
                         "or use method='jacobian'.")
    if isinstance(m, DenseModule):  # z = s_w W a + s_b b in one fused call
        return torch.addmm(m.bias, a, m.weight.T, beta=m.bias_scale, alpha=m.weight_scale)
    return m(a)


def _structured_features(steps: list, n_out: int) -> Callable[[torch.Tensor], list]:
    """Per example block: a list of ``(step, a_l, δ_l, c_l)`` per Dense layer with a selected
    parameter, where ``a_l: (B, n_in)`` is the layer's input and the backward signal is
    ``c_l · δ_l`` with ``δ_l: (B, O, n_out)`` (the scalar weight scales are carried in
    ``c_l`` instead of rescaling every signal)."""
    first_needed = min(i for i, (kind, s) in enumerate(steps)
                       if kind == "dense" and (s.weight or s.bias))

    def features(x: torch.Tensor) -> list:
        with torch.no_grad():
            a = x
            saved: list[Any] = []
            for kind, s in steps:
                if kind == "flatten":
                    a = s(a)
                    saved.append(None)
                elif kind == "dense":
                    saved.append(a)
                    a = _dense_forward(s, a)
                elif _is_relu(s):
                    saved.append(a > 0)  # a boolean mask is φ' and takes 1 byte per entry
                    a = torch.relu(a)
                else:
                    saved.append(_activation_derivative(s, a))
                    a = s(a)
            if a.ndim != 2 or a.shape[1] != n_out:
                raise ValueError(f"structured path: expected output (B, {n_out}); got "
                                 f"{tuple(a.shape)}")
            b = x.shape[0]
            delta = torch.eye(n_out, dtype=a.dtype, device=a.device).expand(b, n_out, n_out)
            scale = 1.0
            out = []
            for i in range(len(steps) - 1, first_needed - 1, -1):
                kind, s = steps[i]
                if kind == "act":
                    delta = delta * saved[i].unsqueeze(1)
                elif kind == "dense":
                    if s.weight or s.bias:
                        out.append((s, saved[i], delta, scale))
                    if i > first_needed:
                        delta = delta @ s.module.weight
                        scale *= s.w_scale
            return out

    return features


def _steps(setup: _Setup) -> tuple[list[tuple[str, Any]], str | None]:
    return structured_plan(setup.model, setup.params, setup.x1.ndim)


def _by_structured(setup: _Setup, req: Request) -> tuple[torch.Tensor, dict]:
    steps, reason = _steps(setup)
    if reason is not None:  # the dispatcher checks first; this guards a direct call
        raise ValueError(f"method='structured' needs {_REQUIREMENT}, but {reason}.")
    output = req.output
    tail = _tail(setup, output)
    o = setup.n_out
    width = math.prod(tail)
    itemsize = setup.itemsize
    dense = [s for kind, s in steps if kind == "dense"]
    widths = sum(s.module.in_features + 2 * o * s.module.out_features for s in dense)
    feat = itemsize * (widths + 2 * setup.act_numel)
    n_tensors = req.n_tensors(sum(bool(s.weight) + bool(s.bias) for s in dense))
    plan = _plan_kernel(setup, req, feat1=feat, feat2=feat,
                        pair=lambda a, b: a * b * itemsize * (3 * width + 2) * n_tensors,
                        n_tensors=n_tensors, what="method='structured'")
    features = _structured_features(steps, o)
    expand = (slice(None), slice(None)) + (None,) * len(tail)

    def contract(f1: list, f2: list) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        acc = None
        for (s, a1, d1, c), (_, a2, d2, _) in zip(f1, f2):
            g_delta = _gram(d1, d2, output)
            g_a = _matmul_t(a1, a1 if a2 is a1 else a2)[expand] if s.weight else None
            w_coef, b_coef = (c * s.w_scale) ** 2, (c * s.b_scale) ** 2
            if req.per_param:
                if s.weight:
                    result[s.weight] = (g_delta * g_a).mul_(w_coef)
                if s.bias:
                    result[s.bias] = g_delta * b_coef
                continue
            if acc is None:
                acc = torch.zeros_like(g_delta)
            if s.weight:
                acc.addcmul_(g_delta, g_a, value=w_coef)
            if s.bias:
                acc.add_(g_delta, alpha=b_coef)
        return result if req.per_param else {"total": acc}

    return _run_blocks(setup, req, plan, features, features, contract, same_features=True)


_REQUIREMENT = ("an nn.Sequential of nn.Linear/ntkit DenseModule layers and elementwise "
                "activations")
STRUCTURED = Method(compute=_by_structured, unsupported=lambda setup: _steps(setup)[1],
                    requirement=_REQUIREMENT)
