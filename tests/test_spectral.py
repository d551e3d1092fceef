"""Spectral toolkit: eigensolvers against numpy, Nyström eigenfunctions, Hermite duals, PD."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import ntkit as nk
from ntkit import spectral


@functools.cache  # tensors are only read, never modified in place
def _kernel(n=300, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, nk.mlp(3, 1, "relu", b_std=0.1).kernel(x, get="ntk").ntk


@pytest.mark.parametrize("method", ["eigh", "lanczos", "lobpcg", "auto"])
def test_eigensolvers_match_numpy(method):
    _, K = _kernel()
    n = K.shape[0]
    ref_vals, ref_vecs = np.linalg.eigh(K.numpy() / n)
    ref_vals, ref_vecs = ref_vals[::-1][:4], ref_vecs[:, ::-1][:, :4]
    eig = spectral.eigen(K, 4, method=method)
    np.testing.assert_allclose(eig.values.numpy(), ref_vals, rtol=1e-10)
    # eigenvectors up to sign
    overlap = np.abs(np.sum(eig.vectors.numpy() * ref_vecs, axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-9)
    assert eig.residuals.max() < 1e-9


def test_normalize_none_scales_by_n():
    _, K = _kernel(100)
    a = spectral.eigen(K, 3, normalize="none", method="eigh")
    b = spectral.eigen(K, 3, normalize="jgh", method="eigh")
    torch.testing.assert_close(a.values / 100, b.values, rtol=1e-13, atol=0)


def test_power_iteration_with_deflation_matches_eigh():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    values = np.concatenate([[10.0, 5.0, 2.5, 1.2], rng.uniform(0, 0.5, 76)])
    A = (q * values) @ q.T
    eig = spectral.eigen(A, 4, normalize="none", method="power", tol=1e-12)
    np.testing.assert_allclose(eig.values.numpy(), values[:4], rtol=1e-8)
    assert eig.converged.all() and len(eig.iterations) == 4
    overlap = np.abs(np.sum(eig.vectors.numpy() * q[:, :4], axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-8)


def test_power_iteration_warns_on_small_gap():
    A = np.diag([1.0, 0.999999, 0.5])
    with pytest.warns(spectral.ConvergenceWarning, match="gap is too small"):
        eig = spectral.eigen(A, 1, normalize="none", method="power", tol=1e-14, max_iter=200)
    assert not eig.converged[0]


def test_nystrom_eigenfunctions_reproduce_training_eigenvectors():
    x, K = _kernel(120, 3)
    net = nk.mlp(3, 1, "relu", b_std=0.1)
    fns = spectral.eigenfunctions(net, x, 5)
    on_train = fns(x)
    torch.testing.assert_close(on_train, fns.train_values, rtol=1e-10, atol=1e-12)
    # ‖f_i‖_{p_in} = 1 and orthogonality under the empirical measure
    gram = on_train.T @ on_train / x.shape[0]
    torch.testing.assert_close(gram, torch.eye(5, dtype=gram.dtype), rtol=0, atol=1e-10)
    ref = spectral.eigen(K, 5, method="eigh")
    torch.testing.assert_close(fns.values, ref.values, rtol=1e-10, atol=0)
    # one function at a time, and a kernel_fn callable gives the same
    torch.testing.assert_close(fns[1](x[:7]), on_train[:7, 1])
    fns2 = spectral.eigenfunctions(lambda a, b: net.kernel(a, b, get="ntk").ntk, x, 2)
    torch.testing.assert_close(fns2.values, fns.values[:2])


def test_centered_eigenfunctions_are_centered():
    x, _ = _kernel(100, 3)
    fns = spectral.eigenfunctions(nk.mlp(3, 1), x, 3, centered=True)
    vals = fns(x)
    assert vals.mean(dim=0).abs().max() < 1e-9
    torch.testing.assert_close(vals, fns.train_values, rtol=1e-9, atol=1e-10)


def test_project_splits_orthogonally():
    _, K = _kernel(60, 3)
    eig = spectral.eigen(K, 3, method="eigh")
    f = torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    along, rest = spectral.project(f, eig.vectors, 1)
    torch.testing.assert_close(along + rest, f)
    assert abs(float(rest @ eig.vectors[:, 1])) < 1e-12
    assert abs(float(along @ eig.vectors[:, 0])) < 1e-12
    with pytest.raises(ValueError, match="rows"):
        spectral.project(f[:5], eig.vectors, 0)


def test_min_eigenvalue_and_condition_number():
    A = np.diag([4.0, 2.0, 0.5])
    assert spectral.min_eigenvalue(A) == pytest.approx(0.5)
    assert spectral.condition_number(A) == pytest.approx(8.0)
    assert spectral.condition_number(np.diag([1.0, 0.0])) == math.inf
    with pytest.raises(ValueError, match="not symmetric"):
        spectral.min_eigenvalue(np.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        spectral.eigen(np.array([[1.0, np.nan], [np.nan, 1.0]]))


# ------------------------------------------------------------------ Hermite coefficients
def relu_dual(r):
    return (np.sqrt(1 - r * r) + (np.pi - np.arccos(r)) * r) / (2 * np.pi)


def erf_dual(r):  # unit-variance inputs: (2/π) arcsin(2ρ / 3)
    return 2 / np.pi * np.arcsin(2 * r / 3)


@pytest.mark.parametrize("name,dual,degree", [("relu", relu_dual, 68), ("erf", erf_dual, 25)])
def test_hermite_series_matches_closed_form_dual(name, dual, degree):
    """Direct summation of Σ_{i≤n} a_i² ρ^i reaches 1e-8 on |ρ| ≤ 0.9 at exactly these degrees
    (measured: ReLU n = 68, i.e. 36 non-zero terms a_0, a_1, a_2, a_4, …, a_68; Erf n = 25,
    13 non-zero odd terms). ReLU converges slowly because a_{2k}² ~ k^(-5/2), so the tail is
    set by 0.9^n alone; still, 69 quadrature coefficients are cheap, so no acceleration is
    needed. Two degrees fewer must fail, which pins the stated counts."""
    rho = np.linspace(-0.9, 0.9, 1801)
    report = spectral.hermite_coefficients(name, degree)
    assert np.abs(report.dual(rho) - dual(rho)).max() <= 1e-8
    short = spectral.hermite_coefficients(name, degree - 2)
    assert np.abs(short.dual(rho) - dual(rho)).max() > 1e-8
    # the long series converges to the closed form to near machine precision
    long = spectral.hermite_coefficients(name, 160)
    assert np.abs(long.dual(rho) - dual(rho)).max() <= 1e-12
    # and the closed form used by the kernel layers (ReLU's arc-cosine map) agrees
    if name == "relu":
        r = torch.as_tensor(rho)
        ones = torch.ones_like(r)
        np.testing.assert_allclose(nk.ReLU().dual(r, ones, ones)[0].numpy(), dual(rho),
                                   atol=1e-15)


def test_hermite_parity_counts():
    relu = spectral.hermite_coefficients(nk.ReLU(), 40)
    assert relu.coefficients[1] == pytest.approx(0.5, abs=1e-13)
    assert relu.coefficients[0] == pytest.approx(1 / math.sqrt(2 * math.pi), abs=1e-13)
    assert relu.nonzero_even == 21 and relu.nonzero_odd == 1  # x/2 + |x|/2
    tanh = spectral.hermite_coefficients(torch.tanh, 41)
    assert tanh.nonzero_even == 0 and tanh.nonzero_odd == 21
    softplus = spectral.hermite_coefficients("softplus", 30)
    assert softplus.nonzero_even == 16 and softplus.nonzero_odd == 1  # x/2 + an even function
    shifted = spectral.hermite_coefficients(lambda z: torch.tanh(z + 0.3), 30)
    assert shifted.nonzero_even == 16 and shifted.nonzero_odd == 15
    assert "consistent with Gneiting's criterion" in shifted.evidence
    assert "not a proof" in shifted.evidence
    assert relu.last_nonzero("odd") == 1 and relu.last_nonzero("even") == 40
    assert "odd coefficients vanish beyond degree 1" in relu.evidence
    assert "no even coefficient is non-zero" in tanh.evidence


def test_polynomial_activation_has_finitely_many_coefficients():
    report = spectral.hermite_coefficients(lambda z: z ** 3 - 2 * z ** 2 + 1, 30)
    nonzero = np.flatnonzero(np.abs(report.coefficients) > 1e-10)
    assert nonzero.tolist() == [0, 1, 2, 3]
    # z³ = h_3·sqrt(6) + 3 h_1 ; −2z² = −2(sqrt(2) h_2 + 1)
    np.testing.assert_allclose(report.coefficients[:4], [-1.0, 3.0, -2 * math.sqrt(2),
                                                         math.sqrt(6)], atol=1e-12)


def test_partial_converse_quadratic_is_singular_others_positive():
    """JGH §III.3: on the unit circle a polynomial activation gives a finite-rank NTK, while
    non-polynomial activations give a strictly positive definite one (depth 2)."""
    angles = torch.linspace(0, 2 * math.pi, 31, dtype=torch.float64)[:-1]
    x = torch.stack([angles.cos(), angles.sin()], 1)
    mins = {}
    for name, act in [("square", nk.Elementwise(lambda z: z ** 2, degree=8)),
                      ("relu", nk.ReLU()), ("erf", nk.Erf()), ("tanh", nk.Tanh())]:
        K = nk.serial(nk.Dense(1, 1.0, 0.1), act, nk.Dense(1, 1.0, 0.1)).kernel(x, get="ntk").ntk
        vals = torch.linalg.eigvalsh(K)
        mins[name] = float(vals[0] / vals[-1])
    assert abs(mins["square"]) < 1e-13, mins
    for name in ("relu", "erf", "tanh"):
        assert mins[name] > 1e-12, mins


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["eigh", "lanczos", "power"])
def test_eigen_and_eigenfunctions_follow_cuda_inputs(method):
    x, K = _kernel(120, 3)
    ref = spectral.eigen(K, 3, method="eigh")
    eig = spectral.eigen(K.cuda(), 3, method=method, tol=1e-12)
    assert eig.values.device.type == "cuda" and eig.vectors.device.type == "cuda"
    torch.testing.assert_close(eig.values.cpu(), ref.values, rtol=1e-8, atol=0)
    fns = spectral.eigenfunctions(nk.mlp(3, 1, "relu", b_std=0.1), x.cuda(), 3)
    out = fns(x[:5].cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, fns.train_values[:5], rtol=1e-9, atol=1e-10)


def test_eigenfunctions_kernel_keyword_is_deprecated_for_get():
    # "Which kernel" is get= across ntkit; kernel= works for one release, with a warning.
    x = torch.linspace(-1, 1, 12, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 0.5]])
    net = nk.mlp(3, 1, b_std=0.1)
    new = spectral.eigenfunctions(net, x, 3, get="nngp")
    with pytest.warns(DeprecationWarning, match="kernel= is deprecated.*get='nngp'"):
        old = spectral.eigenfunctions(net, x, 3, kernel="nngp")
    assert torch.equal(old.values, new.values)
    ref = spectral.eigen(net.kernel(x, get="nngp").nngp, 3)
    torch.testing.assert_close(new.values, ref.values, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="get must be one of"):
        spectral.eigenfunctions(net, x, 3, get="cnn")
