"""`ntkit reproduce jgh20` and `ntkit report`: the three experiments of JGH §6, end to end.

The quick scale runs once per session (fixture) and every test reads its output; tests of
the output folder's rules copy that folder and replace the experiments by counting stubs
that return its numbers, so no test computes an experiment twice.
Independent numbers: the paper's (Θ(x0, x0) = 0.2825, λ = 0.0457, 0.00108, 0.00078) and
neural-tangents' reference arrays in ``tests/reference/nt``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ntkit.cli import main
from ntkit.experiments import jgh20, report

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
    """A calibration, not an independent check of the kernel: the paper does not state the
    depth, and the experiment picks the depth whose λ1 is closest to the paper's (asserted
    below), so λ1 within 5% is partly by construction; λ2/λ3 within 30% are the paper's
    figure-reading precision. The depth-5 MNIST kernel itself is pinned to 1e-9 relative
    (1e-7 where x = x') by neural-tangents' ``jgh_relu_depth5_mnist`` reference
    (``test_analytic.py``), and the power iteration by the dense solver here."""
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


def test_decay_along_f2_approaches_lambda2_with_width(quick):
    """Training along f^(2) from f0: ‖g_t‖ starts at 0.5 and, in the infinite-width limit,
    decays at λ2. At width n the initial empirical kernel is off the limit by O(n^-1/2)
    (measured constant about 2: early-rate errors +21% at n = 100 and −6% at n = 1000), and
    the kernel moves during training, more so the narrower the network.

    The early rate is a 2-point log slope between t = 0 and the first recorded step (an
    estimate independent of the experiment's least-squares fit over the whole run); it must
    lie within 4/√n of λ2. The whole-run fitted rate is not compared with λ2 at a fixed
    tolerance (it grows with the run's length: +56% at width 1000 over the default scale's
    1000 steps), only its error must fall with width.
    """
    pca = quick[1]["experiments"]["pca"]
    lam2 = pca["eigenvalues"][1]
    early, fitted = {}, {}
    for width, d in pca["widths"].items():
        assert d["g_norm"][0] == pytest.approx(0.5, rel=1e-5)  # f_0 − f* = −0.5 f^(2)
        assert d["h_norm"][0] == pytest.approx(0.0, abs=1e-5)
        t1, g0, g1 = d["t"][1], d["g_norm"][0], d["g_norm"][1]
        early[int(width)] = abs(np.log(g0 / g1) / t1 / lam2 - 1)
        fitted[int(width)] = abs(d["rate_relative_error"])
        assert early[int(width)] < 4 / np.sqrt(int(width)), (width, early[int(width)])
    widths = sorted(early)
    assert len(widths) >= 2
    for narrow, wide in zip(widths, widths[1:]):
        assert early[wide] < early[narrow] and fitted[wide] < fitted[narrow], (early, fitted)


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
    # the band's edges from the reference's mean and std and scipy's normal quantiles
    from scipy.stats import norm

    for key, q in (("p10", 0.1), ("p90", 0.9)):
        np.testing.assert_allclose(reg["limit"][key][::step],
                                   ref["ntk_mean_tinf"][:, 0] + norm.ppf(q) * std, atol=1e-6)


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


def test_bad_out_fails_before_any_work(tmp_path, stub_runners):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["reproduce", "jgh20", "--scale", "quick", "--out",
                                       str(blocker / "results"), "--no-progress"])
    assert result.exit_code == 1
    assert "Cannot write results" in result.output and "--out" in result.output
    assert str(blocker / "results") in result.output
    assert stub_runners == []  # no experiment started


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


def test_interrupted_run_resumes_from_finished_experiments(tmp_path, monkeypatch,
                                                            stub_runners):
    """A finished experiment is checkpointed; --resume reuses it (same numbers, not rerun),
    and an interruption loses only the experiment in progress."""
    out = tmp_path / "run"
    args = [*ARGS, "--out", out]
    first = invoke(*args, "--experiment", "convergence")
    assert first.exit_code == 0, first.output + repr(first.exception)
    assert stub_runners == ["convergence"]
    assert (out / "checkpoints" / "convergence.json").exists()
    before = json.loads((out / "results.json").read_text())

    # An interruption while the next experiment runs: the finished one survives.
    def interrupted(*args, **kwargs):
        stub_runners.append("regression (interrupted)")
        raise KeyboardInterrupt

    monkeypatch.setitem(jgh20.RUNNERS, "regression", interrupted)
    broken = invoke(*args, "--resume")
    assert broken.exit_code == 130 and "--resume" in broken.output
    assert stub_runners == ["convergence", "regression (interrupted)"]
    assert json.loads((out / "results.json").read_text()) == before

    again = invoke(*args, "--experiment", "convergence", "--resume")
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert stub_runners == ["convergence", "regression (interrupted)"]  # nothing recomputed
    assert json.loads((out / "results.json").read_text()) == before
    assert "from a checkpoint" in (out / "report.md").read_text()


# ------------------------------------------------------------------ the output folder's rules
ARGS = ["reproduce", "jgh20", "--scale", "quick", "--no-progress"]


@pytest.fixture
def stub_runners(quick, monkeypatch):
    """Replace the experiments by stubs that return the quick run's numbers and count calls."""
    calls = []

    def stub(name):
        def runner(*args, **kwargs):
            calls.append(name)
            return copy.deepcopy(quick[1]["experiments"][name])
        return runner

    for name in jgh20.EXPERIMENTS:
        monkeypatch.setitem(jgh20.RUNNERS, name, stub(name))
    return calls


@pytest.fixture
def done(quick, tmp_path):
    """A copy of the finished quick run folder."""
    out = tmp_path / "done"
    shutil.copytree(quick[0], out)
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_refuses_a_folder_ntkit_did_not_create(tmp_path, stub_runners):
    """The user's own report.md survives: a non-empty folder without ntkit's manifest is
    refused before any work, and even --force never overwrites a file ntkit did not write."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "report.md").write_text("# my own notes\n")
    result = invoke(*ARGS, "--experiment", "regression", "--out", out)
    assert result.exit_code == 1 and stub_runners == []
    msg = " ".join(result.output.split())
    assert "not created by ntkit" in msg and "report.md" in msg
    assert "--out" in msg and "--force" in msg
    assert (out / "report.md").read_text() == "# my own notes\n"

    forced = invoke(*ARGS, "--experiment", "regression", "--out", out, "--force")
    assert forced.exit_code == 1 and stub_runners == []
    assert "report.md" in forced.output and "never overwrites" in forced.output
    assert (out / "report.md").read_text() == "# my own notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]  # nothing written


def test_force_writes_beside_unrelated_files_and_leaves_them_alone(tmp_path, stub_runners):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke(*ARGS, "--experiment", "regression", "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert stub_runners == ["regression"]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / ".ntkit-run.json").exists() and (out / "report.md").exists()


def test_a_report_edited_in_a_run_folder_is_not_overwritten(done, stub_runners):
    edited = (done / "report.md").read_text() + "\nMy comments on the run.\n"
    (done / "report.md").write_text(edited)
    for extra in ([], ["--force"], ["--resume"]):
        result = invoke(*ARGS, "--out", done, *extra)
        assert result.exit_code == 1 and "report.md" in result.output, extra
    assert stub_runners == []
    assert (done / "report.md").read_text() == edited


def test_one_experiment_into_a_complete_folder_keeps_the_others(done, stub_runners):
    """Rerunning only Fig. 2 into a complete folder recomputes Fig. 2 and keeps Figs. 1 and 3
    in results.json and report.md (they used to vanish)."""
    before_json = (done / "results.json").read_text()
    before_report = (done / "report.md").read_text()
    result = invoke(*ARGS, "--experiment", "regression", "--out", done)
    assert result.exit_code == 0, result.output
    assert stub_runners == ["regression"]
    assert (done / "results.json").read_text() == before_json  # same numbers, all three
    after = (done / "report.md").read_text()
    assert after.count("\n") == before_report.count("\n")
    for section in ("## Fig. 1", "## Fig. 2", "## Fig. 3"):
        assert section in after, section


def test_another_seed_does_not_silently_replace_a_run(done, stub_runners):
    before = (done / "results.json").read_text()
    result = invoke(*ARGS, "--experiment", "regression", "--out", done, "--seed", "1")
    assert result.exit_code == 1 and stub_runners == []
    assert "seed 0" in result.output and "--force" in result.output
    assert (done / "results.json").read_text() == before
    forced = invoke(*ARGS, "--experiment", "regression", "--out", done, "--seed", "1",
                    "--force")
    assert forced.exit_code == 0, forced.output
    doc = json.loads((done / "results.json").read_text())
    assert doc["seed"] == 1 and list(doc["experiments"]) == ["regression"]
    assert not (done / "fig1_convergence.png").exists()  # the replaced run's own figures


def _good_key(done):
    return json.loads((done / "checkpoints" / "regression.json").read_text())["key"]


@pytest.mark.parametrize("content, reason", [
    ("[1, 2, 3]", "JSON list, not an object"),
    ('{"key": KEY, "seconds": 1.0}', "lacks the field(s) ['results']"),
    ('{"key": KEY, "seconds": 1.0, "results": {}}', "results lack the field(s) ['angles'"),
    ('{"key": KEY, "seconds": 1.0, "results": {"wid', "not valid JSON"),
])
def test_malformed_checkpoint_is_reported_kept_and_recomputed(done, stub_runners, content,
                                                              reason):
    bad = done / "checkpoints" / "regression.json"
    content = content.replace("KEY", json.dumps(_good_key(done)))
    bad.write_text(content)
    complete = json.loads((done / "results.json").read_text())
    result = invoke(*ARGS, "--out", done, "--resume")
    assert result.exit_code == 0, result.output + repr(result.exception)
    msg = " ".join(result.output.split())
    assert str(bad) in msg and "malformed" in msg and reason in msg
    assert stub_runners == ["regression"]  # the other two came from their checkpoints
    assert (done / "checkpoints" / "regression.json.damaged").read_text() == content
    assert json.loads((done / "results.json").read_text()) == complete


@pytest.mark.parametrize("how", ["a file in the way", "read-only"])
def test_unwritable_checkpoints_fail_before_any_work(done, stub_runners, how):
    checkpoints = done / "checkpoints"
    if how == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        checkpoints.chmod(0o555)
    else:
        shutil.rmtree(checkpoints)
        checkpoints.write_text("not a folder")
    try:
        result = invoke(*ARGS, "--experiment", "pca", "--out", done)
    finally:
        if how == "read-only":
            checkpoints.chmod(0o755)
    assert result.exit_code == 1 and stub_runners == []
    assert "Cannot write results" in result.output and str(checkpoints) in result.output


def test_report_command_rebuilds_report_and_figures_without_computing(done, quick,
                                                                       stub_runners):
    names = ["report.md", "fig1_convergence.png", "fig2_regression.png", "fig3_pca.png"]
    for name in names:
        (done / name).unlink()
    result = invoke("report", done)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert stub_runners == []
    for name in names:  # same inputs, same matplotlib: the same bytes
        assert (done / name).read_bytes() == (quick[0] / name).read_bytes(), name


def test_report_is_a_view_over_results_json(done, tmp_path):
    """The report takes the paper's numbers from results.json, not from the runner module."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(report))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "jgh20" not in imported
    doc = json.loads((done / "results.json").read_text())
    doc["paper"]["theta_x0_x0"] = 0.1234
    assert "| 0.1234 (JGH setting) |" in report.report(doc)
    missing = invoke("report", tmp_path / "nothing-here")
    assert missing.exit_code == 1 and "results.json" in missing.output
