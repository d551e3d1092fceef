"""The shared checks of ``ntkit.predict``: one symmetry tolerance for every train kernel."""

import math

import numpy as np
import pytest
import torch

import ntkit as nk


def _kernel(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A well-conditioned symmetric kernel: eigenvalues in [0.5, ~3.5] (condition < 10)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 50, generator=g, dtype=torch.float64)
    return (a @ a.T / 50 + 0.5 * torch.eye(n, dtype=torch.float64)).to(dtype)


def _antisymmetric(n: int, size: float, dtype: torch.dtype) -> torch.Tensor:
    """An antisymmetric perturbation whose largest entry is ``size``."""
    g = torch.Generator().manual_seed(1)
    b = torch.rand(n, n, generator=g, dtype=torch.float64)
    e = b - b.T
    return (size * e / e.abs().max()).to(dtype)


def test_float32_rounding_asymmetry_is_accepted_and_symmetrised():
    # A float32 kernel whose two triangles differ by rounding (4 eps · max|K|) was refused by
    # the former absolute 1e-8 tolerance; now it is accepted, and every predictor sees the
    # symmetrised kernel (the Cholesky factor of t = inf reads one triangle only).
    n, dtype = 20, torch.float32
    k = _kernel(n, dtype)
    k_asym = k + _antisymmetric(n, 4 * torch.finfo(dtype).eps * float(k.abs().max()), dtype)
    assert float((k_asym - k_asym.T).abs().max()) > 1e-8 * float(k_asym.abs().max())
    k_sym = 0.5 * (k_asym + k_asym.T)
    y = torch.randn(n, 2, generator=torch.Generator().manual_seed(2), dtype=dtype)
    k_tx = k[:5]
    got = nk.predict.gradient_descent_mse(k_asym, y)(math.inf, k_test_train=k_tx)
    # The same arithmetic on the same symmetrised matrix: bit-identical.
    ref = nk.predict.gradient_descent_mse(k_sym, y)(math.inf, k_test_train=k_tx)
    assert torch.equal(got.test, ref.test)
    # And kernel regression to float32 accuracy: a solve with condition number < 10 over
    # N = 20 rows loses at most ~ cond · N · eps ≈ 2.4e-5 relative.
    exact = k_tx.double() @ torch.linalg.solve(k_sym.double(), y.double())
    np.testing.assert_allclose(got.test.double().numpy(), exact.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetry_tolerance_is_sqrt_eps_of_the_largest_entry(dtype):
    n = 12
    k = _kernel(n, dtype)
    y = torch.ones(n, dtype=dtype)
    tol = math.sqrt(torch.finfo(dtype).eps) * float(k.abs().max())
    # |K − Kᵀ| = 2 max|E| for an antisymmetric E: tol / 2 passes, 4 tol is refused.
    nk.predict.gradient_descent_mse(k + _antisymmetric(n, 0.25 * tol, dtype), y)(1.0)
    for bad in (k + _antisymmetric(n, 2 * tol, dtype),
                _kernel(2 * n, dtype)[n:, :n]):  # a square test-train block: a wrong matrix
        for call in (lambda: nk.predict.gradient_descent_mse(bad, y),
                     lambda: nk.predict.gp_inference(bad, y, bad),
                     lambda: nk.predict.gradient_flow("mse", bad, y),
                     lambda: nk.predict.max_learning_rate(bad)):
            with pytest.raises(ValueError, match="k_train_train is not symmetric"):
                call()



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_symmetry_tolerance_across_the_library(dtype):
    # predict, spectral and the solvers judge a square kernel by the same rule: an asymmetry
    # of a quarter of sqrt(eps) · max|K| is rounding (accepted, then symmetrised), twice that
    # is a wrong matrix (refused, naming it). Formerly spectral refused above 1e-10 · max|K|
    # (so float32 kernels, and float64 ones summed over many terms, were refused) and the
    # solvers accepted any asymmetry.
    n = 12
    k = _kernel(n, dtype)
    y = torch.ones(n, dtype=dtype)
    tol = math.sqrt(torch.finfo(dtype).eps) * float(k.abs().max())
    ok, bad = k + _antisymmetric(n, 0.25 * tol, dtype), k + _antisymmetric(n, 2 * tol, dtype)
    sym = 0.5 * (ok + ok.T)
    checks = {
        "predict": lambda m: nk.predict.gradient_descent_mse(m, y)(math.inf).train,
        "spectral": lambda m: nk.spectral.eigen(m).values,
        "solvers": lambda m: nk.scale.solve(m, None, y).coef,
    }
    for where, check in checks.items():
        # Accepted and symmetrised: the same numbers as the symmetrised matrix itself.
        assert torch.equal(check(ok), check(sym)), where
        with pytest.raises(ValueError, match="is not symmetric"):
            check(bad)


def test_one_ridge_rule_across_the_library():
    # λ = diag_reg · mean(diag K) (or diag_reg itself, absolute) in predict and the solvers.
    n = 10
    k = _kernel(n, torch.float64)
    y = torch.linspace(-1, 1, n, dtype=torch.float64)
    mean_diag = float(k.diagonal().mean())
    for reg, absolute, ridge in ((1e-2, False, 1e-2 * mean_diag), (1e-2, True, 1e-2)):
        exact = torch.linalg.solve(k + ridge * torch.eye(n, dtype=k.dtype), y)
        got = nk.scale.solve(k, None, y, diag_reg=reg, diag_reg_absolute_scale=absolute)
        assert got.ridge == ridge
        flow = nk.predict.gradient_descent_mse(k, y, diag_reg=reg,
                                               diag_reg_absolute_scale=absolute)
        # Cholesky solves of a matrix with condition number < 10: agreement to ~N · eps.
        torch.testing.assert_close(got.coef, exact, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(flow.dual_coefficients(math.inf), exact, rtol=1e-13,
                                   atol=1e-13)
