"""Analytic CNN kernels (NNGP + NTK): ntkit vs neural-tangents side by side, against a counted
floor, plus a micro-benchmark of the window-sum primitive.

Workloads (issue 13), float64, both kernels, the same inputs on both sides:

* ``flatten``: Conv(3x3, "same") -> ReLU, three times, then Flatten and Dense, on 28x28x1
  MNIST digits: ``K(x_a, [x_a; x_b])`` with ``x_a``, ``x_b`` two disjoint sets of N digits,
  i.e. N x 2N entries (N = 1000: the issue's 1000 x (1000 + 1000); neural-tangents' anchor on
  this machine: 141 s).
* ``gap``: the same convolutions with GlobalAvgPool instead of Flatten, on 14x14 digits
  (2x2-averaged): N x 2N entries with N = 500 for ntkit. neural-tangents did not finish that
  in 30 minutes, so it runs on a small subset (``--nt-gap``, default 20 x 40 entries), and
  ntkit runs on the same subset too: that row is like for like; the full row's
  neural-tangents time is an extrapolation by entries, labelled as such.

Digits: the bundled MNIST test set (pixels / 255), permuted with seed 0; ``x_a`` the first N,
``x_b`` the next N. Hyperparameters: Conv(64 channels, W_std=1.5, b_std=0.1, NTK
parameterization), Dense(1, W_std=1.5, b_std=0.1) (those of shared/reference/nt/conv/; the
channel count does not enter the NTK parameterization's kernels).

neural-tangents: ``nt.batch(jit(kernel_fn), batch_size)`` (see ``_nt_driver.py``, job kind
``conv``), compiled on one batch before timing. ntkit: ``net.kernel(x1, x2)`` with its
default tiles, after a warm-up call on a few rows. Each cell checks that both libraries agree on
the first rows of both kernels (max relative difference to the largest entry).

Floor (FLOOR_* below): per kernel entry (an image pair times a pixel for ``flatten``, times a
pixel pair for ``gap``) the arithmetic that any implementation of this recursion must do,
with the separable window (a 3x3 window sum is 2 + 2 shifted adds):

* input Gram: 2 flops (one channel: a multiply and an add);
* three convolutions: the covariance's window sum (4 adds) and its scale and bias (2), the
  NTK's window sum (4), scale (1) and the added covariance (1), except on the first layer
  (the NTK starts as the covariance): 3 * 6 + 2 * 6 = 30 flops;
* three ReLU duals: rho = cov * r1 * r2 with per-pixel reciprocal norms (2), the norm of the
  entry r1' * r2' (1), dot = (pi - theta) / (2 pi) (2), nngp = norm (sin + (pi - theta) rho) /
  (2 pi) (4), sin theta = sqrt((1 - rho)(1 + rho)) (3), NTK * dot (1): 13 flops, one arccos
  and one square root each;
* readout: one add per entry for each kernel (2 flops).

Total 73 flops, 3 arccos and 3 square roots per entry (the per-image variances are O(N) and
left out). The floor charges flops at the float64 gemm rate and arccos/sqrt at their best
vectorised torch rates on in-cache arrays, all measured in this run with the same threads
(``floor = entries * (73 / gemm + 3 / arccos + 3 / sqrt)``). Memory traffic is not charged:
a tiled implementation can keep its tile in cache. It is a floor for this recursion with
torch's primitives on this machine, not for any conceivable algorithm.

Run: ``python benchmarks/conv_kernels.py`` (about 10 minutes on 2 idle cores, most of it
neural-tangents' flatten row); ``--quick`` for small sizes (writes no table). Heavy: run under
``flock /tmp/team/bench.lock`` on a shared machine. Writes
``benchmarks/results/conv_kernels.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

import ntkit as nk
from common import (NT, Timing, add_common_args, fmt_ms, max_rel_diff, nt_timing, set_threads,
                    stamp, timing, write_table)

FLOOR_FLOPS = 2 + 30 + 3 * 13 + 2  # = 73 (see the docstring's count)
FLOOR_ARCCOS = 3
FLOOR_SQRT = 3
W_STD, B_STD, CHANNELS = 1.5, 0.1, 64
CHECK_ROWS = 8


# ----------------------------------------------------------------------------- networks
def ntkit_net(readout: str):
    layers = []
    for _ in range(3):
        layers += [nk.Conv(CHANNELS, (3, 3), 1, "same", W_STD, B_STD), nk.ReLU()]
    layers += [nk.Flatten() if readout == "flatten" else nk.GlobalAvgPool(),
               nk.Dense(1, W_STD, B_STD)]
    return nk.serial(*layers)


def nt_layers(readout: str) -> list:
    conv = ["Conv", {"out_chan": CHANNELS, "filter_shape": [3, 3], "padding": "SAME",
                     "W_std": W_STD, "b_std": B_STD}]
    layers = [conv, ["Relu", {}]] * 3
    layers += [["Flatten", {}] if readout == "flatten" else ["GlobalAvgPool", {}],
               ["Dense", {"out_dim": 1, "W_std": W_STD, "b_std": B_STD}]]
    return layers


# ----------------------------------------------------------------------------- data
def digits(n_total: int, size: int) -> np.ndarray:
    """``n_total`` MNIST test digits (seed-0 permutation), NCHW float64, 28x28 or 14x14
    (2x2 averages)."""
    data = nk.datasets.load_mnist()
    order = np.random.default_rng(0).permutation(len(data.labels))[:n_total]
    images = data.images[order].reshape(n_total, 1, 28, 28)
    if size == 14:
        images = images.reshape(n_total, 1, 14, 2, 14, 2).mean(axis=(3, 5))
    return np.ascontiguousarray(images)


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- rates
def rates(threads: int) -> dict[str, float]:
    """Machine rates for the floor, measured now with the benchmark's threads: float64 gemm
    flop/s, and arccos / sqrt results per second on an in-cache array."""
    a = torch.rand(2048, 2048, dtype=torch.float64)
    gemm = 2 * 2048 ** 3 / timing(lambda: a @ a, 3).best
    x = torch.rand(1 << 17, dtype=torch.float64) * 1.98 - 0.99
    out = torch.empty_like(x)
    acos = x.numel() / timing(lambda: torch.arccos(x, out=out), 20).best
    y = x.abs()
    sqrt = x.numel() / timing(lambda: torch.sqrt(y, out=out), 20).best
    return {"gemm": gemm, "arccos": acos, "sqrt": sqrt}


def floor_seconds(entries: float, r: dict[str, float]) -> float:
    return entries * (FLOOR_FLOPS / r["gemm"] + FLOOR_ARCCOS / r["arccos"]
                      + FLOOR_SQRT / r["sqrt"])


# ----------------------------------------------------------------------------- micro
def micro_window_sum(threads: int) -> list[str]:
    """window_sum (3x3, "same", pixel pairs) on tiles of 14x14 and 28x28 images: time, the
    same time in copies of the tile (a copy reads and writes it once), and per entry."""
    from ntkit.layers._conv_ops import window_sum

    rows = []
    for b, hw in ((2, 14), (8, 14), (1, 28), (4, 28)):
        t = torch.rand(b, b, hw, hw, hw, hw, dtype=torch.float64)
        copy = timing(lambda: t.clone(), 5)
        ours = timing(lambda: window_sum(t, (3, 3), 1, "same", True, scale=0.25, bias=0.01), 5)
        naive = timing(lambda: _naive_pair_window_sum(t), 3)
        torch.testing.assert_close(_naive_pair_window_sum(t),
                                   window_sum(t, (3, 3), 1, "same", True, scale=0.25, bias=0.01))
        mb = t.numel() * 8 / 1e6
        rows.append(f"| {b}x{b} pairs of {hw}x{hw} | {mb:.1f} | {fmt_ms(copy.best)} | "
                    f"{fmt_ms(ours.best)} | {ours.best / copy.best:.1f} | "
                    f"{ours.best / t.numel() * 1e9:.2f} | {fmt_ms(naive.best)} | "
                    f"{naive.best / ours.best:.1f}x |")
        print(rows[-1], flush=True)
    return rows


def _naive_pair_window_sum(t: torch.Tensor) -> torch.Tensor:
    """The 9-offset formula on a zero-padded copy (what a direct implementation does)."""
    h, w = t.shape[-4], t.shape[-3]
    padded = torch.zeros(*t.shape[:-4], h + 2, w + 2, h + 2, w + 2, dtype=t.dtype)
    padded[..., 1:-1, 1:-1, 1:-1, 1:-1] = t
    out = torch.zeros_like(t)
    for oh in range(3):
        for ow in range(3):
            out += padded[..., oh:oh + h, ow:ow + w, oh:oh + h, ow:ow + w]
    return out * 0.25 + 0.01


# ----------------------------------------------------------------------------- main
def run_ntkit(net, x1: torch.Tensor, x2: torch.Tensor, repeats: int, warm: int
              ) -> tuple[Timing, object, float]:
    """Time ``net.kernel(x1, x2)`` after a warm-up on ``warm`` x ``warm`` images, enough for
    full-size tiles, so that one-off work (imports, the fused dual's compilation for these
    tile shapes) is not timed, as neural-tangents' compilation is not. Returns the timing,
    the kernels and the warm-up's seconds."""
    start = time.perf_counter()
    net.kernel(x1[:warm], x2[:warm])
    # A second tile shape: torch.compile specialises on the first shapes it sees and
    # recompiles shape-generic code on the next; both belong to the warm-up.
    net.kernel(x1[:warm // 2 + 3], x2[:warm + 5])
    warm_s = time.perf_counter() - start
    result: dict = {"cpu": []}

    def call():
        cpu = time.process_time()
        result["k"] = net.kernel(x1, x2)
        result["cpu"].append(time.process_time() - cpu)

    t = timing(call, repeats, warmup=0)
    return t, result["k"], warm_s, statistics.median(result["cpu"])


def main(n_flat: int, n_gap: int, nt_gap: tuple[int, int], repeats: int, threads: int,
         shared: bool, nt_timeout: float, micro: bool) -> str:
    set_threads(threads)
    nt = NT(threads, timeout=nt_timeout)
    header = stamp(threads, nt, shared)
    r = rates(threads)
    print(f"gemm {r['gemm'] / 1e9:.1f} GFLOP/s, arccos {r['arccos'] / 1e6:.0f} M/s, sqrt "
          f"{r['sqrt'] / 1e6:.0f} M/s", flush=True)

    flat = digits(2 * n_flat, 28)
    gap = digits(2 * n_gap, 14)
    # (name, readout, x1, x2, pixels per entry, ntk side: batch size or None to skip)
    cells = [("flatten", "flatten", flat[:n_flat], flat, 28 * 28, "full"),
             ("gap, NT subset", "gap", gap[:nt_gap[0]], gap[:nt_gap[1]], 14 ** 4, "full"),
             ("gap", "gap", gap[:n_gap], gap, 14 ** 4, "extrapolated")]
    nt_res: dict = {}
    if nt.available:
        jobs, arrays = [], {}
        for name, readout, x1, x2, _, nt_mode in cells:
            if nt_mode != "full":
                continue
            key = name.replace(", ", "_").replace(" ", "_")
            arrays[f"{key}1"], arrays[f"{key}2"] = nhwc(x1), nhwc(x2)
            batch = math.gcd(len(x1), len(x2), 100 if readout == "flatten" else 10)
            jobs.append({"kind": "conv", "x1": f"{key}1", "x2": f"{key}2",
                         "layers": nt_layers(readout), "batch_size": batch,
                         "repeats": 1, "check_rows": CHECK_ROWS, "name": name})
        for job in jobs:  # one subprocess per job: a timeout loses only that cell
            try:
                mine = {job["x1"]: arrays[job["x1"]], job["x2"]: arrays[job["x2"]]}
                nt_res[job["name"]] = nt.run([job], mine, x64=True)[0]
                print("NT", job["name"], f"{nt_res[job['name']]['median']:.1f} s", flush=True)
            except Exception as exc:  # noqa: BLE001 - a timeout or failure is reported
                nt_res[job["name"]] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                print("NT", job["name"], "failed:", nt_res[job["name"]]["error"], flush=True)

    rows: list[str] = []
    goal_note: list[str] = []
    per_entry_nt_gap = None
    for name, readout, x1, x2, per_pair, nt_mode in cells:
        net = ntkit_net(readout)
        t1, t2 = torch.from_numpy(x1), torch.from_numpy(x2)
        ours, k, warm_s, ours_cpu = run_ntkit(net, t1, t2, repeats,
                                              64 if readout == "flatten" else 16)
        pairs = len(x1) * len(x2)
        entries = pairs * per_pair
        floor = floor_seconds(entries, r)
        res = nt_res.get(name)
        if res is not None and "error" not in res:
            theirs = nt_timing(res)
            per_entry_nt = theirs.median / pairs
            if readout == "gap":
                per_entry_nt_gap = per_entry_nt
            ours_rows = np.stack([k.nngp[:CHECK_ROWS].numpy(), k.ntk[:CHECK_ROWS].numpy()])
            diff = f"{max_rel_diff(ours_rows, res['out']):.1e}"
            nt_cell = f"{theirs.median:.2f} (measured)"
            speedup = f"{theirs.median / ours.median:.1f}x"
            cpu_cell = (f"{ours_cpu:.2f} / {res['cpu_median']:.2f} / "
                        f"{res['cpu_median'] / ours_cpu:.1f}x")
        elif res is not None:
            nt_cell, speedup, diff = f"failed: {res['error']}", "-", "-"
            cpu_cell = f"{ours_cpu:.2f} / - / -"
        elif nt_mode == "extrapolated" and per_entry_nt_gap is not None:
            estimate = per_entry_nt_gap * pairs
            nt_cell = f"~{estimate:.0f} (extrapolated from the subset: {per_entry_nt_gap * 1e3:.2f} ms per image pair)"
            speedup = f"~{estimate / ours.median:.0f}x"
            diff = "- (subset row)"
            cpu_cell = f"{ours_cpu:.2f} / - / -"
        else:
            nt_cell, speedup, diff = "-", "-", "-"
            cpu_cell = f"{ours_cpu:.2f} / - / -"
        nt_first = f"{res['first']:.1f}" if res is not None and "first" in res else "-"
        if readout == "gap" and nt_mode == "extrapolated" and len(x1) != 500:
            goal_note.append(
                f"ntkit's gap row ran {len(x1)} x {len(x2)} image pairs; at the same time per "
                f"pair, the issue's 500 x 1000 would take about "
                f"{ours.median / pairs * 500 * 1000:.0f} s (extrapolated, not measured).")
        rows.append(f"| {name} | {len(x1)} x {len(x2)} | {entries:.3g} | {ours.median:.2f} | "
                    f"{ours.median / pairs * 1e3:.3f} | {warm_s:.1f} | {nt_cell} | {nt_first} | "
                    f"{speedup} | {cpu_cell} | {diff} | "
                    f"{floor:.2f} | {ours.median / floor:.1f} |")
        print(rows[-1], flush=True)

    lines = [
        "# Analytic CNN kernels: three 3x3 conv + ReLU layers, NNGP + NTK, float64",
        "",
        header,
        "",
        f"Machine rates measured in this run ({threads} thread(s)): float64 gemm "
        f"{r['gemm'] / 1e9:.1f} GFLOP/s, arccos {r['arccos'] / 1e6:.0f} M/s, sqrt "
        f"{r['sqrt'] / 1e6:.0f} M/s (in-cache arrays). Times in seconds, median of "
        f"{repeats} call(s) after a warm-up; neural-tangents: one call after compiling on one "
        "batch.",
        "",
        "| workload | image pairs (N1 x N2) | kernel entries | ntkit s | ntkit ms per image pair "
        "| ntkit warm-up s | neural-tangents s | NT compile + first batch s | NT / ntkit "
        "| CPU s: ntkit / NT / NT÷ntkit | max rel. diff (first rows, both kernels) | floor s "
        "| ntkit / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "flatten: 28x28x1 digits, Flatten readout (only the pixel-diagonal covariances: H·W "
        "entries per image pair). gap: 14x14x1 digits (2x2 averages), GlobalAvgPool readout "
        "(every pixel pair: (H·W)² entries per image pair). Warm-up columns: ntkit's first "
        "calls on 64 x 64 and 35 x 69 (flatten) or 16 x 16 and 11 x 21 (gap) images, which "
        "compile its fused dual for full-size and other tile shapes; neural-tangents' jit compilation and first batch; neither is in the "
        "timed columns. The 'gap, NT subset' row is like "
        "for like; the full gap row's neural-tangents time is the subset's time per image pair "
        "times the pairs (an estimate, not a measurement: neural-tangents did not finish it in "
        "30 minutes when it was tried).",
        *goal_note,
        "CPU columns: process CPU seconds of the same timed call on each side (robust to "
        "other jobs taking turns on the cores, which inflate wall times; with one thread per "
        "side they compare the work done).",
        f"Floor: {FLOOR_FLOPS} flops, {FLOOR_ARCCOS} arccos and {FLOOR_SQRT} square roots per "
        "kernel entry (counted in the script's docstring), at the rates above; no memory "
        "traffic charged.",
    ]
    if micro:
        lines += [
            "",
            "## Micro-benchmark: `window_sum` (3x3, 'same', pixel pairs, with scale and bias)",
            "",
            "| tile | MB | copy ms | window_sum ms | in copies | ns per entry "
            "| naive 9-offset ms | naive / ours |",
            "|---|---|---|---|---|---|---|---|",
            *micro_window_sum(threads),
            "",
            "A copy reads and writes the tile once: the unavoidable traffic of any out-of-place "
            "map of it. The naive column pads a copy and adds the 9 offsets (what the formula "
            "says, whole-array).",
        ]
    if not nt.available:
        lines += ["", nt.note]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "N = 50 (flatten) and 20 (gap), NT gap subset 10 x 20; "
                    "writes no table")
    parser.add_argument("--nt-gap", type=int, nargs=2, default=(20, 40), metavar=("N1", "N2"),
                        help="the neural-tangents gap subset (image pairs N1 x N2)")
    parser.add_argument("--nt-timeout", type=float, default=1200.0,
                        help="seconds before a neural-tangents cell is abandoned")
    parser.add_argument("--no-micro", action="store_true", help="skip the window_sum table")
    parser.add_argument("--gap-n", type=int, default=500,
                        help="N of ntkit's full gap row (N x 2N image pairs; default 500)")
    parser.add_argument("--flat-n", type=int, default=1000,
                        help="N of the flatten row (N x 2N image pairs; default 1000)")
    args = parser.parse_args()
    repeats = args.repeats if args.repeats != 5 else 1  # these calls take minutes
    if args.quick:
        print(main(50, 20, (10, 20), 1, args.threads, args.shared, args.nt_timeout,
                   not args.no_micro))
    else:
        start = time.perf_counter()
        write_table("conv_kernels", main(args.flat_n, args.gap_n, tuple(args.nt_gap), repeats,
                                         args.threads,
                                         args.shared, args.nt_timeout, not args.no_micro))
        print(f"total {time.perf_counter() - start:.0f} s")
