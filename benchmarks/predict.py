"""Closed-form MSE prediction of an infinitely wide network: ntkit vs neural-tangents.

Workload (as in shared/reference/anchor-timings.md, "Closed-form prediction"): the depth-4
ReLU MLP (W_std=1, b_std=0.1), N_train = 2000 and N_test = 1000 inputs of dim 784 (uniform),
one output, the mean prediction only:

* t = inf: both kernels (train-train NTK, test-train NTK), then the solve
  (``nk.predict.gradient_descent_mse(K, y)(inf, k_test_train=...)``: one Cholesky
  factorisation, no eigendecomposition, when K is safely positive definite);
* t = inf, train factorisation cached: a new test set against a fitted predictor (its
  test-train kernel and one product with the cached dual coefficients);
* t = 10: both kernels and the eigendecomposition that serves every t.

The in-process baseline is what a PyTorch user writes today: the whole-array ReLU recursion
on the 3000 stacked inputs, then ``torch.linalg.cholesky`` and ``cholesky_solve``.

Times are the best of 5 calls after a warm-up (other jobs on the cores only ever add time).
Run: ``python benchmarks/predict.py`` (under a minute). Writes
``benchmarks/results/predict.md``.
"""

from __future__ import annotations

import math

import torch

import ntkit as nk
from analytic_kernels import naive_relu_kernel
from common import best_time, write_table

N_TRAIN, N_TEST, D = 2000, 1000, 784
# neural-tangents 0.6.5, same workload and machine kind (anchor-timings.md), ms
NT_MS = {("inf", torch.float32): 427, ("inf", torch.float64): 453,
         ("cached", torch.float32): 109, ("cached", torch.float64): 113,
         ("t10", torch.float32): 654, ("t10", torch.float64): 1030}
NAIVE_ANCHOR_MS = {torch.float32: 283, torch.float64: 627}


def main() -> str:
    net = nk.mlp(4, 512, "relu", W_std=1.0, b_std=0.1)
    lines = [
        "# Closed-form MSE prediction: N_train = 2000, N_test = 1000, depth-4 ReLU NTK",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of 5 calls. "
        "neural-tangents: the anchors in shared/reference/anchor-timings.md (jax is not "
        "installed here).",
        "",
        "| workload | dtype | ntkit ms | neural-tangents ms (anchor) | NT / ntkit "
        "| naive torch ms (this run) | naive / ntkit |",
        "|---|---|---|---|---|---|---|",
    ]
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x_train = torch.rand(N_TRAIN, D, generator=g).to(dtype)
        x_test = torch.rand(N_TEST, D, generator=g).to(dtype)
        x_new = torch.rand(N_TEST, D, generator=g).to(dtype)
        y = torch.randn(N_TRAIN, 1, generator=g).to(dtype)

        def predict(t: float, x_train=x_train, x_test=x_test, y=y, dtype=dtype):
            k_train = net.kernel(x_train, get="ntk", dtype=dtype).ntk
            k_test = net.kernel(x_test, x_train, get="ntk", dtype=dtype).ntk
            return nk.predict.gradient_descent_mse(k_train, y)(t, k_test_train=k_test).test

        fitted = nk.predict.gradient_descent_mse(
            net.kernel(x_train, get="ntk", dtype=dtype).ntk, y)
        alpha = fitted.dual_coefficients(math.inf)

        def cached(x_new=x_new, x_train=x_train, alpha=alpha, dtype=dtype):
            return net.kernel(x_new, x_train, get="ntk", dtype=dtype).ntk @ alpha

        def naive(x_train=x_train, x_test=x_test, y=y):
            _, ntk = naive_relu_kernel(torch.cat([x_train, x_test]))
            factor = torch.linalg.cholesky(ntk[:N_TRAIN, :N_TRAIN])
            return ntk[N_TRAIN:, :N_TRAIN] @ torch.cholesky_solve(y, factor)

        # The three answers agree (the naive recursion has the same b_std = 0.1).
        reference = naive()
        ours = predict(math.inf)
        rel = float((ours - reference).norm() / reference.norm())
        # float32: the solve amplifies rounding by cond(K) ~ 1e4, so agreement is ~1e-3.
        assert rel < (1e-2 if dtype == torch.float32 else 1e-8), rel
        assert torch.allclose(cached(), fitted(math.inf, k_test_train=net.kernel(
            x_new, x_train, get="ntk", dtype=dtype).ntk).test, rtol=1e-5, atol=1e-6)

        naive_ms = best_time(naive) * 1e3
        for label, key, fn in (("t = inf: kernels + solve", "inf", lambda: predict(math.inf)),
                               ("t = inf, train factorisation cached", "cached", cached),
                               ("t = 10: kernels + eigendecomposition", "t10",
                                lambda: predict(10.0))):
            ms = best_time(fn) * 1e3
            nt = NT_MS[(key, dtype)]
            naive_cols = (f"{naive_ms:.0f} | {naive_ms / ms:.1f}x" if key == "inf"
                          else "- | -")
            lines.append(f"| {label} | {str(dtype).split('.')[-1]} | {ms:.0f} | {nt} | "
                         f"{nt / ms:.1f}x | {naive_cols} |")
            print(lines[-1], flush=True)
    lines += [
        "",
        "The naive column computes the 3000 x 3000 joint kernel with the whole-array recursion "
        "and solves by Cholesky (the anchors measured it at "
        f"{NAIVE_ANCHOR_MS[torch.float32]} / {NAIVE_ANCHOR_MS[torch.float64]} ms in float32 / "
        "float64). Each run checks that ntkit's t = inf answer equals the naive one.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    write_table("predict", main())
