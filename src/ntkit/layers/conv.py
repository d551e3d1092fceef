"""Convolutional layers: ``Conv``, ``AvgPool``, ``GlobalAvgPool``, ``Flatten``, and the
``cnn``/``myrtle`` shorthands.

Inputs follow PyTorch: images ``(N, C, H, W)``, sequences ``(N, C, L)``. One class serves
both: a layer's dimension comes from its ``kernel_size`` (a tuple of 2 or 1 ints) or, for an
int ``kernel_size``, from the inputs it receives.

Kernel maps. A convolution's infinite-width covariance is a *window sum* over the same
offset ``o`` in both images (Novak et al. 2019, Arora et al. 2019, neural-tangents):

    Σ'(p, q) = W_std² / |w| · Σ_o Σ(s·p + o, s·q + o) + b_std²        (|w| = k_h · k_w)
    Θ'(p, q) = Σ'(p, q) + W_std² / |w| · Σ_o Θ(s·p + o, s·q + o)       (NTK parameterization)
    Θ'(p, q) = C_in · Σ_o Σ(...) + 1 + W_std² / |w| · Σ_o Θ(...)       (standard)

with ``Σ`` zero outside the image for ``padding="same"``, wrapped for ``"circular"``. Since
the same offset enters both images, a convolution maps the pixel-diagonal covariance
(``p = q``, the ``"pixels"`` layout) to itself, which is all a ``Flatten`` readout needs;
pooling averages different pixels, so everything upstream of an ``AvgPool`` or
``GlobalAvgPool`` needs every pixel pair (``"pixel_pairs"``). Each layer says which it needs
(:meth:`~ntkit.layers.base.Layer.required_layout`) and the evaluator picks the cheapest
layout that serves the whole network; docstrings of :mod:`ntkit.layers.state` give the costs.

The numerical primitives (separable window sums, pooling, pixel diagonals) live in
:mod:`ntkit.layers._conv_ops`; this module owns the layers' conventions and their modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_positive_int, check_scale
from ._conv_ops import PADDINGS, avg_pool, mean_spatial, output_size, pair_diagonal, window_sum
from .base import Layer, is_branches
from .combinators import Serial
from .dense import PARAMETERIZATIONS, Dense, _ScaledLayerKey, _value
from .state import DENSE, PIXEL_PAIRS, PIXELS, PairKernel

__all__ = ["AvgPool", "Conv", "Flatten", "GlobalAvgPool", "cnn", "myrtle"]

POOL_PADDINGS = ("valid", "same")


# ----------------------------------------------------------------------------- helpers
def _sizes(value: int | tuple[int, ...], name: str) -> int | tuple[int, ...]:
    """An int, or a tuple of 1 or 2 positive ints (the spatial dimensions)."""
    if isinstance(value, (tuple, list)):
        value = tuple(value)
        if len(value) not in (1, 2):
            raise ValueError(f"{name} must be an int or a tuple of 1 (sequences) or 2 (images) "
                             f"ints; got {value!r}.")
        return tuple(check_positive_int(v, name) for v in value)
    return check_positive_int(value, name)


def _resolve(value: int | tuple[int, ...], d: int, name: str, layer: Layer) -> tuple[int, ...]:
    """``value`` as ``d`` ints; a tuple of the wrong length is refused, naming the layer."""
    if isinstance(value, int):
        return (value,) * d
    if len(value) != d:
        kind = {1: "sequences (N, C, L)", 2: "images (N, C, H, W)"}[d]
        raise ValueError(f"{layer!r} has a {len(value)}-d {name} {value!r} but receives {kind}; "
                         f"give {name} as an int or a tuple of {d}.")
    return value


def _spatial_input(in_shape: Any, layer: Layer) -> tuple[int, tuple[int, ...]]:
    """``(C, S)`` of an image shape ``torch.Size([C, *S])``; refuses flat features."""
    if is_branches(in_shape):
        raise ValueError(f"{layer!r} received several branches; combine them with FanInSum() "
                         "first.")
    if not isinstance(in_shape, torch.Size) or len(in_shape) not in (2, 3):
        raise ValueError(
            f"{layer!r} needs images (N, C, H, W) or sequences (N, C, L); it receives flat "
            f"features of size {in_shape!r}. Build the module with in_shape=(C, H, W) rather "
            "than in_dim, and put convolutions and pooling before Flatten()/GlobalAvgPool().")
    return in_shape[0], tuple(in_shape[1:])


def _spatial_layout(layout: Any, layer: Layer) -> None:
    if is_branches(layout):
        raise ValueError(f"{layer!r} received several branches; combine them with FanInSum() "
                         "first.")
    if layout == DENSE:
        raise ValueError(
            f"{layer!r} needs per-pixel covariances of images (N, C, H, W) or sequences "
            "(N, C, L), but it receives one covariance per pair of flat inputs: either the "
            "inputs are (N, d) rows (pass them with their channel and spatial axes) or a "
            "Flatten()/GlobalAvgPool()/Dense before it already removed the spatial axes.")


def _per_pixel(k: PairKernel, t: Any, fn, first: bool) -> Any:
    """``fn`` (a map of the trailing spatial axes) applied to a per-pixel quantity shaped
    like a marginal of ``k`` (a variance or a mean): in the ``"pixel_pairs"`` layout the
    first image's marginals end with ``d`` unit axes, squeezed before and restored after.
    Floats (the exact-zero mean) and ``None`` pass through."""
    if not isinstance(t, torch.Tensor):
        return t
    if k.layout == PIXEL_PAIRS and first:
        d = k.image_ndim
        out = fn(t.reshape(t.shape[:t.dim() - d]))
        return out.reshape(out.shape + (1,) * d)
    return fn(t)


def _pool_state(k: PairKernel, fn, ndim_out: int, layer: Layer) -> dict[str, Any]:
    """``cov``, ``var1``, ``var2`` and ``ntk`` after a pooling map ``fn`` of pixel pairs
    (``ndim_out`` image axes out: 0 for global pooling).

    In diagonal mode ``cov`` is each image's self pixel-pair covariance, so the pooled one
    is the new self covariance; its pixel diagonal (the pooled variances) goes on the tape.
    A tile of pairs replays them (see :class:`~ntkit.layers.state.VarianceTape`).
    """
    cov = fn(k.cov)
    ntk = None if k.ntk is None else (k.ntk if k.ntk.dim() == 0 else fn(k.ntk))
    if k.diagonal:
        if k.tape is not None and k.tape.recording:
            k.tape.record(pair_diagonal(cov, ndim_out) if ndim_out else cov)
        return {"cov": cov, "var1": cov, "var2": cov, "ntk": ntk}
    if k.tape is None:
        raise ValueError(
            f"{layer!r} in a tile of image pairs needs the pooled variances of each image, "
            "which the evaluator records in a diagonal pass (PairKernel.tape); this state "
            "has none. Compute kernels through net.kernel(...) or layers.evaluate.")
    cov, var1, var2 = k.tape.replay(cov, ndim_out)
    return {"cov": cov, "var1": var1, "var2": var2, "ntk": ntk}


def _same_padding(n: int, k: int, s: int, padding: str) -> tuple[int, int]:
    """``(before, after)`` padding of one spatial dimension (TensorFlow's split)."""
    n_out, before = output_size(n, k, s, padding)
    total = max((n_out - 1) * s + k - n, 0) if padding != "valid" else 0
    return before, total - before


def _pad(x: torch.Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...],
         padding: str) -> torch.Tensor:
    """Pad the trailing spatial axes of ``x`` as the kernel map assumes (zeros or wrapped)."""
    if padding == "valid":
        return x
    amounts: list[int] = []
    for n, k, s in reversed(list(zip(x.shape[2:], kernel_size, stride))):
        amounts += _same_padding(n, k, s, padding)
    if not any(amounts):
        return x
    return F.pad(x, amounts, mode="circular" if padding == "circular" else "constant")


def _check_images(x: torch.Tensor, module: torch.nn.Module, channels: int, d: int) -> None:
    kind = "(N, C, H, W)" if d == 2 else "(N, C, L)"
    if x.dim() != d + 2 or x.shape[1] != channels:
        raise ValueError(
            f"{type(module).__name__} expects inputs {kind} with C = {channels} channels; got "
            f"shape {tuple(x.shape)}. Build the network with net.module(in_shape=...) matching "
            "the data's (C, H, W) (or (C, L)).")


# ------------------------------------------------------------------------------- Conv
@dataclass(frozen=True, init=False, repr=False, eq=False)
class Conv(_ScaledLayerKey, Layer):
    """A convolution with ``out_channels`` filters of ``kernel_size`` over images or sequences.

    * ``parameterization="ntk"``: ``W, b ~ N(0, 1)``,
      ``z = W_std / sqrt(C_in · |w|) · (W ⋆ a) + b_std · b`` (``|w|`` pixels per window);
    * ``"standard"``: ``W ~ N(0, W_std² / (C_in · |w|))``, ``b ~ N(0, b_std²)``,
      ``z = W ⋆ a + b``; the NTK then depends on the declared channel counts.

    ``padding``: ``"same"`` (zeros; output size ``ceil(n / stride)``; TensorFlow's split,
    the extra pixel after), ``"valid"`` (no padding) or ``"circular"`` (wrapped, sizes of
    ``"same"``). ``kernel_size`` and ``stride`` are ints or tuples of 2 (images) or 1
    (sequences) ints. Kernel map: see :mod:`ntkit.layers.conv`; it keeps the incoming layout
    (``"pixels"`` or ``"pixel_pairs"``), and its output is Gaussian at infinite width.
    ``W_std``/``b_std`` may be 0-d tensors with ``requires_grad`` (kernel learning), as for
    :class:`~ntkit.layers.dense.Dense`.
    """

    features: int
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...]
    padding: str
    W_std: float | torch.Tensor
    b_std: float | torch.Tensor
    parameterization: str

    def __init__(self, out_channels: int, kernel_size: int | Sequence[int] = 3,
                 stride: int | Sequence[int] = 1, padding: str = "same", W_std: float = 1.0,
                 b_std: float = 0.0, parameterization: str = "ntk"):
        set_ = object.__setattr__
        set_(self, "features", check_positive_int(out_channels, "out_channels"))
        set_(self, "kernel_size", _sizes(kernel_size, "kernel_size"))
        set_(self, "stride", _sizes(stride, "stride"))
        if (isinstance(self.kernel_size, tuple) and isinstance(self.stride, tuple)
                and len(self.kernel_size) != len(self.stride)):
            raise ValueError(f"Conv: kernel_size {self.kernel_size} and stride {self.stride} "
                             "have different numbers of spatial dimensions.")
        set_(self, "padding", check_choice(padding.lower() if isinstance(padding, str)
                                           else padding, "padding", PADDINGS))
        set_(self, "W_std", check_scale(W_std, "W_std"))
        set_(self, "b_std", check_scale(b_std, "b_std"))
        set_(self, "parameterization", check_choice(parameterization, "parameterization",
                                                    PARAMETERIZATIONS))

    _KEY_FIELDS = ("features", "kernel_size", "stride", "padding", "W_std", "b_std",
                   "parameterization")

    def _window(self, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (_resolve(self.kernel_size, d, "kernel_size", self),
                _resolve(self.stride, d, "stride", self))

    # ------------------------------------------------------------- evaluator's questions
    def out_dim(self, in_dim):
        channels, spatial = _spatial_input(in_dim, self)
        ks, st = self._window(len(spatial))
        return torch.Size((self.features,) + tuple(
            output_size(n, k, s, self.padding)[0] for n, k, s in zip(spatial, ks, st)))

    def kernel_layout(self, layout):
        _spatial_layout(layout, self)
        return layout

    def required_layout(self, layout):
        # Same offsets in both images: pixel-diagonal entries come from pixel-diagonal ones.
        return PIXEL_PAIRS if layout == PIXEL_PAIRS else PIXELS

    def kernel_map(self, k: PairKernel) -> PairKernel:
        _spatial_layout(k.layout if isinstance(k, PairKernel) else tuple(k), self)
        d = k.image_ndim
        ks, st = self._window(d)
        pairs = k.layout == PIXEL_PAIRS
        size = math.prod(ks)
        w2, b2 = self.W_std ** 2, self.b_std ** 2
        scale = w2 / size

        def total(t: torch.Tensor) -> torch.Tensor:
            return window_sum(t, ks, st, self.padding, pairs)

        def pixel_total(t: torch.Tensor) -> torch.Tensor:  # per-pixel variances (small)
            return window_sum(t, ks, st, self.padding, False) * scale + b2

        # Few passes over the tile, in place where autograd allows: these maps are
        # memory-bound, one fresh tensor per kernel and layer.
        exact = not isinstance(scale, torch.Tensor) and not isinstance(b2, torch.Tensor)
        cov_sum = total(k.cov)
        ntk = k.ntk
        ntk_sum = None if ntk is None or ntk.dim() == 0 else total(ntk)
        base = None
        if ntk is not None and self.parameterization == "standard":
            # The gradients of W ~ N(0, W_std²/fan_in) and of the bias enter unscaled:
            # fan_in · (window mean of Σ) + 1 = C_in · (window sum of Σ) + 1, C_in the
            # declared width.
            base = (cov_sum * k.width).add_(1.0)
        if exact:
            cov = cov_sum.mul_(scale)
            if b2:
                cov.add_(b2)
        else:
            cov = cov_sum * scale + b2
        if k.variances_are_cov:
            var1 = var2 = cov
        else:
            var1 = _per_pixel(k, k.var1, pixel_total, True)
            var2 = _per_pixel(k, k.var2, pixel_total, False)
            if pairs and k.tape is not None:
                cov = k.tape.exact_diagonal(cov, var1, d)
        if ntk is not None:
            head = cov if base is None else base
            if ntk_sum is None:
                ntk = head
            elif exact and pairs and not (torch.is_grad_enabled()
                                          and (head.requires_grad or ntk_sum.requires_grad)):
                # Into the fresh window sum (same elementwise kernel, so the same bits as
                # out of place): one tile-sized tensor fewer in the working set. Measured on
                # 4x4 pairs of 14x14 images (5 MB per tensor), 1 thread: 0.33 -> 0.13 ms.
                # Only for pixel pairs: on the 16 MB "pixels" tiles of a Flatten readout it
                # measured slower (28x28, 150x150 pairs: 0.081 -> 0.089 ms per entry).
                # Product, then a plain add (not torch.add's alpha=, which fuses a
                # multiply-add in vector lanes only: an entry's last bit would depend on its
                # position in the tile).
                ntk = ntk_sum.mul_(scale).add_(head)
            elif exact:
                ntk = (ntk_sum * scale).add_(head)
            else:
                ntk = head + ntk_sum * scale
        # Each output channel is a zero-mean combination of the inputs (independent weights
        # per channel): zero mean per pixel, and Gaussian at infinite width (CLT).
        return k.replace(cov=cov, var1=var1, var2=var2, ntk=ntk, width=self.features,
                         mean1=0.0, mean2=0.0, gaussian=True)

    def build(self, in_dim, generator, dtype, device):
        channels, spatial = _spatial_input(in_dim, self)
        self.out_dim(in_dim)  # refuses a 'valid' window larger than the input
        ks, st = self._window(len(spatial))
        cls = Conv2dModule if len(spatial) == 2 else Conv1dModule
        return cls(channels, self.features, ks, st, self.padding, _value(self.W_std),
                   _value(self.b_std), self.parameterization, generator=generator, dtype=dtype,
                   device=device)

    def __repr__(self):
        return (f"Conv({self.features}, kernel_size={self.kernel_size!r}, "
                f"stride={self.stride!r}, padding={self.padding!r}, "
                f"W_std={_value(self.W_std)!r}, b_std={_value(self.b_std)!r}, "
                f"parameterization={self.parameterization!r})")


class _ScaledConv:
    """Forward map of :class:`Conv`'s modules: explicit padding (TensorFlow's split, or
    wrapped), then the convolution with the parameterization's scales. Attributes
    ``W_std``, ``b_std``, ``parameterization``, ``kernel_size``, ``stride`` and
    ``pad_mode`` (``"same"``, ``"valid"``, ``"circular"``) describe it; ``weight_scale`` and
    ``bias_scale`` say how ``weight`` and ``bias`` enter (as for ``DenseModule``)."""

    def _init(self, W_std, b_std, parameterization, pad_mode, generator, dtype, device):
        self.W_std, self.b_std = float(W_std), float(b_std)
        self.parameterization, self.pad_mode = parameterization, pad_mode
        shape = tuple(self.weight.shape)
        weight = torch.randn(shape, generator=generator, dtype=dtype)
        bias = torch.randn(shape[0], generator=generator, dtype=dtype)
        if parameterization == "standard":
            weight *= W_std / math.sqrt(self.fan_in)
            bias *= b_std
        self.weight = torch.nn.Parameter(weight.to(device))
        self.bias = torch.nn.Parameter(bias.to(device))

    @property
    def fan_in(self) -> int:
        return self.in_channels * math.prod(self.kernel_size)

    @property
    def weight_scale(self) -> float:
        """Factor multiplying ``weight ⋆ a`` in the forward map."""
        return self.W_std / math.sqrt(self.fan_in) if self.parameterization == "ntk" else 1.0

    @property
    def bias_scale(self) -> float:
        """Factor multiplying ``bias`` in the forward map."""
        return self.b_std if self.parameterization == "ntk" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = len(self.kernel_size)
        _check_images(x, self, self.in_channels, d)
        x = _pad(x, self.kernel_size, self.stride, self.pad_mode)
        conv = F.conv2d if d == 2 else F.conv1d
        if self.parameterization == "ntk":
            out = conv(x, self.weight, None, self.stride) * self.weight_scale
            return out + (self.bias * self.bias_scale).reshape((-1,) + (1,) * d)
        return conv(x, self.weight, self.bias, self.stride)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.pad_mode!r}, W_std={self.W_std}, "
                f"b_std={self.b_std}, parameterization={self.parameterization!r}")


class Conv2dModule(_ScaledConv, torch.nn.Conv2d):
    """Finite-width 2-D :class:`Conv`: an ``nn.Conv2d`` (``weight`` ``(C_out, C_in, k_h,
    k_w)``, ``bias`` ``(C_out,)``) initialised and scaled as the parameterization says."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: str, W_std: float, b_std: float,
                 parameterization: str, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        # Built on the meta device so that torch's own initialisation draws nothing from the
        # global RNG; the parameters are then drawn from ``generator``.
        torch.nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride,
                                 padding=0, bias=True, device="meta", dtype=dtype)
        self._init(W_std, b_std, parameterization, padding, generator, dtype, device)


class Conv1dModule(_ScaledConv, torch.nn.Conv1d):
    """Finite-width 1-D :class:`Conv`: an ``nn.Conv1d`` (see :class:`Conv2dModule`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int],
                 stride: tuple[int], padding: str, W_std: float, b_std: float,
                 parameterization: str, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        torch.nn.Conv1d.__init__(self, in_channels, out_channels, kernel_size, stride,
                                 padding=0, bias=True, device="meta", dtype=dtype)
        self._init(W_std, b_std, parameterization, padding, generator, dtype, device)


# ---------------------------------------------------------------------------- pooling
@dataclass(frozen=True, init=False, repr=False)
class AvgPool(Layer):
    """Average pooling over windows of ``kernel_size`` pixels (``stride`` defaults to it).

    ``padding="valid"`` or ``"same"`` (zeros, TensorFlow's split; edge windows are divided
    by the full window, padded zeros included, as neural-tangents' ``normalize_edges=False``
    and ``nn.AvgPool2d(count_include_pad=True)``). Kernel map: each image's pixel axes are
    averaged separately, so it needs every pixel pair (``"pixel_pairs"``) of its input,
    whatever follows it; its output is Gaussian if its input is.
    """

    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] | None
    padding: str

    def __init__(self, kernel_size: int | Sequence[int] = 2,
                 stride: int | Sequence[int] | None = None, padding: str = "valid"):
        object.__setattr__(self, "kernel_size", _sizes(kernel_size, "kernel_size"))
        object.__setattr__(self, "stride", None if stride is None else _sizes(stride, "stride"))
        object.__setattr__(self, "padding", check_choice(
            padding.lower() if isinstance(padding, str) else padding, "padding", POOL_PADDINGS))

    def _window(self, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ks = _resolve(self.kernel_size, d, "kernel_size", self)
        return ks, ks if self.stride is None else _resolve(self.stride, d, "stride", self)

    def out_dim(self, in_dim):
        channels, spatial = _spatial_input(in_dim, self)
        ks, st = self._window(len(spatial))
        return torch.Size((channels,) + tuple(
            output_size(n, k, s, self.padding)[0] for n, k, s in zip(spatial, ks, st)))

    def kernel_layout(self, layout):
        _spatial_layout(layout, self)
        if layout != PIXEL_PAIRS:
            raise ValueError(f"{self!r} averages different pixels, so it needs the "
                             f"'pixel_pairs' kernel layout; it received {layout!r}.")
        return layout

    def required_layout(self, layout):
        return PIXEL_PAIRS

    def kernel_map(self, k: PairKernel) -> PairKernel:
        self.kernel_layout(k.layout if isinstance(k, PairKernel) else tuple(k))
        d = k.image_ndim
        ks, st = self._window(d)
        mapped = _pool_state(k, lambda t: avg_pool(t, ks, st, self.padding, pairs=True), d,
                             self)

        def pool(t):
            return avg_pool(t, ks, st, self.padding, pairs=False)

        return k.replace(**mapped, mean1=_per_pixel(k, k.mean1, pool, True),
                         mean2=_per_pixel(k, k.mean2, pool, False), gaussian=k.gaussian)

    def build(self, in_dim, generator, dtype, device):
        channels, spatial = _spatial_input(in_dim, self)
        self.out_dim(in_dim)
        ks, st = self._window(len(spatial))
        cls = AvgPool2dModule if len(spatial) == 2 else AvgPool1dModule
        return cls(ks, st, self.padding)

    def __repr__(self):
        return (f"AvgPool(kernel_size={self.kernel_size!r}, stride={self.stride!r}, "
                f"padding={self.padding!r})")


class _PaddedPool:
    """Forward map of :class:`AvgPool`'s modules: TensorFlow-style zero padding, then the
    average over the full window (``count_include_pad``; no implicit padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = len(self.window)
        if x.dim() != d + 2:
            raise ValueError(f"{type(self).__name__} expects inputs "
                             f"{'(N, C, H, W)' if d == 2 else '(N, C, L)'}; got shape "
                             f"{tuple(x.shape)}.")
        return super().forward(_pad(x, self.window, self.steps, self.pad_mode))


class AvgPool2dModule(_PaddedPool, torch.nn.AvgPool2d):
    """Finite-width 2-D :class:`AvgPool`: an ``nn.AvgPool2d`` after explicit padding."""

    def __init__(self, kernel_size, stride, padding):
        torch.nn.AvgPool2d.__init__(self, kernel_size, stride, 0)
        self.window, self.steps, self.pad_mode = tuple(kernel_size), tuple(stride), padding


class AvgPool1dModule(_PaddedPool, torch.nn.AvgPool1d):
    """Finite-width 1-D :class:`AvgPool`: an ``nn.AvgPool1d`` after explicit padding."""

    def __init__(self, kernel_size, stride, padding):
        torch.nn.AvgPool1d.__init__(self, kernel_size, stride, 0)
        self.window, self.steps, self.pad_mode = tuple(kernel_size), tuple(stride), padding


@dataclass(frozen=True, repr=False)
class GlobalAvgPool(Layer):
    """The mean over all pixels of each channel: ``(N, C, H, W) -> (N, C)``.

    Kernel map: the mean of the pixel-pair covariance over all pairs (``"pixel_pairs"``
    in, ``"dense"`` out); the width becomes the channel count.
    """

    def out_dim(self, in_dim):
        channels, _ = _spatial_input(in_dim, self)
        return channels

    def kernel_layout(self, layout):
        _spatial_layout(layout, self)
        if layout != PIXEL_PAIRS:
            raise ValueError(f"{self!r} averages all pixels, so it needs the 'pixel_pairs' "
                             f"kernel layout; it received {layout!r}.")
        return DENSE

    def required_layout(self, layout):
        return PIXEL_PAIRS

    def kernel_map(self, k: PairKernel) -> PairKernel:
        self.kernel_layout(k.layout if isinstance(k, PairKernel) else tuple(k))
        d = k.image_ndim
        mapped = _pool_state(k, lambda t: mean_spatial(t, pairs=True, ndim=d), 0, self)
        # Per-pixel means (marginal-shaped, unit axes included) average to per-image ones.
        means = {name: m if not isinstance(m, torch.Tensor) else m.mean(dim=tuple(range(-2 * d, 0)))
                 for name, m in (("mean1", k.mean1), ("mean2", k.mean2))}
        return k.replace(**mapped, **means, layout=DENSE, gaussian=k.gaussian)

    def build(self, in_dim, generator, dtype, device):
        _, spatial = _spatial_input(in_dim, self)
        return GlobalAvgPoolModule(len(spatial))

    def __repr__(self):
        return "GlobalAvgPool()"


class GlobalAvgPoolModule(torch.nn.Module):
    """``(N, C, *S) -> (N, C)``: the mean over the spatial axes."""

    def __init__(self, ndim: int):
        super().__init__()
        self.ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(f"GlobalAvgPoolModule expects inputs with {self.ndim} spatial "
                             f"axes; got shape {tuple(x.shape)}.")
        return x.mean(dim=tuple(range(2, x.dim())))


@dataclass(frozen=True, repr=False)
class Flatten(Layer):
    """``(N, C, H, W) -> (N, C·H·W)`` (identity on flat inputs).

    Kernel map: a Dense layer after it sees ``Σ_{c,p} a a' / (C·H·W)``, the mean over pixels
    of the per-pixel covariance, so it needs only the pixel diagonal (``"pixels"``: H·W
    entries per pair rather than (H·W)²). The width becomes ``C·H·W`` (what a following
    standard-parameterization Dense layer's NTK counts).
    """

    def out_dim(self, in_dim):
        if isinstance(in_dim, torch.Size):
            return math.prod(in_dim)
        return in_dim

    def kernel_layout(self, layout):
        if is_branches(layout):
            raise ValueError("Flatten() received several branches; combine them with "
                             "FanInSum() first.")
        return DENSE

    def required_layout(self, layout):
        return PIXELS

    def kernel_map(self, k: PairKernel) -> PairKernel:
        self.kernel_layout(k.layout if isinstance(k, PairKernel) else tuple(k))
        if k.layout == DENSE:
            return k
        d = k.image_ndim
        spatial = k.spatial_shape[:d]
        pairs = k.layout == PIXEL_PAIRS
        # Per-pixel quantities (variances, means) are marginal-shaped: in the pair layout
        # with d unit axes, which a mean over the last 2d axes absorbs.
        n_pixel_axes = 2 * d if pairs else d

        def pixel_mean(t):
            return t if not isinstance(t, torch.Tensor) else t.mean(
                dim=tuple(range(-n_pixel_axes, 0)))

        def fn(t):
            return mean_spatial(pair_diagonal(t, d) if pairs else t, pairs=False, ndim=d)

        cov = fn(k.cov)
        if k.variances_are_cov:
            var1 = var2 = cov
        else:
            var1, var2 = pixel_mean(k.var1), pixel_mean(k.var2)
        ntk = None if k.ntk is None else (k.ntk if k.ntk.dim() == 0 else fn(k.ntk))
        return k.replace(cov=cov, var1=var1, var2=var2, ntk=ntk, mean1=pixel_mean(k.mean1),
                         mean2=pixel_mean(k.mean2),
                         layout=DENSE, width=k.width * math.prod(spatial),
                         gaussian=k.gaussian)

    def build(self, in_dim, generator, dtype, device):
        return torch.nn.Flatten()

    def __repr__(self):
        return "Flatten()"


# -------------------------------------------------------------------------- shorthands
def cnn(depth: int, channels: int, activation: Any = "relu", *, kernel_size: int = 3,
        pool: str = "flatten", padding: str = "same", W_std: float = 1.0, b_std: float = 0.0,
        out_dim: int = 1, parameterization: str = "ntk") -> Serial:
    """``depth`` convolutions (each followed by ``activation``), a readout and a Dense layer.

    ``nk.cnn(3, 64)``: three 3×3 "same" Conv(64)+ReLU layers, ``Flatten()``, ``Dense(1)``;
    ``pool="gap"`` reads out by ``GlobalAvgPool()`` instead (the pooled kernel, which needs
    every pixel pair: (H·W)² entries per pair of images rather than H·W).
    """
    from .activations import activation_from_name

    depth = check_positive_int(depth, "depth")
    pool = check_choice(pool, "pool", ("flatten", "gap"))
    act = activation_from_name(activation)
    layers: list[Layer] = []
    for _ in range(depth):
        layers += [Conv(channels, kernel_size, 1, padding, W_std, b_std, parameterization), act]
    layers += [Flatten() if pool == "flatten" else GlobalAvgPool(),
               Dense(out_dim, W_std, b_std, parameterization)]
    return Serial(layers)


_MYRTLE_STAGES = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}


def myrtle(depth: int = 5, channels: int = 128, activation: Any = "relu", *,
           W_std: float = math.sqrt(2.0), b_std: float = 0.0, out_dim: int = 1,
           parameterization: str = "ntk") -> Serial:
    """The Myrtle family (Shankar et al. 2020, "Neural Kernels Without Tangents"), as in
    neural-tangents' example: three stages of 3×3 "same" Conv+ReLU layers (``(2, 1, 1)``,
    ``(2, 2, 2)`` or ``(3, 3, 3)`` of them for ``depth`` 5, 7, 10, which counts the weight
    layers), a 2×2 average pool after each of the first two stages, global average pooling
    after the last, then ``Dense(out_dim)``.

    Neural-tangents ends with three 2×2 pools and ``Flatten``; for its 32×32 inputs (8×8
    after two pools) that is the global average, which ``GlobalAvgPool()`` computes for
    any size. Every pooled kernel needs every pixel pair: (32·32)² entries per pair of
    images in the first stage.
    """
    from .activations import activation_from_name

    if depth not in _MYRTLE_STAGES:
        raise ValueError(f"myrtle depth must be one of {sorted(_MYRTLE_STAGES)}; got {depth!r}.")
    channels = check_positive_int(channels, "channels")
    act = activation_from_name(activation)
    layers: list[Layer] = []
    for stage, n in enumerate(_MYRTLE_STAGES[depth]):
        for _ in range(n):
            layers += [Conv(channels, 3, 1, "same", W_std, b_std, parameterization), act]
        layers.append(AvgPool(2) if stage < 2 else GlobalAvgPool())
    layers.append(Dense(out_dim, W_std, b_std, parameterization))
    return Serial(layers)
