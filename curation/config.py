"""Typed job configuration, validated when it is loaded.

Every key has a default except ``input`` (one of images / manifest / embeddings) and
``output.uri``. Unknown keys, wrong types and out-of-range values are refused at load time
with a :class:`ConfigError` that names the key, so a bad config fails before any work starts.

Overrides use dotted paths (``--set embedder.batch_size=64``); values are parsed as YAML
scalars, so ``true``, ``0.9`` and ``[a, b]`` arrive typed.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from curation.config_fields import ConfigError, Section, Text, config_error, ranged  # noqa: F401 (re-exported)
from curation.config_sections import (  # noqa: F401 (the sections are public here too)
    ClusterConfig, Config, DecodeConfig, DriftConfig, EmbedderConfig, InputConfig, KnnConfig, MAP_METHODS,
    OutputConfig, RayConfig, ReportConfig, ScoresConfig, SELECTION_MODES, SelectionConfig, StoreConfig)
from curation.io.filesystem import (  # noqa: F401 (StorageConfig: public here too)
    Resolver, StorageConfig, StorageError, read_bytes)


def _build(data: Any) -> Config:
    """The typed config from plain data (pydantic, strict), or one :class:`ConfigError` line."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '<root>': expected a mapping, got {data!r}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, Config) from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.path=value`` strings; values are YAML scalars."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def load_config(path: str | os.PathLike | None = None, *, overrides: list[str] | None = None,
                data: dict | None = None) -> Config:
    """Load, override and validate a configuration.

    Args:
        path: a local YAML file (optional when ``data`` is given).
        overrides: ``key.path=value`` strings applied on top.
        data: a mapping used instead of (or under) the file.

    Returns:
        A validated :class:`Config`.

    Raises:
        ConfigError: with one line naming the key and the problem.
    """
    raw: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(_read_config_text(str(path)))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
        raw.update(_relative_to(loaded or {}, str(path)))
    raw = _deep_merge(Config().model_dump(), {**(data or {}), **raw})
    for key, value in parse_overrides(overrides or []):
        try:
            _set_dotted(raw, key, value)
        except (IndexError, ValueError) as exc:
            raise ConfigError(f"--set {key}: {exc}") from None
    config = _build(raw)
    validate(config)
    return config


def recorded_config(data: Any) -> Config:
    """The typed :class:`Config` a published run recorded (``run.json`` → ``config``), for the
    readers of that run (``curation similar``, the next night): its values where this version
    still has the key, the defaults elsewhere. A key this version no longer has is dropped, a
    section that no longer loads takes its defaults (an older run still reads), and redacted
    secrets stay ``"***"``; cross-field validation is not repeated (the run validated it)."""
    recorded = _known_keys(Config, data if isinstance(data, dict) else {})
    defaults = Config().model_dump()
    try:
        return _build(_deep_merge(defaults, recorded))
    except ConfigError:
        pass
    sections = {}
    for name, value in recorded.items():  # one section at a time: the ones that load keep their values
        try:
            _build(_deep_merge(defaults, {name: value}))
            sections[name] = value
        except ConfigError:
            continue
    return _build(_deep_merge(defaults, sections))


def _known_keys(cls: type[BaseModel], data: dict) -> dict:
    """``data`` without the keys ``cls`` (a config section, recursively) does not have."""
    out = {}
    for name, info in cls.model_fields.items():
        if name not in data:
            continue
        value, tp = data[name], info.annotation
        nested = isinstance(tp, type) and issubclass(tp, BaseModel)
        out[name] = _known_keys(tp, value) if nested and isinstance(value, dict) else value
    return out


# Config keys holding a path or URI; a relative local path in a config file is relative to the
# file's own folder (or S3 prefix), so a config shipped with `--working-dir` means the same
# wherever the job runs.
PATH_KEYS = (("input", "images"), ("input", "manifest"), ("input", "labels"), ("input", "embeddings"),
             ("input", "annotations"), ("input", "predictions"), ("input", "object_embeddings"),
             ("output", "uri"), ("store", "uri"), ("embedder", "weights"))


def _read_config_text(path: str) -> str:
    """A config file's text from a local path or an ``s3://`` URI (credentials from the
    environment: the config cannot hold the keys to read itself)."""
    try:
        if path.startswith("s3://"):
            return read_bytes(Resolver().resolve(path)).decode("utf-8")
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r}: not found") from None
    except (OSError, StorageError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path!r}: cannot read ({str(exc).splitlines()[0][:200]})") from None


def _relative_to(raw: dict, path: str) -> dict:
    """``raw`` with its relative local paths (``PATH_KEYS``) made relative to ``path``'s folder."""
    base = path.rsplit("/", 1)[0] if path.startswith("s3://") else os.path.dirname(os.path.abspath(path))
    for section, key in PATH_KEYS:
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if (isinstance(value, str) and value and "://" not in value and not os.path.isabs(value)
                and value.strip().lower() not in ("none", "default")):
            raw[section][key] = f"{base}/{value}" if base.startswith("s3://") else os.path.normpath(os.path.join(base, value))
    return raw


# A run id is a folder directly under output.uri: never a path (no '/', no '..'), never a name
# the output folder already uses for something else.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_RUN_IDS = ("latest", "embedding-store")


def is_run_id(value: object) -> bool:
    """Whether ``value`` may name a run folder (see ``output.run_id``)."""
    return (isinstance(value, str) and RUN_ID_PATTERN.fullmatch(value) is not None
            and value not in RESERVED_RUN_IDS)


def validate(config: Config) -> None:
    """Cross-field rules (allowed values and ranges sit on the fields themselves and are checked
    as each one is built); raises :class:`ConfigError`."""
    inp = config.input
    if not (inp.images or inp.manifest or inp.embeddings):
        raise ConfigError("config key 'input': set one of input.images, input.manifest or input.embeddings")
    if inp.images and inp.manifest:
        raise ConfigError("config key 'input.manifest': give input.images or input.manifest, not both")
    if inp.annotations and not inp.images:
        raise ConfigError("config key 'input.annotations': only with input.images (the annotations name files "
                          "relative to it)")
    if inp.predictions and not inp.annotations:
        raise ConfigError("config key 'input.predictions': only with input.annotations (a detector's boxes are "
                          "read beside the annotated ones)")
    if inp.annotations and inp.labels:
        raise ConfigError("config key 'input.labels': give input.annotations or input.labels, not both (a "
                          "detection set's classes are its boxes')")
    if inp.object_embeddings and not inp.embeddings:
        raise ConfigError("config key 'input.object_embeddings': only with input.embeddings (box vectors beside "
                          "precomputed image vectors; with input.images give input.annotations)")
    if inp.object_embeddings and inp.label_corrections:
        raise ConfigError("config key 'input.label_corrections': not with input.object_embeddings (box corrections "
                          "come back from exported image tasks: run on input.images with input.annotations)")
    if inp.object_embeddings and (inp.annotations or inp.predictions):
        raise ConfigError("config key 'input.object_embeddings': give input.object_embeddings or "
                          "input.annotations, not both")
    if inp.split_from_path and not inp.images:
        raise ConfigError("config key 'input.split_from_path': only with input.images")
    if inp.split_from_path and inp.split_column:
        raise ConfigError("config key 'input.split_column': give split_column or split_from_path, not both")
    if not config.output.uri:
        raise ConfigError("config key 'output.uri': required")
    if config.output.run_id is not None and not is_run_id(config.output.run_id):
        raise ConfigError(f"config key 'output.run_id': expected one plain folder name (letters, digits, '.', '_', "
                          f"'-'; starting with a letter or digit; at most 128 characters; not "
                          f"{' or '.join(RESERVED_RUN_IDS)}), got {config.output.run_id!r}")
    if config.embedder.min_actors > config.embedder.max_actors > 0:
        raise ConfigError("config key 'embedder.min_actors': must not exceed embedder.max_actors")
    if len(config.decode.background) != 3 or not all(0 <= v <= 255 for v in config.decode.background):
        raise ConfigError("config key 'decode.background': expected three integers in [0, 255]")
    if config.drift.alarm_p_value <= 1.0 / (config.drift.permutations + 1):
        raise ConfigError(f"config key 'drift.alarm_p_value': {config.drift.alarm_p_value} can never fire with "
                          f"drift.permutations {config.drift.permutations} (the smallest p-value is "
                          f"1/{config.drift.permutations + 1}); raise drift.permutations")
    names = set()
    for i, sel in enumerate(config.selections):
        key = f"selections[{i}]"
        if sel.mode is None:
            raise ConfigError(f"config key '{key}.mode': required ({' | '.join(SELECTION_MODES)})")
        if sel.name in names:
            raise ConfigError(f"config key '{key}.name': duplicate selection name {sel.name!r}")
        if not sel.name or "/" in sel.name:
            raise ConfigError(f"config key '{key}.name': must be a non-empty name without '/'")
        names.add(sel.name)
        if sel.mode in ("representative", "edge_cases", "label_review", "to_label") and sel.budget is None:
            raise ConfigError(f"config key '{key}.budget': required for mode {sel.mode}")
        if sel.mode == "validation" and (sel.budget is None) == (sel.fraction is None):
            raise ConfigError(f"config key '{key}.budget': mode validation takes budget or fraction (one of them)")
        if sel.fraction is not None and sel.mode != "validation":
            raise ConfigError(f"config key '{key}.fraction': only for mode validation")
        parse_class_balance(sel.class_balance, key=f"{key}.class_balance")
    _check_disjoint_from(config.selections)


def _check_disjoint_from(selections: list) -> None:
    """Every name in a ``disjoint_from`` is another selection, and the relation has no cycle."""
    names = [sel.name for sel in selections]
    for i, sel in enumerate(selections):
        for other in sel.disjoint_from:
            if other not in names or other == sel.name:
                raise ConfigError(f"config key 'selections[{i}].disjoint_from': {other!r} is not another selection "
                                  f"(selections: {', '.join(names)})")
    after = {sel.name: set(sel.disjoint_from) for sel in selections}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise ConfigError(f"config key 'disjoint_from': a cycle ({' -> '.join(cycle)}): no selection can be "
                              "built first")
        if state.get(name) == 2:
            return
        state[name] = 1
        for other in sorted(after[name]):
            visit(other, path + [name])
        state[name] = 2

    for name in names:
        visit(name, [])


def parse_class_balance(value: str, *, key: str = "class_balance") -> float:
    """Return the tempering exponent: uniform = 0, proportional = 1, tempered:a = a."""
    if value == "uniform":
        return 0.0
    if value == "proportional":
        return 1.0
    if value.startswith("tempered:"):
        try:
            alpha = float(value.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if 0.0 <= alpha <= 1.0:
            return alpha
    raise ConfigError(f"config key '{key}': expected uniform, proportional or tempered:<alpha in [0,1]>, got {value!r}")
