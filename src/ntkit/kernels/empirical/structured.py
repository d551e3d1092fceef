"""The ``structured`` method: per-layer gradient structure, no whole-model Jacobian.

For ``nn.Sequential`` stacks (nested Sequentials are flattened) whose differentiated
parameters sit in ``nn.Linear`` / ntkit ``DenseModule``, ``nn.Conv1d`` / ``nn.Conv2d`` (and
subclasses, e.g. ntkit's conv modules) and eval-mode ``BatchNorm`` layers. Every other
module of the stack must have no selected parameter; it is differentiated by
``torch.func.vjp`` (pooling, flatten, padding, eval dropout, any per-example map), or by
its elementwise derivative for activations.

One forward and one backward sweep per example block; the backward carries the O output
signals at once, ``δ_l(x) = ∂f/∂z_l ∈ R^{O × shape(z_l)}``. Per layer:

* Dense ``z = s_w W a + s_b b`` (``a ∈ R^{n_in}``): ``∂f_o/∂W = s_w δ_o ⊗ a``, so

      Θ_l(x, x')_{oo'} = ⟨δ_o(x), δ_o'(x')⟩ · (s_w² ⟨a(x), a(x')⟩ + s_b²)

  — two Gram matrices, no Jacobian (cost per pair O(n_in + k n_out), k = O or O²).
* Conv ``z_{c,p} = s_w Σ_k W_{c,k} U_{k,p}(a) + s_b b_c`` with ``U(a) ∈ R^{K×P}`` the
  patches (``unfold``: K = C_in·kh·kw, P output pixels). The weight is shared over pixels, so

      Θ_l(x, x')_{oo'} = s_w² Σ_c Σ_{p,p'} δ_{o,c,p}(x) δ_{o',c,p'}(x') ⟨U_p(x), U_p'(x')⟩
                       = s_w² ⟨G_o(x), G_o'(x')⟩,   G_o(x) = δ_o(x) U(x)ᵀ ∈ R^{C_out×K}

  (bias: ``s_b² Σ_c (Σ_p δ_{o,c,p})(Σ_p' δ_{o',c,p'})``). Two orders, chosen per layer:

  - factored (``G``): one ``(O·C_out × P) @ (P × K)`` product per example builds the
    per-example weight gradient — the sum over pixels done once per example, not once per
    pair — then one Gram: O(k C_out K) per pair of examples (k = O, or O² for "full"),
    ``O C_out K`` numbers kept per example;
  - pixel pairs: the patch Gram ``⟨U_p(x), U_p'(x')⟩`` and the signal Gram over channels,
    multiplied and summed over (p, p'): O(P² (K + k C_out)) per pair, ``P (K + O C_out)``
    numbers per example. Cheaper only for small feature maps (P² < k C_out K / (K + k C_out),
    e.g. 4×4 maps with 128 channels), where it also holds far less than ``G``.
* BatchNorm (eval) ``y = γ x̂ + β`` with fixed statistics: ``∂f_o/∂γ_c = Σ_p δ_{o,c,p} x̂_{c,p}``,
  ``∂f_o/∂β_c = Σ_p δ_{o,c,p}``, then one Gram.

Compared with ``jacobian`` (``vmap(jacrev)`` of the whole model) this never forms a Dense
layer's ``O × n_out × n_in`` Jacobian, which dominates CNNs with a Flatten + Dense readout;
the convolutional gradients are the same numbers built from one batched sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap

from ...layers.activations import ABReLU, ActivationModule
from ...layers.conv import _pad as _ntkit_pad
from ...layers.conv import _ScaledConv
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
_CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_UNFOLD_CHUNK_BYTES = 1 << 20


@dataclass
class _Step:
    """One module of the flattened Sequential, as the structured path treats it.

    ``kind``: ``"dense"``, ``"conv"``, ``"bn"`` (layers whose gradients are formed here),
    ``"act"`` (elementwise: derivative times signal) or ``"map"`` (anything else without a
    selected parameter: backward by ``torch.func.vjp``). ``weight``/``bias``: the selected
    parameter names, else None. ``in_shape``/``out_shape``: per-example shapes, when probed.
    """

    kind: str
    name: str
    module: nn.Module
    weight: str | None = None
    bias: str | None = None
    w_scale: float = 1.0
    b_scale: float = 1.0
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    probed: bool = field(default=False)

    @property
    def selected(self) -> bool:
        return bool(self.weight or self.bias)

    def param_numel(self) -> int:
        """Elements of the selected parameters."""
        return sum(getattr(self.module, k).numel() for k, n in
                   (("weight", self.weight), ("bias", self.bias)) if n)


def _flatten_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    # Not named_children(): it skips a module's repeated occurrences (one nn.ReLU instance
    # used after every layer), which the forward pass applies every time.
    out = []
    for name, child in model._modules.items():
        if child is None:
            continue
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            out.extend(_flatten_sequential(child, full + "."))
        else:
            out.append((full, child))
    return out


def _selected_names(name: str, m: nn.Module, chosen: set[int] | None
                    ) -> dict[str, str | None]:
    """``weight``/``bias`` -> ``"<name>.weight"`` etc. if that parameter is differentiated
    (``chosen``: ids of the selected parameters, None = every trainable one)."""
    out: dict[str, str | None] = {}
    for k in ("weight", "bias"):
        p = getattr(m, k, None)
        ok = isinstance(p, torch.Tensor) and p.requires_grad and (chosen is None
                                                                 or id(p) in chosen)
        out[k] = f"{name}.{k}" if ok else None
    return out


def _classify(name: str, m: nn.Module, chosen: set[int] | None) -> _Step | str:
    """The step for module ``m``, or the reason it prevents the structured path."""
    if m._forward_hooks or m._forward_pre_hooks:
        return f"module {name!r} has forward hooks"
    sel = _selected_names(name, m, chosen)
    if isinstance(m, (nn.Linear, DenseModule)) and not isinstance(m, nn.LazyLinear):
        ws, bs = (m.weight_scale, m.bias_scale) if isinstance(m, DenseModule) else (1.0, 1.0)
        return _Step("dense", name, m, sel["weight"], sel["bias"], ws, bs)
    if isinstance(m, _CONV_TYPES) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
        if isinstance(m, _ScaledConv):
            # ntkit's conv modules: explicit padding in forward, and the parameterization's
            # factors (z = s_w W ⋆ a + s_b b) like DenseModule.
            return _Step("conv", name, m, sel["weight"], sel["bias"], m.weight_scale,
                         m.bias_scale)
        if type(m).forward is not _torch_forward(m):
            return (f"module {name!r} ({type(m).__name__}) overrides the convolution's "
                    "forward, so its patches are unknown")
        return _Step("conv", name, m, sel["weight"], sel["bias"])
    if isinstance(m, _BN_TYPES) and (sel["weight"] or sel["bias"]):
        if m.training or not m.track_running_stats or m.running_mean is None:
            return (f"module {name!r} ({type(m).__name__}) normalises by batch statistics "
                    "(train mode or track_running_stats=False)")
        return _Step("bn", name, m, sel["weight"], sel["bias"])
    if isinstance(m, _PARAMETER_FREE_ACTS):
        return _Step("act", name, m)
    own = [n for n, p in m.named_parameters() if p.requires_grad
           and (chosen is None or id(p) in chosen)]
    if own:
        return (f"module {name!r} ({type(m).__name__}) has differentiated parameters "
                f"({', '.join(own[:3])}) and is not a Linear/DenseModule, Conv1d/Conv2d or "
                "BatchNorm layer")
    return _Step("map", name, m)


def _torch_forward(m: nn.Module) -> Callable:
    return nn.Conv1d.forward if isinstance(m, nn.Conv1d) else nn.Conv2d.forward


def _registered(model: nn.Module, m: nn.Module, attr: str) -> str:
    """The name ``model.named_parameters()`` gives ``m.<attr>``."""
    target = getattr(m, attr)
    for name, p in model.named_parameters():
        if p is target:
            return name
    raise AssertionError(f"{attr} of {type(m).__name__} is not a parameter of the model")


def structured_plan(model: nn.Module, params: Iterable[str] | None = None,
                    example: torch.Tensor | None = None) -> tuple[list[_Step], str | None]:
    """Decompose ``model`` for the structured path.

    Returns ``(steps, reason)``: ``steps`` is one :class:`_Step` per module of the flattened
    Sequential; ``reason`` is ``None`` when the model qualifies and otherwise says which
    module prevents it. ``example`` (a batch of one input, ``(1, *in)``), when given, is
    run through the steps to record every step's per-example shapes and to check that each
    Dense layer receives ``(B, features)``.
    """
    if type(model) is not nn.Sequential:
        return [], f"model is {type(model).__name__}, not an nn.Sequential"
    chosen = None
    if params is not None:  # by identity: a tied parameter has one name but several uses
        names = set(params)
        chosen = {id(p) for n, p in model.named_parameters() if n in names}
    steps: list[_Step] = []
    seen: dict[int, str] = {}
    for name, m in _flatten_sequential(model):
        step = _classify(name, m, chosen)
        if isinstance(step, str):
            return [], step
        if step.selected and id(m) in seen:
            # Tied parameters: the gradient is the sum over the uses, not one per layer.
            return [], (f"module {name!r} is the same module as {seen[id(m)]!r} (tied "
                        "parameters)")
        seen.setdefault(id(m), name)
        if step.selected:  # name the gradients by the parameter's registered name
            step.weight = step.weight and _registered(model, m, "weight")
            step.bias = step.bias and _registered(model, m, "bias")
        steps.append(step)
    if not any(s.selected for s in steps):
        return [], "no differentiated parameter is in a Linear/DenseModule/Conv/BatchNorm layer"
    if example is not None:
        a = example
        with torch.no_grad():
            for s in steps:
                if s.kind == "dense" and a.ndim != 2:
                    return [], (f"module {s.name!r} receives {a.ndim}-dimensional batches "
                                f"(per example {tuple(a.shape[1:])}); put nn.Flatten() before "
                                "it")
                s.in_shape = tuple(a.shape[1:])
                a = s.module(a)
                if not isinstance(a, torch.Tensor) or a.ndim == 0 or a.shape[0] != 1:
                    return [], f"module {s.name!r} does not map (B, ...) to (B, ...)"
                s.out_shape = tuple(a.shape[1:])
                s.probed = True
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


def _dense_forward(s: _Step, a: torch.Tensor) -> torch.Tensor:
    m = s.module
    if a.ndim != 2:
        raise ValueError(f"structured path: a Dense layer received inputs of shape "
                         f"{tuple(a.shape)}; it needs (B, features). Put nn.Flatten() first "
                         "or use method='jacobian'.")
    if isinstance(m, DenseModule):  # z = s_w W a + s_b b in one fused call
        return torch.addmm(m.bias, a, m.weight.T, beta=m.bias_scale, alpha=m.weight_scale)
    return m(a)


def _pull_back(fn: Callable, delta: torch.Tensor) -> torch.Tensor:
    """Apply a per-example vjp to each of the O signals: ``(B, O, *out) -> (B, O, *in)``."""
    try:
        return vmap(fn, in_dims=1, out_dims=1)(delta)[0]
    except RuntimeError as err:  # an op without a batching rule: one signal at a time
        if "randomness" in str(err):
            raise
        return torch.stack([fn(delta[:, o])[0] for o in range(delta.shape[1])], dim=1)


def _patches(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """The conv's input patches ``U(a): (B, C_in·kh·kw, P)`` in ``weight``'s (C, kh, kw)
    order, padded exactly as the module pads (zeros, circular, reflect, replicate, 'same'
    with PyTorch's extra right/bottom pixel for even kernels; ntkit's modules pad in their
    forward, as the kernel map assumes)."""
    if isinstance(m, _ScaledConv):
        a = _ntkit_pad(a, m.kernel_size, m.stride, m.pad_mode)
    pad = list(getattr(m, "_reversed_padding_repeated_twice", []))
    if any(pad):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, pad, mode=mode)
    if isinstance(m, nn.Conv1d):  # a (B, C, L) is an image of height 1
        a = a.unsqueeze(2)
        kernel, dil, stride = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
    else:
        kernel, dil, stride = m.kernel_size, m.dilation, m.stride
    return F.unfold(a, kernel, dilation=dil, stride=stride)


def _conv_grads(s: _Step, a: torch.Tensor, delta: torch.Tensor, c: float
                ) -> list[tuple[str, torch.Tensor]]:
    """Per-example, per-output gradients of a conv layer's selected parameters,
    ``(B, O, numel)`` each, scaled by the carried factor ``c`` and the layer's scales."""
    m = s.module
    b, o = delta.shape[:2]
    c_out, groups = m.out_channels, m.groups
    # One contiguous copy of the signals (vmap's pull-back leaves them strided) instead of
    # one per chunk below.
    d = delta.reshape(b, o, c_out, -1).contiguous()  # (B, O, C_out, P)
    out = []
    if s.weight:
        p = d.shape[-1]
        k = m.weight[0].numel() * groups  # C_in·kh·kw
        g = torch.empty((b, o, m.weight.numel()), dtype=delta.dtype, device=delta.device)
        # Patches of a few examples at a time: an unfold that stays in cache makes the
        # product about twice as fast as one unfold of the whole block (measured, f64).
        step = max(1, _UNFOLD_CHUNK_BYTES // (k * p * delta.element_size()))
        for r in range(0, b, step):
            u = _patches(m, a[r:r + step])  # (b', K, P)
            dr = d[r:r + step]
            if groups == 1:
                torch.bmm(dr.reshape(-1, o * c_out, p), u.transpose(1, 2),
                          out=g[r:r + step].view(-1, o * c_out, k))
            else:
                g[r:r + step] = torch.einsum(
                    "bogcp,bgkp->bogck", dr.reshape(-1, o, groups, c_out // groups, p),
                    u.reshape(-1, groups, k // groups, p)).reshape(-1, o, m.weight.numel())
        out.append((s.weight, _scaled(g, c * s.w_scale)))
    if s.bias:
        out.append((s.bias, _scaled(d.sum(dim=-1), c * s.b_scale)))
    return out


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t *= factor`` in place, skipped for the common factor 1 (PyTorch layers)."""
    return t if factor == 1.0 else t.mul_(factor)


def _bn_grads(s: _Step, a: torch.Tensor, delta: torch.Tensor, c: float
              ) -> list[tuple[str, torch.Tensor]]:
    """BatchNorm (fixed statistics) ``y = γ x̂ + β``: per-channel sums over positions."""
    m = s.module
    b, o, ch = delta.shape[:3]
    d = delta.reshape(b, o, ch, -1)
    out = []
    if s.weight:
        view = (1, ch, 1)
        xhat = (a.reshape(b, ch, -1) - m.running_mean.reshape(view)) * torch.rsqrt(
            m.running_var.reshape(view) + m.eps)
        out.append((s.weight, _scaled(torch.einsum("bocp,bcp->boc", d, xhat), c)))
    if s.bias:
        out.append((s.bias, _scaled(d.sum(dim=-1), c)))
    return out


def _pixel_pairs(s: _Step, n_out: int, output: str) -> bool:
    """Whether conv step ``s`` is contracted over pixel pairs rather than through its
    per-example weight gradient: per pair of examples P² (K + k C_out) against k C_out K
    multiply-adds (k = O, or O² for "full"). Grouped convolutions use the gradient."""
    if s.kind != "conv" or not s.weight or s.module.groups != 1 or not s.probed:
        return False
    k = n_out * n_out if output == "full" else n_out
    p = math.prod(s.out_shape[1:])
    kk, c = s.module.weight[0].numel(), s.module.out_channels
    return p * p * (kk + k * c) < k * c * kk


def _pixel_pair_block(u1: torch.Tensor, d1: torch.Tensor, u2: torch.Tensor,
                      d2: torch.Tensor, output: str) -> torch.Tensor:
    """Σ_c Σ_{p,q} δ1_{o,c,p} δ2_{o',c,q} ⟨U1_p, U2_q⟩ for a block pair: patches
    ``u: (B, P, K)`` (already scaled), signals ``d: (B, O, C, P)``; reduced as ``output``."""
    b1, p, kk = u1.shape
    b2, q = u2.shape[0], u2.shape[1]
    o, ch = d1.shape[1], d1.shape[2]
    m = (u1.reshape(b1 * p, kk) @ u2.reshape(b2 * q, kk).T).reshape(b1, p, b2, q)
    if output == "trace":
        e1 = d1.permute(0, 3, 1, 2).reshape(b1 * p, o * ch)
        e2 = d2.permute(0, 3, 1, 2).reshape(b2 * q, o * ch)
        return torch.einsum("apbq,apbq->ab", m, (e1 @ e2.T).reshape(b1, p, b2, q)).div_(o)
    if output == "diagonal":
        e1 = d1.permute(1, 0, 3, 2).reshape(o, b1 * p, ch)
        e2 = d2.permute(1, 0, 3, 2).reshape(o, b2 * q, ch)
        d = torch.bmm(e1, e2.transpose(1, 2)).reshape(o, b1, p, b2, q)
        return torch.einsum("apbq,oapbq->abo", m, d)
    e1 = d1.permute(0, 1, 3, 2).reshape(b1 * o * p, ch)
    e2 = d2.permute(0, 1, 3, 2).reshape(b2 * o * q, ch)
    d = (e1 @ e2.T).reshape(b1, o, p, b2, o, q)
    return torch.einsum("apbq,aopbrq->abor", m, d)


def _structured_features(steps: list[_Step], n_out: int, per_param: bool, output: str
                         ) -> Callable[[torch.Tensor], tuple[list, dict, list]]:
    """Per example block: ``(dense_terms, grads, pair_terms)``.

    ``dense_terms``: ``(step, a_l, δ_l, c_l)`` per Dense layer with a selected parameter,
    where ``a_l: (B, n_in)`` is the layer's input and the backward signal is ``c_l · δ_l``
    with ``δ_l: (B, O, n_out)`` (the scalar weight scales of Dense layers above are carried
    in ``c_l`` instead of rescaling every signal). ``grads``: per-example gradients
    ``(B, O, numel)`` of the conv/BatchNorm parameters, by name; without ``per_param`` they
    are concatenated into one ``{"": (B, O, Σ numel)}`` so that one Gram contracts them.
    ``pair_terms``: ``(name, U, δ)`` per conv weight contracted over pixel pairs
    (:func:`_pixel_pairs`), with patches ``U: (B, P, K)`` scaled by ``c_l s_w`` and
    signals ``δ: (B, O, C_out, P)``.
    """
    first_needed = min(i for i, s in enumerate(steps) if s.selected)
    by_pairs = {i for i, s in enumerate(steps) if _pixel_pairs(s, n_out, output)}

    def features(x: torch.Tensor) -> tuple[list, dict, list]:
        with torch.no_grad():
            a = x
            saved: list[Any] = []
            for i, s in enumerate(steps):
                below = i > first_needed  # the backward must pass through this step
                if s.kind == "dense":
                    saved.append(a if s.selected else None)
                    a = _dense_forward(s, a)
                elif s.kind == "act":
                    if not below and i < first_needed:
                        saved.append(None)
                        a = s.module(a)
                    elif _is_relu(s.module):
                        saved.append(a > 0)  # a boolean mask is φ' and takes 1 byte per entry
                        a = torch.relu(a)
                    else:
                        saved.append(_activation_derivative(s.module, a))
                        a = s.module(a)
                else:  # conv, bn, map: the input if gradients are formed, a vjp if passed
                    inp = a if s.selected else None
                    if below:
                        a, fn = vjp(s.module, a)
                    else:
                        a, fn = s.module(a), None
                    saved.append((inp, fn))
            b = x.shape[0]
            if a.shape[0] != b or a[0].numel() != n_out:
                raise ValueError(f"structured path: expected output (B, ...) with {n_out} "
                                 f"entries per example; got {tuple(a.shape)}")
            delta: torch.Tensor = torch.eye(n_out, dtype=a.dtype, device=a.device).expand(
                b, n_out, n_out).reshape(b, n_out, *a.shape[1:])
            scale = 1.0
            owned = False  # delta is a fresh tensor nothing else holds: update in place
            dense_terms, grads, pair_terms = [], {}, []
            for i in range(len(steps) - 1, first_needed - 1, -1):
                s = steps[i]
                if s.kind == "act":
                    # In place when nothing else holds delta: the signals are the largest
                    # tensors here and this pass is memory-bound.
                    delta = delta.mul_(saved[i].unsqueeze(1)) if owned \
                        else delta * saved[i].unsqueeze(1)
                    owned = True
                    saved[i] = None
                elif s.kind == "dense":
                    if s.selected:
                        dense_terms.append((s, saved[i], delta, scale))
                        owned = False
                    if i > first_needed:
                        delta = delta @ s.module.weight
                        scale *= s.w_scale
                        owned = True
                else:
                    inp, fn = saved[i]
                    if i in by_pairs:
                        u = _patches(s.module, inp).transpose(1, 2).contiguous()
                        d = delta.reshape(b, n_out, s.module.out_channels, -1).contiguous()
                        pair_terms.append((s.weight, _scaled(u, scale * s.w_scale), d))
                        if s.bias:
                            grads[s.bias] = _scaled(d.sum(dim=-1), scale * s.b_scale)
                    elif s.kind == "conv" and s.selected:
                        grads.update(_conv_grads(s, inp, delta, scale))
                    elif s.kind == "bn":
                        grads.update(_bn_grads(s, inp, delta, scale))
                    saved[i] = None
                    if i > first_needed:
                        delta = _pull_back(fn, delta)
                        owned = True
            if grads and not per_param:
                grads = {"": torch.cat(list(grads.values()), dim=-1)}
            return dense_terms, grads, pair_terms

    return features


def _steps(setup: _Setup) -> tuple[list[_Step], str | None]:
    key = ("structured_plan",)
    if key not in setup.memo:
        setup.memo[key] = structured_plan(setup.model, setup.params, setup.x1[:1])
    return setup.memo[key]


def _sizes(steps: list[_Step], n_out: int, output: str) -> dict[str, float]:
    """Per-example element counts the memory plan and the cost model use."""
    dense = [s for s in steps if s.kind == "dense" and s.selected]
    k = n_out * n_out if output == "full" else n_out
    pairs = [s for s in steps if _pixel_pairs(s, n_out, output)]
    jac = sum(s.param_numel() for s in steps if s.kind in ("conv", "bn") and s.selected) \
        - sum(s.module.weight.numel() for s in pairs)
    # Pixel-pair layers: per example the patches and signals; per pair of examples the
    # patch Gram and signal Gram over (p, q), and the multiply-adds of both.
    pix = [(math.prod(s.out_shape[1:]), s.module.weight[0].numel(), s.module.out_channels)
           for s in pairs]
    first = min(i for i, s in enumerate(steps) if s.selected)
    acts = [math.prod(s.out_shape) for s in steps[first:]] + [math.prod(steps[first].in_shape)]
    unfold = max((s.module.weight[0].numel() * math.prod(s.out_shape[1:]) for s in steps
                  if s.kind == "conv" and s.weight), default=0)
    biggest_grad = max((s.param_numel() for s in steps if s.kind in ("conv", "bn")
                        and s.selected), default=0)
    return {"dense_in": sum(s.module.in_features for s in dense),
            "dense_out": sum(s.module.out_features for s in dense),
            "jac": jac, "acts": sum(acts), "max_act": max(acts), "unfold": unfold,
            "max_grad": biggest_grad,
            "pix_row": sum(p * (kk + n_out * c) for p, kk, c in pix),
            "pix_pair_bytes": max((p * p * (1 + k) for p, _, _ in pix), default=0),
            "pix_pair_flops": sum(p * p * (kk + k * c) for p, kk, c in pix),
            "n_tensors": sum(bool(s.weight) + bool(s.bias) for s in steps)}


def structured_cost(setup: _Setup, output: str, per_param: bool) -> float:
    """FLOPs of ``structured``: one forward and an O-signal backward per example (≈ 3 F O,
    as for the Jacobian rows), then per pair of examples the Grams of the Dense layers'
    inputs and signals and of the conv/BatchNorm gradients, or the pixel-pair sums:
    2 N1 N2 (Σ_dense (n_in + k n_out) + k Σ_conv,bn P_l + Σ_pixel-pair P² (K + k C_out)),
    k = O² for "full", O otherwise."""
    steps, _ = _steps(setup)
    o, f = setup.n_out, setup.flops
    k = o * o if output == "full" else o
    z = _sizes(steps, o, output)
    pair = z["dense_in"] + k * (z["dense_out"] + z["jac"]) + z["pix_pair_flops"]
    return 3.0 * f * o * (setup.n1 + setup.n2) + 2.0 * setup.n1 * setup.n2 * pair


def _by_structured(setup: _Setup, req: Request) -> tuple[torch.Tensor, dict]:
    steps, reason = _steps(setup)
    if reason is not None:  # the dispatcher checks first; this guards a direct call
        raise ValueError(f"method='structured' needs {_REQUIREMENT}, but {reason}.")
    output = req.output
    tail = _tail(setup, output)
    o = setup.n_out
    width = math.prod(tail)
    itemsize = setup.itemsize
    z = _sizes(steps, o, output)
    # Kept per row: Dense inputs and signals, conv/BN gradients (twice while concatenating),
    # pixel-pair layers' patches and signals.
    feat = itemsize * (z["dense_in"] + 2 * o * z["dense_out"] + 2 * o * z["jac"]
                       + z["pix_row"])
    # While one block's features are computed: the saved activations and vjp residuals,
    # two O-signal tensors of the largest activation, one unfold and one layer's gradient.
    transient = itemsize * (3 * z["acts"] + 3 * o * z["max_act"] + z["unfold"]
                            + o * z["max_grad"])
    n_tensors = req.n_tensors(z["n_tensors"])
    plan = _plan_kernel(setup, req, feat1=feat, feat2=feat,
                        pair=lambda a, b: a * b * itemsize * ((3 * width + 2) * n_tensors
                                                              + 2 * z["pix_pair_bytes"])
                        + max(a, b) * transient,
                        n_tensors=n_tensors, what="method='structured'")
    features = _structured_features(steps, o, req.per_param, output)
    expand = (slice(None), slice(None)) + (None,) * len(tail)

    def contract(f1: tuple, f2: tuple) -> dict[str, torch.Tensor]:
        (dense1, grads1, pairs1), (dense2, grads2, pairs2) = f1, f2
        result: dict[str, torch.Tensor] = {}
        acc = None
        for (s, a1, d1, c), (_, a2, d2, _) in zip(dense1, dense2):
            g_delta = _gram(d1, d1 if d2 is d1 else d2, output)
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
        for (name, u1, e1), (_, u2, e2) in zip(pairs1, pairs2):
            g = _pixel_pair_block(u1, e1, u2, e2, output)
            if req.per_param:
                result[name] = g
            else:
                acc = g if acc is None else acc.add_(g)
        for name, g1 in grads1.items():
            g2 = grads2[name]
            g = _gram(g1, g1 if g2 is g1 else g2, output)
            if req.per_param:
                result[name] = g
            else:
                acc = g if acc is None else acc.add_(g)
        return result if req.per_param else {"total": acc}

    return _run_blocks(setup, req, plan, features, features, contract, same_features=True)


_REQUIREMENT = ("an nn.Sequential whose differentiated parameters are in nn.Linear/ntkit "
                "DenseModule, nn.Conv1d/Conv2d or eval-mode BatchNorm layers (other modules "
                "parameter-free)")
STRUCTURED = Method(compute=_by_structured, unsupported=lambda setup: _steps(setup)[1],
                    requirement=_REQUIREMENT, cost=structured_cost)
