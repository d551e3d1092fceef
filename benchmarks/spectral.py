"""Top-3 eigenpairs of Π = K/N for N = 10,000 (float64): method="auto" vs a full eigh.

K is the depth-4 ReLU NTK (JGH's network) of 10,000 MNIST test digits (pixels / 255).
Run: ``python benchmarks/spectral.py`` (about 8 minutes on 2 cores, most of it the full eigh);
``--quick`` for N = 2,000, writing nothing. Writes ``benchmarks/results/spectral.md``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import ntkit as nk
from ntkit import spectral
from ntkit.datasets import load_mnist
from common import add_common_args, set_threads, stamp, write_table


def main(n: int = 10_000, k: int = 3, shared: bool = False) -> str:
    header = stamp(torch.get_num_threads(), None, shared)  # the state the run starts from
    x = torch.as_tensor(load_mnist().images[:n])
    start = time.perf_counter()
    K = nk.mlp(4, 1, "relu", W_std=1.0, b_std=0.1).kernel(x, get="ntk").ntk
    t_kernel = time.perf_counter() - start
    rows = []
    results = {}
    for method in ("auto", "power", "eigh"):
        start = time.perf_counter()
        eig = spectral.eigen(K, k, method=method, tol=1e-12)
        elapsed = time.perf_counter() - start
        results[method] = eig
        rows.append((method, eig.method, elapsed, eig.values.tolist(), float(eig.residuals.max())))
    ref = results["eigh"].values.numpy()
    lines = [
        f"# Top-{k} eigenpairs of Π = K/N, N = {n}, float64",
        "",
        header,
        "",
        (f"K: depth-4 ReLU NTK (σ_w = 1, β = 0.1) of the first {n} bundled MNIST test digits; "
         f"computing K took {t_kernel:.1f} s. torch {torch.__version__}, "
         f"{torch.get_num_threads()} threads."),
        "",
        ("| method | solver used | time (s) | speed-up vs eigh | eigenvalues | max rel. residual "
         "| max rel. error vs eigh |"),
        "|---|---|---|---|---|---|---|",
    ]
    t_eigh = rows[-1][2]
    for method, used, elapsed, values, residual in rows:
        err = float(np.max(np.abs(np.array(values) - ref) / np.abs(ref)))
        vals = ", ".join(f"{v:.6g}" for v in values)
        lines.append(f"| {method} | {used} | {elapsed:.2f} | {t_eigh / elapsed:.1f}x | {vals} | "
                     f"{residual:.1e} | {err:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "N = 2,000; writes no table")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.quick:
        print(main(2000, shared=args.shared))
    else:
        write_table("spectral", main(shared=args.shared))
