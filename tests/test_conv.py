"""Convolutional layers and their analytic CNN-GP / CNTK kernels.

Checked against neural-tangents 0.6.5 (``reference/nt/conv``, float64), against the
finite networks (Monte Carlo over initialisations), and for layout choice, memory bounds,
symmetry, errors and devices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit as nk

F64 = torch.float64
REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "nt" / "conv"
if not REF.exists():  # a checkout with the references inside it
    REF = Path(__file__).resolve().parent / "reference" / "nt" / "conv"
CASES = json.loads((REF / "cases.json").read_text()) if REF.exists() else []


def _layer(name: str, p: dict) -> nk.Layer:
    """One neural-tangents layer of ``cases.json`` as an ntkit layer."""
    if name == "Conv":
        return nk.Conv(p["out_chan"], tuple(p["filter_shape"]), tuple(p.get("strides", (1, 1))),
                       p["padding"].lower(), p["W_std"], p["b_std"], p["parameterization"])
    if name == "Dense":
        return nk.Dense(p["out_dim"], p["W_std"], p["b_std"], p["parameterization"])
    if name == "AvgPool":
        # neural-tangents' AvgPool strides default to 1 (jax stax; the reference README's
        # "default: the window" is not what 0.6.5 computed: the window is 19% off), ntkit's to
        # the window (PyTorch's nn.AvgPool2d), so the default is spelt out.
        return nk.AvgPool(tuple(p["window_shape"]), tuple(p.get("strides", (1, 1))),
                          p.get("padding", "valid").lower())
    return {"Relu": nk.ReLU, "Erf": nk.Erf, "Flatten": nk.Flatten,
            "GlobalAvgPool": nk.GlobalAvgPool}[name]()


def _case_net(case: dict) -> nk.Layer:
    return nk.serial(*(_layer(name, p) for name, p in case["layers"]))


@pytest.mark.skipif(not CASES, reason="reference/nt/conv not available")
@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_matches_neural_tangents_conv_reference(case):
    data = np.load(REF / case["file"])
    # neural-tangents stores channels last (N, H, W, C); ntkit follows PyTorch (N, C, H, W).
    x1 = torch.from_numpy(data["x1"]).permute(0, 3, 1, 2)
    x2 = torch.from_numpy(data["x2"]).permute(0, 3, 1, 2)
    k = _case_net(case).kernel(x1, x2)
    for name in ("nngp", "ntk"):
        ref, got = data[name], k[name].numpy()
        assert got.dtype == np.float64 and got.shape == ref.shape
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= 1e-9, (name, err)
