"""LayerNorm's kernel map when its input features have a nonzero per-example mean.

The finite LayerNorm subtracts each example's mean over features. At infinite width that
mean is ``m(x) = E[φ(u)]``, ``u ~ N(0, Σ(x, x))``, after an activation φ of a Dense layer
(0 after Dense itself or an odd φ), and the row mean of ``x`` for raw inputs. The kernel
map centres by it: ``Σ_c = Σ − m m'`` and divides Σ_c and Θ by
``sqrt(Σ_c(x, x) Σ_c(x', x'))``. References here are independent of that map: Monte Carlo
averages of finite networks (NNGP and empirical NTK), explicit formulas for raw inputs, and
scipy's adaptive quadrature for the means.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, special

import ntkit as nk
from ntkit.layers import Layer
from ntkit.layers.activations import ABReLU, Activation

F64 = torch.float64


def _inputs() -> torch.Tensor:
    """Four rows with per-row offsets (feature means -1 ... 2), so centring matters."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g, dtype=F64)
    return x + torch.tensor([[0.5], [-1.0], [2.0], [0.0]], dtype=F64)


class _ClaimZeroMean(Layer):
    """Declares the per-example means to be zero: the map LayerNorm used before it tracked
    them (the alternative the Monte Carlo tests must be able to reject)."""

    def kernel_map(self, k):
        return k.replace(mean1=0.0, mean2=0.0)

    def build(self, in_dim, generator, dtype, device):
        return torch.nn.Identity()


def _relu_ln(n: int, claim_zero: bool = False) -> Layer:
    middle = (_ClaimZeroMean(),) if claim_zero else ()
    return nk.serial(nk.Dense(n, 1.3, 0.2), nk.ReLU(), *middle, nk.LayerNorm(),
                     nk.Dense(1, 1.1, 0.1))


# ----------------------------------------------------------------------- Monte Carlo
def test_relu_then_layernorm_matches_monte_carlo():
    """Dense -> ReLU -> LayerNorm -> Dense, NNGP and NTK, against 40 finite networks of
    width 8192. The finite-width bias is O(1/n): measured 0.0036 (NNGP) and up to 0.07
    (NTK diagonal, ~2%) at n = 1024, so at n = 8192 it is ~0.1-0.5 standard errors. The
    map that ignores the ReLU features' mean (the old one) is off by 30-40% (z > 100)."""
    x = _inputs()
    mc = nk.monte_carlo_kernel(_relu_ln(8192), x, n_samples=40, seed=7)
    exact = _relu_ln(8192).kernel(x)
    wrong = _relu_ln(8192, claim_zero=True).kernel(x)
    off = ~torch.eye(4, dtype=torch.bool)
    # The NNGP diagonal is deterministic: LayerNorm's output has mean square 1 exactly
    # (up to eps = 1e-12 against variances ~0.3), so 1.1² + 0.1².
    torch.testing.assert_close(mc.nngp.diagonal(), torch.full((4,), 1.22, dtype=F64),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(exact.nngp.diagonal(), torch.full((4,), 1.22, dtype=F64),
                               rtol=0, atol=1e-15)
    for name, mask in (("nngp", off), ("ntk", torch.ones(4, 4, dtype=torch.bool))):
        stderr = getattr(mc, name + "_stderr")[mask]
        z = (mc[name][mask] - exact[name][mask]) / stderr
        assert float(z.abs().max()) < 4.5, (name, z)
        z_wrong = (mc[name][mask] - wrong[name][mask]) / stderr
        assert float(z_wrong.abs().max()) > 20, (name, z_wrong)


def _raw_ln(n: int) -> Layer:
    return nk.serial(nk.LayerNorm(), nk.Dense(n, 1.2, 0.3), nk.Erf(), nk.Dense(1, 1.0, 0.1))


def test_layernorm_on_raw_inputs_matches_monte_carlo():
    """LayerNorm -> Dense -> Erf -> Dense on inputs with nonzero row means. LayerNorm of
    the inputs is deterministic and has no parameters, and one random hidden layer
    follows, so the Monte Carlo means are unbiased at every width: z-scores < 4.5 from 100
    samples at width 256 are pure sampling noise."""
    x = _inputs()
    mc = nk.monte_carlo_kernel(_raw_ln(256), x, n_samples=100, seed=5)
    exact = _raw_ln(256).kernel(x)
    for name in ("nngp", "ntk"):
        z = (mc[name] - exact[name]) / getattr(mc, name + "_stderr")
        assert float(z.abs().max()) < 4.5, (name, z)


def test_layernorm_on_raw_inputs_is_exact():
    """LayerNorm -> Dense(W, b) on raw inputs, against the explicit formula: with
    ``y = (x − mean x) / std x`` per row (population std), NNGP = W² y·y'/d + b², and the
    NTK equals it (the inputs have no parameters; Dense in the NTK parameterization adds
    its NNGP). Full, cross and diagonal modes."""
    x = _inputs()
    x2 = x[:3].flip(0) * 2.0 - 0.7
    net = nk.serial(nk.LayerNorm(), nk.Dense(1, 1.4, 0.3))

    def formula(a, b):
        ya = (a - a.mean(1, keepdim=True)) / a.std(1, unbiased=False, keepdim=True)
        yb = (b - b.mean(1, keepdim=True)) / b.std(1, unbiased=False, keepdim=True)
        return 1.4 ** 2 * ya @ yb.T / a.shape[1] + 0.3 ** 2

    for a, b in ((x, None), (x, x2)):
        k = net.kernel(a, b)
        ref = formula(a, a if b is None else b)
        torch.testing.assert_close(k.nngp, ref, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(k.ntk, ref, rtol=1e-13, atol=1e-14)
    diag = net.kernel(x, diagonal=True)
    torch.testing.assert_close(diag.nngp, formula(x, x).diagonal(), rtol=1e-13, atol=0)
    torch.testing.assert_close(diag.ntk, formula(x, x).diagonal(), rtol=1e-13, atol=0)


def test_constant_rows_map_to_zero():
    """A raw row constant over its features has zero centred variance: LayerNorm maps it to
    0 (as the finite LayerNorm's eps-guarded division does), also when rounding leaves
    var − mean² a few ulps away from 0."""
    x = torch.tensor([[0.1] * 7, [1.0, 2, 3, 4, 5, 6, 7], [-3.3] * 7], dtype=F64)
    net = nk.serial(nk.LayerNorm(), nk.Dense(1, 1.0, 0.0))
    k = net.kernel(x)
    assert float(k.nngp[1, 1]) == pytest.approx(1.0, rel=1e-14)
    for i in (0, 2):
        assert float(k.nngp[i].abs().max()) == 0.0 and float(k.ntk[i].abs().max()) == 0.0
    finite = nk.LayerNorm().module(7)(x)
    assert float(finite[[0, 2]].abs().max()) < 1e-3


# ----------------------------------------------------------------------- zero mean unchanged
@pytest.mark.parametrize("act", [nk.Erf(), nk.Tanh(), nk.Sin(1.5, 0.8), nk.Identity()],
                         ids=repr)
def test_odd_activations_keep_the_uncentred_map_bit_for_bit(act):
    """After Dense, or an odd activation of it, the mean is exactly zero and the map is
    neural-tangents' (tests/test_analytic.py pins Dense -> LayerNorm -> Erf against its
    reference): identical bits to declaring the mean zero."""
    x = _inputs()
    d = lambda: nk.Dense(6, 1.2, 0.2)  # noqa: E731
    net = nk.serial(d(), act, nk.LayerNorm(), d(), nk.ReLU(), nk.Dense(1))
    claimed = nk.serial(d(), act, _ClaimZeroMean(), nk.LayerNorm(), d(), nk.ReLU(),
                        nk.Dense(1))
    for diagonal in (False, True):
        a, b = net.kernel(x, diagonal=diagonal), claimed.kernel(x, diagonal=diagonal)
        assert torch.equal(a.nngp, b.nngp) and torch.equal(a.ntk, b.ntk)


# ----------------------------------------------------------------------- diagonal mode
DIAG_NETS = {
    "relu": lambda: _relu_ln(16),
    "raw": lambda: _raw_ln(16),
    "softplus": lambda: nk.serial(nk.Dense(9, 1.1, 0.4), nk.Softplus(), nk.LayerNorm(),
                                  nk.Dense(9), nk.GELU(), nk.LayerNorm(), nk.Dense(1)),
    "residual": lambda: nk.serial(
        nk.Dense(9, 1.0, 0.1), nk.FanOut(2),
        nk.parallel(nk.serial(nk.ReLU(), nk.Dense(9, 1.0, 0.1), nk.Sigmoid()), nk.Identity()),
        nk.FanInSum(), nk.LayerNorm(), nk.Dense(1)),
}


@pytest.mark.parametrize("name", sorted(DIAG_NETS))
def test_diagonal_mode_matches_the_full_kernel(name):
    x = _inputs()
    net = DIAG_NETS[name]()
    full, diag = net.kernel(x), net.kernel(x, diagonal=True)
    for kname in ("nngp", "ntk"):
        torch.testing.assert_close(diag[kname], full[kname].diagonal(), rtol=1e-12, atol=0)


def test_centred_map_is_differentiable():
    """Autograd through the centring (inputs and a tensor W_std): gradcheck in float64."""
    x = _inputs()[:3].clone().requires_grad_(True)
    w = torch.tensor(1.3, dtype=F64, requires_grad=True)

    def kernels(x, w):
        net = nk.serial(nk.LayerNorm(), nk.Dense(5, w, 0.2), nk.GELU(), nk.LayerNorm(),
                        nk.Dense(1))
        k = net.kernel(x, x[:2] * 0.5 + 0.2)
        return k.nngp, k.ntk

    assert torch.autograd.gradcheck(kernels, (x, w))


# ----------------------------------------------------------------------- refusals
class _NoMean(Activation):
    """A user-defined activation written without ``mean``."""

    def fn(self, x):
        return torch.relu(x)

    def dual(self, cov, var1, var2, need_dot=True):
        return nk.ReLU().dual(cov, var1, var2, need_dot)


class _Scale(Layer):
    """A user-defined layer that doubles the features via ``PairKernel.replace`` without
    saying what happens to the means."""

    def kernel_map(self, k):
        return k.replace(cov=4 * k.cov, var1=4 * k.var1, var2=4 * k.var2)

    def build(self, in_dim, generator, dtype, device):
        return torch.nn.Identity()


@pytest.mark.parametrize("net", [
    # A user layer leaves Gaussianity unknown, so the activation after it is allowed and
    # LayerNorm is the first to find a mean it cannot know. (An activation of raw inputs or of
    # another activation is refused earlier, by the Gaussian-input check:
    # tests/test_gaussian_inputs.py.)
    nk.serial(_Scale(), nk.ReLU(), nk.LayerNorm(), nk.Dense(1)),
    nk.serial(nk.Dense(8), _NoMean(), nk.LayerNorm(), nk.Dense(1)),
    nk.serial(nk.Dense(8), nk.ReLU(), _Scale(), nk.LayerNorm(), nk.Dense(1)),
], ids=["user-layer-relu", "custom-activation", "custom-layer"])
@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_unknown_mean_is_refused(net, get, diagonal):
    with pytest.raises(ValueError, match=r"LayerNorm\(eps=1e-12\).*per-example mean.*"
                                         r"put a Dense layer before LayerNorm"):
        net.kernel(_inputs(), get=get, diagonal=diagonal)


# ----------------------------------------------------------------------- the means
def _np_gelu(x):
    return x * special.ndtr(x)


MEANS = {
    "ReLU": (nk.ReLU(), lambda x: max(x, 0.0)),
    "LeakyReLU": (nk.LeakyReLU(0.2), lambda x: max(x, 0.0) + 0.2 * min(x, 0.0)),
    "Abs": (nk.Abs(), abs),
    "ABReLU": (ABReLU(0.7, -0.3), lambda x: 0.7 * min(x, 0.0) - 0.3 * max(x, 0.0)),
    "GELU": (nk.GELU(), _np_gelu),
    "Sigmoid": (nk.Sigmoid(), special.expit),
    "Softplus": (nk.Softplus(), lambda x: np.logaddexp(x, 0.0)),
    "SiLU": (nk.SiLU(), lambda x: x * special.expit(x)),
    "Sin": (nk.Sin(0.7, 1.3, 0.4), lambda x: 0.7 * math.sin(1.3 * x + 0.4)),
    "Cos": (nk.Cos(0.7, 1.3, 0.4), lambda x: 0.7 * math.cos(1.3 * x + 0.4)),
    "Erf": (nk.Erf(), special.erf),
    "Tanh": (nk.Tanh(), math.tanh),
    "Identity": (nk.Identity(), lambda x: x),
    "Elementwise": (nk.Elementwise(lambda x: torch.exp(-x * x) + x * x / (1 + x * x)),
                    lambda x: math.exp(-x * x) + x * x / (1 + x * x)),
}


def _gauss_mean(f, var: float) -> float:
    """E[f(u)], u ~ N(0, var), by scipy's adaptive quadrature over z = u/s, with break
    points at the activation's transition (|u| <= 1)."""
    s = math.sqrt(var)
    points = sorted({0.0, *(c / s for c in (-1.0, 1.0) if abs(c / s) < 12)})
    with warnings.catch_warnings():
        # quadpack warns when roundoff keeps it from 2e-14; its error estimate is checked
        # by the caller instead
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        val, err = integrate.quad(lambda z: f(s * z) * math.exp(-0.5 * z * z), -12, 12,
                                  points=points, epsabs=1e-17, epsrel=2e-14, limit=2000)
    return val / math.sqrt(2 * math.pi), err / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("name", sorted(MEANS))
def test_activation_means_match_scipy_quad(name):
    """``mean(var)`` = E[φ(u)] to 1e-10 relative, plus 1e-13 of the feature scale
    sqrt(E[φ²]) for means that are 0 (odd φ) or underflow (Sin/Cos at large var: e^-8450);
    a mean that small changes LayerNorm's centred variance by less than 1e-26 relative."""
    act, f = MEANS[name]
    variances = [1e-2, 1.0, 1e2, 1e4]
    got = act.mean(torch.tensor(variances, dtype=F64))
    got = torch.zeros(4, dtype=F64) + got  # odd activations answer the exact float 0.0
    for var, value in zip(variances, got.tolist()):
        ref, ref_err = _gauss_mean(f, var)
        scale = math.sqrt(_gauss_mean(lambda x: f(x) ** 2, var)[0])
        tol = 1e-10 * abs(ref) + 1e-13 * scale
        assert ref_err < tol, (var, ref, ref_err)  # the reference resolves the tolerance
        assert abs(value - ref) <= tol, (var, value, ref)
