"""Full-batch gradient descent on a real network, tracking its NTK and its weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .._validation import (Tensorish, as_tensor, check_choice, check_finite,
                           check_learning_rate, check_positive_int)
from ..predict import COSTS

__all__ = ["TrainHistory", "train"]


@dataclass
class TrainHistory:
    """What :func:`train` recorded.

    Attributes:
        loss: ``(steps + 1,)`` cost at θ_0, …, θ_steps (the last after the final update),
            on the model's device.
        tracked_steps: ``(T,)`` step indices at which the other fields were recorded
            (0, ``track_every``, 2·``track_every``, …, and always ``steps``).
        probe_outputs: ``(T, P, O)`` outputs on the probe points (``None`` without probe).
        ntk: ``(T, P, P)`` empirical NTK on the probe points (the training inputs when no
            probe is given), ``output="trace"``: the mean over outputs of Θ_oo, comparable to
            the infinite-width per-output kernel. ``None`` if ``track_ntk=False``.
        kernel_change: ``(T,)`` ``‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F``.
        weight_change: ``{name: (T,)}`` for every weight matrix (parameters with ≥ 2 dims,
            trailing dims flattened): ``‖W_t − W_0‖_op / sqrt(n_l)``, ``n_l`` its fan-in
            (JGH Lemma III.2.2). In the NTK parameterization W has N(0, 1) entries, so this
            is the quantity the lemma sends to 0 as the width grows. The lemma covers the
            layers whose fan-in is a hidden width; the input layer's fan-in is the input
            dimension, which does not grow, so its entry stays O(1).
        outputs: ``(N, O)`` outputs on the training inputs after the last step.
        learning_rate, cost: as passed.
    """

    loss: torch.Tensor
    tracked_steps: np.ndarray
    probe_outputs: torch.Tensor | None
    ntk: torch.Tensor | None
    kernel_change: torch.Tensor | None
    weight_change: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: torch.Tensor | None = None
    learning_rate: float = 0.0
    cost: str = "jgh"


def _op_norm(m: torch.Tensor, tol: float = 1e-7, max_iter: int = 300) -> float:
    """Largest singular value of a matrix.

    Small matrices: the top eigenvalue of the float64 Gram matrix. Larger ones: block
    subspace iteration on ``mᵀm`` with 8 vectors. GD moves a weight matrix by a sum of
    low-rank updates, so the spectrum of ``W_t − W_0`` has a large gap and the iteration
    converges in a few dozen products, where a full SVD of a 4096 × 4096 matrix would cost
    seconds per snapshot.
    """
    if min(m.shape) <= 256:
        m64 = m.to(torch.float64)
        gram = m64.T @ m64 if m.shape[1] <= m.shape[0] else m64 @ m64.T
        return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(m.shape[1], 8, generator=gen, dtype=m.dtype).to(m.device)
    prev = 0.0
    for _ in range(max_iter):
        q, _ = torch.linalg.qr(m.T @ (m @ q))
        # Rayleigh–Ritz on the (n, 8) image: its top singular value converges to σ_max.
        sigma = float(torch.linalg.svdvals((m @ q).to(torch.float64))[0])
        if abs(sigma - prev) <= tol * max(sigma, 1e-300):
            return sigma
        prev = sigma
    return prev


def _ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from ..kernels.empirical import empirical_ntk

    return empirical_ntk(model, x, output="trace")


def _flat(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(out.shape[0], -1)


def train(model: nn.Module, x: Tensorish, y: Tensorish, *, steps: int, learning_rate: float,
          cost: str = "jgh", probe: Tensorish | None = None, track_every: int | None = None,
          track_ntk: bool = True, track_weights: bool = True,
          progress: bool = True) -> TrainHistory:
    """Train ``model`` in place by plain full-batch gradient descent on the MSE.

    Each step is ``θ ← θ − η ∇_θ C(θ)`` with ``C = ½ · mean_i ‖f(x_i) − y_i‖²``
    (``cost="jgh"``) or ``1 / (2 N n_out) · Σ_i ‖f(x_i) − y_i‖²`` (``cost="nt"``): no
    momentum, no minibatches, no weight decay, so under a constant NTK Θ the training
    residual follows ``(I − η Θ / n)^k`` exactly, as in
    ``nk.predict.gradient_descent_mse(..., discrete=True)``.

    Args:
        model: any ``nn.Module`` mapping ``(N, *in)`` to ``(N, *out)`` (outputs flattened to
            ``O`` per example), e.g. ``net.module(d)`` or ``nk.linearize(module)``.
        x: ``(N, *in)`` training inputs; y: ``(N, O)`` or ``(N,)`` targets. Both are moved to
            the model's device and parameter dtype.
        steps: number of gradient-descent steps (>= 0).
        learning_rate: η > 0.
        probe: ``(P, *in)`` inputs at which outputs and the NTK are recorded (NTK default:
            the training inputs).
        track_every: record every this many steps (default ``max(1, steps // 20)``); the
            loss is recorded at every step regardless.
        track_ntk: record NTK snapshots and the relative kernel change.
        track_weights: record ``‖W_t − W_0‖_op / sqrt(n_l)`` per weight matrix.
        progress: show a tqdm progress bar.
    Returns:
        :class:`TrainHistory`.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    check_choice(cost, "cost", COSTS)
    steps = check_positive_int(steps, "steps", minimum=0)
    lr = check_learning_rate(learning_rate)
    every = max(1, steps // 20) if track_every is None else check_positive_int(
        track_every, "track_every")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True).")
    dtype, device = params[0].dtype, params[0].device
    xt = as_tensor(x, "x", dtype=dtype, device=device)
    if xt.ndim < 2 or xt.shape[0] == 0:
        raise ValueError(f"x must have shape (N, *in) with N >= 1; got {tuple(xt.shape)}.")
    check_finite(xt, "x")
    n = xt.shape[0]
    with torch.no_grad():
        out0 = _flat(model(xt))
    n_out = out0.shape[1]
    yt = as_tensor(y, "y", dtype=dtype, device=device)
    if yt.ndim == 1:
        yt = yt[:, None]
    if tuple(yt.shape) != (n, n_out):
        raise ValueError(f"y must have shape ({n}, {n_out}) to match the model's outputs on x "
                         f"(or ({n},) for one output); got {tuple(yt.shape)}.")
    check_finite(yt, "y")
    pt = None
    if probe is not None:
        pt = as_tensor(probe, "probe", dtype=dtype, device=device)
        if pt.shape[1:] != xt.shape[1:] or pt.shape[0] == 0:
            raise ValueError(f"probe must have shape (P, {', '.join(map(str, xt.shape[1:]))}); "
                             f"got {tuple(pt.shape)}.")
    ntk_points = pt if pt is not None else xt
    norm = n if cost == "jgh" else n * n_out

    def cost_of(out: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((_flat(out) - yt) ** 2).sum() / norm

    weights = {name: p for name, p in model.named_parameters() if p.requires_grad
               and p.ndim >= 2}
    w0 = {name: p.detach().clone() for name, p in weights.items()} if track_weights else {}
    tracked: list[int] = []
    probe_out: list[torch.Tensor] = []
    ntks: list[torch.Tensor] = []
    wchange: dict[str, list[float]] = {name: [] for name in w0}
    losses = torch.empty(steps + 1, dtype=dtype, device=device)

    def record(step: int) -> None:
        tracked.append(step)
        if pt is not None:
            with torch.no_grad():
                probe_out.append(_flat(model(pt)).detach().clone())
        if track_ntk:
            ntks.append(_ntk(model, ntk_points).detach())
        for name, p in weights.items() if track_weights else ():
            delta = (p.detach() - w0[name]).reshape(p.shape[0], -1)
            wchange[name].append(_op_norm(delta) / math.sqrt(delta.shape[1]))

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, disable=not progress, desc="train", leave=False)

    def check_diverged(upto: int) -> None:
        # Checked at snapshots rather than every step: a per-step check would force a
        # device sync on every step on a GPU.
        bad = ~torch.isfinite(losses[: upto + 1])
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(f"the loss became {float(losses[first])} at step {first}: gradient "
                             f"descent diverged; lower learning_rate (now {lr:g}) below "
                             "nk.predict.max_learning_rate of the NTK.")

    try:
        for step in range(steps + 1):
            if step % every == 0 or step == steps:
                check_diverged(step - 1)
                record(step)
            for p in params:
                p.grad = None
            out = model(xt)
            loss = cost_of(out)
            losses[step] = loss.detach()
            if step == steps:
                check_diverged(step)
                final = _flat(out).detach().clone()
                break
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(g, alpha=lr)
            bar.update(1)
            if progress and step % every == 0:
                bar.set_postfix(loss=f"{float(losses[step]):.3e}")
    finally:
        bar.close()

    ntk_t = torch.stack(ntks) if ntks else None
    change = None
    if ntk_t is not None:
        ref = ntk_t[0]
        change = torch.linalg.matrix_norm(ntk_t - ref) / torch.linalg.matrix_norm(ref)
    return TrainHistory(
        loss=losses,
        tracked_steps=np.asarray(tracked),
        probe_outputs=torch.stack(probe_out) if probe_out else None,
        ntk=ntk_t,
        kernel_change=change,
        weight_change={k: torch.tensor(v, dtype=torch.float64) for k, v in wchange.items()},
        outputs=final,
        learning_rate=lr,
        cost=cost,
    )
