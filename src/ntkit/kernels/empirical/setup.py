"""Set-up and validation shared by every method: inputs, parameters, model checks.

``_setup`` validates the inputs, selects the differentiated parameters and probes the model
on one example (output size, activation sizes, FLOPs), refusing models whose per-example NTK
is undefined: BatchNorm/Dropout in training mode, random numbers drawn in the forward pass,
and outputs that depend on the other examples of the batch. ``_check_kernel_finite`` names
the rows of a kernel that overflowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..._validation import (
    Tensorish,
    _describe_rows,
    as_tensor,
    check_finite,
    finite_max_abs,
)


@dataclass
class _Setup:
    model: nn.Module
    x1: torch.Tensor
    x2: torch.Tensor | None
    params: dict[str, torch.Tensor]      # differentiated (selected) parameters, detached
    consts: dict[str, torch.Tensor]      # every other parameter and buffer, detached
    n_out: int                           # O
    dtype: torch.dtype                   # dtype of the model's output (computation dtype)
    out_dtype: torch.dtype               # dtype of the result
    act_numel: int                       # numel of the tensors one example's forward creates
    flops: float                         # forward FLOPs for one example
    n_params: int = field(init=False)
    memo: dict = field(default_factory=dict)  # per-call results a method's checks share

    def __post_init__(self) -> None:
        self.n_params = sum(p.numel() for p in self.params.values())

    @property
    def itemsize(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    @property
    def n1(self) -> int:
        return self.x1.shape[0]

    @property
    def n2(self) -> int:
        """Rows of ``x2``; ``N1`` when ``x2`` is None (the kernel of ``x1`` with itself)."""
        return self.n1 if self.x2 is None else self.x2.shape[0]


def _as_batch(x: Tensorish, name: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"{name} is None; expected a batch of inputs with shape (N, ...).")
    t = as_tensor(x, name) if not isinstance(x, torch.Tensor) else x
    if t.is_complex() or t.dtype == torch.bool:
        t = as_tensor(t, name)  # raises the shared, explicit message
    if t.ndim == 0 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch with shape (N, ...); got shape "
                         f"{tuple(t.shape)}.")
    if t.is_floating_point():
        check_finite(t, name)
    return t.detach()


def _inputs(x1: Tensorish, x2: Tensorish | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    t1 = _as_batch(x1, "x1")
    if x2 is None:
        return t1, None
    t2 = _as_batch(x2, "x2")
    if t2.shape[1:] != t1.shape[1:]:
        raise ValueError(f"x1 has examples of shape {tuple(t1.shape[1:])} but x2 has "
                         f"{tuple(t2.shape[1:])}; both must have the same feature shape.")
    return t1, t2.to(device=t1.device, dtype=t1.dtype)


def _select_params(model: nn.Module, params: Any) -> tuple[dict, dict]:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError(f"model ({type(model).__name__}) has no trainable parameters (none "
                         "with requires_grad=True); the NTK is defined by the gradient with "
                         "respect to parameters.")
    if params is None:
        chosen = list(named)
    else:
        items = [params] if isinstance(params, (str, nn.Parameter, torch.Tensor)) else list(params)
        by_id = {id(p): n for n, p in named.items()}
        chosen = []
        for item in items:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"params: {item!r} is not a trainable parameter of the "
                                     f"model; choose from {sorted(named)}.")
                chosen.append(item)
            elif isinstance(item, torch.Tensor) and id(item) in by_id:
                chosen.append(by_id[id(item)])
            else:
                raise ValueError(f"params must hold parameter names or the model's own "
                                 f"trainable parameters; got {item!r}.")
        if not chosen:
            raise ValueError("params is empty; pass None for all parameters or a list of names "
                             f"from {sorted(named)}.")
        chosen = list(dict.fromkeys(chosen))
    selected = {n: named[n].detach() for n in chosen}
    consts = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
    consts.update({n: b.detach() for n, b in model.named_buffers()})
    return selected, consts


def _check_mode(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                         nn.modules.dropout._DropoutNd)):
            raise ValueError(f"module {name or type(model).__name__!r} ({type(m).__name__}) is "
                             "in training mode, so an example's output depends on the batch "
                             "or on random masks; call model.eval() first.")


_RANDOM_MESSAGE = (
    "the model draws random numbers in its forward pass (for example F.dropout(h, p, "
    "self.training) or torch.rand in training mode), so an example's output is not a "
    "function of the parameters alone and its NTK is undefined; call model.eval() first, or "
    "remove the random operation.")


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _same_rng_state(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _restore_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


# Rows evaluated together by the batch-coupling check (one small forward pass).
_COUPLING_ROWS = 8


def _check_batch_coupling(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None,
                          first_alone: torch.Tensor) -> None:
    """Raise if an example's output depends on the other examples in its batch.

    Every method computes the NTK of ``f`` applied to one example at a time (jacobian,
    structured) or to blocks of examples (ntk_vp), so a model that mixes examples
    (``x - x.mean(0)``, train-mode batch statistics written by hand, attention across the
    batch) would give a per-example or block-dependent answer without any error. The check:
    the first and the last of up to ``2 × _COUPLING_ROWS`` rows (from x1, then x2) evaluated
    alone and in one batch. A per-example model gives the same outputs up to rounding (gemm
    kernels differ with the row count, a relative change of a few ulps times the depth), so
    the tolerance is sqrt(eps) of the output scale: far above rounding, far below the O(1)
    change of a real coupling. The first row is also evaluated alone a second time, so that
    a model drawing from a private generator gets the randomness message instead. Cost: one
    forward pass of at most 16 rows and two of 1 row.
    """
    rows = x1[:_COUPLING_ROWS]
    if x2 is not None:
        rows = torch.cat([rows, x2[:_COUPLING_ROWS]])
    m = rows.shape[0]
    if m < 2:
        return
    with torch.no_grad():
        batch = model(rows)
        last_alone = model(rows[-1:])
        first_again = model(rows[:1])
    if not isinstance(batch, torch.Tensor) or batch.shape[0] != m \
            or batch.shape[1:] != first_alone.shape[1:]:
        got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"the model mapped a batch of {m} examples to {got} but one example "
                         f"to {tuple(first_alone.shape)}; the NTK needs a model that maps "
                         "(N, ...) to (N, ...) example by example.")
    alone = torch.cat([first_alone, last_alone])
    together = batch[[0, m - 1]]
    if not (bool(torch.isfinite(alone).all()) and bool(torch.isfinite(together).all())):
        return  # overflow is reported on the kernel itself, naming the rows
    scale = float(torch.maximum(alone.abs().max(), together.abs().max()))
    tol = torch.finfo(batch.dtype).eps ** 0.5
    if float((first_again - first_alone).abs().max()) > tol * scale:
        # The same single example twice gives different outputs: randomness the global-RNG
        # check could not see (a private torch.Generator), not coupling.
        raise ValueError(_RANDOM_MESSAGE)
    diff = float((alone - together).abs().max())
    if diff > tol * scale:
        raise ValueError(
            f"the model's output for an example depends on the other examples in its batch: "
            f"evaluated alone and in a batch of {m}, an example's output changes by "
            f"{diff / scale:.2g} of the output scale (rounding alone stays below {tol:.1g}). "
            "The empirical NTK is defined per example (the gradient of f(x) for a single x), "
            "so it cannot represent this coupling and every method would silently return "
            "something else. Make the model act on each example separately (fixed "
            "statistics instead of x - x.mean(0), BatchNorm in eval mode, LayerNorm over "
            "features), or differentiate the whole batch's output yourself.")


def _check_kernel_finite(k: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor | None,
                         what: str) -> None:
    """Raise, naming the rows, if a kernel computed from finite inputs overflowed."""
    if finite_max_abs(k) is not None:
        return
    bad = ~torch.isfinite(k).reshape(k.shape[0], k.shape[1], -1).all(dim=-1)
    if x2 is None:
        own = torch.diagonal(bad).nonzero().flatten()  # rows whose own value overflowed
        rows = own if own.numel() else bad.any(dim=1).nonzero().flatten()
        where = f"rows [{_describe_rows(rows)}] of x1"
        norm = float(x1.reshape(x1.shape[0], -1).abs().max())
    else:
        where = (f"rows [{_describe_rows(bad.any(dim=1).nonzero().flatten())}] of x1 against "
                 f"rows [{_describe_rows(bad.any(dim=0).nonzero().flatten())}] of x2")
        norm = max(float(x1.abs().max()), float(x2.abs().max()))
    raise ValueError(
        f"{what} overflowed: {int(bad.sum())} entries are infinite or NaN although the inputs "
        f"are finite ({where}; largest input magnitude {norm:.3g}, dtype {k.dtype}). Rescale "
        "the inputs (e.g. standardise the features) or the weights, or compute in float64.")


class _Allocations(TorchDispatchMode):
    """Counts the elements of every tensor the operators of a forward pass create (views and
    in-place results excluded): the per-example activation memory a backward pass keeps,
    including what functional calls inside custom modules (``torch.relu(x + self.c(x))``)
    allocate, which module hooks cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.numel += t.numel()
        return out


def _probe(model: nn.Module, x: torch.Tensor, name: str) -> tuple[torch.Tensor, int, float]:
    """Run the model on one example: its output, the numel of every tensor its operators
    create (see :class:`_Allocations`), and its FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    rng_before = _rng_state(x.device)
    allocations = _Allocations()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, allocations:
            out = model(x[:1])
        flops = float(counter.get_total_flops())
    except Exception as err:
        raise ValueError(f"the model could not be applied to {name} (example shape "
                         f"{tuple(x.shape[1:])}, dtype {x.dtype}, device {x.device}): {err}. "
                         "Pass inputs of the shape, dtype and device the model expects."
                         ) from err
    numel = [allocations.numel]
    if not _same_rng_state(rng_before, _rng_state(x.device)):
        _restore_rng_state(x.device, rng_before)  # leave the caller's random stream as it was
        raise ValueError(_RANDOM_MESSAGE)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model returned {type(out).__name__}; the empirical NTK needs a "
                         "model whose forward returns one tensor of shape (N, ...).")
    if out.ndim == 0 or out.shape[0] != 1:
        raise ValueError(f"the model mapped a batch of 1 example to shape {tuple(out.shape)}; "
                         "its output must keep the batch dimension first, (N, ...).")
    if not out.is_floating_point():
        raise ValueError(f"the model output has dtype {out.dtype}; expected floating point.")
    return out, numel[0], flops


def _setup(model: nn.Module, x1: Tensorish, x2: Tensorish | None, params: Any) -> _Setup:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}. For an "
                         "ntkit architecture use net.module(in_dim).")
    t1, t2 = _inputs(x1, x2)
    selected, consts = _select_params(model, params)
    _check_mode(model)
    out, act_numel, flops = _probe(model, t1, "x1")
    _check_batch_coupling(model, t1, t2, out)
    n_out = out[0].numel()
    n_params = sum(p.numel() for p in selected.values())
    out_dtype = t1.dtype if t1.is_floating_point() else out.dtype
    return _Setup(model, t1, t2, selected, consts, n_out, out.dtype, out_dtype, act_numel,
                  flops if flops > 0 else 2.0 * n_params)


@contextmanager
def _preserving_parameters(model: nn.Module) -> Iterator[None]:
    """Put back every module's registered parameters and buffers afterwards.

    ``torch.func.functional_call`` swaps tensors into the modules and back; when one module
    object appears twice in a model (``nn.Sequential(lin, act, lin)``, a tied layer) its
    restore runs once per name and leaves the *substituted* detached tensor in place (seen
    with torch 2.13: ``lin.weight`` is no longer a Parameter afterwards). The kernel itself
    is right — each call substitutes all names again — but the user's model would be
    silently broken, so the original objects are restored by identity.
    """
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for m, params, buffers in saved:
            for store, before in ((m._parameters, params), (m._buffers, buffers)):
                for key, value in before.items():
                    if store.get(key) is not value:
                        store[key] = value
                        if hasattr(m, "__dict__") and key in m.__dict__:
                            del m.__dict__[key]  # a plain attribute shadowing the slot
