"""Analytic NNGP+NTK of depth-4 MLPs: ntkit vs a roofline floor and neural-tangents.

Workload (as in shared/reference/anchor-timings.md): Dense(W_std=1, b_std=0.1) -> act, three
times, then Dense; inputs N x 784 uniform; both kernels, x2 = None.

The floor for one call, measured on this machine in the same run:
* Gram: the N(N+1)/2 distinct entries of X Xᵀ need N(N+1)·d flops, at the measured matmul rate;
* elementwise: for each of the 7 layers after the Gram, read and write the two kernels of the
  distinct entries once (a streaming model: 2 kernels x 2 directions x itemsize bytes per entry
  and layer), plus writing the two full N x N outputs, at the measured copy bandwidth.

Times (ours, the naive recursion, and the matmul/copy rates behind the floor) are the best of
5 calls after a warm-up. Run: ``python benchmarks/analytic_kernels.py`` (about a minute). Writes
``benchmarks/results/analytic_kernels.md``.
"""

from __future__ import annotations


import torch

import ntkit as nk
from common import best_time, write_table

SIZES = (1000, 2000, 4000)
DTYPES = (torch.float32, torch.float64)
D = 784
LAYERS_AFTER_GRAM = 7  # Dense, (act, Dense) x 3
# neural-tangents 0.6.5 on this kind of machine (anchor-timings.md), ReLU MLP, ms
NT_MS = {(1000, torch.float32): 50, (2000, torch.float32): 156, (4000, torch.float32): 780,
         (1000, torch.float64): 68, (2000, torch.float64): 258, (4000, torch.float64): 1089}


def matmul_rate(dtype) -> float:
    a = torch.rand(4096, 4096, dtype=dtype)
    seconds = best_time(lambda: a @ a, repeats=3)
    return 2 * 4096 ** 3 / seconds


def copy_bandwidth() -> float:
    src = torch.empty(2 ** 27, dtype=torch.float64).fill_(1.0)  # 1 GiB
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), repeats=3)
    return 2 * src.numel() * 8 / seconds  # read + write


def naive_relu_kernel(x: torch.Tensor):
    """The recursion as a user would write it: whole N x N arrays, one op at a time."""
    n0 = x.shape[1]
    cov = x @ x.T / n0 + 0.01
    ntk = cov.clone()
    for _ in range(3):
        var = cov.diagonal()
        norm = torch.sqrt(var[:, None] * var[None, :])
        rho = torch.clamp(cov / norm, -1, 1)
        theta = torch.arccos(rho)
        dot = (torch.pi - theta) / (2 * torch.pi)
        cov = norm * (torch.sin(theta) + (torch.pi - theta) * rho) / (2 * torch.pi) + 0.01
        ntk = ntk * dot + cov
    return cov, ntk


def main() -> str:
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    rates = {dt: matmul_rate(dt) for dt in DTYPES}
    lines = [
        "# Analytic kernels: depth-4 MLP, NNGP + NTK, N x 784 inputs",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Measured in this run: "
        f"matmul {rates[torch.float32] / 1e9:.0f} GFLOP/s (float32), "
        f"{rates[torch.float64] / 1e9:.0f} GFLOP/s (float64); copy {bandwidth / 1e9:.1f} GB/s.",
        "",
        "| act | N | dtype | ntkit ms | floor ms | ntkit / floor | naive torch ms "
        "| neural-tangents ms (anchor) | neural-tangents / ntkit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for act in ("relu", "erf"):
        net = nk.mlp(4, 512, act, W_std=1.0, b_std=0.1)
        for n in SIZES:
            for dtype in DTYPES:
                x = torch.rand(n, D, dtype=dtype)
                ours = best_time(lambda: net.kernel(x, dtype=dtype))
                itemsize = torch.finfo(dtype).bits // 8
                distinct = n * (n + 1) / 2
                flops = distinct * 2 * D
                bytes_moved = (distinct * 2 * 2 * itemsize * LAYERS_AFTER_GRAM
                               + 2 * n * n * itemsize)
                floor = flops / rates[dtype] + bytes_moved / bandwidth
                naive = "" if act != "relu" else f"{best_time(lambda: naive_relu_kernel(x)) * 1e3:.0f}"
                nt = NT_MS.get((n, dtype)) if act == "relu" else None
                nt_cols = f"{nt} | {nt / (ours * 1e3):.1f}x" if nt else "- | -"
                lines.append(f"| {act} | {n} | {str(dtype).split('.')[-1]} | {ours * 1e3:.0f} | "
                             f"{floor * 1e3:.0f} | {ours / floor:.2f} | {naive or '-'} | {nt_cols} |")
                print(lines[-1], flush=True)
    lines += [
        "",
        "neural-tangents timings are the anchors in shared/reference/anchor-timings.md (ReLU MLP,",
        "same machine kind, measured separately: jax is not installed here). The naive column is a",
        "whole-array torch implementation of the same ReLU recursion, run in this process.",
        "",
        "Where the time above the floor goes (torch.profiler, ReLU, N = 4000, float64, 2 threads,",
        "one measurement on 2026-11-29): tile Gram matmuls about 130 ms (512-wide gemms run at",
        "about 80% of the 4096³ rate, and diagonal tiles are computed whole); the elementwise",
        "layer maps about 250 ms (about 15 passes per layer over each cache-resident tile, plus",
        "arccos and sin); writing the two outputs about 100 ms, of which about 55 ms is the",
        "kernel faulting in 256 MB of fresh pages (a warm fill of the same memory takes 10 ms)",
        "and about 25 ms is the transposed copies that mirror the upper triangle. Fusing each",
        "tile's layer maps with torch.compile (tried: 4.6× faster per float64 tile in isolation)",
        "cut the elementwise part to about 113 ms but the whole call only by about 14% in",
        "float64 and not measurably in float32, for 5–40 s of compilation per network and",
        "dtype; it is not used. Madvised huge pages for the output made first touch slower",
        "here (THP defrag on fault).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    write_table("analytic_kernels", main())
