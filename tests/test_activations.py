"""Activation layers: derivatives, torch spellings, warnings, autograd through the duals,
equality and representation."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import ntkit as nk
from ntkit.layers import activation_from_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64


def _x():
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 4, dtype=F64, generator=g) * 1.5


# --------------------------------------------------------------------------- derivatives
def _softplus_exact(t):
    return torch.logaddexp(t, torch.zeros_like(t))


@pytest.mark.parametrize("layer,fn", [(nk.Tanh(), torch.tanh), (nk.Sigmoid(), torch.sigmoid),
                                      (nk.Softplus(), _softplus_exact), (nk.SiLU(), F.silu)],
                         ids=["tanh", "sigmoid", "softplus", "silu"])
def test_hand_written_derivative_gives_the_autograd_ntk(layer, fn):
    """Same quadrature rule (same smoothness), φ' by hand vs by autograd: agree to rounding.

    A wrong derivative (``1 − tanh`` for ``1 − tanh²``) changes the NTK at order 1."""
    auto = nk.Elementwise(fn, smoothness=layer.smoothness)
    x = _x()
    k_hand = nk.mlp(3, 8, layer, 1.3, 0.2).kernel(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncertified twin estimates its error
        k_auto = nk.mlp(3, 8, auto, 1.3, 0.2).kernel(x)
    torch.testing.assert_close(k_hand.nngp, k_auto.nngp, rtol=1e-12, atol=0)
    torch.testing.assert_close(k_hand.ntk, k_auto.ntk, rtol=1e-12, atol=0)
    z = torch.linspace(-30, 30, 601, dtype=F64)
    torch.testing.assert_close(layer.derivative(z), nk.Elementwise(fn).derivative(z),
                               rtol=1e-12, atol=1e-16)  # 1 − t² near |t| = 1: ulp(1)


@pytest.mark.parametrize("layer", [nk.Sin(), nk.Sin(1.3, 0.7, 0.4), nk.Cos(),
                                   nk.Cos(0.8, 1.9, -1.0), nk.GELU(), nk.Erf(), nk.Tanh(),
                                   nk.Sigmoid(), nk.Softplus(), nk.SiLU()], ids=repr)
def test_closed_form_derivative_matches_autograd(layer):
    z = torch.linspace(-12, 12, 1201, dtype=F64)
    leaf = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(layer.fn(leaf).sum(), leaf)
    torch.testing.assert_close(layer.derivative(z), auto, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- torch spellings
SPELLINGS = [
    (torch.relu, nk.ReLU()), (F.relu, nk.ReLU()), (torch.nn.ReLU(), nk.ReLU()),
    (torch.erf, nk.Erf()), (torch.special.erf, nk.Erf()), (torch.tanh, nk.Tanh()),
    (torch.nn.Tanh(), nk.Tanh()), (F.tanh, nk.Tanh()), (torch.sigmoid, nk.Sigmoid()),
    (torch.nn.Sigmoid(), nk.Sigmoid()), (F.sigmoid, nk.Sigmoid()), (torch.sin, nk.Sin()),
    (torch.cos, nk.Cos()), (torch.abs, nk.Abs()), (F.gelu, nk.GELU()),
    (torch.nn.GELU(), nk.GELU()), (F.silu, nk.SiLU()), (torch.nn.SiLU(), nk.SiLU()),
    (F.softplus, nk.Softplus()), (torch.nn.Softplus(), nk.Softplus()),
    (torch.nn.LeakyReLU(0.2), nk.LeakyReLU(0.2)), (torch.nn.LeakyReLU(), nk.LeakyReLU(0.01)),
    (F.leaky_relu, nk.LeakyReLU(0.01)), (torch.nn.Identity(), nk.Identity()),
    ("relu", nk.ReLU()), ("tanh", nk.Tanh()),
]


@pytest.mark.parametrize("spelling,expected", SPELLINGS, ids=[repr(e) + str(i) for i, (_, e)
                                                            in enumerate(SPELLINGS)])
def test_torch_spellings_map_to_the_named_layers(spelling, expected):
    got = activation_from_name(spelling)
    assert type(got) is type(expected) and got == expected


@pytest.mark.parametrize("spelling", [torch.nn.GELU(approximate="tanh"),
                                      torch.nn.Softplus(beta=2.0), torch.nn.ELU()], ids=repr)
def test_other_torch_modules_fall_back_to_quadrature(spelling):
    got = activation_from_name(spelling)
    assert type(got) is nk.Elementwise
    z = torch.linspace(-3, 3, 7, dtype=F64)
    assert torch.equal(got.fn(z), spelling(z))


def test_relu_spellings_give_jgh_kernel_exactly():
    x = torch.randn(20, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = nk.mlp(4, 512).kernel(x)
    for spelling in (torch.relu, F.relu, torch.nn.ReLU()):
        k = nk.mlp(4, 512, activation=spelling).kernel(x)
        assert torch.equal(k.ntk, ref.ntk) and torch.equal(k.nngp, ref.nngp)


@pytest.mark.parametrize("cls", [torch.nn.ReLU, torch.nn.Tanh, torch.nn.GELU])
def test_a_torch_class_instead_of_an_instance_is_refused(cls):
    with pytest.raises(ValueError, match=rf"pass an instance, {cls.__name__}\(\)"):
        nk.mlp(3, 64, activation=cls)
    with pytest.raises(ValueError, match="Pass an instance"):
        nk.Elementwise(cls)


# --------------------------------------------------------------------------- warnings
def _dual(act, var, rhos=(0.3, 0.9)):
    var = torch.full((len(rhos),), float(var), dtype=F64)
    return act.dual(torch.tensor(rhos, dtype=F64) * var, var, var)


@pytest.mark.parametrize("fn", [lambda t: t.clamp(min=0), torch.sign,
                                lambda t: t.clamp(min=0.5), lambda t: torch.sign(t - 0.3)],
                         ids=["relu", "sign", "kink-at-0.5", "jump-at-0.3"])
def test_uncertifiable_elementwise_warns_with_the_error_and_remedy(fn):
    with pytest.warns(RuntimeWarning, match=r"error of its dual is about \d\.\de-\d\d relative"
                                            r".*nk\.ReLU\(\)"):
        _dual(nk.Elementwise(fn), 1.0)


@pytest.mark.parametrize("fn", [torch.tanh, lambda t: torch.sin(t) + 0.1 * t,
                                lambda t: torch.atan(t) + 0.1 * t,
                                lambda t: torch.cos(t) + 0.2 * t * t],
                         ids=["tanh", "sin+0.1t", "atan+0.1t", "cos+0.2t2"])
@pytest.mark.parametrize("var", [1e-3, 0.5, 2.0])
def test_smooth_elementwise_at_ordinary_scales_does_not_warn(fn, var):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dual(nk.Elementwise(fn), var)


def test_oscillation_beyond_the_rule_warns():
    with pytest.warns(RuntimeWarning, match="error of its dual"):
        _dual(nk.Elementwise(lambda t: torch.sin(t) + 0.1 * t), 100.0)


def test_elementwise_relu_at_large_variance_is_exact_enough():
    """A kink at 0 is a break point of the panel rule: accurate without a closed form."""
    var = torch.tensor([1e4, 1e4, 1e4], dtype=F64)
    cov = torch.tensor([-0.5, 0.3, 0.999], dtype=F64) * var * 0.7 ** 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n, d = nk.Elementwise(lambda t: t.clamp(min=0)).dual(cov, var, var * 0.7)
    n0, d0 = nk.ReLU().dual(cov, var, var * 0.7)
    torch.testing.assert_close(n, n0, rtol=1e-10, atol=0)
    torch.testing.assert_close(d, d0, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- autograd
GRAD_LAYERS = [nk.ReLU(), nk.LeakyReLU(0.2), nk.Abs(), nk.ABReLU(-0.3, 2.0), nk.Erf(),
               nk.GELU(), nk.Sin(1.3, 0.7, 0.4), nk.Tanh(), nk.SiLU()]


@pytest.mark.parametrize("layer", GRAD_LAYERS, ids=repr)
def test_duals_pass_gradcheck(layer):
    var1 = torch.tensor([[0.7], [1.9]], dtype=F64, requires_grad=True)
    var2 = torch.tensor([[1.1, 0.4, 2.5]], dtype=F64, requires_grad=True)
    rho = torch.tensor([[0.3, -0.6, 0.8], [0.1, 0.5, -0.9]], dtype=F64)
    cov = (rho * torch.sqrt(var1 * var2)).detach().requires_grad_(True)

    def f(c, a, b):
        nngp, dot = layer.dual(c, a, b)
        return nngp, dot

    assert torch.autograd.gradcheck(f, (cov, var1, var2), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("layer", [nk.ReLU(), nk.LeakyReLU(0.2), nk.Abs(), nk.Erf(),
                                   nk.GELU(), nk.Tanh()], ids=repr)
def test_gradient_at_rho_one_is_finite_and_right(layer):
    """At x = x' (cov = var1 = var2) the NNGP is smooth in var: d/dvar variance(var)."""
    var = torch.tensor([0.8, 2.0], dtype=F64, requires_grad=True)
    nngp, dot = layer.dual(var, var, var)
    (g_n,) = torch.autograd.grad(nngp.sum(), var, retain_graph=True)
    (g_d,) = torch.autograd.grad(dot.sum(), var)
    assert torch.isfinite(g_n).all() and torch.isfinite(g_d).all()
    h = 1e-6
    with torch.no_grad():
        up = layer.dual(var + h, var + h, var + h)[0]
        down = layer.dual(var - h, var - h, var - h)[0]
    torch.testing.assert_close(g_n, (up - down) / (2 * h), rtol=1e-6, atol=1e-9)


def test_no_grad_results_equal_grad_results():
    """The in-place fast path and the differentiable path compute the same numbers."""
    var1 = torch.tensor([[0.7], [1.9]], dtype=F64)
    var2 = torch.tensor([[1.1, 0.4, 2.5]], dtype=F64)
    cov = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.4, -1.5]], dtype=F64)
    for layer in (nk.ReLU(), nk.LeakyReLU(0.2), nk.Abs(), nk.Erf()):
        fast = layer.dual(cov.clone(), var1, var2)
        slow = layer.dual(cov.clone().requires_grad_(True), var1, var2)
        for a, b in zip(fast, slow):
            torch.testing.assert_close(b.detach(), a, rtol=1e-15, atol=1e-300)


# --------------------------------------------------------------------------- identity
def test_equality_hash_and_repr_cover_every_parameter():
    assert nk.Tanh() == nk.Tanh() and hash(nk.Tanh()) == hash(nk.Tanh())
    assert nk.Tanh() != nk.Tanh(degree=48) and nk.Tanh() != nk.Sigmoid()
    assert nk.LeakyReLU(0.2) == nk.LeakyReLU(0.2) != nk.LeakyReLU(0.3)
    assert nk.Sin(1, 2, 3) != nk.Sin(1, 2, 3.5) and nk.Cos() != nk.Sin()
    f, g = (lambda t: t * t), (lambda t: t * t)
    assert nk.Elementwise(f) == nk.Elementwise(f) != nk.Elementwise(g)
    assert repr(nk.Elementwise(f)) != repr(nk.Elementwise(g))
    assert nk.Elementwise(f) != nk.Elementwise(f, derivative=lambda t: 2 * t)
    assert repr(nk.Tanh(degree=64)) == "Tanh(degree=64)" and repr(nk.SiLU()) == "SiLU()"
    assert nk.Identity() == nk.Identity()
    for layer in (nk.Tanh(), nk.Softplus(), nk.SiLU(), nk.Sigmoid(), nk.Elementwise(torch.sin)):
        assert pickle.loads(pickle.dumps(layer)) == layer


def test_named_smooth_layers_are_elementwise_classes_with_degree():
    assert isinstance(nk.Tanh(), nk.Elementwise) and isinstance(nk.SiLU, type)
    x = _x()
    # degree= selects the fixed Gauss–Hermite rule, still available
    k = nk.mlp(3, 8, nk.Tanh(degree=200), 1.0, 0.1).kernel(x * 0.2)
    ref = nk.mlp(3, 8, nk.Tanh(), 1.0, 0.1).kernel(x * 0.2)
    torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="degree"):
        nk.Tanh(degree=0)


def test_fixed_hermite_degree_beyond_float64_is_refused_clearly():
    """numpy's Gauss-Hermite weights underflow to NaN from degree 380: a NaN kernel used to
    surface as a misleading "inputs overflow" error."""
    with pytest.raises(ValueError, match="degree must be at most 360"):
        nk.Tanh(degree=400)
    with pytest.raises(ValueError, match="degree must be at most 360"):
        nk.Elementwise(torch.tanh, degree=1000)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.isfinite(nk.mlp(2, 8, activation=nk.Tanh(degree=360)).kernel(x).ntk).all()
