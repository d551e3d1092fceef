"""`ntkit reproduce jgh20`: the three experiments of JGH §6, end to end.

The quick scale runs once per session (module fixture) and every test reads its output.
Independent numbers: the paper's (Θ(x0, x0) = 0.2825, λ = 0.0457, 0.00108, 0.00078) and
neural-tangents' reference arrays in ``tests/reference/nt``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ntkit.cli import main
from ntkit.experiments import jgh20

REF = Path(__file__).parent / "reference" / "nt"
PAPER_LAMBDAS = [0.0457, 0.00108, 0.00078]


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("jgh20-quick")
    result = CliRunner().invoke(main, ["reproduce", "jgh20", "--scale", "quick", "--out",
                                       str(out), "--seed", "0", "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_file_and_field(quick):
    out, doc = quick
    for name in ("fig1_convergence.png", "fig2_regression.png", "fig3_pca.png",
                 "results.json", "report.md", "timings.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "fig1_convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["scale"] == "quick" and doc["seed"] == 0
    exp = doc["experiments"]
    assert set(exp) == {"convergence", "regression", "pca"}
    conv = exp["convergence"]
    for key in ("angles", "limit", "theta_x0_x0", "theta_x0_minus_x0", "train_points",
                "steps", "widths"):
        assert key in conv, key
    for d in conv["widths"].values():
        n_angles = len(conv["angles"])
        assert np.shape(d["curves"]["t0"])[1] == n_angles == np.shape(d["curves"]["tT"])[1]
        for key in ("relative_deviation", "relative_deviation_mean", "relative_deviation_std"):
            assert set(d[key]) == {"t0", "tT"}
    reg = exp["regression"]
    for key in ("angles", "train_angles", "train_targets", "limit", "widths"):
        assert key in reg, key
    assert set(reg["limit"]) >= {"mean", "std", "p10", "p50", "p90"}
    for d in reg["widths"].values():
        for key in ("curves", "fraction_inside_band", "mean_distance_max", "std_distance_max"):
            assert key in d, key
    pca = exp["pca"]
    for key in ("indices", "labels", "depth", "eigenvalues_by_depth", "eigenvalues", "pc2",
                "pc3", "theory", "widths"):
        assert key in pca, key
    assert set(pca["eigenvalues_by_depth"]) == {"4", "5", "6"}
    assert len(pca["labels"]) == len(pca["pc2"]) == len(pca["pc3"]) == 512
    for d in pca["widths"].values():
        assert len(d["t"]) == len(d["g_norm"]) == len(d["h_norm"])
    report = (out / "report.md").read_text()
    for needle in ("0.0457", "0.00108", "0.00078", "0.2825", "read off", "depth"):
        assert needle in report, needle


def test_analytic_theta_matches_paper_and_neural_tangents(quick):
    conv = quick[1]["experiments"]["convergence"]
    assert round(conv["theta_x0_x0"], 4) == 0.2825
    ref = np.load(REF / "jgh_relu_depth4_circle.npz")
    # x1[0] = (1, 0); x2 = 33 angles on [−π, π]: index 16 is γ = 0, index 0 is γ = −π
    assert conv["theta_x0_x0"] == pytest.approx(ref["ntk"][0, 16], rel=1e-7)
    assert conv["theta_x0_minus_x0"] == pytest.approx(ref["ntk"][0, 0], rel=1e-9)
    np.testing.assert_allclose(conv["limit"][0], ref["ntk"][0, 0], rtol=1e-9)


def test_eigenvalues_at_chosen_depth_match_paper(quick):
    pca = quick[1]["experiments"]["pca"]
    lam = pca["eigenvalues"]
    assert lam[0] == pytest.approx(PAPER_LAMBDAS[0], rel=0.05)
    assert lam[1] == pytest.approx(PAPER_LAMBDAS[1], rel=0.30)
    assert lam[2] == pytest.approx(PAPER_LAMBDAS[2], rel=0.30)
    for depth, d in pca["eigenvalues_by_depth"].items():
        # power iteration with deflation against the dense solver
        np.testing.assert_allclose(d["eigenvalues"], d["eigenvalues_eigh"], rtol=1e-8,
                                   err_msg=f"depth {depth}")
        assert all(d["converged"])
    # the chosen depth is the one closest to the paper's λ1
    err = {int(k): abs(v["eigenvalues"][0] / PAPER_LAMBDAS[0] - 1)
           for k, v in pca["eigenvalues_by_depth"].items()}
    assert min(err, key=err.get) == pca["depth"]


def test_widest_network_decays_at_lambda2(quick):
    pca = quick[1]["experiments"]["pca"]
    widest = max(pca["widths"], key=int)
    d = pca["widths"][widest]
    assert d["g_norm"][0] == pytest.approx(0.5, rel=1e-5)  # f_0 − f* = −0.5 f^(2)
    assert d["h_norm"][0] == pytest.approx(0.0, abs=1e-5)
    # refit independently of the experiment's own fit
    rate = -np.polyfit(d["t"], np.log(d["g_norm"]), 1)[0]
    assert rate == pytest.approx(d["fitted_rate"], rel=1e-9)
    assert rate == pytest.approx(pca["eigenvalues"][1], rel=0.20)


def test_limiting_gaussian_matches_neural_tangents(quick):
    reg = quick[1]["experiments"]["regression"]
    ref = np.load(REF / "ensemble_jgh_circle.npz")
    angles = np.asarray(reg["angles"])
    step = (len(angles) - 1) // 24  # the reference's 25 test angles are on our grid
    assert step * 24 == len(angles) - 1
    np.testing.assert_allclose(angles[::step], np.linspace(-np.pi, np.pi, 25), atol=1e-12)
    np.testing.assert_allclose(reg["limit"]["mean"][::step], ref["ntk_mean_tinf"][:, 0],
                               atol=1e-9)
    std = np.sqrt(np.clip(np.diag(ref["ntk_cov_tinf"]), 0, None))
    np.testing.assert_allclose(reg["limit"]["std"][::step], std, atol=1e-6)
    np.testing.assert_allclose(reg["limit"]["p90"], np.add(reg["limit"]["mean"],
                               1.2815515655446004 * np.asarray(reg["limit"]["std"])), atol=1e-12)


def test_trained_networks_fit_their_training_points(quick):
    reg = quick[1]["experiments"]["regression"]
    angles = np.asarray(reg["angles"])
    for width, d in reg["widths"].items():
        curves = np.asarray(d["curves"])
        for a, y in zip(reg["train_angles"], reg["train_targets"]):
            i = int(np.argmin(np.abs(angles - a)))
            # the nearest grid angle is within π/96 of the training angle; after 1000 steps
            # the networks interpolate, so they pass close to the target
            assert np.all(np.abs(curves[:, i] - y) < 0.05), (width, a)


def test_bad_out_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["reproduce", "jgh20", "--scale", "quick", "--out",
                                       str(blocker / "results"), "--no-progress"])
    elapsed = time.perf_counter() - start
    assert result.exit_code != 0
    assert "Cannot write results" in result.output and "--out" in result.output
    assert str(blocker / "results") in result.output
    assert elapsed < 5.0  # no experiment started


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: --device cuda is valid")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "jgh20", "--device", "cuda", "--out",
                                       str(tmp_path), "--no-progress"])
    assert result.exit_code != 0 and "CUDA" in result.output


def test_same_seed_same_numbers_and_wide_approximation():
    """A small regression config run twice gives identical JSON; it also exercises the
    paper-scale finite-width approximation of the limiting Gaussian."""
    cfg = dataclasses.replace(jgh20.SCALE_CONFIGS["quick"], reg_widths=(30,), reg_inits=2,
                              reg_steps=20, reg_grid=25, reg_wide_approx=64)

    def once(seed):
        res = jgh20.regression(cfg, seed, torch.device("cpu"), lambda it, desc: it)
        return json.dumps(res)

    first = once(3)
    assert first == once(3)
    assert first != once(4)
    res = json.loads(first)
    wide = res["wide_approximation"]
    assert wide["width"] == 64 and len(wide["mean"]) == 25
    # a width-64 kernel is close to, but not exactly, the analytic limit
    assert 0 < np.max(np.abs(np.subtract(wide["mean"], res["limit"]["mean"]))) < 0.3


def test_run_rejects_unknown_experiment_and_scale(tmp_path):
    with pytest.raises(ValueError, match="Unknown experiment"):
        jgh20.run(("fig4",), scale="quick", out=tmp_path)
    with pytest.raises(ValueError, match="scale must be one of"):
        jgh20.run(("pca",), scale="huge", out=tmp_path)


def test_interrupted_run_resumes_from_finished_experiments(tmp_path, monkeypatch):
    """A finished experiment is checkpointed; --resume reuses it (same numbers, not rerun)
    and recomputes anything whose seed or scale differs."""
    out = tmp_path / "run"
    args = ["reproduce", "jgh20", "--scale", "quick", "--experiment", "convergence",
            "--out", str(out), "--no-progress"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output + repr(first.exception)
    assert (out / "checkpoints" / "convergence.json").exists()
    before = json.loads((out / "results.json").read_text())

    # An interruption while the next experiment runs: the finished one survives.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(jgh20.RUNNERS, "regression", interrupted)
    broken = CliRunner().invoke(main, args[:5] + ["all"] + args[6:] + ["--resume"])
    assert broken.exit_code == 130 and "--resume" in broken.output

    def must_not_run(*args, **kwargs):
        raise AssertionError("a checkpointed experiment was recomputed")

    monkeypatch.setitem(jgh20.RUNNERS, "convergence", must_not_run)
    again = CliRunner().invoke(main, args + ["--resume"])
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert json.loads((out / "results.json").read_text()) == before
    assert "from a checkpoint" in (out / "report.md").read_text()

    # Another seed is another computation: the checkpoint does not apply.
    other = CliRunner().invoke(main, args + ["--resume", "--seed", "1"])
    assert isinstance(other.exception, AssertionError)
