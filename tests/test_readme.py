"""The README's example is code users copy first: run it, so it cannot rot."""

import re
from pathlib import Path

import torch

import ntkit as nk

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_shows_a_finite_width_gap(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    printed = float(capsys.readouterr().out.strip().split()[-1])
    assert namespace["theta"].shape == (100, 100)
    assert namespace["k"].ntk.dtype == torch.float64
    net, x, k = namespace["net"], namespace["x"], namespace["k"]
    # The printed number is the gap it claims to be: recomputed from an independently
    # computed empirical NTK (Jacobian contraction in blocks, not the structured per-layer
    # Grams) of the same module. 1e-10: both are float64 sums of ~1e6 terms.
    theta = nk.empirical_ntk(namespace["model"], x, method="jacobian", batch_size=25)
    gap = float((theta - k.ntk).norm() / k.ntk.norm())
    assert abs(printed - gap) <= 1e-10 * gap, (printed, gap)
    # Its size is the width-512 fluctuation of the NTK: E gap² = ‖std Θ‖² / ‖Θ∞‖² (plus an
    # O(1/width) bias), with the per-entry std estimated from 4 other initialisations.
    # One draw of the gap lies within a factor 3 of it (seen: 0.6-1.4x over seeds).
    mc = nk.monte_carlo_kernel(net, x, n_samples=4, seed=1, get="ntk")
    spread = float((mc.ntk_stderr * 2).norm() / k.ntk.norm())  # stderr * sqrt(4) = std
    assert spread / 3 < printed < 3 * spread, (printed, spread)


FRESH_MACHINE_COMMANDS = [
    'pip install torch==2.13.0 && pip install -e . && ntkit reproduce jgh20 --scale default',
    'pip install torch==2.13.0 && pip install -e ".[dev]" && python3 -m pytest -q --durations=15',
]


def test_readme_opens_with_its_two_fresh_machine_commands_and_documents_the_docs_build():
    text = README.read_text()
    first_shell = re.search(r"```bash\n(.*?)```", text, flags=re.DOTALL).group(1)
    commands = [line for line in first_shell.splitlines() if line and not line.startswith("#")]
    assert commands == FRESH_MACHINE_COMMANDS
    # the docs: one build command, and links into the site's sources that exist
    assert 'pip install -e ".[docs]" && mkdocs build --strict' in text
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (README.parent / target).exists(), target
    assert "docs/tutorial/index.md" in text


def test_readme_convolutional_example_runs_and_matches_the_jacobian_method(capsys):
    """The second example (a pooled CNN) runs after the first, as a reader would paste them,
    and prints the gap between the finite-channel NTK and the analytic CNTK."""
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 2, "README.md lost its convolutional example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    capsys.readouterr()
    exec(compile(blocks[1], str(README), "exec"), namespace)
    printed = float(capsys.readouterr().out.strip().split()[-1])
    x, k = namespace["x"], namespace["k"]
    assert x.shape == (20, 1, 14, 14) and k.ntk.shape == (20, 20)
    # Recomputed by an independent method (full Jacobian contraction, not the structured
    # per-layer patch Grams): both float64, so they agree far below the printed gap.
    theta = nk.empirical_ntk(namespace["model"], x, method="jacobian", batch_size=5)
    gap = float((theta - k.ntk).norm() / k.ntk.norm())
    assert abs(printed - gap) <= 1e-9 * gap, (printed, gap)
    # 256 channels: a finite-channel gap, well below 1 but not zero.
    assert 0.01 < gap < 0.5, gap
