"""ntkit.estimators: scikit-learn conventions and the closed forms behind them.

Reference values are computed independently with numpy/scipy from ``net.kernel``: a dense
``scipy.linalg.solve``, ``scipy.linalg.expm`` for finite time, the ensemble variance as a
quadratic form in the joint Gaussian of the initial outputs, and a fixed-step RK4 integration
of the cross-entropy flow over train and test points together.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import ntkit as nk
from ntkit.estimators import NNGPRegressor, NTKClassifier, NTKRegressor
from ntkit.estimators.classifier import _project_to_simplex

NET = nk.mlp(3, 512)  # what the estimators build by default

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@parametrize_with_checks([NTKRegressor(), NNGPRegressor(), NTKRegressor(t=50.0, diag_reg=1e-3),
                          NTKRegressor(solver="cg", diag_reg=1e-3),
                          NTKRegressor(parameterization="standard", width=64),
                          NTKClassifier(), NTKClassifier(get="nngp", diag_reg=1e-4),
                          NTKClassifier(loss="cross_entropy", t=20.0),
                          NTKClassifier(solver="cg", diag_reg=1e-3)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def _regression(n=60, n_test=25, d=4, k=None, seed=0):
    gen = np.random.default_rng(seed)
    X, Xt = gen.standard_normal((n, d)), gen.standard_normal((n_test, d))
    w = gen.standard_normal((d, k or 1))
    y = np.sin(X @ w) + 0.05 * gen.standard_normal((n, k or 1))
    return X, (y[:, 0] if k is None else y), Xt


def _kernels(X, Xt, kind):
    return (NET.kernel(X, get=kind)[kind].numpy(), NET.kernel(Xt, X, get=kind)[kind].numpy(),
            NET.kernel(Xt, get=kind)[kind].numpy())


@pytest.mark.parametrize("Est,kind", [(NTKRegressor, "ntk"), (NNGPRegressor, "nngp")])
def test_converged_prediction_matches_a_dense_solve(Est, kind):
    X, y, Xt = _regression()
    K, Kt, _ = _kernels(X, Xt, kind)
    lam = 1e-3 * np.trace(K) / len(K)
    expected = Kt @ scipy.linalg.solve(K + lam * np.eye(len(K)), y, assume_a="pos")
    model = Est(diag_reg=1e-3).fit(X, y)
    assert model.ridge_ == pytest.approx(lam, rel=1e-13)
    np.testing.assert_allclose(model.predict(Xt), expected, rtol=1e-9, atol=1e-10)
    # absolute ridge
    model = Est(diag_reg=0.01, diag_reg_absolute_scale=True).fit(X, y)
    expected = Kt @ scipy.linalg.solve(K + 0.01 * np.eye(len(K)), y, assume_a="pos")
    np.testing.assert_allclose(model.predict(Xt), expected, rtol=1e-9, atol=1e-10)


def test_finite_time_matches_the_matrix_exponential():
    X, y, Xt = _regression()
    K, Kt, _ = _kernels(X, Xt, "ntk")
    n = len(K)
    for t in (0.0, 3.0, 200.0):
        # JGH flow: df/dt = -(1/N) K (f - y), f(0) = 0.
        expected = Kt @ np.linalg.solve(K, (np.eye(n) - scipy.linalg.expm(-K * t / n)) @ y)
        got = NTKRegressor(t=t).fit(X, y).predict(Xt)
        np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
    long = NTKRegressor(t=1e9).fit(X, y).predict(Xt)
    np.testing.assert_allclose(long, NTKRegressor().fit(X, y).predict(Xt), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("t", [0.0, 5.0, np.inf])
def test_ntk_ensemble_std_is_the_variance_of_the_linearised_flow(t):
    # f_t(x) = f_0(x) - Θ_xX T (f_0(X) - y), T = Θ⁻¹(I - e^{-Θt/N}), with (f_0(x), f_0(X)) a
    # centred Gaussian with the joint NNGP covariance; its variance is a quadratic form.
    X, y, Xt = _regression(n=40, n_test=15)
    n = len(X)
    theta, theta_t, _ = _kernels(X, Xt, "ntk")
    joint = NET.kernel(np.vstack([Xt, X]), get="nngp").nngp.numpy()
    if np.isinf(t):
        T = np.linalg.inv(theta)
    else:
        T = np.linalg.solve(theta, np.eye(n) - scipy.linalg.expm(-theta * t / n))
    M = np.hstack([np.eye(len(Xt)), -theta_t @ T])        # f_t(x) - mean = M (f_0(x), f_0(X))
    expected = np.sqrt(np.clip(np.einsum("ij,jk,ik->i", M, joint, M), 0, None))
    mean, std = NTKRegressor(t=t).fit(X, y).predict(Xt, return_std=True)
    np.testing.assert_allclose(std, expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(mean, theta_t @ T @ y, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("t", [5.0, np.inf])
@pytest.mark.parametrize("absolute", [False, True])
def test_ntk_ensemble_std_with_a_ridge_has_the_ridge_in_the_nngp_prior(t, absolute):
    """The convention (module docstring of ntkit.estimators): with a ridge the flow runs
    under Θ_reg = Θ + λ_Θ I, and the ridge is observation noise on the training outputs, so
    the prior covariance of the initial training outputs is K_reg = K + λ_K I, where K is
    the NNGP and λ_K resolves the same diag_reg on K's own diagonal (diag_reg · mean diag K,
    or diag_reg itself when absolute). With ε ~ N(0, λ_K I) independent of f_0,

        f_t(x) − E f_t(x) = f_0(x) − Θ_*x T (f_0(X) + ε),  T = Θ_reg⁻¹ (I − e^{−Θ_reg t/N}),

    a quadratic form in the joint covariance [[K_**, K_*x], [K_x*, K_reg]]; at t = inf,
    Var = K_** − 2 Θ_*x Θ_reg⁻¹ K_x* + Θ_*x Θ_reg⁻¹ K_reg Θ_reg⁻¹ Θ_x*. (For the NNGP
    flow at t = inf this is the GP posterior with noise λ_K, tested below.)"""
    X, y, Xt = _regression(n=40, n_test=15)
    n, m = len(X), len(Xt)
    diag_reg = 1e-2
    theta, theta_t, _ = _kernels(X, Xt, "ntk")
    joint = NET.kernel(np.vstack([Xt, X]), get="nngp").nngp.numpy()
    K = joint[m:, m:]
    lam_theta = diag_reg if absolute else diag_reg * np.trace(theta) / n
    lam_k = diag_reg if absolute else diag_reg * np.trace(K) / n
    theta_reg = theta + lam_theta * np.eye(n)
    T = (np.linalg.inv(theta_reg) if np.isinf(t) else np.linalg.solve(
        theta_reg, np.eye(n) - scipy.linalg.expm(-theta_reg * t / n)))
    M = np.hstack([np.eye(m), -theta_t @ T])  # f_t(x) - mean = M (f_0(x), f_0(X) + ε)
    prior = joint.copy()
    prior[m:, m:] += lam_k * np.eye(n)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", M, prior, M))
    model = NTKRegressor(t=t, diag_reg=diag_reg, diag_reg_absolute_scale=absolute).fit(X, y)
    assert model.ridge_ == pytest.approx(lam_theta, rel=1e-13)
    mean, std = model.predict(Xt, return_std=True)
    np.testing.assert_allclose(mean, theta_t @ T @ y, rtol=1e-9, atol=1e-12)
    # The ridge keeps Θ_reg well conditioned (cond < 400 here) and the variance is at least
    # K_** / 100, so rounding moves it by about cond · eps · 100 ≈ 1e-11 relative (measured:
    # 2e-14).
    rtol = 1e-10
    np.testing.assert_allclose(std, expected, rtol=rtol, atol=0)
    # The test has power: without its ridge the prior gives a std off by more than 1000x the
    # tolerance (measured: 6e-4 relative at t = 5, 0.2 at t = inf).
    without = np.sqrt(np.einsum("ij,jk,ik->i", M, joint, M))
    assert np.abs(without / expected - 1).max() > 1e3 * rtol


def test_nngp_std_is_the_gp_posterior_and_vanishes_on_training_points():
    X, y, Xt = _regression(n=40, n_test=15)
    K, Kt, Ktt = _kernels(X, Xt, "nngp")
    lam = 1e-4 * np.trace(K) / len(K)
    A = K + lam * np.eye(len(K))
    expected = np.sqrt(np.diag(Ktt - Kt @ np.linalg.solve(A, Kt.T)))
    model = NNGPRegressor(diag_reg=1e-4).fit(X, y)
    np.testing.assert_allclose(model.predict(Xt, return_std=True)[1], expected, rtol=1e-6)
    noiseless = NNGPRegressor().fit(X, y)
    assert noiseless.predict(X, return_std=True)[1].max() < 1e-5 * np.sqrt(np.diag(K)).max()


def test_multi_target_regression_is_columnwise():
    X, Y, Xt = _regression(k=3)
    model = NTKRegressor(t=10.0).fit(X, Y)
    mean, std = model.predict(Xt, return_std=True)
    assert mean.shape == (25, 3) and std.shape == (25, 3)
    for j in range(3):
        single = NTKRegressor(t=10.0).fit(X, Y[:, j])
        np.testing.assert_allclose(mean[:, j], single.predict(Xt), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(std[:, j], single.predict(Xt, return_std=True)[1])


def test_pipeline_and_grid_search():
    X, y, Xt = _regression(n=80)
    search = GridSearchCV(make_pipeline(StandardScaler(), NTKRegressor()),
                          {"ntkregressor__diag_reg": [1e-4, 1e-1],
                           "ntkregressor__depth": [2, 3]}, cv=3)
    search.fit(X, y)
    best = search.best_estimator_
    manual = make_pipeline(StandardScaler(), NTKRegressor(**{
        k.split("__")[1]: v for k, v in search.best_params_.items()})).fit(X, y)
    np.testing.assert_allclose(best.predict(Xt), manual.predict(Xt))
    # a user's network as a parameter
    custom = nk.serial(nk.Dense(64), nk.Erf(), nk.Dense(1))
    model = NTKRegressor(net=custom).fit(X, y)
    np.testing.assert_allclose(model.predict(Xt), custom.kernel(Xt, X, get="ntk").ntk.numpy() @
                               np.linalg.solve(custom.kernel(X, get="ntk").ntk.numpy(), y),
                               rtol=1e-8, atol=1e-10)


def test_standard_parameterization_uses_the_declared_width():
    """The standard-parameterised NTK grows with the hidden width (each Dense after a hidden
    layer adds width · Σ), so the estimator's width must reach the network: its kernel is
    nk.mlp(depth, width, parameterization="standard")'s, and the prediction follows it."""
    X, y, Xt = _regression(n=40)
    kernels = {}
    for width in (64, 1024):
        model = NTKRegressor(parameterization="standard", width=width, diag_reg=1e-2).fit(X, y)
        ref = nk.mlp(3, width, b_std=0.1, parameterization="standard")
        K = ref.kernel(X, get="ntk").ntk.numpy()
        np.testing.assert_array_equal(model.net_.kernel(X, get="ntk").ntk.numpy(), K)
        lam = 1e-2 * np.trace(K) / len(K)
        expected = (ref.kernel(Xt, X, get="ntk").ntk.numpy()
                    @ scipy.linalg.solve(K + lam * np.eye(len(K)), y, assume_a="pos"))
        np.testing.assert_allclose(model.predict(Xt), expected, rtol=1e-9, atol=1e-12)
        kernels[width] = K
    # 16x the width: the hidden-layer weight terms grow 16-fold.
    assert np.abs(kernels[1024] / kernels[64]).min() > 5
    # The NTK parameterisation does not depend on the width.
    np.testing.assert_array_equal(NTKRegressor(width=64).fit(X, y).predict(Xt),
                                  NTKRegressor(width=1024).fit(X, y).predict(Xt))
    for bad in (0, 2.5, "512", True):
        with pytest.raises(ValueError, match=f"width must be an integer >= 1; got {bad!r}"):
            NTKRegressor(parameterization="standard", width=bad).fit(X, y)


def test_indefinite_train_kernel_error_names_the_input_scale(monkeypatch):
    """Raw 0-255 features with a smooth activation can make the train kernel indefinite
    (quadrature error at huge pre-activation variances). The error must point at the input
    scale and the remedy, not only at how the kernel was computed. The failure is made
    deterministic by negating one eigenvalue of the train kernel."""
    from ntkit.estimators import kernel_machines

    computed = kernel_machines._InfiniteNetworkBase._kernel

    def indefinite(self, X1, X2, get):
        k = computed(self, X1, X2, get)
        if X2 is None:
            evals, evecs = np.linalg.eigh(k.numpy())
            evals[0] = -0.5 * evals[-1]
            k = k.new_tensor((evecs * evals) @ evecs.T)
            k = 0.5 * (k + k.T)  # symmetric, as the evaluator's train kernels are
        return k

    monkeypatch.setattr(kernel_machines._InfiniteNetworkBase, "_kernel", indefinite)
    gen = np.random.default_rng(0)
    pixels = gen.integers(0, 256, size=(30, 8)).astype(float)
    pixels[:, 5] = 255.0  # the largest scale, 255, sits in column 5
    y = gen.standard_normal(30)
    with pytest.raises(ValueError, match=r"not positive semi-definite.*The largest feature "
                       r"scale \(root mean square over the 30 training rows\) is 255, in "
                       r"column 5\..*standardise the inputs, e\.g\. "
                       r"make_pipeline\(StandardScaler\(\), estimator\)"):
        NTKRegressor(activation="tanh").fit(pixels, y)
    with pytest.raises(ValueError, match="not positive semi-definite.*StandardScaler"):
        NTKClassifier(activation="tanh").fit(pixels, y > 0)
    # The cross-entropy flow has no t = inf solve and so no PSD check; a non-finite train
    # kernel (overflow at a huge input scale, refused by the evaluator) gets the same hint.
    monkeypatch.undo()
    huge = pixels * 1e160  # x·x/d overflows float64
    with pytest.raises(ValueError, match=r"not finite.*The largest feature scale .* is "
                       r"inf, in column \d\..*StandardScaler"):
        NTKClassifier(activation="tanh", loss="cross_entropy", t=10.0).fit(huge, y > 0)
    monkeypatch.setattr(kernel_machines._InfiniteNetworkBase, "_kernel", indefinite)
    # Standardised features: the scale is named, but standardising is not the remedy.
    scaled = StandardScaler().fit_transform(pixels[:, :5])
    with pytest.raises(ValueError, match=r"is 1, in column \d\.$"):
        NTKRegressor(activation="tanh").fit(scaled, y)


def _classification(n=90, n_test=30, seed=0):
    gen = np.random.default_rng(seed)
    centres = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = gen.integers(0, 3, n + n_test)
    X = centres[labels] + gen.standard_normal((n + n_test, 2))
    names = np.array(["a", "b", "c"])[labels]
    return X[:n], names[:n], X[n:], names[n:]


def test_mse_classifier_is_one_hot_regression_and_argmax():
    X, y, Xt, yt = _classification()
    clf = NTKClassifier(diag_reg=1e-2).fit(X, y)
    one_hot = (y[:, None] == np.array(["a", "b", "c"])[None, :]).astype(float)
    outputs = NTKRegressor(diag_reg=1e-2).fit(X, one_hot).predict(Xt)
    np.testing.assert_allclose(clf.decision_function(Xt), outputs, rtol=1e-10, atol=1e-12)
    assert np.array_equal(clf.predict(Xt), np.array(["a", "b", "c"])[outputs.argmax(1)])
    assert clf.score(Xt, yt) > 0.8
    proba = clf.predict_proba(Xt)
    assert np.all(proba >= 0) and np.allclose(proba.sum(1), 1)
    assert np.array_equal(clf.classes_[proba.argmax(1)], clf.predict(Xt))


def test_simplex_projection_is_the_closest_probability_vector():
    from scipy.optimize import minimize

    F = np.random.default_rng(3).normal(0.3, 0.8, size=(6, 4))
    P = _project_to_simplex(F)
    for f, p in zip(F, P):
        res = minimize(lambda q, f=f: np.sum((q - f) ** 2), np.full(4, 0.25), method="SLSQP",
                       bounds=[(0, 1)] * 4, constraints={"type": "eq",
                                                         "fun": lambda q: q.sum() - 1},
                       options={"ftol": 1e-14})
        np.testing.assert_allclose(p, res.x, atol=1e-6)


def test_cross_entropy_flow_matches_an_independent_integration():
    X, y, Xt, _ = _classification(n=40, n_test=10)
    t = 30.0
    clf = NTKClassifier(loss="cross_entropy", t=t).fit(X, y)
    # RK4 on train and test logits together: d f / dt = -(1/N) Θ[:, train] (softmax(f_X) - Y)
    Z = np.vstack([X, Xt])
    theta = NET.kernel(Z, X, get="ntk").ntk.numpy()
    Y = (y[:, None] == clf.classes_[None, :]).astype(float)
    n = len(X)

    def rhs(F):
        E = np.exp(F[:n] - F[:n].max(1, keepdims=True))
        return -theta @ (E / E.sum(1, keepdims=True) - Y) / n

    F = np.zeros((len(Z), 3))
    steps = 3000
    h = t / steps
    for _ in range(steps):
        k1 = rhs(F)
        k2 = rhs(F + h / 2 * k1)
        k3 = rhs(F + h / 2 * k2)
        k4 = rhs(F + h * k3)
        F = F + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    np.testing.assert_allclose(clf.decision_function(Xt), F[n:], rtol=1e-5, atol=1e-6)
    E = np.exp(F[n:] - F[n:].max(1, keepdims=True))
    np.testing.assert_allclose(clf.predict_proba(Xt), E / E.sum(1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="finite training time"):
        NTKClassifier(loss="cross_entropy").fit(X, y)


@pytest.mark.parametrize("Est", [NTKRegressor, NNGPRegressor, NTKClassifier])
def test_bad_input_raises_sklearn_style_errors(Est):
    X, y, Xt = _regression(n=30)
    if Est is NTKClassifier:
        y = (y > 0).astype(int)
    with pytest.raises(NotFittedError):
        Est().predict(Xt)
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Est().fit(bad, y)
    model = Est().fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(Xt[:, :3])
    bad_test = Xt.copy()
    bad_test[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        model.predict(bad_test)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        Est().fit(X, y[:-1])
    with pytest.raises(ValueError, match="diag_reg"):
        Est(diag_reg=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="t must be"):
        Est(t=-2.0).fit(X, y)
    with pytest.raises(ValueError, match="Unknown activation 'no-such-activation'; use one of"):
        Est(activation="no-such-activation").fit(X, y)
    with pytest.raises(ValueError, match="net must be"):
        Est(net="relu").fit(X, y)


def test_finite_time_agrees_with_the_dynamics_module():
    # The estimators and nk.predict must share conventions (JGH cost, relative diag_reg).
    predict = nk.predict
    X, y, Xt = _regression()
    K, Kt, _ = _kernels(X, Xt, "ntk")
    for t in (2.0, 50.0):
        expected = predict.gradient_descent_mse(K, y, diag_reg=1e-3)(t, k_test_train=Kt).test
        got = NTKRegressor(t=t, diag_reg=1e-3).fit(X, y).predict(Xt)
        np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("Est", [NTKRegressor, NNGPRegressor])
def test_cg_solver_matches_direct(Est):
    X, Y, Xt = _regression(n=150, k=2)
    direct = Est(diag_reg=1e-3).fit(X, Y)
    cg = Est(diag_reg=1e-3, solver="cg").fit(X, Y)
    assert cg.ridge_ == pytest.approx(direct.ridge_, rel=1e-12)
    assert cg.n_iter_ >= 1 and direct.n_iter_ is None
    expected = direct.predict(Xt)
    np.testing.assert_allclose(cg.predict(Xt), expected, rtol=0,
                               atol=1e-6 * np.abs(expected).max())
    X, y, Xt, _ = _classification(n=90)
    direct = NTKClassifier(get=Est._get, diag_reg=1e-3).fit(X, y).decision_function(Xt)
    cg = NTKClassifier(get=Est._get, diag_reg=1e-3, solver="cg").fit(X, y)
    np.testing.assert_allclose(cg.decision_function(Xt), direct, rtol=0,
                               atol=1e-6 * np.abs(direct).max())


def test_cg_settings_are_parameters():
    """cg_tol, cg_max_iter and n_landmarks reach the solver: a loose tolerance stops earlier,
    too few iterations warn, and bad values name the parameter."""
    from sklearn.exceptions import ConvergenceWarning

    X, y, Xt = _regression(n=120)
    tight = NTKRegressor(diag_reg=1e-4, solver="cg", cg_tol=1e-10, n_landmarks=10).fit(X, y)
    loose = NTKRegressor(diag_reg=1e-4, solver="cg", cg_tol=1e-2, n_landmarks=10).fit(X, y)
    assert loose.n_iter_ < tight.n_iter_
    # As many landmarks as points: the preconditioner is the exact inverse.
    exact = NTKRegressor(diag_reg=1e-4, solver="cg", cg_tol=1e-10, n_landmarks=120).fit(X, y)
    assert exact.n_iter_ <= 2 < tight.n_iter_
    direct = NTKRegressor(diag_reg=1e-4).fit(X, y).predict(Xt)
    np.testing.assert_allclose(tight.predict(Xt), direct, rtol=0,
                               atol=1e-8 * np.abs(direct).max())
    with pytest.warns(ConvergenceWarning, match="stopped after 1 iterations"):
        NTKRegressor(diag_reg=1e-4, solver="cg", cg_tol=1e-12, cg_max_iter=1,
                     n_landmarks=5).fit(X, y)
    for name, bad in (("cg_tol", 0.0), ("cg_tol", 2.0), ("cg_max_iter", 0),
                      ("n_landmarks", 1.5)):
        with pytest.raises(ValueError, match=name):
            NTKRegressor(diag_reg=1e-4, solver="cg", **{name: bad}).fit(X, y)


def test_cg_fit_never_forms_the_train_kernel(monkeypatch):
    # Every kernel the estimator itself asks for is test-train; the train kernel is only ever
    # seen tile by tile inside ntkit.scale.solve.
    from ntkit.estimators import kernel_machines

    calls = []
    computed = kernel_machines._InfiniteNetworkBase._kernel

    def recording(self, X1, X2, get):
        calls.append(X2 is None)
        return computed(self, X1, X2, get)

    monkeypatch.setattr(kernel_machines._InfiniteNetworkBase, "_kernel", recording)
    X, y, Xt = _regression(n=50)
    NTKRegressor(diag_reg=1e-3, solver="cg").fit(X, y).predict(Xt)
    assert calls and not any(calls)


@pytest.mark.parametrize("Est", [NTKRegressor, NNGPRegressor, NTKClassifier])
def test_solver_is_validated(Est):
    X, y, Xt = _regression(n=30)
    if Est is NTKClassifier:
        y = (y > 0).astype(int)
    with pytest.raises(ValueError, match="solver must be one of 'auto', 'direct', 'cg'; got 'lsqr'"):
        Est(solver="lsqr").fit(X, y)
    with pytest.raises(ValueError, match=r"solver='cg' gives only the converged solution "
                                         r"\(t = inf\); got t=5.0"):
        Est(solver="cg", t=5.0, diag_reg=1e-3).fit(X, y)
    with pytest.raises(ValueError, match="solver='cg' needs diag_reg > 0"):
        Est(solver="cg").fit(X, y)
    if Est is NTKClassifier:
        with pytest.raises(ValueError, match="cross_entropy' needs solver='direct'"):
            Est(solver="cg", loss="cross_entropy", t=5.0, diag_reg=1e-3).fit(X, y)
    else:
        model = Est(solver="cg", diag_reg=1e-3).fit(X, y)
        with pytest.raises(ValueError, match="return_std=True needs solver='direct'"):
            model.predict(Xt, return_std=True)


def test_prediction_in_blocks_of_test_rows(monkeypatch):
    from ntkit.estimators import kernel_machines

    X, Y, Xt = _regression(n=40, n_test=23, k=2)
    for t in (np.inf, 4.0):
        model = NTKRegressor(t=t, diag_reg=1e-3).fit(X, Y)
        whole = model.predict(Xt, return_std=True)
        monkeypatch.setattr(kernel_machines, "_PREDICT_BLOCK", 40 * 5)  # 5 rows per block
        blocks = model.predict(Xt, return_std=True)
        monkeypatch.undo()
        for a, b in zip(whole, blocks):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def test_repeated_inputs_use_the_pseudo_inverse():
    # Without a ridge a repeated input makes the train kernel singular; the converged
    # solution is then the minimum-norm one, which predicts as the deduplicated fit does.
    X, y, Xt = _regression(n=40)
    dup = NTKRegressor().fit(np.vstack([X, X[:6]]), np.concatenate([y, y[:6]]))
    mean, std = dup.predict(Xt, return_std=True)
    unique = NTKRegressor().fit(X, y)
    np.testing.assert_allclose(mean, unique.predict(Xt), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(std, unique.predict(Xt, return_std=True)[1], rtol=1e-5,
                               atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_estimators_run_on_cuda():
    X, y, Xt = _regression()
    cpu = NTKRegressor(t=5.0).fit(X, y).predict(Xt, return_std=True)
    gpu = NTKRegressor(t=5.0, device="cuda").fit(X, y).predict(Xt, return_std=True)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


def test_classifier_kernel_keyword_is_deprecated_for_get():
    # "Which kernel" is get= across ntkit; NTKClassifier(kernel=) still fits, with a
    # DeprecationWarning at fit, the very same model.
    X, y, Xt, _ = _classification(n=40)
    new = NTKClassifier(get="nngp", diag_reg=1e-4).fit(X, y)
    old = NTKClassifier(kernel="nngp", diag_reg=1e-4)
    assert old.get_params()["kernel"] == "nngp"  # stored as given (sklearn's contract)
    with pytest.warns(DeprecationWarning, match="kernel= is deprecated.*get='nngp'"):
        old.fit(X, y)
    np.testing.assert_array_equal(old.decision_function(Xt), new.decision_function(Xt))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError,
                                                         match="kernel must be one of"):
        NTKClassifier(kernel="rbf").fit(X, y)
    with pytest.raises(ValueError, match="get must be one of"):
        NTKClassifier(get="rbf").fit(X, y)


def test_fit_validates_the_data_once(monkeypatch):
    """X and y are validated at the estimator's boundary (sklearn's validate_data) and the
    train kernel comes from the analytic evaluator, exactly symmetric: none of the library's
    tensor checks sees y or the train kernel again (formerly X three times, y twice, K
    once). The one remaining check of X is the evaluator's own (ntkit.layers.evaluate)."""
    import sys

    import ntkit._validation as V

    seen = []
    original = V.as_tensor

    def counting(x, name, **kwargs):
        seen.append(name)
        return original(x, name, **kwargs)

    # Every module that imported the check by name, so that no caller escapes the count.
    for module in [m for n, m in sys.modules.items() if n.startswith("ntkit")]:
        if getattr(module, "as_tensor", None) is original:
            monkeypatch.setattr(module, "as_tensor", counting)
    X, y, _ = _regression(n=30)
    NTKRegressor().fit(X, y)
    assert not any(name in ("y", "y_train", "k_train_train") for name in seen), seen
    assert len(seen) <= 1, seen


# ----------------------------------------------------------------------------- solver="auto"
def test_auto_solver_is_direct_while_float64_fits():
    X, y, Xt = _regression()
    auto = NTKRegressor(diag_reg=1e-3).fit(X, y)
    assert auto.solver == "auto" and auto.solver_path_ == "direct"
    assert auto.solve_plan_.path == "direct" and auto.solve_plan_.precision == "float64"
    direct = NTKRegressor(diag_reg=1e-3, solver="direct").fit(X, y)
    np.testing.assert_array_equal(auto.predict(Xt), direct.predict(Xt))
    # Finite t or no ridge: the closed form, without asking the cost model.
    assert NTKRegressor(t=5.0).fit(X, y).solve_plan_ is None


@pytest.mark.parametrize("path", ["dense_cg", "disk_cg", "matrix_free_cg"])
def test_auto_solver_past_memory_takes_the_scale_paths(path, monkeypatch, tmp_path):
    from ntkit.scale import plan as plan_module

    real = plan_module.plan_solve

    def tight_machine(n, k=1, *, method="auto", **kwargs):
        # What the cost model answers when a float64 K does not fit (tests/test_solve_paths.py
        # checks those answers on synthetic sizes): here, the path of this test case.
        return real(n, k, method=path if method == "auto" else method, **kwargs)

    monkeypatch.setattr(plan_module, "plan_solve", tight_machine)
    X, Y, Xt = _regression(n=150, k=2)
    model = NTKRegressor(diag_reg=1e-3, store=str(tmp_path / "k")).fit(X, Y)
    assert model.solver_path_ == path == model.solve_plan_.path
    assert model.n_iter_ >= 1
    direct = NTKRegressor(diag_reg=1e-3, solver="direct").fit(X, Y).predict(Xt)
    # float32 storage of K: predictions agree to ~1e-7 relative (see test_solve_paths.py).
    np.testing.assert_allclose(model.predict(Xt), direct, rtol=0,
                               atol=1e-5 * np.abs(direct).max())
    with pytest.raises(ValueError, match="return_std=True needs solver='direct'"):
        model.predict(Xt, return_std=True)


# ----------------------------------------------------------------------------- input_shape
def test_input_shape_reshapes_flat_rows_for_a_conv_net():
    gen = np.random.default_rng(0)
    images = gen.standard_normal((30, 2, 4, 4))
    y = gen.standard_normal(30)
    test = gen.standard_normal((7, 2, 4, 4))
    net = nk.serial(nk.Conv(3, (2, 2)), nk.ReLU(), nk.Flatten(), nk.Dense(1))
    model = NTKRegressor(net=net, input_shape=(2, 4, 4), diag_reg=1e-3)
    model.fit(images.reshape(30, -1), y)  # X flat, (N, C*H*W), as scikit-learn expects
    assert model.n_features_in_ == 32 and model.solver_path_ == "direct"
    K = net.kernel(images, get="ntk").ntk.numpy()
    Kt = net.kernel(test, images, get="ntk").ntk.numpy()
    lam = 1e-3 * np.trace(K) / len(K)
    expected = Kt @ scipy.linalg.solve(K + lam * np.eye(30), y, assume_a="pos")
    np.testing.assert_allclose(model.predict(test.reshape(7, -1)), expected, rtol=1e-9,
                               atol=1e-10)
    clf = NTKClassifier(net=net, input_shape=[2, 4, 4]).fit(images.reshape(30, -1), y > 0)
    assert clf.predict(test.reshape(7, -1)).shape == (7,)


def test_input_shape_is_validated_against_the_features():
    X, y, _ = _regression(d=6)
    with pytest.raises(ValueError, match=r"input_shape=\(1, 2, 2\) holds 4 values per "
                                         r"example, but X has 6 features .* \(N, 1 \* 2 \* 2\)"):
        NTKRegressor(input_shape=(1, 2, 2)).fit(X, y)
    for bad in [(0, 6), (2.5, 2), "6", (True, 6)]:
        with pytest.raises(ValueError, match="input_shape must be None or a tuple of positive"):
            NTKRegressor(input_shape=bad).fit(X, y)
