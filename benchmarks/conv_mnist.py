"""Kernel regression on MNIST digits: convolutional NTKs against the ReLU MLP NTK.

Data: the bundled MNIST test set (10,000 digits), pixels / 255, one fixed permutation
(numpy seed 0). Training digits are the first ``N_train`` of the permutation and the test
digits its last ``N_test`` (1000 for 28×28, 500 for 14×14), so every row of one image size
is scored on the same test digits and larger training sets contain the smaller ones. The
14×14 digits are 2×2 averages of the 28×28 ones (``F.avg_pool2d(x, 2)``).

Kernels (analytic infinite-width NTK, float64, ``net.kernel(..., get="ntk")``; ReLU,
W_std = 1, b_std = 0, so the prediction does not depend on W_std — the ReLU NTK is
homogeneous in it):

* ``mlp``: ``nk.mlp(4, ·)`` — Dense → ReLU three times, then Dense (a depth-4 MLP).
* ``cnn_flatten``: ``nk.cnn(3, ·)`` — three 3×3 "same" Conv + ReLU, ``Flatten``, Dense.
* ``cnn_gap``: ``nk.cnn(3, ·, pool="gap")`` — the same with global average pooling.

Prediction: the t = ∞ mean of gradient-descent training on the one-hot targets from a
zero-output start, ``K_test,train K_train,train⁻¹ Y`` (``nk.predict.gp_inference`` with
the NTK, ``diag_reg=0``: no ridge, no tuning), then argmax. Time = the kernel evaluations
(train × train, mirrored, and test × train) plus the solve, one call each, wall clock.

Neural-tangents anchors (from the issue; same recipe, its own split): CNN-flatten 94.0% vs
MLP 93.3% at 1000 train / 1000 test (28×28); CNN-flatten 92.0% vs MLP 90.0% at 500 / 500
(14×14).

Rows are run one per invocation or several (``--rows``); each row's result is kept in a
JSON cache (``--cache``, default /tmp/conv_mnist_rows.json) with its own stamp, and the
table is written from every cached row, so heavy rows can run separately. Run:
``python benchmarks/conv_mnist.py --rows mlp28_1000,cnn28_1000`` etc.; ``--list`` names
the rows. Writes ``benchmarks/results/conv_mnist.md`` (``--quick``: 200/200 digits, no
table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import ntkit as nk
from ntkit.datasets import load_mnist
from common import add_common_args, set_threads, stamp, write_table

# name -> (architecture, image side, N_train, N_test)
ROWS = {
    "mlp28_1000": ("mlp", 28, 1000, 1000),
    "cnn28_1000": ("cnn_flatten", 28, 1000, 1000),
    "mlp28_8000": ("mlp", 28, 8000, 1000),
    "cnn28_8000": ("cnn_flatten", 28, 8000, 1000),
    "mlp14_500": ("mlp", 14, 500, 500),
    "cnn14_500": ("cnn_flatten", 14, 500, 500),
    "gap14_500": ("cnn_gap", 14, 500, 500),
    "mlp14_1000": ("mlp", 14, 1000, 500),
    "cnn14_1000": ("cnn_flatten", 14, 1000, 500),
    "gap14_1000": ("cnn_gap", 14, 1000, 500),
}
NT_ANCHORS = {("cnn_flatten", 28, 1000): "94.0%", ("mlp", 28, 1000): "93.3%",
              ("cnn_flatten", 14, 500): "92.0%", ("mlp", 14, 500): "90.0%"}
ARCH_TEXT = {"mlp": "ReLU MLP, 4 Dense layers", "cnn_flatten": "3× conv3×3+ReLU, Flatten, Dense",
             "cnn_gap": "3× conv3×3+ReLU, GlobalAvgPool, Dense"}


def network(arch: str):
    if arch == "mlp":
        return nk.mlp(4, 1, "relu", W_std=1.0, b_std=0.0)
    return nk.cnn(3, 1, "relu", pool="flatten" if arch == "cnn_flatten" else "gap",
                  W_std=1.0, b_std=0.0)


def split(side: int, n_train: int, n_test: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train one-hot, x_test, labels_test); images (N, 1, side, side)."""
    data = load_mnist()
    perm = np.random.default_rng(0).permutation(len(data.labels))
    tr, te = perm[:n_train], perm[-n_test:]
    assert not set(tr) & set(te), "train and test digits overlap"
    x = torch.as_tensor(data.images, dtype=torch.float64).reshape(-1, 1, 28, 28)
    if side == 14:
        x = F.avg_pool2d(x, 2)
    labels = torch.as_tensor(data.labels)
    y = F.one_hot(labels[tr], 10).to(torch.float64)
    return x[tr], y, x[te], labels[te]


class _Stopped(Exception):
    """SIGTERM (``timeout``) while a stored kernel was being computed."""


def _stored_kernel(net, x1, x2, path: Path) -> tuple[torch.Tensor | None, float]:
    """A kernel computed into a resumable zarr store (``nk.scale.kernel_matrix``, tiles of
    ``STORE_TILE``): ``(kernel or None if stopped, seconds this call spent)``. The seconds
    of every call are added up in ``<path>.seconds``, so a row computed over several runs
    (each under the benchmark lock's time limit) reports its whole kernel time."""
    import signal

    seconds_file = Path(str(path) + ".seconds")
    spent = float(seconds_file.read_text()) if seconds_file.exists() else 0.0

    def stop(*_):
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    start = time.perf_counter()
    try:
        arr = nk.scale.kernel_matrix(net, x1, x2, get="ntk", tile=STORE_TILE, out=path,
                                     progress=False)
        return torch.as_tensor(arr[...]), spent + time.perf_counter() - start
    except _Stopped:
        return None, spent + time.perf_counter() - start
    finally:
        signal.signal(signal.SIGTERM, previous)
        seconds_file.write_text(str(spent + time.perf_counter() - start))


STORE_TILE = 1000


def run_row(name: str, arch: str, side: int, n_train: int, n_test: int,
            store: Path | None = None) -> dict | None:
    """One row; with ``store``, the kernels go to resumable zarr stores there (a row too
    long for one run: rerun until it returns a result; ``None`` while unfinished)."""
    net = network(arch)
    x_tr, y_tr, x_te, lab_te = split(side, n_train, n_test)
    if arch == "mlp":
        x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    if store is not None:
        k_tt, t_train = _stored_kernel(net, x_tr, None, store / f"{name}_train")
        if k_tt is None:
            return None
        k_xt, t_test = _stored_kernel(net, x_te, x_tr, store / f"{name}_test")
        if k_xt is None:
            return None
    else:
        start = time.perf_counter()
        k_tt = net.kernel(x_tr, get="ntk").ntk
        t_train = time.perf_counter() - start
        start = time.perf_counter()
        k_xt = net.kernel(x_te, x_tr, get="ntk").ntk
        t_test = time.perf_counter() - start
    start = time.perf_counter()
    mean = nk.predict.gp_inference(k_tt, y_tr, k_xt, diag_reg=0.0).mean
    t_solve = time.perf_counter() - start
    acc = float((mean.argmax(1) == lab_te).double().mean())
    entries = n_train * (n_train + 1) // 2 + n_test * n_train
    return {"name": name, "arch": arch, "side": side, "n_train": n_train, "n_test": n_test,
            "accuracy": acc, "t_train": t_train, "t_test": t_test, "t_solve": t_solve,
            "entries": entries, "threads": torch.get_num_threads(),
            "stored": store is not None}


def fmt_s(s: float) -> str:
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def table(rows: dict[str, dict], header: str) -> str:
    lines = [
        "# Kernel regression on MNIST: convolutional NTKs vs the ReLU MLP NTK", "",
        header, "",
        "Bundled MNIST test set, pixels/255, one fixed permutation (numpy seed 0): train = "
        "its first N_train digits, test = its last N_test (the same test digits for every "
        "row of an image size). Rows marked * were computed into resumable zarr stores "
        "(nk.scale.kernel_matrix, tiles of 250 to 1000 rows) over one or more runs; their time is the sum "
        "of the runs (including each resume's read-back check). 14×14 = 2×2-averaged digits. Analytic NTK (float64, ReLU, "
        "W_std=1, b_std=0), prediction K_test,train K_train,train⁻¹ Y on one-hot targets "
        "(t = ∞, no ridge, nk.predict.gp_inference), argmax. Kernel entries = N_train·"
        "(N_train+1)/2 + N_test·N_train. Each row has its own stamp (rows ran separately).",
        "",
        "Noise: one accuracy measured on N_test digits has a binomial standard error of "
        "sqrt(a(1 − a)/N_test) — about 0.75 points at 94% on 1000 digits, 1.3 points at 91% "
        "on 500 — so differences below about two points between rows of one image size are "
        "within the split-to-split spread (neural-tangents' anchors come from its own split).",
        "",
        "| image | network | N_train / N_test | test accuracy | neural-tangents (issue) | "
        "kernel time (train + test) | per entry | solve | threads | row stamp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {k: i for i, k in enumerate(ROWS)}
    for name in sorted(rows, key=lambda k: order.get(k, 99)):
        r = rows[name]
        kt = r["t_train"] + r["t_test"]
        anchor = NT_ANCHORS.get((r["arch"], r["side"], r["n_train"]), "—")
        lines.append(
            f"| {r['side']}×{r['side']} | {ARCH_TEXT[r['arch']]} | {r['n_train']} / "
            f"{r['n_test']}{'*' if r.get('stored') else ''} | "
            f"{100 * r['accuracy']:.1f}% | {anchor} | {fmt_s(kt)} "
            f"({fmt_s(r['t_train'])} + {fmt_s(r['t_test'])}) | "
            f"{1e3 * kt / r['entries']:.3g} ms | {fmt_s(r['t_solve'])} | {r['threads']} | "
            f"{r['stamp']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "200 train / 200 test digits for each architecture; no table")
    parser.add_argument("--rows", default="mlp28_1000,cnn28_1000,mlp14_500,cnn14_500",
                        help="comma-separated row names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument("--cache", default="/tmp/conv_mnist_rows.json",
                        help="JSON file keeping every row's result between runs")
    parser.add_argument("--store", default=None,
                        help="directory for resumable zarr kernel stores (rows that take "
                        "longer than one run: rerun until the row finishes)")
    parser.add_argument("--store-tile", type=int, default=STORE_TILE,
                        help="side of the stored (resumable) kernel tiles")
    parser.add_argument("--table-only", action="store_true",
                        help="write the table from the cache without running rows")
    args = parser.parse_args()
    if args.list:
        for k, v in ROWS.items():
            print(k, v)
        raise SystemExit
    set_threads(args.threads)
    STORE_TILE = args.store_tile
    if args.quick:
        for arch in ("mlp", "cnn_flatten", "cnn_gap"):
            side = 14 if arch == "cnn_gap" else 28
            print(run_row(f"quick_{arch}", arch, side, 200, 200))
        raise SystemExit
    cache = Path(args.cache)
    rows = json.loads(cache.read_text()) if cache.exists() else {}
    if not args.table_only:
        for name in args.rows.split(","):
            if name not in ROWS:
                raise SystemExit(f"unknown row {name!r}; --list names them")
            head = stamp(args.threads, None, args.shared)
            result = run_row(name, *ROWS[name],
                             store=Path(args.store) if args.store else None)
            if result is None:
                print(name, "stopped; rerun with the same --store to resume", flush=True)
                continue
            # The row's own stamp: commit and date of the run.
            result["stamp"] = head.split(",")[0].replace("Stamp: ", "") + "," + \
                head.split(",")[1]
            rows[name] = result
            cache.write_text(json.dumps(rows, indent=1))
            print(name, f"{100 * result['accuracy']:.1f}%",
                  f"{result['t_train'] + result['t_test']:.1f} s", flush=True)
    header = stamp(args.threads, None, args.shared)
    write_table("conv_mnist", table(rows, header))
