"""The label model: a K-fold linear probe (out of sample) combined with the neighbour vote."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from sklearn.metrics import roc_auc_score

from curation.config import ScoresConfig
from curation.index.knn import exact_knn
from curation.scores import label_probe, run_scores
from tests.test_scores import make_samples


def _mixture(n_per=150, classes=4, dim=24, seed=0):
    """Overlapping Gaussian classes: linearly separable on average, with a neighbour vote that
    errs near the borders -- where a probe earns its keep."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.9
    y = np.repeat(np.arange(classes), n_per)
    x = centres[y] + rng.normal(size=(len(y), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def _flip(y, rate, seed=1):
    rng = np.random.default_rng(seed)
    flip = rng.choice(len(y), int(rate * len(y)), replace=False)
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, y.max() + 1, len(flip))) % (y.max() + 1)
    return noisy, flip


def test_probe_probabilities_are_out_of_sample(monkeypatch):
    x, y = _mixture()
    noisy, flip = _flip(y, 0.08)
    # A sample smaller than N: sampled rows get K-fold probabilities, the rest the final model's.
    monkeypatch.setattr(label_probe, "PROBE_SAMPLE", 300)
    top_classes, top_p, info, _ = label_probe.probe_probabilities(x, noisy, 4)
    assert 280 <= info["sample"] <= 300 and info["backend"] == "sklearn"
    assert top_classes.shape == (len(y), 4) and np.allclose(top_p.sum(axis=1), 1.0, atol=1e-4)
    p_given = np.array([top_p[i][top_classes[i] == noisy[i]][0] for i in range(len(y))])
    is_flip = np.isin(np.arange(len(y)), flip)
    # Out of sample, a flipped item's own (wrong) label gets a low probability: in sample, a
    # flexible model would have learnt it back.
    assert roc_auc_score(is_flip, -p_given) > 0.9
    best = top_classes[np.arange(len(y)), np.argmax(top_p, axis=1)]
    assert (best[flip] == y[flip]).mean() > 0.7  # it names the true class of most flips


def test_stratified_sample_keeps_every_class():
    codes = np.concatenate([np.zeros(10000, np.int64), np.ones(30, np.int64), np.full(500, -1)])
    sample = label_probe.stratified_sample(codes, 1000)
    picked = codes[sample]
    assert len(sample) <= 1030 and (picked >= 0).all()
    assert (picked == 1).sum() >= label_probe.MIN_PER_CLASS  # a rare class is not sampled away
    assert np.all(np.diff(sample) > 0)


def test_probe_follows_the_items_not_their_order(monkeypatch):
    """With item keys, the probe samples, folds and fits the same items in the same order
    whatever order the vectors are stored in (an updated night beside the same night built
    whole): every item gets the same probabilities. Without keys the sample follows the rows."""
    x, y = _mixture(n_per=200)
    noisy, _ = _flip(y, 0.08)
    uris = [f"s3://b/{i}.jpg" for i in range(len(y))]
    keys = label_probe.fold_keys(uris)
    monkeypatch.setattr(label_probe, "PROBE_SAMPLE", 400)
    order = np.random.default_rng(3).permutation(len(y))
    a_classes, a_p, _, _ = label_probe.probe_probabilities(x, noisy, 4, keys=keys)
    b_classes, b_p, _, _ = label_probe.probe_probabilities(x[order], noisy[order], 4, keys=keys[order])
    dense = lambda c, p: np.take_along_axis(p, np.argsort(c, axis=1), axis=1)  # noqa: E731
    np.testing.assert_allclose(dense(b_classes, b_p), dense(a_classes, a_p)[order], atol=1e-4)
    picked = label_probe.stratified_sample(noisy, 400, keys=keys)
    assert set(order[label_probe.stratified_sample(noisy[order], 400, keys=keys[order])]) == set(picked)
    assert set(order[label_probe.stratified_sample(noisy[order], 400)]) != set(label_probe.stratified_sample(noisy, 400))


def test_an_updated_night_starts_its_fits_from_the_previous_models(monkeypatch):
    """Night 2 (5% new items, classes listed in another order) starts every fit from night 1's
    model of the same fold, moved to tonight's standardisation and class codes: two L-BFGS
    iterations from there land next to the converged answer, two from zero do not. The kept
    state survives its file format; a class set that changed starts from zero."""
    import ray

    # The fits in this process, where MAX_ITER is patched (Ray workers would not see it).
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    x, y = _mixture(n_per=250, classes=4, dim=24, seed=5)
    noisy, _ = _flip(y, 0.08)
    names = np.array(["cat", "dog", "emu", "fox"])
    uris = np.array([f"s3://b/{i}.jpg" for i in range(len(y))])
    monkeypatch.setattr(label_probe, "PROBE_SAMPLE", 600)
    night1 = np.arange(len(y)) % 20 != 0  # 5% arrive on night 2
    _, _, info1, state = label_probe.probe_probabilities(x[night1], noisy[night1], 4,
                                                          keys=label_probe.fold_keys(uris[night1]), class_names=names)
    assert info1["fits_started_from"] == "zero" and state.weights.shape == (label_probe.FOLDS + 1, 24, 4)
    state = label_probe.ProbeState.from_bytes(state.to_bytes())
    # Night 2: every item, the class codes in another order (codes follow first appearance).
    remap = np.array([2, 0, 3, 1])
    codes2, names2 = remap[noisy], np.empty(4, object)
    names2[remap] = names
    keys2 = label_probe.fold_keys(uris)
    converged = label_probe.probe_probabilities(x, codes2, 4, label_probe.ProbeState(state.c), keys=keys2,
                                                class_names=names2)

    def dense(result):
        out = np.zeros((len(y), 4))
        np.put_along_axis(out, result[0].astype(np.int64), result[1], axis=1)
        return out

    monkeypatch.setattr(label_probe, "MAX_ITER", 2)
    warm = label_probe.probe_probabilities(x, codes2, 4, state, keys=keys2, class_names=names2)
    cold = label_probe.probe_probabilities(x, codes2, 4, label_probe.ProbeState(state.c), keys=keys2,
                                           class_names=names2)
    assert warm[2]["fits_started_from"] == "the previous run's models" and cold[2]["fits_started_from"] == "zero"
    assert warm[2]["C_chosen_by"] == "the previous run"
    warm_gap = np.abs(dense(warm) - dense(converged)).max()
    assert warm_gap < 0.05 < np.abs(dense(cold) - dense(converged)).max()
    other = label_probe.probe_probabilities(x, codes2, 4, state, keys=keys2,
                                            class_names=np.array(["cat", "dog", "emu", "gnu"], object))
    assert other[2]["fits_started_from"] == "zero"


def _scored(x, labels, **cfg):
    samples = make_samples(len(labels), labels=[str(v) for v in labels])
    return run_scores(samples, x, exact_knn(x, 10), ScoresConfig(**cfg))


def test_the_probe_flags_planted_flips_better_than_the_vote_alone():
    x, y = _mixture(n_per=200, seed=3)
    noisy, flip = _flip(y, 0.06, seed=4)
    is_flip = np.isin(np.arange(len(y)), flip)
    with_probe, report = _scored(x, noisy)
    vote_only, report_off = _scored(x, noisy, label_probe_weight=0.0)
    auc = {name: roc_auc_score(is_flip, -t["label_quality"].to_numpy()) for name, t in
           (("probe", with_probe), ("vote", vote_only))}
    assert auc["probe"] > 0.9 and auc["probe"] > auc["vote"], auc
    assert report["summary"]["label_quality"]["probe"]["folds"] == label_probe.FOLDS
    assert report_off["summary"]["label_quality"]["probe"] == "off"
    df = with_probe.to_pandas()
    flagged = df.is_suspected_mislabel.to_numpy()
    assert flagged[is_flip].mean() > 0.5 and is_flip[flagged].mean() > 0.5
    # consistent: a flagged item's suggestion is another class, and it is usually the true one
    assert (df.suggested_label[flagged] != df.label[flagged]).all()
    assert (df.suggested_label[flagged & is_flip].astype(int) == y[flagged & is_flip]).mean() > 0.8


def test_many_classes_stay_within_the_block_bound(monkeypatch):
    from curation.scores import label_quality

    rng = np.random.default_rng(5)
    classes = 300  # dense (rows x classes) blocks are cut to fit; the top classes stay compact
    y = rng.permutation(np.repeat(np.arange(classes), 10))  # ten members each: none held out as too small
    centres = rng.normal(size=(classes, 16))
    x = centres[y] + 0.3 * rng.normal(size=(len(y), 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    table, _ = _scored(x, y)
    quality = table["label_quality"].to_numpy()
    assert np.isfinite(quality).all() and (quality >= 0).all() and (quality <= 1).all()
    assert pa.compute.mean(table["label_quality"]).as_py() > 0.5  # well-separated classes: labels trusted
    # Cut into blocks of 1,024 rows (three here): the same answers as in one block.
    monkeypatch.setattr(label_quality, "BLOCK_CELLS", 1)
    blocked, _ = _scored(x, y)
    np.testing.assert_allclose(blocked["label_quality"].to_numpy(), quality, rtol=0, atol=1e-6)
    assert blocked["suggested_label"].equals(table["suggested_label"])


def test_the_fits_as_ray_tasks_give_what_one_process_gives(ray_local, monkeypatch):
    """Every fold and strength its own one-CPU task (the sample through the object store): the
    same out-of-sample probabilities, model and chosen strength as all fits in one process."""
    from curation.index.source import MemoryVectors

    x, y = _mixture(seed=3)
    noisy, _ = _flip(y, 0.08)
    sample = label_probe.stratified_sample(noisy, 400)
    source = MemoryVectors(x)
    keys = label_probe.fold_keys([f"u{i}" for i in sample])
    oos_a, model_a, backend_a, models_a = label_probe.train_probe_in_tasks(source, sample, noisy[sample], 4,
                                                                           label_probe.REGULARISATION_C, keys)
    oos_b, model_b, backend_b, models_b = label_probe.train_probe(source, sample, noisy[sample], 4, keys=keys)
    assert backend_a == backend_b and backend_a.startswith("sklearn, C=")
    np.testing.assert_allclose(oos_a, oos_b, atol=1e-4)
    np.testing.assert_allclose(model_a.probabilities(x), model_b.probabilities(x), atol=1e-4)
    assert len(models_a) == len(models_b) == label_probe.FOLDS + 1
    for a, b in zip(models_a, models_b):
        np.testing.assert_allclose(a[0], b[0], atol=1e-3)
    # Started from kept models, in tasks or in one process: the same again.
    names = np.array(["a", "b", "c", "d"])
    c = float(backend_a.rsplit("C=", 1)[1])
    state = label_probe.ProbeState(c, names, model_a.mean, model_a.scale,
                                   np.stack([label_probe._dense_weights(m, 4)[0] for m in models_a]),
                                   np.stack([label_probe._dense_weights(m, 4)[1] for m in models_a]))
    warm_a = label_probe.train_probe_in_tasks(source, sample, noisy[sample], 4, (c,), keys, state, names)
    warm_b = label_probe.train_probe(source, sample, noisy[sample], 4, 1, (c,), keys, state, names)
    np.testing.assert_allclose(warm_a[0], warm_b[0], atol=1e-4)
