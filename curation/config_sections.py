"""The typed configuration's sections: one pydantic model per top-level key, every field with its
default, its allowed values (``Literal``) or range (:func:`~curation.config_fields.ranged`) and
its meaning: pydantic models, strict (:class:`~curation.config_fields.Section`). :mod:`curation.config` loads and
validates a file into :class:`Config`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from curation.config_fields import ConfigError, Section, Text, ranged  # noqa: F401 (re-exported)
from curation.io.filesystem import StorageConfig


class InputConfig(Section):
    """What to curate.

    Attributes:
        images: a local folder or ``s3://bucket/prefix`` listed recursively for image files.
        manifest: a Parquet or CSV file with a ``uri`` column, optional ``label`` and any
            metadata columns (carried through to ``samples``).
        labels: optional CSV ``path,label``; ``path`` relative to ``images`` or a full URI.
        embeddings: optional precomputed Parquet ``uri, embedding[, label]``; skips decoding
            and embedding entirely.
        extensions: file suffixes that count as images when listing ``images``.
        label_corrections: annotators' answers to fold in: a Label Studio JSON export (tasks
            with annotations, as ``curation export`` made them) or a CSV ``uri,label``. The
            majority answer per item is applied (a tie is not); applied corrections are kept
            with the run and carried to later runs without the file (see
            ``curation/corrections.py``). Checked before any work: a malformed file, a label longer
            than 200 characters, a file matching no input item, or a label the run has no class
            for is exit 2 naming the file and the first bad record.
        allow_new_classes: corrections may name classes the inputs do not have; such a class
            gets the corrected items as members, and while it has fewer than 5 labelled
            members it is held out of the label scores (never suggested, its items never
            flagged). Off by default: a typo in one answer must not become a class.
        split_column: the column (manifest or embeddings file) that names each item's split
            (train / val / test ...); default ``split`` when there is such a column. Copies
            across splits are reported (``leakage.parquet``, ``run.json`` -> ``leakage``).
        split_from_path: images mode: the split is the first path component under ``images``
            (``train/cat/1.jpg`` -> ``train``).
        annotations: detection annotations, one box per object (issue 37's input): a COCO
            instances JSON (``images[].file_name`` relative to ``images``; ``bbox`` ``[x, y, w, h]``
            in the stored image's pixels) or a YOLO ``data.yaml`` (its ``names``; each image's
            ``.txt`` of ``class cx cy w h`` fractions sits where the image's path has ``labels``
            for its last ``images`` folder, ``.txt`` for its suffix). In place of ``labels``.
            Every box becomes a row of the run's ``objects/`` (see :mod:`curation.objects`).
        annotations_format: ``auto`` (``coco`` for a ``.json``, ``yolo`` for a ``.yaml``) |
            ``coco`` | ``yolo``.
        object_embeddings: with ``embeddings``: precomputed box vectors, Parquet ``uri`` (the
            image, as in ``embeddings``), ``bbox`` (``[x, y, w, h]`` pixels), ``label``,
            ``embedding`` (optional ``annotation_id``, ``iscrowd``): every row a box, curated
            as ``annotations`` boxes are without decoding (see :mod:`curation.object_vectors`).
        predictions: a detector's boxes in COCO's results format, beside ``annotations`` (see
            :mod:`curation.predictions`): location and overlooked-object scores, and the
            detector's class scores in ``box_label_quality``.
        follow_symlinks: follow symbolic links to directories when listing a local ``images``
            folder. Off by default (as ``find`` and ``os.walk``); when on, each real directory
            is listed once (loops end) and a link to the input root or above it is not
            followed. Links to files are always read.
    """

    images: Text | None = None
    manifest: Text | None = None
    labels: Text | None = None
    embeddings: Text | None = None
    extensions: list[Text] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"]
    )
    follow_symlinks: bool = False
    split_column: Text | None = None
    split_from_path: bool = False
    label_corrections: Text | None = None
    allow_new_classes: bool = False
    annotations: Text | None = None
    annotations_format: Literal["auto", "coco", "yolo"] = "auto"
    predictions: Text | None = None
    object_embeddings: Text | None = None


class ObjectsConfig(Section):
    """How the boxes of ``input.annotations`` meet the decoded images.

    Attributes:
        clip_tolerance_px: a box reaching at most this far outside its image is clipped to it;
            one reaching further is rejected with the distance in its reason.
        min_size_px: a box whose shorter side (after clipping) is under this many pixels is
            rejected (too small to crop and embed).
        max_per_image: at most this many usable boxes of one image are kept, in the annotation
            file's order; the rest are rejected rows that say so.
        context_margin: each box is cut as a square around its centre, its longer side plus
            this fraction of it on each side (context the embedder sees); outside the image grey.
        background_crops: squares of each image's background (where no box is) cut and
            embedded beside its boxes: the evidence against a box drawn on background
            (``is_spurious_box``). 0 turns that score off; each costs one more crop to embed.
        duplicate_iou: two usable boxes on one image overlapping by at least this IoU are one
            object boxed twice (``is_duplicate_box``).
        mislabel_below: a box is flagged ``is_box_mislabel`` when another class is at least
            as probable as its own boxes are on average, and more probable than half, while
            its ``box_label_quality`` is under this (and under its class's average).
        spurious_below: a box whose ``box_spurious_quality`` (the share of its crop's
            neighbours that are boxes, not background squares) is under this is flagged
            ``is_spurious_box``.
        prediction_min_score: predictions scoring under this are left out of every match.
        match_iou: an annotated box and a prediction overlapping by at least this IoU are the
            same object (the detector's class scores then count in ``box_label_quality``).
        covered_iou: a prediction overlapping some usable annotated box by at least this is
            covered; one that is not, scoring at least ``overlooked_min_score``, becomes a
            ``source = prediction`` row (a possibly overlooked object).
        overlooked_min_score: see ``covered_iou``.
        misplaced_below: ``is_box_misplaced`` when a prediction overlaps the box (IoU at least
            0.1) but no prediction by this much (``box_location_quality`` under it).
        overlooked_below: ``is_overlooked_object`` on prediction rows whose
            ``overlooked_quality`` (1 - the detector's score) is under this.
    """

    clip_tolerance_px: float = ranged(2.0, 0.0, 1e6)
    min_size_px: float = ranged(4.0, 0.0, 1e6)
    max_per_image: int = ranged(500, 1, 1_000_000)
    context_margin: float = ranged(0.1, 0.0, 2.0)
    background_crops: int = ranged(2, 0, 16)
    duplicate_iou: float = ranged(0.7, 0.05, 1.0)
    mislabel_below: float = ranged(0.1, 0.0, 1.0)
    spurious_below: float = ranged(0.3, 0.0, 1.0)
    prediction_min_score: float = ranged(0.05, 0.0, 1.0)
    match_iou: float = ranged(0.5, 0.0, 1.0)
    covered_iou: float = ranged(0.3, 0.0, 1.0)
    overlooked_min_score: float = ranged(0.3, 0.0, 1.0)
    misplaced_below: float = ranged(0.5, 0.0, 1.0)
    overlooked_below: float = ranged(0.5, 0.0, 1.0)


class DecodeConfig(Section):
    """Decoding.

    Attributes:
        max_pixels: images with more pixels than this are rejected before pixels are allocated.
        background: RGB used to composite transparent images.
        batch_size: rows per decode task batch.
        path: where JPEGs are decoded. ``cpu``: CPU tasks decode every file. ``torch``: CPU
            tasks only read plain JPEGs, which the embedding actor decodes in batches on its
            own device (nvJPEG on a GPU; on CPU, libjpeg-turbo through torchvision) together
            with the model input and working thumbnail; every other file is decoded by the CPU
            tasks. ``auto``: ``torch`` when the embedding actors have a GPU, else ``cpu``.
    """

    max_pixels: int = ranged(100_000_000, 1)
    background: list[int] = Field(default_factory=lambda: [255, 255, 255])
    batch_size: int = ranged(64, 1)
    path: Literal["auto", "cpu", "torch"] = "auto"


class EmbedderConfig(Section):
    """The embedding model.

    Attributes:
        model: a registered name: ``thumbnail`` (weight-free pixel descriptor), a torchvision
            backbone (``resnet18``, ``resnet50``, ``mobilenet_v3_small``, ...),
            ``torchscript`` or ``exported`` (a user TorchScript / torch.export program file
            given in ``weights``).
        weights: ``DEFAULT`` (torchvision's published weights, downloaded once), a path or
            ``s3://`` URI of a state_dict / TorchScript file, or ``none`` (random init; tests only).
        image_size: square input size the decoder resizes to.
        batch_size: images per forward pass.
        device: ``auto`` (GPU when present), ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 autocast on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
        min_actors / max_actors: embedding actor pool size; ``max_actors: 0`` sizes it from the
            cluster (one per GPU, else leave half the CPUs to reading and decoding).
        store_dtype: ``float32`` or ``float16`` for the stored embeddings.
    """

    model: Text = "resnet18"
    weights: Text = "DEFAULT"
    image_size: int = ranged(224, 1)
    batch_size: int = ranged(64, 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    min_actors: int = ranged(1, 1)
    max_actors: int = ranged(0, 0)
    store_dtype: Literal["float32", "float16"] = "float32"


class KnnConfig(Section):
    """Nearest neighbours (see ``curation/index/params.py`` for how defaults are chosen).

    Attributes:
        k: neighbours per item, self excluded.
        index: ``auto`` (exact below ``exact_below`` items, IVF above), ``flat`` or ``ivf``.
        exact_below: item count under which ``auto`` searches exactly.
        nlist / nprobe: IVF lists and lists probed per query; 0 = from N (nlist) and from
            ``target_recall`` (nprobe).
        target_recall: with ``nprobe: 0``, the probed lists are the fewest (16 to 256) that find
            this share of the k nearest neighbours of 256 sampled items, measured against a
            search of every list once the shards are filled (0: 16 lists, no measurement).
        codec: ``auto``, ``flat``, ``sq8`` (8-bit scalar quantisation) or ``pq-fastscan``
            (4-bit product-quantised codes scanned with SIMD, the top ``refine_factor * k``
            candidates re-ranked on the exact vectors) for IVF vectors.
        max_flat_bytes: ``auto`` switches to ``sq8`` above this many bytes of float32 vectors.
        refine_factor: ``pq-fastscan`` re-ranks this many times k candidates exactly.
        train_size: vectors sampled to train the coarse quantiser; 0 = max(40 * nlist, 50 000).
        shards: index shards (Ray actors); 0 = one per 2 cluster CPUs.
        query_batch: queries per fan-out round.
        incremental: ``auto`` updates the previous published run's graph (only new and
            changed items, and old items that lost a neighbour, are searched; the previous
            run's trained index is reused) when that run is compatible; ``off`` always builds
            the whole graph. ``run.json`` → ``knn.incremental`` says what was reused or why not.
        rebuild_every: with ``incremental: auto``, build the whole graph (and retrain the
            index) every this many nights.
        incremental_max_change: build the whole graph when more than this share of the items
            is new, changed or deleted (an update would cost about as much).
    """

    k: int = ranged(10, 1)
    index: Literal["auto", "flat", "ivf"] = "auto"
    exact_below: int = ranged(50_000, 0)
    nlist: int = ranged(0, 0)
    nprobe: int = ranged(0, 0)
    target_recall: float = ranged(0.99, 0.0, 1.0)
    codec: Literal["auto", "flat", "sq8", "pq-fastscan"] = "auto"
    max_flat_bytes: int = ranged(8 * 1024**3, 1)
    refine_factor: int = ranged(16, 1)
    train_size: int = ranged(0, 0)
    shards: int = ranged(0, 0)
    query_batch: int = ranged(16384, 1)
    incremental: Literal["auto", "off"] = "auto"
    rebuild_every: int = ranged(7, 1)
    incremental_max_change: float = ranged(0.3, 0.0, 1.0)


class ScoresConfig(Section):
    """Score thresholds. Defaults were measured on the demo set (see README, "Scores").

    Attributes:
        copy_cosine: copy-descriptor cosine at or above which two images are near duplicates
            (images mode; the descriptor is computed from the pixels whatever the embedder).
        copy_ratio: a copy pair's distance must also be at most this share of the local scale
            in the descriptor space (distance to the k-th neighbour): a ratio test against
            dense regions of look-alikes.
        near_duplicate_cosine / near_duplicate_ratio: the same two tests on the embedding, for
            ``input.embeddings`` runs (no pixels, so no copy descriptor).
        semantic_duplicate_cosine: when > 0, embedding pairs at or above this cosine are also
            grouped, as ``dup_kind: semantic`` (SemDeDup-style; off by default: it merges
            distinct shots of one scene, and how many depends on the model).
        near_duplicate_hamming: 64-bit perceptual-hash distance at or below which two items
            are near duplicates (catches re-encodes that embeddings separate poorly).
        dark_highlights: an image whose 99th percentile of luminance is below this is dark
            (under-exposed: nothing in it is lit).
        bright_shadows: an image whose 1st percentile of luminance is above this is bright
            (over-exposed or washed out: nothing in it is dark) ...
        bright_max_range: ... when its tonal range (99th minus 1st percentile) is also below
            this (a light but textured picture keeps its range).
        blurry_sharpness: normalised Laplacian energy below which an image is blurry.
        low_information_std: luminance std below which an image carries no information.
        label_probe_weight: share of the linear probe's out-of-sample probabilities in the
            label model (the rest is the neighbour vote); 0 turns the probe off.
        label_quality_threshold: labelled items below this whose suggested label differs are
            suspected mislabels.
        mislabel_min_confidence: ... and only when the neighbours back the suggested label with
            at least this calibrated probability (with a weak or non-semantic embedder the
            votes are spread thin and nothing should be flagged).
        dispute_min_confidence: a corrected label (``input.label_corrections``) is never a
            suspected mislabel; it is ``is_disputed`` (and back in ``label_review``) only when the
            label models suggest another label with at least this calibrated probability.
        rare_tail_quantile: sparseness above this is the "rarest tail" excluded from
            ``representative``.
        n_clusters: k-means clusters; 0 picks ``clamp(sqrt(N/2), 2, 256)``, at most the largest
            ``representative`` budget.
    """

    copy_cosine: float = ranged(0.92, 0.0, 1.0)
    copy_ratio: float = ranged(0.3, 0.0, 1.0)
    near_duplicate_cosine: float = ranged(0.95, 0.0, 1.0)
    near_duplicate_ratio: float = ranged(0.25, 0.0, 1.0)
    near_duplicate_hamming: int = ranged(8, 0, 64)
    semantic_duplicate_cosine: float = ranged(0.0, 0.0, 1.0)
    dark_highlights: float = ranged(0.25, 0.0, 1.0)
    bright_shadows: float = ranged(0.55, 0.0, 1.0)
    bright_max_range: float = ranged(0.2, 0.0, 1.0)
    blurry_sharpness: float = ranged(0.05, 0.0)
    low_information_std: float = ranged(0.02, 0.0, 1.0)
    label_probe_weight: float = ranged(0.5, 0.0, 1.0)
    label_quality_threshold: float = ranged(0.3, 0.0, 1.0)
    mislabel_min_confidence: float = ranged(0.5, 0.0, 1.0)
    dispute_min_confidence: float = ranged(0.8, 0.0, 1.0)
    rare_tail_quantile: float = ranged(0.98, 0.0, 1.0)
    n_clusters: int = ranged(0, 0)


SELECTION_MODES = ("representative", "edge_cases", "label_review", "clean", "to_label", "validation", "box_review")


class SelectionConfig(Section):
    """One named selection.

    Attributes:
        name: output file ``selections/<name>.parquet``.
        mode: ``representative`` | ``edge_cases`` | ``label_review`` | ``clean`` | ``to_label`` |
            ``validation`` | ``box_review`` (detection runs: boxes, not images; see
            :mod:`curation.select_boxes`).
        budget: maximum rows (``clean`` ignores it unless set; ``box_review``: boxes).
        class_balance: ``uniform`` | ``proportional`` | ``tempered:<alpha>`` (representative).
        where: a filter over sample/metadata columns (pandas ``query`` syntax, parsed by
            :mod:`curation.where`; never evaluated as text).
        balance_on: balance over this column instead of ``label``.
        include_rare: ``to_label`` may pick from the rarest tail (sparseness >
            ``scores.rare_tail_quantile``); off by default: outliers teach a model little per label.
        fraction: ``validation``: the share of the eligible items to hold out, instead of ``budget``.
        disjoint_from: names of selections built after this one that exclude every item in a
            duplicate group with one of its members, or whose embedding cosine to one of its
            members is at least ``disjoint_cosine`` (a validation set that shares no copy with
            training). A cycle is a config error.
        disjoint_cosine: the embedding similarity from which two items count as the same for
            ``disjoint_from``.
    """

    name: Text
    mode: Literal[SELECTION_MODES] | None = None
    budget: int | None = ranged(None, 1)
    class_balance: Text = "uniform"
    where: Text | None = None
    balance_on: Text | None = None
    include_rare: bool = False
    fraction: float | None = ranged(None, 0.0, 1.0)
    disjoint_from: list[Text] = Field(default_factory=list)
    disjoint_cosine: float = ranged(0.95, -1.0, 1.0)


def _default_selections() -> list[SelectionConfig]:
    return [
        SelectionConfig(name="train", mode="representative", budget=1000),
        SelectionConfig(name="edge_cases", mode="edge_cases", budget=200),
        SelectionConfig(name="label_review", mode="label_review", budget=300),
        SelectionConfig(name="clean", mode="clean"),
    ]


class StoreConfig(Section):
    """The incremental embedding store.

    Attributes:
        enabled: reuse stored embeddings for unchanged inputs (same uri, size and mtime, same
            embedder) and write the new snapshot after the run.
        uri: where it lives; default ``<output.uri>/embedding-store``.
    """

    enabled: bool = True
    uri: Text | None = None


class OutputConfig(Section):
    """Where results go.

    Attributes:
        uri: folder or ``s3://`` prefix for runs.
        run_id: this run's folder name; defaults to a UTC timestamp. One plain path component:
            letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most
            128 characters, and not ``latest`` or ``embedding-store`` (names the output
            folder already uses).
        keep_runs: after publishing, keep only this many complete runs (the newest by their
            ``_SUCCESS`` time; the one ``latest`` names is always kept, and folders without
            ``_SUCCESS`` -- runs being written, the embedding store -- are never touched).
            0 keeps every run.
    """

    uri: Text | None = None
    run_id: Text | None = None
    keep_runs: int = ranged(0, 0)


MAP_METHODS = ("umap", "pca")


class ReportConfig(Section):
    """The run's ``report.html``: its 2-D map, thumbnails and galleries.

    Attributes:
        map_method: ``umap`` (UMAP after a PCA to 50 dimensions: neighbourhoods and clusters
            stay apart; cuML's UMAP on a GPU worker when there is one) or ``pca`` (global
            layout only; fast).
        map_points: at most this many ok items get ``x``, ``y``: every flagged item and every
            member of ``edge_cases`` / ``label_review`` selections first, the rest a sample
            stratified by label (by cluster when unlabelled). 0 turns the map off.
        thumbnails: at most this many items get a thumbnail in the page (gallery members first,
            then map points); each costs about 1-2 KB of page.
        thumbnail_px: the longest side of a thumbnail, in pixels.
        gallery_size: items shown per gallery (mislabels, edge cases, each junk kind, rejected);
            duplicate galleries show this many groups' worth of items.
    """

    map_method: Literal[MAP_METHODS] = "umap"
    map_points: int = ranged(20_000, 0)
    thumbnails: int = ranged(5_000, 0)
    thumbnail_px: int = ranged(64, 16, 256)
    gallery_size: int = ranged(24, 0)


class DriftConfig(Section):
    """Drift between nights: each run keeps a compact profile (``profile.json``,
    ``profile.parquet``) and compares itself with the previous published run's (``run.json`` →
    ``drift``; ``drift.parquet``). Defaults are chosen in ``benchmarks/README.md`` (drift).

    Attributes:
        enabled: write the profile and compare (skipped, with the reason, on a first night or
            when the embedder's ``model_id`` changed).
        sample_size: ok items whose vectors the profile keeps (the two-sample test's sample).
        permutations: at most this many permutations for the MMD tests' p-values (the
            smallest p-value is 1 / (permutations + 1), so ``alarm_p_value`` must be above it;
            a test stops early once its p-value is clearly above any alarm level).
        alarm_p_value: the MMD test alarms below this p-value.
        alarm_class_share_change: alarm when a label's share of the labelled items moves by more.
        alarm_cluster_tv: alarm when tonight's items, assigned to yesterday's cluster centroids,
            are further than this (total variation) from yesterday's cluster shares.
        alarm_region_items: alarm when a new region (new items farther from everything in the
            previous run than its 99th percentile of k-th-neighbour distance, grouped by their
            neighbours) holds at least this many items. Smaller groups are listed, not alarmed.
        exit_code: exit 3 after publishing when the alarm fires (for schedulers that alert on status).
    """

    enabled: bool = True
    sample_size: int = ranged(2000, 10)
    permutations: int = ranged(1000, 10)
    alarm_p_value: float = ranged(0.001, 0.0, 1.0)
    alarm_class_share_change: float = ranged(0.05, 0.0, 1.0)
    alarm_cluster_tv: float = ranged(0.05, 0.0, 1.0)
    alarm_region_items: int = ranged(20, 1)
    exit_code: bool = False


class ClusterConfig(Section):
    """How the run fits a Ray cluster of several nodes (see ``curation/sizing.py``).

    Every task and actor is sized to fit one node: from the nodes that exist, and from the
    node types the autoscaler reports when it has any (KubeRay's autoscaler v2). When the
    cluster can grow but Ray cannot say into what, these keys describe its largest node.

    Attributes:
        max_node_cpus / max_node_gpus / max_node_memory: the largest node the cluster may
            add (CPUs, GPUs, bytes of memory); 0 = only what Ray reports. A request that fits
            no node, no reported node type and not these fails at once with one line.
        stall_timeout_s: a run in which nothing finishes (no task, no block, no search batch)
            while work waits for resources fails after this many seconds, listing what is
            waiting, and publishes nothing. Waiting for the autoscaler is normal: keep this
            above the time a new node takes to start. 0 turns the check off.
        check_nodes: before any work, a tiny task on every alive node checks that it can read
            the input and write the output (a local path seen by the driver alone fails here,
            naming the node).
    """

    max_node_cpus: int = ranged(0, 0)
    max_node_gpus: int = ranged(0, 0)
    max_node_memory: int = ranged(0, 0)
    stall_timeout_s: float = ranged(1800.0, 0)
    check_nodes: bool = True


class RayConfig(Section):
    """Local Ray settings, used only when neither ``RAY_ADDRESS`` is set nor Ray is running."""

    num_cpus: int | None = ranged(None, 1)
    object_store_memory: int | None = ranged(None, 1)


class Config(Section):
    """The whole job configuration."""

    input: InputConfig = Field(default_factory=InputConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    objects: ObjectsConfig = Field(default_factory=ObjectsConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)
    scores: ScoresConfig = Field(default_factory=ScoresConfig)
    selections: list[SelectionConfig] = Field(default_factory=_default_selections)
    output: OutputConfig = Field(default_factory=OutputConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain dict (for run.json); credentials replaced by ``"***"`` when ``redact``."""
        data = self.model_dump()
        if redact:
            for key in ("access_key_id", "secret_access_key"):
                if data["storage"].get(key):
                    data["storage"][key] = "***"
        return data
