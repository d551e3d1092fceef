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
REF = Path(__file__).resolve().parent / "reference" / "nt" / "conv"  # see its README.md
CASES = json.loads((REF / "cases.json").read_text())


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


# ------------------------------------------------------------------------------ helpers
def _images(n: int, c: int = 2, h: int = 5, w: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, dtype=F64, generator=g)


def _with_awkward_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` followed by a duplicate, a negated copy, an all-zero image and a ×100 copy."""
    return torch.cat([x, x[:1], -x[1:2], torch.zeros_like(x[:1]), 100 * x[2:3]])


class _Spy(nk.Layer):
    """Records the layout and tile shape of every state that passes (identity map)."""

    def __init__(self):
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def kernel_map(self, k):
        self.seen.append((k.layout, tuple(k.cov.shape)))
        return k


def _pooled(c: int = 4, spy: nk.Layer | None = None) -> nk.Layer:
    layers = [nk.Conv(c, 3, 1, "same", 1.3, 0.2), nk.ReLU(), nk.AvgPool(2, 1),
              nk.Conv(c, 2, 1, "valid", 1.2, 0.1), nk.Erf(), nk.GlobalAvgPool(),
              nk.Dense(1, 1.1, 0.1)]
    if spy is not None:
        layers.insert(1, spy)
    return nk.serial(*layers)


# ----------------------------------------------------------------------- layout choice
def test_layout_is_chosen_backwards_from_the_readout():
    """Flatten and nothing pooling: per-pixel covariances (H·W per pair); any pooling
    anywhere after a conv (even in one branch of a residual block): every pixel pair."""
    x = _images(3)
    cases = {
        "pixels": lambda spy: nk.serial(nk.Conv(4), spy, nk.ReLU(), nk.Conv(4), nk.Flatten(),
                                        nk.Dense(1)),
        "pixel_pairs": lambda spy: nk.serial(nk.Conv(4), spy, nk.ReLU(), nk.AvgPool(2),
                                             nk.Flatten(), nk.Dense(1)),
        "pixel_pairs ": lambda spy: nk.serial(
            nk.Conv(4), spy, nk.FanOut(2),
            nk.parallel(nk.serial(nk.ReLU(), nk.Conv(4), nk.AvgPool(5), nk.Flatten()),
                        nk.serial(nk.Conv(4, 5, 1, "valid"), nk.Flatten())),
            nk.FanInSum(), nk.Dense(1)),
    }
    for layout, make in cases.items():
        spy = _Spy()
        make(spy).kernel(x)
        assert {lay for lay, _ in spy.seen} == {layout.strip()}, layout
    assert nk.serial(nk.Conv(4), nk.Flatten(), nk.Dense(1)).required_layout("dense") == "pixels"
    assert nk.serial(nk.Conv(4), nk.GlobalAvgPool()).required_layout("dense") == "pixel_pairs"
    assert nk.mlp(2, 4).required_layout("dense") == "dense"


def test_flatten_on_pixel_pairs_equals_the_pixels_layout():
    """The two layouts give the same Flatten kernel: AvgPool(1) (the identity) forces every
    pixel pair through the same network."""
    x = _with_awkward_rows(_images(4, seed=1))
    a = nk.serial(nk.Conv(4, 3, 2, "same", 1.3, 0.2), nk.ReLU(), nk.Conv(4, 3, 1, "circular"),
                  nk.GELU(), nk.Flatten(), nk.Dense(1, 1.0, 0.1))
    b = nk.serial(*a.layers[:4], nk.AvgPool(1), *a.layers[4:])
    for k1, k2 in ((a.kernel(x), b.kernel(x)), (a.kernel(x, diagonal=True),
                                                  b.kernel(x, diagonal=True))):
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(k1[name], k2[name], rtol=1e-13, atol=0)


# -------------------------------------------------------------- tiles, symmetry, memory
@pytest.mark.parametrize("pool", ["flatten", "gap"])
def test_tiles_symmetry_and_diagonal_are_exact(pool):
    """Any tiling gives the same kernel (to rounding of the input Grams); x2=None is exactly
    symmetric; diagonal=True equals the full kernel's diagonal bit for bit; duplicated rows
    get equal kernels."""
    net = nk.cnn(2, 4, pool=pool, W_std=1.3, b_std=0.2)
    x = _with_awkward_rows(_images(6, seed=2))
    y = _images(5, seed=3)
    full = net.kernel(x)
    per_pair = 16 * 3 * 8 * (25 if pool == "flatten" else 625)
    small = net.kernel(x, memory_budget=8 * per_pair)  # tiles of 2x2 pairs
    rect_full, rect_small = net.kernel(x, y), net.kernel(x, y, memory_budget=3 * per_pair)
    diag = net.kernel(x, diagonal=True, memory_budget=3 * per_pair)
    for name in ("nngp", "ntk"):
        k = full[name]
        assert torch.equal(k, k.T)
        assert torch.equal(small[name], small[name].T)
        assert torch.equal(diag[name], k.diagonal())
        torch.testing.assert_close(small[name], k, rtol=1e-13, atol=0)
        torch.testing.assert_close(rect_small[name], rect_full[name], rtol=1e-13, atol=0)
        # x[6] duplicates x[0]: equal rows to rounding (tiles evaluate them at different
        # positions of vectorised loops), and k(x, x') = k(x, x) where x' = x.
        torch.testing.assert_close(k[0], k[6], rtol=1e-14, atol=0)
        torch.testing.assert_close(k[0, 6], k[0, 0], rtol=1e-14, atol=0)


def test_tiles_are_sized_in_pairs_times_pixels():
    """No state ever holds more than the budget's pairs: with a budget for 8 pairs of 5x5
    pixel-pair tiles, 12 images are computed in tiles of at most 2 x 2 images (and the
    diagonal pass that records the pooled variances in chunks of at most 4 images), never
    N² (H·W)² at once."""
    spy = _Spy()
    x = _images(12)
    per_pair = 16 * 3 * 8 * 625
    k = _pooled(spy=spy).kernel(x, memory_budget=8 * per_pair)
    ref = _pooled().kernel(x)
    torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-13, atol=0)
    pairs = [shape for _, shape in spy.seen if len(shape) == 6]
    singles = [shape for _, shape in spy.seen if len(shape) == 5]
    assert pairs and singles and len(pairs) + len(singles) == len(spy.seen)
    assert max(s[0] * s[1] for s in pairs) == 4 and all(s[2:] == (5,) * 4 for s in pairs)
    assert max(s[0] for s in singles) == 4 and all(s[1:] == (5,) * 4 for s in singles)


def test_a_budget_below_one_pair_says_what_to_change(monkeypatch):
    x = _images(3, h=14, w=14)
    with pytest.raises(ValueError, match=r"memory_budget=1000 bytes cannot hold one tile.*"
                                         r"14x14.*'pixel_pairs'.*Flatten"):
        nk.cnn(2, 4, pool="gap").kernel(x, memory_budget=1000)
    with pytest.raises(ValueError, match="'pixels' layout"):
        nk.cnn(2, 4, pool="flatten").kernel(x, memory_budget=1000)
    # Without a budget: the device's free memory (here pretended to be 1 MB).
    import ntkit.layers.evaluate as evaluate

    monkeypatch.setattr(evaluate, "available_memory", lambda device: 10**6)
    with pytest.raises(ValueError, match=r"only 976.6 KiB is free on cpu: one pair .* 14x14 .*'pixel_pairs'.*"
                                         r"Use a machine \(or GPU\) with 14.1 MiB free"):
        nk.cnn(2, 4, pool="gap").kernel(x)


# ------------------------------------------------------------------ sequences, shorthands
def test_sequences_equal_images_of_height_one():
    """(N, C, L) with Conv(k) is (N, C, 1, L) with Conv((1, k)): an independent check of the
    1-D path (its window sums, pooling, and pixel diagonals)."""
    x = _images(4, c=3, h=1, w=9, seed=4)
    seq = nk.serial(nk.Conv(5, 3, 2, "same", 1.2, 0.1), nk.ReLU(), nk.AvgPool(2, 1, "same"),
                    nk.Conv(5, 2, 1, "circular"), nk.Erf(), nk.GlobalAvgPool(), nk.Dense(1))
    img = nk.serial(nk.Conv(5, (1, 3), (1, 2), "same", 1.2, 0.1), nk.ReLU(),
                    nk.AvgPool((1, 2), (1, 1), "same"), nk.Conv(5, (1, 2), 1, "circular"),
                    nk.Erf(), nk.GlobalAvgPool(), nk.Dense(1))
    for a, b in ((seq.kernel(x[:, :, 0]), img.kernel(x)),):
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-13, atol=0)
    out = seq.module(in_shape=(3, 9), seed=0, dtype=F64)(x[:, :, 0])
    assert out.shape == (4, 1)


def test_shorthands():
    net = nk.cnn(3, 16, pool="gap", W_std=1.5, b_std=0.1)
    assert [type(layer).__name__ for layer in net.layers] == (
        ["Conv", "ReLU"] * 3 + ["GlobalAvgPool", "Dense"])
    for depth, convs in ((5, 4), (7, 6), (10, 9)):
        m = nk.myrtle(depth, 8)
        assert sum(isinstance(layer, nk.Conv) for layer in m.layers) == convs
        assert sum(isinstance(layer, nk.AvgPool) for layer in m.layers) == 2
    x = _images(2, c=3, h=8, w=8)
    k = nk.myrtle(5, 8).kernel(x)
    assert k.ntk.shape == (2, 2) and bool(torch.isfinite(k.ntk).all())
    out = nk.myrtle(5, 8).module(in_shape=(3, 8, 8), seed=0, dtype=F64)(x)
    assert out.shape == (2, 1)
    with pytest.raises(ValueError, match="myrtle depth must be one of"):
        nk.myrtle(6)


# ---------------------------------------------------------------------------- modules
def test_modules_are_torch_conv_and_pool_layers_initialised_as_declared():
    net = nk.serial(nk.Conv(300, 3, 1, "same", 2.0, 0.5, "standard"), nk.ReLU(),
                    nk.AvgPool(2), nk.Conv(200, 3, 2, "valid", 1.5, 0.3), nk.Flatten(),
                    nk.Dense(1))
    m = net.module(in_shape=(40, 9, 9), seed=0, dtype=F64)
    conv1, _, pool, conv2, flat, _ = list(m)
    assert isinstance(conv1, torch.nn.Conv2d) and isinstance(pool, torch.nn.AvgPool2d)
    # standard: W ~ N(0, W_std²/(C_in k²)), b ~ N(0, b_std²); ntk: W, b ~ N(0, 1)
    assert conv1.weight.std().item() == pytest.approx(2.0 / math.sqrt(40 * 9), rel=0.02)
    assert conv1.bias.std().item() == pytest.approx(0.5, rel=0.15)
    assert conv2.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert conv2.weight_scale == pytest.approx(1.5 / math.sqrt(300 * 9))
    x = _images(2, c=40, h=9, w=9)
    assert m(x).shape == (2, 1)
    assert m[:3](x).shape == (2, 300, 4, 4) and m[:4](x).shape == (2, 200, 1, 1)
    # Same seed, same parameters; the global RNG is not touched.
    state = torch.random.get_rng_state()
    m2 = net.module(in_shape=(40, 9, 9), seed=0, dtype=F64)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_same_padding_splits_like_tensorflow():
    """Even windows and strides pad the extra pixel after (TensorFlow, neural-tangents):
    a 2x2 "same" conv of stride 1 on a one-hot image sees the hot pixel at the top-left of
    the output window; circular padding wraps the last column to the front."""
    x = torch.zeros(1, 1, 4, 4, dtype=F64)
    x[0, 0, 3, 3] = 1.0
    m = nk.Conv(1, 2, 1, "same", parameterization="standard").module(
        in_shape=(1, 4, 4), seed=0, dtype=F64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
        m.bias.zero_()
        out = m(x)[0, 0]
    assert out.shape == (4, 4) and out[3, 3] == 1.0 and out[2, 2] == 4.0
    mc = nk.Conv(1, 3, 1, "circular", parameterization="standard").module(
        in_shape=(1, 4, 4), seed=0, dtype=F64)
    with torch.no_grad():
        mc.weight.fill_(1.0)
        mc.bias.zero_()
        assert mc(x)[0, 0, 0, 0] == 1.0  # (3, 3) wraps to the window of (0, 0)


# --------------------------------------------------------------------------- Monte Carlo
def _unit_images(n, c, h, w, seed):
    x = _images(n, c, h, w, seed)
    return x / x.flatten(1).norm(dim=1)[:, None, None, None] * math.sqrt(c * h * w)


MC_NETS = {
    # Flatten readout in the standard parameterization: the width after Flatten is C·H·W.
    "flatten_standard": lambda n: nk.cnn(2, n, pool="flatten", W_std=1.3, b_std=0.2,
                                         parameterization="standard"),
    # Strided valid and circular convs, "same" average pooling, Erf, Flatten.
    "strided_pooled": lambda n: nk.serial(
        nk.Conv(n, 2, 2, "valid", 1.3, 0.2), nk.ReLU(), nk.Conv(n, 3, 1, "circular", 1.2, 0.1),
        nk.Erf(), nk.AvgPool(2, 1, "same"), nk.Flatten(), nk.Dense(1, 1.1, 0.1)),
    # A residual block (an even "same" window: the extra padded pixel after) and global
    # pooling.
    "residual_gap": lambda n: nk.serial(
        nk.Conv(n, 3, 1, "same", 1.2, 0.1), nk.FanOut(2),
        nk.parallel(nk.serial(nk.ReLU(), nk.Conv(n, 2, 1, "same", 1.0, 0.1)), nk.Identity()),
        nk.FanInSum(), nk.ReLU(), nk.GlobalAvgPool(), nk.Dense(1, 1.0, 0.1)),
    # LayerNorm over channels after ReLU (nonzero per-pixel means), in the pixel-pair layout.
    "layernorm_pooled": lambda n: nk.serial(
        nk.Conv(n, 3, 1, "same", 1.3, 0.2), nk.ReLU(), nk.LayerNorm(), nk.AvgPool(2, 1),
        nk.Conv(n, 2, 1, "valid", 1.2, 0.1), nk.Erf(), nk.GlobalAvgPool(), nk.Dense(1)),
}


@pytest.mark.parametrize("net", sorted(MC_NETS))
def test_finite_cnns_match_their_analytic_kernels(net):
    """Averages of 60 finite networks with 128 channels: z-scores of the Monte Carlo means
    below 4.5 (the O(1/channels) finite-width bias is under a standard error). Power: a
    kernel off by 15% is rejected (wrong window normalisation, padding or fan-in convention
    moves these kernels by far more)."""
    x = _unit_images(3, 2, 4, 4, seed=11)
    mc = nk.monte_carlo_kernel(MC_NETS[net](128), x, n_samples=60, seed=5, method="jacobian")
    exact = MC_NETS[net](128).kernel(x)
    for name in ("nngp", "ntk"):
        stderr = getattr(mc, name + "_stderr")
        z = (mc[name] - exact[name]) / stderr
        assert float(z.abs().max()) < 4.5, (name, z)
        z_wrong = (mc[name] - 1.15 * exact[name]) / stderr
        assert float(z_wrong.abs().max()) > 4.5, name


def test_finite_cnn_kernels_approach_the_analytic_ones_at_rate_channels_to_minus_half():
    """The root-mean-square deviation of one finite network's kernels from the analytic ones
    (over 12 initialisations; all its entries) falls like channels^-1/2 (its variance is
    O(1/n), the bias O(1/n²) in it): the fitted log-log slope over 16..1024 channels lies
    in [-0.65, -0.35] (measured: -0.44 to -0.51 for the flatten and pooled nets)."""
    x = _unit_images(4, 2, 4, 4, seed=3)
    widths = [16, 64, 256, 1024]
    samples = 12
    errors: dict[str, list[float]] = {"nngp": [], "ntk": []}
    for width in widths:
        net = _pooled(width)
        exact = net.kernel(x)
        mc = nk.monte_carlo_kernel(net, x, n_samples=samples, seed=width, method="jacobian")
        for name, errs in errors.items():
            stderr, mean = getattr(mc, name + "_stderr"), mc[name]
            sq = (stderr ** 2 * (samples - 1) + (mean - exact[name]) ** 2).sum()
            errs.append(float(sq.sqrt() / exact[name].norm()))
    for name, errs in errors.items():
        slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
        assert -0.65 <= slope <= -0.35, (name, slope, errs)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_are_refused_with_the_fix():
    x = _images(3)
    net = nk.cnn(2, 4)
    with pytest.raises(ValueError, match=r"must have shape \(N, d\), \(N, C, L\) or "
                                         r"\(N, C, H, W\); got shape \(3, 2, 5, 5, 1\)"):
        net.kernel(x[..., None])
    with pytest.raises(ValueError, match=r"x1 has rows of shape \(2, 5, 5\) but x2 has "
                                         r"\(2, 4, 5\)"):
        net.kernel(x, x[:, :, :4])
    with pytest.raises(ValueError, match=r"needs per-pixel covariances.*\(N, d\) rows"):
        net.kernel(x.flatten(1))
    with pytest.raises(ValueError, match=r"Put nk.Flatten\(\) or nk.GlobalAvgPool\(\) before"):
        nk.serial(nk.Conv(4), nk.ReLU(), nk.Dense(1)).kernel(x)
    with pytest.raises(ValueError, match=r"Put nk.Flatten\(\) or nk.GlobalAvgPool\(\) before"):
        nk.serial(nk.Conv(4), nk.ReLU(), nk.Dense(1)).module(in_shape=(2, 5, 5))
    with pytest.raises(ValueError, match="'valid' window of size 7 does not fit a spatial "
                                         "size 5; use padding='same'"):
        nk.serial(nk.Conv(4, 7, padding="valid"), nk.Flatten(), nk.Dense(1)).kernel(x)
    with pytest.raises(ValueError, match=r"2-d kernel_size \(3, 3\) but receives sequences"):
        nk.serial(nk.Conv(4, (3, 3)), nk.Flatten(), nk.Dense(1)).kernel(x[:, :, 0])
    with pytest.raises(ValueError, match=r"ends with per-pixel covariances.*end it with "
                                         r"nk.Flatten\(\) or nk.GlobalAvgPool\(\)"):
        nk.serial(nk.Conv(4), nk.ReLU()).kernel(x)
    with pytest.raises(ValueError, match="images .* or sequences .* it receives flat"):
        nk.cnn(2, 4).module(in_dim=50)
    with pytest.raises(ValueError, match="exactly one of in_dim"):
        nk.cnn(2, 4).module(in_dim=3, in_shape=(2, 5, 5))
    m = nk.cnn(2, 4).module(in_shape=(2, 5, 5), seed=0, dtype=F64)
    with pytest.raises(ValueError, match=r"expects inputs \(N, C, H, W\) with C = 2 channels; "
                                         r"got shape \(3, 3, 5, 5\).*in_shape"):
        m(_images(3, c=3))
    with pytest.raises(ValueError, match="padding must be one of"):
        nk.Conv(4, padding="full")
    with pytest.raises(ValueError, match="kernel_size must be an int or a tuple"):
        nk.Conv(4, (3, 3, 3))
    # Dense networks keep working with in_dim, and refuse image inputs clearly.
    with pytest.raises(ValueError, match=r"needs flat features.*\(2, 5, 5\).*Put nk.Flatten"):
        nk.mlp(2, 4).kernel(x)


# ------------------------------------------------------------------------- dtype, device
def test_float32_and_gradients_in_W_std():
    x = _images(3)
    k64 = nk.cnn(2, 4, pool="gap").kernel(x)
    k32 = nk.cnn(2, 4, pool="gap").kernel(x, dtype=torch.float32)
    assert k32.ntk.dtype == torch.float32
    torch.testing.assert_close(k32.ntk.double(), k64.ntk, rtol=1e-5, atol=1e-6)
    w = torch.tensor(1.3, dtype=F64, requires_grad=True)
    net = nk.serial(nk.Conv(4, 3, 1, "same", w, 0.1), nk.ReLU(), nk.AvgPool(2),
                    nk.Flatten(), nk.Dense(1))
    (grad,) = torch.autograd.grad(net.kernel(x).ntk.sum(), w)
    eps = 1e-6
    up = nk.serial(nk.Conv(4, 3, 1, "same", 1.3 + eps, 0.1), *net.layers[1:]).kernel(x).ntk
    down = nk.serial(nk.Conv(4, 3, 1, "same", 1.3 - eps, 0.1), *net.layers[1:]).kernel(x).ntk
    assert float(grad) == pytest.approx(float((up - down).sum() / (2 * eps)), rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_follow_the_inputs():
    """On a GPU: the same kernels as on the CPU (to rounding), on the inputs' device, with
    the exact symmetry and diagonal."""
    x = _with_awkward_rows(_images(5))
    for net in (nk.cnn(2, 4, pool="flatten", b_std=0.1), _pooled(), nk.myrtle(5, 4)):
        cpu = net.kernel(x)
        gpu = net.kernel(x.cuda())
        gpu_diag = net.kernel(x.cuda(), diagonal=True)
        for name in ("nngp", "ntk"):
            assert gpu[name].device.type == "cuda"
            torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-12, atol=1e-12)
            assert torch.equal(gpu[name], gpu[name].T)
            assert torch.equal(gpu_diag[name], gpu[name].diagonal())


# ------------------------------------------------------------------------- fused dual
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own internals
def test_fused_relu_dual_matches_the_eager_one(monkeypatch):
    """Big tiles use one compiled loop for the ReLU-family dual (NTKIT_FUSE=auto above
    fused.THRESHOLD entries); forced here on a small pooled CNN with awkward rows (equal,
    negated, zero and scaled images: correlations of exactly ±1): the same kernels to
    rounding, still exactly symmetric. Without a compiler it warns and stays eager."""
    import ntkit.layers.activations.fused as fused

    x = _with_awkward_rows(_images(4, seed=6))
    net = nk.serial(nk.Conv(4, 3, 1, "same", 1.3, 0.2), nk.LeakyReLU(0.1), nk.AvgPool(2, 1),
                    nk.Flatten(), nk.Dense(1, 1.0, 0.1))
    monkeypatch.setenv("NTKIT_FUSE", "0")
    eager = net.kernel(x)
    monkeypatch.setenv("NTKIT_FUSE", "1")
    fast = net.kernel(x)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(fast[name], eager[name], rtol=1e-13, atol=1e-300)
        assert torch.equal(fast[name], fast[name].T)
    # A compiler failure: one warning, then the eager dual.
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused.torch, "compile", _broken_compile)
    with pytest.warns(RuntimeWarning, match="fused .* unavailable"):
        again = net.kernel(x)
    assert fused._failed
    monkeypatch.setattr(fused, "_failed", False)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(again[name], eager[name], rtol=0, atol=0)


def _broken_compile(*args, **kwargs):
    raise RuntimeError("no C++ compiler")


def test_pooling_in_branches_replays_each_branch_its_own_variances():
    """Each pooling layer reads its own recorded variances, in network order, whatever the
    branches: k(x, x) of a tile of pairs (x2 given, so no diagonal is copied) equals the
    diagonal pass, with different pools in the two branches of a residual block."""
    x = _images(4, seed=8)
    net = nk.serial(
        nk.Conv(4, 3, 1, "same", 1.3, 0.2), nk.FanOut(2),
        nk.parallel(nk.serial(nk.ReLU(), nk.AvgPool(2, 1, "same"), nk.Conv(4, 3)),
                    nk.serial(nk.Erf(), nk.AvgPool(3, 1, "same"), nk.Conv(4, 1))),
        nk.FanInSum(), nk.ReLU(), nk.GlobalAvgPool(), nk.Dense(1, 1.0, 0.1))
    full, diag = net.kernel(x, x.clone()), net.kernel(x, diagonal=True)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(full[name].diagonal(), diag[name], rtol=1e-13, atol=0)


def test_overflowing_images_are_named():
    x = _images(4)
    x[2] *= 1e200
    with pytest.raises(ValueError, match=r"not finite .* rows \[2\] of x1"):
        nk.cnn(2, 4, pool="gap").kernel(x)
