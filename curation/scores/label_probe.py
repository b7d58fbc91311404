"""A linear probe's out-of-sample class probabilities, for the label-quality score.

A neighbour vote is a weak label model on strong features; a multinomial logistic regression
on the same vectors, evaluated out of sample, is a strong one (confident learning needs
out-of-sample probabilities: a model that saw an item's label echoes it back). On a 6%-flipped
CIFAR-10 set with a trained encoder the 10-neighbour vote alone reaches AUROC 0.961, the probe
0.977 and their average 0.975 with more suggested labels right; on MNIST pixels the vote is
the better model (0.993 vs 0.989) and the average beats both (0.9955). See benchmarks/README.md.

How it runs, bounded whatever N is:

1. a stratified sample of at most ``PROBE_SAMPLE`` labelled items (every class keeps at least
   ``MIN_PER_CLASS`` items when it has them) is fetched from the vector store in one Ray task;
2. ``FOLDS``-fold cross-validation gives the sample's own out-of-sample probabilities for each
   regularisation strength in ``REGULARISATION_C``; the one with the lower out-of-sample
   log-loss is kept, with the model fitted with it on the whole sample (weights only). With
   scikit-learn every fit is its own one-CPU task, side by side; on a GPU worker (when the
   cluster has one) the fits run in that one task, with cuML when it imports;
3. that model is applied to every other vector where it is stored (Ray tasks over the
   Parquet parts): items outside the sample are out of sample by construction.

Each item comes back as its ``TOP_CLASSES`` most probable classes and their probabilities
(compact whatever the number of classes); the rest of the mass is spread over the other
classes in proportion to their frequency.

The sample and its folds follow the items (:func:`fold_keys`: a hash of the uri), not their
rows, and a fold is the same items from night to night. A night that updates the previous
run's graph keeps its regularisation and starts every fit from the previous run's model of the
same fold (:class:`ProbeState`, ``label-probe.npz``): fold f's model never saw a fold-f label on
either night, so its probabilities stay out of sample, and L-BFGS, starting near the optimum of
a problem that barely moved, stops after a few iterations instead of running from zero.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
import zlib
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.index.source import CachedVectors, as_source, map_vectors
from curation.scores.clusters import kmeans_backend
from curation.session import run_tasks
from curation.sizing import ONE_CPU, TRAIN_THREADS, training_request

log = logging.getLogger(__name__)

PROBE_SAMPLE = 40_000
MIN_PER_CLASS = 20
FOLDS = 5
TOP_CLASSES = 16
# Inverse regularisation strengths tried (on standardised features); the one with the lower
# out-of-sample log-loss on the given labels wins. 0.05 was best on CIFAR-10 (encoder and
# thumbnail) and MNIST; with many classes and few items each, 1.0 is (flat probabilities otherwise).
REGULARISATION_C = (0.05, 1.0)
MAX_ITER = 200
SEED = 0


def probe_backend() -> str:
    """``cuml`` when cuML imports and a GPU is visible, else ``sklearn``."""
    return "cuml" if kmeans_backend() == "cuml" else "sklearn"


def fold_keys(names) -> np.ndarray:
    """A pseudo-random uint64 per item from a name of it (its file's content hash, else its
    uri; see :func:`probe_keys`): the order the probe samples and deals folds in. Tied to the
    item, not to its row, so a night that stores its vectors in another order (an updated night
    beside the same night built whole, a cluster of another size) fits the same model on the
    same rows, and an item stays in the sample and in its fold from night to night."""
    crc = np.fromiter((zlib.crc32(str(u).encode()) for u in _as_strings(names)), np.uint64)
    z = crc * np.uint64(0x9E3779B97F4A7C15)  # splitmix64's finaliser: CRC32 alone is linear
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _as_strings(names):
    """The names one by one; an Arrow column a slice at a time (not a Python string per row at once)."""
    if not hasattr(names, "to_pylist"):
        yield from names
        return
    for start in range(0, len(names), 65_536):
        yield from names.slice(start, 65_536).to_pylist()


def probe_keys(table, rows: np.ndarray) -> np.ndarray:
    """:func:`fold_keys` of ``rows`` of a samples table: by the file's content hash where it
    has one (the same picture is the same item wherever it is stored: in a local folder or in
    S3), else by uri."""
    take = pa.array(np.asarray(rows, np.int64), pa.int64())
    uris = table["uri"].take(take)
    if "content_hash" in table.column_names:
        uris = pc.coalesce(table["content_hash"].take(take).cast(pa.string()), uris.cast(pa.string()))
    return fold_keys(uris)


def stratified_sample(codes: np.ndarray, size: int, *, keys: np.ndarray | None = None,
                      seed: int = SEED) -> np.ndarray:
    """Positions of at most ``size`` labelled rows (``codes >= 0``), classes in proportion to
    their counts but each with at least ``MIN_PER_CLASS`` (or all it has). With ``keys``
    (:func:`fold_keys`) each class gives its lowest-keyed members and the positions come in key
    order; without, a seeded random draw, sorted."""
    labelled = np.flatnonzero(codes >= 0)
    if len(labelled) <= size:
        return labelled[np.argsort(keys[labelled], kind="stable")] if keys is not None else labelled
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(codes[labelled], return_counts=True)
    quota = np.maximum(np.minimum(counts, MIN_PER_CLASS), np.floor(counts * size / len(labelled))).astype(np.int64)
    picked = []
    for c, q in zip(classes, quota):
        members = labelled[codes[labelled] == c]
        if keys is None:
            picked.append(rng.choice(members, min(q, len(members)), replace=False))
        else:
            picked.append(members[np.argsort(keys[members], kind="stable")[:q]])
    sample = np.concatenate(picked)
    return sample[np.argsort(keys[sample], kind="stable")] if keys is not None else np.sort(sample)


@dataclass
class ProbeState:
    """What a night's probe leaves for the next (``label-probe.npz`` in the run).

    Attributes:
        c: the regularisation chosen.
        classes: class names, the models' columns (None: only ``c`` is known, as from a run
            before the models were kept).
        mean, scale: the standardisation the models apply to.
        weights, bias: ``(FOLDS + 1, d, n_classes)`` and ``(FOLDS + 1, n_classes)``: each fold's
            model, then the whole sample's.
    """

    c: float
    classes: np.ndarray | None = None
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    weights: np.ndarray | None = None
    bias: np.ndarray | None = None

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        np.savez(out, c=np.float64(self.c), classes=np.asarray(self.classes, str), mean=self.mean, scale=self.scale,
                 weights=self.weights, bias=self.bias)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ProbeState":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(float(z["c"]), z["classes"], z["mean"], z["scale"], z["weights"], z["bias"])

    def start_for(self, class_names, mean: np.ndarray, scale: np.ndarray) -> list | None:
        """Each model (folds, then whole) as ``(weights (d, n), bias (n))`` over tonight's class
        codes (``class_names`` in code order) and tonight's standardisation; None when the
        classes or the dimension changed (the fits start from zero)."""
        if self.weights is None or self.classes is None or mean is None or self.mean is None:
            return None
        names = [str(c) for c in class_names]
        if sorted(names) != sorted(str(c) for c in self.classes) or len(mean) != len(self.mean):
            return None
        column = {str(c): i for i, c in enumerate(self.classes)}
        order = np.array([column[c] for c in names])
        # logits = ((x - m0) / s0) W0 + b0, with x = z * s1 + m1: z (s1 / s0) W0 + ((m1 - m0) / s0) W0 + b0.
        ratio, shift = (scale / self.scale)[:, None], ((mean - self.mean) / self.scale)
        return [((ratio * w)[:, order].astype(np.float32), (b + shift @ w)[order].astype(np.float32))
                for w, b in zip(self.weights, self.bias)]


class LinearModel:
    """Multinomial logistic regression weights, applied as ``softmax(((x - mean) / scale) W + b)``."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, weights: np.ndarray, bias: np.ndarray,
                 classes: np.ndarray):
        self.mean, self.scale, self.weights, self.bias, self.classes = mean, scale, weights, bias, classes

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        logits = ((x - self.mean) / self.scale) @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def _fit(x: np.ndarray, y: np.ndarray, backend: str, c: float, start=None):
    """Multinomial logistic regression; ``start``: ``(weights (d, n_classes), bias)`` over all
    class codes to start L-BFGS from (scikit-learn, three classes or more) instead of zero."""
    if backend == "cuml":
        from cuml.linear_model import LogisticRegression
    else:
        from sklearn.linear_model import LogisticRegression

    present = np.unique(y)
    warm = start is not None and backend != "cuml" and len(present) > 2
    model = LogisticRegression(C=c, max_iter=MAX_ITER, warm_start=warm)
    if warm:
        model.coef_ = np.ascontiguousarray(start[0][:, present].T, np.float64)
        model.intercept_ = np.asarray(start[1][present], np.float64)
    with warnings.catch_warnings():
        # A few hundred iterations from zero is a good probe even where L-BFGS would go on
        # (weak, high-dimensional features); the warning would only flood the worker logs.
        warnings.simplefilter("ignore")
        model.fit(x, y)
    weights = np.asarray(getattr(model.coef_, "get", lambda: model.coef_)(), np.float32)
    bias = np.asarray(getattr(model.intercept_, "get", lambda: model.intercept_)(), np.float32)
    classes = np.asarray(getattr(model.classes_, "get", lambda: model.classes_)())
    if weights.shape[0] == 1:  # two classes: one logit, as softmax over (0, z)
        weights = np.concatenate([np.zeros_like(weights), weights])
        bias = np.concatenate([np.zeros_like(bias), bias])
    return weights.T, bias, classes


def _dense(classes: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(p), n_classes), np.float32)
    out[:, classes] = p
    return out


# Nine parameters, kept: the in-process twin of train_probe_in_tasks, with the same arguments.
def train_probe(source, sample_ids: np.ndarray, labels: np.ndarray, n_classes: int,
                threads: int = 1, regularisation: tuple[float, ...] = REGULARISATION_C,
                keys: np.ndarray | None = None, previous: ProbeState | None = None,
                class_names=None) -> tuple[np.ndarray, LinearModel, str, list]:
    """In a task: out-of-sample probabilities of the sample (K-fold) and the model fitted on
    all of it, for the best of the ``regularisation`` strengths. ``keys``: the sample's item
    keys (its folds); ``previous``: the previous run's models to start from (one strength).
    Returns ``(probabilities (n_sample, n_classes), model, backend, models)``, ``models`` the
    chosen strength's fold models and then the whole sample's, as ``(weights, bias, classes)``."""
    z, mean, scale = _standardised_sample(source, sample_ids)
    backend = probe_backend()
    present = np.unique(labels)
    if len(present) < 2:  # one class: nothing to learn, every item is its class
        oos = np.zeros((len(labels), n_classes), np.float32)
        oos[:, present] = 1.0
        weights = np.zeros((z.shape[1], 1), np.float32)
        return oos, LinearModel(mean, scale, weights, np.zeros(1, np.float32), present), f"{backend}", []
    folds = _folds(labels, FOLDS, keys)
    starts = _starts(previous, class_names, mean, scale, regularisation)
    parts = [_fit_one(z, labels, folds, fold, c, n_classes, backend, threads, starts[fold])
             for c in regularisation for fold in range(FOLDS)]
    c, oos = _best_strength([p and p[0] for p in parts], regularisation, folds, labels, n_classes)
    whole = _fit_one(z, labels, folds, -1, c, n_classes, backend, threads, starts[FOLDS])
    at = regularisation.index(c) * FOLDS
    models = [p and p[1] for p in parts[at:at + FOLDS]] + [whole]
    return oos, LinearModel(mean, scale, *whole), f"{backend}, C={c}", models


def _starts(previous: ProbeState | None, class_names, mean, scale, regularisation) -> list:
    """Per fit (each fold, then the whole sample) where L-BFGS starts: the previous run's model
    of the same fold when it chose the one strength tried tonight, else None (zero)."""
    starts = None
    if previous is not None and class_names is not None and tuple(regularisation) == (previous.c,):
        starts = previous.start_for(class_names, mean, scale)
    return starts if starts is not None else [None] * (FOLDS + 1)


def _standardised_sample(source, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In a task: the sample's vectors standardised, and the mean and scale used."""
    x = source.take(sample_ids).astype(np.float32)
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    return (x - mean) / scale, mean, scale


# One Ray task per fit: its arguments are its whole interface (they travel by value): kept flat (9).
def _fit_one(z: np.ndarray, labels: np.ndarray, folds: np.ndarray, fold: int, c: float, n_classes: int,
             backend: str = "sklearn", threads: int = 1, start=None):
    """Fold ``fold``'s out-of-sample probabilities and model (fitted on the other folds; None
    when it cannot be fitted), or with ``fold = -1`` the model fitted on the whole sample
    (``start``: see :func:`_fit`). As a
    one-CPU task, one thread: at this size (tens of thousands of rows) BLAS threads cost more
    than they give (a fit took 0.95 s on one thread and 2.3 s on two here), and the folds run
    side by side instead."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        if fold < 0:
            return _fit(z, labels, backend, c, start)
        test = folds == fold
        if not test.any() or len(np.unique(labels[~test])) < 2:
            return None
        weights, bias, classes = _fit(z[~test], labels[~test], backend, c, start)
        oos = _dense(classes, LinearModel(0.0, 1.0, weights, bias, classes).probabilities(z[test]), n_classes)
        return oos, (weights, bias, classes)


def _best_strength(parts: list, regularisation: tuple[float, ...], folds: np.ndarray, labels: np.ndarray,
                   n_classes: int) -> tuple[float, np.ndarray]:
    """From every fold's out-of-sample probabilities (``FOLDS`` per strength, in order), the
    strength with the lower out-of-sample log-loss and its probabilities."""
    best = None
    for i, c in enumerate(regularisation):
        oos = np.zeros((len(labels), n_classes), np.float32)
        for fold, part in enumerate(parts[i * FOLDS:(i + 1) * FOLDS]):
            if part is not None:
                oos[folds == fold] = part
        loss = -float(np.mean(np.log(np.maximum(oos[np.arange(len(labels)), labels], 1e-6))))
        if best is None or loss < best[0]:
            best = (loss, c, oos)
    return best[1], best[2]


def train_probe_in_tasks(source, sample_ids: np.ndarray, labels: np.ndarray, n_classes: int,
                         regularisation: tuple[float, ...], keys: np.ndarray | None = None,
                         previous: ProbeState | None = None,
                         class_names=None) -> tuple[np.ndarray, LinearModel, str, list]:
    """:func:`train_probe` with scikit-learn, every fit its own one-CPU Ray task (each fold of
    each regularisation strength, and the whole-sample model for each), side by side on the
    cluster; the standardised sample travels once, through the object store."""
    import ray

    present = np.unique(labels)
    if len(present) < 2 or not ray.is_initialized():
        return train_probe(source, sample_ids, labels, n_classes, 1, regularisation, keys, previous, class_names)

    if isinstance(source, CachedVectors) and np.isin(sample_ids, source.ids).all():
        z, mean, scale = _standardised_sample(source, sample_ids)  # from memory: no read of the store
        z = ray.put(z)
    else:
        z, mean, scale = ray.remote(num_returns=3, **ONE_CPU.options())(_standardised_sample).remote(source, sample_ids)
        mean, scale = ray.get([mean, scale])
    folds = _folds(labels, FOLDS, keys)
    starts = _starts(previous, class_names, mean, scale, regularisation)
    # The whole-sample model of every strength too, beside the folds (one more round of tasks
    # would cost more than the fits not kept).
    jobs = [(z, labels, folds, fold, c, n_classes, "sklearn", 1, starts[fold])
            for c in regularisation for fold in range(FOLDS)]
    jobs += [(z, labels, folds, -1, c, n_classes, "sklearn", 1, starts[FOLDS]) for c in regularisation]
    results = run_tasks(_fit_one, jobs)
    parts = results[:-len(regularisation)]
    c, oos = _best_strength([p and p[0] for p in parts], regularisation, folds, labels, n_classes)
    whole = results[len(results) - len(regularisation) + regularisation.index(c)]
    at = regularisation.index(c) * FOLDS
    models = [p and p[1] for p in parts[at:at + FOLDS]] + [whole]
    return oos, LinearModel(mean, scale, *whole), f"sklearn, C={c}", models


def _folds(labels: np.ndarray, k: int, keys: np.ndarray | None = None) -> np.ndarray:
    """Fold number per row: from the item's key when given (the same item is in the same fold
    every night, whatever its row), else each class dealt round-robin in row order."""
    if keys is not None:
        return ((np.asarray(keys, np.uint64) >> np.uint64(40)) % np.uint64(k)).astype(np.int64)
    folds = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        folds[members] = np.arange(len(members)) % k
    return folds


def _top(p: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``m`` most probable classes (int32) and their probabilities (float32)."""
    m = min(m, p.shape[1])
    top = np.argpartition(-p, m - 1, axis=1)[:, :m] if m < p.shape[1] else np.tile(np.arange(p.shape[1]), (len(p), 1))
    return top.astype(np.int32), np.take_along_axis(p, top, axis=1).astype(np.float32)


def _apply(ids: np.ndarray, x: np.ndarray, model: LinearModel, n_classes: int, top: int):
    return _top(_dense(model.classes, model.probabilities(x.astype(np.float32)), n_classes), top)


def probe_probabilities(vectors, codes: np.ndarray, n_classes: int, previous: ProbeState | None = None, *,
                        keys: np.ndarray | None = None, class_names=None
                        ) -> tuple[np.ndarray, np.ndarray, dict, ProbeState | None]:
    """Out-of-sample probe probabilities for every vector.

    Args:
        vectors: the ok rows' vectors (a source in storage or in memory).
        codes: each vector's label code (-1 = unlabelled).
        previous: on a night that updates the previous run's graph, that run's probe: its
            regularisation is kept instead of chosen again (half the fits; chosen afresh
            whenever the graph is built whole, at least every ``knn.rebuild_every`` nights),
            and its models are where tonight's fits start.
        keys: :func:`fold_keys` of the vectors' items: the sample and its folds follow them.
        class_names: the class of each code (what the kept models are stored against).

    Returns:
        ``(top_classes (N, m) int32, top_probabilities (N, m) float32, info, state)``;
        ``state`` is what the next night starts from (None without ``class_names``).
    """
    vectors = as_source(vectors)
    sample = stratified_sample(codes, PROBE_SAMPLE, keys=keys)
    sample_keys = keys[sample] if keys is not None else None
    request = training_request("the label probe's training task", TRAIN_THREADS)
    choices = (float(previous.c),) if previous is not None else REGULARISATION_C
    if not request.gpus:
        oos, model, backend, models = train_probe_in_tasks(vectors, sample, codes[sample], n_classes, choices,
                                                           sample_keys, previous, class_names)
    else:  # a GPU beside the task: cuML there when it imports, in one task
        oos, model, backend, models = run_tasks(train_probe, [(vectors, sample, codes[sample], n_classes,
                                                               request.threads, choices, sample_keys, previous,
                                                               class_names)], request=request)[0]
    parts = map_vectors(vectors, _apply, model, n_classes, TOP_CLASSES)
    top_classes = np.concatenate([p[0] for p in parts])
    top_p = np.concatenate([p[1] for p in parts])
    # The sample's own rows take their cross-validated probabilities (the final model saw them).
    top_classes[sample], top_p[sample] = _top(oos, TOP_CLASSES)
    info = {"backend": backend.split(",")[0], "model": f"logistic regression ({backend})", "sample": int(len(sample)),
            "folds": FOLDS}
    if "C=" in backend:
        info["C"] = float(backend.rsplit("C=", 1)[1])
        info["C_chosen_by"] = ("the previous run" if previous is not None
                               else f"{FOLDS}-fold log-loss over {list(REGULARISATION_C)}")
    warm = (previous is not None and class_names is not None
            and previous.start_for(class_names, model.mean, model.scale) is not None)
    info["fits_started_from"] = "the previous run's models" if warm else "zero"
    state = None
    if class_names is not None and models and all(m is not None for m in models) and "C" in info:
        weights, bias = (np.stack(part) for part in zip(*(_dense_weights(m, n_classes) for m in models)))
        state = ProbeState(info["C"], np.asarray([str(c) for c in class_names]), model.mean, model.scale, weights, bias)
    log.info("label probe: %s, fitted on %d labelled items (%d-fold out of sample, fits from %s)", backend,
             len(sample), FOLDS, info["fits_started_from"])
    return top_classes, top_p, info, state


def dense_probabilities(top_classes: np.ndarray, top_p: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Rows of :func:`probe_probabilities`' top classes as dense probabilities (rows x
    classes): the top classes as predicted, the rest of the mass spread over the other classes
    in proportion to ``prior``."""
    p = top_p.astype(np.float64)
    rest = np.maximum(1.0 - p.sum(axis=1), 0.0)
    listed = np.zeros((len(top_classes), len(prior)), bool)
    np.put_along_axis(listed, top_classes, True, axis=1)
    spread = np.where(listed, 0.0, prior[None, :])
    out = spread * (rest / np.maximum(spread.sum(axis=1), 1e-12))[:, None]
    np.put_along_axis(out, top_classes, p, axis=1)
    return out


def _dense_weights(model: tuple, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A model's ``(weights, bias)`` over every class code; a class it never saw gets zero
    weights and a bias far below the others (what a fit would give it, near enough)."""
    weights, bias, classes = model
    dense_w = np.zeros((weights.shape[0], n_classes), np.float32)
    dense_b = np.full(n_classes, float(np.min(bias)) - 10.0, np.float32)
    dense_w[:, classes] = weights
    dense_b[classes] = bias
    return dense_w, dense_b
