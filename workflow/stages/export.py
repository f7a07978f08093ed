"""Export: put a detector-visit's selected outputs into the central repo.

Outputs go to a RUN collection named from the instrument, day_obs, the pipeline
that ran and hashes of the pipeline definitions and the rest of the config, e.g.
``LSSTComCamSim/prompt/output-2026-11-28/ApPipe/pipelines-1a2b3c4-config-5d6e7f8``,
chained under ``LSSTComCamSim/prompt/output-2026-11-28`` (Rubin's naming).

Idempotent: a dataset already in the run is skipped, dimension records are synced
(created once), and on a file-based (SQLite) registry a lock file serialises the
registry writes of concurrent exports on this node.

Modes (``export.mode``):

``auto`` (default)
    ``direct`` when a plain Snakemake runs the workflow (a replay); the stream shim,
    which runs the node's writer, turns ``batched`` on for its own Snakemakes
    (`stream_shim.export_writer_child`).
``direct``
    The stage opens the central repo and ``put``s its datasets itself.
``batched``
    The stage queues an export request in the node's spool (``export.spool_dir``)
    and the node's writer (`run_writer`, CLI ``scripts/export_writer.py``) ingests
    many detector-visits in one transaction (`workflow.repo.export_batch`).  The
    stage's record then lists the dataset types as ``queued``; the writer's receipt
    in ``<spool>/done`` says when they were committed.
"""

from __future__ import annotations

__all__ = [
    "run",
    "run_writer",
    "config_hashes",
    "output_run",
    "output_chain",
    "select_outputs",
    "export_outputs",
    "configured_export_mode",
    "export_mode",
    "spool_dir",
]

import fcntl
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workflow.core.exceptions import ConfigError, NonRetriableError
from workflow.stages.records import StageRecord, read_stage_record
from workflow.stages.target import TargetPaths, run_stage

_log = logging.getLogger(__name__)

OUTPUT_DATASET_TYPES: dict[str, str] = {
    "preliminary_visit_image": "FitsHDUList",
    "difference_image": "FitsHDUList",
    "single_visit_star": "DataFrame",
    "dia_source_unfiltered": "DataFrame",
    "pipeline_metadata": "StructuredDataDict",
}
"""Per-detector-visit products the pipeline stage can write, with storage classes."""

_DIMENSIONS = ("instrument", "visit", "detector")
EXPORT_MODES = ("auto", "direct", "batched")
DEFAULT_SPOOL_DIR = "export-spool"
"""Spool of batched exports when ``export.spool_dir`` is unset (relative to the run directory)."""


def configured_export_mode(config: Mapping[str, Any]) -> str:
    """Return ``export.mode`` as configured (default ``auto``); raise `ConfigError` for another value."""
    mode = str(config["export"].get("mode", "auto"))
    if mode not in EXPORT_MODES:
        raise ConfigError(f"export.mode: {mode!r} is not one of {', '.join(EXPORT_MODES)}")
    return mode


def export_mode(config: Mapping[str, Any]) -> str:
    """Return how this stage exports, ``direct`` or ``batched`` (``auto``, the default, is ``direct``).

    Raises
    ------
    ConfigError
        If ``export.mode`` is not one of `EXPORT_MODES`.
    """
    mode = configured_export_mode(config)
    return "direct" if mode == "auto" else mode


def spool_dir(config: Mapping[str, Any]) -> Path:
    """Return the node's spool of batched exports (``export.spool_dir``)."""
    return Path(str(config["export"].get("spool_dir", DEFAULT_SPOOL_DIR)))


def _short_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:7]


def config_hashes(config: Mapping[str, Any]) -> tuple[str, str]:
    """Return (pipelines hash, config hash): 7 hex digits each.

    The pipelines hash covers the step lists; the config hash covers what else
    changes the products (instrument geometry, pipeline selection, export, scale).
    """
    pipelines = _short_hash(config["pipeline_definitions"])
    rest = {k: config.get(k) for k in ("instrument", "detector", "filters", "pipelines", "simulation")}
    # Only what is exported changes the products: the mode and spool of the export do not.
    rest["export"] = {"dataset_types": config["export"]["dataset_types"]} if "export" in config else None
    return pipelines, _short_hash(rest)


def output_chain(instrument: str, day_obs: str) -> str:
    """Return the CHAINED collection of one night's outputs."""
    return f"{instrument}/prompt/output-{day_obs}"


def output_run(config: Mapping[str, Any], day_obs: str, pipeline: str) -> str:
    """Return the RUN collection for outputs of ``pipeline`` on ``day_obs``."""
    pipelines_hash, config_hash = config_hashes(config)
    instrument = config["instrument"]["name"]
    return f"{output_chain(instrument, day_obs)}/{pipeline}/pipelines-{pipelines_hash}-config-{config_hash}"


def select_outputs(outputs: Mapping[str, str], patterns: list[str]) -> dict[str, str]:
    """Keep the outputs whose dataset type matches one of the export patterns."""
    compiled = [re.compile(p) for p in patterns]
    return {t: p for t, p in outputs.items() if any(c.search(t) for c in compiled)}


def _is_sqlite(butler: Any) -> bool:
    return str(butler._config.get(("registry", "db"), "")).startswith("sqlite")


@contextmanager
def _registry_lock(repo: str, butler: Any) -> Iterator[None]:
    """Serialise registry writes on a local SQLite repo; no-op for a server registry or a remote repo.

    A server (PostgreSQL) registry takes concurrent writers itself; holding the
    lock there would serialise every export of the node for nothing.
    """
    root = Path(repo)
    if "://" in repo or not root.is_dir() or not _is_sqlite(butler):
        yield
        return
    with open(root / ".export.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_output(path: str, storage_class: str) -> Any:
    if storage_class == "FitsHDUList":
        from astropy.io import fits

        with fits.open(path, memmap=False) as hdul:
            return fits.HDUList([hdu.copy() for hdu in hdul])
    if storage_class == "DataFrame":
        import pandas as pd

        return pd.read_parquet(path)
    with open(path) as stream:
        return json.load(stream)


def _ensure_collections(butler: Any, run: str, chain: str) -> None:
    from lsst.daf.butler import CollectionType

    butler.registry.registerRun(run)
    butler.registry.registerCollection(chain, CollectionType.CHAINED)
    if run not in butler.registry.getCollectionChain(chain):
        # prepend_chain locks the chain: a concurrent export's new run is not lost (set would race).
        butler.collections.prepend_chain(chain, run)


def export_outputs(
    config: Mapping[str, Any],
    *,
    day_obs: str,
    pipeline: str,
    outputs: Mapping[str, str],
    raw_header: Mapping[str, Any],
    where: str,
) -> dict[str, Any]:
    """Export selected outputs of one detector-visit to the central repo.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration (``central_repo``, ``export.dataset_types``).
    day_obs, pipeline : `str`
        Observing day (``YYYY-MM-DD``) and the pipeline that ran.
    outputs : `~collections.abc.Mapping` [`str`, `str`]
        Dataset type name to local file, as the pipeline stage wrote them.
    raw_header : `~collections.abc.Mapping`
        Primary header of the visit's first raw (exposure/visit records).
    where : `str`
        Target description for messages.

    Returns
    -------
    record : `dict`
        ``run``, ``chain``, ``data_id``, ``exported`` and ``skipped`` dataset
        type lists; in batched mode also ``queued`` (the types requested) and
        ``request`` (the request id; its receipt is ``<spool>/done/<id>.json``).

    Raises
    ------
    NonRetriableError
        If an output's dataset type is unknown.
    """
    from workflow.core.instrument import instrument_for_run
    from workflow.repo.butler_ingest import exposure_info_from_header
    from workflow.repo.central_repo import open_central_repo, register_exposure

    selected = select_outputs(outputs, config["export"]["dataset_types"])
    unknown = sorted(set(selected) - set(OUTPUT_DATASET_TYPES))
    if unknown:
        raise NonRetriableError(f"{where}: cannot export unknown dataset type(s) {unknown}")
    info, detector = exposure_info_from_header(raw_header, path=where)
    run = output_run(config, day_obs, pipeline)
    chain = output_chain(info.instrument, day_obs)
    data_id = {"instrument": info.instrument, "visit": info.exposure_id, "detector": detector}
    if export_mode(config) == "batched":
        from workflow.repo.export_batch import submit_request

        request = submit_request(
            spool_dir(config),
            run=run,
            chain=chain,
            data_id=data_id,
            raw_header=raw_header,
            outputs={t: (p, OUTPUT_DATASET_TYPES[t]) for t, p in selected.items()},
            where=where,
        )
        _log.info("%s: queued %s for %s as %s", where, sorted(selected), run, request.request_id)
        return {
            "run": run,
            "chain": chain,
            "exported": [],
            "skipped": [],
            "queued": sorted(selected),
            "request": request.request_id,
            "data_id": data_id,
        }
    exported, skipped = [], []
    butler = open_central_repo(config["central_repo"], writeable=True)
    with _registry_lock(str(config["central_repo"]), butler):
        register_exposure(butler, info, instrument_for_run(config))
        _register_output_types(butler)
        _ensure_collections(butler, run, chain)
        for dataset_type, path in sorted(selected.items()):
            if butler.find_dataset(dataset_type, data_id, collections=run) is not None:
                skipped.append(dataset_type)
                continue
            butler.put(_read_output(path, OUTPUT_DATASET_TYPES[dataset_type]), dataset_type, data_id, run=run)
            exported.append(dataset_type)
    _log.info("%s: exported %s to %s (already there: %s)", where, exported, run, skipped)
    return {"run": run, "chain": chain, "exported": exported, "skipped": skipped, "data_id": data_id}


def _register_output_types(butler: Any) -> None:
    from lsst.daf.butler import DatasetType

    for name, storage_class in OUTPUT_DATASET_TYPES.items():
        butler.registry.registerDatasetType(DatasetType(name, _DIMENSIONS, storage_class, universe=butler.dimensions))


def run(
    *, visit: str, ingest: str, pipeline: str, record: str, config: Mapping[str, Any], log: str | None = None
) -> StageRecord:
    """Export the selected products to the central repo; write the export record (rule ``export``)."""

    def export(target: TargetPaths) -> dict[str, Any]:
        products = read_stage_record(pipeline, "pipeline").body
        if products.get("pipeline") is None:
            return {"exported": [], "skipped": [], "reason": "no pipeline ran (visit ignored)"}
        return export_outputs(
            config,
            day_obs=target.day_obs,
            pipeline=products["pipeline"],
            outputs=products["products"],
            raw_header=read_stage_record(ingest, "ingest").body["header"],
            where=f"{target.instrument} group {target.group} detector {target.detector}",
        )

    return run_stage("export", visit=visit, record=record, config=config, log=log, body=export)


def run_writer(
    config: Mapping[str, Any],
    *,
    idle_exit_s: float | None = None,
    max_batch: int = 1000,
    transfer: str = "copy",
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Run the node's batched-export writer on ``export.spool_dir`` (see `workflow.repo.export_batch`).

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration (``central_repo``, ``export``, the instrument).
    idle_exit_s : `float`, optional
        Return after this long with nothing pending; default: run until stopped.
    max_batch : `int`, optional
        Most requests per transaction.
    transfer : `str`, optional
        Ingest transfer mode from the spool.
    should_stop : callable, optional
        Polled between batches.

    Returns
    -------
    committed : `int`
        Requests committed.
    """
    from workflow.core.instrument import instrument_for_run
    from workflow.repo.export_batch import ExportWriter

    writer = ExportWriter(
        str(config["central_repo"]),
        spool_dir(config),
        instrument_for_run(config),
        max_batch=max_batch,
        transfer=transfer,
    )
    writer.warm_up(OUTPUT_DATASET_TYPES)
    return writer.run(idle_exit_s=idle_exit_s, should_stop=should_stop)
