"""GPU benchmark: the Myrtle kernel (NNGP + NTK) on 32x32x3 images, float64, on CUDA.

Workload: ``nk.myrtle(depth)`` (Shankar et al. 2020: 3x3 "same" Conv+ReLU stages with 2x2
average pooling between them, global average pooling, Dense), the symmetric kernel
``K(x, x)`` of ``--n`` images (default 256, depth 5). Every pooled layer needs every pixel
pair, (32·32)² ≈ 10⁶ entries per image pair in the first stage: about N²/2 · 10⁶ · (layers)
entries in all, which is what makes a GPU worth it.

Images: the bundled MNIST test digits (pixels / 255), zero-padded from 28x28 to 32x32 and
repeated over 3 channels, as a deterministic stand-in for CIFAR-10 (no data set is downloaded;
the kernel's cost does not depend on the pixel values). Seed-0 permutation.

Checks, in the same run: the GPU kernel of the first ``--check`` images against the CPU
kernel of the same images (max relative difference, float64), and symmetry.

Run: ``python benchmarks/gpu_myrtle.py`` (under 5 minutes on one recent GPU for N = 256; it
prints a line and exits when CUDA is unavailable). ``--smoke`` runs a tiny version on the CPU
(8 images of 8x8, to test the script itself; writes nothing). Writes
``benchmarks/results/gpu_myrtle.md`` after a GPU run.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import ntkit as nk
from common import fmt_ms, stamp, write_table


def images(n: int, size: int = 32) -> torch.Tensor:
    """``(n, 3, size, size)`` float64: MNIST test digits zero-padded (or cropped) to
    ``size`` and repeated over 3 channels."""
    data = nk.datasets.load_mnist()
    order = np.random.default_rng(0).permutation(len(data.labels))[:n]
    digits = data.images[order].reshape(n, 28, 28)
    out = np.zeros((n, size, size))
    if size >= 28:
        lo = (size - 28) // 2
        out[:, lo:lo + 28, lo:lo + 28] = digits
    else:
        lo = (28 - size) // 2
        out[:] = digits[:, lo:lo + size, lo:lo + size]
    return torch.from_numpy(np.repeat(out[:, None], 3, axis=1).copy())


def entries(net_depth: int, n: int, size: int) -> float:
    """Pixel-pair entries the symmetric kernel evaluates: per conv layer the image pairs
    (upper triangle) times (H·W)² at that stage's resolution."""
    from ntkit.layers.conv import _MYRTLE_STAGES

    total, hw = 0.0, size * size
    for stage, layers in enumerate(_MYRTLE_STAGES[net_depth]):
        total += layers * hw * hw
        if stage < 2:
            hw //= 4
    return total * n * (n + 1) / 2


def main(n: int, depth: int, size: int, check: int, device: str, budget: int,
         dtype: torch.dtype) -> str:
    net = nk.myrtle(depth)
    x = images(n, size)
    x_dev = x.to(device)
    # Warm-up: CUDA context, kernels, allocator.
    net.kernel(x_dev[:4], dtype=dtype, memory_budget=budget)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    k = net.kernel(x_dev, dtype=dtype, memory_budget=budget)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    symmetric = all(torch.equal(k[name], k[name].T) for name in ("nngp", "ntk"))

    start = time.perf_counter()
    k_cpu = net.kernel(x[:check], dtype=dtype)
    cpu_seconds = time.perf_counter() - start
    diff = max(float((k[name][:check, :check].cpu() - k_cpu[name]).abs().max()
                     / k_cpu[name].abs().max()) for name in ("nngp", "ntk"))
    count = entries(depth, n, size)
    cpu_count = entries(depth, check, size)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"
    lines = [
        f"# Myrtle-{depth} kernel (NNGP + NTK) on {size}x{size}x3 images, {str(dtype)[6:]}, {name}",
        "",
        stamp(torch.get_num_threads()),
        "",
        "| N | pixel-pair entries (all layers) | time | entries / s | peak GPU memory GiB "
        f"| symmetric | max rel. diff vs CPU ({check} images) | CPU time for those |",
        "|---|---|---|---|---|---|---|---|",
        f"| {n} | {count:.3g} | {seconds:.1f} s | {count / seconds:.3g} | {peak:.1f} | "
        f"{symmetric} | {diff:.1e} | {fmt_ms(cpu_seconds)} ms ({cpu_count / cpu_seconds:.3g} "
        "entries / s) |",
        "",
        f"`nk.myrtle({depth})`, `net.kernel(x, memory_budget={budget})` on the GPU after a "
        "warm-up on 4 images; images: MNIST test digits zero-padded to 32x32 and repeated over "
        "3 channels (a stand-in for CIFAR-10: the cost does not depend on pixel values).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images (default 256)")
    parser.add_argument("--depth", type=int, default=5, choices=(5, 7, 10))
    parser.add_argument("--check", type=int, default=4,
                        help="images whose kernel is recomputed on the CPU for the check")
    parser.add_argument("--memory-budget", type=float, default=8e9,
                        help="bytes of tile workspace on the GPU (default 8e9)")
    parser.add_argument("--float32", action="store_true", help="float32 instead of float64")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run (8 images of 8x8) to test the script; writes nothing")
    args = parser.parse_args()
    dtype = torch.float32 if args.float32 else torch.float64
    if args.smoke:
        print(main(8, args.depth, 8, 2, "cpu", int(16e6), dtype))
        sys.exit(0)
    if not torch.cuda.is_available():
        print("gpu_myrtle: no CUDA device available (torch.cuda.is_available() is False); "
              "nothing was run. Run it on a machine with a GPU and a CUDA build of torch.")
        sys.exit(0)
    write_table("gpu_myrtle", main(args.n, args.depth, 32, args.check, "cuda",
                                   int(args.memory_budget), dtype))
