"""Kernels past memory and past one machine.

* :func:`kernel_matrix` — tiled kernels, in memory or into a resumable on-disk zarr array;
* :func:`solve` — kernel regression along the path a cost model picks (:func:`plan_solve`):
  Cholesky with ``K`` in RAM, CG over a float32 ``K`` in RAM, CG streaming an out-of-core
  zarr ``K``, or matrix-free CG (:class:`KernelOperator`, :class:`NystromPreconditioner`);
  :func:`predict` — ``k(X_test, X) α`` in blocks;
* :func:`dask_kernel` — the kernel as a ``dask.array`` of tiles, for a local or distributed
  Dask cluster.
"""

import torch

from .distributed import dask_kernel
from .paths import predict as _predict
from .plan import SolvePlan, plan_solve
from .solvers import (
    DenseOperator,
    KernelOperator,
    NystromPreconditioner,
    SolveResult,
    conjugate_gradient,
    solve,
)
from .tiled import kernel_matrix


def predict(net, X, X_test, coef, *, get: str = "ntk", block_rows: int = 2048):
    """Predictions ``k(X_test, X) @ coef`` of a solved system, ``(n_test, k)`` float64 (or
    ``(n_test,)`` for a 1-D ``coef``), computed in blocks of ``block_rows`` test rows with
    float64 kernel entries; the test-train kernel is never held whole."""
    from .._validation import as_input_pair, check_get, check_positive_int
    from .tiled import check_net

    t, tt = as_input_pair(X, X_test, dtype=torch.float64, names=("X", "X_test"))
    c = torch.as_tensor(coef, dtype=torch.float64, device=t.device)
    vec = c.ndim == 1
    out = _predict(check_net(net), t, tt, c.reshape(c.shape[0], -1), get=check_get(get),
                   block_rows=check_positive_int(block_rows, "block_rows"))
    return out[:, 0] if vec else out

__all__ = ["DenseOperator", "KernelOperator", "NystromPreconditioner", "SolvePlan",
           "SolveResult", "conjugate_gradient", "dask_kernel", "kernel_matrix", "plan_solve",
           "predict", "solve"]
