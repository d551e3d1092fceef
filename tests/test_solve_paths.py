"""ntkit.scale.solve's paths and its cost model.

Every path is checked against an independent dense float64 solve (``scipy.linalg.solve`` of
the untiled ``net.kernel``); the cost model's choices are checked on synthetic sizes with
the free RAM and disk replaced (no large allocation anywhere).

Tolerances. The float64 paths (direct float64, matrix-free CG) solve the same float64
system: they agree with scipy to rounding times the condition number (about 1e-10 here).
The float32-storage paths solve ``K̃ + λI`` with ``K̃`` the kernel rounded once to float32
(relative 6e-8 per entry): their coefficients differ from the float64 ones by about
``cond · 6e-8`` in the worst direction; predictions ``k(X_test, X) α`` average that out
(measured 1.5e-7 at N = 6000, see benchmarks/results/solve_paths.md). With the ridge and
sizes below (condition number ~1e3) we allow 1e-4 on coefficients and 1e-5 on predictions,
and require every path's *own* residual (float64 arithmetic) to meet ``tol``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg
import torch

import ntkit as nk
from ntkit.scale import paths as paths_module
from ntkit.scale import plan as plan_module
from ntkit.scale.plan import path_needs, plan_solve

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

NET = nk.mlp(3, 512)
GiB = 2**30


def _problem(n=240, d=5, k=3, seed=0):
    g = np.random.default_rng(seed)
    X = g.standard_normal((n, d))
    Y = np.column_stack([np.sin(X[:, 0]), X[:, 1] ** 2, g.standard_normal(n)])[:, :k]
    Xt = g.standard_normal((40, d))
    return X, Y, Xt


def _reference(X, Y, Xt, diag_reg=1e-2):
    K = NET.kernel(X, get="ntk").ntk.numpy()
    lam = diag_reg * K.diagonal().mean()
    alpha = scipy.linalg.solve(K + lam * np.eye(len(K)), Y, assume_a="pos")
    return alpha, NET.kernel(Xt, X, get="ntk").ntk.numpy() @ alpha


@pytest.fixture
def machine(monkeypatch):
    """Pretend free RAM and disk (bytes); returns a setter."""
    state = {"ram": 24 * GiB, "disk": 70 * GiB}
    monkeypatch.setattr(plan_module, "available_ram", lambda: state["ram"])
    monkeypatch.setattr(plan_module, "available_disk",
                        lambda path: None if path is None else state["disk"])

    def set_(ram=None, disk=None):
        if ram is not None:
            state["ram"] = ram
        if disk is not None:
            state["disk"] = disk
    return set_


# ----------------------------------------------------------------------------- cost model
def test_plan_small_problem_is_direct_float64(machine):
    plan = plan_solve(5_000, 10, n_features=784, depth=4)
    assert (plan.path, plan.precision) == ("direct", "float64")
    assert "direct64" in plan.reason


def test_plan_50k_with_24_gib_holds_float32_kernel_and_runs_cg(machine):
    plan = plan_solve(50_000, 10, n_features=784, depth=4, store="/somewhere")
    # float64 K (18.6 GiB) does not fit in 80% of 24 GiB; float32 K (9.3 GiB) does, and CG
    # over it beats a float32 Cholesky (4e13 flops) by the cost model's rates.
    assert (plan.path, plan.precision) == ("dense_cg", "float32 storage")
    assert plan.estimates["direct64"] == float("inf")
    assert plan.estimates["dense_cg"] < plan.estimates["direct32"]
    assert plan.ram_bytes > 4 * 50_000**2


def test_plan_past_ram_goes_to_disk_then_matrix_free(machine):
    plan = plan_solve(100_000, 10, n_features=784, depth=4, store="/data/k")
    assert plan.path == "disk_cg" and plan.disk_bytes == 4 * 100_000**2
    assert plan_solve(100_000, 10, n_features=784, depth=4).path == "matrix_free_cg"
    machine(disk=10 * GiB)  # the store would not fit on this disk
    assert plan_solve(100_000, 10, n_features=784, depth=4, store="/d").path == \
        "matrix_free_cg"


def test_plan_float32_direct_when_only_half_fits(machine):
    n = 20_000
    needs = path_needs(n, 1, 50, 1000, 2048)
    # Room for a float32 K but not a float64 one: forcing "direct" gives the float32 factor.
    budget = (needs["direct32"][0] + needs["direct64"][0]) // 2
    plan = plan_solve(n, 1, n_features=50, method="direct", memory_budget=budget)
    assert (plan.path, plan.precision) == ("direct", "float32+refinement")


def test_plan_memory_budget_caps_the_free_ram(machine):
    assert plan_solve(30_000, 10, n_features=100).path in ("direct", "dense_cg")
    plan = plan_solve(30_000, 10, n_features=100, memory_budget=1 * GiB)
    assert plan.path == "matrix_free_cg" and plan.ram_limit == 1 * GiB


def test_plan_refuses_what_cannot_fit(machine):
    machine(ram=2 * GiB)
    with pytest.raises(MemoryError, match=r"method='dense_cg' cannot fit .* dense_cg needs"):
        plan_solve(50_000, 10, method="dense_cg")
    with pytest.raises(MemoryError, match="method='disk_cg' cannot fit"):
        plan_solve(50_000, 10, method="disk_cg")  # no store
    with pytest.raises(MemoryError, match="needs a positive ridge"):
        plan_solve(1_000, 1, method="dense_cg", ridge_positive=False)
    with pytest.raises(MemoryError, match="No solve path fits .* only the direct path"):
        plan_solve(50_000, 10, ridge_positive=False)
    with pytest.raises(ValueError, match="method must be"):
        plan_solve(10, method="lu")


def test_solve_refuses_before_computing_anything(machine, monkeypatch):
    machine(ram=1 * GiB)

    def boom(*args, **kwargs):
        raise AssertionError("the kernel was evaluated")

    monkeypatch.setattr(paths_module, "evaluate", boom)
    X, Y, _ = _problem(n=60)
    with pytest.raises(MemoryError, match="cannot fit"):
        nk.scale.solve(NET, X, Y, method="disk_cg", diag_reg=1e-2)  # no store=


def test_choice_is_logged_and_recorded(caplog):
    X, Y, _ = _problem(n=80)
    with caplog.at_level(logging.INFO, logger="ntkit.scale"):
        res = nk.scale.solve(NET, X, Y, diag_reg=1e-2)
    assert res.method == "direct" and res.plan.path == "direct"
    assert any("-> direct (float64)" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- every path
PATH_CASES = [("direct", None), ("direct", "float32"), ("dense_cg", None), ("disk_cg", None),
              ("matrix_free_cg", None)]


@pytest.mark.parametrize("method,variant", PATH_CASES)
def test_every_path_agrees_with_a_dense_float64_solve(method, variant, tmp_path):
    X, Y, Xt = _problem()
    alpha, pred_ref = _reference(X, Y, Xt)
    kwargs = {}
    if method == "disk_cg":
        kwargs["store"] = tmp_path / "store"
    if variant == "float32":  # room for K in float32 but not in float64
        needs = path_needs(len(X), Y.shape[1], X.shape[1], 1000, 64)
        kwargs["memory_budget"] = (needs["direct32"][0] + needs["direct64"][0]) // 2
    seen = []
    res = nk.scale.solve(NET, X, Y, method=method, diag_reg=1e-2, tol=1e-10, tile=64,
                         n_landmarks=60, callback=lambda i, r: seen.append(r), **kwargs)
    assert res.method == method and res.converged and res.residual <= 1e-10
    assert res.coef.dtype == torch.float64 and res.coef.shape == Y.shape
    float64 = res.plan.precision in ("float64", "float64 recomputed")
    assert res.plan.precision == {"direct": "float32+refinement" if variant else "float64",
                                  "dense_cg": "float32 storage", "disk_cg": "float32 storage",
                                  "matrix_free_cg": "float64 recomputed"}[method]
    coef_tol, pred_tol = (1e-9, 1e-9) if float64 else (1e-4, 1e-5)
    np.testing.assert_allclose(res.coef.numpy(), alpha, rtol=0,
                               atol=coef_tol * np.abs(alpha).max())
    pred = nk.scale.predict(NET, X, Xt, res.coef, get="ntk", block_rows=16).numpy()
    assert np.linalg.norm(pred - pred_ref) <= pred_tol * np.linalg.norm(pred_ref)
    if method != "direct" or variant:
        assert len(seen) == res.iterations > 0  # progress: one callback per iteration
        assert seen == res.history[1:]


def test_multi_output_is_one_pass_and_equals_column_by_column():
    X, Y, _ = _problem(n=150)
    both = nk.scale.solve(NET, X, Y, method="dense_cg", diag_reg=1e-2, tol=1e-10,
                          n_landmarks=40)
    for c in range(Y.shape[1]):
        one = nk.scale.solve(NET, X, Y[:, c], method="dense_cg", diag_reg=1e-2, tol=1e-10,
                             n_landmarks=40)
        assert one.coef.shape == (150,)
        np.testing.assert_allclose(both.coef[:, c].numpy(), one.coef.numpy(), rtol=0,
                                   atol=1e-8 * float(one.coef.abs().max()))
    # One mat-vec of K per iteration serves all columns: same count as the hardest column.


def test_float32_products_meet_float64_residuals():
    # The fast float32 product has a floor near 1e-7 |K||v|; the exact one does not.
    X, _, _ = _problem(n=300)
    K = paths_module.fill_dense(NET, torch.as_tensor(X), "ntk", torch.float32, 64, False)
    op = paths_module.DenseFloat32Kernel(K)
    v = torch.as_tensor(np.random.default_rng(3).standard_normal((300, 2)))
    exact = K.double() @ v
    np.testing.assert_allclose(op.matmul_exact(v).numpy(), exact.numpy(), rtol=1e-13,
                               atol=1e-13 * float(exact.abs().max()))
    fast = op.matmul(v)
    assert float((fast - exact).abs().max()) <= 1e-6 * float((K.double().abs() @ v.abs()).max())
    diag = K.diagonal().double().clone()
    # Only the strict lower triangle and the separate diagonal are read: fill the rest with
    # garbage (where the direct path keeps its Cholesky factor).
    tri = torch.where(torch.ones_like(K, dtype=torch.bool).tril(-1), K, torch.full_like(K, 7.0))
    np.testing.assert_allclose(paths_module.TriangleKernel(tri, diag, tile=64).matmul(v).numpy(),
                               exact.numpy(), rtol=1e-13, atol=1e-13 * float(exact.abs().max()))


# ----------------------------------------------------------------------------- resume
def test_disk_cg_resumes_the_kernel_store_and_the_cg_state(tmp_path, monkeypatch):
    X, Y, Xt = _problem(n=200)
    store = tmp_path / "s"
    first = nk.scale.solve(NET, X, Y, method="disk_cg", store=store, diag_reg=1e-3,
                           tol=1e-10, tile=64, n_landmarks=20, max_iter=3)
    assert not first.converged and first.iterations == 3
    (sub,) = store.iterdir()  # one directory per computation
    assert (sub / "cg_checkpoint.pt").exists() and first.details["store"] == str(sub / "kernel")
    import ntkit.scale.store as store_module

    def no_write(*args, **kwargs):
        raise AssertionError("a finished kernel store must not be recomputed")

    monkeypatch.setattr(store_module.ZarrSink, "write", no_write)
    second = nk.scale.solve(NET, X, Y, method="disk_cg", store=store, diag_reg=1e-3,
                            tol=1e-10, tile=64, n_landmarks=20)
    assert second.converged
    assert second.history[:4] == first.history[:4]  # continued, not restarted
    assert second.iterations > 3
    alpha, _ = _reference(X, Y, Xt, diag_reg=1e-3)
    np.testing.assert_allclose(second.coef.numpy(), alpha, rtol=0,
                               atol=1e-3 * np.abs(alpha).max())
    # A different system (other targets) does not pick up that checkpoint.
    other = nk.scale.solve(NET, X, -Y, method="disk_cg", store=store, diag_reg=1e-3,
                           tol=1e-10, tile=64, n_landmarks=20)
    assert other.history[1] == pytest.approx(second.history[1])
    monkeypatch.undo()
    # Other inputs (a cross-validation fold) get their own kernel next to it.
    nk.scale.solve(NET, X[:150], Y[:150], method="disk_cg", store=store, diag_reg=1e-3,
                   tol=1e-8, tile=64, n_landmarks=20)
    assert len(list(store.iterdir())) == 2


# ----------------------------------------------------------------------------- Dask client
def test_client_blocks_and_dask_kernel_with_scattered_inputs():
    from dask.distributed import Client, LocalCluster

    X, Y, _ = _problem(n=160)
    K_ref = NET.kernel(X, get="ntk").ntk.numpy()
    # In-process workers keep this test fast; tests/test_scale.py runs a multi-process
    # cluster, and benchmarks/dask_scaling.py measures one.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        K = nk.scale.dask_kernel(NET, X, chunks=50, client=client)
        dense = K.compute()
        np.testing.assert_allclose(dense, K_ref, rtol=1e-13, atol=0)
        assert np.array_equal(dense, dense.T)  # lower blocks are the upper ones transposed
        # No task carries the N x d inputs: they were scattered once.
        graph = dict(K.__dask_graph__())
        assert max(len(repr(task)) for task in graph.values()) < 2_000
        res = nk.scale.solve(NET, X, Y, method="dense_cg", diag_reg=1e-2, tol=1e-10,
                             n_landmarks=40, tile=50, client=client)
    local = nk.scale.solve(NET, X, Y, method="dense_cg", diag_reg=1e-2, tol=1e-10,
                           n_landmarks=40, tile=50)
    np.testing.assert_allclose(res.coef.numpy(), local.coef.numpy(), rtol=0,
                               atol=1e-9 * float(local.coef.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_in_memory_cg_paths_on_cuda():
    X, Y, Xt = _problem()
    alpha, _ = _reference(X, Y, Xt)
    Xc = torch.as_tensor(X, device="cuda")
    for method in ("dense_cg", "matrix_free_cg"):
        res = nk.scale.solve(NET, Xc, Y, method=method, diag_reg=1e-2, tol=1e-10, tile=64,
                             n_landmarks=60)
        assert res.coef.device.type == "cuda" and res.converged
        np.testing.assert_allclose(res.coef.cpu().numpy(), alpha, rtol=0,
                                   atol=1e-4 * np.abs(alpha).max())
    with pytest.raises(ValueError, match="runs on the CPU"):
        nk.scale.solve(NET, Xc, Y, method="direct", diag_reg=1e-2)
