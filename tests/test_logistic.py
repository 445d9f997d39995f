"""The feature probe's solver (train/evaluation/logistic.py) against scikit-learn's multinomial LogisticRegression on the
same objective (mean cross-entropy + l2/2 |W|^2 is C = 1 / (n l2)), on fresh random features; its convergence
flag; the held-out search (stratified, every view of an image on one side, early stop, deterministic)."""
import numpy as np
import pytest
import torch

from mae_fast.train.evaluation.logistic import (L2_GRID, Standardizer, features_home, fit_multinomial, fit_probe,
                                                holdout_split, scores_of)

CPU = torch.device("cpu")


def blobs(n: int, dim: int, classes: int, seed: int, spread: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * spread
    y = torch.randint(0, classes, (n,), generator=g)
    return (centers[y] + torch.randn(n, dim, generator=g)) * 3.0 + 5.0, y


@pytest.mark.parametrize("n,dim,classes,l2", [(301, 17, 5, 1e-2), (97, 33, 3, 1e-3), (500, 7, 10, 1e-1)])
def test_fit_matches_scikit_learn(n, dim, classes, l2):
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(n, dim, classes, seed=n)
    xs = Standardizer.fit(x)(x)
    w, b, iterations, converged = fit_multinomial(xs, y, classes, l2, CPU)
    assert converged and 0 < iterations < 5000
    ref = LogisticRegression(C=1.0 / (n * l2), tol=1e-12, max_iter=100000).fit(xs.double().numpy(), y.numpy())
    ours = torch.softmax(xs.double() @ w.T + b, dim=1).numpy()
    # converged means a gradient entry <= min(1e-5, 1e-3 l2), so |W - W*| <= 1e-3 by l2-strong convexity
    np.testing.assert_allclose(w.numpy(), ref.coef_, atol=1e-3, rtol=0)
    np.testing.assert_allclose(b.numpy() - b.numpy().mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-3)
    np.testing.assert_allclose(ours, ref.predict_proba(xs.double().numpy()), atol=1e-4)


def test_convergence_is_reported_only_when_reached():
    x, y = blobs(400, 20, 6, seed=3, spread=4.0)  # near separable: a weak penalty needs many iterations
    xs = Standardizer.fit(x)(x)
    assert not fit_multinomial(xs, y, 6, 1e-5, CPU, max_iter=5)[3]
    assert fit_multinomial(xs, y, 6, 1e-2, CPU)[3]


def test_holdout_keeps_views_together_and_classes_stratified():
    labels = torch.arange(10).repeat_interleave(8)  # 10 classes x 8 images
    groups = torch.arange(80)
    rows_y, rows_g = labels.repeat(3), groups.repeat(3)  # 3 views of each image
    fit, held = holdout_split(rows_y, rows_g, 0.25, seed=1)
    assert torch.equal(fit, ~held)
    held_images = set(rows_g[held].tolist())
    assert not held_images & set(rows_g[fit].tolist())
    assert all(sum(1 for i in held_images if labels[i] == c) == 2 for c in range(10))
    again = holdout_split(rows_y, rows_g, 0.25, seed=1)[1]
    assert torch.equal(held, again) and not torch.equal(held, holdout_split(rows_y, rows_g, 0.25, seed=2)[1])


def test_search_picks_on_held_out_rows_and_stops_early():
    x, y = blobs(600, 12, 4, seed=7, spread=0.6)
    probe = fit_probe(x, y, torch.arange(600), 4, CPU, seed=0, patience=3)
    tried = [r["l2"] for r in probe.search]
    assert tried == sorted(tried, reverse=True) and tried == list(L2_GRID[:len(tried)])
    best = max(probe.search, key=lambda r: (r["holdout_acc1"], -r["holdout_loss"], r["l2"]))
    assert probe.l2 == best["l2"] and probe.converged
    assert len(tried) < len(L2_GRID) and tried.index(probe.l2) == len(tried) - 4  # stopped 3 after the best
    again = fit_probe(x, y, torch.arange(600), 4, CPU, seed=0, patience=3)
    assert again.l2 == probe.l2 and torch.equal(again.weight, probe.weight)
    fixed = fit_probe(x, y, torch.arange(600), 4, CPU, l2=0.1)
    assert fixed.l2 == 0.1 and fixed.search == []


def test_streamed_fit_is_the_full_batch_fit():
    x, y = blobs(257, 9, 4, seed=11)
    xs = Standardizer.fit(x)(x)
    whole = fit_multinomial(xs, y, 4, 1e-2, CPU)
    streamed = fit_multinomial(xs, y, 4, 1e-2, CPU, chunk_rows=50)  # 6 chunks, the last one of 7 rows
    torch.testing.assert_close(streamed[0], whole[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(streamed[1], whole[1], atol=1e-9, rtol=0)
    chunked = Standardizer.fit(x, chunk_rows=50)
    torch.testing.assert_close(chunked.mean, x.double().mean(0).float())
    torch.testing.assert_close(chunked.var, x.double().var(0, unbiased=False).float())


def test_features_stay_on_the_gpu_only_while_they_fit():
    gpu = torch.device("cuda", 0)
    assert features_home(10**9, CPU) == CPU
    assert features_home(10**9, gpu, free_bytes=6 * 10**9) == gpu
    assert features_home(10**9 + 1, gpu, free_bytes=6 * 10**9) == CPU


@pytest.mark.parametrize("classes", [2, 5, 6, 10])
def test_scores_leave_top5_out_at_5_classes_or_fewer(classes):
    """Top-5 of 5 classes or fewer is always 100%: no acc5 then; top-1 and the loss are unchanged."""
    g = torch.Generator().manual_seed(classes)
    logits, labels = torch.randn(40, classes, generator=g), torch.randint(0, classes, (40,), generator=g)
    scores = scores_of(logits, labels)
    assert set(scores) == ({"acc1", "acc5", "loss"} if classes > 5 else {"acc1", "loss"})
    assert scores["acc1"] == 100.0 * (logits.argmax(1) == labels).sum().item() / 40
    assert scores["loss"] == torch.nn.functional.cross_entropy(logits, labels).item()
    if classes > 5:
        top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum().item()
        assert scores["acc5"] == 100.0 * top5 / 40
