"""JGH's three experiments (arXiv 1806.07572 §6), recomputed: thin scripts over ntkit.

Shared conventions (the paper's): ReLU, σ_w = 1, β = 0.1, NTK parameterization, learning
rate 1.0, cost ½·mean‖f − f*‖² (``cost="jgh"``), scalar output, full-batch gradient descent.

1. ``convergence`` (Fig. 1): the empirical NTK Θ(x0, x) of depth-4 networks at
   initialisation and after 200 steps, against the analytic limit.
2. ``regression`` (Fig. 2): networks trained on 4 points of the circle, against the
   t → ∞ Gaussian of the infinitely wide network.
3. ``pca`` (Fig. 3): the leading eigenvalues of Π = K/N on 512 MNIST digits (power
   iteration with deflation), the batch on its 2nd/3rd principal components, and training
   toward f* = f0 + 0.5·f^(2): ‖g_t‖ against 0.5·e^{−λ2 t}, and ‖h_t‖.

Every number that is plotted goes into ``results.json``; ``report.md`` sets them beside the
paper's and states the choices the paper left open.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import predict, spectral
from ..datasets import load_mnist
from ..datasets.circle import angle_grid, circle_points, jgh_regression_data
from ..dynamics import train
from ..layers import mlp
from .plan import CHECKPOINT_DIR, checkpoint_rel, plan_run
from .rundir import RunDir

EXPERIMENTS = ("convergence", "regression", "pca")
SCALES = ("quick", "default", "paper")
W_STD, B_STD, LEARNING_RATE = 1.0, 0.1, 1.0
PAPER = {
    "theta_x0_x0": 0.2825, "theta_x0_minus_x0": 0.0644,
    "pca_eigenvalues": [0.0457, 0.00108, 0.00078],
}


@dataclass(frozen=True)
class Scale:
    """Sizes for one ``--scale``."""

    conv_widths: tuple[int, ...]
    conv_inits: int
    conv_steps: int
    conv_train_points: int
    conv_angles: int
    reg_widths: tuple[int, ...]
    reg_inits: int
    reg_steps: int
    reg_grid: int
    reg_wide_approx: int | None
    pca_depths: tuple[int, ...]
    pca_depth: int
    pca_points: int
    pca_widths: tuple[int, ...]
    pca_steps: int
    pca_every: int
    train_dtype: str
    note: str = ""


SCALE_CONFIGS = {
    "quick": Scale(conv_widths=(100, 500), conv_inits=3, conv_steps=200, conv_train_points=16,
                   conv_angles=61, reg_widths=(50, 500), reg_inits=5, reg_steps=1000,
                   reg_grid=97, reg_wide_approx=None, pca_depths=(4, 5, 6), pca_depth=5,
                   pca_points=512, pca_widths=(100, 1000), pca_steps=150, pca_every=5,
                   train_dtype="float32",
                   note="quick: small widths, few initialisations and 150 steps in Fig. 3, "
                        "for tests (< 2 min on 2 CPU cores)."),
    "default": Scale(conv_widths=(500, 2000), conv_inits=10, conv_steps=200,
                     conv_train_points=16, conv_angles=101, reg_widths=(50, 1000), reg_inits=10,
                     reg_steps=1000, reg_grid=193, reg_wide_approx=None, pca_depths=(4, 5, 6),
                     pca_depth=5, pca_points=512, pca_widths=(100, 1000), pca_steps=1000,
                     pca_every=20, train_dtype="float32",
                     note="default: width 2000 stands in for the paper's 10000 in Fig. 1, and "
                          "Fig. 3 trains widths 100 and 1000 (the paper adds 10000); "
                          "CPU-friendly (< 15 min on 2 cores)."),
    "paper": Scale(conv_widths=(500, 10000), conv_inits=10, conv_steps=200,
                   conv_train_points=16, conv_angles=101, reg_widths=(50, 1000), reg_inits=10,
                   reg_steps=1000, reg_grid=193, reg_wide_approx=10000, pca_depths=(4, 5, 6),
                   pca_depth=5, pca_points=512, pca_widths=(100, 1000, 10000), pca_steps=1000,
                   pca_every=20, train_dtype="float32",
                   note="paper: the paper's sizes (width 10000); a GPU is advised "
                        "(--device cuda): on 2 CPU cores this takes hours."),
}


def _dtype(name: str) -> torch.dtype:
    return torch.float64 if name == "float64" else torch.float32


def _seed_for(seed: int, *parts: int) -> int:
    """A distinct, reproducible seed per (experiment, width, initialisation)."""
    value = seed
    for p in parts:
        value = (value * 1_000_003 + p) % (2 ** 31 - 1)
    return value


@contextmanager
def _one_thread_for_tiny_batches(device: torch.device) -> Iterator[None]:
    """Figs. 1 and 2 train on 4–16 points: run them on one CPU thread.

    On such tiny matrices the per-op hand-off between OpenMP threads costs more than the
    arithmetic, and on a loaded 2-core machine it dominates (measured: 1000 steps of the
    width-500 Fig. 2 network took 89 s on two threads, 5 s on one). One thread also makes the
    numbers independent of the machine's thread count.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _norm_pin(values: torch.Tensor) -> torch.Tensor:
    """JGH's ‖·‖_{p_in}: root mean square over the training points (last axis)."""
    return values.pow(2).mean(dim=-1).sqrt()


# ------------------------------------------------------------------------ experiment 1
def convergence(cfg: Scale, seed: int, device: torch.device, progress: Callable,
                show: bool = False) -> dict:
    """Fig. 1: Θ(x0, x) on the circle at t = 0 and t = T, several widths and inits."""
    with _one_thread_for_tiny_batches(device):
        return _convergence(cfg, seed, device, progress)


def _convergence(cfg: Scale, seed: int, device: torch.device, progress: Callable) -> dict:
    dtype = _dtype(cfg.train_dtype)
    angles = angle_grid(cfg.conv_angles)
    x0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    circle = circle_points(angles)
    net = mlp(4, 1, "relu", W_STD, B_STD)
    limit = net.kernel(x0, circle, get="ntk").ntk[0]
    special = net.kernel(x0, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), get="ntk").ntk[0]
    gen = torch.Generator().manual_seed(seed)
    x_train = torch.randn(cfg.conv_train_points, 2, generator=gen, dtype=torch.float64)
    y_train = (x_train[:, 0] * x_train[:, 1])[:, None]
    probe = torch.cat([x0, circle]).to(device=device, dtype=dtype)
    out: dict[str, Any] = {
        "angles": angles.tolist(), "limit": limit.tolist(),
        "theta_x0_x0": float(special[0]), "theta_x0_minus_x0": float(special[1]),
        "train_points": x_train.tolist(), "steps": cfg.conv_steps, "widths": {},
    }
    for wi, width in enumerate(cfg.conv_widths):
        curves = {"t0": [], "tT": []}
        deviation = {"t0": [], "tT": []}
        for init in progress(range(cfg.conv_inits), desc=f"Fig. 1 width {width}"):
            model = mlp(4, width, "relu", W_STD, B_STD).module(
                2, seed=_seed_for(seed, 1, wi, init), dtype=dtype, device=device)
            hist = train(model, x_train.to(device), y_train.to(device), steps=cfg.conv_steps,
                         learning_rate=LEARNING_RATE, probe=probe, track_every=cfg.conv_steps,
                         track_weights=False, progress=False)
            for key, snapshot in (("t0", hist.ntk[0]), ("tT", hist.ntk[-1])):
                row = snapshot[0, 1:].double().cpu()
                curves[key].append(row.tolist())
                deviation[key].append(float((row - limit).norm() / limit.norm()))
        out["widths"][str(width)] = {
            "curves": curves,
            "relative_deviation": deviation,
            "relative_deviation_mean": {k: float(np.mean(v)) for k, v in deviation.items()},
            "relative_deviation_std": {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                                       for k, v in deviation.items()},
        }
    return out


# ------------------------------------------------------------------------ experiment 2
def regression(cfg: Scale, seed: int, device: torch.device, progress: Callable,
               show: bool = False) -> dict:
    """Fig. 2: trained networks against the t → ∞ Gaussian (10th/50th/90th percentiles)."""
    with _one_thread_for_tiny_batches(device):
        return _regression(cfg, seed, device, progress)


def _regression(cfg: Scale, seed: int, device: torch.device, progress: Callable) -> dict:
    dtype = _dtype("float64")
    x_train, y_train, train_angles = jgh_regression_data()
    angles = angle_grid(cfg.reg_grid)
    grid = circle_points(angles)
    z90 = 1.2815515655446004  # standard normal 90th percentile
    net = mlp(4, 1, "relu", W_STD, B_STD)

    def gaussian(kernel_source) -> dict:
        pred = predict.ensemble(kernel_source, x_train, y_train, get="ntk",
                                learning_rate=LEARNING_RATE)(math.inf, grid)
        mean = pred.mean[:, 0]
        std = pred.covariance.diagonal().clamp_min(0).sqrt()
        return {"mean": mean.tolist(), "std": std.tolist(), "p10": (mean - z90 * std).tolist(),
                "p50": mean.tolist(), "p90": (mean + z90 * std).tolist()}

    limit = gaussian(net)
    out: dict[str, Any] = {"angles": angles.tolist(), "train_angles": train_angles.tolist(),
                           "train_targets": y_train[:, 0].tolist(), "steps": cfg.reg_steps,
                           "limit": limit, "widths": {}}
    if cfg.reg_wide_approx:
        from ..kernels import monte_carlo_kernel

        width = cfg.reg_wide_approx

        def wide_kernel(a, b, get):
            # two initialisations (the fewest that give a standard error), same seed for
            # every block so that train/test blocks come from the same networks
            return monte_carlo_kernel(mlp(4, width, "relu", W_STD, B_STD), a, b, n_samples=2,
                                      seed=seed, get=get)
        out["wide_approximation"] = {"width": width, **gaussian(wide_kernel)}
    lo, hi = torch.tensor(limit["p10"]), torch.tensor(limit["p90"])
    mean_inf, std_inf = torch.tensor(limit["mean"]), torch.tensor(limit["std"])
    for wi, width in enumerate(cfg.reg_widths):
        curves = []
        for init in progress(range(cfg.reg_inits), desc=f"Fig. 2 width {width}"):
            model = mlp(4, width, "relu", W_STD, B_STD).module(
                2, seed=_seed_for(seed, 2, wi, init), dtype=dtype, device=device)
            hist = train(model, x_train.to(device), y_train.to(device), steps=cfg.reg_steps,
                         learning_rate=LEARNING_RATE, probe=grid.to(device, dtype),
                         track_every=cfg.reg_steps, track_ntk=False, track_weights=False,
                         progress=False)
            curves.append(hist.probe_outputs[-1][:, 0].double().cpu())
        stack = torch.stack(curves)
        inside = (stack >= lo) & (stack <= hi)
        ens_mean, ens_std = stack.mean(0), stack.std(0)
        out["widths"][str(width)] = {
            "curves": stack.tolist(),
            "fraction_inside_band": float(inside.double().mean()),
            "fraction_curves_entirely_inside": float(inside.all(dim=1).double().mean()),
            "mean_distance_max": float((ens_mean - mean_inf).abs().max()),
            "std_distance_max": float((ens_std - std_inf).abs().max()),
            "ensemble_mean": ens_mean.tolist(), "ensemble_std": ens_std.tolist(),
        }
    return out


# ------------------------------------------------------------------------ experiment 3
def pca(cfg: Scale, seed: int, device: torch.device, progress: Callable,
        show: bool = False) -> dict:
    """Fig. 3: eigenvalues of Π on MNIST, the batch on PCs 2/3, and training along f^(2)."""
    mnist = load_mnist()
    indices = np.arange(cfg.pca_points)  # the first N test digits
    x = torch.as_tensor(mnist.images[indices])
    labels = mnist.labels[indices]
    depth_eigs = {}
    for depth in cfg.pca_depths:
        K = mlp(depth, 1, "relu", W_STD, B_STD).kernel(x, get="ntk").ntk
        eig = spectral.eigen(K, 3, method="power", tol=1e-12)
        # a dense solver as an independent check of the power iteration
        dense = spectral.eigen(K, 3, method="eigh").values
        depth_eigs[str(depth)] = {"eigenvalues": eig.values.tolist(),
                                  "eigenvalues_eigh": dense.tolist(),
                                  "iterations": eig.iterations,
                                  "converged": [bool(c) for c in eig.converged]}
        if depth == cfg.pca_depth:
            chosen = eig
    lam = chosen.values
    n = x.shape[0]
    f_train = chosen.vectors * math.sqrt(n)  # f^(i) on the batch, ‖f^(i)‖_{p_in} = 1
    out: dict[str, Any] = {
        "indices": f"the first {n} digits of the bundled MNIST test set (indices 0 to {n - 1})",
        "labels": labels.tolist(),
        "depth": cfg.pca_depth, "eigenvalues_by_depth": depth_eigs,
        "eigenvalues": lam.tolist(), "pc2": f_train[:, 1].tolist(),
        "pc3": f_train[:, 2].tolist(), "steps": cfg.pca_steps, "widths": {},
    }
    dtype = _dtype(cfg.train_dtype)
    v2 = chosen.vectors[:, 1:2]
    for wi, width in enumerate(progress(cfg.pca_widths, desc="Fig. 3 widths")):
        model = mlp(cfg.pca_depth, width, "relu", W_STD, B_STD).module(
            x.shape[1], seed=_seed_for(seed, 3, wi), dtype=dtype, device=device)
        xd = x.to(device=device, dtype=dtype)
        with torch.no_grad():
            f0 = model(xd).double().cpu()
        target = f0 + 0.5 * f_train[:, 1:2]
        hist = train(model, xd, target.to(device), steps=cfg.pca_steps,
                     learning_rate=LEARNING_RATE, probe=xd, track_every=cfg.pca_every,
                     track_ntk=False, track_weights=False, progress=show)
        residual = hist.probe_outputs.double().cpu()[:, :, 0] - target[:, 0]  # (T, N)
        g_norm, h_norm = [], []
        for r in residual:
            along, rest = spectral.project(r, v2, 0)
            g_norm.append(float(_norm_pin(along)))
            h_norm.append(float(_norm_pin(rest)))
        t = np.asarray(hist.tracked_steps, dtype=np.float64)
        rate = -np.polyfit(t, np.log(np.maximum(g_norm, 1e-300)), 1)[0]
        out["widths"][str(width)] = {"t": t.tolist(), "g_norm": g_norm, "h_norm": h_norm,
                                     "fitted_rate": float(rate),
                                     "rate_relative_error": float(rate / float(lam[1]) - 1)}
    t_theory = np.linspace(0, cfg.pca_steps, 101)
    out["theory"] = {"t": t_theory.tolist(),
                     "g_norm": (0.5 * np.exp(-float(lam[1]) * t_theory)).tolist()}
    return out


RUNNERS = {"convergence": convergence, "regression": regression, "pca": pca}


def _checkpoint_key(scale: str, cfg: Scale, seed: int, device: torch.device) -> dict:
    """What a finished experiment's numbers depend on; a checkpoint is reused only if equal."""
    from .. import __version__

    key = {"scale": scale, "config": asdict(cfg), "seed": seed, "device": device.type,
           "ntkit": __version__, "torch": torch.__version__}
    return json.loads(json.dumps(key))  # as it reads back from a checkpoint (tuples -> lists)


def run(experiments: tuple[str, ...] = EXPERIMENTS, scale: str = "default",
        out: str | Path = "jgh20-results", seed: int = 0, device: str = "cpu",
        progress: bool = True, resume: bool = False, force: bool = False,
        notify: Callable[[str], None] | None = None) -> dict:
    """Run the chosen experiments and write figures, ``results.json`` and ``report.md``.

    The numbers depend only on ``scale``, ``seed`` and ``device``: a second run gives the
    same ``results.json`` (timings go to ``timings.json`` and the report).

    ``out`` must be absent, empty or a folder ntkit wrote (see :mod:`.rundir`); ``force``
    admits a non-empty folder of other files, and replaces an earlier run with other
    settings. Files ntkit did not write are never overwritten or deleted.

    Each finished experiment is saved to ``out/checkpoints/<name>.json``, so an interrupted
    run loses at most the experiment in progress. ``resume=True`` reuses every checkpoint
    made with the same scale, seed, device, ntkit and torch versions, and computes only the
    rest; a malformed checkpoint is reported through ``notify``, kept as
    ``<name>.json.damaged`` and recomputed. Experiments of the same settings already in
    ``out`` but not asked for are kept: ``results.json`` and ``report.md`` cover all of them.
    Every check (settings, folder, files, writability) happens before any computation.
    """
    from tqdm.auto import tqdm

    from .. import __version__
    from .report import FIGURES, problem, render

    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"Unknown experiment(s) {unknown}; choose from {EXPERIMENTS}.")
    if scale not in SCALE_CONFIGS:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}.")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device.")
    if notify is None:
        def notify(message: str) -> None:
            print(message, file=sys.stderr)
    cfg = SCALE_CONFIGS[scale]
    key = _checkpoint_key(scale, cfg, seed, dev)
    run_dir = RunDir(out)
    run_dir.check_targets([], force=force, resume=resume)  # a folder that is not ntkit's
    plan = plan_run(run_dir, EXPERIMENTS, experiments, key, resume=resume, force=force,
                    problem=problem)
    final = [name for name in EXPERIMENTS if name in experiments or name in plan["merge"]]
    computed = [name for name in experiments if name not in plan["reuse"]]
    targets = (["results.json", "timings.json", "report.md"]
               + [FIGURES[name][0] for name in final]
               + [checkpoint_rel(name) for name in computed
                  if checkpoint_rel(name) not in plan["set_aside"]])
    run_dir.check_targets(targets, force=force, resume=resume)
    run_dir.check_writable(["", CHECKPOINT_DIR])

    # ---- from here on the folder is ntkit's and every write is known to be allowed
    for message in plan["notices"]:
        notify(message)
    if not run_dir.has_manifest:
        run_dir.claim()
    for rel in plan["set_aside"]:
        run_dir.set_aside(rel)
    if plan["replace"]:  # --force: the earlier run's own files go, nobody else's
        for name in EXPERIMENTS:
            if name not in final:
                run_dir.remove_owned(FIGURES[name][0])
            if name not in experiments and name not in plan["merge"]:
                run_dir.remove_owned(checkpoint_rel(name))

    def bar(iterable, desc):
        return tqdm(iterable, desc=desc, disable=not progress, leave=False)

    results, timings = {}, {}
    for name, (res, seconds) in {**plan["merge"], **plan["reuse"]}.items():
        results[name], timings[name] = res, seconds
    for name in computed:
        start = time.perf_counter()
        results[name] = RUNNERS[name](cfg, seed, dev, bar, progress)
        timings[name] = time.perf_counter() - start
        run_dir.write_text(checkpoint_rel(name), json.dumps(
            {"key": key, "seconds": timings[name], "results": results[name]}))
    document = {"study": "jgh20", "key": key, "scale": scale, "scale_note": cfg.note,
                "seed": seed, "device": str(dev), "version": __version__,
                "torch": torch.__version__, "config": asdict(cfg), "paper": PAPER,
                "experiments": {name: results[name] for name in final}}
    document = json.loads(json.dumps(document))  # as results.json reads back
    timing_doc = {"seconds": {name: timings[name] for name in final
                              if not math.isnan(timings[name])},
                  "reused": [name for name in final if name not in computed]}
    run_dir.write_text("results.json", json.dumps(document, indent=1))
    run_dir.write_text("timings.json", json.dumps(timing_doc, indent=1))
    for name, data in render(document, timing_doc).items():
        run_dir.write_bytes(name, data)
    return document
