"""Empirical NTK/NNGP and Monte Carlo kernels.

Every method is checked against an independent reference: per-example, per-output gradients
from plain ``torch.autograd.grad`` (no torch.func), contracted in float64. The Monte Carlo
estimates are checked against the analytic infinite-width kernels with tolerances set by
their own standard errors. Those are sanity checks with limited power (they detect kernel
errors of about 2%, not 1%); the precision is carried by the reference comparisons above
them (autograd, 1e-10) and by the analytic kernels' own reference tests.

Tolerances between two schedules of the same computation (block sizes, x2=None vs x1 twice,
structured vs Jacobian) are an ulp budget, not bits: see ``schedule_atol``.
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


def schedule_atol(model: nn.Module, *xs: torch.Tensor) -> float:
    """Ulp budget for one NTK entry computed by two different schedules (block sizes, gemm
    shapes, contraction order), in absolute terms.

    Every method sums P products (P = number of parameters): Θ_ij = Σ_p J_ip J_jp, or for the
    structured path Σ_l ⟨δ_i, δ_j⟩(s_w²⟨a_i, a_j⟩ + s_b²), whose terms are the same products
    grouped per layer. Any summation order is within γ_P Σ_p |J_ip J_jp| ≤ P·eps·‖J_i‖‖J_j‖
    of the exact sum (Cauchy–Schwarz), and ‖J_i‖‖J_j‖ ≤ max_k Θ(x_k, x_k)_oo. Two schedules
    differ by at most twice that, plus the Jacobian rows' own rounding, which enters the same
    way (bounded by the same P products along the backward pass): 4·P·eps·max Θ(x, x) in all.
    This is a worst-case bound; observed differences are a few ulps of the largest entry.
    """
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.cat(xs)
    diag = nk.empirical_ntk(model, x, method="jacobian", output="diagonal")
    own = torch.diagonal(diag, dim1=0, dim2=1)  # Θ(x_k, x_k)_oo, shape (O, N)
    return 4 * n_params * torch.finfo(x.dtype).eps * float(own.max())


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


# ntkit activations whose derivative the structured path takes from the activation itself
# (ABReLU family: the step formula; the others: their ``derivative``), not from autograd.
NTKIT_ACTIVATIONS = {
    "leaky_relu": lambda: nk.LeakyReLU(0.2), "abs": lambda: nk.Abs(),
    "abrelu": lambda: nk.ABReLU(-0.3, 2.0), "sin": lambda: nk.Sin(1.3, 0.7, 0.4),
    "cos": lambda: nk.Cos(), "tanh": lambda: nk.Tanh(), "silu": lambda: nk.SiLU(),
    "gelu": lambda: nk.GELU(), "erf": lambda: nk.Erf(),
}


@pytest.mark.parametrize("name", list(NTKIT_ACTIVATIONS))
def test_structured_path_of_ntkit_activations(name):
    # A wrong derivative (e.g. ABReLU's slope b instead of b - a above zero) changes entries
    # by O(10%); the ulp budget is ~1e-13 of the diagonal.
    model = nk.mlp(2, 6, NTKIT_ACTIVATIONS[name](), W_std=1.3, b_std=0.2,
                   out_dim=2).module(3, seed=0, dtype=F64)
    assert nk.kernels.empirical.structured_plan(model)[1] is None
    x1 = 1.5 * torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    x2 = torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    atol = schedule_atol(model, x1, x2)
    for xx2 in (None, x2):
        ref = naive_ntk(model, x1, xx2)
        for output in ("trace", "full"):
            got = nk.empirical_ntk(model, x1, xx2, method="structured", output=output)
            torch.testing.assert_close(got, reduce(ref, output), rtol=0, atol=atol)
    assert nk.empirical_ntk(model, x1, per_param=True).method == "structured"


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
    # ntkit's LayerNorm has no parameters: the structured path differentiates it by vjp.
    assert rel_err(nk.empirical_ntk(ntkit_ln, x, method="structured", output="full"),
                   naive_ntk(ntkit_ln, x)) < 1e-10
    # A LayerNorm with trainable affine parameters is not a layer the structured path knows.
    with pytest.raises(ValueError, match=r"method='structured' needs an nn.Sequential.*"
                                         r"'1' \(LayerNorm\) has differentiated parameters"):
        nk.empirical_ntk(model, x, method="structured")


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
    # Different block sizes are different schedules: equal within the ulp budget
    # (4·P·eps·max Θ(x, x), P = 403 parameters: about 3.6e-13 of the largest diagonal).
    atol = schedule_atol(model, x1, x2)
    for xx2 in (None, x2):
        ref = nk.empirical_ntk(model, x1, xx2, method=method, output="full")
        for bs in (1, 2, 3, 6, 100):
            got = nk.empirical_ntk(model, x1, xx2, method=method, output="full", batch_size=bs)
            torch.testing.assert_close(got, ref, rtol=0, atol=atol)
    # x2=None computes half the blocks and mirrors them: same as passing x1 twice.
    torch.testing.assert_close(nk.empirical_ntk(model, x1, method=method, output="full"),
                               nk.empirical_ntk(model, x1, x1.clone(), method=method,
                                                output="full"), rtol=0, atol=atol)
    # A budget that allows only small blocks gives the same kernel.
    small = nk.empirical_ntk(model, x1, x2, method=method, output="full", memory_budget=60_000)
    torch.testing.assert_close(small, nk.empirical_ntk(model, x1, x2, method=method,
                                                       output="full"), rtol=0, atol=atol)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_symmetric_blocked_gram(monkeypatch, method):
    # x2=None multiplies only the Gram blocks on and above the diagonal and copies the rest,
    # inside each diagonal block too: the result is symmetric bit for bit, by construction
    # (gemm does not promise equal (i, j) and (j, i) entries). Tiny Gram blocks
    # (_SYM_BLOCK = 2) and several row blocks (batch_size = 4) exercise every copy.
    from ntkit.kernels.empirical import gram

    model = nk.mlp(3, 8, "relu", out_dim=2).module(3, seed=0, dtype=F64)
    x = torch.randn(11, 3, dtype=F64)
    atol = schedule_atol(model, x)
    whole = {o: nk.empirical_ntk(model, x, method=method, output=o)
             for o in ("trace", "diagonal", "full")}
    monkeypatch.setattr(gram, "_SYM_BLOCK", 2)
    naive = naive_ntk(model, x)
    for output in ("trace", "diagonal", "full"):
        for bs in (None, 4):
            sym = nk.empirical_ntk(model, x, method=method, output=output, batch_size=bs)
            assert rel_err(sym, reduce(naive, output)) < 1e-10
            mirrored = sym.permute(1, 0, 3, 2) if output == "full" else sym.transpose(0, 1)
            assert torch.equal(sym, mirrored), (output, bs)
            # Another block schedule than the whole-Gram call: the ulp budget, not bits.
            torch.testing.assert_close(sym, whole[output], rtol=0, atol=atol)
    for output in ("trace", "diagonal", "full"):  # whole-Gram calls are symmetric too
        k = whole[output]
        assert torch.equal(k, k.permute(1, 0, 3, 2) if output == "full" else k.transpose(0, 1))


def test_matmul_t_is_exactly_symmetric(monkeypatch):
    # Directly on the Gram helper, at sizes that take the single-block and the blocked
    # branches, with shapes that leave gemm tails (odd rows and columns).
    from ntkit.kernels.empirical import gram

    g = torch.Generator().manual_seed(0)
    for block, n, p in ((256, 37, 53), (256, 300, 7), (5, 23, 61)):
        monkeypatch.setattr(gram, "_SYM_BLOCK", block)
        u = torch.randn(n, p, generator=g, dtype=F64)
        product = gram._matmul_t(u, u)
        assert torch.equal(product, product.T), (block, n, p)
        # Entry error vs an exact-enough reference: each entry is a length-p dot product,
        # within p·eps·|u_i||u_j| ≤ p·eps·max|u_i|² of the exact value.
        exact = (u.to(torch.float64) @ u.T.to(torch.float64))
        bound = p * torch.finfo(F64).eps * float((u * u).sum(1).max())
        assert float((product - exact).abs().max()) <= bound


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
    # CNNs (BatchNorm in eval mode included) qualify too; a residual model does not.
    assert nk.empirical_ntk(small_cnn(), torch.randn(2, 2, 8, 8, dtype=F64),
                            per_param=True).method == "structured"
    assert nk.empirical_ntk(RESIDUAL.module(4, seed=0, dtype=F64), torch.randn(3, 4, dtype=F64),
                            per_param=True).method in GENERIC


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
    with pytest.raises(ValueError, match="method must be one of 'auto'"):
        nk.empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match="output must be one of 'trace'"):
        nk.empirical_ntk(model, x, output="all")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        nk.empirical_ntk(model, x, batch_size=0)
    with pytest.raises(ValueError, match="params: 'nope' is not a trainable parameter"):
        nk.empirical_ntk(model, x, params=["nope"])
    with pytest.raises(ValueError, match=r"is in training mode.*call model\.eval\(\) first"):
        nk.empirical_ntk(small_cnn().train(), torch.randn(2, 2, 8, 8, dtype=F64))
    with pytest.raises(ValueError, match="method='structured' needs an nn.Sequential"):
        nk.empirical_ntk(RESIDUAL.module(3, seed=0, dtype=F64), x, method="structured")


class FunctionalDropout(nn.Module):
    """Dropout through torch.nn.functional, which the module-type check cannot see."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6).double(), nn.Linear(6, 2).double()

    def forward(self, t):
        return self.b(nn.functional.dropout(torch.tanh(self.a(t)), 0.2, self.training))


class PrivateNoise(nn.Module):
    """Randomness from its own generator: invisible to the global RNG state."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2).double()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, t):
        return self.a(t) * torch.rand(t.shape[0], 1, generator=self.gen, dtype=t.dtype)


class BatchCentred(nn.Module):
    """Mixes examples: each output depends on the batch mean."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2).double()

    def forward(self, t):
        return self.a(t - t.mean(0, keepdim=True))


RANDOM = "draws random numbers in its forward pass.*call model.eval"
COUPLED = "depends on the other examples in its batch.*defined per example"


def test_random_forward_gets_the_eval_message(monkeypatch):
    torch.manual_seed(0)
    model = FunctionalDropout()
    x = torch.randn(5, 3, dtype=F64)
    state = torch.get_rng_state()
    for method in GENERIC + ("auto",):
        with pytest.raises(ValueError, match=RANDOM):
            nk.empirical_ntk(model, x, method=method)
    assert torch.equal(torch.get_rng_state(), state)  # the check consumed no random numbers
    model.eval()
    assert rel_err(nk.empirical_ntk(model, x, output="full"), naive_ntk(model, x)) < 1e-10
    # A private generator: caught by the repeated single-example evaluation, and without
    # it by the translation of vmap's randomness error.
    with pytest.raises(ValueError, match=RANDOM):
        nk.empirical_ntk(PrivateNoise(), x, method="jacobian")
    from ntkit.kernels.empirical import setup

    monkeypatch.setattr(setup, "_check_batch_coupling", lambda *args: None)
    for method in GENERIC:
        with pytest.raises(ValueError, match=RANDOM) as info:
            nk.empirical_ntk(PrivateNoise(), x, method=method)
        assert "randomness" in str(info.value.__cause__)


def test_batch_coupled_model_is_refused():
    torch.manual_seed(0)
    model = BatchCentred()
    x = torch.randn(6, 3, dtype=F64)
    for method in GENERIC + ("auto",):
        with pytest.raises(ValueError, match=COUPLED):
            nk.empirical_ntk(model, x, method=method)
    # One x1 row: the coupling shows with x2's rows in the same batch.
    with pytest.raises(ValueError, match=COUPLED):
        nk.empirical_ntk(model, x[:1], x[1:], method="jacobian")
    # Per-example models pass, in float32 too (rounding stays far below sqrt(eps)).
    wide = nk.mlp(3, 64, "erf", out_dim=3).module(3, seed=0, dtype=torch.float32)
    xf = 3 * torch.randn(20, 3)
    assert nk.empirical_ntk(wide, xf, method="jacobian").shape == (20, 20)
    cnn = small_cnn().float()
    assert nk.empirical_ntk(cnn, torch.randn(10, 2, 8, 8), method="ntk_vp").shape == (10, 10)


def test_overflow_names_the_rows():
    model = nk.mlp(2, 16).module(3, seed=0, dtype=F64)
    x = torch.randn(5, 3, dtype=F64)
    x[3] *= 1e200  # Θ(x3, x3) ~ 1e400 overflows; entries against other rows stay finite
    for method in ALL_METHODS:
        with pytest.raises(ValueError, match=r"empirical NTK overflowed.*rows \[3\] of x1"):
            nk.empirical_ntk(model, x, method=method)
    with pytest.raises(ValueError, match=r"empirical NTK overflowed.*rows \[3\] of x1 against "
                                         r"rows \[3\] of x2"):
        nk.empirical_ntk(model, x, x.clone())
    with pytest.raises(ValueError, match=r"empirical NNGP overflowed.*rows \[3\] of x1"):
        nk.empirical_nngp(model, x)
    with pytest.raises(ValueError, match=r"overflowed.*rows \[3\] of x1"):
        nk.monte_carlo_kernel(nk.mlp(2, 16), x, n_samples=2, seed=0)
    f32 = nk.mlp(2, 16).module(3, seed=0, dtype=torch.float32)
    x32 = torch.randn(5, 3)
    x32[3] *= 1e30  # float32: Θ(x3, x3) ~ 1e60 overflows
    with pytest.raises(ValueError, match=r"overflowed.*rows \[3\] of x1.*float32"):
        nk.empirical_ntk(f32, x32)


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
    with pytest.raises(ValueError, match="layer 'missing' is not a submodule name"):
        nk.empirical_nngp(model, x1, layer="missing")


# --------------------------------------------------------------------------- Monte Carlo
def _sphere(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / x.norm(dim=1, keepdim=True) * np.sqrt(d)


def test_monte_carlo_one_hidden_layer_is_unbiased():
    """With one hidden layer, E[empirical kernel] equals the analytic kernel at any width,
    so the error must be within a few standard errors (t statistics, 199 dof).

    Power: a 2% error in the kernel is rejected (asserted below), a 1% error is not reliably
    (z about 2.2 at the largest entry). This is a sanity check of the sampling machinery;
    the kernels' precision is pinned by the autograd and reference tests."""
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
    """Two effects shrink the error as the width n grows: the O(1/n) bias of the finite-width
    mean and the O(1/sqrt(n)) spread of each sample. Check both, with the reported
    standard errors setting the tolerance.

    Power: at width 1024 a 1% kernel bias is about 1.6 standard errors, so only errors of a
    few percent fail here; the references (analytic kernel tests) carry the precision."""
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


def test_monte_carlo_large_kernels_keep_finite_standard_errors():
    # A bias-free ReLU net is positively homogeneous: scaling row 0 by c scales its kernel
    # row and column by c (and the (0, 0) entry by c²). With c = 1e100 the (0, 0) entry is
    # ~1e200, whose square overflows a plain sum of squares (NaN standard errors before).
    net = nk.mlp(2, 16, "relu", W_std=1.0, b_std=0.0)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    big = x.clone()
    big[0] *= 1e100
    c = torch.ones(4, dtype=F64)
    c[0] = 1e100
    outer = c[:, None] * c[None, :]
    ref = nk.monte_carlo_kernel(net, x, n_samples=5, seed=3)
    got = nk.monte_carlo_kernel(net, big, n_samples=5, seed=3)
    for name in ("nngp", "ntk", "nngp_stderr", "ntk_stderr"):
        value = getattr(got, name)
        assert bool(torch.isfinite(value).all()), name
        # Scaling by 1e100 (not a power of two) rounds each input once, then every entry
        # is a short chain of products and sums: a few hundred ulps at most.
        torch.testing.assert_close(value / outer, getattr(ref, name), rtol=1e-12, atol=0)


def test_monte_carlo_errors():
    net = nk.mlp(2, 8)
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 2"):
        nk.monte_carlo_kernel(net, x, n_samples=1, seed=0)
    with pytest.raises(ValueError, match="net must be an ntkit architecture"):
        nk.monte_carlo_kernel(net.module(2), x, n_samples=2, seed=0)
    mc = nk.monte_carlo_kernel(net, x, n_samples=2, seed=0, get="ntk")
    assert mc.nngp is None and mc.ntk.shape == (3, 3)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
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
