"""Command line: ``curation run --config CONFIG.yaml [--set key=value ...]``, ``curation export``,
``curation similar`` and ``curation demo [--out DIR]``.

Exit status: 0 when the run published (``_SUCCESS`` written); 2 for a bad config or an
unreachable input (one line on stderr naming the key or URI and why, before any work); 1 when
the run itself failed; 3 when it published but the drift alarm fired and ``drift.exit_code``
is on.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from curation.run_info import RunInfo

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_DRIFT = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curation", description="Curate image datasets by their embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)
    # Every run is a nightly run: the embedding store makes it incremental, it diffs itself
    # against the previous published run and moves `latest` by compare-and-swap.
    run = sub.add_parser("run", help="run the curation job (incremental, diffed against the last published run)")
    run.add_argument("--config", required=True, help="YAML config file or s3:// URI")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config key (repeatable)")
    run.add_argument("--quiet", action="store_true", help="only warnings and errors")
    export = sub.add_parser("export", help="a published run's selection as Label Studio tasks (or CSV); in a "
                                           "detection run one task per image, its boxes as rectangles")
    export.add_argument("--run", required=True, help="a run URI, or an output URI (its latest run)")
    export.add_argument("--selection", required=True, help="the selection to export (e.g. to_label)")
    export.add_argument("--format", default="label-studio", choices=("label-studio", "csv"))
    export.add_argument("--out", required=True, help="the tasks file; the labelling config goes beside it (.xml)")
    export.add_argument("--classes", default=None, help="comma-separated choices when nothing is labelled yet")
    export.add_argument("--local-files-root", default=None,
                        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT, for runs over a local folder")
    export.add_argument("--quiet", action="store_true", help="only warnings and errors")
    similar = sub.add_parser("similar", help="images like these, in a published run's saved vectors")
    similar.add_argument("--run", required=True, help="a run URI, or an output URI (its latest run)")
    query = similar.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", nargs="+", metavar="PATH_OR_URI", help="image files to search with")
    query.add_argument("--uri", nargs="+", metavar="URI_IN_RUN", help="items of the run (their stored vectors)")
    query.add_argument("--object", nargs="+", metavar="OBJECT_ID",
                       help="boxes of a detection run (their object_id; with --space object)")
    similar.add_argument("-k", type=int, default=20, help="hits per query (default 20)")
    similar.add_argument("--space", default="embedding", choices=("embedding", "copy", "object"),
                         help="embedding (what it shows), copy (how it looks: the copy descriptors) or object "
                              "(a detection run's box crops; query with --object)")
    similar.add_argument("--where", default=None, help="filter the run's items first (a selection's where syntax)")
    similar.add_argument("--out", default=None, help="also write the hits as Parquet here")
    similar.add_argument("--quiet", action="store_true", help="only warnings and errors")
    demo = sub.add_parser("demo", help="make a demo data set with planted defects and curate it")
    demo.add_argument("--out", default="./demo-output", help="folder for data and outputs (default ./demo-output)")
    demo.add_argument("--n", type=int, default=2400, help="clean images to generate (default 2400)")
    demo.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader narrates CPU-feature probing


# glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB), after
# which the driver's big temporary numpy arrays (a column of a million boxes) come from the heap
# and stay in its resident memory when freed. A fixed threshold returns them on free.
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES = -3, 1 << 20


def _return_freed_memory() -> None:
    """Large blocks always mmapped, so freeing them shrinks the driver (glibc only; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.quiet)
    _return_freed_memory()
    from curation.config import ConfigError, load_config
    from curation.embedder_check import EmbedderError
    from curation.io.filesystem import StorageError
    from curation.session import NodeCannotReach
    from curation.sizing import InfeasibleRequest

    try:
        if args.command == "demo":
            from curation.demo import run_demo

            return run_demo(out=args.out, n=args.n)
        if args.command == "export":
            return _export(args)
        if args.command == "similar":
            return _similar(args)
    except Exception as exc:
        return _failed(exc)
    try:
        config = load_config(args.config, overrides=args.overrides)
        from curation.io.filesystem import Resolver
        from curation.job import preflight

        resolver = Resolver(config.storage)
        plan = preflight(config, resolver)
    except (ConfigError, EmbedderError, StorageError) as exc:
        print(f"curation: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        from curation.job import run_job

        result = run_job(config, resolver=resolver, plan=plan)
        print(run_summary(result.info))
        print(result.run_uri)
        drift = result.info.drift or {}
        if config.drift.exit_code and drift.get("alarm"):  # published first: the alarm is in run.json
            print(f"curation: drift alarm: {'; '.join(drift['rules_fired'])}", file=sys.stderr)
            return EXIT_DRIFT
        return EXIT_OK
    except (InfeasibleRequest, NodeCannotReach) as exc:  # found before any work: like a bad config
        print(f"curation: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:
        return _failed(exc)


def run_summary(info: RunInfo) -> str:
    """The one screen a finished run ends with: counts, flags, selections, time, where it is."""
    counts, timings = info.counts, info.timings_s
    lines = [f"run {info.run_id}: {counts.inputs} inputs, {counts.ok} ok, {counts.rejected} rejected, "
             f"{timings.get('total', 0):.0f}s"]
    store = info.store
    lines.append(f"  embedder: {info.model_id}"
                 + (f" (store: reused {store['reused']}, embedded {store['embedded']})" if store else ""))
    flags = {name: value for name, value in info.flags.items() if value}
    lines.append("  flags: " + (", ".join(f"{name} {value}" for name, value in flags.items()) or "none"))
    lines.append("  selections: " + ", ".join(f"{s.name} {s.rows} (of {s.eligible} eligible)"
                                              for s in info.selections))
    phases = [(k, v) for k, v in timings.items() if not k.startswith("score_") and k != "total"]
    lines.append("  time: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases))
    diff = info.diff
    if diff and "inputs" in diff:
        inputs = diff["inputs"]
        lines.append(f"  since {diff['previous_run']}: {inputs['new']} new, {inputs['changed']} changed, "
                     f"{inputs['deleted']} deleted inputs; selections "
                     + ", ".join(f"{name} +{c['added']} -{c['removed']}" for name, c in diff["selections"].items())
                     + " (diff/)")
    drift = info.drift
    if drift:
        lines.append("  drift: " + (f"not compared ({drift['skipped']})" if drift.get("skipped") else
                                    ("ALARM: " + "; ".join(drift["rules_fired"])) if drift.get("alarm") else
                                    f"no alarm (MMD p={drift['mmd'].get('p_value')}, "
                                    f"{(drift.get('new_regions') or {}).get('region_count', 0)} new regions)"))
    lines.append(f"  outputs: {info.uri} (samples/, selections/, report.html, run.json)")
    return "\n".join(lines)


def _export(args) -> int:
    from curation.export import ExportError, export_selection

    try:
        done = export_selection(run=args.run, selection=args.selection, out=args.out, fmt=args.format,
                                classes=args.classes.split(",") if args.classes else None,
                                local_files_root=args.local_files_root)
    except ExportError as exc:
        print(f"curation: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"exported {done['tasks']} tasks from {done['run']}: {', '.join(done['files'])}")
    return EXIT_OK


def _similar(args) -> int:
    from curation.io.filesystem import Resolver
    from curation.similar import SimilarError, format_hits, similar, write_hits

    resolver = Resolver()
    try:
        if args.space == "object" or args.object:
            from curation.similar_objects import ObjectSearch

            if args.space != "object" or not args.object:
                raise SimilarError("boxes are searched with --space object and --object OBJECT_ID (one or more)")
            hits = ObjectSearch(args.run, resolver=resolver).by_object(list(args.object), k=args.k, where=args.where)
        else:
            hits = similar(run=args.run, images=args.image, uris=args.uri, k=args.k, space=args.space,
                           where=args.where, resolver=resolver)
    except (SimilarError, ValueError) as exc:
        print(f"curation: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(format_hits(hits))
    if args.out:
        write_hits(hits, resolver.resolve(args.out))
        print(f"{hits.num_rows} hits written to {args.out}")
    return EXIT_OK


def _failed(exc: Exception) -> int:
    """The run failed: one line on stderr, the traceback at debug level (or raised with CURATION_DEBUG)."""
    if isinstance(exc, KeyboardInterrupt):
        print("curation: interrupted", file=sys.stderr)
        return EXIT_FAILED
    logging.getLogger("curation").debug("run failed", exc_info=True)
    print(f"curation: run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
          file=sys.stderr)
    if os.environ.get("CURATION_DEBUG"):
        raise exc
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
