"""ntkit.scale: tiled and out-of-core kernels, resumable zarr output, CG/Nyström solves, Dask.

Reference values are computed independently: the untiled ``net.kernel`` call, dense
``scipy.linalg.solve``, and eigenvalues of dense matrices with numpy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import scipy.linalg
import torch

import ntkit as nk
from ntkit.scale import (
    DenseOperator,
    KernelOperator,
    NystromPreconditioner,
    dask_kernel,
    kernel_matrix,
    solve,
)
from ntkit.scale import tiled as tiled_module

NET = nk.mlp(3, 512)  # depth-3 ReLU, W_std=1, b_std=0.1

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _data(n, d=6, seed=0):
    gen = np.random.default_rng(seed)
    return gen.standard_normal((n, d))


# ----------------------------------------------------------------------------- kernel_matrix
@pytest.mark.parametrize("get,tile", [("ntk", 128), ("ntk", 150), ("nngp", 128),
                                      ("nngp", 1000)])
def test_tiled_kernel_is_bit_identical_to_the_full_computation(get, tile):
    # 150 does not divide the analytic kernel's own 512-row tiles; 1000 is a single tile.
    X = _data(400)
    full = NET.kernel(X, get=get)[get]
    tiled = kernel_matrix(NET, X, get=get, tile=tile, progress=False)
    assert tiled.dtype == torch.float64 and tiled.shape == (400, 400)
    assert torch.equal(tiled, full)
    assert torch.equal(tiled, tiled.T)  # mirrored tiles: exactly symmetric
    X2 = _data(150, seed=1)
    assert torch.equal(kernel_matrix(NET, X, X2, get=get, tile=tile, progress=False),
                       NET.kernel(X, X2, get=get)[get])


def test_zarr_output_matches_memory_and_uses_tile_chunks(tmp_path):
    X = _data(500)
    arr = kernel_matrix(NET, X, tile=128, out=tmp_path / "k.zarr", progress=False)
    assert arr.chunks == (128, 128) and arr.shape == (500, 500)
    assert np.array_equal(arr[:], NET.kernel(X, get="ntk").ntk.numpy())
    assert arr.attrs["ntkit_complete"] is True


def test_zarr_refuses_to_resume_a_different_kernel(tmp_path):
    X = _data(300)
    path = tmp_path / "k.zarr"
    kernel_matrix(NET, X, tile=128, out=path, progress=False)
    with pytest.raises(ValueError, match="resume=False"):
        kernel_matrix(NET, X + 1.0, tile=128, out=path, progress=False)
    with pytest.raises(ValueError, match="resume=False"):
        kernel_matrix(NET, X, get="nngp", tile=128, out=path, progress=False)
    arr = kernel_matrix(NET, X + 1.0, tile=128, out=path, resume=False, progress=False)
    assert np.array_equal(arr[:], NET.kernel(X + 1.0, get="ntk").ntk.numpy())


_WORKER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import ntkit as nk
    from ntkit.scale import kernel_matrix, tiled

    # Slow each tile down (values untouched) so the parent can kill us mid-run.
    original = tiled.kernel_tile
    def slow_tile(*args, **kwargs):
        time.sleep(0.15)
        return original(*args, **kwargs)
    tiled.kernel_tile = slow_tile
    X = np.load(sys.argv[1])
    kernel_matrix(nk.mlp(3, 512), X, tile=64, out=sys.argv[2], progress=False)
""")


def test_killed_run_resumes_to_a_bit_identical_result(tmp_path, monkeypatch):
    X = _data(640, seed=3)  # 10 x 10 tiles of 64 -> 55 on/above the diagonal
    np.save(tmp_path / "x.npy", X)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    path = tmp_path / "k.zarr"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "x.npy"), str(path)])
    progress = path / "ntkit_progress"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if progress.exists() and len(list(progress.iterdir())) >= 8:
                break
            if proc.poll() is not None:
                pytest.fail("the worker finished or died before it could be killed")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    finished = len(list(progress.iterdir()))
    assert 8 <= finished < 55, "the kill must land while tiles are being computed"

    computed = []
    original = tiled_module.kernel_tile

    def counting_tile(*args, **kwargs):
        computed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiled_module, "kernel_tile", counting_tile)
    arr = kernel_matrix(NET, X, tile=64, out=path, progress=False)
    assert len(computed) == 55 - finished  # only the missing tiles were computed
    monkeypatch.undo()
    uninterrupted = kernel_matrix(NET, X, tile=64, out=tmp_path / "ref.zarr", progress=False)
    resumed = arr[:]
    assert not np.isnan(resumed).any()
    assert np.array_equal(resumed.view(np.uint64), uninterrupted[:].view(np.uint64))
    assert np.array_equal(resumed, NET.kernel(X, get="ntk").ntk.numpy())


def test_dense_request_beyond_memory_raises_before_allocating():
    X = np.ones((200_000, 1))  # the kernel would need 298 GiB
    start = time.perf_counter()
    with pytest.raises(MemoryError) as info:
        kernel_matrix(NET, X, progress=False)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "298.0 GiB" in message and "out=" in message and "method='cg'" in message


def test_kernel_matrix_rejects_bad_input():
    X = _data(20)
    with pytest.raises(ValueError, match="get"):
        kernel_matrix(NET, X, get="both", progress=False)
    with pytest.raises(ValueError, match="tile"):
        kernel_matrix(NET, X, tile=0, progress=False)
    with pytest.raises(ValueError, match="features"):
        kernel_matrix(NET, X, _data(5, d=3), progress=False)
    bad = X.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kernel_matrix(NET, bad, progress=False)
    with pytest.raises(ValueError, match="net"):
        kernel_matrix("relu", X, progress=False)


# ----------------------------------------------------------------------------- solvers
def _problem(n=300, d=6, seed=0, k=None):
    X = _data(n, d=d, seed=seed)
    gen = np.random.default_rng(seed + 100)
    y = np.sin(X @ gen.standard_normal(d)) if k is None else gen.standard_normal((n, k))
    K = NET.kernel(X, get="ntk").ntk.numpy()
    return X, y, K


def test_tiled_matvec_equals_dense():
    X, _, K = _problem(n=333)
    V = np.random.default_rng(1).standard_normal((333, 3))
    op = KernelOperator(NET, X, tile=100)
    np.testing.assert_allclose(op.matmul(torch.from_numpy(V)).numpy(), K @ V, rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(op.diagonal().numpy(), np.diag(K), rtol=1e-13)
    np.testing.assert_allclose(op.columns(torch.tensor([3, 7])).numpy(), K[:, [3, 7]],
                               rtol=1e-13)


@pytest.mark.parametrize("method,preconditioner", [("cholesky", None), ("cg", None),
                                                   ("cg", "nystrom")])
def test_solvers_match_a_dense_scipy_solve(method, preconditioner):
    X, Y, K = _problem(k=2)
    lam = 1e-2 * np.mean(np.diag(K))
    expected = scipy.linalg.solve(K + lam * np.eye(len(K)), Y, assume_a="pos")
    res = solve(NET, X, Y, method=method, preconditioner=preconditioner, diag_reg=1e-2,
                tol=1e-10, n_landmarks=100, tile=128)
    assert res.ridge == pytest.approx(lam, rel=1e-14)
    assert res.coef.shape == (300, 2) and res.converged
    np.testing.assert_allclose(res.coef.numpy(), expected, rtol=0, atol=1e-7 * np.abs(
        expected).max())


def test_nystrom_preconditioner_cuts_cg_iterations():
    # Low intrinsic dimension and a small ridge: a fast-decaying spectrum, an ill-posed system.
    _, y, K = _problem(n=500, d=3, seed=4)
    plain = solve(K, None, y, method="cg", diag_reg=1e-6, tol=1e-8, max_iter=5000)
    pre = solve(K, None, y, method="cg", preconditioner="nystrom", diag_reg=1e-6, tol=1e-8,
                n_landmarks=150, max_iter=5000)
    assert plain.converged and pre.converged
    assert pre.iterations * 4 < plain.iterations, (pre.iterations, plain.iterations)
    np.testing.assert_allclose(pre.coef.numpy(), plain.coef.numpy(), rtol=0,
                               atol=1e-5 * np.abs(plain.coef.numpy()).max())


def test_nystrom_condition_number_and_exact_limit():
    _, _, K = _problem(n=300, d=2, seed=5)
    mu = 1e-5 * np.mean(np.diag(K))
    A = K + mu * np.eye(300)
    op = DenseOperator(K)
    P = NystromPreconditioner(op, mu, n_landmarks=80)
    Pinv = P(torch.eye(300, dtype=torch.float64)).numpy()
    assert np.allclose(Pinv, Pinv.T, atol=1e-12)
    assert np.linalg.eigvalsh(Pinv).min() > 0  # symmetric positive definite
    # The spectrum of P^{-1} A is that of the symmetric P^{-1/2} A P^{-1/2}.
    w, V = np.linalg.eigh(Pinv)
    half = V @ np.diag(np.sqrt(w)) @ V.T
    ev = np.linalg.eigvalsh(half @ A @ half)
    ev_a = np.linalg.eigvalsh(A)
    assert ev.max() / ev.min() < 1e-2 * ev_a.max() / ev_a.min()  # measured: 715 vs 3.6e5
    # With every point a landmark the approximation is exact: CG needs one or two steps.
    full = solve(K, None, np.ones(300), method="cg", preconditioner="nystrom", diag_reg=1e-5,
                 n_landmarks=300, tol=1e-8)
    assert full.iterations <= 3


def test_cg_never_forms_the_dense_kernel(monkeypatch):
    X, y, K = _problem(n=300)
    sizes = []
    original = tiled_module.kernel_tile

    def recording_tile(net, X1, X2, rows, cols, get, symmetric):
        sizes.append((rows.stop - rows.start) * (cols.stop - cols.start))
        return original(net, X1, X2, rows, cols, get, symmetric)

    def forbidden(*args, **kwargs):
        raise AssertionError("the dense kernel was requested")

    import ntkit.scale.solvers as solvers_module
    monkeypatch.setattr(solvers_module, "kernel_tile", recording_tile)
    monkeypatch.setattr(tiled_module, "_kernel_in_memory", forbidden)
    res = solve(NET, X, y, method="cg", diag_reg=1e-2, tol=1e-7, tile=128)
    assert res.converged and max(sizes) <= 128 * 128
    expected = scipy.linalg.solve(K + res.ridge * np.eye(300), y, assume_a="pos")
    np.testing.assert_allclose(res.coef.numpy(), expected, atol=1e-5 * np.abs(expected).max())


def test_solve_rejects_bad_arguments():
    X, y, _ = _problem(n=50)
    with pytest.raises(ValueError, match="y must have shape"):
        solve(NET, X, y[:-1])
    with pytest.raises(ValueError, match="method"):
        solve(NET, X, y, method="lu")
    with pytest.raises(ValueError, match="method='cg'"):
        solve(NET, X, y, preconditioner="nystrom")
    with pytest.raises(ValueError, match="diag_reg"):
        solve(NET, X, y, method="cg", preconditioner="nystrom", diag_reg=0.0)
    with pytest.raises(ValueError, match="diag_reg"):
        solve(NET, X, y, diag_reg=-1.0)
    with pytest.raises(ValueError, match="diag_reg"):
        solve(NET, np.vstack([X, X[:1]]), np.append(y, 0.0))  # repeated row, no ridge
    with pytest.raises(ValueError, match="NaN"):
        solve(NET, X, np.where(np.arange(50) == 3, np.nan, y))
    with pytest.raises(ValueError, match="net_or_operator"):
        solve("ntk", X, y)


# ----------------------------------------------------------------------------- dask
def test_dask_kernel_local_scheduler_matches_kernel_matrix():
    X, X2 = _data(300), _data(170, seed=2)
    K = dask_kernel(NET, X, chunks=128)
    assert K.chunks == ((128, 128, 44), (128, 128, 44))
    assert np.array_equal(K.compute(scheduler="synchronous"), NET.kernel(X, get="ntk").ntk)
    Kx = dask_kernel(NET, X, X2, chunks=100, get="nngp")
    assert np.array_equal(Kx.compute(), NET.kernel(X, X2, get="nngp").nngp.numpy())
    with pytest.raises(ValueError, match="features"):
        dask_kernel(NET, X, _data(5, d=2))
    with pytest.raises(ValueError, match="chunks"):
        dask_kernel(NET, X, chunks=0)


def test_dask_kernel_on_a_real_local_cluster():
    from dask.distributed import Client, LocalCluster, get_task_stream

    X = _data(400, seed=7)
    v = np.random.default_rng(8).standard_normal(400)
    K_ref = NET.kernel(X, get="ntk").ntk.numpy()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        worker_pids = set(client.run(os.getpid).values())
        assert len(worker_pids) == 2 and os.getpid() not in worker_pids
        K = dask_kernel(NET, X, chunks=100)  # 16 blocks
        with get_task_stream(client) as stream:
            dense = K.compute()
            matvec = (K @ v).compute()
        assert np.array_equal(dense, K_ref)
        # Summation order differs (blocks): compare on the scale of the terms.
        np.testing.assert_allclose(matvec, K_ref @ v, rtol=0,
                                   atol=1e-12 * np.abs(K_ref).sum(1).max() * np.abs(v).max())
        workers = {task["worker"] for task in stream.data}
        assert workers and workers <= set(cluster.scheduler_info["workers"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiles_and_solves_follow_the_input_device():
    X, y, K = _problem(n=200)
    Xc = torch.as_tensor(X, device="cuda")
    Kc = kernel_matrix(NET, Xc, tile=64, progress=False)
    assert Kc.device.type == "cuda"
    np.testing.assert_allclose(Kc.cpu().numpy(), K, rtol=1e-12, atol=1e-12)
    res = solve(NET, Xc, torch.as_tensor(y, device="cuda"), method="cg",
                preconditioner="nystrom", diag_reg=1e-2, n_landmarks=50, tol=1e-10, tile=64)
    assert res.coef.device.type == "cuda"
    expected = scipy.linalg.solve(K + res.ridge * np.eye(200), y, assume_a="pos")
    np.testing.assert_allclose(res.coef.cpu().numpy(), expected, atol=1e-7)
