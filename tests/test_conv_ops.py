"""The convolutional kernel primitives (ntkit.layers._conv_ops) against independent numbers.

Two independent references:

* explicit construction from random feature maps: the patches of a convolution are taken
  with ``torch.nn.functional.conv{1,2}d`` and one-hot filters (one output channel per
  (channel, window offset)) on inputs padded by ``F.pad`` with the TF/neural-tangents
  padding computed here from its definition; the covariance of patches is then an
  ``einsum``. Average pooling goes through ``F.avg_pool{1,2}d`` on the feature maps.
* naive Python loops over output positions and window offsets, straight from the formulas
  in the module's docstrings, for arbitrary (not rank-structured) tensors.

All in float64, so agreement is to rounding (1e-12 relative); float32 is compared with
float64 at float32 rounding.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ntkit.layers._conv_ops import avg_pool, mean_spatial, output_size, pair_diagonal, window_sum

DT = torch.float64


def _pads(n: int, k: int, s: int, padding: str) -> tuple[int, int, int]:
    """(n_out, before, after), from the TF/XLA definition (independent of the module)."""
    if padding == "valid":
        return (n - k) // s + 1, 0, 0
    n_out = math.ceil(n / s)
    total = max((n_out - 1) * s + k - n, 0)
    return n_out, total // 2, total - total // 2


def _pad_maps(x: torch.Tensor, ks, ss, padding: str) -> torch.Tensor:
    """Pad the trailing spatial axes of feature maps ``(N, C, *S)``."""
    pad = []
    for n, k, s in reversed(list(zip(x.shape[2:], ks, ss))):
        _, before, after = _pads(n, k, s, padding)
        pad += [before, after]
    if padding == "circular":
        return F.pad(x, pad, mode="circular")
    return F.pad(x, pad)


def _patches(x: torch.Tensor, ks, ss, padding: str) -> torch.Tensor:
    """``(N, C * prod(k), *S_out)``: every (channel, offset) of every output window, by a
    convolution with one-hot filters."""
    c, d = x.shape[1], len(ks)
    n_off = math.prod(ks)
    eye = torch.eye(c * n_off, dtype=x.dtype).reshape(c * n_off, c, *ks)
    conv = F.conv2d if d == 2 else F.conv1d
    return conv(_pad_maps(x, ks, ss, padding), eye, stride=tuple(ss))


def _pair_cov(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N1, N2, *S, *S)``: ``Σ_c a[i, c, p] b[j, c, q]`` (unnormalised)."""
    d = a.dim() - 2
    sp1 = "hw"[:d]
    sp2 = "uv"[:d]
    return torch.einsum(f"ic{sp1},jc{sp2}->ij{sp1}{sp2}", a, b)


def _naive_window_sum(t: torch.Tensor, ks, ss, padding: str, pairs: bool) -> torch.Tensor:
    d = len(ks)
    spatial = t.shape[t.dim() - (2 * d if pairs else d):][:d]
    geo = [_pads(n, k, s, padding) for n, k, s in zip(spatial, ks, ss)]
    outs = [g[0] for g in geo]
    batch = t.shape[:t.dim() - (2 * d if pairs else d)]
    out = torch.zeros(*batch, *outs, *(outs if pairs else []), dtype=t.dtype)

    def src(p, o):
        idx = []
        for dim in range(d):
            i = ss[dim] * p[dim] + o[dim] - geo[dim][1]
            if padding == "circular":
                i %= spatial[dim]
            elif not 0 <= i < spatial[dim]:
                return None
            idx.append(i)
        return tuple(idx)

    offsets = list(itertools.product(*[range(k) for k in ks]))
    positions = list(itertools.product(*[range(n) for n in outs]))
    for p in positions:
        if pairs:
            for q in positions:
                for o in offsets:
                    i, j = src(p, o), src(q, o)
                    if i is not None and j is not None:
                        out[(..., *p, *q)] += t[(..., *i, *j)]
        else:
            for o in offsets:
                i = src(p, o)
                if i is not None:
                    out[(..., *p)] += t[(..., *i)]
    return out


def _naive_avg_pool(t: torch.Tensor, ks, ss, padding: str, pairs: bool) -> torch.Tensor:
    """Pool each spatial axis on its own: a box sum per axis, by loops."""
    d = len(ks)
    n_sp = 2 * d if pairs else d
    for a in range(n_sp):
        axis = t.dim() - n_sp + a
        k, s = ks[a % d], ss[a % d]
        n = t.shape[axis]
        n_out, before, _ = _pads(n, k, s, padding)
        slices = []
        for p in range(n_out):
            acc = torch.zeros_like(t.select(axis, 0))
            for o in range(k):
                i = s * p + o - before
                if padding == "circular":
                    i %= n
                elif not 0 <= i < n:
                    continue
                acc = acc + t.select(axis, i)
            slices.append(acc)
        t = torch.stack(slices, dim=axis)
    return t / math.prod(ks) ** (2 if pairs else 1)


CASES_2D = [
    ((3, 3), (1, 1), "same"), ((3, 3), (1, 1), "valid"), ((3, 3), (1, 1), "circular"),
    ((2, 2), (1, 1), "same"), ((2, 3), (2, 1), "same"), ((3, 2), (2, 2), "valid"),
    ((4, 4), (3, 2), "same"), ((3, 3), (2, 2), "circular"), ((1, 1), (1, 1), "same"),
    ((5, 3), (1, 1), "same"),   # window taller than wide (and larger than pad)
]
CASES_1D = [((3,), (1,), "same"), ((4,), (1,), "same"), ((3,), (2,), "valid"),
            ((2,), (3,), "circular"), ((5,), (2,), "same"), ((3,), (1,), "circular")]


@pytest.mark.parametrize("ks,ss,padding", CASES_2D + CASES_1D)
def test_window_sum_equals_patch_covariance(ks, ss, padding):
    """pairs=True: the window sum of the pixel-pair Gram of feature maps is the Gram of
    their conv patches; pairs=False is its same-pixel diagonal."""
    g = torch.Generator().manual_seed(1)
    spatial = (5, 6)[:len(ks)] if len(ks) == 2 else (7,)
    x1 = torch.randn(2, 3, *spatial, generator=g, dtype=DT)
    x2 = torch.randn(3, 3, *spatial, generator=g, dtype=DT)
    t = _pair_cov(x1, x2)                               # (2, 3, *S, *S)
    want = _pair_cov(_patches(x1, ks, ss, padding), _patches(x2, ks, ss, padding))
    got = window_sum(t, ks, ss, padding, pairs=True)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    d = len(ks)
    t_diag = pair_diagonal(t, ndim=d)
    got_diag = window_sum(t_diag, ks, ss, padding, pairs=False)
    torch.testing.assert_close(got_diag, pair_diagonal(want, ndim=d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ks,ss,padding", CASES_2D[:6] + CASES_1D[:4])
def test_window_sum_equals_naive_loops(ks, ss, padding):
    """Arbitrary tensors (not Grams), batch axes of any count, against the formula."""
    g = torch.Generator().manual_seed(2)
    d = len(ks)
    spatial = (4, 5)[:d] if d == 2 else (6,)
    t = torch.randn(2, *spatial, *spatial, generator=g, dtype=DT)
    torch.testing.assert_close(window_sum(t, ks, ss, padding, pairs=True),
                               _naive_window_sum(t, ks, ss, padding, True), rtol=1e-12, atol=1e-12)
    t = torch.randn(3, 2, *spatial, generator=g, dtype=DT)
    torch.testing.assert_close(window_sum(t, ks, ss, padding, pairs=False),
                               _naive_window_sum(t, ks, ss, padding, False), rtol=1e-12, atol=1e-12)
    t = torch.randn(*spatial, generator=g, dtype=DT)   # no batch axes at all
    torch.testing.assert_close(window_sum(t, ks, ss, padding, pairs=False),
                               _naive_window_sum(t, ks, ss, padding, False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ks,ss,padding", [((2, 2), None, "valid"), ((2, 2), None, "same"),
                                           ((3, 2), (2, 1), "same"), ((3, 3), (1, 1), "valid"),
                                           ((3,), (2,), "same"), ((2,), None, "valid")])
def test_avg_pool_equals_pooled_feature_covariance(ks, ss, padding):
    """pairs=True: pooling the pixel-pair Gram is the Gram of pooled feature maps
    (F.avg_pool with count_include_pad=True on the padded maps); pairs=False is plain
    pooling; both also against loops."""
    g = torch.Generator().manual_seed(3)
    d = len(ks)
    spatial = (5, 6) if d == 2 else (7,)
    stride = ks if ss is None else ss
    x1 = torch.randn(2, 2, *spatial, generator=g, dtype=DT)
    x2 = torch.randn(3, 2, *spatial, generator=g, dtype=DT)
    pool = F.avg_pool2d if d == 2 else F.avg_pool1d

    def pooled(x):
        return pool(_pad_maps(x, ks, stride, padding), ks, stride)

    want = _pair_cov(pooled(x1), pooled(x2))
    got = avg_pool(_pair_cov(x1, x2), ks, ss, padding, pairs=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    t = torch.randn(4, 3, *spatial, generator=g, dtype=DT)
    torch.testing.assert_close(avg_pool(t, ks, ss, padding), pooled(t), rtol=1e-12, atol=1e-12)
    t = torch.randn(2, *spatial, *spatial, generator=g, dtype=DT)
    torch.testing.assert_close(avg_pool(t, ks, ss, padding, pairs=True),
                               _naive_avg_pool(t, ks, stride, padding, True), rtol=1e-12,
                               atol=1e-12)


def test_output_size_follows_tf_same():
    # ceil(n/s) outputs, total pad max((out-1)s + k - n, 0), the extra one after.
    assert output_size(5, 2, 1, "same") == (5, 0)
    assert output_size(5, 3, 1, "same") == (5, 1)
    assert output_size(4, 3, 2, "same") == (2, 0)
    assert output_size(5, 4, 1, "same") == (5, 1)
    assert output_size(7, 3, 2, "valid") == (3, 0)
    assert output_size(6, 3, 2, "circular") == (3, 0)
    with pytest.raises(ValueError, match="does not fit"):
        output_size(2, 3, 1, "valid")


def test_pair_diagonal_and_mean_spatial():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 3, 4, 5, 4, 5, generator=g, dtype=DT)
    d = pair_diagonal(t)
    assert d.shape == (2, 3, 4, 5)
    for h, w in itertools.product(range(4), range(5)):
        assert torch.equal(d[..., h, w], t[..., h, w, h, w])
    t1 = torch.randn(3, 6, 6, generator=g, dtype=DT)
    assert torch.equal(pair_diagonal(t1, ndim=1), torch.diagonal(t1, 0, -2, -1))
    torch.testing.assert_close(mean_spatial(t, pairs=True), t.reshape(2, 3, -1).mean(-1))
    torch.testing.assert_close(mean_spatial(d), d.reshape(2, 3, -1).mean(-1))
    torch.testing.assert_close(mean_spatial(t1, pairs=True, ndim=1), t1.mean((-2, -1)))
    with pytest.raises(ValueError, match="same spatial shape"):
        pair_diagonal(torch.zeros(4, 5, 5, 4))


def test_float32_autograd_and_noncontiguous_inputs():
    g = torch.Generator().manual_seed(5)
    t64 = torch.randn(3, 2, 5, 4, 5, 4, generator=g, dtype=DT)
    want = window_sum(t64, (3, 3), 1, "same", pairs=True)
    got = window_sum(t64.float(), (3, 3), 1, "same", pairs=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # a non-contiguous batch view (a transposed tile) gives the same numbers
    tt = t64.transpose(0, 1)
    torch.testing.assert_close(window_sum(tt, (3, 3), 1, "same", pairs=True),
                               want.transpose(0, 1), rtol=0, atol=0)
    # gradients: window_sum and avg_pool are linear; gradcheck on small tensors
    x = torch.randn(2, 4, 3, 4, 3, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: window_sum(a, (3, 2), (2, 1), "circular", True),
                                    (x,))
    assert torch.autograd.gradcheck(lambda a: avg_pool(a, (2, 2), None, "same", True), (x,))
    y = torch.randn(2, 5, 4, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: window_sum(a, (3, 3), 1, "same"), (y,))


def test_bad_input_is_refused_clearly():
    t = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="padding must be one of"):
        window_sum(t, (3, 3), 1, "reflect")
    with pytest.raises(ValueError, match="kernel_size"):
        window_sum(t, (3, 0), 1, "same")
    with pytest.raises(ValueError, match="stride"):
        window_sum(t, (3, 3), (1, 1, 1), "same")
    with pytest.raises(ValueError, match="trailing spatial axes"):
        window_sum(torch.zeros(4, 4), (3, 3), 1, "same", pairs=True)
    with pytest.raises(TypeError, match="floating-point"):
        window_sum(torch.zeros(2, 4, 4, dtype=torch.int64), (3, 3))


@pytest.mark.parametrize("ks,ss,padding", [((3, 3), (1, 1), "same"), ((3, 1), (1, 1), "same"),
                                           ((1, 1), (1, 1), "same"), ((3, 3), (2, 1), "valid"),
                                           ((3,), (1,), "same"), ((2, 2), (1, 1), "circular")])
@pytest.mark.parametrize("pairs", [False, True])
def test_fused_scale_bias_add(ks, ss, padding, pairs):
    """scale * Σ + bias + add equals the unfused arithmetic bit for bit (in-place passes in
    the same order, no fused multiply-add); tensor scales keep their gradient."""
    g = torch.Generator().manual_seed(6)
    d = len(ks)
    spatial = (5, 4)[:d] if d == 2 else (6,)
    t = torch.randn(2, 3, *spatial, *(spatial if pairs else ()), generator=g, dtype=DT)
    plain = window_sum(t, ks, ss, padding, pairs)
    add = torch.randn(plain.shape, generator=g, dtype=DT)
    for kw, want in [({"scale": 0.3}, plain * 0.3), ({"bias": 0.7}, plain + 0.7),
                     ({"scale": 0.3, "bias": 0.7}, plain * 0.3 + 0.7),
                     ({"scale": 0.3, "add": add}, plain * 0.3 + add),
                     ({"scale": 0.3, "bias": 0.7, "add": add}, plain * 0.3 + 0.7 + add),
                     ({"add": add[:1]}, plain + add[:1])]:   # a broadcast add
        got = window_sum(t, ks, ss, padding, pairs, **kw)
        assert torch.equal(got, want)
        assert got.data_ptr() != t.data_ptr()
    w = torch.tensor(0.3, dtype=DT, requires_grad=True)
    out = window_sum(t, ks, ss, padding, pairs, scale=w, bias=0.1)
    out.sum().backward()
    torch.testing.assert_close(w.grad, plain.sum())


@pytest.mark.parametrize("pairs", [False, True])
def test_entries_do_not_depend_on_the_batch_shape(pairs):
    """Every entry is rounded the same wherever it sits (vector lanes or scalar tails): a
    tile's slice equals the window sum of that slice alone, bit for bit. The evaluator's
    exact equalities (diagonal mode = the full kernel's diagonal, any tiling) rely on it."""
    g = torch.Generator().manual_seed(7)
    sp = (5, 7)
    t = torch.randn(3, 4, *sp, *(sp if pairs else ()), generator=g, dtype=DT)
    add = torch.randn(t.shape, generator=g, dtype=DT)
    for ks, pad in [((3, 3), "same"), ((3, 2), "circular"), ((2, 2), "valid")]:
        whole = window_sum(t, ks, 1, pad, pairs, scale=0.37, bias=0.11,
                           add=add if pad == "same" else None)
        part = window_sum(t[1:2, 2], ks, 1, pad, pairs, scale=0.37, bias=0.11,
                          add=add[1:2, 2] if pad == "same" else None)
        assert torch.equal(whole[1:2, 2], part)


@pytest.mark.parametrize("pairs", [False, True])
def test_chunked_passes_equal_whole_passes(pairs, monkeypatch):
    """Large CPU tensors are summed chunk by chunk along the batch axes (cache-sized); the
    result is bit for bit that of one piece, for chunks that do not divide the batch."""
    from ntkit.layers import _conv_ops

    g = torch.Generator().manual_seed(8)
    sp = (6, 5)
    t = torch.randn(3, 5, *sp, *(sp if pairs else ()), generator=g, dtype=DT)
    whole = window_sum(t, (3, 3), 1, "same", pairs, scale=0.5, bias=0.25)
    item = math.prod(t.shape[2:]) * 8
    monkeypatch.setattr(_conv_ops, "CHUNK_BYTES", 4 * item)   # chunks of 4 of 15 items
    chunked = window_sum(t, (3, 3), 1, "same", pairs, scale=0.5, bias=0.25)
    assert torch.equal(chunked, whole)
    monkeypatch.setattr(_conv_ops, "CHUNK_BYTES", 1)          # one item per chunk
    assert torch.equal(window_sum(t.transpose(0, 1), (3, 3), 1, "same", pairs),
                       window_sum(t, (3, 3), 1, "same", pairs).transpose(0, 1))
