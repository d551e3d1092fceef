"""Fused duals for large tiles: one compiled loop instead of a dozen passes over memory.

The ReLU family's dual is a handful of flops per entry, but evaluated op by op in eager
PyTorch it makes about a dozen passes over the tile (product, square root, division, clamp,
arccos, sine, ...), each a full trip through memory. For the big tiles of convolutional
kernels (per-pixel and pixel-pair covariances: millions of entries) that is most of the
time. ``torch.compile`` fuses the whole dual into one vectorised loop (measured 4x faster
on a 2M-entry float64 tile on one CPU core).

Policy (environment variable ``NTKIT_FUSE``): ``"auto"`` (default) uses the fused dual
inside convolutional evaluations big enough to repay the one-off compilation (a few
seconds per graph; the evaluator says so with :func:`allowed`: at least :data:`MIN_WORK`
kernel entries in all,
pairs × entries per pair, e.g. 420×420 Flatten-read 28×28 images or 83×83 pooled 14×14
ones) and for tiles of at least :data:`THRESHOLD` entries that do not require grad, so
that small kernels (and the test suite) never compile; ``"1"`` for every tile that does
not require grad; ``"0"`` never. If
compilation fails (no C++ compiler, no Triton on a GPU), ntkit warns once and stays with
the eager dual. Both compute the same function: the fused one writes ``sin θ`` as
``sqrt((1 − ρ)(1 + ρ))`` (no sine), equal to rounding, from the same rounded ``ρ`` as
``θ``, so entries whose ``ρ`` rounds to ±1 stay exact in both terms.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings

import torch

#: Tiles of at least this many entries use the fused dual under ``NTKIT_FUSE=auto``...
THRESHOLD = 1 << 16
#: ... in evaluations of at least this many kernel entries (pairs × entries per pair): the
#: eager dual would take about as long as compiling (seconds) well below it.
MIN_WORK = 1 << 27

_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("ntkit_fuse", default=False)


@contextlib.contextmanager
def allowed(work: int):
    """Within this block, ``NTKIT_FUSE=auto`` fuses if ``work`` (the evaluation's kernel
    entries, pairs × entries per pair) is at least :data:`MIN_WORK`."""
    token = _ALLOWED.set(work >= MIN_WORK)
    try:
        yield
    finally:
        _ALLOWED.reset(token)

_compiled: dict[str, object] = {}
_failed = False


def _abrelu_dual(cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor,
                 half_sum: float, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.sqrt(var1 * var2).clamp(min=torch.finfo(cov.dtype).tiny)
    rho = (cov / norm).clamp(-1.0, 1.0)
    theta = torch.acos(rho)
    dot = half_sum - factor * theta
    # sin θ from the same rounded ρ as θ (not from norm² − cov²): where ρ rounds to ±1 both
    # terms vanish together, as in the eager dual.
    sine = torch.sqrt(((1.0 - rho) * (1.0 + rho)).clamp(min=0.0))
    return dot * cov + factor * (sine * norm), dot


def _abrelu_dual_ntk(cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor,
                     ntk: torch.Tensor, half_sum: float, factor: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nngp, ntk · dot)``: the activation's whole kernel map of a tile in one loop."""
    nngp, dot = _abrelu_dual(cov, var1, var2, half_sum, factor)
    return nngp, ntk * dot


def _abrelu_dual_cov_ntk(cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor,
                         half_sum: float, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nngp, cov · dot)``: the map when the NTK is the covariance itself (after a first
    layer in the NTK parameterization), a separate graph rather than an aliasing guard."""
    nngp, dot = _abrelu_dual(cov, var1, var2, half_sum, factor)
    return nngp, cov * dot


def _general_shapes():
    """Compile for independent sizes: by default equal sizes at the first call (a square
    tile) share one symbol, and every rectangular edge tile would recompile (seconds each).
    Sizes 1 still specialise (broadcasting), once per pattern."""
    try:
        import torch.fx.experimental._config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):  # a torch without the option: duck sizing
        return contextlib.nullcontext()


def _wanted(cov: torch.Tensor) -> bool:
    mode = os.environ.get("NTKIT_FUSE", "auto").strip().lower()
    if _failed or mode in ("0", "off", "false", "no"):
        return False
    if mode in ("1", "on", "true", "yes"):
        return True
    return _ALLOWED.get() and cov.numel() >= THRESHOLD


def abrelu_dual(cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor, half_sum: float,
                factor: float, ntk: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(nngp, dot)`` of the ReLU family (``half_sum = (a² + b²)/2``, ``factor = (a −
    b)²/(2π)``) from the fused loop, or with ``ntk`` given ``(nngp, ntk · dot)``; ``None``
    when the eager dual should be used (small tile, fusion off, compilation unavailable)."""
    global _failed
    if not _wanted(cov):
        return None
    # Three graphs: no NTK, an NTK tensor, and the NTK being ``cov`` itself (torch.compile
    # would otherwise guard on the aliasing and recompile when it changes).
    kind = "none" if ntk is None else "cov" if ntk is cov else "ntk"
    try:
        if kind not in _compiled:
            body = {"none": _abrelu_dual, "cov": _abrelu_dual_cov_ntk,
                    "ntk": _abrelu_dual_ntk}[kind]
            _compiled[kind] = torch.compile(body, dynamic=True)
        fn = _compiled[kind]
        with _general_shapes():
            if kind == "ntk":
                return fn(cov, var1, var2, ntk, half_sum, factor)
            return fn(cov, var1, var2, half_sum, factor)
    except Exception as error:  # noqa: BLE001 - any compiler failure means: stay eager
        _failed = True
        warnings.warn(f"ntkit: the fused (torch.compile) ReLU dual is unavailable ({error!r:.200}); "
                      "using the eager dual. Set NTKIT_FUSE=0 to silence this.",
                      RuntimeWarning, stacklevel=3)
        return None
