"""The two general methods, for any module: ``jacobian`` and ``ntk_vp``.

Both start from per-example Jacobian rows ``J(x) ∈ R^{O×P}`` by ``torch.func.vmap(jacrev)``.
``jacobian`` contracts the rows of both sides block by block (one matrix product per
parameter tensor); ``ntk_vp`` pushes an x2 block's rows forward through the x1 block with
``torch.func.jvp``, so only one side's Jacobian is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call, jacrev, jvp, vmap

from .auto import jacobian_cost, ntk_vp_cost
from .blocks import Request, _plan_kernel, _run_blocks, _tail
from .gram import _gram
from .method import Method
from .setup import _Setup


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


# --------------------------------------------------------------------------- jacobian
def _by_jacobian(setup: _Setup, req: Request) -> tuple[torch.Tensor, dict]:
    output = req.output
    width = math.prod(_tail(setup, output))
    feat = _jacobian_feature_bytes(setup)
    n_tensors = req.n_tensors(len(setup.params))
    plan = _plan_kernel(setup, req, feat1=feat, feat2=feat,
                        pair=lambda a, b: 3.0 * a * b * width * setup.itemsize * n_tensors,
                        n_tensors=n_tensors, what="method='jacobian'")
    rows = _jacobian_rows(setup)

    def contract(j1: dict, j2: dict) -> dict[str, torch.Tensor]:
        if req.per_param:
            return {k: _gram(j1[k], j2[k], output) for k in setup.params}
        acc = None
        for k in setup.params:
            g = _gram(j1[k], j2[k], output)
            acc = g if acc is None else acc.add_(g)
        return {"total": acc}

    return _run_blocks(setup, req, plan, rows, rows, contract, same_features=True)


# --------------------------------------------------------------------------- ntk_vp
def _by_ntk_vp(setup: _Setup, req: Request) -> tuple[torch.Tensor, dict]:
    output = req.output
    o = setup.n_out
    n_tensors = req.n_tensors(len(setup.params))
    itemsize = setup.itemsize
    feat2 = _jacobian_feature_bytes(setup)
    # One jvp per x2-side direction (b2, o') through the whole x1 block: primal and tangent
    # activations for each of the b2·O directions.
    def jvp_bytes(a: int, b: int) -> float:
        return 3.0 * a * b * o * setup.act_numel * itemsize

    plan = _plan_kernel(setup, req, feat1=setup.x1[:1].numel() * setup.x1.element_size(),
                        feat2=feat2,
                        pair=lambda a, b: jvp_bytes(a, b) + 2.0 * a * b * o * o * itemsize
                        * n_tensors,
                        n_tensors=n_tensors, what="method='ntk_vp'")
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
        if req.per_param:
            return {k: to_output(push_forward([k], x1b, {k: dirs[k]}), b2) for k in params}
        return {"total": to_output(push_forward(list(params), x1b, dirs), b2)}

    return _run_blocks(setup, req, plan, lambda x: x, rows, contract, same_features=False)


JACOBIAN = Method(compute=_by_jacobian, cost=jacobian_cost)
NTK_VP = Method(compute=_by_ntk_vp, cost=ntk_vp_cost)
