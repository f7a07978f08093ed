"""Load and validate prompt-snake configuration files.

The configuration is layered: ``config/config.yaml`` (defaults), then
``config/pipelines.yaml``, then one instrument file from ``config/instruments``.
Each file is validated alone against ``config/schema/config.schema.json`` so that an
error names the file it is in; the merged result must then hold every section the
schema lists under ``x-required-merged``.
"""

from __future__ import annotations

__all__ = [
    "PROJECT_ROOT",
    "SCHEMA_PATH",
    "DEFAULT_CONFIG_PATH",
    "PIPELINES_CONFIG_PATH",
    "instrument_config_path",
    "load_yaml",
    "validate_file",
    "validate_merged",
    "merge_configs",
    "load_config",
    "known_instruments",
    "validate_loaded_config",
    "write_config_snapshot",
]

import copy
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from workflow.core.exceptions import ConfigError

_log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""Checkout root: config paths in the defaults are relative to it."""

SCHEMA_PATH = PROJECT_ROOT / "config" / "schema" / "config.schema.json"
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "config.yaml"
PIPELINES_CONFIG_PATH = PROJECT_ROOT / "config" / "pipelines.yaml"


def instrument_config_path(instrument: str) -> Path:
    """Return the path of the shipped config file of one instrument.

    Parameters
    ----------
    instrument : `str`
        Instrument name, e.g. ``"LSSTComCamSim"``.

    Returns
    -------
    path : `pathlib.Path`
        ``config/instruments/<instrument>.yaml``.

    Raises
    ------
    ConfigError
        If no such file is shipped; the message lists the known instruments.
    """
    path = PROJECT_ROOT / "config" / "instruments" / f"{instrument}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown instrument {instrument!r}: no file {path}; known instruments: " + ", ".join(known_instruments())
        )
    return path


def known_instruments() -> list[str]:
    """Return the names of the instruments that have a shipped config file."""
    return sorted(p.stem for p in (PROJECT_ROOT / "config" / "instruments").glob("*.yaml"))


@functools.cache
def _schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as stream:
        schema = json.load(stream)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _without_required(node: Any) -> Any:
    """Copy a schema dropping every ``required``: one file may set only some keys."""
    if isinstance(node, dict):
        out = {k: _without_required(v) for k, v in node.items() if k != "required"}
        for key in ("oneOf", "anyOf"):  # branches that only differed by "required"
            if key in out and all(branch == {} for branch in out[key]):
                del out[key]
        return out
    if isinstance(node, list):
        return [_without_required(v) for v in node]
    return node


@functools.cache
def _partial_schema() -> dict[str, Any]:
    return _without_required(_schema())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file into a mapping.

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or does not hold a mapping.
    """
    path = Path(path)
    try:
        with open(path) as stream:
            data = yaml.safe_load(stream)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at top level, got {type(data).__name__}")
    return data


def _dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe_expected(error: jsonschema.ValidationError) -> str:
    """Turn one jsonschema error into 'key ...: expected ..., got ...'."""
    key = _dotted(error.absolute_path)
    validator = error.validator
    # A validator's error always has these set (the stubs also allow the "unset" sentinel).
    value: Any = error.validator_value
    instance: Any = error.instance
    if validator == "additionalProperties":
        assert isinstance(error.schema, Mapping)  # an object schema
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(instance) - set(allowed))
        keys = ", ".join(repr(_dotted([*error.absolute_path, e])) for e in extra)
        return f"key {keys} is not allowed; expected one of: {', '.join(allowed)}"
    if validator == "required":
        missing = [k for k in value if k not in instance]
        keys = ", ".join(repr(_dotted([*error.absolute_path, m])) for m in missing)
        return f"key {keys} is missing"
    if validator == "type":
        types = value if isinstance(value, str) else " or ".join(value)
        return f"key {key!r}: expected {types}, got {error.instance!r} ({type(error.instance).__name__})"
    if validator == "enum":
        return f"key {key!r}: expected one of {value}, got {error.instance!r}"
    if validator == "const":
        return f"key {key!r}: expected {value!r}, got {error.instance!r}"
    if validator == "pattern":
        return f"key {key!r}: expected a string matching {value!r}, got {error.instance!r}"
    if validator in {"minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"}:
        return f"key {key!r}: expected {validator} {value}, got {error.instance!r}"
    if validator in {"minItems", "maxItems", "uniqueItems", "minProperties"}:
        return f"key {key!r}: expected {validator} {value}, got {error.instance!r}"
    if validator == "oneOf-const":
        return f"key {key!r}: {error.message}"
    return f"key {key!r}: {error.message}"


def _best_error(errors: list[jsonschema.ValidationError]) -> jsonschema.ValidationError:
    error = jsonschema.exceptions.best_match(errors)
    # For a oneOf (e.g. focal_plane layouts) prefer the branch the user meant: the one
    # whose "const" discriminator matched, i.e. the error without a const failure.
    while error.context:
        branches: dict[int, list[jsonschema.ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.schema_path[0], []).append(sub)
        chosen = [subs for subs in branches.values() if not any(s.validator == "const" for s in subs)]
        if not chosen:
            # No branch's discriminator matched: report the discriminator itself.
            consts = [s for s in error.context if s.validator == "const"]
            if consts:
                options = sorted({repr(s.validator_value) for s in consts})
                const = consts[0]
                const.message = f"expected one of {', '.join(options)}, got {const.instance!r}"
                const.validator = "oneOf-const"
                return const
        pool = chosen[0] if len(chosen) == 1 else list(error.context)
        error = jsonschema.exceptions.best_match(pool)
    return error


def validate_file(path: str | Path, data: Mapping[str, Any]) -> None:
    """Validate one config file's content against the schema.

    Keys are checked for spelling, type and range; whether every required key is
    present is checked on the merged configuration (`validate_merged`), so an
    override file may set a single nested key.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        File the data came from; named in the error.
    data : `~collections.abc.Mapping`
        Parsed content of that file.

    Raises
    ------
    ConfigError
        On the first (most relevant) violation, naming the file, the key and what
        was expected.
    """
    validator = jsonschema.Draft202012Validator(_partial_schema())
    errors = list(validator.iter_errors(dict(data)))
    if errors:
        raise ConfigError(f"{path}: {_describe_expected(_best_error(errors))}")


def validate_merged(config: Mapping[str, Any], sources: Iterable[str | Path]) -> None:
    """Check that the merged configuration holds every required section.

    Raises
    ------
    ConfigError
        If a section is missing; the message lists the files that were merged.
    """
    files = ", ".join(str(s) for s in sources)
    missing = [key for key in _schema()["x-required-merged"] if key not in config]
    if missing:
        raise ConfigError(
            f"merged configuration from [{files}]: key(s) {', '.join(missing)} missing; "
            "expected them in config/config.yaml, config/pipelines.yaml or the instrument file"
        )
    errors = list(jsonschema.Draft202012Validator(_schema()).iter_errors(dict(config)))
    if errors:
        raise ConfigError(f"merged configuration from [{files}]: {_describe_expected(_best_error(errors))}")
    defined = set(config["pipeline_definitions"])
    for node in config["pipelines"]:
        unknown = [p for p in node["pipelines"] if p not in defined]
        if unknown:
            raise ConfigError(
                f"merged configuration from [{', '.join(str(s) for s in sources)}]: "
                f"key 'pipelines' names undefined pipeline(s) {unknown}; expected one of {sorted(defined)}"
            )


def merge_configs(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base`` the way Snakemake does.

    Mappings merge key by key; any other value (lists included) is replaced.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(
    instrument_file: str | Path | None = None,
    *,
    instrument: str | None = None,
    extra_files: Iterable[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load, validate and merge the layered configuration.

    Parameters
    ----------
    instrument_file : `str` or `pathlib.Path`, optional
        Instrument config file; by default the one named by
        ``default_instrument_file`` in ``config/config.yaml``.
    instrument : `str`, optional
        Instrument name, as a shortcut for its shipped file.
    extra_files : iterable of `str` or `pathlib.Path`
        Further files merged last (e.g. a test or site override).
    overrides : `~collections.abc.Mapping`, optional
        Values merged after all files (not validated per file).

    Returns
    -------
    config : `dict`
        The merged configuration.

    Raises
    ------
    ConfigError
        If any file is invalid or the merged result is incomplete.
    """
    defaults = load_yaml(DEFAULT_CONFIG_PATH)
    validate_file(DEFAULT_CONFIG_PATH, defaults)
    if instrument is not None:
        instrument_file = instrument_config_path(instrument)
    elif instrument_file is None:
        instrument_file = PROJECT_ROOT / defaults["default_instrument_file"]
    files = [PIPELINES_CONFIG_PATH, Path(instrument_file), *map(Path, extra_files)]
    config = defaults
    for path in files:
        data = load_yaml(path)
        validate_file(path, data)
        config = merge_configs(config, data)
    if overrides:
        config = merge_configs(config, overrides)
    validate_merged(config, [DEFAULT_CONFIG_PATH, *files])
    _log.debug("loaded config for %s from %s", config["instrument"]["name"], files)
    return config


def validate_loaded_config(config: Mapping[str, Any], files: Iterable[str | Path]) -> None:
    """Validate a configuration that Snakemake has already merged.

    Snakemake merges ``configfile:`` and ``--configfile`` files itself; this checks
    each of those files alone (so an error names its file) and then the merge.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Snakemake's merged ``config``.
    files : iterable of `str` or `pathlib.Path`
        Every file that went into it, in load order.

    Raises
    ------
    ConfigError
        On the first invalid file or an incomplete merge.
    """
    files = list(dict.fromkeys(Path(f) for f in files))
    for path in files:
        validate_file(path, load_yaml(path))
    validate_merged(config, files)


def write_config_snapshot(config: Mapping[str, Any], directory: str | Path = ".snakemake/prompt-snake") -> Path:
    """Write the merged configuration as JSON for the stage processes; return its path.

    The file name carries a hash of the content, so concurrent runs with different
    configs in one directory never overwrite each other's snapshot.  The config may
    hold credentials (an ``apdb.db_url`` with a password), so the file is written
    mode 0600 and the directory is made (or tightened to) 0700.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        The merged configuration.
    directory : `str` or `pathlib.Path`, optional
        Where the snapshots go (a directory of their own).

    Returns
    -------
    path : `pathlib.Path`
        ``<directory>/config-<hash>.json``.
    """
    text = json.dumps(config, sort_keys=True, default=str)
    directory = Path(directory)
    path = directory / f"config-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    _private_directory(directory)
    if path.exists():
        if path.stat().st_mode & 0o077:  # written by an older release, readable by all
            os.chmod(path, 0o600)
        return path
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # a stale temporary file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
    os.replace(tmp, path)
    return path


def _private_directory(directory: Path) -> None:
    """Create ``directory`` mode 0700, or take group and other access away from an existing one of ours."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        os.chmod(directory, 0o700)
