"""Layers as values that describe themselves.

* A user-defined composite layer (a plain ``Layer`` subclass holding a quadrature
  activation) and a user-defined quadrature activation (an ``Activation`` subclass that is
  not an ``Elementwise``) get what the built-ins get: the smaller quadrature tile, an exact
  diagonal (bit for bit the ``diagonal=True`` values, and exactly equal entries for equal
  rows) and an exactly symmetric kernel.
* Built-in layers are frozen values: equality, hashing, refused assignment, ``repr`` that
  rebuilds an equal layer.
* The kernel state carries a layout; elementwise maps work on per-pixel covariances,
  Dense and LayerNorm refuse them.
* ``ntkit.layers`` never imports ``ntkit.kernels`` (or anything above it), and ntkit has
  no import cycles.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

import ntkit as nk
from ntkit.layers import Activation, Layer, PairKernel
from ntkit.layers.activations.quadrature import quadrature_dual

SRC = Path(nk.__file__).resolve().parent
F64 = torch.float64


# --------------------------------------------------------------------------- user layers
class _Block(Layer):
    """A user's composite: Dense -> activation, holding both as attributes (no dataclass,
    no ``uses_quadrature`` override)."""

    def __init__(self, width: int, activation: Layer):
        self.dense = nk.Dense(width, 1.3, 0.2)
        self.activation = activation

    def out_dim(self, in_dim):
        return self.dense.out_dim(in_dim)

    def kernel_map(self, k):
        return self.activation.kernel_map(self.dense.kernel_map(k))

    def build(self, in_dim, generator, dtype, device):
        return torch.nn.Sequential(self.dense.build(in_dim, generator, dtype, device),
                                   self.activation.build(self.dense.features, generator,
                                                         dtype, device))


@dataclasses.dataclass(frozen=True, repr=False)
class _ScaledTanh(Activation):
    """``tanh(s·x)`` with its dual from the public quadrature engine: a quadrature
    activation that is not an ``Elementwise``."""

    s: float = 2.0

    @property
    def uses_quadrature(self) -> bool:
        return True

    def fn(self, x):
        return torch.tanh(self.s * x)

    def _values(self, x, need_dot):
        t = torch.tanh(self.s * x)
        return t, (self.s * (1 - t * t) if need_dot else None)

    def dual(self, cov, var1, var2, need_dot=True):
        # tanh(s x) has its poles at ±iπ/(2s)
        return quadrature_dual(self._values, math.pi / (2 * self.s), cov, var1, var2, need_dot)


def _inputs() -> torch.Tensor:
    x = torch.randn(40, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    x[7] = x[2]  # a repeated row: its correlation with itself must be exactly 1 everywhere
    return x


def _tiles_seen(monkeypatch) -> list[bool]:
    import ntkit.layers.evaluate as evaluate

    seen: list[bool] = []
    real = evaluate._tile_size
    monkeypatch.setattr(evaluate, "_tile_size",
                        lambda budget, n, itemsize, heavy: seen.append(heavy)
                        or real(budget, n, itemsize, heavy))
    return seen


@pytest.mark.parametrize("activation", [nk.Tanh(), _ScaledTanh(0.5)], ids=repr)
def test_user_composite_gets_the_builtin_tile_diagonal_and_symmetry(monkeypatch, activation):
    """The same network written with built-ins and with the user's composite: the evaluator
    asks both the same questions and gets the same answers, so the kernels are the same
    deterministic computation (bit for bit), exactly symmetric, and their diagonals equal
    the O(N d) ``diagonal=True`` values exactly. ReLU after the activation makes the
    diagonal sensitive: at rho = 1 - ulp its arccos is ~1e-8 off."""
    seen = _tiles_seen(monkeypatch)
    tail = (nk.Dense(8, 1.1, 0.1), nk.ReLU(), nk.Dense(1, 1.0, 0.1))
    builtin = nk.serial(nk.Dense(8, 1.3, 0.2), activation, *tail)
    custom = nk.serial(_Block(8, activation), *tail)
    assert custom.uses_quadrature and builtin.uses_quadrature and activation.uses_quadrature
    x = _inputs()
    budget = 6_500_000  # 16 x 16 quadrature tiles: off-diagonal tiles are mirrored too
    k_builtin = builtin.kernel(x, memory_budget=budget)
    k_custom = custom.kernel(x, memory_budget=budget)
    assert seen == [True, True]  # both got the quadrature tile size
    diag = custom.kernel(x, diagonal=True)
    for name in ("nngp", "ntk"):
        k = k_custom[name]
        assert torch.equal(k, k_builtin[name])
        assert torch.equal(k, k.T)
        assert torch.equal(k.diagonal(), diag[name])
        assert k[7, 2] == k[2, 2] == k[7, 7]
        # The cross (non-symmetric) path takes the same care of the repeated row.
        cross = custom.kernel(x[:10], x[:9], get=name)[name]
        assert cross[7, 2] == cross[2, 2] == cross[7, 7]


@dataclasses.dataclass(frozen=True, repr=False)
class _RoundsDifferently(_ScaledTanh):
    """Its rule rounds tile entries 1 ulp differently from the variance vector, as a vector
    path of another width may on another machine."""

    def dual(self, cov, var1, var2, need_dot=True):
        nngp, dot = super().dual(cov, var1, var2, need_dot)
        if cov.dim() == 2 and min(cov.shape) > 1:  # a tile, not a row or column of variances
            nngp = torch.nextafter(nngp, torch.full_like(nngp, math.inf))
        return nngp, dot


def test_quadrature_activation_rounding_cannot_break_the_exact_diagonal():
    """The protocol, not each activation, guarantees k(x, x) entries equal to the row
    variance for a layer that declares ``uses_quadrature``: the next ReLU then sees a
    correlation of exactly 1 and the diagonal equals the ``diagonal=True`` value."""
    net = nk.serial(_Block(8, _RoundsDifferently(0.5)), nk.Dense(8, 1.1, 0.1), nk.ReLU(),
                    nk.Dense(1, 1.0, 0.1))
    x = _inputs()
    k, diag = net.kernel(x), net.kernel(x, diagonal=True)
    for name in ("nngp", "ntk"):
        assert torch.equal(k[name].diagonal(), diag[name])
        assert k[name][7, 2] == k[name][2, 2]


def test_quadrature_layers_declare_themselves():
    assert not nk.mlp(3, 8).uses_quadrature and not nk.ReLU().uses_quadrature
    assert not nk.Erf().uses_quadrature and not nk.Identity().uses_quadrature
    for act in (nk.Tanh(), nk.Sigmoid(), nk.Softplus(), nk.SiLU(), nk.Elementwise(torch.sin)):
        assert act.uses_quadrature and nk.mlp(2, 4, act).uses_quadrature
    residual = nk.serial(nk.FanOut(2), nk.parallel(nk.Identity(), nk.Tanh()), nk.FanInSum())
    assert residual.uses_quadrature and _Block(3, nk.SiLU()).uses_quadrature
    assert not _Block(3, nk.GELU()).uses_quadrature


# --------------------------------------------------------------------------- frozen values
def _builtin_layers() -> list[Layer]:
    return [
        nk.Dense(8), nk.Dense(8, 1.5, 0.1, "standard"), nk.ReLU(), nk.LeakyReLU(0.2), nk.Abs(),
        nk.ABReLU(-0.5, 2.0), nk.Erf(), nk.GELU(), nk.Sin(1.0, 2.0, 0.5), nk.Cos(c=0.25),
        nk.Tanh(), nk.Tanh(degree=12), nk.Sigmoid(), nk.Softplus(), nk.SiLU(),
        nk.Identity(), nk.FanOut(2), nk.FanInSum(), nk.LayerNorm(), nk.LayerNorm(eps=1e-6),
        nk.mlp(3, 16, "erf"),
        nk.serial(nk.Dense(4), nk.FanOut(2), nk.parallel(nk.Identity(), nk.Dense(4)),
                  nk.FanInSum(), nk.LayerNorm()),
        nk.Conv(8), nk.Conv(8, (3, 1), (2, 1), "valid", 1.5, 0.1, "standard"), nk.AvgPool(2),
        nk.AvgPool((2, 3), 1, "same"), nk.GlobalAvgPool(), nk.Flatten(),
        nk.cnn(2, 4, pool="gap"), nk.myrtle(5, 4),
    ]


@pytest.mark.parametrize("layer", _builtin_layers(), ids=repr)
def test_builtin_layers_are_frozen_values(layer):
    assert dataclasses.is_dataclass(layer)
    twin = eval(repr(layer), vars(nk))  # repr is readable and rebuilds the layer
    assert twin == layer and hash(twin) == hash(layer) and twin is not layer
    assert len({layer, twin}) == 1
    for f in dataclasses.fields(layer) or [None]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(layer, f.name if f else "anything", 0)


def test_equality_sees_every_parameter():
    assert nk.Dense(8) != nk.Dense(9) and nk.Dense(8) != nk.Dense(8, W_std=1.1)
    assert nk.Dense(8) != nk.Dense(8, parameterization="standard")
    assert nk.mlp(3, 8) != nk.mlp(3, 8, b_std=0.2) and nk.mlp(3, 8) != nk.mlp(3, 8, "erf")
    assert nk.LayerNorm() != nk.LayerNorm(eps=1e-6) and nk.FanOut(2) != nk.FanOut(3)
    assert nk.parallel(nk.ReLU(), nk.Erf()) != nk.parallel(nk.Erf(), nk.ReLU())
    assert nk.ReLU() != nk.ABReLU(0.0, 1.0)  # same numbers, but a different class
    assert nk.Cos() != nk.Sin() and nk.Erf() != nk.GELU()
    assert nk.Conv(8) != nk.Conv(8, stride=2) and nk.Conv(8) != nk.Conv(8, padding="circular")
    assert nk.Conv(8, 3) != nk.Conv(8, (3, 3))  # an int adapts to the inputs, a tuple does not
    assert nk.AvgPool(2) != nk.AvgPool(2, 2) and nk.AvgPool(2) != nk.AvgPool(2, padding="same")
    assert nk.cnn(2, 4) != nk.cnn(2, 4, pool="gap")
    # Tensor scales are trainable parameters: the same tensor is equal, another is not.
    w = torch.tensor(1.2, requires_grad=True)
    assert nk.Dense(4, w) == nk.Dense(4, w) and hash(nk.Dense(4, w)) == hash(nk.Dense(4, w))
    assert nk.Dense(4, w) != nk.Dense(4, torch.tensor(1.2, requires_grad=True))


def test_validation_names_the_parameter():
    cases = [
        (lambda: nk.Dense(0), "out_dim"), (lambda: nk.Dense(3, W_std=-1), "W_std"),
        (lambda: nk.Dense(3, parameterization="x"), "parameterization"),
        (lambda: nk.FanOut(0), "n"), (lambda: nk.LayerNorm(eps=-1.0), "eps"),
        (lambda: nk.LeakyReLU(float("nan")), "alpha"), (lambda: nk.Sin(b=math.inf), "b"),
        (lambda: nk.ABReLU(a="x"), "a"), (lambda: nk.serial(), "at least one"),
        (lambda: nk.serial(nk.Dense(2), "relu"), "argument 1"),
        (lambda: nk.parallel(nk.Dense(2), 3), "branch 1"),
        (lambda: nk.Conv(0), "out_channels"), (lambda: nk.Conv(3, 0), "kernel_size"),
        (lambda: nk.Conv(3, (3, 3), (1,)), "stride"), (lambda: nk.Conv(3, b_std=-1), "b_std"),
        (lambda: nk.AvgPool(2, padding="circular"), "padding"),
        (lambda: nk.cnn(2, 4, pool="max"), "pool"), (lambda: nk.myrtle(4), "depth"),
    ]
    for build, word in cases:
        with pytest.raises(ValueError, match=word):
            build()


def test_identity_is_an_activation_with_an_exact_dual():
    identity = nk.Identity()
    assert isinstance(identity, Activation)
    cov = torch.tensor([[0.3, -0.2], [0.1, 0.9]], dtype=F64)
    var1, var2 = torch.tensor([[1.0], [2.0]], dtype=F64), torch.tensor([[1.5, 0.9]], dtype=F64)
    nngp, dot = identity.dual(cov, var1, var2)
    assert torch.equal(nngp, cov) and torch.equal(dot, torch.ones_like(cov))
    assert nk.layers.activation_from_name(identity) is identity
    x = _inputs()[:6]
    linear = nk.serial(nk.Dense(5, 1.2, 0.3), identity, nk.Dense(1, 0.8, 0.1))
    gram = x @ x.T / 3
    # Linear network: NNGP = 0.8²(1.2² G + 0.3²) + 0.1², NTK = that + 0.8²(...) + 1 terms
    sigma1 = 1.44 * gram + 0.09
    torch.testing.assert_close(linear.kernel(x).nngp, 0.64 * sigma1 + 0.01, rtol=1e-14, atol=0)
    torch.testing.assert_close(linear.kernel(x).ntk, 0.64 * sigma1 + 0.01 + 0.64 * sigma1,
                               rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- layouts
def _pixel_state(layout: str) -> tuple[PairKernel, PairKernel]:
    """A random valid 'pixels' state (B1=3, B2=4, H=2, W=5) and the same numbers as a
    'dense' state with the pixels folded into the batch."""
    g = torch.Generator().manual_seed(0)
    feats1 = torch.randn(3, 2, 5, 6, dtype=F64, generator=g)  # (B1, H, W, channels)
    feats2 = torch.randn(4, 2, 5, 6, dtype=F64, generator=g)
    cov = torch.einsum("ihwc,jhwc->ijhw", feats1, feats2) / 6
    var1 = (feats1 ** 2).mean(-1)[:, None]  # (B1, 1, H, W)
    var2 = (feats2 ** 2).mean(-1)[None]  # (1, B2, H, W)
    ntk = cov * 1.7 + 0.2
    spatial = PairKernel(cov=cov, var1=var1, var2=var2, ntk=ntk, width=6, layout=layout)
    flat = PairKernel(cov=cov.reshape(-1), var1=var1.expand_as(cov).reshape(-1),
                      var2=var2.expand_as(cov).reshape(-1), ntk=ntk.reshape(-1), width=6)
    return spatial, flat


@pytest.mark.parametrize("layer", [
    nk.ReLU(), nk.Erf(), nk.GELU(), nk.Tanh(), nk.Identity(),
    nk.serial(nk.FanOut(2), nk.parallel(nk.Identity(), nk.Sin()), nk.FanInSum()),
], ids=repr)
def test_elementwise_maps_work_on_per_pixel_covariances(layer):
    """Per-pixel covariances are just more entries: the map of a 'pixels' state equals the
    map of the same entries as a flat 'dense' state (to rounding: the two shapes take
    different vector paths)."""
    spatial, flat = _pixel_state("pixels")
    assert spatial.spatial_shape == (2, 5) and layer.kernel_layout("pixels") == "pixels"
    out, ref = layer.kernel_map(spatial), layer.kernel_map(flat)
    assert out.layout == "pixels" and out.cov.shape == (3, 4, 2, 5)
    for a, b in ((out.cov, ref.cov), (out.ntk, ref.ntk)):
        torch.testing.assert_close(a.reshape(-1), b, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(out.var1.expand_as(out.cov).reshape(-1),
                               ref.var1, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("layer", [nk.Dense(4), nk.mlp(2, 4)], ids=repr)
@pytest.mark.parametrize("layout", ["pixels", "pixel_pairs"])
def test_dense_refuses_spatial_layouts(layer, layout):
    spatial, _ = _pixel_state(layout)
    with pytest.raises(ValueError, match=f"needs the 'dense' kernel layout.*'{layout}'"):
        layer.kernel_map(spatial)
    with pytest.raises(ValueError, match="Pool or flatten"):
        layer.kernel_layout(layout)
    assert layer.kernel_layout("dense") == "dense"


def test_kernel_state_layout_is_checked():
    cov = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="layout must be one of"):
        PairKernel(cov=cov, var1=cov, var2=cov, ntk=None, width=1, layout="pixel")
    with pytest.raises(ValueError, match="same kernel layout"):
        nk.FanInSum().kernel_layout(("dense", "pixels"))
    with pytest.raises(ValueError, match="FanInSum"):  # refused before any tile
        nk.serial(nk.FanOut(2), nk.Dense(3)).kernel(torch.ones(2, 2))


# --------------------------------------------------------------------------- imports
def _imports(path: Path, module: str) -> set[str]:
    """Every ntkit module ``module`` imports, at any depth of its code (functions too),
    except under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _executed_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ntkit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ntkit":
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if _module_path(sub) else target)
    found.discard(module)
    return found


def _executed_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _module_path(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for candidate in (SRC / rel.with_suffix(".py"), SRC / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = ("ntkit",) + rel.parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[module] = _imports(path, module)
    return graph


def test_layers_never_import_the_rest_of_ntkit():
    """layers/ is the bottom of the house: it may use only itself and the shared helpers."""
    allowed = ("ntkit.layers", "ntkit._validation")
    graph = _graph()
    assert "ntkit.layers.base" in graph and "ntkit.layers.activations.quadrature" in graph
    bad = {m: sorted(t for t in targets if not t.startswith(allowed))
           for m, targets in graph.items() if m.startswith("ntkit.layers")}
    assert not {m: t for m, t in bad.items() if t}
    assert "ntkit.layers.evaluate" in graph["ntkit.layers.base"]
    assert "ntkit.layers.evaluate" in graph["ntkit.kernels.analytic"]


def test_no_import_cycles_in_ntkit():
    """Modules import strictly downwards, at module level and inside functions (a package's
    ``__init__`` is not counted as imported by its own submodules: Python runs it first in
    any case)."""
    graph = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if m.startswith(t + ".") and t in graph:  # a submodule reaching its package
                continue
            if state.get(t) == 1 and not cycle:
                cycle.extend(path[path.index(t):] + [t] if t in path else [m, t])
            elif not state.get(t):
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [m])
    assert not cycle, " -> ".join(cycle)
