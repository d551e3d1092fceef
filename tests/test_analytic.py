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


def test_refuses_kernel_larger_than_memory():
    x = torch.zeros(1, 3)
    big = x.expand(3_000_000, 3)  # a 3M x 3M kernel would need 72 TB
    with pytest.raises(MemoryError, match="out=PATH"):
        nk.mlp(2, 4).kernel(big)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_follows_inputs():
    x = torch.rand(64, 10, device="cuda", dtype=torch.float64)
    net = nk.mlp(4, 8)
    k = net.kernel(x)
    assert k.ntk.device.type == "cuda"
    torch.testing.assert_close(k.ntk.cpu(), net.kernel(x.cpu()).ntk, rtol=1e-10, atol=0)


def test_duplicate_rows_get_exact_self_kernel_everywhere():
    """x_i = x_j must give k(x_i, x_j) = k(x_i, x_i) bit for bit, in x2=None and cross calls."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 30, generator=g, dtype=torch.float64)
    x[25] = x[3]
    net = nk.mlp(4, 8, "relu")
    sym = net.kernel(x, memory_budget=100_000)  # rows 3 and 25 in different tiles
    cross = net.kernel(x[:10], x[20:])
    assert sym.ntk[3, 25] == sym.ntk[3, 3] == sym.ntk[25, 25]
    assert cross.ntk[3, 5] == sym.ntk[3, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_row_ids_match_exact_row_equality(dtype):
    """Duplicate detection (which makes rho exactly 1 for x = x') agrees with brute force,
    including fingerprint collisions (permuted rows), signed zeros and x1/x2 sharing."""
    from ntkit.kernels.analytic import _shared_row_ids

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
    assert torch.equal(activation.variance(var), activation.dual(var, var, var, False)[0])
    tile = torch.diag(var)
    full = activation.dual(tile, var[:, None], var[None, :], False)[0]
    if not isinstance(activation, nk.ABReLU):
        # Only the arc-cosine family is singular at rho = 1 (arccos); the others are smooth
        # there, and their transcendental functions may round differently between a tile
        # and a vector (vectorized vs scalar loops, quadrature summation order).
        eps = torch.finfo(dtype).eps
        assert torch.allclose(full.diagonal(), activation.variance(var), rtol=8 * eps, atol=0)
    else:
        assert torch.equal(full.diagonal(), activation.variance(var))
