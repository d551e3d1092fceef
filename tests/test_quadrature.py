"""Quadrature duals of the smooth activations against an independent adaptive reference.

The reference is nested adaptive integration with ``scipy.integrate.quad`` in u- and v-space
(the pre-activations themselves), with break points at the activation's transition and
geometrically outwards to the Gaussian's tails, written with Python's ``math`` functions and
nothing from ntkit. Those integrals take seconds each, so the values for the parametrized
tests are stored in ``reference/quadrature/`` (regenerate with
``python tests/test_quadrature.py``); one test recomputes a few of them live, and one checks
the reference itself against the closed-form erf dual.

Error measure: ``|got − ref| / max(|ref|, 1e-2·sqrt(diag1·diag2))`` where ``diag`` is the
same dual at ``x = x'`` (``E[φ(u)²]`` or ``E[φ'(u)²]``). This is the relative error wherever
the value is not tiny compared with the kernel's scale; for an odd φ at ρ = 0 (value 0 by
symmetry) it is relative to 1 % of that scale.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit as nk
from ntkit.layers import PairKernel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REF_DIR = Path(__file__).resolve().parent / "reference" / "quadrature"
VARIANCES = [1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6]
RHOS = [-0.999, -0.5, 0.0, 0.7, 0.999999, 1.0]
TOL = 1e-8


# --------------------------------------------------------------------------- the reference
def _sig(t: float) -> float:
    return 1 / (1 + math.exp(-t)) if t >= 0 else math.exp(t) / (1 + math.exp(t))


REF_FUNCTIONS = {  # (φ, φ') in plain Python floats
    "tanh": (math.tanh, lambda t: 1 / math.cosh(t) ** 2 if abs(t) < 350 else 0.0),
    "sigmoid": (_sig, lambda t: _sig(t) * (1 - _sig(t))),
    "softplus": (lambda t: max(t, 0) + math.log1p(math.exp(-abs(t))), _sig),
    "silu": (lambda t: t * _sig(t), lambda t: _sig(t) * (1 + t * (1 - _sig(t)))),
    "atanlin": (lambda t: math.atan(t) + 0.1 * t, lambda t: 1 / (1 + t * t) + 0.1),
    "sinlin": (lambda t: math.sin(t) + 0.1 * t, lambda t: math.cos(t) + 0.1),
    "erf": (math.erf, lambda t: 2 / math.sqrt(math.pi) * math.exp(-t * t)),
}
_QUAD = dict(epsabs=0.0, epsrel=1e-13, limit=800)


def _npdf(x: float, m: float, s: float) -> float:
    return math.exp(-0.5 * ((x - m) / s) ** 2) / (math.sqrt(2 * math.pi) * s)


def _expect(g, m: float, s: float, points: list[float]) -> float:
    """E[g(v)] for v ~ N(m, s²) by adaptive quadrature over m ± 13 s."""
    from scipy import integrate

    if s == 0.0:
        return g(m)
    a, b = m - 13 * s, m + 13 * s
    inside = sorted({x for x in points if a < x < b} | ({m} if a < m < b else set()))
    return integrate.quad(lambda v: g(v) * _npdf(v, m, s), a, b, points=inside or None,
                          **_QUAD)[0]


def reference_dual(name: str, var1: float, var2: float, rho: float, which: str) -> float:
    """E[g(u) g(v)], g = φ ("nngp") or φ' ("dot"), (u, v) ~ N(0, [[var1, c], [c, var2]]).

    Outer integral over u, inner over v | u ~ N(ρ s2 u / s1, s2² (1 − ρ²)), both in the
    pre-activation's own units with break points at the transition (0) and at ±0.25·2^k out
    to 13 standard deviations, so that no Gauss–Kronrod panel is wide compared with its
    distance from the transition.
    """
    from scipy import integrate

    g = REF_FUNCTIONS[name][0 if which == "nngp" else 1]
    s1, s2 = math.sqrt(var1), math.sqrt(var2)
    r = math.sqrt(max(1 - rho * rho, 0.0))
    big = 13 * max(s1, s2, 1.0)
    geo = [0.25 * 2.0 ** k for k in range(int(math.log2(4 * big)) + 2)]
    points = sorted({0.0, *geo, *(-x for x in geo)})
    if name == "sinlin":  # oscillates everywhere: a break point every unit
        points = list(np.arange(-40.0, 41.0))

    def outer(u):
        return g(u) * _expect(g, rho * s2 * u / s1, s2 * r, points) * _npdf(u, 0.0, s1)

    a, b = -13 * s1, 13 * s1
    inside = {x for x in points if a < x < b} | {0.0}
    if abs(rho) * s2 > 0:  # where the inner mean crosses the transition's break points
        inside |= {x * s1 / (rho * s2) for x in points if a < x * s1 / (rho * s2) < b}
    return integrate.quad(outer, a, b, points=sorted(inside), **_QUAD)[0]


def reference_network(name: str, x: list[list[float]], depth: int, W_std: float,
                      b_std: float) -> tuple[np.ndarray, np.ndarray]:
    """NNGP and NTK of ``nk.mlp(depth, ., activation, W_std, b_std)`` composed from
    :func:`reference_dual` (NTK parameterization)."""
    xa = np.asarray(x, dtype=np.float64)
    n, d = xa.shape
    w2, b2 = W_std ** 2, b_std ** 2
    cov = w2 * (xa @ xa.T) / d + b2
    ntk = cov.copy()
    for _ in range(depth - 1):
        var = np.diag(cov).copy()
        nngp, dot = np.empty_like(cov), np.empty_like(cov)
        for i in range(n):
            for j in range(i, n):
                rho = 1.0 if i == j else float(np.clip(cov[i, j] / math.sqrt(var[i] * var[j]),
                                                       -1, 1))
                nngp[i, j] = nngp[j, i] = reference_dual(name, var[i], var[j], rho, "nngp")
                dot[i, j] = dot[j, i] = reference_dual(name, var[i], var[j], rho, "dot")
        cov = w2 * nngp + b2
        ntk = w2 * ntk * dot + cov
    return cov, ntk


# --------------------------------------------------------------------------- stored values
NETWORK = {"x": [[0.3, -1.1, 0.8], [1.2, 0.4, -0.5], [600.0, -500.0, 624.5]],  # norm 1e3
           "depth": 4, "W_std": 1.2, "b_std": 0.1}
DUAL_CASES = {  # name -> variances covered (sin(t) + 0.1t oscillates: see the warning test)
    "tanh": VARIANCES, "sigmoid": VARIANCES, "softplus": VARIANCES, "silu": VARIANCES,
    "atanlin": VARIANCES, "sinlin": [1e-4, 1e-2, 1.0],
}


def regenerate() -> None:  # pragma: no cover - run by hand, takes minutes
    REF_DIR.mkdir(parents=True, exist_ok=True)
    records = []
    for name, variances in DUAL_CASES.items():
        for var in variances:
            v1, v2 = var, 0.7 * var
            for which in ("nngp", "dot"):
                d1 = reference_dual(name, v1, v1, 1.0, which)
                d2 = reference_dual(name, v2, v2, 1.0, which)
                for rho in RHOS:
                    records.append(dict(act=name, var1=v1, var2=v2, rho=rho, which=which,
                                        value=reference_dual(name, v1, v2, rho, which),
                                        diag1=d1, diag2=d2))
    (REF_DIR / "duals.json").write_text(json.dumps(records, indent=0))
    kernels = {}
    for name in ("tanh", "softplus"):
        nngp, ntk = reference_network(name, **NETWORK)
        kernels[name] = {"nngp": nngp.tolist(), "ntk": ntk.tolist()}
    (REF_DIR / "network.json").write_text(json.dumps({**NETWORK, "kernels": kernels},
                                                     indent=1))


def _load(name: str):
    return json.loads((REF_DIR / name).read_text())


def _activation(name: str) -> nk.Layer:
    return {"tanh": nk.Tanh(), "sigmoid": nk.Sigmoid(), "softplus": nk.Softplus(),
            "silu": nk.SiLU(),
            "atanlin": nk.Elementwise(_atanlin),
            "sinlin": nk.Elementwise(_sinlin)}[name]


def _atanlin(t):
    return torch.atan(t) + 0.1 * t


def _sinlin(t):
    return torch.sin(t) + 0.1 * t


def _errors(records, nngp, dot):
    out = []
    for r, n, d in zip(records, nngp.tolist(), dot.tolist()):
        got = n if r["which"] == "nngp" else d
        scale = max(abs(r["value"]), 1e-2 * math.sqrt(r["diag1"] * r["diag2"]))
        out.append(abs(got - r["value"]) / scale)
    return np.array(out)


# --------------------------------------------------------------------------- tests
CASES = [(name, var) for name, variances in DUAL_CASES.items() for var in variances]


@pytest.mark.parametrize("name,var", CASES, ids=[f"{n}-{v:g}" for n, v in CASES])
def test_dual_matches_adaptive_reference(name, var):
    records = [r for r in _load("duals.json") if r["act"] == name and r["var1"] == var]
    assert len(records) == 2 * len(RHOS)
    t = lambda key: torch.tensor([r[key] for r in records], dtype=torch.float64)  # noqa: E731
    var1, var2, rho = t("var1"), t("var2"), t("rho")
    cov = rho * torch.sqrt(var1 * var2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # certified functions must not warn
        nngp, dot = _activation(name).dual(cov, var1, var2)
    err = _errors(records, nngp, dot)
    assert err.max() <= TOL, [(r["which"], r["rho"], f"{e:.1e}")
                              for r, e in zip(records, err) if e > TOL]


def test_stored_reference_is_the_adaptive_integral():
    """Three stored values recomputed live: the table is what reference_dual gives."""
    pytest.importorskip("scipy")
    records = _load("duals.json")
    picks = [r for r in records if (r["act"], r["var1"], r["rho"], r["which"]) in {
        ("tanh", 1e4, 0.7, "dot"), ("softplus", 1.0, -0.5, "nngp"),
        ("silu", 1e2, 0.999999, "nngp")}]
    assert len(picks) == 3
    for r in picks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quad's roundoff notes at epsrel 1e-13
            live = reference_dual(r["act"], r["var1"], r["var2"], r["rho"], r["which"])
        assert live == pytest.approx(r["value"], rel=1e-11)


@pytest.mark.parametrize("var", [1e-2, 1e2, 1e5])
def test_reference_agrees_with_the_closed_form_erf_dual(var):
    """The reference machinery (not the code under test) against Williams' closed form."""
    pytest.importorskip("scipy")
    v1, v2, rho = var, 0.6 * var, 0.8
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    nngp, dot = nk.Erf().dual(t(rho * math.sqrt(v1 * v2)), t(v1), t(v2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_n = reference_dual("erf", v1, v2, rho, "nngp")
        ref_d = reference_dual("erf", v1, v2, rho, "dot")
    assert ref_n == pytest.approx(float(nngp), rel=1e-10)
    assert ref_d == pytest.approx(float(dot), rel=1e-10)


@pytest.mark.parametrize("name", ["tanh", "softplus"])
def test_depth4_network_with_a_norm_1e3_row_matches_composed_reference(name):
    data = _load("network.json")
    x = torch.tensor(data["x"], dtype=torch.float64)
    k = nk.mlp(data["depth"], 64, _activation(name), data["W_std"], data["b_std"]).kernel(x)
    for kind in ("nngp", "ntk"):
        ref = np.array(data["kernels"][name][kind])
        got = k[kind].numpy()
        rel = np.abs(got - ref) / np.abs(ref)
        assert rel.max() <= TOL, (kind, rel)


def test_rho_one_and_equal_variances_give_the_variance_exactly():
    """x = x' in a tile: the next layer must see cov == var bit for bit (ρ exactly 1)."""
    var = torch.tensor([[0.3], [2.0], [4e5]], dtype=torch.float64)
    for act in (nk.Tanh(), nk.Sigmoid(), nk.Softplus(), nk.SiLU()):
        cov = torch.tensor([[0.3, 0.1, 5.0], [0.1, 2.0, -1.0], [5.0, -1.0, 4e5]],
                           dtype=torch.float64)
        state = PairKernel(cov=cov, var1=var, var2=var.T, ntk=torch.zeros(()), width=3)
        out = act.kernel_map(state)
        assert torch.equal(out.cov.diagonal(), out.var1.squeeze(1))
        assert torch.equal(out.var1.squeeze(1), act.variance(var).squeeze(1))
        # variance is the dual at equal arguments, bit for bit (same shapes)
        assert torch.equal(act.variance(var), act.dual(var, var, var, need_dot=False)[0])


def test_float32_inputs_and_non_finite_inputs():
    var1 = torch.tensor([[0.5], [3.0], [2e4]], dtype=torch.float32)
    var2 = torch.tensor([[1.5, 0.2, 5e5]], dtype=torch.float32)
    cov = torch.tensor([[0.3, -0.8, 0.999]], dtype=torch.float32) * torch.sqrt(var1 * var2)
    for act in (nk.Tanh(), nk.SiLU()):
        n32, d32 = act.dual(cov, var1, var2)
        n64, d64 = act.dual(cov.double(), var1.double(), var2.double())
        assert n32.dtype == d32.dtype == torch.float32
        torch.testing.assert_close(n32.double(), n64, rtol=1e-4, atol=1e-6 * n64.abs().max())
        torch.testing.assert_close(d32.double(), d64, rtol=1e-4, atol=0)
    # an overflowed variance must not come back as a finite number
    t = torch.tensor([1.0, math.inf], dtype=torch.float64)
    nngp, dot = nk.Tanh().dual(torch.tensor([0.5, 1.0], dtype=torch.float64), t, t)
    assert torch.isfinite(nngp[0]) and not torch.isfinite(nngp[1])
    assert not torch.isfinite(dot[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quadrature_on_cuda_matches_cpu():
    var = torch.tensor([0.5, 3.0, 2e4], dtype=torch.float64)
    cov = torch.tensor([0.2, -2.0, 1e4], dtype=torch.float64)
    cpu = nk.Tanh().dual(cov, var, var.flip(0))
    gpu = nk.Tanh().dual(cov.cuda(), var.cuda(), var.flip(0).cuda())
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=0)


if __name__ == "__main__":  # pragma: no cover
    if "--regenerate" in sys.argv or len(sys.argv) == 1:
        regenerate()
