"""ntkit.scale: tiled and out-of-core kernels, resumable zarr output, CG/Nyström solves, Dask.

Reference values are computed independently: the untiled ``net.kernel`` call, dense
``scipy.linalg.solve``, and eigenvalues of dense matrices with numpy.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg
import torch

import ntkit as nk
from ntkit.scale import (
    DenseOperator,
    KernelOperator,
    NystromPreconditioner,
    dask_kernel,
    kernel_matrix,
    solve,
)
from ntkit.layers import evaluate as evaluate_module
from ntkit.scale import tiled as tiled_module

NET = nk.mlp(3, 512)  # depth-3 ReLU, W_std=1, b_std=0.1

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _data(n, d=6, seed=0):
    gen = np.random.default_rng(seed)
    return gen.standard_normal((n, d))


# ----------------------------------------------------------------------------- tolerances
# Two *different* schedules (tile sizes, tiled vs whole, Dask blocks) agree to rounding, not
# bit for bit: BLAS sums the input Gram entries g = x.x'/n0 in an order that depends on the
# block shapes (measured on an AVX-512 MKL machine: ~1% of entries differ, by <= 7e-16 of the
# entry scale below). The error budget, relative to the entry scale s = sqrt(K(x,x) K(x',x')):
# * the Gram entry: |dg| <= gamma_d |x||x'|/n0 ~ d u sqrt(g(x,x) g(x',x')) (u = 1.1e-16,
#   d = 6 features here), i.e. ~7e-16 relative;
# * each Dense+ReLU layer maps the covariance c to W^2 sqrt(qq') k1(rho) + b^2 with
#   dk1/drho = k0(rho) in [0, 1]: the NNGP's relative error does not grow (W_std = 1);
# * the NTK also multiplies by k0(rho) = (pi - arccos rho)/pi, whose slope 1/(pi sqrt(1-rho^2))
#   is unbounded as rho -> 1. rho = 1 itself is exact in every schedule (diagonal tiles and
#   duplicate rows go through the symmetric path, and _correlation makes rho exactly 1), so only
#   near-duplicate rows amplify; `_arccos_amplification` measures the largest slope over the
#   test's off-diagonal pairs at every ReLU (2.5 for these inputs) and the helper asserts it
#   stays below 10.
# With L = 2 ReLUs the budget is ~ d u (1 + L * 10) ~ 1.5e-14, so RTOL = 1e-13 leaves a margin
# while still catching any real defect (a wrong or misplaced tile is off by O(1)).
RTOL = 1e-13


def _arccos_amplification(X1, X2=None):
    """max over off-diagonal pairs and ReLU inputs of 1/(pi sqrt(1 - rho^2))."""
    worst = 0.0
    for k in (1, 2):  # the ReLUs of NET = mlp(3) see the outputs of mlp(1) and mlp(2)
        pre = nk.mlp(k, 512)
        K = pre.kernel(X1, X2, get="nngp").nngp
        d1 = pre.kernel(X1, get="nngp", diagonal=True).nngp
        d2 = d1 if X2 is None else pre.kernel(X2, get="nngp", diagonal=True).nngp
        rho = (K / (d1[:, None] * d2[None, :]).sqrt()).abs()
        if X2 is None:
            rho.fill_diagonal_(0.0)
        worst = max(worst, float(1 / (np.pi * torch.sqrt(1 - rho.max().clamp(max=1) ** 2))))
    return worst


def assert_same_kernel_to_rounding(actual, expected, X1, X2=None, get="ntk"):
    """Entries equal to RTOL of their scale sqrt(K(x,x) K(x',x')) (see the comment above)."""
    assert _arccos_amplification(X1, X2) < 10, "near-duplicate rows: the budget does not hold"
    actual, expected = torch.as_tensor(np.asarray(actual)), torch.as_tensor(np.asarray(expected))
    assert actual.shape == expected.shape
    d1 = NET.kernel(X1, get=get, diagonal=True)[get]
    d2 = d1 if X2 is None else NET.kernel(X2, get=get, diagonal=True)[get]
    scale = (d1[:, None] * d2[None, :]).sqrt()
    err = float(((actual - expected).abs() / scale).max())
    assert err <= RTOL, f"max error {err:.3g} of the entry scale exceeds {RTOL}"


# ----------------------------------------------------------------------------- kernel_matrix
@pytest.mark.parametrize("get,tile", [("ntk", 128), ("ntk", 150), ("nngp", 128),
                                      ("nngp", 1000)])
def test_tiled_kernel_matches_the_full_computation(get, tile):
    # 150 does not divide the analytic kernel's own 512-row tiles; 1000 is a single tile.
    X = _data(400)
    full = NET.kernel(X, get=get)[get]
    tiled = kernel_matrix(NET, X, get=get, tile=tile, progress=False)
    assert tiled.dtype == torch.float64 and tiled.shape == (400, 400)
    assert torch.equal(tiled, tiled.T)  # mirrored tiles: exactly symmetric
    assert_same_kernel_to_rounding(tiled, full, X, get=get)
    # The same schedule rerun gives the same bits; a single tile *is* the full computation.
    assert torch.equal(kernel_matrix(NET, X, get=get, tile=tile, progress=False), tiled)
    if tile >= 400:
        assert torch.equal(tiled, full)
    X2 = _data(150, seed=1)
    assert_same_kernel_to_rounding(kernel_matrix(NET, X, X2, get=get, tile=tile, progress=False),
                                   NET.kernel(X, X2, get=get)[get], X, X2, get=get)


def test_zarr_output_matches_memory_and_uses_tile_chunks(tmp_path):
    X = _data(500)
    arr = kernel_matrix(NET, X, tile=128, out=tmp_path / "k.zarr", progress=False)
    assert arr.chunks == (128, 128) and arr.shape == (500, 500)
    assert arr.attrs["ntkit_complete"] is True and arr.attrs["ntkit_format"] == 2
    # Same tiles, same process: the same bits as the in-memory tiled kernel.
    assert np.array_equal(arr[:], kernel_matrix(NET, X, tile=128, progress=False).numpy())
    assert_same_kernel_to_rounding(arr[:], NET.kernel(X, get="ntk").ntk, X)


def _counting_tiles(monkeypatch):
    """Record every tile the evaluator computes (values untouched); with tile <= 256 a block
    of kernel_matrix is one tile of the evaluator."""
    computed = []
    original = evaluate_module._compute_tile

    def counting_tile(pair, rows, cols):
        computed.append((rows.start, cols.start))
        return original(pair, rows, cols)

    monkeypatch.setattr(evaluate_module, "_compute_tile", counting_tile)
    return computed


def test_zarr_refuses_to_resume_a_different_kernel(tmp_path, monkeypatch):
    X = _data(300)
    path = tmp_path / "k.zarr"
    first = kernel_matrix(NET, X, tile=128, out=path, progress=False)[:]
    computed = _counting_tiles(monkeypatch)
    for kwargs in ({"X1": X + 1.0}, {"get": "nngp"}, {"tile": 100}, {"dtype": torch.float32},
                   {"X2": _data(7, seed=9)}):
        call = {"X1": X, "tile": 128, **kwargs}
        with pytest.raises(ValueError, match="holds a kernel of different inputs, network"):
            kernel_matrix(NET, call.pop("X1"), out=path, progress=False, **call)
    assert computed == []  # refused before any work
    assert np.array_equal(kernel_matrix(NET, X, tile=128, out=path, progress=False)[:], first)
    assert computed == []  # an identical call resumes a complete store: nothing to compute
    arr = kernel_matrix(NET, X + 1.0, tile=128, out=path, resume=False, progress=False)
    assert len(computed) == 6  # 3 x 3 tiles, 6 on or above the diagonal
    assert_same_kernel_to_rounding(arr[:], NET.kernel(X + 1.0, get="ntk").ntk, X + 1.0)


def tanh_of(t):  # a module-level activation: rebuilt networks find the same function
    return torch.tanh(t)


def _scaled_tanh(t, a):
    return torch.tanh(a * t)


def _fake_tiles(monkeypatch):
    """Cheap stand-in tiles (zeros) for tests about which store may be resumed: refusing
    depends on the fingerprint only, and a quadrature activation's real tile costs seconds."""
    def fake_tile(pair, rows, cols):
        zeros = torch.zeros(rows.stop - rows.start, cols.stop - cols.start, dtype=pair.t1.dtype)
        return {name: zeros for name in pair.names}

    monkeypatch.setattr(evaluate_module, "_compute_tile", fake_tile)


def _resume_refused(net_a, net_b, path, X):
    kernel_matrix(net_a, X, tile=16, out=path, resume=False, progress=False)
    with pytest.raises(ValueError, match="different inputs, network"):
        kernel_matrix(net_b, X, tile=16, out=path, progress=False)


@pytest.mark.parametrize("change", ["W_std", "b_std", "depth", "activation", "lambdas",
                                    "partials", "default", "edited", "derivative",
                                    "custom_layer"])
def test_resume_is_refused_for_a_different_network(tmp_path, monkeypatch, change):
    X = _data(24, d=3, seed=2)
    _fake_tiles(monkeypatch)

    def act(t, a=0.5):
        return torch.tanh(a * t)

    def edited(t, a=0.5):
        return torch.sin(a * t)

    if change == "W_std":
        pair = nk.mlp(3, 8, W_std=1.0), nk.mlp(3, 8, W_std=1.5)
    elif change == "b_std":
        pair = nk.mlp(3, 8, b_std=0.1), nk.mlp(3, 8, b_std=0.2)
    elif change == "depth":
        pair = nk.mlp(3, 8), nk.mlp(4, 8)
    elif change == "activation":
        pair = nk.mlp(3, 8), nk.mlp(3, 8, activation="erf")
    elif change == "lambdas":
        pair = (nk.mlp(2, 8, activation=lambda t: torch.tanh(t)),
                nk.mlp(2, 8, activation=lambda t: torch.tanh(2 * t)))
    elif change == "partials":
        pair = (nk.mlp(2, 8, activation=functools.partial(_scaled_tanh, a=0.5)),
                nk.mlp(2, 8, activation=functools.partial(_scaled_tanh, a=2.0)))
    elif change in ("default", "edited"):
        net = nk.mlp(2, 8, activation=act)
        kernel_matrix(net, X, tile=16, out=tmp_path / "k.zarr", progress=False)
        if change == "default":
            act.__defaults__ = (2.0,)  # the user changed the default between runs
        else:
            act.__code__ = edited.__code__  # ... or edited the body
        with pytest.raises(ValueError, match="different inputs, network"):
            kernel_matrix(net, X, tile=16, out=tmp_path / "k.zarr", progress=False)
        return
    elif change == "derivative":
        pair = (nk.mlp(2, 8, activation=nk.Elementwise(torch.tanh, derivative=_sech2)),
                nk.mlp(2, 8, activation=nk.Elementwise(
                    torch.tanh, derivative=lambda t: 1 - torch.tanh(t))))
    else:
        pair = nk.serial(nk.Dense(8), _HiddenScale(1.0)), nk.serial(nk.Dense(8), _HiddenScale(3.0))
        assert repr(pair[0]) == repr(pair[1])  # the repr omits the state
    _resume_refused(*pair, tmp_path / "k.zarr", X)


class _HiddenScale(nk.Layer):
    """A custom layer whose repr omits its state: it scales the kernels by ``c``."""

    def __init__(self, c):
        self._c = c

    def kernel_map(self, k):
        return k.replace(cov=k.cov * self._c, var1=k.var1 * self._c, var2=k.var2 * self._c,
                         ntk=None if k.ntk is None else k.ntk * self._c)

    def __repr__(self):
        return "HiddenScale()"


def _sech2(t):
    return 1 - torch.tanh(t) ** 2


def test_a_sweep_into_one_path_gets_each_networks_kernel(tmp_path):
    # Finding H1: the same lambda source with a different captured value, into one out path.
    # (With derivative= given, a quadrature tile costs about a second rather than five.)
    X = _data(10, d=3)
    path = tmp_path / "sweep.zarr"
    for a in (0.5, 2.0):
        act = nk.Elementwise(lambda t, a=a: torch.tanh(a * t),
                             derivative=lambda t, a=a: a * (1 - torch.tanh(a * t) ** 2))
        net = nk.mlp(2, 64, activation=act)
        try:
            K = kernel_matrix(net, X, tile=10, out=path, progress=False)[...]
        except ValueError as err:  # refusing is right; mixing is not
            assert a != 0.5 and "different inputs, network" in str(err)
            K = kernel_matrix(net, X, tile=10, out=path, resume=False, progress=False)[...]
        # one tile: the same call as the whole kernel, so the same bits
        assert np.array_equal(K, net.kernel(X, get="ntk").ntk.numpy()), a


def test_an_identical_rebuild_resumes(tmp_path, monkeypatch):
    X = _data(12, d=3, seed=3)
    path = tmp_path / "k.zarr"

    def build():
        return nk.mlp(3, 16, activation=nk.Elementwise(tanh_of, derivative=_sech2),
                      W_std=1.3, b_std=0.2)

    first = kernel_matrix(build(), X, tile=12, out=path, progress=False)[:]
    computed = _counting_tiles(monkeypatch)
    again = kernel_matrix(build(), X, tile=12, out=path, progress=False)[:]
    assert computed == [] and np.array_equal(again, first)
    kernel_matrix(nk.mlp(3, 16, activation="tanh"), X, tile=4, out=tmp_path / "t.zarr",
                  progress=False)
    assert len(computed) == 6
    kernel_matrix(nk.mlp(3, 16, activation="tanh"), X, tile=4, out=tmp_path / "t.zarr",
                  progress=False)
    assert len(computed) == 6  # the built-in tanh resumes as well


def test_an_unfingerprintable_network_writes_but_never_resumes(tmp_path, monkeypatch):
    X = _data(16, d=3)
    _fake_tiles(monkeypatch)
    gen = torch.Generator().manual_seed(0)  # opaque C state captured by the activation

    def noisy(t):
        return torch.tanh(t) + 0 * torch.rand((), generator=gen, dtype=t.dtype)

    net = nk.mlp(2, 8, activation=noisy)
    path = tmp_path / "k.zarr"
    arr = kernel_matrix(net, X, tile=8, out=path, progress=False)
    assert arr.attrs["ntkit_complete"] is True and "gen" in arr.attrs["ntkit_fingerprint_opaque"]
    with pytest.raises(ValueError, match="cannot be fingerprinted") as info:
        kernel_matrix(net, X, tile=8, out=path, progress=False)
    message = str(info.value)
    assert "(gen)" in message and "Generator" in message, message
    assert "new out path" in message and "resume=False" in message
    kernel_matrix(net, X, tile=8, out=path, resume=False, progress=False)


def test_fingerprint_describes_what_determines_the_numbers():
    from ntkit._fingerprint import fingerprint

    fp = lambda obj: fingerprint(obj).digest  # noqa: E731
    assert fp(nk.mlp(3, 64, activation=tanh_of)) == fp(nk.mlp(3, 64, activation=tanh_of))
    assert fp(nk.mlp(3, 64, W_std=1.0)) != fp(nk.mlp(3, 64, W_std=1.0 + 2**-52))  # exact floats
    assert fp(lambda t: t * 2) != fp(lambda t: t * 3)
    assert fp(functools.partial(_scaled_tanh, a=1)) != fp(functools.partial(_scaled_tanh, a=2))
    # closure contents and the current values of the globals a function reads
    cells = [(lambda c: (lambda t: t * c))(c) for c in (1.0, 2.0)]
    assert fp(cells[0]) != fp(cells[1])
    # torch modules by their weights
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    assert fp(a) == fp(b)
    with torch.no_grad():
        b.weight[0, 0] += 1
    assert fp(a) != fp(b)
    # library callables by name, without walking their code
    for f in (torch.relu, torch.nn.functional.relu, np.tanh, math.sin, torch.Tensor.tanh,
              torch.nn.GELU()):
        result = fingerprint(f)
        assert result.opaque is None and result.digest == fingerprint(f).digest
    assert fingerprint(torch.Generator()).opaque is not None


# ----------------------------------------------------------------------------- ownership
def test_a_foreign_zarr_group_is_never_deleted(tmp_path):
    import zarr

    X = _data(10, d=3)
    path = tmp_path / "grp.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("important", shape=(3,), dtype="f8")[:] = [1, 2, 3]
    foreign_array = tmp_path / "arr.zarr"
    zarr.create_array(store=str(foreign_array), shape=(10, 10), dtype="f8")[:] = 7.0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    a_file = tmp_path / "file.zarr"
    a_file.write_text("mine")
    for target, what in ((path, "a zarr group"), (foreign_array, "without ntkit's marker"),
                         (notes, "not a zarr"), (a_file, "a file")):
        for resume in (True, False):
            with pytest.raises(ValueError, match="was not written by ntkit") as info:
                kernel_matrix(NET, X, out=target, resume=resume, progress=False)
            assert what in str(info.value) and "resume=False" not in str(info.value)
    assert list(zarr.open_group(str(path), mode="r")["important"][:]) == [1, 2, 3]
    assert (zarr.open_array(str(foreign_array), mode="r")[:] == 7.0).all()
    assert (notes / "todo.txt").read_text() == "mine" and a_file.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory holds nothing to lose
    assert kernel_matrix(NET, X, out=empty, progress=False).attrs["ntkit_complete"] is True


def test_resume_false_replaces_only_what_ntkit_wrote(tmp_path):
    import json

    X = _data(20, d=3)
    path = tmp_path / "k.zarr"
    kernel_matrix(NET, X, tile=8, out=path, progress=False)
    (path / "README.txt").write_text("the user's note about this kernel")
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["ntkit_format"]  # as written by ntkit 0.1 (fingerprint of repr)
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="older ntkit.*pass resume=False to overwrite it"):
        kernel_matrix(NET, X, tile=8, out=path, progress=False)
    arr = kernel_matrix(NET, X, tile=8, out=path, resume=False, progress=False)
    assert arr.attrs["ntkit_format"] == 2 and arr.attrs["ntkit_complete"] is True
    assert (path / "README.txt").read_text() == "the user's note about this kernel"


# ----------------------------------------------------------------------------- damage
def _chunk(path, key):
    return path / "c" / key[0] / key[1]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "overwritten", "mirror-deleted",
                                    "marker-garbled"])
def test_a_damaged_store_is_repaired_on_resume(tmp_path, monkeypatch, damage):
    X = _data(40, d=3)
    path = tmp_path / "k.zarr"
    first = kernel_matrix(NET, X, tile=16, out=path, progress=False)[:]  # 3 x 3 chunks
    chunk = _chunk(path, ("0", "1") if damage != "mirror-deleted" else ("1", "0"))
    if damage in ("deleted", "mirror-deleted"):
        chunk.unlink()
    elif damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:1024])
    elif damage == "overwritten":
        data = bytearray(chunk.read_bytes())
        data[800:808] = np.float64(0.5).tobytes()  # plausible bytes, same length
        chunk.write_bytes(bytes(data))
    else:
        (path / "ntkit_progress" / "0_1").write_text("not a checksum")
    computed = _counting_tiles(monkeypatch)
    with pytest.warns(RuntimeWarning, match="1 of the 6 finished tiles .* recomputed"):
        arr = kernel_matrix(NET, X, tile=16, out=path, progress=False)
    assert computed == [(0, 16)]  # only the damaged tile
    assert arr.attrs["ntkit_complete"] is True
    assert np.array_equal(arr[:], first)  # same tiles, same process: the same bits


# ----------------------------------------------------------------------------- kill & resume
_WORKER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import torch
    import ntkit as nk
    from ntkit.scale import kernel_matrix, store

    torch.set_num_threads(int(sys.argv[3]))  # the parent's count: same gemm, same bits
    kill_at = int(sys.argv[4])
    # Die at the kill_at-th tile marker: that tile's chunks are written, its marker is not.
    original = store._write_marker
    calls = []
    def write_marker_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    store._write_marker = write_marker_then_die
    # Fingerprints seen by a fresh process, compared with the parent's.
    sys.path.insert(0, sys.argv[5])
    import useract
    from ntkit._fingerprint import fingerprint
    with open(sys.argv[6], "w") as fh:
        for net in (nk.mlp(3, 16, activation=useract.act), nk.mlp(3, 16, activation="tanh")):
            fh.write(fingerprint(net).digest + " ")
    X = np.load(sys.argv[1])
    kernel_matrix(nk.mlp(3, 512), X, tile=64, out=sys.argv[2], progress=False)
""")


def _fingerprints_here(folder):
    """The parent's fingerprints of the worker's two networks (and a check that a global the
    user function reads is part of its fingerprint)."""
    from ntkit._fingerprint import fingerprint

    sys.path.insert(0, str(folder))
    try:
        import useract
        here = [fingerprint(nk.mlp(3, 16, activation=useract.act)).digest,
                fingerprint(nk.mlp(3, 16, activation="tanh")).digest]
        useract.SCALE = 2.0
        assert fingerprint(nk.mlp(3, 16, activation=useract.act)).digest != here[0]
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("useract", None)
    return here


def test_killed_run_resumes_to_a_bit_identical_result(tmp_path, monkeypatch):
    X = _data(640, seed=3)  # 10 x 10 tiles of 64 -> 55 on/above the diagonal
    np.save(tmp_path / "x.npy", X)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    path = tmp_path / "k.zarr"
    kill_at = 9
    (tmp_path / "useract.py").write_text("import torch\nSCALE = 1.5\n\n"
                                         "def act(t):\n    return torch.tanh(SCALE * t)\n")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "x.npy"), str(path),
                           str(torch.get_num_threads()), str(kill_at), str(tmp_path),
                           str(tmp_path / "fingerprints.txt")], timeout=300)
    assert proc.returncode == -signal.SIGKILL
    # A user's module-level function and a built-in quadrature activation fingerprint alike
    # in another process (the ReLU net's agreement is shown by the resume below).
    assert (tmp_path / "fingerprints.txt").read_text().split() == _fingerprints_here(tmp_path)
    progress = path / "ntkit_progress"
    assert len(list(progress.iterdir())) == kill_at - 1  # the 9th tile is written, unmarked

    computed = _counting_tiles(monkeypatch)
    arr = kernel_matrix(NET, X, tile=64, out=path, progress=False)
    assert len(computed) == 55 - (kill_at - 1)  # only the unmarked tiles were computed
    monkeypatch.undo()
    uninterrupted = kernel_matrix(NET, X, tile=64, out=tmp_path / "ref.zarr", progress=False)
    resumed = arr[:]
    assert not np.isnan(resumed).any()
    # Same tiles, same thread count: resuming is bit-identical to not being interrupted.
    assert np.array_equal(resumed.view(np.uint64), uninterrupted[:].view(np.uint64))
    assert_same_kernel_to_rounding(resumed, NET.kernel(X, get="ntk").ntk, X)


def test_dense_request_beyond_memory_raises_before_allocating(monkeypatch):
    X = np.ones((200_000, 1))  # the kernel would need 298 GiB
    monkeypatch.setattr(evaluate_module, "available_memory", lambda device: 64 * 2**30)

    def forbidden(*args, **kwargs):
        raise AssertionError("a tile was computed")

    monkeypatch.setattr(evaluate_module, "_compute_tile", forbidden)
    with pytest.raises(MemoryError) as info:
        kernel_matrix(NET, X, progress=False)
    message = str(info.value)
    assert "298.0 GiB" in message and "64.0 GiB" in message
    assert "out=" in message and "method='cg'" in message


def test_an_overflowing_block_names_the_global_row_and_is_never_stored(tmp_path):
    # Row 70 has a finite input Gram entry (1e300) but a self-kernel that overflows after
    # three layers of W_std^2 = 900. It lies in block 2 of tile=32 (local row 6): the error
    # must name the row of X1, not a row of the block.
    X = _data(100, d=3)
    X[70] = 1e150
    net = nk.mlp(3, 512, W_std=30.0)
    with pytest.raises(ValueError, match=r"not finite .* for rows \[70\] of X1\b"):
        kernel_matrix(net, X, tile=32, progress=False)
    path = tmp_path / "k.zarr"
    with pytest.raises(ValueError, match=r"not finite .* for rows \[70\] of X1\b"):
        kernel_matrix(net, X, tile=32, out=path, progress=False)
    # Blocks are computed row by row; (0, 2) holds column 70: refused before it is stored.
    assert sorted(p.name for p in (path / "ntkit_progress").iterdir()) == ["0_0", "0_1"]


def test_kernel_matrix_rejects_bad_input():
    X = _data(20)
    with pytest.raises(ValueError, match="get must be one of"):
        kernel_matrix(NET, X, get="both", progress=False)
    with pytest.raises(ValueError, match="tile must be an integer >= 1"):
        kernel_matrix(NET, X, tile=0, progress=False)
    with pytest.raises(ValueError, match="X1 has 6 features but X2 has 3"):
        kernel_matrix(NET, X, _data(5, d=3), progress=False)
    bad = X.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"X1 contains NaN or infinite values in rows \[4\]"):
        kernel_matrix(NET, bad, progress=False)
    with pytest.raises(ValueError, match="net must be an ntkit network"):
        kernel_matrix("relu", X, progress=False)


# ----------------------------------------------------------------------------- solvers
def _problem(n=300, d=6, seed=0, k=None):
    X = _data(n, d=d, seed=seed)
    gen = np.random.default_rng(seed + 100)
    y = np.sin(X @ gen.standard_normal(d)) if k is None else gen.standard_normal((n, k))
    K = NET.kernel(X, get="ntk").ntk.numpy()
    return X, y, K


def test_tiled_matvec_equals_dense():
    X, _, K = _problem(n=333)
    V = np.random.default_rng(1).standard_normal((333, 3))
    op = KernelOperator(NET, X, tile=100)
    np.testing.assert_allclose(op.matmul(torch.from_numpy(V)).numpy(), K @ V, rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(op.diagonal().numpy(), np.diag(K), rtol=1e-13)
    np.testing.assert_allclose(op.columns(torch.tensor([3, 7])).numpy(), K[:, [3, 7]],
                               rtol=1e-13)


@pytest.mark.parametrize("method,preconditioner", [("cholesky", None), ("cg", None),
                                                   ("cg", "nystrom")])
def test_solvers_match_a_dense_scipy_solve(method, preconditioner):
    X, Y, K = _problem(k=2)
    lam = 1e-2 * np.mean(np.diag(K))
    expected = scipy.linalg.solve(K + lam * np.eye(len(K)), Y, assume_a="pos")
    res = solve(NET, X, Y, method=method, preconditioner=preconditioner, diag_reg=1e-2,
                tol=1e-10, n_landmarks=100, tile=128)
    assert res.ridge == pytest.approx(lam, rel=1e-14)
    assert res.coef.shape == (300, 2) and res.converged
    np.testing.assert_allclose(res.coef.numpy(), expected, rtol=0, atol=1e-7 * np.abs(
        expected).max())


def test_nystrom_preconditioner_cuts_cg_iterations():
    # Low intrinsic dimension and a small ridge: a fast-decaying spectrum, an ill-posed system.
    _, y, K = _problem(n=500, d=3, seed=4)
    plain = solve(K, None, y, method="cg", diag_reg=1e-6, tol=1e-8, max_iter=5000)
    pre = solve(K, None, y, method="cg", preconditioner="nystrom", diag_reg=1e-6, tol=1e-8,
                n_landmarks=150, max_iter=5000)
    assert plain.converged and pre.converged
    assert pre.iterations * 4 < plain.iterations, (pre.iterations, plain.iterations)
    np.testing.assert_allclose(pre.coef.numpy(), plain.coef.numpy(), rtol=0,
                               atol=1e-5 * np.abs(plain.coef.numpy()).max())


def test_nystrom_condition_number_and_exact_limit():
    _, _, K = _problem(n=300, d=2, seed=5)
    mu = 1e-5 * np.mean(np.diag(K))
    A = K + mu * np.eye(300)
    op = DenseOperator(K)
    P = NystromPreconditioner(op, mu, n_landmarks=80)
    Pinv = P(torch.eye(300, dtype=torch.float64)).numpy()
    assert np.allclose(Pinv, Pinv.T, atol=1e-12)
    assert np.linalg.eigvalsh(Pinv).min() > 0  # symmetric positive definite
    # The spectrum of P^{-1} A is that of the symmetric P^{-1/2} A P^{-1/2}.
    w, V = np.linalg.eigh(Pinv)
    half = V @ np.diag(np.sqrt(w)) @ V.T
    ev = np.linalg.eigvalsh(half @ A @ half)
    ev_a = np.linalg.eigvalsh(A)
    assert ev.max() / ev.min() < 1e-2 * ev_a.max() / ev_a.min()  # measured: 715 vs 3.6e5
    # With every point a landmark the approximation is exact: CG needs one or two steps.
    full = solve(K, None, np.ones(300), method="cg", preconditioner="nystrom", diag_reg=1e-5,
                 n_landmarks=300, tol=1e-8)
    assert full.iterations <= 3


def test_cg_never_forms_the_dense_kernel(monkeypatch):
    X, y, K = _problem(n=300)
    sizes = []
    original = tiled_module.kernel_tile

    def recording_tile(net, X1, X2, rows, cols, get, symmetric):
        sizes.append((rows.stop - rows.start) * (cols.stop - cols.start))
        return original(net, X1, X2, rows, cols, get, symmetric)

    def forbidden(*args, **kwargs):
        raise AssertionError("the dense kernel was requested")

    import ntkit.scale.solvers as solvers_module
    monkeypatch.setattr(solvers_module, "kernel_tile", recording_tile)
    monkeypatch.setattr(tiled_module, "_kernel_in_memory", forbidden)
    res = solve(NET, X, y, method="cg", diag_reg=1e-2, tol=1e-7, tile=128)
    assert res.converged and max(sizes) <= 128 * 128
    expected = scipy.linalg.solve(K + res.ridge * np.eye(300), y, assume_a="pos")
    np.testing.assert_allclose(res.coef.numpy(), expected, atol=1e-5 * np.abs(expected).max())


def test_solve_rejects_bad_arguments():
    X, y, _ = _problem(n=50)
    with pytest.raises(ValueError, match="y must have shape"):
        solve(NET, X, y[:-1])
    with pytest.raises(ValueError, match="method"):
        solve(NET, X, y, method="lu")
    with pytest.raises(ValueError, match="method='cg'"):
        solve(NET, X, y, preconditioner="nystrom")
    with pytest.raises(ValueError, match="diag_reg"):
        solve(NET, X, y, method="cg", preconditioner="nystrom", diag_reg=0.0)
    with pytest.raises(ValueError, match="diag_reg"):
        solve(NET, X, y, diag_reg=-1.0)
    with pytest.raises(ValueError, match="diag_reg"):
        solve(NET, np.vstack([X, X[:1]]), np.append(y, 0.0))  # repeated row, no ridge
    with pytest.raises(ValueError, match="NaN"):
        solve(NET, X, np.where(np.arange(50) == 3, np.nan, y))
    with pytest.raises(ValueError, match="net_or_operator"):
        solve("ntk", X, y)


# ----------------------------------------------------------------------------- dask
def test_dask_kernel_local_scheduler_matches_kernel_matrix():
    X, X2 = _data(300), _data(170, seed=2)
    K = dask_kernel(NET, X, chunks=128)
    assert K.chunks == ((128, 128, 44), (128, 128, 44))
    dense = K.compute(scheduler="synchronous")
    # Dask blocks are another schedule: equal to rounding (see RTOL); its upper-triangle
    # blocks are the same calls as kernel_matrix's tiles, so the same bits.
    assert_same_kernel_to_rounding(dense, NET.kernel(X, get="ntk").ntk, X)
    tiled = kernel_matrix(NET, X, tile=128, progress=False).numpy()
    upper = np.triu(np.ones((3, 3), dtype=bool)).repeat([128, 128, 44], 0).repeat(
        [128, 128, 44], 1)
    assert np.array_equal(dense[upper], tiled[upper])
    Kx = dask_kernel(NET, X, X2, chunks=100, get="nngp")
    assert_same_kernel_to_rounding(Kx.compute(), NET.kernel(X, X2, get="nngp").nngp, X, X2,
                                   get="nngp")
    with pytest.raises(ValueError, match="X1 has 6 features but X2 has 2"):
        dask_kernel(NET, X, _data(5, d=2))
    with pytest.raises(ValueError, match="chunks must be an integer >= 1"):
        dask_kernel(NET, X, chunks=0)


def test_dask_input_with_nan_names_the_argument_and_the_global_row():
    import dask.array as da

    Xn = _data(30, d=3)
    Xn[13, 0] = np.nan  # block 1 (rows 8-15) of X1, local row 5
    net = nk.mlp(3, 64)
    with pytest.raises(ValueError, match=r"X1 contains NaN or infinite values in rows \[13\]"):
        dask_kernel(net, da.from_array(Xn, chunks=(8, 3)), chunks=8).compute(
            scheduler="synchronous")
    with pytest.raises(ValueError, match=r"X2 contains NaN or infinite values in rows \[13\]"):
        dask_kernel(net, _data(10, d=3), da.from_array(Xn, chunks=(8, 3)), chunks=8).compute(
            scheduler="synchronous")
    clean = _data(30, d=3)
    assert_same_kernel_to_rounding(
        dask_kernel(NET, da.from_array(clean, chunks=(7, 3)), chunks=8).compute(),
        NET.kernel(clean, get="ntk").ntk, clean)


def test_dask_block_overflow_names_the_argument_and_the_global_row():
    """An overflowing row is named as the user's row of X1/X2, not the block's (row 13 sits
    in block 1, rows 8-15, as local row 5)."""
    net = nk.mlp(3, 64)
    big = _data(30, d=3)
    big[13] *= 1e200
    with pytest.raises(ValueError, match=r"not finite .* for rows \[13\] of X1:"):
        dask_kernel(net, big, chunks=8).compute(scheduler="synchronous")
    with pytest.raises(ValueError, match=r"not finite .* for rows \[13\] of X2:"):
        dask_kernel(net, _data(10, d=3), big, chunks=8).compute(scheduler="synchronous")


def test_dask_kernel_on_a_real_local_cluster():
    from dask.distributed import Client, LocalCluster, get_task_stream

    X = _data(400, seed=7)
    v = np.random.default_rng(8).standard_normal(400)
    K_ref = NET.kernel(X, get="ntk").ntk.numpy()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        worker_pids = set(client.run(os.getpid).values())
        assert len(worker_pids) == 2 and os.getpid() not in worker_pids
        K = dask_kernel(NET, X, chunks=100)  # 16 blocks
        with get_task_stream(client) as stream:
            dense = K.compute()
            matvec = (K @ v).compute()
        assert_same_kernel_to_rounding(dense, K_ref, X)
        # Summation order differs (blocks): compare on the scale of the terms.
        np.testing.assert_allclose(matvec, K_ref @ v, rtol=0,
                                   atol=1e-12 * np.abs(K_ref).sum(1).max() * np.abs(v).max())
        workers = {task["worker"] for task in stream.data}
        assert workers and workers <= set(cluster.scheduler_info["workers"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiles_and_solves_follow_the_input_device():
    X, y, K = _problem(n=200)
    Xc = torch.as_tensor(X, device="cuda")
    Kc = kernel_matrix(NET, Xc, tile=64, progress=False)
    assert Kc.device.type == "cuda"
    np.testing.assert_allclose(Kc.cpu().numpy(), K, rtol=1e-12, atol=1e-12)
    res = solve(NET, Xc, torch.as_tensor(y, device="cuda"), method="cg",
                preconditioner="nystrom", diag_reg=1e-2, n_landmarks=50, tol=1e-10, tile=64)
    assert res.coef.device.type == "cuda"
    expected = scipy.linalg.solve(K + res.ridge * np.eye(200), y, assume_a="pos")
    np.testing.assert_allclose(res.coef.cpu().numpy(), expected, atol=1e-7)
