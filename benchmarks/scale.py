"""Scale: a 50,000-point kernel regression solved without forming K, and Dask backends.

Part ``cg`` — N = 50,000 synthetic regression points, d = 50 (x ~ N(0, I), y = a smooth
function + noise), the NTK of a one-hidden-layer ReLU network (``nk.mlp(2, ·)``, W_std = 1,
b_std = 0.1), ridge ``diag_reg = 1e-3`` (relative to the mean diagonal). The dense K would
need 18.6 GiB in float64; ``ntkit.scale.solve(method="cg", preconditioner="nystrom")``
recomputes it tile by tile at each CG iteration. Reported: iterations, time, peak resident
memory, the final relative residual (recursive and recomputed), and on a random 5,000 subset
the same solver against a direct Cholesky solve (and against plain CG).

Part ``dask`` — the same kernel for N = 20,000 as a ``dask.array`` (``dask_kernel``, 2,500-row
chunks, 64 blocks) reduced to ``K @ v`` (so only vectors travel back), on: the synchronous
scheduler (one process, one task at a time), the threaded scheduler (2 threads), and a
``LocalCluster`` of 2 worker processes x 1 thread. ntkit's own single-process
``KernelOperator.matmul``, which uses the symmetry of K (half the tiles), is shown as well.

Run: ``python benchmarks/scale.py [cg|dask|all] [torch_threads]`` (cg: about 20–30 minutes on 2 busy cores;
dask: a few minutes). Writes ``benchmarks/results/scale_cg.md`` and
``benchmarks/results/scale_dask.md``.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ntkit as nk
from ntkit.scale import KernelOperator, dask_kernel, kernel_matrix, solve

RESULTS = Path(__file__).parent / "results"
D = 50
NET = nk.mlp(2, 512)  # the analytic kernel does not depend on the width


def synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=gen, dtype=torch.float64)
    w = torch.randn(D, 3, generator=gen, dtype=torch.float64) / D ** 0.5
    Z = X @ w
    y = torch.sin(2 * Z[:, 0]) + torch.relu(Z[:, 1]) - 0.5 * Z[:, 2] ** 2
    return X, y + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30


def part_cg(n: int = 50_000, n_sub: int = 5_000, diag_reg: float = 1e-3,
            n_landmarks: int = 4000, tol: float = 1e-6, tile: int = 4096) -> str:
    X, y = synthetic(n)
    head = [f"# CG + Nyström on N = {n:,}, d = {D} (NTK of a 1-hidden-layer ReLU net)", "",
            f"Ridge diag_reg = {diag_reg:g} (relative to the mean diagonal), tol = {tol:g} "
            f"(relative residual), tile = {tile}, float64, torch threads = "
            f"{torch.get_num_threads()}, 2 CPU cores shared with other jobs. A dense K would "
            f"need {n * n * 8 / 2 ** 30:.1f} GiB.", ""]

    # --- the 5,000 subset: the same solver against a direct Cholesky solve. K is formed once
    # here (it is small) so that plain CG's many iterations stay cheap; the iteration counts
    # and the solutions do not depend on how the mat-vec is evaluated.
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:n_sub]
    Xs, ys = X[sub], y[sub]
    start = time.perf_counter()
    K = kernel_matrix(NET, Xs, tile=tile, progress=False)
    t_kernel = time.perf_counter() - start
    rows = []
    start = time.perf_counter()
    direct = solve(K, None, ys, method="cholesky", diag_reg=diag_reg)
    rows.append(("Cholesky", "—", 0, time.perf_counter() - start, "—", "—"))
    m_sub = n_sub // 5
    for name, pre in ((f"CG + Nyström (m = {m_sub})", "nystrom"), ("CG, no preconditioner",
                                                                    None)):
        start = time.perf_counter()
        res = solve(K, None, ys, method="cg", preconditioner=pre, diag_reg=diag_reg, tol=tol,
                    max_iter=5000, n_landmarks=m_sub)
        seconds = time.perf_counter() - start
        A = K + direct.ridge * torch.eye(n_sub, dtype=K.dtype)
        true_res = float((ys - A @ res.coef).norm() / ys.norm())
        err = float((res.coef - direct.coef).norm() / direct.coef.norm())
        pred_err = float((K @ (res.coef - direct.coef)).norm() / (K @ direct.coef).norm())
        rows.append((name, res.iterations, res.iterations, seconds, f"{true_res:.1e}",
                     f"{err:.1e} / {pred_err:.1e}"))
        print(name, res.iterations, seconds, true_res, err, flush=True)
    sub_lines = [f"## Subset of {n_sub:,} points: against a direct solve", "",
                 f"K ({n_sub:,}²) formed once in {t_kernel:.1f} s and shared by the three "
                 "solvers.", "",
                 "| solver | iterations | mat-vecs | solve time (s) | residual ‖y − (K+λI)α‖/‖y‖ |"
                 " rel. error of α / of train predictions vs Cholesky |",
                 "|---|---|---|---|---|---|"]
    for name, it, mv, seconds, resid, err in rows:
        sub_lines.append(f"| {name} | {it} | {mv} | {seconds:.2f} | {resid} | {err} |")

    # --- the full problem, never forming K
    log: list[tuple[int, float, float]] = []
    start = time.perf_counter()

    def write(final_lines):
        table = "\n".join(head + sub_lines + final_lines) + "\n"
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scale_cg.md").write_text(table)
        return table

    def on_iteration(it, rel):
        log.append((it, time.perf_counter() - start, rel))
        print(f"iteration {it}: {log[-1][1]:.0f} s, relative residual {rel:.2e}, peak RSS "
              f"{peak_rss_gib():.2f} GiB", flush=True)
        write(["", f"## Full problem: N = {n:,} (in progress)", "",
               f"After {it} iterations and {log[-1][1]:.0f} s: relative residual {rel:.1e}."])

    res = solve(NET, X, y, method="cg", preconditioner="nystrom", diag_reg=diag_reg, tol=tol,
                max_iter=200, n_landmarks=n_landmarks, tile=tile, callback=on_iteration)
    seconds = time.perf_counter() - start
    setup = log[0][1] - (log[1][1] - log[0][1]) if len(log) > 1 else float("nan")
    per_it = (log[-1][1] - log[0][1]) / max(len(log) - 1, 1)
    peak = peak_rss_gib()
    print("full", res.iterations, seconds, res.residual, peak, flush=True)
    final = ["", f"## Full problem: N = {n:,}, matrix-free", "",
             "| solver | iterations | total time (s) | Nyström setup (s, approx.) | s / iteration"
             " | final relative residual (CG recursion) | peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|",
             f"| CG + Nyström (m = {n_landmarks}) | {res.iterations} | {seconds:.0f} | "
             f"{setup:.0f} | {per_it:.0f} | {res.residual:.1e} | {peak:.2f} |", "",
             "Residual after each iteration: " + ", ".join(f"{r:.1e}" for _, _, r in log) + ".",
             "", "Each iteration recomputes the upper half of K tile by tile (one "
             f"{n:,}² mat-vec); peak RSS is the whole process's maximum resident memory."]
    table = write(final)
    print(table)
    return table


def part_dask(n: int = 20_000, chunks: int = 2500, repeats: int = 1) -> str:
    from dask.distributed import Client, LocalCluster

    X, _ = synthetic(n)
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v_np = v.numpy()
    times = {}
    default_threads = torch.get_num_threads()

    def timed(name, fn, threads):
        # Best of `repeats`: the cores are shared with other jobs.
        torch.set_num_threads(threads)
        best, out = float("inf"), None
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        times[name] = (best, np.asarray(out))
        torch.set_num_threads(default_threads)
        print(name, best, flush=True)

    K = dask_kernel(NET, X, chunks=chunks)
    matvec = K @ v_np
    timed("single process, synchronous scheduler, torch 1 thread",
          lambda: matvec.compute(scheduler="synchronous"), 1)
    timed("threaded scheduler, 2 threads x torch 1 thread",
          lambda: matvec.compute(scheduler="threads", num_workers=2), 1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: None)  # workers up before the clock starts
        timed("LocalCluster, 2 worker processes x 1 thread", lambda: matvec.compute(),
              default_threads)
    timed("ntkit KernelOperator.matmul (1 process, torch 1 thread, symmetric:"
          " half the tiles)", lambda: KernelOperator(NET, X, tile=chunks).matmul(v).numpy(), 1)

    names = list(times)
    ref_name = names[0]
    ref = times[ref_name]
    lines = [f"# Dask: K @ v for N = {n:,}, d = {D} ({(n + chunks - 1) // chunks}² blocks of "
             f"{chunks}), NTK of a 1-hidden-layer ReLU net", "",
             f"Best of {repeats} run(s) each, on 2 CPU cores shared with other jobs. Every Dask "
             "row computes all blocks of the same graph (`dask_kernel(...) @ v`); only the "
             "vector comes back. Dask's nanny sets OMP_NUM_THREADS=1 in the LocalCluster "
             "workers, so each runs torch on one thread; the single-process rows use one torch "
             "thread too, because torch's OpenMP pool degrades badly on cores shared with "
             "other jobs (an earlier run: 187 s with 2 threads vs 69 s with 1).", "",
             "| backend | time (s) | speed-up vs first row | max abs diff vs first row |",
             "|---|---|---|---|"]
    for name, (seconds, out) in times.items():
        diff = float(np.abs(out - ref[1]).max())
        lines.append(f"| {name} | {seconds:.1f} | {ref[0] / seconds:.2f}x | {diff:.1e} |")
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale_dask.md").write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if len(sys.argv) > 2:  # torch intra-op threads; 1 is faster when the cores are shared
        torch.set_num_threads(int(sys.argv[2]))
    if which in ("dask", "all"):
        part_dask()
    if which in ("cg", "all"):
        part_cg()
