"""Figures (matplotlib) and ``report.md`` for the JGH reproduction: a view over a saved run.

Everything here reads the run's ``results.json`` (and ``timings.json`` for the timing
table) and nothing else: no import from the runner, no recomputation. ``ntkit report OUT``
calls :func:`rebuild` to redraw a saved run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np

from .rundir import RunDir

# What the figures and the report read from each experiment's results: the top-level
# fields, and the fields of every entry of ``widths``. A checkpoint or results.json that
# lacks one is malformed.
REQUIRED = {
    "convergence": (("angles", "limit", "theta_x0_x0", "theta_x0_minus_x0", "train_points",
                     "steps", "widths"),
                    ("curves", "relative_deviation", "relative_deviation_mean",
                     "relative_deviation_std")),
    "regression": (("angles", "train_angles", "train_targets", "steps", "limit", "widths"),
                   ("curves", "fraction_inside_band", "fraction_curves_entirely_inside",
                    "mean_distance_max", "std_distance_max")),
    "pca": (("indices", "labels", "depth", "eigenvalues_by_depth", "eigenvalues", "pc2", "pc3",
             "steps", "theory", "widths"),
            ("t", "g_norm", "h_norm", "fitted_rate", "rate_relative_error")),
}


def problem(name: str, results: Any) -> str | None:
    """What is wrong with one experiment's ``results`` for the report, or None if nothing."""
    if name not in REQUIRED:
        return f"{name!r} is not an experiment of this reproduction"
    top, per_width = REQUIRED[name]
    if not isinstance(results, dict):
        return f"its results are a JSON {type(results).__name__}, not an object"
    missing = [k for k in top if k not in results]
    if missing:
        return f"its results lack the field(s) {missing}"
    widths = results["widths"]
    if not isinstance(widths, dict) or not widths:
        return "its results have no entry under 'widths'"
    for width, entry in widths.items():
        if not isinstance(entry, dict):
            return f"widths[{width!r}] is not an object"
        missing = [k for k in per_width if k not in entry]
        if missing:
            return f"widths[{width!r}] lacks the field(s) {missing}"
    return None


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]


def figure_convergence(res: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 5))
    angles = np.array(res["angles"])
    for c, (width, data) in zip(_COLORS, res["widths"].items()):
        for i, curve in enumerate(data["curves"]["t0"]):
            ax.plot(angles, curve, color=c, lw=0.8, alpha=0.7,
                    label=f"n = {width}, t = 0" if i == 0 else None)
        for i, curve in enumerate(data["curves"]["tT"]):
            ax.plot(angles, curve, color=c, lw=0.8, ls="--", alpha=0.7,
                    label=f"n = {width}, t = {res['steps']}" if i == 0 else None)
    ax.plot(angles, res["limit"], color="black", lw=2.2, label="n → ∞ (analytic)")
    ax.set_xlabel("γ  (x = (cos γ, sin γ), x0 = (1, 0))")
    ax.set_ylabel("Θ(x0, x)")
    title = "JGH Fig. 1 (reproduced): convergence of the NTK, depth 4, ReLU"
    widest = max(int(w) for w in res["widths"])
    if widest < 10000:
        title += f"\n(CPU scale: width {widest} stands in for the paper's 10000)"
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def figure_regression(res: dict) -> bytes:
    widths = list(res["widths"].items())
    fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4.5), sharey=True,
                             squeeze=False)
    angles = np.array(res["angles"])
    lim = res["limit"]
    for ax, (c, (width, data)) in zip(axes[0], zip(_COLORS, widths)):
        ax.fill_between(angles, lim["p10"], lim["p90"], color="gray", alpha=0.3,
                        label="n → ∞: 10th–90th percentile")
        ax.plot(angles, lim["p50"], color="black", lw=2, label="n → ∞: median")
        if "wide_approximation" in res:
            wide = res["wide_approximation"]
            ax.plot(angles, wide["p10"], color="black", ls=":", lw=1,
                    label=f"width-{wide['width']} approximation")
            ax.plot(angles, wide["p90"], color="black", ls=":", lw=1)
        for i, curve in enumerate(data["curves"]):
            ax.plot(angles, curve, color=c, lw=0.9, alpha=0.8,
                    label=f"trained, n = {width}" if i == 0 else None)
        ax.scatter(res["train_angles"], res["train_targets"], color="red", zorder=5,
                   label="training points")
        ax.set_xlabel("γ  (x = (cos γ, sin γ))")
        ax.set_title(f"width {width}: {data['fraction_inside_band']:.0%} of points in band")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("f(x) after %d steps" % res["steps"])
    fig.suptitle("JGH Fig. 2 (reproduced): trained networks vs the t → ∞ Gaussian")
    fig.tight_layout()
    return _png(fig)


def figure_pca(res: dict) -> bytes:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    labels = np.array(res["labels"])
    sc = ax1.scatter(res["pc2"], res["pc3"], c=labels, cmap="tab10", s=12, vmin=-0.5,
                     vmax=9.5)
    fig.colorbar(sc, ax=ax1, ticks=range(10), label="digit")
    ax1.set_xlabel(r"$f^{(2)}(x)$ (2nd principal component)")
    ax1.set_ylabel(r"$f^{(3)}(x)$ (3rd principal component)")
    ax1.set_title(f"{len(labels)} MNIST digits on PCs 2 and 3 (depth {res['depth']})")
    ax2.plot(res["theory"]["t"], res["theory"]["g_norm"], color="black", lw=2,
             label=r"theory $0.5\,e^{-\lambda_2 t}$")
    for c, (width, data) in zip(_COLORS, res["widths"].items()):
        ax2.plot(data["t"], data["g_norm"], color=c,
                 label=rf"$\|g_t\|_{{p^{{in}}}}$, n = {width}")
        ax2.plot(data["t"], data["h_norm"], color=c, ls="--",
                 label=rf"$\|h_t\|_{{p^{{in}}}}$, n = {width}")
    ax2.set_xlabel("t (gradient steps, learning rate 1)")
    ax2.set_ylabel(r"$\|\cdot\|_{p^{in}}$" + f" (RMS over the {len(labels)} digits)")
    ax2.set_title(r"training toward $f^* = f_0 + 0.5\,f^{(2)}$")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle("JGH Fig. 3 (reproduced): NTK principal components on MNIST")
    fig.tight_layout()
    return _png(fig)


FIGURES = {"convergence": ("fig1_convergence.png", figure_convergence),
           "regression": ("fig2_regression.png", figure_regression),
           "pca": ("fig3_pca.png", figure_pca)}


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


def report(doc: dict[str, Any], timings: dict[str, Any] | None = None) -> str:
    """The markdown report: our numbers beside the paper's, and every choice made.

    ``doc`` is a run's ``results.json`` (its ``experiments``, the paper's numbers under
    ``paper``, and the run's settings); ``timings`` its ``timings.json`` (``seconds`` per
    experiment and the names ``reused`` from earlier runs), or None when it is unknown.
    """
    results, meta, paper = doc["experiments"], doc, doc["paper"]
    lines = [
        "# JGH reproduction (arXiv 1806.07572, §6)",
        "",
        f"Scale `{meta['scale']}` ({meta['scale_note']}), seed {meta['seed']}, device "
        f"{meta['device']}, ntkit {meta['version']}, torch {meta['torch']}.",
        "",
        "Shared conventions (the paper's): ReLU, σ_w = 1, β = 0.1, NTK parameterization, "
        "learning rate 1.0, cost ½·mean‖f − f*‖² over the training set, scalar output, "
        "full-batch gradient descent (no momentum, no minibatches).",
        "",
    ]
    if "convergence" in results:
        r = results["convergence"]
        lines += [
            "## Fig. 1: convergence of the NTK",
            "",
            "| quantity | ours | paper |", "|---|---|---|",
            f"| analytic Θ(x0, x0) | {r['theta_x0_x0']:.4f} | {paper['theta_x0_x0']} "
            "(JGH setting) |",
            f"| analytic Θ(x0, −x0) | {r['theta_x0_minus_x0']:.4f} | "
            f"{paper['theta_x0_minus_x0']} |",
            "",
            "Relative L2 deviation of the empirical Θ(x0, ·) on the circle from the analytic "
            "limit, mean ± standard deviation over initialisations:",
            "",
            f"| width | inits | t = 0 | t = {r['steps']} |", "|---|---|---|---|",
        ]
        for width, d in r["widths"].items():
            m, s = d["relative_deviation_mean"], d["relative_deviation_std"]
            lines.append(f"| {width} | {len(d['relative_deviation']['t0'])} | "
                         f"{m['t0']:.3f} ± {s['t0']:.3f} | {m['tT']:.3f} ± {s['tT']:.3f} |")
        lines += [
            "",
            "The paper shows this only as a figure (wider networks lie closer to the limit and "
            "move less during training); the deviation should fall like width^-1/2.",
            "",
            f"Choices the paper left open: {len(r['train_points'])} training points drawn "
            "from N(0, I₂) with the run's seed, targets f*(x) = x1·x2; Θ evaluated at "
            f"{len(r['angles'])} angles; empirical NTK by ntkit's structured path.",
            "",
        ]
    if "regression" in results:
        r = results["regression"]
        lines += [
            "## Fig. 2: kernel regression",
            "",
            "Training data: γ = −2.2, −1, 1, 2.2 with targets −0.4, −0.2, 0.3, 0.3 on the unit "
            "circle. The paper gives no points; these are read off its figure. The t → ∞ "
            "Gaussian (mean Θ_*x Θ⁻¹ y, covariance of the infinite ensemble, JGH §IV.3) is "
            "computed from the analytic kernels.",
            "",
            "| width | inits | points inside 10–90 band | curves entirely inside | max |mean − μ∞| "
            "| max |std − σ∞| |", "|---|---|---|---|---|---|",
        ]
        for width, d in r["widths"].items():
            lines.append(f"| {width} | {len(d['curves'])} | {d['fraction_inside_band']:.2f} | "
                         f"{d['fraction_curves_entirely_inside']:.2f} | "
                         f"{d['mean_distance_max']:.3f} | {d['std_distance_max']:.3f} |")
        lines += ["", "For a Gaussian, 80% of points lie inside the band; wider networks "
                  "should approach it (the paper shows this qualitatively).", ""]
        if "wide_approximation" in r:
            lines += [f"Also shown: the Gaussian from a width-{r['wide_approximation']['width']} "
                      "Monte Carlo kernel (2 initialisations), as the paper approximated it.", ""]
    if "pca" in results:
        r = results["pca"]
        lam = r["eigenvalues"]
        lines += [
            "## Fig. 3: principal components of the NTK on MNIST",
            "",
            f"Data: {r['indices']}, pixels / 255, no other preprocessing. Eigenvalues of "
            "Π = K/N by power iteration with deflation (the paper's method).",
            "",
            "| depth | λ1 | λ2 | λ3 |", "|---|---|---|---|",
            f"| paper | {paper['pca_eigenvalues'][0]} | {paper['pca_eigenvalues'][1]} | "
            f"{paper['pca_eigenvalues'][2]} |",
        ]
        for depth, d in r["eigenvalues_by_depth"].items():
            v = d["eigenvalues"]
            lines.append(f"| {depth} | {_fmt(v[0])} | {_fmt(v[1])} | {_fmt(v[2])} |")
        rel = [lam[i] / paper["pca_eigenvalues"][i] - 1 for i in range(3)]
        others = "; ".join(
            f"depth {dep}: λ1 {d['eigenvalues'][0] / paper['pca_eigenvalues'][0] - 1:+.1%}"
            for dep, d in r["eigenvalues_by_depth"].items() if int(dep) != r["depth"])
        lines += [
            "",
            f"The paper does not state the depth. Depth {r['depth']} is used: its λ1 is "
            f"{rel[0]:+.1%} from the paper's, λ2 {rel[1]:+.1%} and λ3 {rel[2]:+.1%} "
            f"(other depths, {others}). The power iteration agrees with a dense "
            "eigensolver to 1e-8 (`eigenvalues_eigh` in results.json).",
            "",
            "Training toward f* = f0 + 0.5·f^(2) (f0 the network at initialisation, f^(2) the "
            "second eigenfunction normalised to ‖f^(2)‖_{p_in} = 1): g_t is the part of "
            "f_t − f* along f^(2), h_t the rest. Theory: ‖g_t‖ = 0.5·e^{−λ2 t}.",
            "",
            "| width | fitted decay rate of ‖g_t‖ | λ2 | relative error | ‖h_t‖ at the end |",
            "|---|---|---|---|---|",
        ]
        for width, d in r["widths"].items():
            lines.append(f"| {width} | {_fmt(d['fitted_rate'])} | {_fmt(lam[1])} | "
                         f"{d['rate_relative_error']:+.1%} | {_fmt(d['h_norm'][-1], 3)} |")
        lines += [
            "",
            "At finite width the kernel itself moves during training, so ‖g_t‖ follows the "
            "theory early and then decays faster, the more so the narrower the network. The "
            "paper reports the same (\"smaller networks are faster at convergence\"); only its "
            "width-10000 network tracks 0.5·e^{−λ2 t} over the whole run. The fitted rate "
            "above covers every recorded step, so a longer run at a small width inflates it.",
            "",
        ]
    lines += [
        "## Choices the paper left open",
        "",
        "- Fig. 1: the number of training points (16, drawn from N(0, I₂) with the run's "
        "seed) and the evaluation grid on the circle; networks trained in float32 (the "
        "analytic limit in float64).",
        "- Fig. 2: the four training points (read off the paper's figure); the band is the "
        "Gaussian's mean ± 1.2816·σ (10th/90th percentiles), with the t → ∞ mean and "
        "covariance of the infinite ensemble from the analytic kernels; networks in float64.",
        "- Fig. 3: the depth (chosen above by λ1); the batch (the first 512 test digits); "
        "f^(2) is normalised to ‖f^(2)‖_{p_in} = 1 and its sign is that returned by the power "
        "iteration (start vectors seeded with 0, tolerance 1e-12 relative to λ1); f0 is the "
        "network's own output at initialisation; the number of training steps; the decay "
        "rate is a least-squares fit of log‖g_t‖ against t over every recorded step; "
        "networks trained in float32.",
        "- Initialisations: each network's seed is derived from `--seed`, the experiment, "
        "the width index and the initialisation index, so a rerun gives identical numbers.",
        "",
    ]
    lines += ["## Timing", "", "| experiment | seconds |", "|---|---|"]
    seconds = (timings or {}).get("seconds", {})
    reused = set((timings or {}).get("reused", ()))
    for name in results:
        sec = seconds.get(name)
        source = " (from a checkpoint of an earlier run)" if name in reused else ""
        lines.append(f"| {name} | {'unknown' if sec is None else f'{sec:.1f}'}{source} |")
    lines.append("")
    return "\n".join(lines)


RUN_FIELDS = ("scale", "scale_note", "seed", "device", "version", "torch", "paper",
              "experiments")


def render(doc: dict[str, Any], timings: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Every file of the report, by name: the figures of ``doc``'s experiments and report.md."""
    files = {FIGURES[name][0]: FIGURES[name][1](res) for name, res in doc["experiments"].items()}
    files["report.md"] = report(doc, timings).encode()
    return files


def load_run(out: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read and check a saved run's ``results.json`` (and ``timings.json`` if present).

    Raises ``ValueError`` naming the file and what is wrong with it.
    """
    path = Path(out) / "results.json"
    try:
        doc = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"Cannot read {str(path)!r}: {err.strerror or err}. Give the folder "
                         "of a finished `ntkit reproduce jgh20` run.") from err
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}).") from err
    if not isinstance(doc, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(doc).__name__}, not a run.")
    missing = [k for k in RUN_FIELDS if k not in doc]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the field(s) {missing}; it was not written by "
                         "this version of `ntkit reproduce jgh20`. Rerun the reproduction.")
    if not isinstance(doc["experiments"], dict) or not doc["experiments"]:
        raise ValueError(f"{str(path)!r} holds no experiments.")
    for name, res in doc["experiments"].items():
        wrong = problem(name, res)
        if wrong:
            raise ValueError(f"{str(path)!r}: experiment {name!r} is malformed: {wrong}.")
    timings = None
    try:
        timings = json.loads((Path(out) / "timings.json").read_text())
        if not isinstance(timings, dict) or not isinstance(timings.get("seconds"), dict):
            timings = None  # an older layout or damaged: the report says "unknown"
    except (OSError, ValueError):
        pass
    return doc, timings


def rebuild(out: str | Path, force: bool = False) -> list[str]:
    """Redraw report.md and the figures of the run saved in ``out``; return the files written.

    Nothing is recomputed. The same rules as the run apply: a file ntkit did not write is
    never overwritten.
    """
    doc, timings = load_run(out)
    run_dir = RunDir(out)
    names = [FIGURES[name][0] for name in doc["experiments"]] + ["report.md"]
    run_dir.check_targets(names, force=force)
    run_dir.check_writable([""])
    files = render(doc, timings)
    if not run_dir.has_manifest:
        run_dir.claim()
    for name, data in files.items():
        run_dir.write_bytes(name, data)
    return list(files)
