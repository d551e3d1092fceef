"""Kernel regression at scale through every path of ``ntkit.scale.solve``, side by side.

Problem (synthetic, fixed seed): ``N`` training and ``n_test`` test points in ``d = 784``
dimensions lying near a 16-dimensional latent subspace (``x = z W + 0.3 ε``), 10 targets
``tanh(z T) + 0.1 ε``; the NTK of a depth-4 ReLU network (``nk.mlp(4)``: three hidden
layers, W_std 1, b_std 0.1); ridge ``diag_reg`` relative to the mean diagonal.

Each path runs in its own subprocess (its peak RSS is its own): kernel, solve and
predictions at the test points, end to end. The paths too slow to finish here are timed
on a part of the work and extrapolated, and labelled so. Accuracy is checked on a
subsample of ``--check-n`` points where a float64 direct solve fits: the cost model's
choice at full size is run (forced) on the subsample and its predictions compared with a
float64 Cholesky of the float64 kernel.

    python benchmarks/solve_paths.py --n 50000            # the table, ~15 min, ~12 GiB
    python benchmarks/solve_paths.py --n 100000 --only disk_cg --store /tmp/k100k
    python benchmarks/solve_paths.py --n 3000 --n-test 500 --check-n 2000 --quick  # check

Big runs must hold the shared lock: ``flock /tmp/team/bench.lock python ...``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import set_threads, stamp, write_table

LATENT, NOISE, OUTPUTS, DEPTH = 16, 0.3, 10, 4


def make_data(n: int, n_test: int, d: int = 784, seed: int = 0):
    """``(X, Y, X_test)``: the synthetic problem above; the first ``n`` rows train."""
    g = np.random.default_rng(seed)
    W = g.standard_normal((LATENT, d)) / np.sqrt(LATENT)
    T = g.standard_normal((LATENT, OUTPUTS))
    Z = g.standard_normal((n + n_test, LATENT))
    X = Z @ W + NOISE * g.standard_normal((n + n_test, d))
    Y = np.tanh(Z[:n] @ T / np.sqrt(LATENT)) + 0.1 * g.standard_normal((n, OUTPUTS))
    return X[:n], Y, X[n:]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads: on cores shared with other
    jobs, wall time grows with their load but this does not (a wall time on an idle machine
    is about cpu / threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ----------------------------------------------------------------------------- one path
def run_path(args) -> dict:
    """One path end to end in this process; returns its figures (JSON-able)."""
    import torch

    import ntkit as nk

    set_threads(args.threads)
    X, Y, Xt = make_data(args.n, args.n_test, args.d)
    net = nk.mlp(DEPTH, 512)
    out: dict = {"path": args.path}
    t0 = time.perf_counter()
    if args.path == "sklearn":
        from sklearn.kernel_ridge import KernelRidge

        K = net.kernel(X, get="ntk").ntk.numpy()
        lam = args.diag_reg * float(np.mean(np.diag(K)))
        model = KernelRidge(alpha=lam, kernel="precomputed").fit(K, Y)
        del K
        pred = np.vstack([model.predict(net.kernel(Xt[r], X, get="ntk").ntk.numpy())
                          for r in np.array_split(np.arange(len(Xt)),
                                                  max(1, len(Xt) // 2048))])
        out.update(total=time.perf_counter() - t0, peak_rss=peak_rss_gib(), cpu=cpu_seconds())
        np.save(args.pred_out, pred)
        return out
    if args.path == "matrix_free_timing":
        # One matrix-free iteration is one tiled K @ v over the upper half of K (recomputed).
        op = nk.scale.KernelOperator(net, X, get="ntk", tile=args.tile)
        v = torch.randn(args.n, OUTPUTS, dtype=torch.float64)
        t1 = time.perf_counter()
        c1 = cpu_seconds()
        op.matmul(v)
        out.update(matvec=time.perf_counter() - t1, matvec_cpu=cpu_seconds() - c1,
                   peak_rss=peak_rss_gib(), n=args.n)
        return out
    method = "auto" if args.path == "auto" else args.path
    res = nk.scale.solve(net, X, Y, method=method, diag_reg=args.diag_reg, tol=args.tol,
                         n_landmarks=args.landmarks, tile=args.tile, store=args.store,
                         max_iter=args.max_iter)
    t_solve = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = nk.scale.predict(net, X, Xt, res.coef, get="ntk").numpy()
    t_pred = time.perf_counter() - t1
    np.save(args.pred_out, pred)
    out.update(method=res.method, precision=res.plan.precision, reason=res.plan.reason,
               iterations=res.iterations, residual=res.residual, converged=res.converged,
               timings=res.timings, details=dict(res.details),
               fit=t_solve, predict=t_pred, total=time.perf_counter() - t0,
               peak_rss=peak_rss_gib(), history=res.history, cpu=cpu_seconds())
    if args.store and res.method == "disk_cg":
        out["disk_bytes"] = sum(f.stat().st_size for f in Path(args.store).rglob("*")
                                if f.is_file())
    return out


def reference_predictions(n: int, n_test: int, d: int, diag_reg: float) -> np.ndarray:
    """float64 kernels, float64 Cholesky (torch), predictions: the accuracy reference."""
    import torch

    import ntkit as nk

    X, Y, Xt = make_data(n, n_test, d)
    net = nk.mlp(DEPTH, 512)
    K = net.kernel(X, get="ntk").ntk
    K.diagonal().add_(diag_reg * float(K.diagonal().mean()))
    L = torch.linalg.cholesky(K)
    del K
    alpha = torch.cholesky_solve(torch.as_tensor(Y), L)
    del L
    return nk.scale.predict(net, X, Xt, alpha, get="ntk").numpy()


def subprocess_path(args, path: str, n: int, store: str | None = None) -> dict:
    """Run ``path`` at size ``n`` in a subprocess; with ``--results-dir`` its figures are
    kept there (``<path>_<n>.json``, predictions ``.npy``) and reused by later runs, so a
    long table can be produced over several sessions."""
    saved = Path(args.results_dir) / f"{path}_{n}.json" if args.results_dir else None
    if saved is not None and saved.exists():
        result = json.loads(saved.read_text())
        if saved.with_suffix(".npy").exists():
            result["pred"] = np.load(saved.with_suffix(".npy"))
        print("reusing", saved, flush=True)
        return result
    with tempfile.TemporaryDirectory() as tmp:
        pred = Path(tmp) / "pred.npy"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--path", path,
               "--n", str(n),
               "--n-test", str(args.n_test), "--d", str(args.d), "--diag-reg",
               str(args.diag_reg), "--tol", str(args.tol), "--landmarks", str(args.landmarks),
               "--tile", str(args.tile), "--threads", str(args.threads), "--max-iter",
               str(args.max_iter), "--pred-out", str(pred)]
        if store:
            cmd += ["--store", store]
        print("running", path, "N =", n, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            return {"path": path, "error": proc.stderr.strip().splitlines()[-1][:200]}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(result, default=float))
        if pred.exists():
            result["pred"] = np.load(pred)
            if saved is not None:
                np.save(saved.with_suffix(".npy"), result["pred"])
        print({k: v for k, v in result.items() if k not in ("pred", "history", "reason")},
              flush=True)
        return result


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--d", type=int, default=784)
    p.add_argument("--diag-reg", type=float, default=1e-4)
    p.add_argument("--tol", type=float, default=1e-8)
    p.add_argument("--landmarks", type=int, default=2000)
    p.add_argument("--tile", type=int, default=2048)
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check-n", type=int, default=20_000)
    p.add_argument("--store", default=None, help="directory for the out-of-core kernel")
    p.add_argument("--only", default=None, help="comma-separated paths to run")
    p.add_argument("--name", default="solve_paths")
    p.add_argument("--quick", action="store_true", help="small validation run, no table")
    p.add_argument("--results-dir", default=None,
                   help="keep each path's figures here and reuse them (several sessions)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pred-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_path(args), default=float))
        return

    import ntkit as nk

    set_threads(args.threads)
    stamp_line = stamp(args.threads, shared=True)
    plan = nk.scale.plan_solve(args.n, OUTPUTS, n_features=args.d, depth=DEPTH,
                               store=args.store or tempfile.gettempdir(),
                               n_landmarks=args.landmarks, tile=args.tile)
    print("cost model at full size:", plan, flush=True)
    only = set(args.only.split(",")) if args.only else None

    def wanted(name: str) -> bool:
        return only is None or name in only

    rows: dict[str, dict] = {}
    store = args.store or tempfile.mkdtemp(prefix="ntkit-solve-paths-")
    if wanted("auto"):
        rows["auto"] = subprocess_path(args, "auto", args.n)
    if wanted("disk_cg"):
        rows["disk_cg"] = subprocess_path(args, "disk_cg", args.n, store)
    if not args.store:
        shutil.rmtree(store, ignore_errors=True)
    if wanted("matrix_free"):
        rows["matrix_free"] = subprocess_path(args, "matrix_free_timing", args.n)
    if args.results_dir:  # paths finished in earlier sessions join the table
        for key, path in (("auto", "auto"), ("disk_cg", "disk_cg"),
                          ("matrix_free", "matrix_free_timing")):
            f = Path(args.results_dir) / f"{path}_{args.n}.json"
            if key not in rows and f.exists():
                rows[key] = json.loads(f.read_text())
        if "matrix_free" not in rows:  # timed at a smaller N: one K @ v scales as N^2
            found = sorted(Path(args.results_dir).glob("matrix_free_timing_*.json"))
            if found:
                rows["matrix_free"] = json.loads(found[-1].read_text())
        rows = {k: rows[k] for k in ("auto", "disk_cg", "matrix_free") if k in rows}
    # Accuracy on the subsample where float64 fits: the full-size choice, forced.
    check = {}
    check_file = (Path(args.results_dir) / f"check_{min(args.check_n, args.n)}.json"
                  if args.results_dir else None)
    if check_file is not None and check_file.exists():
        check = json.loads(check_file.read_text())
    elif wanted("check"):
        m = min(args.check_n, args.n)
        sub = subprocess_path(args, plan.path if plan.path != "disk_cg" else "dense_cg", m,
                              tempfile.mkdtemp(prefix="ntkit-check-"))
        t0 = time.perf_counter()
        ref = reference_predictions(m, args.n_test, args.d, args.diag_reg)
        check = {"n": m, "path": sub.get("method"), "rel": rel(sub["pred"], ref),
                 "ref_seconds": time.perf_counter() - t0}
        if wanted("sklearn_check"):
            sk = subprocess_path(args, "sklearn", m)
            check["sklearn_rel"] = rel(sk["pred"], ref)
            check["sklearn_total"] = sk["total"]
            check["sklearn_rss"] = sk["peak_rss"]
            check["sklearn_cpu"] = sk["cpu"]
            check["path_total"], check["path_cpu"] = sub["total"], sub["cpu"]
        print("check", check, flush=True)
        if check_file is not None:
            check_file.write_text(json.dumps(check))
    if args.quick:
        return
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "pred"}
                      for k, v in rows.items()}, default=float, indent=1)[:6000])
    write_table(args.name, _table(args, plan, rows, check, stamp_line))


def _table(args, plan, rows: dict, check: dict, stamp_line: str) -> str:
    n = args.n
    lines = [f"# Kernel regression at N = {n:,} through every path of `ntkit.scale.solve`", "",
             stamp_line, "",
             f"Synthetic problem (fixed seed): N = {n:,} train and {args.n_test:,} test points, "
             f"d = {args.d}, near a {LATENT}-dimensional subspace (noise {NOISE}), "
             f"{OUTPUTS} outputs; NTK of `nk.mlp({DEPTH})` (depth-4 ReLU); ridge diag_reg = "
             f"{args.diag_reg:g} (relative); CG tolerance {args.tol:g} on the true relative "
             f"residual; Nyström m = {args.landmarks}; block {args.tile}; torch "
             f"{args.threads} threads. Every path computes kernel entries in float64. "
             "End to end = train kernel + solve + predictions at the test points; each "
             "row is its own process (peak RSS = that process's maximum resident memory).", "",
             f"Cost model's choice at this size: **{plan.path}** ({plan.precision}) — "
             f"{plan.reason}.", "",
             "Wall times grow with the other jobs sharing the 2 cores (several helpers' tests "
             "ran beside these rows); the CPU column (user + system seconds of the process, all "
             "threads) grows much less (only through shared caches and memory bandwidth): on "
             f"an idle machine the end-to-end wall time is at most about CPU / {args.threads}."
             + (" Rows were measured in separate sessions (`--results-dir`), each in its own "
                "process; the stamp is that of assembling the table." if args.results_dir
                else ""), "",
             "| path | end to end (s) | CPU (s) | kernel (s) | preconditioner (s) | solve (s) | "
             "predict (s) | CG iterations | true rel. residual | peak RSS (GiB) | disk |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x, spec=".1f"):
        return "—" if x is None else format(x, spec)

    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | | | |")
            continue
        if name == "matrix_free":
            its = rows.get("auto", {}).get("iterations") or 40
            n_timed = r.get("n", n)
            scale = (n / n_timed) ** 2
            mv, mv_cpu = r["matvec"] * scale, r["matvec_cpu"] * scale
            timed = (f"one K @ v timed at N = {n_timed:,}: {r['matvec']:.0f} s wall / "
                     f"{r['matvec_cpu']:.0f} s CPU" + (f", × (N/{n_timed:,})² = {scale:.2f}"
                                                       if n_timed != n else ""))
            lines.append(f"| matrix_free_cg (today's path; **extrapolated**: {timed}; × ({its} "
                         f"iterations + 1 residual)) | ≈ {(its + 1) * mv:.0f} | ≈ "
                         f"{(its + 1) * mv_cpu:.0f} | — | — | ≈ {its * mv:.0f} | — | {its} | — "
                         f"| {r['peak_rss']:.2f} (at N = {n_timed:,}) | — |")
            continue
        t = r.get("timings", {})
        mark = " **(cost model's choice)**" if r.get("method") == plan.path else ""
        disk = (f"{r['disk_bytes'] / 2**30:.1f} GiB" if r.get("disk_bytes") else "—")
        lines.append(
            f"| {r.get('method', name)} ({r.get('precision', '')}){mark} | {r['total']:.1f} | "
            f"{r['cpu']:.0f} | {fmt(t.get('kernel'))} | {fmt(t.get('preconditioner'))} | "
            f"{fmt(t.get('solve', 0) + t.get('factorise', 0))} | {r['predict']:.1f} | "
            f"{r['iterations']} | {r['residual']:.1e} | {r['peak_rss']:.2f} | {disk} |")
        if r.get("details", {}).get("bytes_read"):
            det = r["details"]
            lines.append(f"|  ↳ reader: {det['bytes_read'] / 2**30:.1f} GiB read in "
                         f"{det['read_seconds']:.0f} s (prefetch thread); arithmetic waited "
                         f"{det['wait_seconds']:.0f} s | | | | | | | | | | |")
    measured = {r.get("method") for r in rows.values()} | (
        {"matrix_free_cg"} if "matrix_free" in rows else set())
    labels = {"direct32": "direct (float32+refinement)", "direct64": "direct (float64)",
              "dense_cg": "dense_cg (float32 storage)", "disk_cg": "disk_cg (float32 storage)",
              "matrix_free_cg": "matrix_free_cg"}
    for key, label in labels.items():
        direct_ran = {r.get("precision") for r in rows.values() if r.get("method") == "direct"}
        if key.startswith("direct"):
            if ("float64" if key == "direct64" else "float32+refinement") in direct_ran:
                continue
        elif key in measured:
            continue
        est = plan.estimates.get(key, float("inf"))
        need = plan.needs.get(key, 0) / 2**30
        what = (f"not run: cost-model estimate {est:.0f} s" if est != float("inf") else
                f"does not fit (needs {need:.1f} GiB)")
        if key == "direct32" and est != float("inf"):
            what += f" (a float32 Cholesky of {n ** 3 / 3:.1e} flops)"
        lines.append(f"| {label} | {what} | | | | | | | | | |")
    f64 = 8 * n * n / 2**30
    if f64 > 0.5 * plan.ram_limit / 2**30:  # K, plus scipy's copy for the solve
        lines.append(f"| scikit-learn KernelRidge(kernel='precomputed') | does not fit: the "
                     f"float64 K alone is {f64:.1f} GiB and the solve copies it (RAM limit "
                     f"{plan.ram_limit / 2**30:.1f} GiB); see the subsample below | | | | | | "
                     "| | | |")
    lines.append("")
    if check:
        lines.append(
            f"Accuracy (subsample N = {check['n']:,}, same test points): the full-size choice "
            f"({check['path']}) forced at the subsample gives predictions within "
            f"**{check['rel']:.1e}** (relative Frobenius norm) of a float64 Cholesky solve of "
            f"the float64 kernel (torch; {check['ref_seconds']:.0f} s)."
            + (f" scikit-learn KernelRidge(precomputed, float64 kernel) on the same subsample: "
               f"{check['sklearn_total']:.0f} s end to end ({check['sklearn_cpu']:.0f} s CPU), "
               "peak RSS "
               f"{check['sklearn_rss']:.1f} GiB, predictions within "
               f"{check['sklearn_rel']:.1e}." if "sklearn_rel" in check else ""))
        lines.append("")
    for name, r in rows.items():
        if r.get("history"):
            lines.append(f"{name}: relative residual (CG recursion) per iteration: "
                         + ", ".join(f"{h:.1e}" for h in r["history"][1:]) + ".")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
