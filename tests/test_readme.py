"""The README's example is code users copy first: run it, so it cannot rot."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_shows_a_finite_width_gap(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    printed = float(capsys.readouterr().out.strip().split()[-1])
    # Width 512, depth 4: the relative finite-width gap is O(width^-1/2), small but nonzero.
    assert 1e-3 < printed < 0.5
    assert namespace["theta"].shape == (100, 100)
    assert namespace["k"].ntk.dtype == torch.float64
