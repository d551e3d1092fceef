"""Gram products of per-example features, exactly symmetric when both sides are the same.

Every method ends in these contractions (Jacobian rows, backward signals, layer inputs, or a
layer's features for the NNGP). Symmetry of ``Θ(x, x)`` is made by copying, never left to
the arithmetic.
"""

from __future__ import annotations

import torch

_SYM_BLOCK = 256


def _slices(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


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
