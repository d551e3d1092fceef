"""The empirical (finite-width) NTK and NNGP of any ``torch.nn.Module``.

For a network ``f(θ, x) ∈ R^O`` the empirical NTK is

    Θ(x, x')_{o o'} = Σ_p ∂f_o(x)/∂θ_p · ∂f_{o'}(x')/∂θ_p        (JGH §II.1)

Three ways to evaluate it, all memory-bounded and blocked over the rows of ``x1`` and
``x2`` (any sizes, no divisibility constraints):

* ``"structured"`` — for ``nn.Sequential`` stacks whose differentiated parameters sit in
  ``nn.Linear`` / ntkit ``DenseModule``, ``nn.Conv1d`` / ``nn.Conv2d`` (ntkit's conv modules
  included) and eval-mode BatchNorm layers; every other module (activations, pooling,
  Flatten, padding, ...) must be parameter-free and is differentiated by ``vjp``. Writing
  ``z_l = s_w W_l a_l + s_b b_l`` for Dense layer ``l`` (``a_l`` its input, ``s_w``, ``s_b``
  its weight and bias scales) and ``δ_l(x) ∈ R^{O×n_l}`` for the backward signal
  ``∂f/∂z_l``, the gradients are ``∂f_o/∂W_l = s_w δ_{l,o} ⊗ a_l`` and
  ``∂f_o/∂b_l = s_b δ_{l,o}``, hence

      Θ(x, x')_{o o'} = Σ_l ⟨δ_{l,o}(x), δ_{l,o'}(x')⟩ · (s_w² ⟨a_l(x), a_l(x')⟩ + s_b²).

  A convolution shares its weight over pixels: its contribution
  ``s_w² Σ_c Σ_{p,p'} δ_{o,c,p}(x) δ_{o',c,p'}(x') ⟨U_p(x), U_p'(x')⟩`` (``U_p`` the input
  patch of output pixel ``p``) is contracted per example first, ``G_o(x) = δ_o(x) U(x)ᵀ``
  (one product per example), then one Gram of the ``G``. One forward and one backward
  sweep per example block (the backward carries the O output signals at once); no Dense
  Jacobian is materialised. Dense-only stacks: time O(N1 N2 Σ_l (n_{l-1} + O n_l)) for
  ``output="trace"`` (× O for ``"full"``), memory O((N1 + N2) O Σ_l n_l + N1 N2).
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

Where things are: ``ntk.py`` (``empirical_ntk`` and the dispatch table ``METHOD_TABLE``,
name -> :class:`~.method.Method`), ``structured.py``, ``jacobian.py`` (``jacobian`` and
``ntk_vp``), ``auto.py`` (the cost model of ``method="auto"``), ``setup.py`` (input and
model checks), ``blocks.py`` (block planning under ``memory_budget``), ``gram.py``
(exactly symmetric Gram products) and ``nngp.py`` (``empirical_nngp``). A new method is a
module defining a ``Method`` and one entry in ``METHOD_TABLE``.
"""

from .blocks import MemoryBudgetError
from .method import Method
from .nngp import empirical_nngp
from .ntk import METHOD_TABLE, METHODS, OUTPUTS, NTKParts, empirical_ntk
from .structured import ELEMENTWISE_MODULES, structured_plan

__all__ = ["ELEMENTWISE_MODULES", "METHODS", "METHOD_TABLE", "OUTPUTS", "MemoryBudgetError",
           "Method", "NTKParts", "empirical_nngp", "empirical_ntk", "structured_plan"]
