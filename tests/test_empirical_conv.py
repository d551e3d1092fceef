"""Empirical NTK/NNGP of convolutional networks: image inputs (N, C, H, W) and (N, C, L).

Every method is checked against the independent reference of ``test_empirical``: per-example,
per-output gradients from plain ``torch.autograd.grad``, contracted in float64 (max relative
error 1e-10; observed ~1e-15). The structured path's convolution gradients (unfold patches
times backward signals, summed over pixels once per example) are a different contraction
order from autograd's, so the comparison also checks padding modes, strides, dilations and
groups: a wrong patch layout changes entries by O(1), not by ulps.
"""

from __future__ import annotations

import pytest
import torch
from test_empirical import (
    ALL_METHODS,
    GENERIC,
    naive_ntk,
    reduce,
    rel_err,
    schedule_atol,
)
from torch import nn

import ntkit as nk
from ntkit.kernels.empirical.auto import jacobian_cost
from ntkit.kernels.empirical.setup import _setup
from ntkit.kernels.empirical.structured import structured_cost

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64
OUTPUTS = ("trace", "diagonal", "full")


def _bn(channels: int, cls=nn.BatchNorm2d) -> nn.Module:
    """BatchNorm with non-trivial running statistics and affine parameters."""
    bn = cls(channels)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn


def conv_zoo() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Sequential CNNs covering what the structured path must get right, with the per-example
    input shape. The last one has a multi-dimensional output (a fully convolutional map)."""
    torch.manual_seed(0)
    zoo = {
        "pool_bn": (nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), _bn(3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3)),
            (2, 8, 8)),
        "modes": (nn.Sequential(
            nn.Conv2d(2, 4, 4, padding="same", padding_mode="reflect"), nn.GELU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, padding_mode="circular",
                      groups=2), nn.ReLU(),
            nn.Conv2d(4, 3, (2, 3), padding="valid", bias=False), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(3, 2)), (2, 9, 7)),
        "conv1d": (nn.Sequential(
            nn.Conv1d(2, 4, 3, padding="same", padding_mode="circular"), _bn(4, nn.BatchNorm1d),
            nn.SiLU(), nn.Conv1d(4, 4, 2, stride=2, groups=2), nn.AdaptiveAvgPool1d(1),
            nn.Flatten(), nn.Linear(4, 2)), (2, 9)),
        "fully_conv": (nn.Sequential(
            nn.Conv2d(1, 3, 3, padding="same", padding_mode="replicate"), nn.ReLU(),
            nn.Sequential(nn.Conv2d(3, 2, 2, dilation=2), nn.Softplus())), (1, 6, 6)),
    }
    return {k: (m.to(F64).eval(), shape) for k, (m, shape) in zoo.items()}


ZOO = conv_zoo()


def _inputs(shape: tuple[int, ...], n1: int = 4, n2: int = 3):
    g = torch.Generator().manual_seed(len(shape))
    return (torch.randn(n1, *shape, generator=g, dtype=F64),
            torch.randn(n2, *shape, generator=g, dtype=F64))


@pytest.mark.parametrize("name", list(ZOO))
def test_every_method_matches_autograd_on_cnns(name):
    model, shape = ZOO[name]
    assert nk.kernels.empirical.structured_plan(model)[1] is None
    x1, x2 = _inputs(shape)
    for xx2 in (x2, None):
        ref = naive_ntk(model, x1, xx2)
        for method in ALL_METHODS:
            for output in OUTPUTS:
                got = nk.empirical_ntk(model, x1, xx2, method=method, output=output)
                assert got.shape == reduce(ref, output).shape
                assert rel_err(got, reduce(ref, output)) < 1e-10, (method, output, xx2 is None)


@pytest.mark.parametrize("name", ["pool_bn", "modes"])
def test_structured_per_param_parts_on_cnns(name):
    model, shape = ZOO[name]
    x1, _ = _inputs(shape)
    total, parts = nk.empirical_ntk(model, x1, method="structured", per_param=True,
                                    output="full")
    assert list(parts) == [n for n, p in model.named_parameters()]
    for key, part in parts.items():
        assert rel_err(part, naive_ntk(model, x1, names=[key])) < 1e-10, key
    torch.testing.assert_close(sum(parts.values()), total, rtol=1e-13, atol=1e-13)
    # A subset of parameters (the conv weights only, BatchNorm frozen by params=).
    convs = [k for k in parts if k.endswith("weight") and parts[k].abs().max() > 0
             and isinstance(dict(model.named_modules())[k.rsplit(".", 1)[0]], nn.Conv2d)]
    got = nk.empirical_ntk(model, x1, method="structured", params=convs, output="full")
    assert rel_err(got, naive_ntk(model, x1, names=convs)) < 1e-10


def test_structured_blocking_and_budget_invariance_on_images():
    model, shape = ZOO["modes"]
    x1, x2 = _inputs(shape, 7, 5)
    atol = schedule_atol(model, x1, x2)  # different block sizes are different schedules
    for xx2 in (None, x2):
        ref = nk.empirical_ntk(model, x1, xx2, method="structured", output="full")
        for bs in (1, 3, 100):
            got = nk.empirical_ntk(model, x1, xx2, method="structured", output="full",
                                   batch_size=bs)
            torch.testing.assert_close(got, ref, rtol=0, atol=atol)
    small = nk.empirical_ntk(model, x1, x2, method="structured", output="full",
                             memory_budget=400_000)
    torch.testing.assert_close(small, nk.empirical_ntk(model, x1, x2, output="full"),
                               rtol=0, atol=atol)
    # The budget counts image-sized per-example state: a budget below one row's signals
    # and patches is refused up front for every method, naming what it needs.
    for method in ALL_METHODS:
        with pytest.raises(nk.MemoryBudgetError, match=rf"method='{method}' needs at least"):
            nk.empirical_ntk(model, x1, method=method, memory_budget=20_000)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv plus the identity, then ReLU (functional ops inside)."""

    def __init__(self, channels: int):
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = _bn(channels)
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.c2(torch.relu(self.bn(self.c1(x)))))


def resnet() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), ResidualBlock(3), nn.AvgPool2d(2),
                         ResidualBlock(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(3, 2)).to(F64).eval()


def test_residual_cnn_generic_methods_and_structured_refusal():
    model = resnet()
    x1, x2 = _inputs((1, 6, 6))
    ref = naive_ntk(model, x1, x2)
    for method in GENERIC + ("auto",):
        for output in OUTPUTS:
            got = nk.empirical_ntk(model, x1, x2, method=method, output=output)
            assert rel_err(got, reduce(ref, output)) < 1e-10, (method, output)
    with pytest.raises(ValueError, match=r"method='structured' needs an nn.Sequential whose "
                                         r"differentiated parameters.*module '1' "
                                         r"\(ResidualBlock\) has differentiated parameters"):
        nk.empirical_ntk(model, x1, method="structured")
    # Freezing the blocks (params=) makes them parameter-free maps: structured applies.
    outer = ["0.weight", "0.bias", "6.weight", "6.bias"]
    got = nk.empirical_ntk(model, x1, x2, method="structured", params=outer, output="full")
    assert rel_err(got, naive_ntk(model, x1, x2, names=outer)) < 1e-10


def test_batch_statistics_are_refused_on_cnns():
    _, shape = ZOO["pool_bn"]
    x1, _ = _inputs(shape, 6)
    train = conv_zoo()["pool_bn"][0].train()
    for method in ALL_METHODS:
        with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\) is in training mode"):
            nk.empirical_ntk(train, x1, method=method)
    # Eval mode without running statistics still normalises by the batch: coupled.
    torch.manual_seed(0)
    batch_stats = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False),
                                nn.Flatten(), nn.Linear(3 * 36, 1)).to(F64).eval()
    with pytest.raises(ValueError, match="depends on the other examples in its batch"):
        nk.empirical_ntk(batch_stats, x1)


def test_structured_refusals_name_the_module():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4, 4, dtype=F64)
    conv3d = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(16, 1)).to(F64)
    with pytest.raises(ValueError, match=r"module '0' \(Conv3d\) has differentiated "
                                         r"parameters.*not a Linear/DenseModule, Conv1d/Conv2d"):
        nk.empirical_ntk(conv3d, x, method="structured")
    assert rel_err(nk.empirical_ntk(conv3d, x, output="full"), naive_ntk(conv3d, x)) < 1e-10
    no_flatten = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 1)).to(F64)
    with pytest.raises(ValueError, match=r"module '1' receives 4-dimensional batches.*"
                                         r"nn.Flatten"):
        nk.empirical_ntk(no_flatten, torch.randn(2, 1, 4, 4, dtype=F64), method="structured")


def test_auto_prefers_structured_where_dense_readouts_dominate():
    # A Flatten + Dense readout: its Jacobian holds O·(C·H·W) numbers per output and
    # example, the structured path C·H·W + O per example. The cost model sees it.
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 64, 10)).to(F64)
    x = torch.rand(40, 1, 8, 8, dtype=F64)
    setup = _setup(flat, x, None, None)
    assert structured_cost(setup, "full", False) < 0.2 * jacobian_cost(setup, "full", False)
    assert nk.empirical_ntk(flat, x[:3], per_param=True).method == "structured"


def test_empirical_nngp_on_images():
    model, shape = ZOO["pool_bn"]
    x1, x2 = _inputs(shape)
    feats = {}
    model[7].register_forward_hook(lambda m, i, out: feats.__setitem__("f", out))
    try:
        with torch.no_grad():
            model(x1)
            f1 = feats["f"]
            model(x2)
            f2 = feats["f"]
    finally:
        model[7]._forward_hooks.clear()
    expected = (f1 @ f2.T) / f1.shape[1]
    torch.testing.assert_close(nk.empirical_nngp(model, x1, x2), expected, rtol=1e-13,
                               atol=0)
    # The output of a conv layer: (C, H, W) feature maps flattened per example.
    with torch.no_grad():
        c1, c2 = model[0](x1).flatten(1), model[0](x2).flatten(1)
    torch.testing.assert_close(nk.empirical_nngp(model, x1, x2, layer="0", W_std=2.0),
                               4.0 * (c1 @ c2.T) / c1.shape[1], rtol=1e-13, atol=0)


# ntkit's conv modules pad in their forward (TensorFlow's split for "same" with strides, or
# wrapped) and scale weight and bias by the parameterization's factors.
NTKIT_CNNS = {
    "cnn_flatten": (lambda: nk.cnn(2, 3, out_dim=2, b_std=0.3), (1, 6, 6)),
    "cnn_gap_standard": (lambda: nk.cnn(2, 3, pool="gap", out_dim=2, b_std=0.3,
                                        parameterization="standard"), (2, 5, 5)),
    "myrtle": (lambda: nk.myrtle(5, 2, out_dim=2), (3, 8, 8)),
    "strided_circular": (lambda: nk.serial(
        nk.Conv(3, 3, stride=2, padding="same", b_std=0.2), nk.ReLU(),
        nk.Conv(2, 2, padding="circular"), nk.Flatten(), nk.Dense(2)), (2, 7, 7)),
    "conv1d_pool": (lambda: nk.serial(
        nk.Conv(3, 3, padding="circular", b_std=0.2), nk.Erf(), nk.AvgPool(2, padding="same"),
        nk.Conv(2, 2, stride=2, padding="valid"), nk.GlobalAvgPool(), nk.Dense(2)), (2, 9)),
}


@pytest.mark.parametrize("name", list(NTKIT_CNNS))
def test_ntkit_conv_modules(name):
    net, shape = NTKIT_CNNS[name]
    model = net().module(in_shape=shape, seed=0, dtype=F64)
    x1, x2 = _inputs(shape)
    ref = naive_ntk(model, x1, x2)
    for method in ALL_METHODS:
        for output in ("trace", "full"):
            got = nk.empirical_ntk(model, x1, x2, method=method, output=output)
            assert rel_err(got, reduce(ref, output)) < 1e-10, (method, output)
    assert nk.empirical_ntk(model, x1, per_param=True).method in ALL_METHODS


class ShiftedConv(nn.Conv2d):
    """A Conv2d subclass whose forward is not the convolution of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.roll(x, 1, dims=-1))


def test_conv_subclass_with_its_own_forward_is_not_structured():
    torch.manual_seed(0)
    model = nn.Sequential(ShiftedConv(1, 2, 3), nn.Flatten(), nn.Linear(8, 1)).to(F64)
    x = torch.randn(3, 1, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"module '0' \(ShiftedConv\) overrides the "
                                         r"convolution's forward"):
        nk.empirical_ntk(model, x, method="structured")
    assert rel_err(nk.empirical_ntk(model, x, output="full"), naive_ntk(model, x)) < 1e-10


def test_pixel_pair_contraction_on_small_feature_maps():
    # Late layers with few pixels and many channels: the pixel-pair order (patch Gram times
    # signal Gram, summed over (p, q)) is cheaper than the per-example weight gradient, and
    # chosen per layer; both orders must give the same kernel.
    from ntkit.kernels.empirical.structured import _pixel_pairs, structured_plan

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(2), nn.Conv2d(32, 32, 3, padding=1, stride=2), _bn(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32, 3)).to(F64).eval()
    x1, x2 = _inputs((3, 4, 4))
    steps, _ = structured_plan(model, None, x1[:1])
    for output in OUTPUTS:
        assert [s.name for s in steps if _pixel_pairs(s, 3, output)] == ["5"]
    for xx2 in (x2, None):
        ref = naive_ntk(model, x1, xx2)
        for output in OUTPUTS:
            got = nk.empirical_ntk(model, x1, xx2, method="structured", output=output)
            assert rel_err(got, reduce(ref, output)) < 1e-10, output
    _, parts = nk.empirical_ntk(model, x1, x2, method="structured", output="full",
                                per_param=True)
    for key in ("5.weight", "5.bias", "2.weight"):
        assert rel_err(parts[key], naive_ntk(model, x1, x2, names=[key])) < 1e-10, key
    atol = schedule_atol(model, x1, x2)
    torch.testing.assert_close(
        nk.empirical_ntk(model, x1, x2, method="structured", output="full", batch_size=1),
        nk.empirical_ntk(model, x1, x2, method="structured", output="full"), rtol=0,
        atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_cnn_matches_cpu():
    model, shape = ZOO["pool_bn"]
    x1, _ = _inputs(shape, 9)
    ntkit_cnn = nk.myrtle(5, 4, out_dim=2).module(in_shape=(3, 8, 8), seed=0, dtype=F64)
    x3 = torch.randn(6, 3, 8, 8, dtype=F64)
    for m, x in ((model, x1), (ntkit_cnn, x3)):
        cpu = {k: nk.empirical_ntk(m, x, method=k, output="full") for k in ALL_METHODS}
        m_gpu = conv_zoo()["pool_bn"][0].cuda() if m is model else m.cuda()
        for method in ALL_METHODS:
            got = nk.empirical_ntk(m_gpu, x.cuda(), method=method, output="full", batch_size=4)
            assert got.device.type == "cuda"
            torch.testing.assert_close(got.cpu(), cpu[method], rtol=1e-10, atol=1e-12)


def test_repeated_modules_and_tied_layers():
    # One nn.ReLU instance after every conv is applied every time (named_children() would
    # list it once); a conv module used twice ties its parameters: the structured path
    # refuses it, the general methods sum the two uses' gradients, and the user's model
    # keeps its Parameter objects (functional_call alone would leave detached copies).
    torch.manual_seed(0)
    act = nn.Tanh()
    shared_act = nn.Sequential(nn.Conv2d(1, 3, 3), act, nn.Conv2d(3, 3, 3), act,
                               nn.Flatten(), nn.Linear(12, 2)).to(F64)
    x = torch.randn(4, 1, 6, 6, dtype=F64)
    for method in ALL_METHODS:
        assert rel_err(nk.empirical_ntk(shared_act, x, method=method, output="full"),
                       naive_ntk(shared_act, x)) < 1e-10, method
    conv = nn.Conv2d(2, 2, 3, padding=1)
    tied = nn.Sequential(conv, nn.Tanh(), conv, nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 25, 1)).to(F64)
    weight = conv.weight
    xt = torch.randn(4, 2, 5, 5, dtype=F64)
    ref = naive_ntk(tied, xt)
    with pytest.raises(ValueError, match=r"module '2' is the same module as '0' \(tied"):
        nk.empirical_ntk(tied, xt, method="structured")
    for method in GENERIC + ("auto",):
        assert rel_err(nk.empirical_ntk(tied, xt, method=method, output="full"), ref) < 1e-10
        assert conv.weight is weight and isinstance(conv.weight, nn.Parameter)
