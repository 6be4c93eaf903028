"""probe --protocol logreg (DINOv2's): the same choice and test predictions as scikit-learn's
LogisticRegression(solver="lbfgs") over the same grid of C, validation split and criterion."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import featcache
from featcache.evaluation.data import stratified_split
from featcache.evaluation.logreg import C_GRID, Problem, logits


def _data(seed=0, n=900, d=24, k=6, separation=0.45):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    y = rng.integers(0, k, n)
    x = (separation * centres[y] + rng.normal(size=(n, d))) * 3 + 1  # off-centre, scaled
    return x.astype(np.float32), y


def test_dinov2s_grid():
    assert (
        len(C_GRID) == 45 and C_GRID[0] == pytest.approx(1e-6) and C_GRID[-1] == pytest.approx(1e5)
    )
    assert np.allclose(np.diff(np.log10(C_GRID)), 11 / 44)


@pytest.mark.parametrize("rows", [900, 40])  # more rows than features, and fewer
def test_each_fit_is_scikit_learns_optimum(rows):
    """The preconditioned problem (centred, on the principal axes, scaled) has scikit-learn's
    minimiser, weights and bias included; with fewer rows than features too (the axes then
    span the rows only), and started from another C's solution."""
    from sklearn.linear_model import LogisticRegression

    x, y = _data(n=rows, d=60 if rows < 60 else 24)
    x = x.astype(np.float64)
    problem = Problem(torch.tensor(x), torch.tensor(y), 6)
    w = None
    for c in (1e-3, 0.3, 30.0):
        w = problem.fit(c, w).weights
        ours = torch.softmax(logits(torch.tensor(x), w), 1).numpy()
        ref = LogisticRegression(C=c, max_iter=10_000, tol=1e-10).fit(x, y)
        np.testing.assert_allclose(ours, ref.predict_proba(x), atol=1e-5)
        np.testing.assert_allclose(
            w[:-1].numpy().T, ref.coef_, atol=1e-3 * max(1, np.abs(ref.coef_).max())
        )


def test_ill_conditioned_features_reach_the_optimum_in_few_iterations():
    """Features as stored: correlated, their scales from 1e-2 to 1e2. The prepared problem
    reaches the exact optimum (Newton's method on the 150 weights) in tens of iterations,
    where L-BFGS on the features themselves (scikit-learn's) is still far after 1,000."""
    from sklearn.linear_model import LogisticRegression

    x, y = _data(n=600, d=24)
    mix = np.random.default_rng(0).normal(size=(24, 24)) * np.logspace(-2, 2, 24)
    x, y = torch.tensor(x.astype(np.float64) @ mix), torch.tensor(y)
    c = 10.0

    def objective(flat):
        w = flat.view(25, 6)
        return F.cross_entropy(logits(x, w), y) + 0.5 / (c * 600) * (w[:-1] ** 2).sum()

    w, iterations, _ = Problem(x, y, 6).fit(c, tol=1e-6)
    exact = w.ravel().clone()
    for _ in range(20):
        exact -= torch.linalg.solve(
            torch.func.hessian(objective)(exact), torch.func.grad(objective)(exact)
        )
    assert iterations < 60
    assert float(objective(w.ravel()) - objective(exact)) == pytest.approx(0, abs=1e-9)
    probabilities = [torch.softmax(logits(x, v.view(25, 6)), 1) for v in (w.ravel(), exact)]
    torch.testing.assert_close(*probabilities, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its convergence warning
        ref = LogisticRegression(C=c, max_iter=1000, tol=1e-6).fit(x.numpy(), y.numpy())
    plain = torch.cat([torch.tensor(ref.coef_.T), torch.tensor(ref.intercept_)[None]])
    assert float(objective(plain.ravel()) - objective(exact)) > 0.01


def test_the_gradient_in_the_features_terms_is_the_objectives():
    """What scikit-learn's stopping rule reads: the prepared problem's gradient carried back
    to the features' own weights and bias equals autograd's there."""
    x, y = _data(n=300, d=24)
    x, y = torch.tensor(x.astype(np.float64)), torch.tensor(y)
    problem, c = Problem(x, y, 6), 3.0
    w = torch.randn(25, 6, dtype=torch.float64)

    def objective(w):
        return F.cross_entropy(logits(x, w), y) + 0.5 / (c * 300) * (w[:-1] ** 2).sum()

    inward = problem._inward(w)
    z = torch.softmax(torch.addmm(inward[-1], problem.rotated, inward[:-1]), 1) - problem.onehot
    on_axes = torch.cat([problem.rotated.T @ z / 300 + inward[:-1] / (c * 300), z.mean(0)[None]])
    expected = torch.func.grad(objective)(w)
    torch.testing.assert_close(problem._outward_gradient(on_axes), expected, atol=1e-12, rtol=1e-9)


def test_separable_rows_end_large_c_where_scikit_learn_does():
    """Fewer rows than features (separable): at large C the optimum lies where the softmax
    saturates. The fit's scale follows the curvature at its start and it stops by
    scikit-learn's rule too, so a warm-started path takes about scikit-learn's iterations
    (166 with warm_start=True here; without either of the two, twice as many and more)."""
    x, y = _data(n=80, d=200)
    x = x.astype(np.float64) * np.logspace(-4, 0, 200)
    problem, w, total = Problem(torch.tensor(x), torch.tensor(y), 6), None, 0
    for c in (1.0, 100.0, 1e4, 1e5):
        w, iterations, _ = problem.fit(c, w, 1000, 1e-6)
        total += iterations
    assert total <= 280, total


def test_the_protocol_chooses_and_scores_as_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xte, yte) = _data(0), _data(1, n=400)
    cs = C_GRID[::4]  # 12 of the 45: the same protocol, a quicker test
    result = featcache.probe(
        train=(xtr, ytr), test=(xte, yte), protocol="logreg", cs=cs, cv_below=0
    ).to_dict()
    assert result["protocol"] == "logreg" and [s["C"] for s in result["sweep"]] == sorted(cs)

    # scikit-learn on the same features (as stored: DINOv2's), validation split and criterion.
    ztr, zte = xtr.astype(np.float64), xte.astype(np.float64)
    fit_idx, val_idx = stratified_split(ytr, 0.1, 0)
    val = []
    for c in sorted(cs):
        m = LogisticRegression(C=c, max_iter=10_000, tol=1e-10).fit(ztr[fit_idx], ytr[fit_idx])
        val.append(100 * (m.predict(ztr[val_idx]) == ytr[val_idx]).mean())
    assert [s["val"]["top1"] for s in result["sweep"]] == pytest.approx(val, abs=1e-9)
    best = max(range(len(val)), key=lambda i: (val[i], -sorted(cs)[i]))
    assert result["selected"]["C"] == sorted(cs)[best]
    ref = LogisticRegression(C=sorted(cs)[best], max_iter=10_000, tol=1e-10).fit(ztr, ytr)
    top1 = 100 * (ref.predict(zte) == yte).mean()
    assert result["test"]["top1"] == pytest.approx(top1, abs=1e-9)


def test_the_default_stays_the_sgd_probe_and_an_unknown_protocol_is_refused():
    (xtr, ytr), (xte, yte) = _data(0, n=300), _data(1, n=100)
    sgd = featcache.probe(train=(xtr, ytr), test=(xte, yte), max_epochs=3).to_dict()
    assert sgd["protocol"] == "sgd" and "weight_decay" in sgd["selected"]
    with pytest.raises(Exception, match="--protocol is one of sgd, logreg"):
        featcache.probe(train=(xtr, ytr), test=(xte, yte), protocol="lbfgs")


def test_the_result_records_the_protocol_and_the_table_shows_it(tmp_path):
    from click.testing import CliRunner
    from conftest import make_image_folder, tiny_extract_args

    from featcache.cli import main

    store = tmp_path / "s.h5"
    run = CliRunner().invoke
    assert (
        run(main, tiny_extract_args(make_image_folder(tmp_path / "images"), store)).exit_code == 0
    )
    args = ["probe", "--store", store, "--protocol", "logreg", "--cs", "0.01,1,100",
            "--json", tmp_path / "lr.json", "--plot", tmp_path / "lr.png"]  # fmt: skip
    r = run(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert "logreg: C " in r.output and (tmp_path / "lr.png").stat().st_size > 1000
    table = run(main, ["table", str(tmp_path / "lr.json")]).output
    assert "| probe protocol |" in table.splitlines()[0] and "| logreg |" in table
    # Beside an SGD probe of the same set: a row each (neither hides the other).
    r = run(
        main,
        ["probe", "--store", str(store), "--epochs", "3", "--json", str(tmp_path / "sgd.json")],
    )
    assert r.exit_code == 0, r.output
    table = run(main, ["table", str(tmp_path / "lr.json"), str(tmp_path / "sgd.json")]).output
    assert "| logreg |" in table and "| sgd |" in table and len(table.splitlines()) == 4


def test_small_training_sets_choose_by_cross_validation_as_scikit_learn_does():
    """Below cv_below rows: 5 stratified folds, the same for every C; the best mean
    validation top-1 over them, refit on all rows (scikit-learn on the same folds)."""
    from sklearn.linear_model import LogisticRegression

    from featcache.evaluation.data import stratified_folds

    (xtr, ytr), (xte, yte) = _data(0, n=400), _data(1, n=200)
    cs = C_GRID[14::8]  # 4 values of C, 1e-2.6 .. 1e5: the folds are what is tested
    result = featcache.probe(train=(xtr, ytr), test=(xte, yte), protocol="logreg", cs=cs).to_dict()
    assert result["cv_folds"] == 5 and result["num_val"] == 0
    ztr, zte = xtr.astype(np.float64), xte.astype(np.float64)
    fold = stratified_folds(ytr, 5, 0)
    counts = np.stack([np.bincount(ytr[fold == f], minlength=6) for f in range(5)])
    assert (counts.max(0) - counts.min(0) <= 1).all()  # every class dealt evenly
    mean = []
    for c in sorted(cs):
        scores = []
        for f in range(5):
            m = LogisticRegression(C=c, max_iter=10_000, tol=1e-9)
            m.fit(ztr[fold != f], ytr[fold != f])
            scores.append(100 * (m.predict(ztr[fold == f]) == ytr[fold == f]).mean())
        mean.append(np.mean(scores))
    assert [s["cv"]["top1_mean"] for s in result["sweep"]] == pytest.approx(mean, abs=1e-9)
    best = max(range(len(mean)), key=lambda i: (mean[i], -sorted(cs)[i]))
    assert result["selected"]["C"] == sorted(cs)[best]
    assert result["selected"]["cv"]["top1_std"] >= 0
    ref = LogisticRegression(C=sorted(cs)[best], max_iter=10_000, tol=1e-10).fit(ztr, ytr)
    assert result["test"]["top1"] == pytest.approx(100 * (ref.predict(zte) == yte).mean())
