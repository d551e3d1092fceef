"""Activations only on Gaussian pre-activations: refused networks, allowed ones, and why.

An activation's kernel map is its Gaussian dual E[φ(u)φ(v)], the infinite-width limit only
when (u, v) is a centred Gaussian pair: after a Dense layer (CLT), LayerNorm of one, an
affine activation of one, or a FanInSum of such branches. On raw inputs, another
activation's output, LayerNorm of one, or a sum with such a branch the finite network does
not converge to it, and ntkit refuses (``PairKernel.gaussian``). The Monte Carlo test shows
the refused answer really is wrong, against the finite network and an explicit formula.
"""

from __future__ import annotations

import pytest
import torch

import ntkit as nk
from ntkit.layers import Layer
from ntkit.layers.activations import ABReLU

F64 = torch.float64
REMEDY = (r"put a Dense layer before it; activations' kernels assume Gaussian "
          r"pre-activations \(infinite width\)")


def _inputs(n: int = 5, d: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64) + 0.3


def _residual(branch: Layer, other: Layer) -> list[Layer]:
    return [nk.FanOut(2), nk.parallel(branch, other), nk.FanInSum()]


class _UserLayer(Layer):
    """A user-defined layer that scales the features; ``gaussian`` is passed to
    ``PairKernel.replace`` only when given (the default declares nothing)."""

    def __init__(self, **declared):
        self._declared = declared

    def kernel_map(self, k):
        return k.replace(cov=4 * k.cov, var1=4 * k.var1, var2=4 * k.var2,
                         ntk=None if k.ntk is None else 4 * k.ntk, **self._declared)

    def build(self, in_dim, generator, dtype, device):  # pragma: no cover - kernel only
        return torch.nn.Identity()

    def __repr__(self):
        return "UserLayer()"


# ------------------------------------------------------------------------- refused
REFUSED = {
    "relu-on-raw-inputs": (nk.serial(nk.ReLU(), nk.Dense(1)), r"ReLU\(\) at layer 0 "),
    "bare-activation": (nk.Erf(), r"Erf\(\) receives"),
    "relu-then-tanh": (nk.serial(nk.Dense(8), nk.ReLU(), nk.Tanh(), nk.Dense(1)),
                       r"Tanh\(\) at layer 2 "),
    "layernorm-of-activation": (
        nk.serial(nk.Dense(8), nk.ReLU(), nk.LayerNorm(), nk.ReLU(), nk.Dense(1)),
        r"ReLU\(\) at layer 3 "),
    "layernorm-of-raw-inputs": (nk.serial(nk.LayerNorm(), nk.GELU(), nk.Dense(1)),
                                r"GELU\(\) at layer 1 "),
    "relu(z)+z": (nk.serial(nk.Dense(8), *_residual(nk.ReLU(), nk.Identity()), nk.ReLU(),
                            nk.Dense(1)), r"ReLU\(\) at layer 4 "),
    "nested-branch": (nk.serial(nk.Dense(8), *_residual(nk.serial(nk.ReLU(), nk.Sin()),
                                                        nk.Dense(8)), nk.Dense(1)),
                      r"Sin\(.*\) at layer 2, branch 0, layer 1 "),
    "identity-keeps-raw": (nk.serial(nk.Identity(), nk.LeakyReLU(0.2), nk.Dense(1)),
                           r"LeakyReLU\(alpha=0.2\) at layer 1 "),
    "user-function-on-raw": (nk.serial(nk.Elementwise(torch.tanh, derivative=lambda t:
                                                      1 - torch.tanh(t) ** 2), nk.Dense(1)),
                             r"Elementwise\(.*\) at layer 0 "),
    "user-layer-declares-non-gaussian": (
        nk.serial(nk.Dense(8), _UserLayer(gaussian=False), nk.ReLU(), nk.Dense(1)),
        r"ReLU\(\) at layer 2 "),
}


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diagonal"])
@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_activation_on_non_gaussian_features_is_refused(name, get, diagonal):
    net, where = REFUSED[name]
    with pytest.raises(ValueError, match=where + r".*not Gaussian at infinite width.*"
                                         + REMEDY):
        net.kernel(_inputs(), get=get, diagonal=diagonal)


def test_refusal_in_a_tiled_cross_kernel():
    net, where = REFUSED["relu-then-tanh"]
    with pytest.raises(ValueError, match=where):  # tiles of 9 rows
        net.kernel(_inputs(12), _inputs(11, seed=1), memory_budget=2_000_000)


# ------------------------------------------------------------------------- allowed
ALLOWED = {
    "mlp": nk.mlp(3, 16, "relu"),
    "residual-dense-branch": nk.serial(nk.Dense(8), *_residual(
        nk.serial(nk.ReLU(), nk.Dense(8)), nk.Identity()), nk.ReLU(), nk.Dense(1)),
    "layernorm-after-dense": nk.serial(nk.Dense(8), nk.LayerNorm(), nk.Erf(), nk.Dense(8),
                                       nk.ReLU(), nk.Dense(1)),
    "sum-of-dense-branches": nk.serial(*_residual(nk.Dense(8), nk.Dense(8, 0.5)), nk.Tanh(),
                                       nk.Dense(1)),
    "identity-after-dense": nk.serial(nk.Dense(8), nk.Identity(), nk.GELU(), nk.Dense(1)),
    "affine-on-raw-inputs": nk.serial(ABReLU(2.0, 2.0), nk.Dense(1)),
    "affine-between": nk.serial(nk.Dense(8), ABReLU(-1.5, -1.5), nk.ReLU(), nk.Dense(1)),
    # A user layer that declares nothing leaves Gaussianity unknown: unchecked, as before.
    "user-layer-undeclared": nk.serial(_UserLayer(), nk.ReLU(), nk.Dense(1)),
    "user-layer-declares-gaussian": nk.serial(_UserLayer(gaussian=True), nk.ReLU(),
                                              nk.Dense(1)),
}


@pytest.mark.parametrize("name", list(ALLOWED))
def test_activation_on_gaussian_features_computes(name):
    net, x = ALLOWED[name], _inputs()
    k = net.kernel(x)
    diag = net.kernel(x, diagonal=True)
    for kind in ("nngp", "ntk"):
        assert torch.isfinite(k[kind]).all()
        torch.testing.assert_close(k[kind].diagonal(), diag[kind], rtol=1e-12, atol=0)


def test_affine_activation_on_raw_inputs_is_exact():
    """a·x needs no Gaussian input: its kernel is a²·x·x'/n0, then the Dense map."""
    x = _inputs()
    k = nk.serial(ABReLU(2.0, 2.0), nk.Dense(1, 1.3, 0.4)).kernel(x)
    exact = 1.3 ** 2 * 4.0 * (x @ x.T) / x.shape[1] + 0.4 ** 2
    torch.testing.assert_close(k.nngp, exact, rtol=1e-13, atol=0)
    torch.testing.assert_close(k.ntk, exact, rtol=1e-13, atol=0)  # one layer: NTK = NNGP


# ----------------------------------------------------------- the refused answer is wrong
def test_refused_kernel_differs_from_the_finite_network():
    """ReLU -> Dense(n) -> ReLU -> Dense(1) on raw inputs. The finite network computes
    relu(x) deterministically, so its infinite-width NNGP is the arc-cosine map of the Gram
    of relu(x): the remedy ``net_without_first_relu.kernel(relu(x))``. The Gaussian dual
    applied to the raw Gram (what ntkit returned before) is far from it; a Monte Carlo
    average of finite networks agrees with the remedy and rejects the Gaussian answer."""
    x = _inputs(6, 5, seed=2)
    tail = nk.serial(nk.Dense(512, 1.2, 0.1), nk.ReLU(), nk.Dense(1, 1.1, 0.1))
    exact = tail.kernel(nk.ReLU()(x), get="nngp").nngp

    # What the unchecked map computes: ReLU's dual on the raw Gram, then the tail's maps.
    n0 = x.shape[1]
    gram = x @ x.T / n0
    sq = gram.diagonal()
    relu_cov, _ = nk.ReLU().dual(gram, sq[:, None], sq[None, :], need_dot=False)
    relu_var = nk.ReLU().variance(sq)
    cov, v = 1.2 ** 2 * relu_cov + 0.1 ** 2, 1.2 ** 2 * relu_var + 0.1 ** 2
    cov, _ = nk.ReLU().dual(cov, v[:, None], v[None, :], need_dot=False)
    gaussian_answer = 1.1 ** 2 * cov + 0.1 ** 2

    net = nk.serial(nk.ReLU(), tail)
    mc = nk.monte_carlo_kernel(net, x, n_samples=40, seed=3, get="nngp")
    err_exact = ((mc.nngp - exact).abs() / exact.abs()).max()
    err_gauss = ((mc.nngp - gaussian_answer).abs() / exact.abs()).max()
    gap = ((gaussian_answer - exact).abs() / exact.abs()).max()
    assert gap > 0.5, gap  # the refused answer is wrong by far more than the MC noise
    assert err_exact < 0.05, err_exact
    assert err_gauss > 4 * err_exact, (err_gauss, err_exact)
    with pytest.raises(ValueError, match=REMEDY):
        net.kernel(x, get="nngp")
