"""Turn ``input.*`` into one table of input items: one row per listed file, manifest row or
labels row, so that accounting (every input appears in ``samples`` exactly once) can hold.

Columns: ``input_id`` (int64, stable order), ``uri``, ``label`` (nullable), ``input_error``
(a reason known before reading, e.g. a non-image extension or a repeated labels row) and any
manifest metadata columns.
"""

from __future__ import annotations

import csv
import logging
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pyarrow.dataset as pads

from curation.config import Config, ConfigError
from curation.io.filesystem import Location, Resolver, StorageError, check_readable, list_files, open_text, to_uri
from curation.schema import STATUS_OK, STATUS_REJECTED
from curation.scores import reserved_columns

log = logging.getLogger(__name__)


def check_inputs(config: Config, resolver: Resolver) -> None:
    """Fail fast (before Ray starts) when an input URI is unreachable or of the wrong kind."""
    inp = config.input
    checks = [("input.images", inp.images, "dir"), ("input.manifest", inp.manifest, "file"),
              ("input.labels", inp.labels, "file"), ("input.embeddings", inp.embeddings, "any"),
              ("input.label_corrections", inp.label_corrections, "file")]
    for key, uri, want in checks:
        if not uri:
            continue
        try:
            location = resolver.resolve(uri)
            check_readable(location, want=want)
        except StorageError as exc:
            raise ConfigError(f"config key '{key}': {exc}") from None


def _read_labels(location: Location) -> list[tuple[str, str]]:
    reader = csv.reader(open_text(location))
    rows = [row for row in reader if row and any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    if "label" in header and ("path" in header or "uri" in header):
        path_col = header.index("path") if "path" in header else header.index("uri")
        label_col = header.index("label")
        rows = rows[1:]
    else:
        path_col, label_col = 0, 1
    out = []
    for i, row in enumerate(rows):
        if len(row) <= max(path_col, label_col):
            raise StorageError(f"{location.uri}: row {i + 2} has {len(row)} columns, expected path,label")
        out.append((row[path_col].strip(), row[label_col].strip()))
    return out


def _label_uri(path: str, images_root: Location | None, resolver: Resolver) -> str:
    if "://" in path or path.startswith("/"):
        return resolver.resolve(path).uri
    if images_root is None:
        raise StorageError(f"labels path {path!r} is relative but input.images is not set")
    return images_root.child(path).uri


def _fingerprint(info) -> str:
    """Size and modification time from the listing: changes when the object is rewritten."""
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return f"{info.size}:{mtime}"


def _list_images(config: Config, resolver: Resolver) -> tuple[Location, list[str], list[str | None], list[str]]:
    root = resolver.resolve(config.input.images)
    extensions = {ext.lower() for ext in config.input.extensions}
    uris, errors, fingerprints = [], [], []
    for info in list_files(root, follow_symlinks=config.input.follow_symlinks):
        # Relative to the root as listed, not normalised: an S3 key "a/../b.jpg" is its own object.
        rel = info.path[len(root.path):].lstrip("/")
        uri = root.child(rel).uri
        suffix = posixpath.splitext(info.path)[1].lower()
        uris.append(uri)
        fingerprints.append(_fingerprint(info))
        if info.problem:
            errors.append(info.problem)
        elif any(part in (".", "..") for part in rel.split("/")):
            errors.append("not a plain name: a '.' or '..' path segment")
        elif posixpath.basename(info.path).startswith("."):
            errors.append("skipped: hidden file")
        elif suffix not in extensions:
            errors.append(f"not an image: extension {suffix or '(none)'!r} is not in input.extensions")
        else:
            errors.append(None)
    return root, uris, errors, fingerprints


def _read_table(location: Location) -> pa.Table:
    try:
        if location.path.lower().endswith(".csv"):
            with location.filesystem.open_input_stream(location.path) as fh:
                return pacsv.read_csv(fh)
        return pq.read_table(location.path, filesystem=location.filesystem)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"{location.uri}: cannot read table ({exc})") from exc


def _read_manifest(config: Config, resolver: Resolver) -> pa.Table:
    location = resolver.resolve(config.input.manifest)
    table = _read_table(location)
    if "uri" not in table.column_names:
        raise ConfigError(f"config key 'input.manifest': {location.uri} has no 'uri' column "
                          f"(columns: {', '.join(table.column_names)})")
    base = Location(location.filesystem, posixpath.dirname(location.path), "")
    uris = []
    for value in table["uri"].to_pylist():
        value = (value or "").strip()
        if value and "://" not in value and not value.startswith("/"):
            uris.append(base.child(value).uri)  # relative to the manifest's folder
        else:
            uris.append(value)
    columns = {"uri": pa.array(uris, pa.string())}
    # A manifest may carry a change token per row; without one its rows are always re-embedded.
    for name in ("fingerprint", "etag"):
        if name in table.column_names:
            columns["fingerprint"] = pc.cast(table[name], pa.string())
            break
    if "label" in table.column_names:
        labels = pc.cast(table["label"], pa.string())
        columns["label"] = labels
    for name in metadata_columns("input.manifest", table.column_names, known=("uri", "label", "fingerprint", "etag")):
        columns[name] = table[name]
    return pa.table(columns)


def metadata_columns(key: str, names: list[str], *, known: tuple[str, ...]) -> list[str]:
    """The metadata columns among an input's ``names`` (all but the ``known`` ones), carried
    into ``samples``. Raises ConfigError for one named like an output column."""
    reserved = reserved_columns()
    metadata = [name for name in names if name not in known]
    for name in metadata:
        if name in reserved:
            raise ConfigError(f"config key '{key}': column {name!r} clashes with an output column; rename it")
    return metadata


def list_inputs(config: Config, resolver: Resolver) -> pa.Table:
    """Build the inputs table for ``input.images`` or ``input.manifest`` (+ ``input.labels``)."""
    images_root: Location | None = None
    if config.input.manifest:
        table = _read_manifest(config, resolver)
        errors: list[str | None] = [None if u else "missing: empty uri in manifest" for u in table["uri"].to_pylist()]
    else:
        images_root, uris, errors, fingerprints = _list_images(config, resolver)
        table = pa.table({"uri": pa.array(uris, pa.string()), "fingerprint": pa.array(fingerprints, pa.string())})
    n = table.num_rows
    labels: list[str | None] = table["label"].to_pylist() if "label" in table.column_names else [None] * n

    extra_uris: list[str] = []
    extra_labels: list[str | None] = []
    extra_errors: list[str | None] = []
    if config.input.labels:
        labels_location = resolver.resolve(config.input.labels)
        index = {uri: i for i, uri in enumerate(table["uri"].to_pylist())}
        seen: set[str] = set()
        matched = 0
        rows = _read_labels(labels_location)
        for path, label in rows:
            uri = _label_uri(path, images_root, resolver)
            if uri in seen:
                extra_uris.append(uri)
                extra_labels.append(label)
                extra_errors.append(f"duplicate labels row for {path!r} (first row kept)")
                continue
            seen.add(uri)
            if uri in index:
                labels[index[uri]] = label or None
                matched += 1
            else:
                # A labels row whose file was not listed is still an input; decoding reports it missing.
                extra_uris.append(uri)
                extra_labels.append(label or None)
                extra_errors.append(None)
        if rows and n and not matched:
            # Not one labels row names a listed file: almost surely the wrong labels file or a
            # path convention mismatch; a run would label nothing and train on nothing.
            raise ConfigError(f"config key 'input.labels': {labels_location.uri} names {len(rows)} files and none of them is "
                             f"among the {n} listed inputs (first row: {rows[0][0]!r}, resolved to "
                             f"{_label_uri(rows[0][0], images_root, resolver)!r}; first input: "
                             f"{table['uri'][0].as_py()!r})")

    columns = {
        "uri": pa.array(table["uri"].to_pylist() + extra_uris, pa.string()),
        "label": pa.array(labels + extra_labels, pa.string()),
        "input_error": pa.array(errors + extra_errors, pa.string()),
    }
    if "fingerprint" not in table.column_names:
        table = table.append_column("fingerprint", pa.nulls(n, pa.string()))
    for name in table.column_names:
        if name not in ("uri", "label"):
            column = table[name].combine_chunks()
            if extra_uris:
                column = pa.concat_arrays([column, pa.nulls(len(extra_uris), column.type)])
            columns[name] = column
    total = n + len(extra_uris)
    columns = {"input_id": pa.array(range(total), pa.int64()), **columns}
    log.info("inputs: %d items (%d listed, %d from labels only)", total, n, len(extra_uris))
    return pa.table(columns)


EMBEDDINGS_COLUMNS = ("uri", "embedding", "label", "model_id")  # of input.embeddings files; the rest is metadata


def embeddings_files(config: Config, resolver: Resolver) -> tuple[list[Location], list[str], int]:
    """The Parquet files of ``input.embeddings`` (a file or a folder), their column names and
    row count, from the footers alone. Raises ConfigError when a required column is missing."""
    location = resolver.resolve(config.input.embeddings)
    try:
        dataset = pads.dataset(location.path, filesystem=location.filesystem, format="parquet")
        names = dataset.schema.names
        for required in ("uri", "embedding"):
            if required not in names:
                raise ConfigError(f"config key 'input.embeddings': {location.uri} has no {required!r} column "
                                  f"(columns: {', '.join(names)})")
        metadata_columns("input.embeddings", names, known=EMBEDDINGS_COLUMNS)
        files = [Location(location.filesystem, path, to_uri(location.filesystem, path)) for path in dataset.files]
        return files, names, dataset.count_rows()
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"config key 'input.embeddings': {location.uri}: cannot read Parquet ({exc})") from None


def read_embeddings_metadata(files: list[Location]) -> tuple[pa.Table, str | None]:
    """Every column of the embeddings files except the vectors, in file order, and the
    ``model_id`` of the first row (when the files carry one)."""
    tables = []
    for location in files:
        try:
            with location.filesystem.open_input_file(location.path) as fh:
                reader = pq.ParquetFile(fh)
                columns = [n for n in reader.schema_arrow.names if n != "embedding"]
                tables.append(reader.read(columns=columns))
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"{location.uri}: cannot read Parquet ({exc})") from exc
    meta = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({"uri": pa.array([], pa.string())})
    model_id = str(meta["model_id"][0]) if "model_id" in meta.column_names and meta.num_rows else None
    return meta, model_id


def _vector_checksums(x: np.ndarray) -> np.ndarray:
    """A 64-bit checksum of each row's float32 bits (the same vector, the same checksum)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    weights = np.random.default_rng(0x5EED).integers(1, 2**63, size=bits.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (bits * weights).sum(axis=1, dtype=np.uint64)


def check_vectors(location: Location) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of one embeddings file: the vector's length (-1 when null), whether it is
    finite and non-zero, and a checksum of its values (0 when unusable; the item's fingerprint,
    so a changed vector under the same uri is a changed item). Runs where the file is read (a
    Ray task on a cluster)."""
    lengths, usable, checksums = [], [], []
    try:
        with location.filesystem.open_input_file(location.path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=["embedding"], batch_size=16384):
                emb = batch.column(0)
                valid = np.asarray(emb.is_valid().to_numpy(zero_copy_only=False), bool)
                lens = pc.list_value_length(emb).to_numpy(zero_copy_only=False).astype(np.float64)
                lens = np.where(valid, np.nan_to_num(lens, nan=-1), -1).astype(np.int64)
                good = np.zeros(len(emb), bool)
                sums = np.zeros(len(emb), np.uint64)
                if valid.any() and len(set(lens[valid].tolist())) == 1:
                    values = emb.filter(pa.array(valid))
                    x = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(values), -1)
                    good[valid] = np.isfinite(x).all(axis=1) & (np.abs(x).sum(axis=1) > 0)
                    sums[valid] = _vector_checksums(x)
                elif valid.any():  # mixed lengths: check row by row
                    for i in np.flatnonzero(valid):
                        x = np.asarray(emb[int(i)].values.to_numpy(zero_copy_only=False), np.float32)
                        good[i] = bool(np.isfinite(x).all() and np.abs(x).sum() > 0)
                        sums[i] = _vector_checksums(x[None, :])[0]
                lengths.append(lens)
                usable.append(good)
                checksums.append(np.where(good, sums, np.uint64(0)))
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"{location.uri}: cannot read embeddings ({exc})") from exc
    return (np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
            np.concatenate(usable) if usable else np.zeros(0, bool),
            np.concatenate(checksums) if checksums else np.zeros(0, np.uint64))


def samples_from_embeddings(meta: pa.Table, lengths: np.ndarray, usable: np.ndarray,
                            checksums: np.ndarray | None = None) -> pa.Table:
    """Sample rows for ``input.embeddings``: no pixels, so no decode statistics; a row is ok unless
    its vector is null, of another length than the first vector, zero or not finite. The ok
    rows' vector ids follow file order."""
    n = meta.num_rows
    valid = lengths >= 0
    dim = int(lengths[valid][0]) if valid.any() else 0
    good = valid & (lengths == dim) & usable
    reasons = np.where(~valid, "corrupt: null embedding",
                       np.where(lengths != dim, f"corrupt: embedding length differs from {dim}",
                                np.where(~good, "corrupt: embedding is zero or not finite", None)))
    vector_id = np.cumsum(good) - 1
    columns = {
        "input_id": pa.array(np.arange(n, dtype=np.int64)),
        "uri": meta["uri"].cast(pa.string()),
        "label": meta["label"].cast(pa.string()) if "label" in meta.column_names else pa.nulls(n, pa.string()),
        "status": pa.array(np.where(good, STATUS_OK, STATUS_REJECTED), pa.string()),
        "reason": pa.array(list(reasons), pa.string()),
        "width": pa.nulls(n, pa.int32()), "height": pa.nulls(n, pa.int32()),
        "brightness": pa.array(np.full(n, np.nan, np.float32)),
        "contrast": pa.array(np.full(n, np.nan, np.float32)),
        "sharpness": pa.array(np.full(n, np.nan, np.float32)),
        "shadows": pa.array(np.full(n, np.nan, np.float32)),
        "highlights": pa.array(np.full(n, np.nan, np.float32)),
        "content_hash": pa.nulls(n, pa.string()), "pixel_hash": pa.nulls(n, pa.string()),
        "phash": pa.array(np.zeros(n, np.int64)),
        "vector_id": pa.array(vector_id, pa.int64(), mask=~good),
    }
    if checksums is not None:  # the vector's checksum: a changed vector under the same uri is a changed item
        digits = pc.cast(pa.array(checksums, pa.uint64()), pa.string())
        fingerprint = pc.binary_join_element_wise(pa.scalar("vector:"), digits, "")
        columns["fingerprint"] = pc.if_else(pa.array(good), fingerprint, pa.scalar(None, pa.string()))
    for name in meta.column_names:
        if name not in columns and name != "model_id":
            columns[name] = meta[name]
    return pa.table(columns)
