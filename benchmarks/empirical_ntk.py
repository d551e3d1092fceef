"""Empirical NTK of a ReLU MLP 784 → w → w → w → O: ntkit's three methods side by side with the
``torch.func`` tutorial recipe and with neural-tangents (run in the same script on the same
inputs and weights).

Workload (as in shared/reference/anchor-timings.md): ``nk.mlp(4, w)`` in NTK
parameterization (W_std=1, b_std=0.1), inputs N × 784 uniform on [0, 1) (torch seed 0),
x2 = None, float32 unless stated. For O = 10 every method returns the full N × N × O × O kernel
(what the tutorial recipe computes); for O = 1 "full" and "trace" coincide.

* ``structured``, ``jacobian``, ``ntk_vp``: ``nk.empirical_ntk(model, x, method=...)`` with the
  default memory budget (half of the available RAM).
* ``tutorial``: the recipe of the torch.func "Neural Tangent Kernels" tutorial,
  ``vmap(jacrev(f))`` for x1 and for x2, then ``einsum('Naf,Mbf->NMab')`` per parameter and a
  sum — whole Jacobians in memory, no blocking. Where it is too large to run, its time is
  estimated from the smallest-N run's measured parts: Jacobians J (linear in N) and
  contraction C (quadratic), as (N/N0)·J + (N/N0)²·C.
* neural-tangents (O = 1): ``jit(empirical_ntk_fn(apply_fn, vmap_axes=0,
  implementation=...))(x, None, params)`` with ntkit's module weights copied in, compile time
  excluded (reported separately).

Timing: median and best of ``--repeats`` calls after a warm-up for calls whose first call
took under 2 s; one call otherwise (then median = best), on both sides. CPU time (process
time, all threads) is reported next to wall time in the neural-tangents table.
Peak memory: the rise of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) above its size before the call. A cell whose estimated time exceeds
``SKIP_SECONDS`` (or whose memory would exceed the RAM) is skipped and says so, except the
w = 2048, N = 512, O = 1 cells, which the issue asks to run for every ntkit method.
Cross-check: every method that ran is compared with ``structured`` on the first 16 rows of its
output (the table lists the rows checked and the max relative difference).

Threads: ``--threads`` (default: every core) on both sides. On a machine other jobs are using,
torch's OpenMP threads wait on each other at every parallel region, which swamps the
structured path's many small ops; ``--threads 1`` is then the more stable measurement.

Run: ``python benchmarks/empirical_ntk.py`` (8-12 minutes); ``--quick`` for small widths and N.
Writes ``benchmarks/results/empirical_ntk.md`` (``--quick`` writes nothing).

CNNs: ``--cnn`` runs ``nk.cnn(3, c)`` (Flatten or GlobalAvgPool readout, 28×28×1, float64)
through ntkit's three methods, reports what ``auto`` picks, and times neural-tangents'
``empirical_ntk_fn`` (jacobian, ntk-vector products, structured) on the same weights through
``_nt_empirical_conv.py``; writes ``benchmarks/results/empirical_cnn.md`` (5-10 minutes).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np
import torch
from torch.func import functional_call, jacrev, vmap

import ntkit as nk
from ntkit._validation import available_memory
from common import (NT, Timing, add_common_args, max_rel_diff, set_threads, stamp,
                    write_table)

D = 784
METHODS = ("structured", "jacobian", "ntk_vp", "tutorial")
SKIP_SECONDS = 60.0
CHECK_ROWS = 16
FULL = {"grid": [(w, n, o) for w in (512, 2048) for n in (128, 512) for o in (1, 10)],
        "nt": [(512, 128, torch.float32), (512, 512, torch.float32),
               (2048, 128, torch.float32), (2048, 512, torch.float32),
               (512, 512, torch.float64), (2048, 128, torch.float64),
               (2048, 512, torch.float64)],
        "required": (2048, 512, 1)}
QUICK = {"grid": [(w, n, o) for w in (64, 256) for n in (32, 64) for o in (1, 3)],
         "nt": [(64, 32, torch.float32), (256, 64, torch.float32), (256, 64, torch.float64)],
         "required": None}


# --------------------------------------------------------------------------- measurement
def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


try:  # Make freed memory visible to RSS: mmap every large block and trim the heap.
    import ctypes

    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed (no dynamic raise)
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


def measure(fn, repeats: int, always_repeat: bool = False
            ) -> tuple[Timing, int, float, object]:
    """(wall timing, peak bytes above the resident size before the call, median CPU seconds,
    the output of the last call).

    The peak is taken on the first (cold) call. If that call took under 2 s it is a warm-up
    and ``repeats`` more calls are timed; otherwise the first call is the only one timed.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _status("VmHWM") - base
    if first > 2.0 and not always_repeat:
        return Timing(first, first, (first,)), peak, first_cpu, out
    times, cpus = [], []
    for _ in range(repeats):
        out = None
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return (Timing(statistics.median(times), min(times), tuple(times)), peak,
            statistics.median(cpus), out)


def tutorial_ntk(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor,
                 parts: dict | None = None) -> torch.Tensor:
    """The torch.func tutorial's empirical NTK (Jacobian contraction), verbatim in spirit.
    ``parts``: if given, receives the seconds spent on the Jacobians and on the contraction."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    start = time.perf_counter()
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    mid = time.perf_counter()
    result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)])
    result = result.sum(0)
    if parts is not None:
        parts["jacobians"], parts["contraction"] = mid - start, time.perf_counter() - mid
    return result


# --------------------------------------------------------------------------- estimates
def n_params(w: int, o: int) -> int:
    return D * w + w + 2 * (w * w + w) + w * o + o


def estimate(method: str, w: int, n: int, o: int, rate: float) -> tuple[float, float]:
    """(seconds, bytes) from FLOP counts at the measured matmul rate (a rough guide)."""
    p = n_params(w, o)
    if method == "structured":
        return 0.0, 0.0
    if method == "ntk_vp":  # one jvp (≈ 3 forward passes of 2P flops) per x2 row and output
        return 6.0 * n * n * o * p / rate, 0.0
    contraction = 2.0 * n * n * o * o * p / rate
    jac_bytes = n * o * p * 4
    if method == "jacobian":
        return contraction, 0.0
    return contraction + 2 * n * o * p * 8 / 20e9, 2.5 * jac_bytes  # tutorial: 2 Jacobians + einsum


def matmul_rate(dtype=torch.float32) -> float:
    a = torch.rand(2048, 2048, dtype=dtype)
    a @ a
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * 2048 ** 3 / (time.perf_counter() - start)


# --------------------------------------------------------------------------- run
def fmt_t(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def fmt_timing(t: Timing) -> str:
    if t.median == t.best and len(t.times) == 1:
        return f"{fmt_t(t.best)} (1 call)"
    return f"{fmt_t(t.median)} / {fmt_t(t.best)}"


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB" if b >= 2**20 else "< 1 MiB"


def module_arrays(model: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """ntkit's dense weights as neural-tangents' stax.Dense params: W as (in, out), b."""
    dense = [m for m in model if hasattr(m, "weight")]
    arrays = {}
    for i, layer in enumerate(dense):
        arrays[f"{prefix}W{i}"] = layer.weight.detach().T.contiguous().numpy()
        arrays[f"{prefix}b{i}"] = layer.bias.detach().numpy()
    return arrays


def check(value, ref, o: int) -> float:
    """Max relative difference of the first CHECK_ROWS rows (full O×O blocks for O > 1)."""
    return max_rel_diff(value[:CHECK_ROWS].numpy(), ref[:CHECK_ROWS].numpy())


def main(cfg: dict, repeats: int, threads: int, shared: bool) -> str:
    set_threads(threads)
    nt = NT(threads, timeout=1800)
    header = stamp(threads, nt, shared)  # the state the run starts from
    torch.manual_seed(0)
    rate = matmul_rate()
    ram = available_memory()
    # One-time initialisation (imports, dispatch tables) must not count as a method's peak.
    tiny = nk.mlp(4, 8, out_dim=2).module(D, seed=0, dtype=torch.float32)
    for method in METHODS[:3]:
        nk.empirical_ntk(tiny, torch.rand(3, D), method=method, output="full")
    tutorial_ntk(tiny, torch.rand(3, D), torch.rand(3, D))

    inputs = {}  # (n, dtype) -> x, one draw per N shared by every method and both libraries

    def x_for(n, dtype):
        if (n, dtype) not in inputs:
            gen = torch.Generator().manual_seed(n)
            inputs[(n, dtype)] = torch.rand(n, D, generator=gen, dtype=torch.float64).to(dtype)
        return inputs[(n, dtype)]

    n0 = min(n for _, n, _ in cfg["grid"])
    results, parts, checked, notes = {}, {}, [], []
    table = []
    for w, n, o in cfg["grid"]:
        model = nk.mlp(4, w, "relu", W_std=1.0, b_std=0.1, out_dim=o).module(
            D, seed=0, dtype=torch.float32)
        x = x_for(n, torch.float32)
        output = "full" if o > 1 else "trace"
        row, ref = {}, None
        for method in METHODS:
            est_s, est_b = estimate(method, w, n, o, rate)
            required = (w, n, o) == cfg["required"] and method != "tutorial"
            if est_b > 0.8 * ram:
                row[method] = (None, None, f"skipped: needs ≈ {est_b / 2**30:.0f} GiB")
                continue
            if est_s > SKIP_SECONDS and not required:
                row[method] = (None, None, f"skipped: est. {est_s:.0f} s")
                continue
            if method == "tutorial":
                def fn(model=model, x=x):
                    return tutorial_ntk(model, x, x)
            else:
                def fn(m=method, model=model, x=x, output=output):
                    return nk.empirical_ntk(model, x, method=m, output=output)
            t, peak, _, value = measure(fn, repeats)
            if method == "tutorial" and o == 1:
                value = value[..., 0, 0]
            if ref is None:
                ref = value
            else:
                err = check(value, ref, o)
                checked.append(f"w={w} N={n} O={o} {method}: {err:.1e}")
                if err > 1e-4:
                    notes.append(f"w={w} N={n} O={o} {method}: rel. difference {err:.1e}")
            del value
            row[method] = (t, peak, "")
            gc.collect()
        if n == n0 and row["tutorial"][0] is not None:
            p = {}
            tutorial_ntk(model, x, x, parts=p)
            parts[(w, o)] = p
        results[(w, n, o)] = row
        del ref

        def cell(m, row=row):
            t, _, why = row[m]
            return fmt_timing(t) if t is not None else why

        st, tut = row["structured"][0], row["tutorial"][0]
        if tut is not None:
            tut_ratio = f"{tut.median / st.median:.3g}× / {tut.best / st.best:.3g}×"
        elif (w, o) in parts:
            p, s = parts[(w, o)], n / n0
            est = s * p["jacobians"] + s * s * p["contraction"]
            tut_ratio = (f"≈ {est / st.median:.3g}× (tutorial estimated {fmt_t(est)} from "
                         f"N = {n0}: J {fmt_t(p['jacobians'])}, C {fmt_t(p['contraction'])})")
        else:
            tut_ratio = "—"
        peaks = " / ".join(fmt_mib(row[m][1]) if row[m][0] is not None else "—"
                           for m in METHODS)
        table.append(f"| {w} | {n} | {o} | {cell('structured')} | {cell('jacobian')} | "
                     f"{cell('ntk_vp')} | {cell('tutorial')} | {peaks} | {tut_ratio} |")
        print(table[-1], flush=True)
        del model

    # ---- neural-tangents side by side (O = 1), float32 and float64
    nt_lines = []
    if nt.available:
        for dtype in (torch.float32, torch.float64):
            keys = [k for k in cfg["nt"] if k[2] == dtype]
            if not keys:
                continue
            jobs, arrays, ours = [], {}, {}
            for w, n, _ in keys:
                model = nk.mlp(4, w, "relu", W_std=1.0, b_std=0.1).module(D, seed=0, dtype=dtype)
                x = x_for(n, dtype)
                arrays.update(module_arrays(model, f"w{w}"))
                arrays[f"x{n}"] = x.numpy()
                ours[(w, n)] = {}
                for method in ("structured", "jacobian", "ntk_vp"):
                    prev = results.get((w, n, 1), {}).get(method) if dtype == torch.float32 \
                        else None
                    if prev is not None and prev[0] is not None and method != "structured":
                        ours[(w, n)][method] = (prev[0], None)
                    elif method == "structured":
                        t, _, cpu, value = measure(
                            lambda model=model, x=x: nk.empirical_ntk(model, x,
                                                                      method="structured"),
                            repeats)
                        ours[(w, n)][method] = (t, cpu)
                        ours[(w, n)]["value"] = value[:CHECK_ROWS]
                for impl, method in ((3, "structured"), (1, "jacobian"), (2, "ntk_vp")):
                    est_s, _ = estimate(method if method != "structured" else "structured",
                                        w, n, 1, rate)
                    itemsize = 4 if dtype == torch.float32 else 8
                    est_b = n * n_params(w, 1) * itemsize * (1.2 if impl == 1 else 1.8)
                    if impl != 3 and est_b > 0.5 * ram:
                        ours[(w, n)][f"nt_{method}"] = f"not run: needs ≈ {est_b / 2**30:.0f} GiB"
                        continue
                    if impl != 3 and est_s * (2 if dtype == torch.float64 else 1) > SKIP_SECONDS:
                        ours[(w, n)][f"nt_{method}"] = f"not run: est. {est_s:.0f} s"
                        continue
                    jobs.append({"kind": "empirical", "x": f"x{n}", "params": f"w{w}",
                                 "width": w, "out_dim": 1, "impl": impl,
                                 "repeats": repeats if est_s < 2 else 1,
                                 "check_rows": CHECK_ROWS, "key": [w, n, method]})
            for job, res in zip(jobs, nt.run(jobs, arrays, x64=dtype == torch.float64)):
                w, n, method = job["key"]
                ours[(w, n)][f"nt_{method}"] = res
                print("NT", w, n, dtype, method, f"{res['median']:.3f} s", flush=True)
            for w, n in ours:
                cells = ours[(w, n)]
                st, cpu = cells["structured"]
                nt_cells = []
                for method in ("structured", "jacobian", "ntk_vp"):
                    res = cells.get(f"nt_{method}")
                    if isinstance(res, dict):
                        err = max_rel_diff(cells["value"].numpy(), res["out"])
                        checked.append(f"w={w} N={n} O=1 {str(dtype)[6:]} neural-tangents "
                                       f"{method} vs ntkit structured: {err:.1e}")
                        tol = 1e-4 if dtype == torch.float32 else 1e-10
                        if err > tol:
                            notes.append(f"w={w} N={n} {dtype} NT {method}: rel. diff {err:.1e}")
                        rt = Timing(res["median"], res["best"], tuple(res["times"]))
                        nt_cells.append((method, rt, res["cpu_median"],
                                         res["first"] - res["median"]))
                        cells[f"nt_{method}"] = (f"{fmt_timing(rt)} (CPU "
                                                 f"{fmt_t(res['cpu_median'])}; compile "
                                                 f"{res['compile']:.1f} s)")
                    elif res is None:
                        cells[f"nt_{method}"] = "—"
                ratio_cell = "—"
                if nt_cells:
                    _, bt, bcpu, _ = min(nt_cells, key=lambda c: c[1].median)
                    by_cpu = bcpu / cpu
                    ratio_cell = (f"{bt.median / st.median:.2g}× / {bt.best / st.best:.2g}× / "
                                  f"{by_cpu:.2g}×" + (" (ntkit slower by CPU)"
                                                      if by_cpu < 1 else ""))
                our_other = " | ".join(
                    fmt_timing(cells[m][0]) if m in cells else "not run"
                    for m in ("jacobian", "ntk_vp"))
                nt_lines.append(
                    f"| {w} | {n} | {str(dtype)[6:]} | {fmt_timing(st)} (CPU {fmt_t(cpu)}) | "
                    f"{cells['nt_structured']} | {cells['nt_jacobian']} | {cells['nt_ntk_vp']} "
                    f"| {ratio_cell} | {our_other} |")
                print(nt_lines[-1], flush=True)

    lines = [
        "# Empirical NTK: ntkit methods vs the torch.func tutorial recipe and neural-tangents",
        "",
        header,
        "",
        f"MLP 784 → w → w → w → O, ReLU, NTK parameterization, float32, N × N kernel (x2=None); "
        f"for O = 10 the full N×N×O×O kernel. Matmul {rate / 1e9:.0f} GFLOP/s (f32, measured "
        f"now), {ram / 2**30:.1f} GiB available. Times: median / best of {repeats} calls "
        "after a warm-up, or one call when the first took over 2 s. Peak = rise of the "
        "process's resident-set high-water mark.",
        "",
        "| w | N | O | structured | jacobian | ntk_vp | tutorial recipe | "
        "peak: structured / jacobian / ntk_vp / tutorial | tutorial ÷ structured "
        "(median / best) |",
        "|---|---|---|---|---|---|---|---|---|",
        *table,
        "",
        f"Where the tutorial recipe cannot run, its time is estimated from its N = {n0} run "
        f"split into Jacobians J (linear in N) and contraction C (quadratic): (N/{n0})·J + "
        f"(N/{n0})²·C. It is an estimate, not a bound.",
    ]
    if nt.available:
        lines += [
            "", "## Against neural-tangents (same weights, same inputs, this run; O = 1)", "",
            "Wall time median / best, and median CPU time (process time over all threads). "
            "neural-tangents is jitted; its compile time is excluded and given separately. "
            "Ratio = NT's fastest method ÷ ntkit structured, by median wall / best wall / "
            "median CPU time; a CPU ratio below 1 marks a row where ntkit does more work than "
            "neural-tangents even if its wall time is lower.", "",
            "| w | N | dtype | ntkit structured | NT structured | NT jacobian | NT ntk_vp | "
            "NT best ÷ ntkit structured (median / best / CPU) | ntkit jacobian | "
            "ntkit ntk_vp |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *nt_lines,
        ]
    else:
        lines += ["", nt.note]
    lines += ["", "## Structured path: peak memory against its O(N·Σn_l + N²) model", "",
              "Model: 4 bytes × (N·(Σ_l n_{l-1} + O·Σ_l n_l) for the saved activations and "
              "backward signals + N²·O² for the result).", "",
              "| w | N | O | model | measured peak |", "|---|---|---|---|---|"]
    for (w, n, o), row in results.items():
        model_bytes = 4 * (n * (D + 3 * w + o * (3 * w + o)) + n * n * o * o)
        lines.append(f"| {w} | {n} | {o} | {fmt_mib(model_bytes)} | "
                     f"{fmt_mib(row['structured'][1])} |")
    lines += ["", f"Cross-checks against ntkit structured (first {CHECK_ROWS} rows, max relative "
              "difference; float32 rounding is ~1e-6 to 1e-5):", ""]
    lines += [f"- {c}" for c in checked]
    if notes:
        lines += ["", "Disagreements above tolerance:", ""] + [f"- {m}" for m in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CNN rows
# (channels, readout, O, N, output): ntkit's nk.cnn(3, channels) on 28×28×1 inputs, float64.
CNN = {"grid": [(32, "flatten", 1, 32, "trace"), (32, "flatten", 1, 128, "trace"),
                (32, "flatten", 10, 64, "full"), (32, "gap", 10, 16, "full"),
                (32, "gap", 1, 128, "trace"), (32, "gap", 10, 64, "full"),
                (128, "flatten", 1, 32, "trace"), (128, "gap", 1, 32, "trace")],
       # neural-tangents' conv Jacobians take minutes per call in float64 on this CPU
       # (about 4 minutes for the first row's each implementation): one small row.
       "nt": [(32, "flatten", 1, 32, "trace")]}
CNN_QUICK = {"grid": [(8, "flatten", 1, 16, "trace"), (8, "gap", 3, 16, "full")],
             "nt": [(8, "flatten", 1, 16, "trace")]}
CNN_METHODS = ("structured", "jacobian", "ntk_vp")


def cnn_model(c: int, readout: str, o: int) -> torch.nn.Module:
    """``nk.cnn(3, c)`` (3×3 "same" Conv + ReLU three times, Flatten or GlobalAvgPool,
    Dense(O); NTK parameterization, W_std=1, b_std=0.1) as a float64 module for 28×28×1."""
    net = nk.cnn(3, c, "relu", pool=readout, W_std=1.0, b_std=0.1, out_dim=o)
    return net.module(in_shape=(1, 28, 28), seed=0, dtype=torch.float64)


def cnn_arrays(model: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    arrays = {f"{prefix}C{i}": m.weight.detach().numpy() for i, m in enumerate(convs)}
    arrays.update({f"{prefix}c{i}": m.bias.detach().numpy() for i, m in enumerate(convs)})
    arrays[f"{prefix}W"], arrays[f"{prefix}b"] = (model[-1].weight.detach().numpy(),
                                                  model[-1].bias.detach().numpy())
    return arrays


def run_nt_conv(jobs: list[dict], arrays: dict, threads: int,
                timeout: float = 1200.0) -> list[dict]:
    """Run ``_nt_empirical_conv.py`` under the neural-tangents interpreter (float64); after
    ``timeout`` seconds the jobs that finished are returned (the driver saves each)."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    from common import nt_python

    driver = Path(__file__).resolve().parent / "_nt_empirical_conv.py"
    with tempfile.TemporaryDirectory(prefix="ntkit-ntconv-") as tmp:
        tmp_path = Path(tmp)
        for name, arr in arrays.items():
            np.save(tmp_path / f"{name}.npy", np.ascontiguousarray(arr))
        (tmp_path / "jobs.json").write_text(json.dumps({"jobs": jobs, "x64": True,
                                                        "threads": threads}))
        try:
            proc = subprocess.run([str(nt_python()), str(driver), str(tmp_path)],
                                  capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError("neural-tangents conv driver failed:\n"
                                   f"{proc.stderr[-3000:]}")
        except subprocess.TimeoutExpired:
            print(f"neural-tangents stopped after {timeout:.0f} s", flush=True)
        done = tmp_path / "results.json"
        results = json.loads(done.read_text()) if done.exists() else []
        for i, res in enumerate(results):
            res["out"] = np.load(tmp_path / f"out{i}.npy")
    return results


def cnn_main(cfg: dict, repeats: int, threads: int, shared: bool) -> str:
    """The CNN table: ntkit's methods side by side (and what ``auto`` picks), then
    neural-tangents' empirical_ntk_fn on the same weights and inputs."""
    from ntkit.kernels.empirical.ntk import _method_for
    from ntkit.kernels.empirical.setup import _setup

    set_threads(threads)
    nt = NT(threads, timeout=1800)
    header = stamp(threads, nt, shared)
    warm = cnn_model(2, "flatten", 2)
    for method in CNN_METHODS:
        nk.empirical_ntk(warm, torch.rand(2, 1, 28, 28, dtype=torch.float64), method=method)
    rows, checked, values, models = [], [], {}, {}
    for c, readout, o, n, output in cfg["grid"]:
        model = cnn_model(c, readout, o)
        x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(n),
                       dtype=torch.float64)
        setup = _setup(model, x, None, None)
        picked = _method_for("auto", setup, output, False)
        cells, ref, times = {}, None, {}
        for method in CNN_METHODS:
            # ntk_vp pushes one jvp per x2 row and output through the x1 block: ≈ 3 F O N²/2
            est = 1.5 * setup.flops * o * n * n / 10e9
            if method == "ntk_vp" and est > SKIP_SECONDS:
                cells[method] = f"skipped: est. {est:.0f} s"
                continue
            # Always a warm-up call first (page faults of the first large allocations
            # cost up to 2× on this machine), then the timed calls; CPU time beside wall
            # time because the machine is shared.
            t, peak, cpu, value = measure(
                lambda m=method: nk.empirical_ntk(model, x, method=m, output=output),
                repeats, always_repeat=True)
            times[method] = cpu
            cells[method] = f"{fmt_timing(t)} (CPU {fmt_t(cpu)}), {fmt_mib(peak)}"
            if ref is None:
                ref = value
                values[(c, readout, o, n)] = value[:CHECK_ROWS].clone()
                models[(c, readout, o, n)] = (model, x)
            else:
                err = max_rel_diff(value[:CHECK_ROWS].numpy(), ref[:CHECK_ROWS].numpy())
                checked.append(f"c={c} {readout} O={o} N={n} {method} vs structured: "
                               f"{err:.1e}")
            del value
            gc.collect()
        fastest = min(times, key=times.get)
        n_params = sum(p.numel() for p in model.parameters())
        rows.append(f"| {c} | {readout} | {o} | {n} | {output} | {n_params:,} | "
                    f"{cells['structured']} | {cells['jacobian']} | {cells['ntk_vp']} | "
                    f"{times['jacobian'] / times['structured']:.2g}× | {picked} | "
                    f"{fastest} |")
        print(rows[-1], flush=True)

    nt_rows = []
    if nt.available:
        jobs, arrays = [], {}
        for c, readout, o, n, output in cfg["nt"]:
            model, x = models[(c, readout, o, n)]
            key = f"m{c}{readout}{o}n{n}"
            arrays.update(cnn_arrays(model, key))
            arrays[f"x{key}"] = x.numpy()
            for impl in (1, 2, 3):
                jobs.append({"x": f"x{key}", "channels": c, "depth": 3, "readout": readout,
                             "out_dim": o, "params": key, "impl": impl, "output": output,
                             "repeats": repeats, "check_rows": CHECK_ROWS,
                             "key": [c, readout, o, n]})
        results = run_nt_conv(jobs, arrays, threads)
        for job in jobs[len(results):]:
            c, readout, o, n = job["key"]
            name = {1: "jacobian", 2: "ntk_vp", 3: "structured"}[job["impl"]]
            nt_rows.append(f"| {c} | {readout} | {o} | {n} | {name} | not finished within "
                           "the run's time limit |")
        for job, res in zip(jobs, results):
            c, readout, o, n = job["key"]
            ours = values[(c, readout, o, n)].numpy()
            err = max_rel_diff(ours, res["out"])
            name = {1: "jacobian", 2: "ntk_vp", 3: "structured"}[job["impl"]]
            checked.append(f"c={c} {readout} O={o} N={n} neural-tangents {name} vs ntkit "
                           f"structured: {err:.1e}")
            rt = Timing(res["median"], res["best"], tuple(res["times"]))
            nt_rows.append(f"| {c} | {readout} | {o} | {n} | {name} | {fmt_timing(rt)} "
                           f"(compile {res['compile']:.1f} s) |")
            print(nt_rows[-1], flush=True)

    lines = [
        "# Empirical NTK of CNNs: ntkit methods side by side, and neural-tangents", "",
        header, "",
        "nk.cnn(3, c): three 3×3 \"same\" Conv(c) + ReLU, Flatten or GlobalAvgPool, "
        "Dense(O) (NTK parameterization, W_std=1, b_std=0.1), as a float64 module on "
        "28×28×1 inputs uniform on [0, 1); x2 = None (N × N). Cells: wall time median / "
        "best of the timed calls after a warm-up call, their median CPU (process) time, and "
        "the peak rise of the resident set (on the warm-up call). The machine was shared, so "
        "the ratio and \"fastest\" use CPU time. ntk_vp is skipped where its estimate "
        f"(≈ 1.5 F O N² at 10 GFLOP/s) exceeds {SKIP_SECONDS:.0f} s. \"auto\" = the method "
        "the cost model picks for this call.", "",
        "| c | readout | O | N | output | parameters | structured | jacobian | ntk_vp | "
        "jacobian ÷ structured (CPU) | auto picks | fastest (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if nt_rows:
        lines += ["", "## neural-tangents empirical_ntk_fn (same weights and inputs, jitted, "
                  "float64; compile time excluded)", "",
                  "| c | readout | O | N | implementation | time |", "|---|---|---|---|---|---|",
                  *nt_rows]
    elif not nt.available:
        lines += ["", nt.note]
    lines += ["", f"Cross-checks (first {CHECK_ROWS} rows, max relative difference; float64):",
              ""] + [f"- {c}" for c in checked]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "w = 64, 256 and N = 32, 64; writes no table")
    parser.add_argument("--cnn", action="store_true",
                        help="the CNN table instead (writes results/empirical_cnn.md)")
    args = parser.parse_args()
    if args.cnn:
        if args.quick:
            print(cnn_main(CNN_QUICK, min(args.repeats, 2), args.threads, args.shared))
        else:
            write_table("empirical_cnn", cnn_main(CNN, args.repeats, args.threads, args.shared))
    elif args.quick:
        print(main(QUICK, min(args.repeats, 3), args.threads, args.shared))
    else:
        write_table("empirical_ntk", main(FULL, args.repeats, args.threads, args.shared))
