"""Analytic infinite-width kernels: against neural-tangents' numbers, quadrature, Monte Carlo."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit as nk

# Kernels computed by neural-tangents 0.6.5 in float64 (see reference/nt/README.md).
REF = Path(__file__).resolve().parent / "reference" / "nt"
CASES = json.loads((REF / "cases.json").read_text())


def _net_for_case(case: dict) -> nk.Layer | None:
    name = case["file"]
    d = lambda: nk.Dense(1, W_std=1.0, b_std=0.1)  # noqa: E731 - widths are irrelevant here
    if name.startswith("residual"):
        return nk.serial(d(), nk.FanOut(2), nk.parallel(nk.serial(nk.ReLU(), d()), nk.Identity()),
                         nk.FanInSum(), nk.ReLU(), d())
    if name.startswith("layernorm"):
        return nk.serial(d(), nk.LayerNorm(), nk.Erf(), d(), nk.ReLU(), d())
    if "depth" not in case:
        return None
    act = case["activation"]
    layer = {"relu": nk.ReLU(), "erf": nk.Erf(), "gelu": nk.GELU(), "abs": nk.Abs(),
             "sin": nk.Sin(), "cos": nk.Cos()}.get(act)
    if act.startswith("leakyrelu"):
        layer = nk.LeakyReLU(case["alpha"])
    elif act == "abrelu":
        layer = nk.ABReLU(case["a"], case["b"])
    # The standard parameterization's NTK depends on the declared widths: 512 in these files.
    return nk.mlp(case["depth"], 512, layer, case["W_std"], case["b_std"],
                  parameterization=case["parameterization"])


KERNEL_CASES = [c for c in CASES if _net_for_case(c) is not None]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c["file"] for c in KERNEL_CASES])
def test_matches_neural_tangents_reference(case):
    data = np.load(REF / case["file"])
    x1, x2 = data["x1"], data["x2"]
    k = _net_for_case(case).kernel(x1, x2)
    # Entries with x = x' exactly: the reference itself is only good to ~1e-8 there.
    duplicate = (x1[:, None, :] == x2[None, :, :]).all(-1)
    for name in ("nngp", "ntk"):
        ref = data[name]
        got = k[name].numpy()
        assert got.dtype == np.float64 and got.shape == ref.shape
        rel = np.abs(got - ref) / np.abs(ref)
        assert rel[~duplicate].max() <= 1e-9, (name, rel[~duplicate].max())
        if duplicate.any():
            assert rel[duplicate].max() <= 1e-7, (name, rel[duplicate].max())


def test_jgh_values():
    net = nk.mlp(4, 512, "relu", W_std=1.0, b_std=0.1)
    x0 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    ntk = net.kernel(x0[:1], x0, get="ntk").ntk
    assert round(float(ntk[0, 0]), 4) == 0.2825
    assert round(float(ntk[0, 1]), 4) == 0.0644


def _awkward_inputs(d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, d, generator=g, dtype=torch.float64)
    v = x[0]
    return torch.cat([x, torch.stack([v, -v, torch.zeros(d), 1e-7 * v, 1e4 * v / v.norm()])])


CLOSED_VS_QUADRATURE = [
    (nk.Erf(), torch.erf),
    (nk.GELU(), torch.nn.functional.gelu),
    (nk.Sin(), torch.sin),
    (nk.Cos(), torch.cos),
    (nk.Sin(a=1.3, b=0.7, c=0.4), lambda x: 1.3 * torch.sin(0.7 * x + 0.4)),
]


@pytest.mark.parametrize("closed,fn", CLOSED_VS_QUADRATURE,
                         ids=[repr(c) for c, _ in CLOSED_VS_QUADRATURE])
def test_closed_form_matches_quadrature(closed, fn):
    x = _awkward_inputs()[:-1]  # the huge-norm row needs very high quadrature degree
    exact = nk.mlp(3, 8, closed, W_std=1.3, b_std=0.2).kernel(x)
    quad = nk.mlp(3, 8, nk.Elementwise(fn, degree=128), W_std=1.3, b_std=0.2).kernel(x)
    for name in ("nngp", "ntk"):
        rel = ((exact[name] - quad[name]).abs() / exact[name].abs().clamp_min(1e-300)).max()
        assert rel <= 1e-7, (name, float(rel))


ALL_ACTIVATIONS = [nk.ReLU(), nk.LeakyReLU(0.2), nk.ABReLU(-0.3, 2.0), nk.Abs(), nk.Erf(),
                   nk.GELU(), nk.Sin(), nk.Cos(), nk.Tanh(), nk.Sigmoid(), nk.Softplus(),
                   nk.SiLU(), nk.Identity(), nk.Elementwise(lambda x: x ** 3, degree=8)]


@pytest.mark.parametrize("act", ALL_ACTIVATIONS, ids=repr)
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_finite_symmetric_psd_and_diagonal(act, parameterization):
    x = _awkward_inputs()
    net = nk.mlp(3, 16, act, W_std=1.2, b_std=0.1, parameterization=parameterization)
    k = net.kernel(x)
    diag = net.kernel(x, diagonal=True)
    for name in ("nngp", "ntk"):
        mat = k[name]
        assert torch.isfinite(mat).all()
        assert torch.equal(mat, mat.T)
        eig = torch.linalg.eigvalsh(mat)
        assert eig.min() >= -1e-10 * eig.max()
        torch.testing.assert_close(diag[name], mat.diagonal(), rtol=1e-12, atol=0)


def test_tiling_and_x2_give_the_same_numbers():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(300, 20, generator=g, dtype=torch.float64)
    net = nk.mlp(4, 64, "relu")
    whole = net.kernel(x)
    small_tiles = net.kernel(x, memory_budget=200_000)  # forces many tiles
    cross = net.kernel(x, x.clone())
    # Ulp budget. Only the Gram differs between schedules: gemm may sum the 20 features in
    # another order for another tile shape, moving x.x'/n0 by at most ~d eps relative to
    # |x||x'|/n0 (a few ulps in practice; these rows are positive, so ~1 ulp of the entry).
    # Every later op is elementwise and identical in both. Four ReLU layers amplify a
    # relative change of rho by at most 1/sin(theta) each (<= 8 here, rho <= 0.99), but the
    # sum Theta = Sigma + Theta Sigma_dot damps it; 1e-14 (45 ulps) leaves a margin of ~10
    # over the largest deviation observed on AVX-512 and AVX2. The cross call also changes
    # which rows are detected as shared, hence the wider 1e-12.
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(small_tiles[name], whole[name], rtol=1e-14, atol=0)
        torch.testing.assert_close(cross[name], whole[name], rtol=1e-12, atol=0)


def test_float32_on_request_and_close_to_float64():
    x = torch.rand(50, 10, dtype=torch.float64)
    net = nk.mlp(4, 8, "relu")
    k64 = net.kernel(x)
    k32 = net.kernel(x, dtype=torch.float32)
    assert k64.ntk.dtype == torch.float64 and k32.ntk.dtype == torch.float32
    torch.testing.assert_close(k32.ntk.double(), k64.ntk, rtol=1e-5, atol=1e-6)
    # float32 inputs still give float64 kernels unless float32 is asked for.
    assert net.kernel(x.float()).ntk.dtype == torch.float64


def test_get_selects_kernels():
    x = torch.rand(4, 3)
    net = nk.mlp(2, 8)
    only = net.kernel(x, get="nngp")
    assert only.ntk is None and only.nngp.shape == (4, 4)
    with pytest.raises(KeyError, match="not computed"):
        only["ntk"]


# ----------------------------------------------------------------------- Monte Carlo
def _finite_kernels(module, x):
    """NNGP = output covariance, W_std² <a, a'>/n + b_std², from the last hidden layer; NTK from
    a plain autograd Jacobian."""
    *hidden, last = list(module)
    feats = torch.nn.Sequential(*hidden)(x)
    nngp = last.W_std ** 2 * feats @ feats.T / feats.shape[1] + last.b_std ** 2
    params = dict(module.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(module, p, (x,))[:, 0])(params)
    flat = torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], dim=1)
    return nngp.detach(), (flat @ flat.T).detach()


def test_monte_carlo_converges_at_rate_n_to_minus_half():
    x = _awkward_inputs(d=3)[:8]
    net = nk.mlp(3, 1, "relu", W_std=1.4, b_std=0.1)
    exact = net.kernel(x)
    widths = [16, 64, 256, 1024]
    errors = {"nngp": [], "ntk": []}
    for width in widths:
        arch = nk.mlp(3, width, "relu", W_std=1.4, b_std=0.1)
        sums = {"nngp": 0.0, "ntk": 0.0}
        samples = 24
        for s in range(samples):
            nngp, ntk = _finite_kernels(arch.module(3, seed=1000 * width + s, dtype=torch.float64), x)
            sums["nngp"] = sums["nngp"] + nngp
            sums["ntk"] = sums["ntk"] + ntk
        for name in errors:
            mean = sums[name] / samples
            errors[name].append(float((mean - exact[name]).norm() / exact[name].norm()))
    for name, errs in errors.items():
        slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
        assert -0.7 <= slope <= -0.3, (name, slope, errs)


# ----------------------------------------------------------------------- modules
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_module_initialisation_and_forward(parameterization):
    net = nk.mlp(3, 400, "relu", W_std=2.0, b_std=0.5, parameterization=parameterization)
    m = net.module(300, seed=0, dtype=torch.float64)
    dense = [layer for layer in m if isinstance(layer, nk.layers.DenseModule)]
    assert [d.weight.shape for d in dense] == [(400, 300), (400, 400), (1, 400)]
    w = dense[1].weight.detach()
    expected_std = 1.0 if parameterization == "ntk" else 2.0 / math.sqrt(400)
    assert abs(float(w.std()) / expected_std - 1) < 0.01  # 160k samples: se ~ 0.2%
    assert abs(float(w.mean())) < 5 * expected_std / 400
    # Same seed, same parameters; the forward map is the declared one.
    m2 = net.module(300, seed=0, dtype=torch.float64)
    x = torch.randn(5, 300, dtype=torch.float64)
    torch.testing.assert_close(m(x), m2(x))
    d0 = dense[0]
    pre = x @ d0.weight.T * (2.0 / math.sqrt(300) if parameterization == "ntk" else 1.0)
    pre = pre + (0.5 * d0.bias if parameterization == "ntk" else d0.bias)
    torch.testing.assert_close(m[0](x), pre)


def test_residual_module_runs():
    d = lambda: nk.Dense(32, 1.0, 0.1)  # noqa: E731
    net = nk.serial(d(), nk.FanOut(2), nk.parallel(nk.serial(nk.ReLU(), d()), nk.Identity()),
                    nk.FanInSum(), nk.LayerNorm(), nk.ReLU(), nk.Dense(3))
    out = net.module(4, seed=1)(torch.randn(7, 4))
    assert out.shape == (7, 3)


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize("x1,x2,match", [
    (np.array([[1.0, np.nan], [0.0, 1.0]]), None, r"NaN or infinite values in rows \[0\]"),
    (np.array([[1.0, 2.0]]), np.array([[1.0, np.inf]]), "x2 contains NaN"),
    (np.ones((3, 2)), np.ones((3, 4)), "x1 has 2 features but x2 has 4"),
    (np.ones((0, 3)), None, "empty"),
    (np.ones(3), None, r"shape \(N, d\)"),
    (np.array([["a", "b"]]), None, "expected real numbers"),
    (np.ones((2, 2), dtype=complex), None, "complex"),
])
def test_bad_inputs_raise_clear_errors(x1, x2, match):
    with pytest.raises(ValueError, match=match):
        nk.mlp(2, 4).kernel(x1, x2)


@pytest.mark.parametrize("build,match", [
    (lambda: nk.Dense(4, W_std=-1.0), "W_std"),
    (lambda: nk.Dense(4, b_std=float("nan")), "b_std"),
    (lambda: nk.Dense(0), "out_dim"),
    (lambda: nk.mlp(0, 4), "depth"),
    (lambda: nk.mlp(2, 4, "swishy"), "Unknown activation"),
    (lambda: nk.mlp(2, 4, parameterization="mup"), "parameterization"),
    (lambda: nk.Elementwise(lambda x: x, degree=0), "degree"),
])
def test_bad_hyperparameters_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_branch_mismatch_errors():
    with pytest.raises(ValueError, match="FanInSum"):
        nk.serial(nk.Dense(2), nk.FanOut(2), nk.Dense(3)).kernel(np.ones((2, 2)))
    with pytest.raises(ValueError, match="2 branches but received 3"):
        nk.serial(nk.FanOut(3), nk.parallel(nk.Identity(), nk.Identity())).kernel(np.ones((2, 2)))


def test_refuses_kernel_larger_than_memory(monkeypatch):
    # A fixed amount of free memory, so that the refusal does not depend on the host.
    monkeypatch.setattr("ntkit.layers.evaluate.available_memory", lambda device: 16 * 2**30)
    x = torch.zeros(1, 3)
    big = x.expand(3_000_000, 3)  # a 3M x 3M kernel would need 72 TB
    with pytest.raises(MemoryError, match="out=PATH"):
        nk.mlp(2, 4).kernel(big)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="ru_maxrss is in KiB on Linux only (bytes on macOS)")
def test_peak_memory_is_output_plus_tiles():
    """N = 6000 at d = 784: two 288 MB outputs; the workspace must stay O(tile)."""
    code = """
import resource, torch, ntkit as nk
x = torch.rand(6000, 784, dtype=torch.float64)
net = nk.mlp(4, 512, 'relu')
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
k = net.kernel(x)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    output_bytes = 2 * 6000 * 6000 * 8
    assert growth < output_bytes + 300 * 2**20, growth / 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_follows_inputs():
    x = torch.rand(64, 10, device="cuda", dtype=torch.float64)
    net = nk.mlp(4, 8)
    k = net.kernel(x)
    assert k.ntk.device.type == "cuda"
    torch.testing.assert_close(k.ntk.cpu(), net.kernel(x.cpu()).ntk, rtol=1e-10, atol=0)


@pytest.mark.parametrize("W_std,b_std", [(1.0, 0.1), (1.3, 0.2)])
def test_duplicate_rows_get_exact_self_kernel_everywhere(W_std, b_std):
    """x_i = x_j must give k(x_i, x_j) = k(x_i, x_i) in x2=None and cross calls: rho exactly 1.

    The elementwise maps then see identical arguments, but at other positions of other tile
    shapes, where a vectorised body and a scalar tail may contract a*b + c into an FMA
    differently (bit equality held only because W_std = 1 made the products exact). Budget:
    at most 1 ulp per such op, about 4 per layer over 4 layers: 16 ulps. A rho of 1 - eps
    instead would cost ~1e-8 through arccos, a million times more.
    """
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 30, generator=g, dtype=torch.float64)
    x[25] = x[3]
    net = nk.mlp(4, 8, "relu", W_std=W_std, b_std=b_std)
    sym = net.kernel(x, memory_budget=100_000)  # rows 3 and 25 in different tiles
    cross = net.kernel(x[:10], x[20:])
    ref = sym.ntk[3, 3]
    budget = 16 * torch.finfo(torch.float64).eps * float(ref)
    for value in (sym.ntk[3, 25], sym.ntk[25, 25], cross.ntk[3, 5]):
        assert abs(float(value - ref)) <= budget, (float(value), float(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_row_ids_match_exact_row_equality(dtype):
    """Duplicate detection (which makes rho exactly 1 for x = x') agrees with brute force,
    including fingerprint collisions (permuted rows), signed zeros and x1/x2 sharing."""
    from ntkit.layers.evaluate import _shared_row_ids

    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g, dtype=dtype)
    base[0, 0] = 0.0
    permuted = base[1].flip(0)[None]                  # same fingerprint as base[1], not equal
    signed_zero = base[0].clone()[None]
    signed_zero[0, 0] = -0.0                          # equal in value to base[0]
    x1 = torch.cat([base, base[2:3], permuted, signed_zero])
    x2 = torch.cat([base[4:], torch.randn(3, 5, generator=g, dtype=dtype), permuted])

    fortran = x1.T.contiguous().T                     # column-major storage, same rows
    for a, b in [(x1, None), (x1, x2), (base, None), (x2[:2], base[:2]), (fortran, x2)]:
        ids1, ids2 = _shared_row_ids(a, b)
        other = a if b is None else b
        truth = (a[:, None, :] == other[None, :, :]).all(dim=2)
        if b is None:
            truth &= ~torch.eye(a.shape[0], dtype=torch.bool)
        if not bool(truth.any()):
            assert ids1 is None and ids2 is None
            continue
        same = ids1[:, None] == ids2[None, :]
        if b is None:
            same &= ~torch.eye(a.shape[0], dtype=torch.bool)
        assert torch.equal(same, truth)


@pytest.mark.parametrize("activation", [nk.ReLU(), nk.LeakyReLU(0.2), nk.ABReLU(-0.5, 2.0),
                                        nk.Abs(), nk.Erf(), nk.GELU(), nk.Sin(), nk.Tanh()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variance_is_the_dual_at_equal_arguments_bit_for_bit(activation, dtype):
    """Row variances and tile diagonals take different code paths. For the ReLU family they
    must agree exactly, or the next layer's correlation at x = x' is 1 - eps and arccos
    amplifies it to ~1e-8."""
    var = torch.rand(300, dtype=dtype) * 5 + torch.rand(300, dtype=dtype) * 1e-3
    if type(activation).variance is not nk.layers.Activation.variance:
        # Only an override can disagree; the base class *is* the dual at equal arguments.
        assert torch.equal(activation.variance(var), activation.dual(var, var, var, False)[0])
    if activation.uses_quadrature:
        var = var[:40]  # a 300 x 300 tile of quadrature takes tens of seconds
    tile = torch.diag(var)
    full = activation.dual(tile, var[:, None], var[None, :], False)[0]
    if not isinstance(activation, nk.ABReLU):
        # Only the arc-cosine family is singular at rho = 1 (arccos); the others are smooth
        # there, and their transcendental functions may round differently between a tile
        # and a vector (vectorized vs scalar loops, quadrature summation order).
        # Budget: the tile and the vector reach each transcendental (erf/arcsin, exp, tanh,
        # ...) through differently vectorised loops, 1-2 ulps apart (SLEEF vs libm); with the
        # 2-4 such ops in a dual and the rounding of the products around them, 8 ulps.
        eps = torch.finfo(dtype).eps
        assert torch.allclose(full.diagonal(), activation.variance(var), rtol=8 * eps, atol=0)
    else:
        assert torch.equal(full.diagonal(), activation.variance(var))


# ----------------------------------------------------------------------- symmetry by construction
class _AsymmetricRounding(nk.Layer):
    """A closed-form layer whose (i, j) and (j, i) entries differ slightly, as two
    differently rounded evaluations of a symmetric formula would: ``cov + 1e-13 var1``."""

    def kernel_map(self, k):
        return k.replace(cov=k.cov + 1e-13 * k.var1,
                         ntk=None if k.ntk is None else k.ntk + 1e-13 * k.var1)

    def build(self, in_dim, generator, dtype, device):  # pragma: no cover - kernel only
        return torch.nn.Identity()


@pytest.mark.parametrize("n,budget", [(37, None), (37, 40_000)])
def test_symmetric_kernel_is_mirrored_in_every_diagonal_tile(n, budget):
    """K == K.T by construction, for closed forms too, whatever the rounding of the layers:
    the upper triangle (as computed by a cross call) is kept and mirrored."""
    x = torch.randn(n, 4, dtype=torch.float64)
    net = nk.serial(nk.Dense(8, 1.2, 0.1), nk.ReLU(), _AsymmetricRounding(), nk.Dense(1))
    sym = net.kernel(x, memory_budget=budget)  # 40 kB: tiles of 9 rows, the last partial
    cross = net.kernel(x, x.clone())
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    for name in ("nngp", "ntk"):
        assert torch.equal(sym[name], sym[name].T)
        assert not torch.equal(cross[name], cross[name].T)  # the layer is asymmetric
        # Same elementwise maps on the same upper triangle; only the Gram's schedule differs,
        # by a few ulps of |x||x'| (not of the entry, which may be a cancellation near 0).
        scale = float(cross[name].abs().max())
        torch.testing.assert_close(sym[name][upper], cross[name][upper], rtol=1e-14,
                                   atol=1e-14 * scale)


# ----------------------------------------------------------------------- overflow
OVERFLOW_NETS = {
    "relu": lambda: nk.mlp(3, 64, "relu"),
    "erf": lambda: nk.mlp(3, 64, "erf"),
    "gelu": lambda: nk.mlp(3, 64, "gelu"),
    "tanh": lambda: nk.mlp(3, 64, nk.Tanh(degree=8)),
    "layernorm": lambda: nk.serial(nk.Dense(8, 1.0, 0.1), nk.LayerNorm(), nk.ReLU(),
                                   nk.Dense(1)),
}


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e200), (torch.float32, 1e30)])
@pytest.mark.parametrize("mode", ["symmetric", "cross", "diagonal"])
@pytest.mark.parametrize("net", OVERFLOW_NETS, ids=str)
def test_overflow_raises_naming_the_rows(net, mode, dtype, scale):
    """Inputs whose kernel overflows the dtype give a clear error naming the rows (global
    indices) and the remedy, never an all-NaN kernel."""
    x = torch.randn(5, 3, dtype=dtype)
    x[[1, 3]] *= scale
    model = OVERFLOW_NETS[net]()
    if mode == "cross":
        x1 = torch.randn(4, 3, dtype=dtype)
        call, where = (lambda: model.kernel(x1, x, dtype=dtype)), r"rows \[1, 3\] of x2"
    else:
        call = lambda: model.kernel(x, dtype=dtype, diagonal=mode == "diagonal")  # noqa: E731
        where = r"rows \[1, 3\] of x1"
    with pytest.raises(ValueError, match=where) as info:
        call()
    assert "overflow" in str(info.value) and "rescale the inputs" in str(info.value)
    # The same inputs at a sane scale are fine, and large-but-representable ones too.
    assert torch.isfinite(model.kernel(x / scale * 1e3, dtype=dtype).ntk).all()


# ----------------------------------------------------------------------- gradients
GRAD_NETS = {
    "relu": lambda: nk.mlp(3, 64, "relu", W_std=1.3, b_std=0.2),
    "erf": lambda: nk.mlp(3, 64, "erf", W_std=1.3, b_std=0.2),
    "gelu": lambda: nk.mlp(3, 64, "gelu", W_std=1.3, b_std=0.2),
    "tanh": lambda: nk.mlp(3, 64, nk.Tanh(degree=16), W_std=1.3, b_std=0.2),
    "layernorm": lambda: nk.serial(nk.Dense(8, 1.2, 0.2), nk.LayerNorm(), nk.GELU(),
                                   nk.Dense(1, 1.1, 0.1)),
    "layernorm-relu": lambda: nk.serial(nk.Dense(8, 1.2, 0.2), nk.LayerNorm(), nk.ReLU(),
                                        nk.Dense(1, 1.1, 0.1)),
    "residual-gelu": lambda: nk.serial(
        nk.Dense(8, 1.0, 0.1), nk.FanOut(2),
        nk.parallel(nk.serial(nk.GELU(), nk.Dense(8, 1.0, 0.1)), nk.Identity()),
        nk.FanInSum(), nk.GELU(), nk.Dense(1, 1.0, 0.1)),
}


@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
@pytest.mark.parametrize("mode", ["symmetric", "cross", "diagonal"])
@pytest.mark.parametrize("net", GRAD_NETS, ids=str)
def test_gradients_with_respect_to_inputs(net, mode, kernel):
    """Kernels are differentiable in x1 and x2 (finite differences agree: gradcheck).

    Symmetric calls differentiate the diagonal too, where rho = 1 along every move of one
    row (so d rho = 0 there, and an arccos must not turn it into NaN)."""
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(5, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    x2 = torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    model = GRAD_NETS[net]()
    if mode == "symmetric":
        fn, args = (lambda a: model.kernel(a, get=kernel)[kernel]), (x1,)
    elif mode == "cross":
        fn, args = (lambda a, b: model.kernel(a, b, get=kernel)[kernel]), (x1, x2)
    else:
        fn, args = (lambda a: model.kernel(a, get=kernel, diagonal=True)[kernel]), (x1,)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_gradients_with_respect_to_tensor_hyperparameters(parameterization):
    """Dense(W_std=tensor, b_std=tensor) makes the kernels differentiable in them."""
    x = torch.randn(5, 3, dtype=torch.float64)
    w = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def ntk(w, b):
        net = nk.serial(nk.Dense(16, w, b, parameterization), nk.GELU(),
                        nk.Dense(1, w, b, parameterization))
        return net.kernel(x, memory_budget=4_000).ntk  # several tiles, mirrored
    assert torch.autograd.gradcheck(ntk, (w, b), eps=1e-6, atol=1e-7, rtol=1e-5)
    # Tensor scales give the same numbers as floats, and modules read their values.
    plain = nk.serial(nk.Dense(16, 1.3, 0.2, parameterization), nk.GELU(),
                      nk.Dense(1, 1.3, 0.2, parameterization))
    torch.testing.assert_close(ntk(w, b).detach(), plain.kernel(x).ntk, rtol=1e-15, atol=0)
    assert repr(nk.Dense(16, w, b, parameterization)) == repr(plain.layers[0])
    module = nk.Dense(16, w, b, parameterization).module(3, seed=0)
    assert module.W_std == pytest.approx(1.3) and module.b_std == pytest.approx(0.2)
    with pytest.raises(ValueError, match="W_std must be a real number or a 0-d"):
        nk.Dense(4, W_std=torch.ones(2))
    with pytest.raises(ValueError, match="b_std must be finite and >= 0"):
        nk.Dense(4, b_std=torch.tensor(-1.0))


def test_kernels_without_tracked_inputs_do_not_require_grad():
    x = torch.randn(6, 3, dtype=torch.float64)
    k = nk.mlp(3, 8, "relu").kernel(x)
    assert not k.ntk.requires_grad and not k.nngp.requires_grad


# ----------------------------------------------------------------------- layers answer for themselves
class _Block(nk.Layer):
    """A user-defined composite: Dense then a quadrature activation, held as one attribute."""

    def __init__(self, width: int):
        self.inner = nk.serial(nk.Dense(width, 1.3, 0.2), nk.Tanh(degree=8))

    def out_dim(self, in_dim):
        return self.inner.out_dim(in_dim)

    def kernel_map(self, k):
        return self.inner.kernel_map(k)

    def build(self, in_dim, generator, dtype, device):
        return self.inner.build(in_dim, generator, dtype, device)


def test_user_composite_layers_are_tiled_like_builtins(monkeypatch):
    import ntkit.layers.evaluate as analytic

    custom = nk.serial(_Block(8), nk.Dense(1))
    builtin = nk.serial(nk.Dense(8, 1.3, 0.2), nk.Tanh(degree=8), nk.Dense(1))
    assert custom.uses_quadrature and builtin.uses_quadrature
    assert nk.Tanh().uses_quadrature and not nk.ReLU().uses_quadrature
    assert not nk.mlp(3, 8, "relu").uses_quadrature
    heavy = []
    real = analytic._tile_size
    monkeypatch.setattr(analytic, "_tile_size",
                        lambda budget, n, itemsize, h: heavy.append(h) or real(budget, n,
                                                                               itemsize, h))
    x = torch.randn(30, 3, dtype=torch.float64)
    k_custom = custom.kernel(x, memory_budget=2_000_000)
    k_builtin = builtin.kernel(x, memory_budget=2_000_000)
    assert heavy == [True, True]
    for name in ("nngp", "ntk"):
        # Same tiles and the same elementwise maps: a deterministic rerun, bit for bit.
        assert torch.equal(k_custom[name], k_builtin[name])
        assert torch.equal(k_custom[name], k_custom[name].T)


# ----------------------------------------------------------------------- zero-variance rows
def test_zero_variance_rows_follow_the_rho_zero_convention():
    """A zero input with b_std = 0 has zero variance after the first layer. Convention (as
    neural-tangents): its correlation with anything is 0, so the ReLU derivative term is
    E[phi'(u) phi'(v)] = 1/4 for independent u, v. By hand, standard parameterization,
    Dense(W=1.3, b=0) -> ReLU -> Dense(W=1.1, b=0.1):
    NNGP row = 1.1^2 * 0 + 0.1^2 = 0.01, NTK row = 1.1^2 * (1 * 1/4) + 512 * 0 + 1 = 1.3025
    (the first layer's trainable bias contributes 1 to Theta before the ReLU)."""
    x = torch.randn(5, 3, dtype=torch.float64)
    x[2] = 0.0
    net = nk.serial(nk.Dense(512, 1.3, 0.0, "standard"), nk.ReLU(),
                    nk.Dense(1, 1.1, 0.1, "standard"))
    k = net.kernel(x)
    diag = net.kernel(x, diagonal=True)
    for got in (k.nngp[2], k.nngp[:, 2], diag.nngp[2:3]):
        torch.testing.assert_close(got, torch.full_like(got, 0.01), rtol=1e-15, atol=0)
    for got in (k.ntk[2], k.ntk[:, 2], diag.ntk[2:3]):
        torch.testing.assert_close(got, torch.full_like(got, 1.3025), rtol=1e-15, atol=0)
    others = [0, 1, 3, 4]
    rest = net.kernel(x[others])
    for name in ("nngp", "ntk"):
        assert torch.equal(k[name][others][:, others], rest[name])


def test_layernorm_of_a_zero_variance_row_is_zero():
    """LayerNorm maps a zero-variance row to 0 (the inv = 0 branch); the other rows become
    unit-variance with correlation rho = x.x'/(|x||x'|). Independent closed form, NTK
    parameterization, Dense(W=1.3, b=0) -> LayerNorm -> ReLU -> Dense(W=1.1, b=0.1):
    NNGP = 1.21 (sin t + (pi - t) cos t)/(2 pi) + 0.01 and NTK = 1.21 rho (pi - t)/(2 pi) + NNGP
    with t = arccos rho; the zero row gets 0.01 in both."""
    x = torch.randn(5, 3, dtype=torch.float64)
    x[1] = 0.0
    net = nk.serial(nk.Dense(8, 1.3, 0.0), nk.LayerNorm(), nk.ReLU(), nk.Dense(1, 1.1, 0.1))
    k = net.kernel(x)
    xn = x.numpy()
    norms = np.linalg.norm(xn, axis=1)
    rho = np.clip(xn @ xn.T / np.maximum(np.outer(norms, norms), 1e-300), -1, 1)
    np.fill_diagonal(rho, 1.0)
    t = np.arccos(rho)
    nngp = 1.21 * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi) + 0.01
    ntk = 1.21 * rho * (np.pi - t) / (2 * np.pi) + nngp
    nngp[1, :] = nngp[:, 1] = 0.01
    ntk[1, :] = ntk[:, 1] = 0.01
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-13, atol=0)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-13, atol=0)
    diag = net.kernel(x, diagonal=True)
    np.testing.assert_allclose(diag.ntk.numpy(), np.diag(ntk), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------- finite width vs analytic
def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True) * math.sqrt(d)


MC_NETS = {
    # LayerNorm right after a Dense layer, where its features have mean zero (the analytic
    # map assumes it): finite-width bias O(1/n) from the sample std.
    "layernorm": lambda n: nk.serial(nk.Dense(n, 1.2, 0.2), nk.LayerNorm(), nk.ReLU(),
                                     nk.Dense(1, 1.1, 0.1)),
    # tests/test_empirical.py's RESIDUAL at width n: two random layers, bias O(1/n).
    "residual": lambda n: nk.serial(
        nk.Dense(n, 1.0, 0.1), nk.FanOut(2),
        nk.parallel(nk.serial(nk.ReLU(), nk.Dense(n, 1.0, 0.1)), nk.Identity()),
        nk.FanInSum(), nk.ReLU(), nk.Dense(1, 1.0, 0.1)),
}


@pytest.mark.parametrize("net,power", [("layernorm", 1.06), ("residual", 1.12)])
def test_finite_width_networks_match_their_analytic_kernels(net, power):
    """The finite networks (LayerNormModule, FanOut/parallel/FanInSum modules) average to the
    analytic kernels: z-scores of the Monte Carlo means below 4.5 (standard errors from 100
    samples). Width 128 keeps the O(1/n) finite-width bias (<1%) under a standard error
    (1-3%). Power: a kernel off by 6% (LayerNorm) or 12% (residual) is rejected; the forward
    bugs this guards against (normalising over the batch axis, a branch dropped or shared)
    move the kernels by far more. Dropping the centring cannot be seen here: after a Dense
    layer the features have mean zero and centring changes the kernel only at O(1/n^2);
    test_layernorm_module_centres_and_scales_each_example_over_its_features pins it."""
    x = _unit_rows(4, 3, 11)
    mc = nk.monte_carlo_kernel(MC_NETS[net](128), x, n_samples=100, seed=5)
    exact = MC_NETS[net](128).kernel(x)
    for name in ("nngp", "ntk"):
        stderr = getattr(mc, name + "_stderr")
        z = (mc[name] - exact[name]) / stderr
        assert float(z.abs().max()) < 4.5, (name, z)
        z_wrong = (mc[name] - power * exact[name]) / stderr
        assert float(z_wrong.abs().max()) > 4.5, name


def test_layernorm_module_centres_and_scales_each_example_over_its_features():
    """The forward map by its definition: each row (not each feature over the batch) gets
    mean 0 and mean square 1, whatever the rows' offsets and scales."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 50, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [3.0], [40.0]])
    z = z + torch.tensor([[5.0], [-2.0], [0.0]])
    out = nk.LayerNorm(eps=0.0).module(50)(z)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(3, dtype=torch.float64),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(out.pow(2).mean(dim=1), torch.ones(3, dtype=torch.float64),
                               rtol=1e-14, atol=0)
    # One example alone gives the same output: nothing is mixed across the batch.
    torch.testing.assert_close(nk.LayerNorm(eps=0.0).module(50)(z[1:2]), out[1:2],
                               rtol=0, atol=0)
