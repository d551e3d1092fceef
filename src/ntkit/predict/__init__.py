"""``nk.predict``: closed-form and ODE predictions of kernel gradient dynamics (JGH §I.3, §IV).

Under a fixed kernel ``K`` (the NTK at initialisation, or any kernel) gradient flow on a
cost ``C`` moves the network outputs on the training inputs as

    d f_train / dt = −η · K · ∇_f C(f_train),      d f_test / dt = −η · K_test,train · ∇_f C.

Everything here works with the *per-output* kernel ``K`` (``(N, N)``), the full kernel over
``n_out`` outputs being ``K ⊗ I``: every output column evolves independently under ``K``.

Two normalisations of the mean squared error are offered, and every function names the one
it uses with ``cost=``:

* ``cost="jgh"`` — JGH's cost ``C = ½ · mean_i ‖f(x_i) − y_i‖²`` (mean over the ``N``
  examples, sum over outputs). The flow is driven by ``Π = K / N``:
  ``f_train(t) = y + exp(−η t K / N) (f_train(0) − y)``.
* ``cost="nt"`` — neural-tangents' ``C = 1 / (2 N n_out) · Σ_i ‖f(x_i) − y_i‖²``. The flow is
  driven by ``K / (N · n_out)``. Both agree when ``n_out = 1``.

``diag_reg`` follows neural-tangents: unless ``diag_reg_absolute_scale=True`` it is relative
to the mean of the kernel's diagonal, i.e. ``K + diag_reg · (tr K / N) · I`` is used.

Test outputs depend on the test inputs only through ``K_*x``: ``f_test(t) = f_test(0) +
K_*x α(t)``. The predictors' ``dual_coefficients(t)`` return ``α(t)`` (``N × O`` numbers), so
a fitted flow can predict any number of later test batches with one product each.

One import path, ``ntkit.predict``; its private modules hold one concept each:
``_mse`` (the MSE closed form, :func:`gradient_descent_mse`, :func:`max_learning_rate`),
``_gp`` (:func:`gp_inference`), ``_ensemble`` (:func:`ensemble`), ``_ode`` (the ODE flow of
any cost, :func:`gradient_flow`), ``_checks`` (input checks and the set-up every flow shares)
and ``_spectral`` (the cached factorisations of the train kernel and the per-mode arithmetic).
"""

from ._checks import COSTS
from ._ensemble import EnsemblePrediction, EnsemblePredictor, ensemble
from ._gp import GPPosterior, gp_inference
from ._mse import MSEPredictor, Prediction, gradient_descent_mse, max_learning_rate
from ._ode import FlowCoefficients, FlowPredictor, gradient_flow

__all__ = ["COSTS", "EnsemblePrediction", "EnsemblePredictor", "FlowCoefficients",
           "FlowPredictor", "GPPosterior", "MSEPredictor", "Prediction", "ensemble",
           "gp_inference", "gradient_descent_mse", "gradient_flow", "max_learning_rate"]
