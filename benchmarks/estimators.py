"""Infinite-width networks as classifiers vs tuned RBF kernel machines, on MNIST.

Data: the bundled MNIST test set (10,000 digits), pixels / 255, split 8000 train / 2000 test
by a fixed permutation (seed 0). Every method sees the same split in the same run.

* ``NTKClassifier()`` — depth-3 ReLU NTK (W_std=1, b_std=0.1), one-hot MSE, t = inf, no
  ridge: the plain analytic solve, no tuning.
* ``NTKClassifier(get="nngp")`` — the NNGP of the same network.
* ``NTKClassifier(t=…)`` — the NTK stopped early (one fixed time, no tuning).
* ``SVC(rbf)`` and ``KernelRidge(rbf)`` (one-hot targets, argmax) — tuned on a held-out
  quarter of the training digits over a log grid of ``C``/``alpha`` and ``gamma`` (``gamma``
  relative to scikit-learn's ``gamma="scale"``), then refit on all training digits. The grid
  starts 3 x 3 and is extended by one factor-of-3 (``gamma``: factor-of-2) step past any edge
  the best point lies on, until the optimum is interior in every parameter (or
  ``MAX_EXTENSIONS`` is reached, which the table then says). The tuning time is included in
  the total.

Several splits (``--seeds``, a fresh permutation each): the table gives the mean test
accuracy and its standard error across splits, and the NTK minus best-baseline difference
paired per split with its standard error; the chosen hyperparameters are listed per split.

Run: ``python benchmarks/estimators.py`` (3 splits, about 20-30 minutes on 2 cores);
``--quick`` for 1,000 / 500 digits and 2 splits. Writes ``benchmarks/results/estimators.md``
(``--quick`` writes nothing).

``--solvers``: the NTK rows only, each fitted with ``solver="direct"`` (the former default)
and ``solver="auto"`` (the default since the cost model of ``ntkit.scale.solve``), in
alternating order on the same splits: accuracy and time side by side. Writes
``benchmarks/results/estimators_solvers.md``.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from sklearn.kernel_ridge import KernelRidge
from sklearn.svm import SVC

from ntkit.datasets import load_mnist
from ntkit.estimators import NTKClassifier
from common import add_common_args, set_threads, stamp, write_table

MAX_EXTENSIONS = 4


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """Images (10000, 784) in [0, 1] and labels (10000,): the test set bundled in ntkit."""
    data = load_mnist()
    return data.images, data.labels


class OneHotKernelRidge:
    """KernelRidge on one-hot targets, argmax to predict (how it classifies)."""

    def __init__(self, **params):
        self.model = KernelRidge(kernel="rbf", **params)

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.model.fit(X, (y[:, None] == self.classes_[None, :]).astype(float))
        return self

    def score(self, X, y):
        return float(np.mean(self.classes_[self.model.predict(X).argmax(1)] == y))


def tune(make, grid: dict[str, list[float]], steps: dict[str, float], X, y):
    """Pick the grid point with the best held-out accuracy (the last quarter of X), extending
    the grid past any edge the optimum sits on; then refit on all of X.

    Returns (model, chosen params with ``interior`` = whether the optimum ended inside the
    grid in every parameter, and the final grid ranges)."""
    n_val = len(y) // 4
    Xa, ya, Xv, yv = X[:-n_val], y[:-n_val], X[-n_val:], y[-n_val:]
    scores: dict[tuple, float] = {}
    grid = {k: sorted(v) for k, v in grid.items()}
    for attempt in range(MAX_EXTENSIONS + 1):
        for values in itertools.product(*grid.values()):
            if values not in scores:
                scores[values] = make(**dict(zip(grid, values))).fit(Xa, ya).score(Xv, yv)
        top = max(scores.values())

        def depth(values):  # steps from the nearest grid edge, in the worst parameter
            return min(min(grid[k].index(v), len(grid[k]) - 1 - grid[k].index(v))
                       for k, v in zip(grid, values))

        # Among tied best points (a plateau, e.g. SVC at large C) prefer the most interior.
        best = max((v for v in scores if scores[v] == top), key=lambda v: (depth(v), v))
        edges = [(k, i) for i, k in enumerate(grid)
                 if best[i] in (grid[k][0], grid[k][-1])]
        if not edges or attempt == MAX_EXTENSIONS:
            break
        for k, i in edges:
            new = (grid[k][0] / steps[k] if best[i] == grid[k][0]
                   else grid[k][-1] * steps[k])
            grid[k] = sorted(grid[k] + [new])
    params = dict(zip(grid, best))
    info = {"interior": not edges,
            "ranges": {k: (v[0], v[-1]) for k, v in grid.items()},
            "points": len(scores)}
    return make(**params).fit(X, y), params, info


def one_split(X, y, n_train: int, n_test: int, seed: int) -> list[tuple]:
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    Xtr, ytr, Xte, yte = X[tr], y[tr], X[te], y[te]
    gamma_scale = 1.0 / (Xtr.shape[1] * Xtr.var())
    rows = []

    def run(name, fit_fn):
        start = time.perf_counter()
        model, chosen, info = fit_fn()
        acc = model.score(Xte, yte)
        seconds = time.perf_counter() - start
        rows.append((name, acc, seconds, chosen, info))
        print(f"seed {seed} {name}: accuracy {acc:.4f}, {seconds:.1f} s, {chosen} {info}",
              flush=True)

    run("NTKClassifier (NTK, depth 3 ReLU, t=inf)",
        lambda: (NTKClassifier().fit(Xtr, ytr), None, None))
    run("NTKClassifier(get='nngp')",
        lambda: (NTKClassifier(get="nngp").fit(Xtr, ytr), None, None))
    run("NTKClassifier(t=1000) (early stopping)",
        lambda: (NTKClassifier(t=1000.0).fit(Xtr, ytr), None, None))
    run("SVC(rbf), tuned",
        lambda: tune(lambda **p: SVC(kernel="rbf", **p),
                     {"C": [3.0, 10.0, 30.0], "gamma": [gamma_scale * f for f in (0.5, 1, 2)]},
                     {"C": 3.0, "gamma": 2.0}, Xtr, ytr))
    run("KernelRidge(rbf) one-hot, tuned",
        lambda: tune(OneHotKernelRidge,
                     {"alpha": [1e-3, 1e-2, 1e-1],
                      "gamma": [gamma_scale * f for f in (0.5, 1, 2)]},
                     {"alpha": 10.0 ** 0.5, "gamma": 2.0}, Xtr, ytr))
    return rows


def fmt_params(params: dict | None, info: dict | None) -> str:
    if params is None:
        return "untuned"
    chosen = ", ".join(f"{k}={v:.3g}" for k, v in params.items())
    ranges = "; ".join(f"{k} in [{a:.3g}, {b:.3g}]" for k, (a, b) in info["ranges"].items())
    where = "interior" if info["interior"] else "ON THE EDGE after extensions"
    return f"{chosen} ({where}; grid {ranges}, {info['points']} points)"


def main(n_train: int, n_test: int, seeds: list[int], threads: int, shared: bool) -> str:
    set_threads(threads)
    header = stamp(threads, None, shared)  # the state the run starts from
    X, y = load_data()
    per_seed = {seed: one_split(X, y, n_train, n_test, seed) for seed in seeds}
    names = [r[0] for r in per_seed[seeds[0]]]

    def mean_se(values):
        values = np.asarray(values, dtype=float)
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        return values.mean(), se

    lines = [
        f"# MNIST {n_train} train / {n_test} test (bundled test set), {len(seeds)} random "
        "splits: infinite networks vs tuned RBF machines",
        "",
        header,
        "",
        "float64. Total time includes kernel computation, fitting, tuning (held-out quarter "
        "of the training digits, grid extended until the optimum is interior) and prediction. "
        f"Accuracy: mean over splits (seeds {', '.join(map(str, seeds))}) ± its standard "
        f"error across splits; one split's binomial SE alone is about "
        f"{100 * np.sqrt(0.975 * 0.025 / n_test):.2f} points.",
        "",
        "| method | test accuracy (mean ± SE) | per split | total time (s, mean) |",
        "|---|---|---|---|",
    ]
    for i, name in enumerate(names):
        accs = [per_seed[s][i][1] for s in seeds]
        m, se = mean_se(accs)
        secs = np.mean([per_seed[s][i][2] for s in seeds])
        lines.append(f"| {name} | {100 * m:.2f}% ± {100 * se:.2f} | "
                     f"{', '.join(f'{100 * a:.2f}' for a in accs)} | {secs:.1f} |")
    baselines = [i for i, n in enumerate(names) if "tuned" in n and "NTK" not in n]
    diffs = [per_seed[s][0][1] - max(per_seed[s][i][1] for i in baselines) for s in seeds]
    m, se = mean_se(diffs)
    lines += ["", f"NTK minus best tuned baseline, paired per split: {100 * m:+.2f} ± "
              f"{100 * se:.2f} points (per split: "
              f"{', '.join(f'{100 * d:+.2f}' for d in diffs)}; target: NTK >= 97% and within "
              "1 point).", "", "Chosen hyperparameters per split:", ""]
    for s in seeds:
        for name, _, _, params, info in per_seed[s]:
            if params is not None:
                lines.append(f"- seed {s}, {name}: {fmt_params(params, info)}")
    return "\n".join(lines) + "\n"


def solver_comparison(n_train: int, n_test: int, seeds: list[int], threads: int,
                      shared: bool) -> str:
    """NTK rows with solver='direct' vs solver='auto' on the same splits."""
    set_threads(threads)
    header = stamp(threads, None, shared)
    X, y = load_data()
    configs = [("NTKClassifier() (no ridge)", {}),
               ("NTKClassifier(diag_reg=1e-4)", {"diag_reg": 1e-4}),
               ("NTKClassifier(get='nngp')", {"get": "nngp"})]
    results: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(len(y))
        tr, te = perm[:n_train], perm[n_train:n_train + n_test]
        order = ("direct", "auto") if seed % 2 == 0 else ("auto", "direct")
        for name, kw in configs:
            for solver in order:
                start = time.perf_counter()
                model = NTKClassifier(solver=solver, **kw).fit(X[tr], y[tr])
                acc = model.score(X[te], y[te])
                seconds = time.perf_counter() - start
                results.setdefault((name, solver), []).append(
                    (acc, seconds, model.solver_path_))
                print(f"seed {seed} {name} solver={solver}: {acc:.4f} {seconds:.1f} s "
                      f"path {model.solver_path_}", flush=True)
    lines = [f"# MNIST {n_train} / {n_test}: NTKClassifier with solver='direct' (former default)"
             f" vs solver='auto' (cost model), {len(seeds)} splits", "", header, "",
             "float64; fit (kernel + solve) and predict, seconds per split (mean, min-max); "
             "the two solvers alternate order across splits.", "",
             "| model | solver | path taken | test accuracy per split | time (s): mean "
             "(min-max) |", "|---|---|---|---|---|"]
    for name, _ in configs:
        for solver in ("direct", "auto"):
            rows = results[(name, solver)]
            secs = [r[1] for r in rows]
            lines.append(f"| {name} | {solver} | {', '.join(sorted({r[2] for r in rows}))} | "
                         f"{', '.join(f'{100 * r[0]:.2f}' for r in rows)} | "
                         f"{np.mean(secs):.1f} ({min(secs):.1f}-{max(secs):.1f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "1,000 train / 500 test digits, 2 splits; writes no table")
    parser.add_argument("--seeds", type=int, default=3, help="number of random splits")
    parser.add_argument("--solvers", action="store_true",
                        help="NTK rows only: solver='direct' vs solver='auto'")
    args = parser.parse_args()
    if args.solvers:
        sizes = (1000, 500) if args.quick else (8000, 2000)
        table = solver_comparison(*sizes, list(range(args.seeds)), args.threads, args.shared)
        print(table) if args.quick else write_table("estimators_solvers", table)
    elif args.quick:
        print(main(1000, 500, [0, 1], args.threads, args.shared))
    else:
        write_table("estimators", main(8000, 2000, list(range(args.seeds)), args.threads,
                                       args.shared))
