"""Dask scaling of the kernel: 1 worker process vs W worker processes, one thread each.

The kernel of ``benchmarks/scale.py``'s Dask part (N = 20,000 points, d = 50, NTK of
``nk.mlp(2)``, blocks of 2,500 rows) on a ``LocalCluster`` of single-threaded worker
processes, through ``ntkit.scale.dask_kernel(..., client=client)``: the inputs are
scattered once to every worker, each block task carries only row ranges, and the blocks
below the diagonal are the transposes of those above (computed once). Reduced to ``K @ v``
on the cluster, so only vectors travel back. For comparison, the same graph without
``client=`` (inputs embedded in the graph, every block computed), which is what
``dask_kernel`` did before.

On a machine with more cores, pass ``--workers 1,2,4,8,16`` (each row: that many
single-threaded worker processes) and a larger ``--n``; the speed-up column is against one
worker of the same kind. Each row is timed ``--repeats`` times (median, min-max) after a
warm-up that starts the workers and imports torch on them.

    flock /tmp/team/bench.lock python benchmarks/dask_scaling.py               # here, ~5 min
    python benchmarks/dask_scaling.py --n 100000 --workers 1,8,32 --chunks 4096  # a big box
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, write_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, default=50)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--chunks", type=int, default=2500)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="dask_scaling")
    p.add_argument("--quick", action="store_true", help="no table written")
    args = p.parse_args()

    import torch
    from dask.distributed import Client, LocalCluster

    import ntkit as nk

    torch.set_num_threads(1)
    gen = np.random.default_rng(0)
    X = gen.standard_normal((args.n, args.d))
    v = gen.standard_normal(args.n)
    net = nk.mlp(args.depth, 512)
    stamp_line = stamp(1, shared=True)
    rows = []
    reference = None
    counts = [int(w) for w in args.workers.split(",")]
    for workers in counts:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            # Warm-up: torch and ntkit imported on every worker, one small kernel each.
            small = nk.scale.dask_kernel(net, X[:200], chunks=100, client=client)
            small.sum().compute()
            for label, use_client in (("scattered inputs, symmetric blocks (client=)", True),
                                      ("inputs in the graph, all blocks (before)", False)):
                if not use_client and workers != counts[-1] and len(counts) > 1:
                    continue  # the old graph only at the largest worker count
                times, result = [], None
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    K = (nk.scale.dask_kernel(net, X, chunks=args.chunks, client=client)
                         if use_client else nk.scale.dask_kernel(net, X, chunks=args.chunks))
                    result = (K @ v).compute()
                    times.append(time.perf_counter() - t0)
                if reference is None:
                    reference = result
                diff = float(np.abs(result - reference).max() / np.abs(reference).max())
                rows.append((workers, label, times, diff))
                print(workers, label, [f"{t:.1f}" for t in times], f"{diff:.1e}", flush=True)
    base = statistics.median(rows[0][2])
    lines = [f"# Dask: the kernel at N = {args.n:,} (d = {args.d}, NTK of `nk.mlp({args.depth})`,"
             f" blocks of {args.chunks}) on 1 vs more single-threaded worker processes", "",
             stamp_line, "",
             "LocalCluster(n_workers=W, threads_per_worker=1, processes=True); each worker runs "
             "torch on one thread (Dask's nanny sets OMP_NUM_THREADS=1). The kernel is reduced "
             "to `K @ v` on the cluster (only vectors travel back). "
             f"{args.repeats} timed runs per row after a warm-up; median (min-max). Speed-up: "
             "against the first row (1 worker, scattered inputs).", "",
             "| workers | graph | time (s): median (min-max) | speed-up vs 1 worker | "
             "max rel. diff vs first row |", "|---|---|---|---|---|"]
    for workers, label, times, diff in rows:
        med = statistics.median(times)
        lines.append(f"| {workers} | {label} | {med:.1f} ({min(times):.1f}-{max(times):.1f}) | "
                     f"{base / med:.2f}x | {diff:.1e} |")
    lines += ["", "On 2 cores shared with other jobs the ideal is 2x; another job's load "
              "lowers the 2-worker row more than the 1-worker one (it needs both cores)."]
    if args.quick:
        print("\n".join(lines))
        return
    write_table(args.name, "\n".join(lines))


if __name__ == "__main__":
    main()
