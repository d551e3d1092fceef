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

Dask rows are timed ``--repeats`` times each (default 3); the table gives the median and the
range (min-max).

Run: ``python benchmarks/scale.py [cg|dask|all] [--threads T]`` (cg: about 20-30 minutes on 2
cores; dask: 3-5 minutes); ``--quick`` for N = 4,000 (dask) and 6,000 (cg), writing nothing.
Writes ``benchmarks/results/scale_cg.md`` and ``benchmarks/results/scale_dask.md``.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

import ntkit as nk
from ntkit.scale import KernelOperator, dask_kernel, kernel_matrix, solve
from common import RESULTS, add_common_args, set_threads, stamp, write_table
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
            n_landmarks: int = 4000, tol: float = 1e-6, tile: int = 4096,
            write_results: bool = True, shared: bool = False) -> str:
    X, y = synthetic(n)
    head = [f"# CG + Nyström on N = {n:,}, d = {D} (NTK of a 1-hidden-layer ReLU net)", "",
            stamp(torch.get_num_threads(), None, shared), "",
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
        if write_results:
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


def part_dask(n: int = 20_000, chunks: int = 2500, repeats: int = 3,
              write_results: bool = True, shared: bool = False) -> str:
    from dask.distributed import Client, LocalCluster

    header = stamp(1, None, shared)  # the state the run starts from
    X, _ = synthetic(n)
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v_np = v.numpy()
    times = {}
    default_threads = torch.get_num_threads()

    def timed(name, fn, threads):
        # Every repeat is kept: the cores may be shared, so the spread is part of the result.
        torch.set_num_threads(threads)
        runs, out = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            runs.append(time.perf_counter() - start)
        times[name] = (sorted(runs), np.asarray(out))
        torch.set_num_threads(default_threads)
        print(name, runs, flush=True)

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

    ref_runs, ref_out = times[next(iter(times))]
    ref_median = float(np.median(ref_runs))
    lines = [f"# Dask: K @ v for N = {n:,}, d = {D} ({(n + chunks - 1) // chunks}² blocks of "
             f"{chunks}), NTK of a 1-hidden-layer ReLU net", "",
             header, "",
             f"{repeats} runs each (median and range). Every Dask "
             "row computes all blocks of the same graph (`dask_kernel(...) @ v`); only the "
             "vector comes back. Dask's nanny sets OMP_NUM_THREADS=1 in the LocalCluster "
             "workers, so each runs torch on one thread; the single-process rows use one torch "
             "thread too, so every row uses at most 2 cores in total.", "",
             "| backend | time (s): median (min-max) | speed-up vs first row (median; range) "
             "| max abs diff vs first row |",
             "|---|---|---|---|"]
    for name, (runs, out) in times.items():
        median = float(np.median(runs))
        diff = float(np.abs(out - ref_out).max())
        lines.append(f"| {name} | {median:.1f} ({runs[0]:.1f}-{runs[-1]:.1f}) | "
                     f"{ref_median / median:.2f}x ({min(ref_runs) / runs[-1]:.2f}-"
                     f"{max(ref_runs) / runs[0]:.2f}x) | {diff:.1e} |")
    lines += ["", "The speed-up range pairs the slowest with the fastest runs (its widest "
              "possible spread)."]
    table = "\n".join(lines) + "\n"
    if write_results:
        write_table("scale_dask", table)
    else:
        print(table)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=("cg", "dask", "all"))
    add_common_args(parser, "N = 4,000 (dask) / 6,000 (cg); writes no table")
    parser.set_defaults(repeats=3)
    args = parser.parse_args()
    set_threads(args.threads)  # torch intra-op threads of the cg part; 1 on shared cores
    if args.which in ("dask", "all"):
        if args.quick:
            part_dask(4000, 1000, repeats=args.repeats, write_results=False)
        else:
            part_dask(repeats=args.repeats, shared=args.shared)
    if args.which in ("cg", "all"):
        if args.quick:
            part_cg(6000, 1500, n_landmarks=500, tile=1024, write_results=False)
        else:
            part_cg(shared=args.shared)
