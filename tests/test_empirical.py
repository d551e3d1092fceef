"""Empirical NTK/NNGP and Monte Carlo kernels.

Every method is checked against an independent reference: per-example, per-output gradients
from plain ``torch.autograd.grad`` (no torch.func), contracted in float64. The Monte Carlo
estimates are checked against the analytic infinite-width kernels with tolerances set by
their own standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ntkit as nk

F64 = torch.float64
ALL_METHODS = ("structured", "jacobian", "ntk_vp")
GENERIC = ("jacobian", "ntk_vp")


def naive_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None,
              names: list[str] | None = None) -> torch.Tensor:
    """Full (N1, N2, O, O) NTK from one autograd.grad call per example and output."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if names is not None:
        named = [(n, p) for n, p in named if n in names]
    params = [p for _, p in named]

    def jac(x):
        rows = []
        for i in range(x.shape[0]):
            out = model(x[i:i + 1]).reshape(-1)
            per_out = []
            for o in range(out.numel()):
                grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
                per_out.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                          for g, p in zip(grads, params)]))
            rows.append(torch.stack(per_out))
        return torch.stack(rows)

    j1 = jac(x1)
    j2 = j1 if x2 is None else jac(x2)
    return torch.einsum("aop,bqp->aboq", j1, j2)


def reduce(full: torch.Tensor, output: str) -> torch.Tensor:
    diag = torch.diagonal(full, dim1=2, dim2=3)
    return {"full": full, "diagonal": diag, "trace": diag.mean(-1)}[output]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def torch_mlp(parameterization: str, n_out: int, seed: int = 0) -> nn.Module:
    """An nn.Sequential of nn.Linear and assorted torch activations."""
    torch.manual_seed(seed)
    if parameterization == "ntk":
        return nk.serial(nk.Dense(9, 1.3, 0.2), nk.Erf(), nk.Dense(7, 1.0, 0.1), nk.ReLU(),
                         nk.Dense(n_out, 1.5, 0.3)).module(5, seed=seed, dtype=F64)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 8), nn.GELU(),
                         nn.Linear(8, 7), nn.LeakyReLU(0.2), nn.Linear(7, 6), nn.SiLU(),
                         nn.Linear(6, n_out)).to(F64)


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("n_out", [1, 10])
def test_mlp_methods_agree_with_autograd(parameterization, n_out):
    model = torch_mlp(parameterization, n_out)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(6, 5, generator=g, dtype=F64)
    x2 = torch.randn(4, 5, generator=g, dtype=F64)
    for xx2 in (None, x2):
        ref = naive_ntk(model, x1, xx2)
        for output in ("trace", "diagonal", "full"):
            for method in ALL_METHODS:
                got = nk.empirical_ntk(model, x1, xx2, method=method, output=output)
                assert got.dtype == F64
                assert rel_err(got, reduce(ref, output)) < 1e-10, (method, output)


def test_ntkit_mlp_standard_parameterization_and_torch_activations_structured():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Softplus(beta=2.0), nn.Linear(8, 8),
                          nn.ELU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Identity(),
                          nn.Linear(8, 3, bias=False), nn.Tanh()).to(F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    ref = naive_ntk(model, x)
    for method in ALL_METHODS:
        assert rel_err(nk.empirical_ntk(model, x, method=method, output="full"), ref) < 1e-10
    standard = nk.mlp(3, 12, "gelu", W_std=1.4, b_std=0.3, out_dim=2,
                      parameterization="standard").module(5, seed=0, dtype=F64)
    x = torch.randn(4, 5, dtype=F64)
    assert rel_err(nk.empirical_ntk(standard, x, method="structured", output="full"),
                   naive_ntk(standard, x)) < 1e-10


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3)).to(F64)
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_cnn_with_pooling_and_batchnorm_buffers():
    model = small_cnn()
    x1 = torch.randn(5, 2, 8, 8, dtype=F64)
    x2 = torch.randn(3, 2, 8, 8, dtype=F64)
    ref = naive_ntk(model, x1, x2)
    for method in GENERIC + ("auto",):
        for output in ("trace", "full"):
            got = nk.empirical_ntk(model, x1, x2, method=method, output=output)
            assert rel_err(got, reduce(ref, output)) < 1e-10


def test_layernorm_models():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.LayerNorm(10), nn.ReLU(), nn.Linear(10, 2)
                          ).to(F64)
    with torch.no_grad():  # non-trivial affine parameters
        model[1].weight.normal_()
        model[1].bias.normal_()
    ntkit_ln = nk.serial(nk.Dense(10, 1.0, 0.1), nk.LayerNorm(), nk.Erf(), nk.Dense(2, 1.0, 0.1)
                         ).module(4, seed=0, dtype=F64)
    x = torch.randn(6, 4, dtype=F64)
    for m in (model, ntkit_ln):
        ref = naive_ntk(m, x)
        for method in GENERIC:
            assert rel_err(nk.empirical_ntk(m, x, method=method, output="full"), ref) < 1e-10
        with pytest.raises(ValueError, match="structured"):
            nk.empirical_ntk(m, x, method="structured")


RESIDUAL = nk.serial(nk.Dense(12, 1.0, 0.1), nk.FanOut(2),
                     nk.parallel(nk.serial(nk.ReLU(), nk.Dense(12, 1.0, 0.1)), nk.Identity()),
                     nk.FanInSum(), nk.ReLU(), nk.Dense(3, 1.0, 0.1))


def test_residual_mlp():
    model = RESIDUAL.module(4, seed=0, dtype=F64)
    x1, x2 = torch.randn(5, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    ref = naive_ntk(model, x1, x2)
    for method in GENERIC + ("auto",):
        for output in ("trace", "diagonal", "full"):
            got = nk.empirical_ntk(model, x1, x2, method=method, output=output)
            assert rel_err(got, reduce(ref, output)) < 1e-10


# --------------------------------------------------------------------------- blocking
@pytest.mark.parametrize("method", ALL_METHODS)
def test_batch_size_and_memory_budget_invariance(method):
    model = nk.mlp(3, 16, "tanh", out_dim=3).module(4, seed=2, dtype=F64)
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(7, 4, generator=g, dtype=F64)
    x2 = torch.randn(5, 4, generator=g, dtype=F64)
    for xx2 in (None, x2):
        ref = nk.empirical_ntk(model, x1, xx2, method=method, output="full")
        for bs in (1, 2, 3, 6, 100):
            got = nk.empirical_ntk(model, x1, xx2, method=method, output="full", batch_size=bs)
            torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    # x2=None computes half the blocks and mirrors them: same as passing x1 twice.
    torch.testing.assert_close(nk.empirical_ntk(model, x1, method=method, output="full"),
                               nk.empirical_ntk(model, x1, x1.clone(), method=method,
                                                output="full"), rtol=1e-13, atol=1e-13)
    # A budget that allows only small blocks gives the same kernel.
    small = nk.empirical_ntk(model, x1, x2, method=method, output="full", memory_budget=60_000)
    torch.testing.assert_close(small, nk.empirical_ntk(model, x1, x2, method=method,
                                                       output="full"), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_symmetric_blocked_gram(monkeypatch, method):
    # x2=None multiplies only the Gram blocks on and above the diagonal; force tiny blocks.
    from ntkit.kernels import empirical

    monkeypatch.setattr(empirical, "_SYM_BLOCK", 2)
    model = nk.mlp(3, 8, "relu", out_dim=2).module(3, seed=0, dtype=F64)
    x = torch.randn(11, 3, dtype=F64)
    for output in ("trace", "full"):
        sym = nk.empirical_ntk(model, x, method=method, output=output)
        assert rel_err(sym, reduce(naive_ntk(model, x), output)) < 1e-10
        flat = sym.reshape(11, 11, -1) if output == "trace" else sym
        assert torch.equal(flat, flat.transpose(0, 1) if output == "trace"
                           else flat.permute(1, 0, 3, 2))


# --------------------------------------------------------------------------- per parameter
@pytest.mark.parametrize("method", ALL_METHODS)
def test_per_param_parts_sum_to_total(method):
    model = nk.mlp(3, 10, "relu", out_dim=2).module(3, seed=1, dtype=F64)
    x = torch.randn(5, 3, dtype=F64)
    total, parts = nk.empirical_ntk(model, x, method=method, per_param=True, output="full")
    assert list(parts) == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(sum(parts.values()), total, rtol=1e-13, atol=1e-13)
    for name, part in parts.items():
        assert rel_err(part, naive_ntk(model, x, names=[name])) < 1e-10, name
    # The seed's split: last layer against the layers below, via params=.
    last = [n for n in parts if n.startswith("4.")]
    below = [n for n in parts if n not in last]
    k_last = nk.empirical_ntk(model, x, method=method, params=last)
    k_below = nk.empirical_ntk(model, x, method=method, params=below)
    torch.testing.assert_close(k_last + k_below, reduce(total, "trace"), rtol=1e-12, atol=0)


def test_params_accepts_parameter_objects_and_auto_picks_structured():
    model = nk.mlp(2, 6).module(3, seed=0, dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    by_name = nk.empirical_ntk(model, x, params=["0.weight"])
    by_obj = nk.empirical_ntk(model, x, params=[model[0].weight])
    torch.testing.assert_close(by_name, by_obj)
    assert nk.empirical_ntk(model, x, per_param=True).method == "structured"
    assert nk.empirical_ntk(small_cnn(), torch.randn(2, 2, 8, 8, dtype=F64),
                            per_param=True).method == "jacobian"


def test_dtype_device_and_array_inputs():
    model = nk.mlp(3, 8).module(3, seed=0, dtype=torch.float32)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    k = nk.empirical_ntk(model, x)
    assert k.dtype == torch.float32 and k.device.type == "cpu" and k.shape == (4, 4)
    ref = nk.empirical_ntk(model.to(F64), torch.as_tensor(x, dtype=F64))
    torch.testing.assert_close(k.double(), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- errors
def test_errors():
    model = nk.mlp(2, 6).module(3, seed=0, dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="no trainable parameters"):
        nk.empirical_ntk(nn.Sequential(nn.ReLU()), x)
    frozen = nk.mlp(2, 6).module(3, seed=0, dtype=F64).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        nk.empirical_ntk(frozen, x)
    with pytest.raises(ValueError, match="could not be applied to x1") as info:
        nk.empirical_ntk(model, torch.randn(4, 5, dtype=F64))
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="dtype torch.float32") as info:
        nk.empirical_ntk(model, x.float())
    assert info.value.__cause__ is not None
    with pytest.raises(ValueError, match="same feature shape"):
        nk.empirical_ntk(model, x, torch.randn(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="NaN"):
        nk.empirical_ntk(model, torch.tensor([[0.0, float("nan"), 1.0]], dtype=F64))
    with pytest.raises(nk.MemoryBudgetError, match=r"needs at least .*B.* memory_budget"):
        nk.empirical_ntk(model, x, memory_budget=500)
    with pytest.raises(ValueError, match="method"):
        nk.empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match="output"):
        nk.empirical_ntk(model, x, output="all")
    with pytest.raises(ValueError, match="batch_size"):
        nk.empirical_ntk(model, x, batch_size=0)
    with pytest.raises(ValueError, match="params"):
        nk.empirical_ntk(model, x, params=["nope"])
    with pytest.raises(ValueError, match="model.eval"):
        nk.empirical_ntk(small_cnn().train(), torch.randn(2, 2, 8, 8, dtype=F64))
    with pytest.raises(ValueError, match="structured"):
        nk.empirical_ntk(small_cnn(), torch.randn(2, 2, 8, 8, dtype=F64), method="structured")


# --------------------------------------------------------------------------- NNGP
def test_empirical_nngp_layers():
    net = nk.serial(nk.Dense(20, 1.0, 0.0), nk.ReLU(), nk.Dense(3, 1.7, 0.4))
    model = net.module(4, seed=0, dtype=F64)
    x1, x2 = torch.randn(5, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    a1, a2 = torch.relu(model[0](x1)), torch.relu(model[0](x2))
    expected = 1.7 ** 2 * (a1 @ a2.T) / 20 + 0.4 ** 2
    torch.testing.assert_close(nk.empirical_nngp(model, x1, x2), expected.detach())
    plain = (a1 @ a2.T).detach() / 20
    torch.testing.assert_close(nk.empirical_nngp(model, x1, x2, layer=1), plain)
    torch.testing.assert_close(nk.empirical_nngp(model, x1, x2, layer="1", batch_size=2), plain)
    with pytest.raises(ValueError, match="layer"):
        nk.empirical_nngp(model, x1, layer="missing")


# --------------------------------------------------------------------------- Monte Carlo
def _sphere(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / x.norm(dim=1, keepdim=True) * np.sqrt(d)


def test_monte_carlo_one_hidden_layer_is_unbiased():
    # With one hidden layer, E[empirical kernel] equals the analytic kernel at any width,
    # so the error must be within a few standard errors (t statistics, 199 dof).
    net = nk.serial(nk.Dense(256, 1.2, 0.2), nk.Erf(), nk.Dense(2, 1.5, 0.3))
    x = _sphere(4, 3, 0)
    mc = nk.monte_carlo_kernel(net, x, n_samples=200, seed=1)
    exact = net.kernel(x)
    for name in ("nngp", "ntk"):
        z = (mc[name] - exact[name]) / getattr(mc, name + "_stderr")
        assert float(z.abs().max()) < 4.5, name
    # The test has power: a kernel off by 2% is rejected.
    z_wrong = (mc.ntk - 1.02 * exact.ntk) / mc.ntk_stderr
    assert float(z_wrong.abs().max()) > 4.5


def test_monte_carlo_converges_with_width():
    # Two effects shrink the error as the width n grows: the O(1/n) bias of the finite-width
    # mean and the O(1/sqrt(n)) spread of each sample. Check both, with the reported
    # standard errors setting the tolerance.
    x1, x2 = _sphere(4, 3, 1), _sphere(3, 3, 2)
    errors, spreads = [], []
    for width in (16, 128, 1024):
        net = nk.mlp(4, width, "relu", W_std=1.0, b_std=0.1)
        mc = nk.monte_carlo_kernel(net, x1, x2, n_samples=24, seed=width)
        exact = net.kernel(x1, x2)
        errors.append(float((mc.ntk - exact.ntk).norm() / exact.ntk.norm()))
        spreads.append(float(mc.ntk_stderr.norm() / exact.ntk.norm()))
        zmax = float(((mc.ntk - exact.ntk) / mc.ntk_stderr).abs().max())
        z_nngp = float(((mc.nngp - exact.nngp) / mc.nngp_stderr).abs().max())
    assert spreads[0] > spreads[1] > spreads[2], spreads
    assert errors[0] > 2 * max(errors[1], errors[2]), errors
    # At the largest width the error is sampling noise: E‖mean − Θ‖² = ‖stderr‖² when the
    # bias is negligible, and no entry is more than 5 standard errors off.
    assert errors[2] < 3 * spreads[2], (errors, spreads)
    assert zmax < 5.0 and z_nngp < 5.0


def test_monte_carlo_errors():
    net = nk.mlp(2, 8)
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="n_samples"):
        nk.monte_carlo_kernel(net, x, n_samples=1, seed=0)
    with pytest.raises(ValueError, match="ntkit architecture"):
        nk.monte_carlo_kernel(net.module(2), x, n_samples=2, seed=0)
    mc = nk.monte_carlo_kernel(net, x, n_samples=2, seed=0, get="ntk")
    assert mc.nngp is None and mc.ntk.shape == (3, 3)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    model = nk.mlp(3, 32, "relu", out_dim=2).module(4, seed=0, dtype=F64)
    x = torch.randn(9, 4, dtype=F64)
    cpu = {m: nk.empirical_ntk(model, x, method=m, output="full") for m in ALL_METHODS}
    model_gpu, x_gpu = model.cuda(), x.cuda()
    for method in ALL_METHODS:
        got = nk.empirical_ntk(model_gpu, x_gpu, method=method, output="full", batch_size=4)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), cpu[method], rtol=1e-10, atol=1e-12)
    mc = nk.monte_carlo_kernel(nk.mlp(2, 64), x_gpu, n_samples=3, seed=0)
    assert mc.ntk.device.type == "cuda"
