"""Kernels past memory and past one machine.

* :func:`kernel_matrix` — tiled kernels, in memory or into a resumable on-disk zarr array;
* :func:`solve` — kernel regression by Cholesky or by matrix-free conjugate gradients with a
  Nyström preconditioner (:class:`KernelOperator`, :class:`NystromPreconditioner`);
* :func:`dask_kernel` — the kernel as a ``dask.array`` of tiles, for a local or distributed
  Dask cluster.
"""

from .distributed import dask_kernel
from .solvers import (
                      DenseOperator,
                      KernelOperator,
                      NystromPreconditioner,
                      SolveResult,
                      conjugate_gradient,
                      solve,
)
from .tiled import kernel_matrix

__all__ = ["DenseOperator", "KernelOperator", "NystromPreconditioner", "SolveResult",
           "conjugate_gradient", "dask_kernel", "kernel_matrix", "solve"]
