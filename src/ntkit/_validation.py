"""Input checks and conventions shared by every public entry point.

Bad input must produce a clear ``ValueError`` that names the argument and, where it can,
the offending rows; never a silent NaN or a wrong answer.

A public function validates its arguments here once and passes the validated tensors to
private code, which does not check them again. Besides the array checks this module holds
the conventions the whole library shares, so each has one definition:

* which kernel: a keyword ``get`` naming ``"nngp"`` or ``"ntk"`` (:func:`check_get`, as in
  ``net.kernel(..., get=...)``); :func:`renamed_keyword` keeps a former name working for a
  release, with a ``DeprecationWarning``;
* a square train kernel: finite and symmetric to one tolerance (:func:`symmetry_tolerance`,
  :func:`as_square_kernel`), then made exactly symmetric;
* the ridge: ``λ = diag_reg · mean(diag K)``, or ``λ = diag_reg`` with an absolute scale
  (:func:`resolve_ridge`, :func:`regularize`), as neural-tangents;
* a learning rate: a finite number > 0 (:func:`check_learning_rate`).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch

Tensorish = Any  # torch.Tensor | numpy.ndarray | nested sequences


def resolve_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """Map ``None``/strings/numpy dtypes to a floating torch dtype (float64 by default)."""
    if dtype is None:
        return torch.float64
    if isinstance(dtype, str):
        table = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32,
                 "float": torch.float32}
        if dtype not in table:
            raise ValueError(f"{name}={dtype!r} is not supported; use 'float64' or 'float32'.")
        return table[dtype]
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"{name}={dtype} is not supported; use torch.float64 or "
                             "torch.float32.")
        return dtype
    try:
        return resolve_dtype(np.dtype(dtype).name, name)
    except TypeError as err:
        raise ValueError(f"{name}={dtype!r} is not a floating dtype.") from err


def _describe_rows(rows: torch.Tensor, limit: int = 8) -> str:
    rows = rows.tolist()
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", ... ({len(rows)} rows in all)" if len(rows) > limit else "")


def as_tensor(x: Tensorish, name: str, *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Convert ``x`` to a floating tensor without changing its shape; reject non-numeric data."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as err:  # ragged lists and the like
            raise ValueError(f"{name} could not be converted to an array: {err}") from err
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise ValueError(f"{name} has dtype {arr.dtype}; expected real numbers.")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise ValueError(f"{name} is complex ({t.dtype}); kernels are defined for real inputs.")
    if t.dtype == torch.bool:
        raise ValueError(f"{name} has dtype bool; expected real numbers (cast it to float first).")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32,
                                                 torch.int64, torch.uint8)):
        raise ValueError(f"{name} has unsupported dtype {t.dtype}; expected a real floating dtype.")
    target = dtype if dtype is not None else (t.dtype if t.is_floating_point() else torch.float64)
    return t.to(device=device if device is not None else t.device, dtype=target)


def finite_max_abs(t: torch.Tensor) -> float | None:
    """``max |t|`` if every entry is finite, else ``None``. One pass and no mask: min and max
    propagate NaN, and are infinite iff some entry is."""
    if t.numel() == 0:
        return 0.0
    if not t.is_floating_point():
        return float(t.to(torch.float64).abs().max())
    # Detached: a float of a tensor that requires grad warns, and only the value matters.
    lo, hi = torch.aminmax(t.detach())
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return max(-float(lo), float(hi))
    return None


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise naming the rows of ``t`` that hold NaN or infinity."""
    if not t.is_floating_point() or finite_max_abs(t) is not None:
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten()
        raise ValueError(f"{name} contains NaN or infinite values in rows [{_describe_rows(bad)}]; "
                         "remove or impute them before computing kernels.")


def as_inputs(x: Tensorish, name: str, *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, images: bool = False) -> torch.Tensor:
    """Validate a batch of inputs: a finite, non-empty ``(N, d)`` array, or with
    ``images=True`` also images ``(N, C, H, W)`` and sequences ``(N, C, L)``."""
    expected = "(N, d), (N, C, L) or (N, C, H, W)" if images else "(N, d)"
    if x is None:
        raise ValueError(f"{name} is None; expected an array of shape {expected}.")
    t = as_tensor(x, name, dtype=dtype, device=device)
    if t.ndim not in ((2, 3, 4) if images else (2,)):
        hint = " (a single example needs shape (1, d))" if t.ndim == 1 else ""
        if images and t.ndim == 5:
            hint = " (3-d volumes are not supported)"
        raise ValueError(f"{name} must have shape {expected}; got shape {tuple(t.shape)}{hint}.")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); need at least one row and "
                         "one feature.")
    check_finite(t, name)
    return t


def as_input_pair(x1: Tensorish, x2: Tensorish | None, *, dtype: torch.dtype | None = None,
                  names: tuple[str, str] = ("x1", "x2")
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``x1`` and (optionally) ``x2``; ``x2`` follows ``x1``'s device.

    Rows are flat features ``(N, d)``, images ``(N, C, H, W)`` or sequences ``(N, C, L)``;
    ``x2`` must have ``x1``'s shape per row. ``names`` are the argument names used in
    error messages (e.g. ``("X1", "X2")``).
    """
    name1, name2 = names
    t1 = as_inputs(x1, name1, dtype=dtype, images=True)
    if x2 is None:
        return t1, None
    t2 = as_inputs(x2, name2, dtype=dtype, device=t1.device, images=True)
    if t1.ndim == 2 and t2.ndim == 2 and t2.shape[1] != t1.shape[1]:
        raise ValueError(f"{name1} has {t1.shape[1]} features but {name2} has {t2.shape[1]}; "
                         "both must have the same feature dimension.")
    if t2.shape[1:] != t1.shape[1:]:
        what = "(C, H, W)" if t1.ndim == 4 else "(C, L)" if t1.ndim == 3 else "features"
        raise ValueError(f"{name1} has rows of shape {tuple(t1.shape[1:])} but {name2} has "
                         f"{tuple(t2.shape[1:])}; both must have the same {what}.")
    return t1, t2


def as_targets(y: Tensorish, name: str, n: int, *, dtype: torch.dtype,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, bool]:
    """Finite ``(N, O)`` regression targets for ``n`` training points, and whether they were
    a 1-D ``(N,)`` vector (one output; callers squeeze their results back)."""
    if y is None:
        raise ValueError(f"{name} is None; expected targets of shape (N, n_out) or (N,).")
    t = as_tensor(y, name, dtype=dtype, device=device)
    squeeze = t.ndim == 1
    if squeeze:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n}, n_out) or ({n},) to match the "
                         f"{n} training points of the kernel; got {tuple(t.shape)}.")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no output columns.")
    check_finite(t, name)
    return t, squeeze


def check_nonnegative(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a real number; got {value!r}.") from err
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0; got {value!r}.")
    return v


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}.")
    return int(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can be allocated on ``device`` now (free GPU memory, or MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_scale(value: Any, name: str) -> float | torch.Tensor:
    """A finite, non-negative scale such as ``W_std``: a float, or a 0-d floating tensor.

    A tensor is kept as it is (not converted to a float), so that a kernel computed with it
    can be differentiated with respect to it (kernel learning); its value is checked now.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise ValueError(f"{name} must be a real number or a 0-d floating tensor; got a "
                             f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}.")
        check_nonnegative(float(value.detach()), name)
        return value
    return check_nonnegative(value, name)


# ------------------------------------------------------------------------ which kernel
KERNEL_NAMES = ("ntk", "nngp")


def check_get(get: Any, name: str = "get") -> str:
    """One kernel name, ``"ntk"`` or ``"nngp"``: the library's ``get`` keyword."""
    return check_choice(get, name, KERNEL_NAMES)


UNSET: Any = object()


def renamed_keyword(new_value: Any, old_value: Any, *, new: str, old: str, where: str,
                    default: Any, unset: Any = UNSET, stacklevel: int = 3) -> Any:
    """The value of a keyword renamed from ``old`` to ``new`` (kept for one release).

    ``old_value`` is ``unset`` when the caller did not pass the old keyword; otherwise a
    ``DeprecationWarning`` is issued and its value is used, unless ``new`` was passed too
    (``new_value`` differs from ``default``), which is ambiguous and raises.
    """
    if old_value is unset:
        return new_value
    if new_value != default and new_value != old_value:
        raise ValueError(f"{where}: pass {new}= only ({old}= is its former name); got "
                         f"{new}={new_value!r} and {old}={old_value!r}.")
    warnings.warn(f"{where}: the keyword {old}= is deprecated and will be removed in the next "
                  f"release; use {new}={old_value!r}.", DeprecationWarning,
                  stacklevel=stacklevel)
    return old_value


def check_get_renamed(get: Any, old_value: Any, *, old: str, where: str,
                      default: str = "ntk") -> str:
    """:func:`check_get` for a public function whose kernel keyword was formerly ``old``:
    the value of ``get=``, or of ``old=`` with a ``DeprecationWarning`` (pointing at the
    public function's caller); an invalid value is named by the keyword that was passed."""
    value = renamed_keyword(get, old_value, new="get", old=old, where=where, default=default,
                            stacklevel=4)
    return check_get(value, "get" if old_value is UNSET else old)


# ------------------------------------------------------------------------ square kernels
def check_finite_kernel(t: torch.Tensor, name: str) -> float:
    """Raise if ``t`` holds NaN or inf; return ``max |t|``."""
    scale = finite_max_abs(t)
    if scale is not None:
        return scale
    bad = (~torch.isfinite(t)).sum().item()
    raise ValueError(f"{name} has {bad} NaN or infinite entries; kernels must be finite "
                     "(check the inputs and the kernel computation).")


def symmetry_tolerance(scale: float, dtype: torch.dtype) -> float:
    """Largest ``max |K − Kᵀ|`` accepted for a train kernel whose ``max |K|`` is ``scale``;
    the one tolerance of every square-kernel check in ntkit (predict, spectral, solvers).

    An accepted ``K`` is symmetrised (:func:`as_square_kernel`), so its asymmetry costs no
    accuracy: the check exists to catch a wrong matrix (say a square test-train kernel),
    whose asymmetry is of the order of ``max |K|``. A kernel whose entries ``(i, j)`` and
    ``(j, i)`` were summed in different orders over ``P`` terms (features, parameters) is
    asymmetric by about ``sqrt(P) · eps · max |K|``; ``sqrt(eps) · max |K|`` lies above that
    for any ``P < 1 / eps`` (8e6 terms in float32, 4e15 in float64) and orders of magnitude
    below a wrong matrix. In float64 it is 1.5e-8 relative; a fixed 1e-8 would refuse
    float32 kernels whose only asymmetry is rounding, and a fixed 1e-10 float64 kernels
    summed over more than ~1e12 terms.
    """
    return max(scale, 1e-300) * math.sqrt(torch.finfo(dtype).eps)


def as_square_kernel(k: Tensorish, name: str, *, dtype: torch.dtype | None = None
                     ) -> torch.Tensor:
    """An ``(N, N)`` kernel matrix as a floating tensor (``dtype``, else its own floating
    dtype, else float64): non-empty, finite, and symmetric to :func:`symmetry_tolerance`
    of the precision it was computed in (its own dtype); then made exactly symmetric, so
    that every use (a Cholesky factor reads one triangle, an eigensolver may read either)
    sees the same matrix."""
    if k is None:
        raise ValueError(f"{name} is None; expected an (N, N) kernel matrix.")
    t = as_tensor(k, name)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{name} must be a square (N, N) per-output kernel; got shape "
                         f"{tuple(t.shape)}. (For n_out outputs pass the per-output kernel K, "
                         "not K ⊗ I.)")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty; need at least one training point.")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    scale = check_finite_kernel(t, name)
    asym = float((t - t.T).abs_().max())
    if asym > symmetry_tolerance(scale, t.dtype):
        raise ValueError(f"{name} is not symmetric (max |K − Kᵀ| = {asym:.3e}, max |K| = "
                         f"{scale:.3e}); a train-train kernel must be symmetric.")
    if asym > 0:
        t = 0.5 * (t + t.T)
    return t if dtype is None else t.to(dtype)


# ------------------------------------------------------------------- ridge, learning rate
def resolve_ridge(diag_reg: float, diag: torch.Tensor | None, absolute: bool) -> float:
    """The ridge rule (neural-tangents'): the absolute ``λ = diag_reg · mean(diag K)``, or
    ``λ = diag_reg`` when ``absolute`` (``diag`` is then not read, and may be ``None``)."""
    diag_reg = check_nonnegative(diag_reg, "diag_reg")
    if absolute or diag_reg == 0:
        return diag_reg
    return diag_reg * float(diag.mean())


def regularize(k: torch.Tensor, diag_reg: float, absolute: bool) -> torch.Tensor:
    """``K + λ I`` with ``λ`` from :func:`resolve_ridge`; ``K`` itself when ``λ = 0``."""
    ridge = resolve_ridge(diag_reg, k.diagonal(), absolute)
    if ridge == 0:
        return k
    out = k.clone()  # the ridge on the diagonal only, without an (N, N) identity
    out.diagonal().add_(ridge)
    return out


def check_learning_rate(learning_rate: Any) -> float:
    """``learning_rate`` as a finite float > 0."""
    lr = check_nonnegative(learning_rate, "learning_rate")
    if lr == 0:
        raise ValueError("learning_rate must be > 0.")
    return lr
