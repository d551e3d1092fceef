"""``method="auto"``: the cost model and the rule that picks a method from the table.

With F the forward FLOPs of one example (counted by ``torch.utils.flop_counter`` in the
set-up probe), P the number of selected parameters and k = O² for ``"full"``, O otherwise:

* ``jacobian`` ≈ 3 F O (N1 + N2) + 2 N1 N2 P k;
* ``ntk_vp`` ≈ 3 F O N2 + 3 F O N1 N2 (× the number of parameter tensors when
  ``per_param``);
* ``structured`` (only where the model qualifies) ≈ 3 F O (N1 + N2) + 2 N1 N2 (Σ_dense
  (n_in + k n_out) + k Σ_conv,BN P_l): the same sweep as the Jacobian rows, but a Dense
  layer costs n_in + k n_out per pair instead of k n_in n_out.

The smallest estimate wins (the first in table order on a tie). A specialised method
without a cost estimate is taken whenever it applies.
"""

from __future__ import annotations

from collections.abc import Mapping

from .method import Method
from .setup import _Setup


def jacobian_cost(setup: _Setup, output: str, per_param: bool) -> float:
    """FLOPs of ``jacobian``: per-example Jacobians, then one Gram per block pair."""
    o, p, f = setup.n_out, setup.n_params, setup.flops
    k = o * o if output == "full" else o
    return 3.0 * f * o * (setup.n1 + setup.n2) + 2.0 * setup.n1 * setup.n2 * p * k


def ntk_vp_cost(setup: _Setup, output: str, per_param: bool) -> float:
    """FLOPs of ``ntk_vp``: x2-side Jacobians, then one jvp per (x1 row, x2 direction)."""
    o, f = setup.n_out, setup.flops
    return 3.0 * f * o * setup.n2 + 3.0 * f * o * setup.n1 * setup.n2 * (
        len(setup.params) if per_param else 1)


def choose(table: Mapping[str, Method], setup: _Setup, output: str, per_param: bool) -> str:
    """The name of the method ``"auto"`` uses for this call."""
    costs: dict[str, float] = {}
    for name, method in table.items():
        if method.unsupported is not None and method.unsupported(setup) is not None:
            continue
        if method.cost is None:  # specialised, applicable and without an estimate: take it
            return name
        costs[name] = method.cost(setup, output, per_param)
    return min(costs, key=costs.get)
