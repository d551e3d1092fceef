"""Kernel principal components as functions: what :mod:`ntkit.spectral` offers beyond the
eigenpairs of a matrix (:mod:`.eigen`) and the Hermite expansion of an activation
(:mod:`.hermite`).

This module holds :func:`eigenfunctions` (the top-``k`` Nyström eigenfunctions of ``Π = K/N``
on a training set, for a network's analytic kernel or any ``kernel_fn``), the
:class:`Eigenfunctions` it returns (evaluable at new inputs), and :func:`project` (a function
on the training set split into its part along one eigenvector and the rest, JGH §V.3).

With ``Π = K/N`` on the training set and its eigenpairs ``(λ_i, v_i)`` (unit vectors), the
eigenfunctions of the integral operator ``f ↦ (1/N) Σ_j K(·, x_j) f(x_j)`` are

    f^(i)(x) = (1 / (N λ_i)) Σ_j K(x, x_j) f^(i)(x_j),    f^(i)(x_j) = sqrt(N) v_i(x_j),

normalised so that ``‖f^(i)‖²_{p_in} = (1/N) Σ_j f^(i)(x_j)² = 1`` (JGH's norm over the
empirical input distribution). On the training inputs they reproduce the eigenvectors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._validation import UNSET, as_inputs, as_tensor, check_get_renamed, check_positive_int
from .eigen import Eigen, eigen


def _kernel_callable(net_or_kernel_fn: Any, get: str) -> Callable:
    from ..layers.base import Layer

    if isinstance(net_or_kernel_fn, Layer):
        net = net_or_kernel_fn
        return lambda a, b: net.kernel(a, b, get=get)[get]
    if callable(net_or_kernel_fn):
        return net_or_kernel_fn
    raise ValueError("net_or_kernel_fn must be an ntkit network or a callable "
                     f"kernel_fn(x1, x2) -> (N1, N2) tensor; got {type(net_or_kernel_fn)}.")


@dataclass
class Eigenfunctions:
    """The top-k Nyström eigenfunctions of Π on a training set.

    ``self(x)`` evaluates all of them, ``(M, k)``; ``self[i](x)`` evaluates one, ``(M,)``.
    ``values`` are the eigenvalues of Π (descending); ``train_values`` is ``(N, k)``,
    ``sqrt(N)·v_i`` on the training inputs.
    """

    kernel_fn: Callable
    x_train: torch.Tensor
    values: torch.Tensor
    train_values: torch.Tensor
    centered: bool
    _column_means: torch.Tensor | None = None
    _grand_mean: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __call__(self, x: Any) -> torch.Tensor:
        x = as_inputs(x, "x", dtype=self.x_train.dtype, device=self.x_train.device)
        if x.shape[1] != self.x_train.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features but the training inputs have "
                             f"{self.x_train.shape[1]}.")
        k = torch.as_tensor(self.kernel_fn(x, self.x_train), dtype=self.x_train.dtype)
        if self.centered:
            k = (k - k.mean(dim=1, keepdim=True) - self._column_means[None, :]
                 + self._grand_mean)
        n = self.x_train.shape[0]
        return k @ self.train_values / (n * self.values)

    def __getitem__(self, i: int) -> Callable[[Any], torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"eigenfunction {i} out of range (k={len(self)}).")
        return lambda x: self(x)[:, i]


def eigenfunctions(net_or_kernel_fn: Any, x_train: Any, k: int, *, get: str = "ntk",
                   centered: bool = False, method: str = "auto",
                   kernel: str = UNSET) -> Eigenfunctions:
    """The top-``k`` eigenfunctions of Π = K/N on ``x_train`` (JGH §IV.2), by Nyström.

    Args:
        net_or_kernel_fn: an ntkit network (its analytic ``kernel`` is used) or a callable
            ``kernel_fn(x1, x2) -> (N1, N2)``.
        x_train: ``(N, d)`` training inputs.
        k: number of eigenfunctions.
        get: ``"ntk"`` or ``"nngp"`` for a network (as in ``net.kernel(..., get=)``).
        centered: if True, use the centred kernel ``H K H`` (H = I − 11ᵀ/N), i.e. kernel PCA
            of centred features; JGH's are non-centred (the default).
        method: passed to :func:`ntkit.spectral.eigen`.
        kernel: deprecated former name of ``get`` (a ``DeprecationWarning``).
    """
    get = check_get_renamed(get, kernel, old="kernel", where="ntkit.spectral.eigenfunctions")
    kernel_fn = _kernel_callable(net_or_kernel_fn, get)
    x = as_inputs(x_train, "x_train")
    k = check_positive_int(k, "k")
    K = torch.as_tensor(kernel_fn(x, x), dtype=x.dtype)
    col_means = grand = None
    if centered:
        col_means = K.mean(dim=0)
        grand = K.mean()
        K = K - K.mean(dim=1, keepdim=True) - col_means[None, :] + grand
        K = 0.5 * (K + K.T)
    eig: Eigen = eigen(K, k, normalize="jgh", method=method)
    if bool((eig.values <= 0).any()):
        raise ValueError(f"Eigenvalues {eig.values.tolist()} include non-positive ones; the "
                         "Nyström extension divides by them. Ask for fewer eigenfunctions.")
    n = x.shape[0]
    return Eigenfunctions(kernel_fn=kernel_fn, x_train=x, values=eig.values,
                          train_values=eig.vectors * n ** 0.5, centered=centered,
                          _column_means=col_means, _grand_mean=grand)


def project(values_on_train: Any, eigvecs: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a function on the training set into its part along eigenvector ``i`` and the rest.

    Args:
        values_on_train: ``(N,)`` or ``(N, O)`` function values on the training inputs.
        eigvecs: ``(N, k)`` orthonormal eigenvectors (``Eigen.vectors``), or an
            :class:`Eigenfunctions` (its normalised training values are used).
        i: the eigenvector index.
    Returns:
        ``(along, rest)`` with the shape of ``values_on_train``: ``along = v_i v_iᵀ f`` and
        ``rest = f − along`` (JGH §V.3's ``g_t`` and ``h_t``). Their norms in JGH's
        ``‖·‖_{p_in}`` are ``sqrt(mean(along²))`` and ``sqrt(mean(rest²))``.
    """
    if isinstance(eigvecs, Eigenfunctions):
        n = eigvecs.train_values.shape[0]
        vecs = eigvecs.train_values / n ** 0.5
    else:
        vecs = as_tensor(eigvecs, "eigvecs", dtype=torch.float64)
    f = as_tensor(values_on_train, "values_on_train", dtype=vecs.dtype, device=vecs.device)
    if vecs.ndim != 2:
        raise ValueError(f"eigvecs must be (N, k); got shape {tuple(vecs.shape)}.")
    if f.shape[0] != vecs.shape[0]:
        raise ValueError(f"values_on_train has {f.shape[0]} rows but eigvecs has "
                         f"{vecs.shape[0]}.")
    if not 0 <= i < vecs.shape[1]:
        raise ValueError(f"i={i} is out of range for {vecs.shape[1]} eigenvectors.")
    v = vecs[:, i]
    coef = v @ f  # scalar or (O,)
    along = v[:, None] * coef[None] if f.ndim == 2 else v * coef
    return along, f - along
