"""Training dynamics: closed forms, ensembles, ODE flow, linearization, real training.

Independent numbers: neural-tangents' ensemble arrays, scipy's matrix exponential (with Van
Loan's block trick for the time integral), explicit gradient-descent loops in numpy, a
hand-written RK4 integrator, numpy linear solves, and SVDs.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

import ntkit as nk
from ntkit.dynamics.train import _op_norm

REF = Path(__file__).parent / "reference" / "nt"  # neural-tangents' arrays, see its README


def rel(a, b) -> float:
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(autouse=True)
def one_thread():
    # These tests multiply small matrices or do batch-4 GEMMs, which are memory-bound: a
    # second thread buys nothing and, on a shared 2-core machine, OpenMP/OpenBLAS barrier
    # waits made them 10-50x slower. Restored afterwards.
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(old)


def circle(angles):
    g = torch.as_tensor(angles, dtype=torch.float64)
    return torch.stack([g.cos(), g.sin()], dim=1)


X_CIRCLE = circle([-2.2, -1.0, 1.0, 2.2])
Y_CIRCLE = torch.tensor([[-0.4], [-0.2], [0.3], [0.3]], dtype=torch.float64)


def random_problem(n=6, m=5, n_out=2, rank=None, seed=0):
    """A PSD kernel from random features (rank-deficient when rank < n), with a test block."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n + m, rank or 3 * n))
    k_all = feats @ feats.T / feats.shape[1]
    k, k_tx = k_all[:n, :n], k_all[n:, :n]
    y = rng.normal(size=(n, n_out))
    f0, g0 = rng.normal(size=(n, n_out)), rng.normal(size=(m, n_out))
    return k, k_tx, y, f0, g0


def expm_flow(k, k_tx, y, f0, g0, a, t):
    """Train/test outputs of df/dt = −a K (f − y) by scipy's expm (Van Loan for the integral)."""
    n = k.shape[0]
    block = np.zeros((2 * n, 2 * n))
    block[:n, :n], block[:n, n:] = -a * k, np.eye(n)
    e = scipy.linalg.expm(block * t)
    decay, integral = e[:n, :n], e[:n, n:]  # e^{−aKt}, ∫_0^t e^{−aKs} ds
    r0 = f0 - y
    return y + decay @ r0, g0 - a * k_tx @ integral @ r0


# ------------------------------------------------------------------ ensemble vs reference
@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
@pytest.mark.parametrize("via", ["layer", "kernel_fn"])
def test_ensemble_matches_neural_tangents(kernel, via):
    case = next(c for c in json.loads((REF / "cases.json").read_text())
                if c["file"] == "ensemble_jgh_circle.npz")
    ref = np.load(REF / case["file"])
    net = nk.mlp(4, 512, "relu", W_std=1, b_std=0.1)
    source = net if via == "layer" else (lambda x1, x2, get: net.kernel(x1, x2, get=get))
    # neural-tangents' time runs the flow exp(−η K t / (N n_out)); with n_out = 1 that is
    # JGH's K / N, so its t is our t under cost="jgh" and cost="nt" alike.
    for cost in ("jgh", "nt"):
        p = nk.predict.ensemble(source, ref["x_train"], ref["y_train"], get=kernel,
                                learning_rate=case["learning_rate"], cost=cost)
        times = [10.0, 100.0, math.inf]
        batched = p(np.array(times), ref["x_test"])
        for i, (t, tag) in enumerate(zip(times, ["10", "100", "inf"])):
            out = p(t, ref["x_test"])
            assert rel(out.mean, ref[f"{kernel}_mean_t{tag}"]) < 1e-8
            assert rel(out.covariance, ref[f"{kernel}_cov_t{tag}"]) < 1e-8
            assert rel(batched.mean[i], out.mean) < 1e-12
            assert rel(batched.covariance[i], out.covariance) < 1e-12


def test_ensemble_limits_and_consistency():
    net = nk.mlp(4, 512, W_std=1, b_std=0.1)
    xt = circle(np.linspace(-3, 3, 7))
    k_tr = net.kernel(X_CIRCLE)
    k_tx = net.kernel(xt, X_CIRCLE)
    k_tt = net.kernel(xt)
    # t = inf on the training points: the kernel-regression mean interpolates, variance 0.
    for kernel in ("ntk", "nngp"):
        at_train = nk.predict.ensemble(net, X_CIRCLE, Y_CIRCLE, get=kernel)(math.inf)
        assert rel(at_train.mean, Y_CIRCLE) < 1e-10
        assert float(at_train.covariance.abs().max()) < 1e-10 * float(k_tr.nngp.max())
    # NNGP ensemble (last layer trained) at t = inf is the exact GP posterior ...
    p = nk.predict.ensemble(net, X_CIRCLE, Y_CIRCLE, get="nngp")
    post = nk.predict.gp_inference(k_tr.nngp, Y_CIRCLE, k_tx.nngp, k_tt.nngp)
    out = p(math.inf, xt)
    assert rel(out.mean, post.mean) < 1e-10 and rel(out.covariance, post.covariance) < 1e-10
    # ... and at finite t, K_** − K_*x K⁻¹(I − e^{−2aKt}) K_x* (scipy expm).
    t, a = 7.0, 1.0 / 4
    k, kx = k_tr.nngp.numpy(), k_tx.nngp.numpy()
    proj = kx @ np.linalg.solve(k, np.eye(4) - scipy.linalg.expm(-2 * a * k * t))
    assert rel(p(t, xt).covariance, k_tt.nngp.numpy() - proj @ kx.T) < 1e-9
    # The NTK ensemble mean is the closed-form MSE flow from f0 = 0.
    p = nk.predict.ensemble(net, X_CIRCLE, Y_CIRCLE, get="ntk")
    mse = nk.predict.gradient_descent_mse(k_tr.ntk, Y_CIRCLE)(t, k_test_train=k_tx.ntk)
    assert rel(p(t, xt).mean, mse.test) < 1e-12
    # Mean only, without asking for the covariance.
    assert p(t, xt, compute_cov=False).covariance is None


# --------------------------------------------------------------------- MSE closed forms
@pytest.mark.parametrize("rank", [None, 3])  # full rank, and singular (λ = 0 modes)
def test_gradient_flow_closed_form_vs_expm(rank):
    k, k_tx, y, f0, g0 = random_problem(rank=rank)
    lr = 0.7
    p = nk.predict.gradient_descent_mse(k, y, learning_rate=lr)
    times = [0.0, 0.3, 5.0, 40.0]
    out = p(times, f0, g0, k_tx)
    for i, t in enumerate(times):
        tr, te = expm_flow(k, k_tx, y, f0, g0, lr / k.shape[0], t)
        assert rel(out.train[i], tr) < 1e-10
        assert rel(out.test[i], te) < 1e-10
    if rank is None:  # t = inf: train outputs hit y, test is kernel regression
        inf = p(math.inf, f0, g0, k_tx)
        assert rel(inf.train, y) < 1e-12
        assert rel(inf.test, g0 - k_tx @ np.linalg.solve(k, f0 - y)) < 1e-10


def test_gradient_descent_discrete_vs_explicit_loop():
    k, k_tx, y, f0, g0 = random_problem(n_out=3)
    n, n_out = y.shape
    lr = 0.5 * nk.predict.max_learning_rate(k)
    p = nk.predict.gradient_descent_mse(k, y, learning_rate=lr, discrete=True)
    steps = [0, 1, 7, 50]
    out = p(steps, f0, g0, k_tx)
    f, g = f0.copy(), g0.copy()
    for s in range(max(steps) + 1):
        if s in steps:
            i = steps.index(s)
            assert rel(out.train[i], f) < 1e-12 and rel(out.test[i], g) < 1e-12
        resid = f - y
        f, g = f - lr / n * k @ resid, g - lr / n * k_tx @ resid
    # cost="nt" divides by N·n_out: the same as cost="jgh" at learning rate / n_out.
    nt = nk.predict.gradient_descent_mse(k, y, learning_rate=lr * n_out, cost="nt",
                                         discrete=True)(steps, f0, g0, k_tx)
    assert rel(nt.test, out.test) < 1e-12
    # Each output column evolves on its own under the per-output kernel; 1-D y stays 1-D.
    single = nk.predict.gradient_descent_mse(k, y[:, 1], learning_rate=lr, discrete=True)
    col = single(7, f0[:, 1], g0[:, 1], k_tx)
    assert col.train.shape == (n,) and rel(col.test, out.test[2][:, 1]) < 1e-12
    # Converged GD equals the continuous flow at t = inf.
    assert rel(p(math.inf, f0, g0, k_tx).test,
               nk.predict.gradient_descent_mse(k, y)(math.inf, f0, g0, k_tx).test) < 1e-10


def test_max_learning_rate_is_the_divergence_threshold():
    k, _, y, f0, _ = random_problem()
    n = k.shape[0]
    lam_max = np.linalg.eigvalsh(k)[-1]
    lr_max = nk.predict.max_learning_rate(k)
    assert lr_max == pytest.approx(2 * n / lam_max, rel=1e-12)
    assert nk.predict.max_learning_rate(k, cost="nt", output_dim=3) == pytest.approx(3 * lr_max)
    r0 = np.abs(f0 - y).max()
    below = nk.predict.gradient_descent_mse(k, y, learning_rate=0.98 * lr_max, discrete=True)
    above = nk.predict.gradient_descent_mse(k, y, learning_rate=1.02 * lr_max, discrete=True)
    assert np.abs(below(3000, f0).train.numpy() - y).max() < 1e-3 * r0
    assert np.abs(above(3000, f0).train.numpy() - y).max() > 1e3 * r0
    with pytest.raises(ValueError, match="max_learning_rate"):
        above(math.inf, f0)


def test_pseudo_inverse_at_infinity():
    k, k_tx, y, f0, g0 = random_problem(rank=3)  # singular: 3 null modes
    p = nk.predict.gradient_descent_mse(k, y, pseudo_inverse=True)
    out = p(math.inf, f0, g0, k_tx)
    k_pinv = np.linalg.pinv(k, rcond=1e-10, hermitian=True)
    assert rel(out.test, g0 + k_tx @ k_pinv @ (y - f0)) < 1e-8
    # The null-space part of the training residual never moves.
    assert rel(out.train, y + (np.eye(6) - k @ k_pinv) @ (f0 - y)) < 1e-8
    # ... and t = inf is the limit of the flow.
    assert rel(p(1e9, f0, g0, k_tx).test, out.test) < 1e-6
    # A positive-definite kernel is solved by Cholesky alone, agreeing with the eigenbasis.
    k, k_tx, y, f0, g0 = random_problem()
    chol = nk.predict.gradient_descent_mse(k, y, pseudo_inverse=True)
    got = chol(math.inf, f0, g0, k_tx)
    assert "_eigen" not in chol.__dict__  # no eigendecomposition was needed
    ref = nk.predict.gradient_descent_mse(k, y)(math.inf, f0, g0, k_tx)
    assert rel(got.test, ref.test) < 1e-10 and rel(got.train, ref.train) < 1e-12
    with pytest.raises(ValueError, match=r"not positive semi-definite: smallest eigenvalue -"):
        nk.predict.gradient_descent_mse(k - 2 * np.eye(6), y, pseudo_inverse=True)(math.inf)


def test_dual_coefficients_and_covariance():
    k, k_tx, y, f0, g0 = random_problem(n_out=2)
    p = nk.predict.gradient_descent_mse(k, y, learning_rate=0.6)
    times = [0.0, 2.0, math.inf]
    alpha = p.dual_coefficients(times, f0)
    assert alpha.shape == (3, 6, 2)
    assert rel(g0 + k_tx @ alpha.numpy(), p(times, f0, g0, k_tx).test) < 1e-12
    # The variances are the diagonal of the covariance.
    net = nk.mlp(3, 8)
    xt = circle(np.linspace(-3, 3, 5))
    k_tr, k_x, k_tt = net.kernel(X_CIRCLE), net.kernel(xt, X_CIRCLE), net.kernel(xt)
    flow = nk.predict.gradient_descent_mse(k_tr.ntk, Y_CIRCLE)
    cov = flow.covariance([1.0, 5.0], k_x.ntk, k_tt.nngp, k_x.nngp, k_tr.nngp)
    var = flow.covariance([1.0, 5.0], k_x.ntk, k_tt.nngp.diagonal(), k_x.nngp, k_tr.nngp)
    assert cov.shape == (2, 5, 5) and rel(var, cov.diagonal(dim1=1, dim2=2)) < 1e-12
    assert rel(cov, nk.predict.ensemble(net, X_CIRCLE, Y_CIRCLE)([1.0, 5.0], xt).covariance) < 1e-12
    # The ridge as observation noise in the prior: the NNGP flow at t = inf is the GP
    # posterior with that noise.
    noise = 0.05
    gp = nk.predict.gradient_descent_mse(k_tr.nngp, Y_CIRCLE, diag_reg=noise,
                                         diag_reg_absolute_scale=True)
    prior = k_tr.nngp + noise * torch.eye(4, dtype=torch.float64)
    post = nk.predict.gp_inference(k_tr.nngp, Y_CIRCLE, k_x.nngp, k_tt.nngp, diag_reg=noise,
                                   diag_reg_absolute_scale=True)
    assert rel(gp.covariance(math.inf, k_x.nngp, k_tt.nngp, k_x.nngp, prior),
               post.covariance) < 1e-10
    with pytest.raises(ValueError, match="prior_train_train must have shape"):
        flow.covariance(1.0, k_x.ntk, k_tt.nngp, k_x.nngp, k_tr.nngp[:3])


# ----------------------------------------------------------------------- ODE gradient flow
@pytest.mark.parametrize("cost", ["jgh", "nt"])
def test_gradient_flow_mse_matches_closed_form(cost):
    k, k_tx, y, f0, g0 = random_problem()
    times = np.array([0.0, 0.5, 3.0, 20.0])
    closed = nk.predict.gradient_descent_mse(k, y, learning_rate=0.8, cost=cost)(
        times, f0, g0, k_tx)
    ode = nk.predict.gradient_flow("mse", k, y, learning_rate=0.8, cost=cost)(
        times[::-1].copy(), f0, g0, k_tx)  # any order of times
    assert rel(ode.train.flip(0), closed.train) < 1e-6
    assert rel(ode.test.flip(0), closed.test) < 1e-6
    norm = y.size if cost == "nt" else y.shape[0]
    custom = nk.predict.gradient_flow(lambda f, yy: 0.5 * ((f - yy) ** 2).sum() / norm, k, y,
                                      learning_rate=0.8)(3.0, f0, g0, k_tx)
    assert rel(custom.test, closed.test[2]) < 1e-6


def test_gradient_flow_cross_entropy_vs_rk4():
    k, k_tx, _, f0, g0 = random_problem(n_out=3)
    n = k.shape[0]
    y = np.eye(3)[np.arange(n) % 3]
    lr, t_end = 2.0, 4.0
    out = nk.predict.gradient_flow("cross_entropy", k, y, learning_rate=lr)(
        t_end, f0, g0, k_tx)

    def rhs(z):
        f = z[:n]
        p = np.exp(f - f.max(axis=1, keepdims=True))
        grad = (p / p.sum(axis=1, keepdims=True) - y) / n  # ∇_f of mean cross-entropy
        return -lr * np.vstack([k, k_tx]) @ grad

    z, h = np.vstack([f0, g0]), t_end / 2000
    for _ in range(2000):
        k1 = rhs(z)
        k2 = rhs(z + h / 2 * k1)
        k3 = rhs(z + h / 2 * k2)
        k4 = rhs(z + h * k3)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert rel(out.train, z[:n]) < 1e-7 and rel(out.test, z[n:]) < 1e-7
    # Softmax gradients sum to 0 over classes, so every row sum of the outputs is conserved.
    np.testing.assert_allclose(out.test.sum(1).numpy(), g0.sum(1), atol=1e-8)


def test_gradient_flow_dual_coefficients_jacobian_and_ridge():
    k, k_tx, _, f0, g0 = random_problem(n_out=3)
    n = k.shape[0]
    y = np.eye(3)[np.arange(n) % 3]
    explicit = nk.predict.gradient_flow("cross_entropy", k, y, learning_rate=2.0)
    implicit = nk.predict.gradient_flow("cross_entropy", k, y, learning_rate=2.0,
                                        method="LSODA", rtol=1e-10, atol=1e-12)  # exact jac
    out = explicit([1.0, 4.0], f0, g0, k_tx)
    assert rel(implicit([1.0, 4.0], f0, g0, k_tx).test, out.test) < 1e-7
    coef = explicit.dual_coefficients([1.0, 4.0], f0)
    assert coef.n_evaluations > 0 and coef.coef.shape == (2, n, 3)
    assert rel(g0 + k_tx @ coef.coef.numpy(), out.test) < 1e-12
    assert explicit.dual_coefficients(0.0).n_evaluations == 0
    # diag_reg regularises the training flow as in gradient_descent_mse.
    k, k_tx, y, f0, g0 = random_problem()
    ode = nk.predict.gradient_flow("mse", k, y, diag_reg=0.1)(3.0, f0, g0, k_tx)
    closed = nk.predict.gradient_descent_mse(k, y, diag_reg=0.1)(3.0, f0, g0, k_tx)
    assert rel(ode.test, closed.test) < 1e-7 and rel(ode.train, closed.train) < 1e-7


# ------------------------------------------------------------------------- GP inference
def test_gp_inference_matches_linear_solve():
    k, k_tx, y, _, _ = random_problem()
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(11, 18))
    k_all = feats @ feats.T / 18
    k, k_tx, k_tt = k_all[:6, :6], k_all[6:, :6], k_all[6:, 6:]
    noise = 0.1
    post = nk.predict.gp_inference(k, y, k_tx, k_tt, diag_reg=noise,
                                   diag_reg_absolute_scale=True)
    a = k + noise * np.eye(6)
    assert rel(post.mean, k_tx @ np.linalg.solve(a, y)) < 1e-10
    assert rel(post.covariance, k_tt - k_tx @ np.linalg.solve(a, k_tx.T)) < 1e-10
    var = nk.predict.gp_inference(k, y, k_tx, np.diag(k_tt), diag_reg=noise,
                                  diag_reg_absolute_scale=True).covariance
    assert rel(var, np.diag(post.covariance.numpy())) < 1e-12
    # Relative diag_reg (the default) scales the ridge by mean(diag K).
    relative = nk.predict.gp_inference(k, y, k_tx, diag_reg=noise / np.diag(k).mean())
    assert rel(relative.mean, post.mean) < 1e-10


# ---------------------------------------------------------------------------- linearize
def test_linearize_is_first_order_taylor_and_trainable():
    torch.manual_seed(0)
    model = nk.mlp(3, 32, "erf").module(2, seed=1, dtype=torch.float64)
    lin = nk.linearize(model)
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        f0 = model(x)
        assert rel(lin(x), f0) < 1e-15
        direction = [torch.randn_like(p) for p in lin.parameters()]
        outs = []
        for scale in (1.0, 2.0):
            for p, d, p0 in zip(lin.parameters(), direction, lin.theta0().values()):
                p.copy_(p0 + scale * d)
            outs.append(lin(x) - f0)
        assert rel(outs[1], 2 * outs[0]) < 1e-12  # exactly linear in θ
        for p, p0 in zip(lin.parameters(), lin.theta0().values()):
            p.copy_(p0)
    # At θ0 its gradients are the network's (same Jacobian).
    g_lin = torch.autograd.grad(lin(x).square().sum(), list(lin.parameters()))
    g_net = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    assert max(rel(a, b) for a, b in zip(g_lin, g_net)) < 1e-12
    # Any torch optimizer trains it; the original module is untouched.
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (lin(x) - 1).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_linearized_training_matches_discrete_closed_form():
    model = nk.mlp(3, 64, W_std=1.0, b_std=0.1).module(2, seed=0, dtype=torch.float64)
    probe = circle(np.linspace(-math.pi, math.pi, 9))
    k = nk.empirical_ntk(model, X_CIRCLE)
    k_tx = nk.empirical_ntk(model, probe, X_CIRCLE)
    with torch.no_grad():
        f0, g0 = model(X_CIRCLE), model(probe)
    lr = 0.5 * nk.predict.max_learning_rate(k)
    steps = 60
    hist = nk.train(nk.linearize(model), X_CIRCLE, Y_CIRCLE, steps=steps, learning_rate=lr,
                    probe=probe, track_every=20, track_weights=False, progress=False)
    closed = nk.predict.gradient_descent_mse(k, Y_CIRCLE, learning_rate=lr, discrete=True)(
        hist.tracked_steps, f0, g0, k_tx)
    assert rel(hist.outputs, closed.train[-1]) < 1e-8
    assert rel(hist.probe_outputs, closed.test) < 1e-8
    # The linearized model's NTK does not move.
    assert float(hist.kernel_change.max()) < 1e-12


# --------------------------------------------------------------------- real training
def _wide_gap(width: int, dtype: torch.dtype) -> float:
    model = nk.mlp(4, width, W_std=1.0, b_std=0.1).module(2, seed=1, dtype=dtype)
    probe = circle(np.linspace(-math.pi, math.pi, 13)).to(dtype)
    x = X_CIRCLE.to(dtype)
    k = nk.empirical_ntk(model, x).double()
    k_tx = nk.empirical_ntk(model, probe, x).double()
    with torch.no_grad():
        f0, g0 = model(x).double(), model(probe).double()
    hist = nk.train(model, x, Y_CIRCLE, steps=1000, learning_rate=1.0, probe=probe,
                    track_every=1000, track_ntk=False, track_weights=False, progress=False)
    closed = nk.predict.gradient_descent_mse(k, Y_CIRCLE, learning_rate=1.0, discrete=True)(
        1000, f0, g0, k_tx)
    return float((hist.probe_outputs[-1].double() - closed.test).abs().max())


@pytest.mark.slow
def test_wide_network_follows_its_initial_ntk():
    # float32 for the width-2048 run: 1000 steps over two 2048² matrices are memory-bound
    # and float32 halves the time (≈ 45 s → ≈ 20 s here). The tolerance, 0.05, is four
    # orders above float32 rounding over 1000 steps (≈ 1e-6 on these outputs), and the
    # prediction itself is computed in float64 from the network's float32 NTK.
    gap_wide = _wide_gap(2048, torch.float32)
    gap_narrow = _wide_gap(64, torch.float64)
    print(f"max |f_train − f_closed| on 13 test angles: width 2048 {gap_wide:.3e}, "
          f"width 64 {gap_narrow:.3e}")
    assert gap_wide < 0.05
    assert gap_narrow > gap_wide


@pytest.mark.slow
def test_kernel_change_falls_with_width():
    # JGH's lazy-training claim: after a fixed budget (10 steps at η = 1) the relative NTK
    # change shrinks with width, roughly like width^{-1/2}. One network's change is random
    # (its spread is ≈ 40 % of the mean at width 256, ≈ 15 % at 4096), so each width is
    # averaged over seeds, more where it is cheap and noisy. float32 keeps the 4096-wide run
    # fast; its rounding (≈ 1e-6 relative) is far below the changes measured (≳ 5e-3).
    seeds = {64: 8, 256: 8, 1024: 4, 4096: 2}
    changes = []
    for width, n_seeds in seeds.items():
        runs = []
        for seed in range(n_seeds):
            model = nk.mlp(4, width).module(2, seed=seed, dtype=torch.float32)
            hist = nk.train(model, X_CIRCLE, Y_CIRCLE, steps=10, learning_rate=1.0,
                            track_every=10, track_weights=False, progress=False)
            runs.append(float(hist.kernel_change[-1]))
        changes.append(float(np.mean(runs)))
    print("mean relative NTK change after 10 steps, widths 64/256/1024/4096:", changes)
    assert all(a > b for a, b in itertools.pairwise(changes))
    assert changes[0] / changes[-1] > 3  # width ×64: ≈ 8 expected for width^{-1/2}


def test_train_history_records_what_it_says():
    model = nk.mlp(3, 24, "tanh", out_dim=2).module(3, seed=2, dtype=torch.float64)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))
    probe = rng.normal(size=(4, 3))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    k0 = nk.empirical_ntk(model, torch.as_tensor(probe))
    hist = nk.train(model, x, y, steps=9, learning_rate=0.3, cost="nt", probe=probe,
                    track_every=4, progress=False)
    assert hist.tracked_steps.tolist() == [0, 4, 8, 9]
    assert hist.loss.shape == (10,) and hist.ntk.shape == (4, 4, 4)
    assert hist.probe_outputs.shape == (4, 4, 2)
    assert rel(hist.ntk[0], k0) < 1e-14 and float(hist.kernel_change[0]) == 0.0
    with torch.no_grad():
        final = model(torch.as_tensor(x))
        assert rel(hist.probe_outputs[-1], model(torch.as_tensor(probe))) < 1e-14
    np.testing.assert_allclose(float(hist.loss[-1]), 0.5 * ((final.numpy() - y) ** 2).sum() / 14,
                               rtol=1e-12)
    assert float(hist.loss[-1]) < float(hist.loss[0])
    for name, series in hist.weight_change.items():
        delta = (dict(model.named_parameters())[name] - w0[name]).detach().numpy()
        expected = np.linalg.norm(delta, 2) / math.sqrt(delta.shape[1])
        assert float(series[-1]) == pytest.approx(expected, rel=1e-10)
    assert set(hist.weight_change) == {"0.weight", "2.weight", "4.weight"}


def test_op_norm_of_large_low_rank_update():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 300)) + 0.05 * rng.normal(size=(400, 300))
    assert _op_norm(torch.as_tensor(m)) == pytest.approx(np.linalg.norm(m, 2), rel=1e-6)


# ---------------------------------------------------------------------------- bad input
def test_singular_kernel_at_infinity_names_eigenvalue_and_diag_reg():
    k, k_tx, y, f0, g0 = random_problem(rank=3)  # rank 3 < N = 6
    p = nk.predict.gradient_descent_mse(k, y)
    with pytest.raises(ValueError, match=r"smallest eigenvalue .*diag_reg"):
        p(math.inf, f0, g0, k_tx)
    with pytest.raises(ValueError, match=r"smallest eigenvalue .*diag_reg"):
        p([1.0, math.inf])
    # With a ridge, t = inf is the ridge solve from the initial outputs: the training outputs
    # reach y and the test outputs are g0 + K_*x (K + λ I)⁻¹ (y − f0), λ = 1e-4 · mean diag K.
    # K has rank 3, so cond(K + λ I) ≈ 5e4 and the two solves may differ by about
    # cond · eps ≈ 1e-11 relative to the largest output.
    reg = nk.predict.gradient_descent_mse(k, y, diag_reg=1e-4)(math.inf, f0, g0, k_tx)
    lam = 1e-4 * np.trace(k) / len(k)
    ridge = g0 + k_tx @ scipy.linalg.solve(k + lam * np.eye(len(k)), y - f0, assume_a="pos")
    assert np.linalg.cond(k + lam * np.eye(len(k))) < 1e5
    np.testing.assert_allclose(reg.test.numpy(), ridge, rtol=0,
                               atol=1e-10 * np.abs(ridge).max())  # measured: 4e-13
    np.testing.assert_allclose(reg.train.numpy(), y, rtol=0, atol=1e-12)
    bad = k - 0.5 * np.eye(6)  # not PSD
    with pytest.raises(ValueError, match=r"not positive semi-definite: smallest eigenvalue -"):
        nk.predict.gradient_descent_mse(bad, y)(math.inf)
    with pytest.raises(ValueError, match="smallest eigenvalue"):
        nk.predict.gp_inference(k, y, k_tx)
    dup = np.vstack([X_CIRCLE.numpy(), X_CIRCLE.numpy()[:1]])  # a duplicate input
    p = nk.predict.ensemble(nk.mlp(3, 8), dup, np.zeros((5, 1)))
    with pytest.raises(ValueError, match=r"smallest eigenvalue .*diag_reg"):
        p(math.inf, X_CIRCLE)
    assert torch.isfinite(p(3.0, X_CIRCLE).covariance).all()


def test_bad_input_raises_clear_errors():
    k, k_tx, y, f0, g0 = random_problem()
    gd = nk.predict.gradient_descent_mse
    p = gd(k, y)
    cases = [
        (lambda: gd(k, y[:4]), "y_train must have shape"),
        (lambda: gd(k[:, :5], y), "square"),
        (lambda: gd(np.where(np.eye(6) > 0, np.nan, k), y), "NaN or infinite"),
        (lambda: gd(k, y, cost="mean"), "cost must be one of"),
        (lambda: gd(k, y, learning_rate=-1), "learning_rate"),
        (lambda: gd(k + np.triu(np.ones((6, 6)), 1), y), "not symmetric"),
        (lambda: p(-1.0), "t must be >= 0"),
        (lambda: p([1.0, float("nan")]), "NaN"),
        (lambda: p(1.0, f0[:3]), "fx_train_0 must have shape"),
        (lambda: p(1.0, f0, g0, k_tx[:, :4]), r"k_test_train must have shape \(M, 6\)"),
        (lambda: p(1.0, f0, g0[:2], k_tx), "fx_test_0 must have shape"),
        (lambda: p(1.0, f0, g0), "without k_test_train"),
        (lambda: gd(k, y, discrete=True)(2.5), "whole numbers"),
        (lambda: nk.predict.gradient_flow("hinge", k, y), "loss must be one of"),
        (lambda: nk.predict.gradient_flow("cross_entropy", k, y), "probabilities"),
        (lambda: nk.predict.gradient_flow("mse", k, y)(math.inf), "finite t"),
        (lambda: nk.predict.ensemble(object(), X_CIRCLE, Y_CIRCLE), "net_or_kernel_fn"),
        (lambda: nk.predict.ensemble(nk.mlp(2, 8), X_CIRCLE, Y_CIRCLE, get="cnn"),
         "get must be one of"),
        (lambda: nk.predict.ensemble(nk.mlp(2, 8), X_CIRCLE, Y_CIRCLE[:3]), "y_train"),
        (lambda: nk.predict.ensemble(nk.mlp(2, 8), X_CIRCLE, Y_CIRCLE)(1.0, np.ones((2, 3))),
         "features"),
        (lambda: nk.predict.ensemble(lambda a, b, get: None, X_CIRCLE, Y_CIRCLE), "no .nngp"),
        (lambda: nk.predict.max_learning_rate(-np.eye(3)), "no positive eigenvalue"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


def test_train_bad_input():
    model = nk.mlp(2, 8).module(2, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"y must have shape \(4, 1\)"):
        nk.train(model, X_CIRCLE, torch.zeros(4, 2), steps=1, learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        nk.train(model, X_CIRCLE, Y_CIRCLE, steps=1, learning_rate=0.0)
    with pytest.raises(ValueError, match="steps"):
        nk.train(model, X_CIRCLE, Y_CIRCLE, steps=-1, learning_rate=0.1)
    with pytest.raises(ValueError, match="probe"):
        nk.train(model, X_CIRCLE, Y_CIRCLE, steps=1, learning_rate=0.1, probe=np.ones((2, 5)))
    with pytest.raises(ValueError, match="diverged"):
        nk.train(model, X_CIRCLE, Y_CIRCLE * 1e3, steps=500, learning_rate=1e3,
                 track_ntk=False, track_weights=False, progress=False)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        nk.linearize(lambda x: x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_follows_inputs():
    k, k_tx, y, f0, g0 = random_problem()
    cpu = nk.predict.gradient_descent_mse(k, y)(2.0, f0, g0, k_tx)
    dev = torch.device("cuda")
    out = nk.predict.gradient_descent_mse(torch.as_tensor(k, device=dev), y)(
        2.0, f0, g0, torch.as_tensor(k_tx, device=dev))
    assert out.test.device.type == "cuda" and rel(out.test, cpu.test) < 1e-10
    ens = nk.predict.ensemble(nk.mlp(3, 8), X_CIRCLE.to(dev), Y_CIRCLE)(5.0, X_CIRCLE.to(dev))
    assert ens.mean.device.type == "cuda"
    model = nk.mlp(3, 16).module(2, seed=0, dtype=torch.float64, device=dev)
    hist = nk.train(nk.linearize(model), X_CIRCLE, Y_CIRCLE, steps=3, learning_rate=0.5,
                    progress=False)
    assert hist.ntk.device.type == "cuda"


def test_t_inf_uses_cholesky_for_a_safely_positive_definite_kernel(monkeypatch):
    """t = inf on a well-conditioned K: one Cholesky factorisation, no eigendecomposition,
    same answer as the spectral formula; a numerically singular K still reaches the
    eigendecomposition and its error, even though its Cholesky factorisation succeeds."""

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = torch.randn(60, 2, generator=g, dtype=torch.float64)
    k = nk.mlp(3, 512, b_std=0.1).kernel(torch.cat([x, 0.5 * x[:20]]), get="ntk").ntk
    k_train, k_test = k[:60, :60], k[60:, :60]
    spectral = nk.predict.gradient_descent_mse(k_train, y)(1e12, k_test_train=k_test)

    def no_eigh(k):
        raise AssertionError("eigendecomposition at t = inf on a positive definite kernel")

    # torch's solver itself, so the check does not depend on how ntkit.predict is laid out.
    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    fast = nk.predict.gradient_descent_mse(k_train, y)(math.inf, k_test_train=k_test)
    np.testing.assert_allclose(fast.test.numpy(), spectral.test.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fast.train.numpy(), y.numpy(), rtol=0, atol=0)
    monkeypatch.undo()

    # λ_min = 1e-15 · λ_max, below the singular tolerance (10 · sqrt(60) · eps · λ_max ≈
    # 1.7e-14): Cholesky succeeds on it, yet t = inf must refuse it.
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, -15, 60, dtype=torch.float64)
    nearly_singular = (q * evals) @ q.T
    assert int(torch.linalg.cholesky_ex(nearly_singular)[1]) == 0
    with pytest.raises(ValueError, match="smallest eigenvalue"):
        nk.predict.gradient_descent_mse(nearly_singular, y)(math.inf)


def test_ensemble_kernel_keyword_is_deprecated_for_get():
    # "Which kernel" is get= across ntkit (as in net.kernel); kernel= keeps working for one
    # release, with a DeprecationWarning, and gives the very same predictor.
    net = nk.mlp(3, 8, b_std=0.1)
    new = nk.predict.ensemble(net, X_CIRCLE, Y_CIRCLE, get="nngp")
    with pytest.warns(DeprecationWarning, match="kernel= is deprecated.*get='nngp'"):
        old = nk.predict.ensemble(net, X_CIRCLE, Y_CIRCLE, kernel="nngp")
    assert old.get == "nngp"
    assert torch.equal(old(3.0).mean, new(3.0).mean)
    with pytest.warns(DeprecationWarning, match="EnsemblePredictor.get"):
        assert new.kernel == "nngp"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError,
                                                         match="kernel must be one of"):
        nk.predict.ensemble(net, X_CIRCLE, Y_CIRCLE, kernel="cnn")
    with pytest.raises(ValueError, match="pass get= only"):
        nk.predict.ensemble(net, X_CIRCLE, Y_CIRCLE, get="nngp", kernel="ntk")
