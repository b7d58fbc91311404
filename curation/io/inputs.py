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

from curation.config import Config, ConfigError
from curation.io.filesystem import Location, Resolver, StorageError, check_readable, list_files, open_text, to_uri

log = logging.getLogger(__name__)


def check_inputs(config: Config, resolver: Resolver) -> None:
    """Fail fast (before Ray starts) when an input URI is unreachable or of the wrong kind."""
    inp = config.input
    checks = [("input.images", inp.images, "dir"), ("input.manifest", inp.manifest, "file"),
              ("input.labels", inp.labels, "file"), ("input.embeddings", inp.embeddings, "any")]
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
    for info in list_files(root):
        uri = root.child(posixpath.relpath(info.path, root.path)).uri
        suffix = posixpath.splitext(info.path)[1].lower()
        uris.append(uri)
        fingerprints.append(_fingerprint(info))
        if posixpath.basename(info.path).startswith("."):
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
    from curation.scores import reserved_columns

    reserved = reserved_columns()
    for name in table.column_names:
        if name in ("uri", "label", "fingerprint", "etag"):
            continue
        if name in reserved:
            raise ConfigError(f"config key 'input.manifest': column {name!r} clashes with an output column; rename it")
        columns[name] = table[name]
    return pa.table(columns)


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
        for path, label in _read_labels(labels_location):
            uri = _label_uri(path, images_root, resolver)
            if uri in seen:
                extra_uris.append(uri)
                extra_labels.append(label)
                extra_errors.append(f"duplicate labels row for {path!r} (first row kept)")
                continue
            seen.add(uri)
            if uri in index:
                labels[index[uri]] = label or None
            else:
                # A labels row whose file was not listed is still an input; decoding reports it missing.
                extra_uris.append(uri)
                extra_labels.append(label or None)
                extra_errors.append(None)

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


def read_embeddings_input(config: Config, resolver: Resolver):
    """Stream ``input.embeddings`` (Parquet file or folder: ``uri, embedding[, label, ...]``).

    The vectors go straight from each record batch into one preallocated float32 matrix, so the
    whole Arrow column is never held (at 1M x 512 that is 2 GB saved).

    Returns:
        (other columns as a table, matrix (N, d), valid mask, vector lengths, d, the Parquet
        files in the order their rows were read)
    """
    import pyarrow.dataset as pads

    location = resolver.resolve(config.input.embeddings)
    try:
        dataset = pads.dataset(location.path, filesystem=location.filesystem, format="parquet")
        names = dataset.schema.names
        for required in ("uri", "embedding"):
            if required not in names:
                raise ConfigError(f"config key 'input.embeddings': {location.uri} has no {required!r} column "
                                  f"(columns: {', '.join(names)})")
        files = [Location(location.filesystem, path, to_uri(location.filesystem, path)) for path in dataset.files]
        n = dataset.count_rows()
        emb_type = dataset.schema.field("embedding").type
        dim = emb_type.list_size if pa.types.is_fixed_size_list(emb_type) else None
        matrix = None
        valid = np.zeros(n, bool)
        lengths = np.zeros(n, np.int64)
        others, pos = [], 0
        for batch in dataset.to_batches(batch_size=65536):
            emb = batch.column("embedding")
            rows = batch.num_rows
            ok = np.asarray(emb.is_valid().to_numpy(zero_copy_only=False), bool)
            lens = np.nan_to_num(pc.list_value_length(emb).to_numpy(zero_copy_only=False).astype(np.float64)).astype(np.int64)
            if dim is None and ok.any():
                dim = int(lens[ok][0])
            if matrix is None and dim is not None:
                matrix = np.zeros((n, dim), np.float32)
            good = ok & (lens == dim)
            if good.any():
                values = emb.filter(pa.array(good)) if not good.all() else emb
                flat = values.flatten().to_numpy(zero_copy_only=False)
                matrix[pos:pos + rows][good] = flat.reshape(-1, dim)
            valid[pos:pos + rows] = ok
            lengths[pos:pos + rows] = lens
            others.append(pa.Table.from_batches([batch.drop_columns(["embedding"])]))
            pos += rows
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"config key 'input.embeddings': {location.uri}: cannot read Parquet ({exc})") from None
    meta = pa.concat_tables(others) if others else pa.table({"uri": pa.array([], pa.string())})
    if matrix is None:
        matrix = np.zeros((n, 1), np.float32)
        dim = 1
    return meta, matrix, valid, lengths, dim, files
