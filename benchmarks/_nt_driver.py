"""Runs neural-tangents jobs for the benchmarks; executed by the neural-tangents interpreter
(its own virtual environment), never imported by ntkit.

Usage: ``python _nt_driver.py DIR`` reads ``DIR/jobs.json`` ({"jobs": [...], "x64": bool,
"threads": int}) and the input arrays ``DIR/<name>.npy``, and writes ``DIR/results.json``
(one dict per job: ``compile`` = seconds to lower and compile the jitted function ahead of
time (null where nothing is compiled as a whole); ``first`` = the first call, which compiles
again through jit's own cache;
``median``, ``best``, ``times`` of ``repeats`` further calls; ``cpu_median`` = median process
CPU seconds of those calls; ``mode``) and ``DIR/out<i>.npy`` (the slice of job i's output used
for the numerical cross-check). ``python _nt_driver.py --versions`` prints the versions.

Threads: with ``threads`` = 1 XLA's CPU backend is told to run single-threaded
(``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``); otherwise the process
is pinned to ``threads`` of the CPUs it may use, from which XLA sizes its thread pool. Both
happen before jax is imported.

Jobs (``kind``):
* ``analytic``: ``x`` (array name), ``act`` (relu|erf), ``width``, ``depth`` — the MLP
  Dense(W_std=1, b_std=0.1) -> act, (depth - 1) times, then Dense; ``jit(kernel_fn)(x, None,
  ("nngp", "ntk"))``; out = both kernels' first ``check_rows`` rows.
* ``empirical``: ``x``, ``params`` (prefix of arrays W0, b0, W1, ...; W as (in, out)), ``out_dim``,
  ``impl`` (1 jacobian, 2 ntk-vector products, 3 structured); ``jit(empirical_ntk_fn(apply_fn,
  vmap_axes=0, implementation=impl))(x, None, params)``; out = the first ``check_rows`` rows.
* ``predict``: ``x_train``, ``x_test``, ``y``, ``t`` (null = infinity), ``cached`` (bool),
  ``x_new``. Not cached: one jitted function builds ``gradient_descent_mse_ensemble`` from
  scratch and predicts the NTK mean on ``x_test``. Cached: the ensemble predictor is built once
  and called on ``x_test`` (filling its train-kernel and factorisation caches), then timed on
  ``x_new`` (only the test-train kernel and a product with the cached solve remain).
* ``conv``: ``x1``, ``x2`` (NHWC arrays), ``layers`` (a list of ``[name, kwargs]`` in
  neural-tangents' names: Conv, Relu, Erf, AvgPool, GlobalAvgPool, Flatten, Dense; as in
  ``shared/reference/nt/conv/cases.json``), ``batch_size``. The kernel function is
  ``nt.batch(jit(kernel_fn), batch_size, device_count=0, store_on_device=False)`` called as
  ``fn(x1, x2, ("nngp", "ntk"))``. It is warmed up (compiled) on one batch
  ``x1[:batch_size], x2[:batch_size]``, whose time is ``first``; then ``repeats`` timed calls
  on the whole inputs (default 1: these runs take minutes). ``compile`` is null (the warm-up
  holds it). out = both kernels' first ``check_rows`` rows.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def _configure_threads(threads: int) -> None:
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    else:
        cpus = sorted(os.sched_getaffinity(0))
        if threads < len(cpus):
            os.sched_setaffinity(0, cpus[:threads])


def _mlp(stax, width: int, depth: int, act: str, out_dim: int):
    act_layer = {"relu": stax.Relu, "erf": stax.Erf}[act]
    layers = []
    for _ in range(depth - 1):
        layers += [stax.Dense(width, W_std=1.0, b_std=0.1), act_layer()]
    layers.append(stax.Dense(out_dim, W_std=1.0, b_std=0.1))
    return stax.serial(*layers)


def _stax_net(stax, layers: list):
    """``stax.serial`` of ``[name, kwargs]`` layers (neural-tangents' names and arguments;
    tuples given as JSON lists are turned back into tuples)."""
    built = []
    for name, kwargs in layers:
        kwargs = {key: tuple(val) if isinstance(val, list) else val
                  for key, val in kwargs.items()}
        built.append(getattr(stax, name)(**kwargs))
    return stax.serial(*built)


def _time_batched(fn, x1, x2, batch_size: int, repeats: int, block):
    """Warm up (compile) ``fn`` on one batch, then time ``repeats`` calls on the whole
    inputs (wall clock and process CPU)."""
    start = time.perf_counter()
    block(fn(x1[:batch_size], x2[:batch_size]))
    first = time.perf_counter() - start
    out, times, cpus = None, [], []
    for _ in range(max(repeats, 1)):
        start, cpu = time.perf_counter(), time.process_time()
        out = block(fn(x1, x2))
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return out, {"compile": None, "first": first, "median": statistics.median(times),
                 "best": min(times), "times": times, "cpu_median": statistics.median(cpus)}


def _time(call, repeats: int, block, compile_fn=None):
    """Time ``call``; ``compile_fn`` (lower + compile of the jitted function, ahead of time)
    is timed on its own first, so the compile time is measured, not inferred."""
    compile_s = None
    if compile_fn is not None:
        start = time.perf_counter()
        compile_fn()
        compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = block(call())
    first = time.perf_counter() - start
    if first > 2.0:  # as on the ntkit side: slow calls are timed once (after the warm-up)
        repeats = min(repeats, 1)
    times, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        block(call())
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return out, {"compile": compile_s, "first": first, "median": statistics.median(times), "best": min(times),
                 "times": times, "cpu_median": statistics.median(cpus)}


def main(directory: Path) -> None:
    spec = json.loads((directory / "jobs.json").read_text())
    _configure_threads(int(spec["threads"]))
    import jax

    if spec["x64"]:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import neural_tangents as nt
    from neural_tangents import stax

    def load(name):
        return jnp.asarray(np.load(directory / f"{name}.npy"))

    def block(tree):
        return jax.block_until_ready(tree)

    results = []
    for i, job in enumerate(spec["jobs"]):
        kind, repeats, rows = job["kind"], int(job.get("repeats", 5)), job.get("check_rows", 0)
        mode = "jit"
        if kind == "analytic":
            x = load(job["x"])
            _, _, kernel_fn = _mlp(stax, job.get("width", 512), job.get("depth", 4), job["act"], 1)
            fn = jax.jit(kernel_fn, static_argnames="get")
            out, res = _time(lambda: fn(x, None, ("nngp", "ntk")), repeats, block,
                             lambda: fn.lower(x, None, ("nngp", "ntk")).compile())
            check = np.stack([np.asarray(out[0][:rows]), np.asarray(out[1][:rows])])
        elif kind == "empirical":
            x = load(job["x"])
            _, apply_fn, _ = _mlp(stax, job["width"], 4, "relu", job["out_dim"])
            params = []
            for layer in range(4):
                params.append((load(f"{job['params']}W{layer}"), load(f"{job['params']}b{layer}")))
                if layer < 3:
                    params.append(())
            impl = nt.NtkImplementation(job["impl"])
            ntk_fn = jax.jit(nt.empirical_ntk_fn(apply_fn, vmap_axes=0, implementation=impl))
            out, res = _time(lambda: ntk_fn(x, None, params), repeats, block,
                             lambda: ntk_fn.lower(x, None, params).compile())
            check = np.asarray(out[:rows])
        elif kind == "predict":
            x_train, x_test, y = load(job["x_train"]), load(job["x_test"]), load(job["y"])
            t = job["t"]
            _, _, kernel_fn = _mlp(stax, 512, 4, "relu", 1)
            if job.get("cached"):
                mode = "eager predictor, jitted kernel_fn"
                x_new = load(job["x_new"])
                predict_fn = nt.predict.gradient_descent_mse_ensemble(
                    jax.jit(kernel_fn, static_argnames="get"), x_train, y)
                block(predict_fn(t=t, x_test=x_test, get="ntk"))  # fills the caches
                out, res = _time(lambda: predict_fn(t=t, x_test=x_new, get="ntk"), repeats,
                                 block)
            else:
                def full(x_train, x_test, y):
                    predict_fn = nt.predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y)
                    return predict_fn(t=t, x_test=x_test, get="ntk")

                jitted = jax.jit(full)
                out, res = _time(lambda: jitted(x_train, x_test, y), repeats, block,
                                 lambda: jitted.lower(x_train, x_test, y).compile())
            check = np.asarray(out)
        elif kind == "conv":
            mode = "nt.batch(jit(kernel_fn))"
            x1, x2 = load(job["x1"]), load(job["x2"])
            _, _, kernel_fn = _stax_net(stax, job["layers"])
            bs = int(job["batch_size"])
            batched = nt.batch(jax.jit(kernel_fn, static_argnames="get"), batch_size=bs,
                               device_count=0, store_on_device=False)
            out, res = _time_batched(lambda a, b: batched(a, b, ("nngp", "ntk")), x1, x2, bs,
                                     int(job.get("repeats", 1)), block)
            check = np.stack([np.asarray(out[0][:rows]), np.asarray(out[1][:rows])])
        else:
            raise ValueError(f"unknown job kind {kind!r}")
        res["mode"] = mode
        np.save(directory / f"out{i}.npy", check)
        results.append(res)
        print(f"job {i} ({kind}): median {res['median']:.4f} s, first {res['first']:.2f} s",
              file=sys.stderr, flush=True)
    (directory / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1:] == ["--versions"]:
        import jax
        import jaxlib
        import neural_tangents

        print(f"neural-tangents {neural_tangents.__version__}, jax {jax.__version__}, "
              f"jaxlib {jaxlib.__version__}")
    else:
        main(Path(sys.argv[1]))
