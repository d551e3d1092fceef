"""neural-tangents' empirical NTK of a CNN, for ``empirical_ntk.py --cnn``; executed by the
neural-tangents interpreter (its own virtual environment), never imported by ntkit.

Usage: ``python _nt_empirical_conv.py DIR`` reads ``DIR/jobs.json`` ({"jobs": [...], "x64":
bool, "threads": int}) and ``DIR/<name>.npy``; writes ``DIR/results.json`` (per job:
``compile``, ``first``, ``median``, ``best``, ``times``, ``cpu_median``) and ``DIR/out<i>.npy``
(the first ``check_rows`` rows of the kernel). ``--versions`` prints the versions.

Job: ``x`` (array name, NCHW as in PyTorch), ``channels``, ``depth``, ``readout``
("flatten" | "gap"), ``out_dim``, ``params`` (prefix of ntkit's arrays: ``C<i>`` conv weights
(C_out, C_in, kh, kw), ``c<i>`` conv biases, ``W`` (out, in) and ``b`` of the Dense readout),
``impl`` (1 jacobian, 2 ntk-vector products, 3 structured), ``output`` ("trace" for O = 1,
"full" otherwise: ``trace_axes=()``). The network is ``stax.serial`` of ``depth`` ×
(Conv(channels, (3, 3), padding="SAME", W_std=1, b_std=0.1), Relu), then Flatten or
GlobalAvgPool, then Dense(out_dim, W_std=1, b_std=0.1) — ntkit's ``nk.cnn`` in the NTK
parameterization, in NHWC. ntkit's weights are copied in: conv weights as HWIO, and the
Dense rows of a Flatten readout permuted from PyTorch's (C, H, W) order to NHWC's (H, W, C).
Call: ``jit(empirical_ntk_fn(apply_fn, vmap_axes=0, implementation=impl, trace_axes=...))
(x, None, params)``, compile timed ahead of time, then ``repeats`` calls (one if the first
takes over 2 s).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nt_driver import _configure_threads, _time


def main(directory: Path) -> None:
    spec = json.loads((directory / "jobs.json").read_text())
    _configure_threads(int(spec["threads"]))
    import jax

    if spec["x64"]:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    import numpy as np
    from neural_tangents import stax

    def load(name):
        return np.load(directory / f"{name}.npy")

    results = []
    for i, job in enumerate(spec["jobs"]):
        c, depth, o = int(job["channels"]), int(job["depth"]), int(job["out_dim"])
        layers = []
        for _ in range(depth):
            layers += [stax.Conv(c, (3, 3), padding="SAME", W_std=1.0, b_std=0.1), stax.Relu()]
        layers += [stax.Flatten() if job["readout"] == "flatten" else stax.GlobalAvgPool(),
                   stax.Dense(o, W_std=1.0, b_std=0.1)]
        init_fn, apply_fn, _ = stax.serial(*layers)
        x = jnp.asarray(load(job["x"]).transpose(0, 2, 3, 1))  # NCHW -> NHWC
        _, params = init_fn(jax.random.PRNGKey(0), x.shape)
        pre = job["params"]
        new = []
        for j, p in enumerate(params):
            if j < 2 * depth and j % 2 == 0:  # conv layer j // 2
                w = load(f"{pre}C{j // 2}").transpose(2, 3, 1, 0)  # OIHW -> HWIO
                b = load(f"{pre}c{j // 2}").reshape(p[1].shape)
                new.append((jnp.asarray(w), jnp.asarray(b)))
            elif j == len(params) - 1:  # Dense readout
                w = load(f"{pre}W")  # (out, in), in in ntkit's (C, H, W) order
                if job["readout"] == "flatten":
                    h, wd = x.shape[1], x.shape[2]
                    w = w.reshape(o, c, h, wd).transpose(0, 2, 3, 1).reshape(o, -1)
                new.append((jnp.asarray(w.T), jnp.asarray(load(f"{pre}b").reshape(p[1].shape))))
            else:
                new.append(p)
        params = new
        trace_axes = (-1,) if job["output"] == "trace" else ()
        fn = jax.jit(nt.empirical_ntk_fn(apply_fn, vmap_axes=0, implementation=int(job["impl"]),
                                         trace_axes=trace_axes))
        out, res = _time(lambda: fn(x, None, params), int(job.get("repeats", 3)),
                         jax.block_until_ready,
                         compile_fn=lambda: fn.lower(x, None, params).compile())
        out = np.asarray(out)
        if job["output"] == "trace" and o > 1:
            out = out / o  # neural-tangents sums over the traced axis; ntkit takes the mean
        np.save(directory / f"out{i}.npy", out[: int(job.get("check_rows", 8))])
        res["mode"] = "jit"
        results.append(res)
        # After every job: a run stopped by the caller's timeout keeps what finished.
        (directory / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1:] == ["--versions"]:
        import jax
        import neural_tangents as nt

        print(f"neural-tangents {nt.__version__}, jax {jax.__version__}")
    else:
        main(Path(sys.argv[1]))
