"""The empirical (finite-width) NTK and NNGP of any ``torch.nn.Module``.

For a network ``f(θ, x) ∈ R^O`` the empirical NTK is

    Θ(x, x')_{o o'} = Σ_p ∂f_o(x)/∂θ_p · ∂f_{o'}(x')/∂θ_p        (JGH §II.1)

Three ways to evaluate it, all memory-bounded and blocked over the rows of ``x1`` and
``x2`` (any sizes, no divisibility constraints):

* ``"structured"`` — for ``nn.Sequential`` stacks of ``nn.Linear`` / ntkit ``DenseModule``
  and elementwise activations. Writing ``z_l = s_w W_l a_l + s_b b_l`` for Dense layer ``l``
  (``a_l`` its input, ``s_w``, ``s_b`` its weight and bias scales) and ``δ_l(x) ∈ R^{O×n_l}``
  for the backward signal ``∂f/∂z_l``, the gradients are ``∂f_o/∂W_l = s_w δ_{l,o} ⊗ a_l``
  and ``∂f_o/∂b_l = s_b δ_{l,o}``, hence

      Θ(x, x')_{o o'} = Σ_l ⟨δ_{l,o}(x), δ_{l,o'}(x')⟩ · (s_w² ⟨a_l(x), a_l(x')⟩ + s_b²).

  One forward and one backward sweep per example (the backward carries the O output
  signals at once) plus two Gram matrices per layer: time O(N1 N2 Σ_l (n_{l-1} + O n_l))
  for ``output="trace"`` (× O for ``"full"``), memory O((N1 + N2) O Σ_l n_l + N1 N2).
  No Jacobian is materialised.
* ``"jacobian"`` — per-example Jacobians ``J(x) ∈ R^{O×P}`` by ``torch.func.vmap(jacrev)``,
  contracted block by block (one matrix product per parameter tensor).
* ``"ntk_vp"`` — NTK-vector products: the Jacobian rows of an ``x2`` block are pushed
  forward through the ``x1`` block with ``torch.func.jvp``, so only one side's Jacobian is
  ever held.

Shapes and conventions: ``output="full"`` gives ``(N1, N2, O, O)``; ``"diagonal"`` gives
``(N1, N2, O)`` (the ``o = o'`` entries); ``"trace"`` gives ``(N1, N2)``, the mean of the
diagonal over the O outputs, which is directly comparable with the infinite-width per-output
kernel ``net.kernel(x).ntk`` (whose full kernel is ``Θ ⊗ I_O``). Model outputs of any shape
``(N, *out)`` are flattened to ``O = prod(out)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from .._validation import (
    Tensorish,
    _describe_rows,
    as_tensor,
    available_memory,
    check_choice,
    check_finite,
    check_positive_int,
    finite_max_abs,
    format_bytes,
)
from ..layers.activations import ABReLU, ActivationModule
from ..layers.dense import DenseModule

METHODS = ("auto", "structured", "jacobian", "ntk_vp")
OUTPUTS = ("trace", "full", "diagonal")

# Elementwise torch activations the structured path accepts (their derivative comes from
# autograd on the pre-activations, so any elementwise map is exact).
ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Tanhshrink, nn.LogSigmoid, nn.Identity, ActivationModule,
)
# nn.PReLU has a parameter, so it is not a plain activation for the structured path.
_PARAMETER_FREE_ACTS = tuple(t for t in ELEMENTWISE_MODULES if t is not nn.PReLU)


class MemoryBudgetError(ValueError, MemoryError):
    """One block of the computation does not fit in ``memory_budget``."""


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


# --------------------------------------------------------------------------- set-up
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
    act_numel: int                       # numel of all module outputs for one example
    flops: float                         # forward FLOPs for one example
    n_params: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_params = sum(p.numel() for p in self.params.values())

    @property
    def itemsize(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()


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


def _probe(model: nn.Module, x: torch.Tensor, name: str) -> tuple[torch.Tensor, int, float]:
    """Run the model on one example: its output, the numel of all module outputs, FLOPs."""
    numel = [0]

    def hook(_m, _inp, out):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                numel[0] += t.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    flops = 0.0
    rng_before = _rng_state(x.device)
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = model(x[:1])
        flops = float(counter.get_total_flops())
    except Exception as err:
        raise ValueError(f"the model could not be applied to {name} (example shape "
                         f"{tuple(x.shape[1:])}, dtype {x.dtype}, device {x.device}): {err}. "
                         "Pass inputs of the shape, dtype and device the model expects."
                         ) from err
    finally:
        for h in handles:
            h.remove()
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


# --------------------------------------------------------------------------- blocking
def _slices(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


@dataclass
class _Plan:
    rows: int
    cache: bool


def _default_budget(device: torch.device) -> int:
    return int(0.5 * available_memory(device))


def _plan(n1: int, n2: int, *, feat1: float, feat2: float, pair: Callable[[int, int], float],
          out_bytes: float, budget: int, batch_size: int | None, what: str) -> _Plan:
    """Largest block of rows (≤ batch_size) whose features and workspace fit the budget.

    ``feat1``/``feat2``: bytes per row of the x1/x2-side features; ``pair(b1, b2)``: bytes
    of workspace to contract two blocks; ``out_bytes``: the result itself.
    """
    work = budget - out_bytes
    need_one = out_bytes + feat1 + feat2 + pair(1, 1)
    if work <= 0 or feat1 + feat2 + pair(1, 1) > work:
        raise MemoryBudgetError(
            f"{what} needs at least {format_bytes(need_one)} (result "
            f"{format_bytes(out_bytes)} + one block of one row "
            f"{format_bytes(need_one - out_bytes)})"
            f" but memory_budget is {format_bytes(budget)}; raise memory_budget, use fewer "
            "inputs or parameters (params=...), or another method.")
    hi = max(n1, n2) if batch_size is None else min(batch_size, max(n1, n2))
    lo = 1
    while lo < hi:  # binary search for the largest block that fits
        mid = (lo + hi + 1) // 2
        if mid * (feat1 + feat2) + pair(mid, mid) <= work:
            lo = mid
        else:
            hi = mid - 1
    rows = lo
    # Keeping every x2-side block avoids recomputing them once per x1 block.
    cache = n1 > rows and n2 * feat2 + rows * feat1 + pair(rows, rows) <= work
    return _Plan(rows, cache)


def _write(dst: torch.Tensor, block: torch.Tensor, s1: slice, s2: slice, mirror: bool,
           full: bool) -> None:
    dst[s1, s2] = block
    if mirror:
        dst[s2, s1] = block.permute(1, 0, 3, 2) if full else block.transpose(0, 1)


def _run_blocks(setup: _Setup, plan: _Plan, tail: tuple[int, ...],
                feat1: Callable[[torch.Tensor], Any], feat2: Callable[[torch.Tensor], Any],
                contract: Callable[[Any, Any], dict[str, torch.Tensor]], per_param: bool,
                same_features: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fill the (N1, N2, *tail) kernel block by block; mirror when ``x2`` is None."""
    x1, x2 = setup.x1, setup.x2
    symmetric = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if symmetric else x2.shape[0]
    xs2 = x1 if symmetric else x2
    full = len(tail) == 2
    opts = {"dtype": setup.dtype, "device": x1.device}
    total = torch.zeros((n1, n2, *tail), **opts)
    parts: dict[str, torch.Tensor] = {}
    blocks1 = _slices(n1, plan.rows)
    blocks2 = blocks1 if symmetric else _slices(n2, plan.rows)
    cache: dict[int, Any] = {}

    def side2(j: int) -> Any:
        if j in cache:
            return cache[j]
        value = feat2(xs2[blocks2[j]])
        if plan.cache:
            cache[j] = value
        return value

    for i, s1 in enumerate(blocks1):
        f1 = side2(i) if symmetric and same_features else feat1(x1[s1])
        for j, s2 in enumerate(blocks2):
            if symmetric and j < i:
                continue
            f2 = f1 if symmetric and same_features and i == j else side2(j)
            result = contract(f1, f2)
            mirror = symmetric and i != j
            if per_param:
                for name, block in result.items():
                    if name not in parts:
                        parts[name] = torch.zeros((n1, n2, *tail), **opts)
                    if symmetric and i == j:
                        _mirror_upper_(block)
                    _write(parts[name], block, s1, s2, mirror, full)
                block = sum(result.values())
            else:
                (block,) = result.values()
            if symmetric and i == j:
                # Whatever the contraction (ntk_vp's pushed-forward columns, diagonal
                # output's bmm), a diagonal block of Θ(x, x) is made symmetric by copying.
                _mirror_upper_(block)
            _write(total, block, s1, s2, mirror, full)
            del result, block, f2
        del f1
    return total, parts


_SYM_BLOCK = 256


def _mirrored(block: torch.Tensor) -> torch.Tensor:
    """The transpose of a symmetric kernel block ``(B1, B2, *tail)``: rows and columns swap,
    and so do the two output indices of a ``"full"`` tail ``(O, O)``."""
    return block.permute(1, 0, 3, 2) if block.ndim == 4 else block.transpose(0, 1)


def _mirror_upper_(block: torch.Tensor) -> torch.Tensor:
    """Make a square kernel block ``(B, B, *tail)`` exactly symmetric, in place, by copying
    its upper triangle onto the lower one (``block[b, a] = mirror(block[a, b])``).

    Symmetry cannot be left to the arithmetic: gemm does not promise bit-equal ``(i, j)`` and
    ``(j, i)`` entries (vector body vs scalar tail, FMA, kernel choice all differ by row), so
    the lower triangle is defined as a copy. ``tail`` is ``()``, ``(O,)`` (the o = o' entries,
    symmetric per o) or ``(O, O)`` (``"full"``: the transpose also swaps o and o', so the O×O
    matrices on the diagonal are symmetrised too). Cost: one copy of the lower triangle, in
    row strips of ``_SYM_BLOCK`` rows so the workspace is one diagonal tile.
    """
    n = block.shape[0]
    full = block.ndim == 4
    tile = _SYM_BLOCK
    for r0 in range(0, n, tile):
        r1 = min(r0 + tile, n)
        if r0:  # strictly below the diagonal tile: a plain mirrored copy (disjoint memory)
            block[r0:r1, :r0] = _mirrored(block[:r0, r0:r1])
        diag = block[r0:r1, r0:r1]
        idx = torch.arange(r1 - r0, device=block.device)
        if full:
            o = torch.arange(block.shape[2], device=block.device)
            keep = (idx[:, None] < idx[None, :])[:, :, None, None] | (
                (idx[:, None] == idx[None, :])[:, :, None, None] & (o[:, None] <= o[None, :]))
        else:
            keep = (idx[:, None] <= idx[None, :]).reshape(r1 - r0, r1 - r0,
                                                          *(1,) * (block.ndim - 2))
        # torch.where writes a fresh tensor, so reading diag and its transpose is safe.
        diag.copy_(torch.where(keep, diag, _mirrored(diag)))
    return block


def _matmul_t(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``u @ v.T``. When ``v is u`` the Gram is exactly symmetric by construction: only the
    blocks on and above the diagonal are multiplied (about 5/8 of the work for 4 blocks), the
    blocks below are their transposes, and each diagonal block's lower triangle is a copy of
    its upper one."""
    if v is not u:
        return u @ v.T
    n = u.shape[0]
    if n < 2 * _SYM_BLOCK:
        return _mirror_upper_(u @ u.T)
    out = torch.empty((n, n), dtype=u.dtype, device=u.device)
    blocks = _slices(n, max(_SYM_BLOCK, -(-n // 4)))
    for i, si in enumerate(blocks):
        for sj in blocks[i:]:
            block = u[si] @ u[sj].T
            if sj == si:
                _mirror_upper_(block)
            out[si, sj] = block
            if sj != si:
                out[sj, si] = block.T
    return out


def _gram(u: torch.Tensor, v: torch.Tensor, output: str) -> torch.Tensor:
    """Contract per-output features ``u: (B1, O, p)``, ``v: (B2, O, p)`` over ``p``.

    trace -> (B1, B2) mean over o of ⟨u_o, v_o⟩; diagonal -> (B1, B2, O); full ->
    (B1, B2, O, O). Passing the same tensor twice uses the symmetric product.
    """
    b1, o, p = u.shape
    b2 = v.shape[0]
    same = u is v
    if output == "trace":
        uu = u.reshape(b1, o * p)
        return _matmul_t(uu, uu if same else v.reshape(b2, o * p)).div_(o)
    if output == "diagonal":
        return torch.bmm(u.transpose(0, 1), v.permute(1, 2, 0)).permute(1, 2, 0)
    uu = u.reshape(b1 * o, p)
    return _matmul_t(uu, uu if same else v.reshape(b2 * o, p)).reshape(b1, o, b2, o
                                                                       ).permute(0, 2, 1, 3)


def _tail(setup: _Setup, output: str) -> tuple[int, ...]:
    o = setup.n_out
    return {"trace": (), "diagonal": (o,), "full": (o, o)}[output]


# --------------------------------------------------------------------------- jacobian
def _f_single(setup: _Setup) -> Callable:
    model, consts = setup.model, setup.consts

    def f(params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**consts, **params}, (x.unsqueeze(0),)).reshape(-1)

    return f


def _jacobian_rows(setup: _Setup) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    jac = vmap(jacrev(_f_single(setup)), in_dims=(None, 0))

    def rows(xb: torch.Tensor) -> dict[str, torch.Tensor]:
        j = jac(setup.params, xb)
        return {k: v.reshape(xb.shape[0], setup.n_out, -1) for k, v in j.items()}

    return rows


def _jacobian_feature_bytes(setup: _Setup) -> float:
    # J itself, the vmap/jacrev temporaries (about one more copy), and per-output
    # backward intermediates.
    return setup.itemsize * setup.n_out * (2.0 * setup.n_params + 2.0 * setup.act_numel)


def _by_jacobian(setup: _Setup, output: str, per_param: bool, budget: int,
                 batch_size: int | None) -> tuple[torch.Tensor, dict]:
    tail = _tail(setup, output)
    n1 = setup.x1.shape[0]
    n2 = n1 if setup.x2 is None else setup.x2.shape[0]
    width = math.prod(tail)
    feat = _jacobian_feature_bytes(setup)
    n_tensors = 1 + (len(setup.params) if per_param else 0)
    plan = _plan(n1, n2, feat1=feat, feat2=feat,
                 pair=lambda a, b: 3.0 * a * b * width * setup.itemsize * n_tensors,
                 out_bytes=n1 * n2 * width * setup.itemsize * n_tensors, budget=budget,
                 batch_size=batch_size, what="method='jacobian'")
    rows = _jacobian_rows(setup)

    def contract(j1: dict, j2: dict) -> dict[str, torch.Tensor]:
        if per_param:
            return {k: _gram(j1[k], j2[k], output) for k in setup.params}
        acc = None
        for k in setup.params:
            g = _gram(j1[k], j2[k], output)
            acc = g if acc is None else acc.add_(g)
        return {"total": acc}

    return _run_blocks(setup, plan, tail, rows, rows, contract, per_param, same_features=True)


# --------------------------------------------------------------------------- ntk_vp
def _by_ntk_vp(setup: _Setup, output: str, per_param: bool, budget: int,
               batch_size: int | None) -> tuple[torch.Tensor, dict]:
    tail = _tail(setup, output)
    o = setup.n_out
    n1 = setup.x1.shape[0]
    n2 = n1 if setup.x2 is None else setup.x2.shape[0]
    width = math.prod(tail)
    n_tensors = 1 + (len(setup.params) if per_param else 0)
    itemsize = setup.itemsize
    feat2 = _jacobian_feature_bytes(setup)
    # One jvp per x2-side direction (b2, o') through the whole x1 block: primal and tangent
    # activations for each of the b2·O directions.
    def jvp_bytes(a: int, b: int) -> float:
        return 3.0 * a * b * o * setup.act_numel * itemsize

    plan = _plan(n1, n2, feat1=setup.x1[:1].numel() * setup.x1.element_size(), feat2=feat2,
                 pair=lambda a, b: jvp_bytes(a, b) + 2.0 * a * b * o * o * itemsize * n_tensors,
                 out_bytes=n1 * n2 * width * itemsize * n_tensors, budget=budget,
                 batch_size=batch_size, what="method='ntk_vp'")
    model, consts, params = setup.model, setup.consts, setup.params
    rows = _jacobian_rows(setup)

    def push_forward(names: Sequence[str], x1b: torch.Tensor, tangents: dict) -> torch.Tensor:
        """J(x1b) · v for each direction v: (D, B1, O)."""
        fixed = {**consts, **{k: v for k, v in params.items() if k not in names}}
        primal = {k: params[k] for k in names}

        def f(p: dict) -> torch.Tensor:
            return functional_call(model, {**fixed, **p}, (x1b,)).reshape(x1b.shape[0], o)

        def one(t: dict) -> torch.Tensor:
            return jvp(f, (primal,), (t,))[1]

        return vmap(one)(tangents)

    def to_output(cols: torch.Tensor, b2: int) -> torch.Tensor:
        # cols[(b, o'), a, o] = Θ(x1_a, x2_b)_{o o'}
        full = cols.reshape(b2, o, -1, o).permute(2, 0, 3, 1)
        if output == "full":
            return full
        diag = torch.diagonal(full, dim1=2, dim2=3)
        return diag if output == "diagonal" else diag.mean(dim=-1)

    def contract(x1b: torch.Tensor, j2: dict) -> dict[str, torch.Tensor]:
        b2 = next(iter(j2.values())).shape[0]
        dirs = {k: v.reshape(b2 * o, *params[k].shape) for k, v in j2.items()}
        if per_param:
            return {k: to_output(push_forward([k], x1b, {k: dirs[k]}), b2) for k in params}
        return {"total": to_output(push_forward(list(params), x1b, dirs), b2)}

    return _run_blocks(setup, plan, tail, lambda x: x, rows, contract, per_param,
                       same_features=False)


# --------------------------------------------------------------------------- structured
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


def _by_structured(setup: _Setup, steps: list, output: str, per_param: bool, budget: int,
                   batch_size: int | None) -> tuple[torch.Tensor, dict]:
    tail = _tail(setup, output)
    o = setup.n_out
    n1 = setup.x1.shape[0]
    n2 = n1 if setup.x2 is None else setup.x2.shape[0]
    width = math.prod(tail)
    itemsize = setup.itemsize
    dense = [s for kind, s in steps if kind == "dense"]
    widths = sum(s.module.in_features + 2 * o * s.module.out_features for s in dense)
    feat = itemsize * (widths + 2 * setup.act_numel)
    n_tensors = 1 + (sum(bool(s.weight) + bool(s.bias) for s in dense) if per_param else 0)
    plan = _plan(n1, n2, feat1=feat, feat2=feat,
                 pair=lambda a, b: a * b * itemsize * (3 * width + 2) * n_tensors,
                 out_bytes=n1 * n2 * width * itemsize * n_tensors, budget=budget,
                 batch_size=batch_size, what="method='structured'")
    features = _structured_features(steps, o)
    expand = (slice(None), slice(None)) + (None,) * len(tail)

    def contract(f1: list, f2: list) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        acc = None
        for (s, a1, d1, c), (_, a2, d2, _) in zip(f1, f2):
            g_delta = _gram(d1, d2, output)
            g_a = _matmul_t(a1, a1 if a2 is a1 else a2)[expand] if s.weight else None
            w_coef, b_coef = (c * s.w_scale) ** 2, (c * s.b_scale) ** 2
            if per_param:
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
        return result if per_param else {"total": acc}

    return _run_blocks(setup, plan, tail, features, features, contract, per_param,
                       same_features=True)


# --------------------------------------------------------------------------- auto
def _costs(setup: _Setup, output: str, per_param: bool) -> dict[str, float]:
    """FLOP estimates of the two generic methods (see ``empirical_ntk``'s docstring)."""
    n1 = setup.x1.shape[0]
    n2 = n1 if setup.x2 is None else setup.x2.shape[0]
    o, p, f = setup.n_out, setup.n_params, setup.flops
    k = o * o if output == "full" else o
    jac = 3.0 * f * o * (n1 + n2) + 2.0 * n1 * n2 * p * k
    vp = 3.0 * f * o * n2 + 3.0 * f * o * n1 * n2 * (len(setup.params) if per_param else 1)
    return {"jacobian": jac, "ntk_vp": vp}


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
        method: ``"structured"`` (nn.Sequential of Linear/ntkit Dense and elementwise
            activations; no Jacobian), ``"jacobian"`` (per-example Jacobians via
            ``torch.func.vmap(jacrev)``, contracted per parameter), ``"ntk_vp"`` (Jacobian
            rows of an x2 block pushed forward through the x1 block with ``jvp``), or
            ``"auto"``. Cost model of ``"auto"``, with F the forward FLOPs of one example
            (counted by ``torch.utils.flop_counter``), P the number of selected parameters
            and k = O² for ``"full"``, O otherwise:

            * structured whenever the model qualifies: O(N1 N2 Σ_l (n_{l-1} + O n_l)) —
              cheaper than either generic method by about a factor P / Σ_l n_l;
            * otherwise ``jacobian`` ≈ 3 F O (N1 + N2) + 2 N1 N2 P k and
              ``ntk_vp`` ≈ 3 F O N2 + 3 F O N1 N2 (× the number of parameter tensors when
              ``per_param``); the smaller estimate wins. Weight sharing (convolutions)
              makes F ≫ P and favours ``jacobian``; ``output="full"`` with many outputs
              favours ``ntk_vp``.
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
    device = setup.x1.device
    if memory_budget is None:
        budget = _default_budget(device)
    else:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) \
                or not memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes; got "
                             f"{memory_budget!r}.")
        budget = int(memory_budget)

    steps, reason = [], None
    if method in ("auto", "structured"):
        steps, reason = structured_plan(model, setup.params, setup.x1.ndim)
    if method == "structured" and reason is not None:
        raise ValueError(f"method='structured' needs an nn.Sequential of nn.Linear/ntkit "
                         f"DenseModule layers and elementwise activations, but {reason}; use "
                         "method='jacobian' or 'ntk_vp' (or 'auto').")
    if method == "auto":
        if reason is None:
            method = "structured"
        else:
            costs = _costs(setup, output, per_param)
            method = min(costs, key=costs.get)

    try:
        if method == "structured":
            total, parts = _by_structured(setup, steps, output, per_param, budget, batch_size)
        elif method == "jacobian":
            total, parts = _by_jacobian(setup, output, per_param, budget, batch_size)
        else:
            total, parts = _by_ntk_vp(setup, output, per_param, budget, batch_size)
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


# --------------------------------------------------------------------------- NNGP
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
