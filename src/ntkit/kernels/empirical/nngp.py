"""The empirical NNGP: the scaled Gram matrix of one layer's features."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..._validation import Tensorish, check_positive_int
from ...layers.dense import DenseModule
from .gram import _matmul_t, _slices
from .setup import _check_kernel_finite, _check_mode, _inputs


def _resolve_layer(model: nn.Module, layer: Any) -> tuple[nn.Module, bool]:
    """The module whose features to use, and whether to read its input (pre-hook)."""
    if layer is None:
        last = None
        for m in model.modules():
            if isinstance(m, (nn.Linear, DenseModule)):
                last = m
        if last is None:
            raise ValueError("layer=None means 'the input of the last Linear/DenseModule', but "
                             "the model has none; pass layer as a module name or index.")
        return last, True
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError("layer is a module that is not part of model.")
        return layer, False
    if isinstance(layer, str):
        named = dict(model.named_modules())
        if layer not in named:
            raise ValueError(f"layer {layer!r} is not a submodule name of the model; choose "
                             f"from {[n for n in named if n][:20]}.")
        return named[layer], False
    if isinstance(layer, int) and not isinstance(layer, bool):
        children = list(model.children())
        if not -len(children) <= layer < len(children):
            raise ValueError(f"layer={layer} is out of range for a model with "
                             f"{len(children)} top-level children.")
        return children[layer], False
    raise ValueError(f"layer must be None, a submodule name, an index or a module; got "
                     f"{layer!r}.")


def empirical_nngp(model: nn.Module, x1: Tensorish, x2: Tensorish | None = None,
                   layer: Any = None, *, W_std: float | None = None, b_std: float | None = None,
                   batch_size: int | None = None) -> torch.Tensor:
    """Gram matrix of one layer's features, scaled as in the NTK parameterization.

    ``K(x, x') = W_std² ⟨φ(x), φ(x')⟩ / n + b_std²`` where ``φ(x) ∈ R^n`` are the chosen
    layer's features (flattened per example). This is the covariance that a following
    Dense layer ``W_std/sqrt(n) W φ + b_std b`` with ``W, b ~ N(0, 1)`` induces on its
    outputs, so for a one-hidden-layer ntkit network its expectation over initialisations
    is exactly ``net.kernel(x).nngp``.

    Args:
        model: a module mapping ``(N, *in)`` to ``(N, ...)``.
        x1, x2: ``(N1, *in)`` and ``(N2, *in)`` inputs (``x2=None``: ``x2 = x1``).
        layer: ``None`` (default) uses the *input* of the last ``nn.Linear``/``DenseModule``
            — the last hidden layer's post-activation features; a string names a submodule
            (``model.named_modules()``) and an int indexes ``model``'s children, whose
            *output* is used; a module object is used likewise.
        W_std, b_std: scaling; default to the last DenseModule's ``W_std``/``b_std`` when
            ``layer=None`` and the model ends in one, else 1 and 0.
        batch_size: rows per forward pass (default: all).
    Returns:
        ``(N1, N2)`` kernel on ``x1``'s device, in ``x1``'s floating dtype.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    t1, t2 = _inputs(x1, x2)
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
    _check_mode(model)
    target, read_input = _resolve_layer(model, layer)
    if layer is None and isinstance(target, DenseModule):
        W_std = target.W_std if W_std is None else W_std
        b_std = target.b_std if b_std is None else b_std
    w2 = (1.0 if W_std is None else float(W_std)) ** 2
    b2 = (0.0 if b_std is None else float(b_std)) ** 2

    captured: list[torch.Tensor] = []

    def grab(t: Any) -> None:
        t = t[0] if isinstance(t, tuple) else t
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"layer {layer!r} does not produce a tensor.")
        captured.append(t.detach().reshape(t.shape[0], -1))

    if read_input:
        handle = target.register_forward_pre_hook(lambda _m, inp: grab(inp))
    else:
        handle = target.register_forward_hook(lambda _m, _inp, out: grab(out))

    def feats(x: torch.Tensor) -> torch.Tensor:
        chunks = []
        for s in _slices(x.shape[0], batch_size or x.shape[0]):
            captured.clear()
            try:
                with torch.no_grad():
                    model(x[s])
            except Exception as err:
                raise ValueError(f"the model could not be applied to inputs of example shape "
                                 f"{tuple(x.shape[1:])}, dtype {x.dtype}: {err}") from err
            if len(captured) != 1:
                raise ValueError(f"layer {layer!r} ran {len(captured)} times in one forward "
                                 "pass; choose a layer that runs once.")
            chunks.append(captured[0])
        return torch.cat(chunks)

    try:
        f1 = feats(t1)
        f2 = f1 if t2 is None else feats(t2)
    finally:
        handle.remove()
    n = f1.shape[1]
    k = _matmul_t(f1, f2).mul_(w2 / n).add_(b2)
    out_dtype = t1.dtype if t1.is_floating_point() else k.dtype
    k = k.to(out_dtype)
    _check_kernel_finite(k, t1, t2, "the empirical NNGP")
    return k
