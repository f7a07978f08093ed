"""Batched export: detector-visits queue export requests in a spool; one writer per node ingests them in batches.

Why: on a PostgreSQL registry every direct export opens its own Butler (a connection and
its caches), registers the same visit's records again and inserts its five datasets in
small transactions.  With 189 detectors finishing within seconds of each other that is
189 connections and ~20 registry round trips each on a busy node, the registry load that
Rubin's own load rehearsals found to be the first bottleneck.  Here the export stage
only writes a request (and hard-links its files into the spool), and a writer takes all
pending requests in one ``Butler.ingest`` transaction: one connection, each visit's
records registered once, every dataset inserted in bulk.

Spool layout (one directory per node, on the same file system as the work area)::

    pending/<id>.json    an `ExportRequest`, written last (atomically), so a pending
                         request always has all its files
    files/<id>/...       the request's products (hard links, or copies)
    done/<id>.json       an `ExportReceipt` after the batch committed
    failed/<id>.json     a request the writer can never ingest (bad record), with the reason

Guarantees: at least once and idempotent.  Dataset ids are derived from (dataset type,
data id, run) (``DATAID_TYPE_RUN``), datasets already in the run are skipped, and a
request leaves ``pending/`` only after its batch committed; a writer killed mid-batch
leaves its pending requests and (at worst) datastore files that the retry overwrites.
"""

from __future__ import annotations

__all__ = [
    "SCHEMA_VERSION",
    "ExportDataset",
    "ExportRequest",
    "ExportReceipt",
    "BatchResult",
    "request_id",
    "submit_request",
    "pending_requests",
    "ExportWriter",
    "receipts",
]

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workflow.core.exceptions import NonRetriableError, RetriableError

if TYPE_CHECKING:
    from lsst.daf.butler import Butler, DatasetType

    from workflow.core.instrument import Instrument

_log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Version of the `ExportRequest` and `ExportReceipt` records."""

_DIMENSIONS = ("instrument", "visit", "detector")
_SUFFIX = {"FitsHDUList": ".fits", "DataFrame": ".parq", "StructuredDataDict": ".json"}
"""File suffix of each storage class an export carries (the one its formatter accepts)."""
_FORMATTER = {"StructuredDataDict": "lsst.daf.butler.formatters.json.JsonFormatter"}
"""Formatters other than the repo's default for the storage class (YAML for a dict; our file is JSON)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportDataset:
    """One dataset of a request.

    Attributes
    ----------
    dataset_type : `str`
        Dataset type name (dimensions instrument, visit, detector).
    storage_class : `str`
        Its storage class (a key of `_SUFFIX`).
    path : `str`
        The file, relative to the request's ``files/<id>`` directory.
    """

    dataset_type: str
    storage_class: str
    path: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportRequest:
    """What the export stage asks the writer to store: one detector-visit's products.

    Attributes
    ----------
    schema_version : `int`
        `SCHEMA_VERSION` of the writer that wrote it.
    request_id : `str`
        `request_id` of (run, data id): a rerun replaces the same request.
    run, chain : `str`
        RUN collection and the CHAINED collection it is prepended to.
    data_id : `dict`
        ``instrument``, ``visit``, ``detector``.
    raw_header : `dict`
        Primary header of the visit's first raw (exposure and visit records).
    datasets : `tuple` [`ExportDataset`, ...]
        The products.
    submitted_at : `float`
        Unix time the request was written.
    where : `str`
        Target description for messages.
    """

    schema_version: int
    request_id: str
    run: str
    chain: str
    data_id: dict[str, Any]
    raw_header: dict[str, Any]
    datasets: tuple[ExportDataset, ...]
    submitted_at: float
    where: str

    def to_json(self) -> str:
        """Serialise to JSON."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, *, path: str | Path) -> ExportRequest:
        """Parse a request; raise `NonRetriableError` naming ``path`` if it is not one this writer reads."""
        try:
            data = json.loads(text)
            if data.get("schema_version") != SCHEMA_VERSION:
                raise NonRetriableError(
                    f"{path}: export request schema_version {data.get('schema_version')!r}, "
                    f"this writer reads {SCHEMA_VERSION}"
                )
            data["datasets"] = tuple(ExportDataset(**d) for d in data["datasets"])
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise NonRetriableError(f"{path}: not an export request: {exc}") from exc


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportReceipt:
    """Written to ``done/<id>.json`` once a request's batch committed.

    Attributes
    ----------
    schema_version : `int`
    request_id, run, where : `str`
    data_id : `dict`
    exported, skipped : `list` [`str`]
        Dataset types inserted by this batch, and those already in the run.
    submitted_at, committed_at : `float`
        Unix times: request written, batch committed.
    batch_size : `int`
        Requests in the batch.
    """

    schema_version: int
    request_id: str
    run: str
    where: str
    data_id: dict[str, Any]
    exported: list[str]
    skipped: list[str]
    submitted_at: float
    committed_at: float
    batch_size: int

    @classmethod
    def read(cls, path: str | Path) -> ExportReceipt:
        """Read a receipt file."""
        with open(path) as stream:
            return cls(**json.load(stream))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchResult:
    """What one batch did (for logs and benchmarks)."""

    requests: int
    datasets_exported: int
    datasets_skipped: int
    failed: int
    seconds: float


def request_id(run: str, data_id: Mapping[str, Any]) -> str:
    """Return the spool name of the request of (run, data id): readable and unique.

    Examples
    --------
    ``LSSTCam-2025010900042-17-1a2b3c4d``: instrument, visit, detector, hash of the run.
    """
    digest = hashlib.sha256(run.encode()).hexdigest()[:8]
    return f"{data_id['instrument']}-{data_id['visit']}-{data_id['detector']}-{digest}"


_MAX_ATTEMPTS = 3
"""Failures of a request ingested alone (while others succeed) before it is set aside in ``failed/``."""
_MISSING_FILES_S = 60.0
"""A pending request whose files are still missing this long after submission is failed."""


def _unlink_if_unchanged(path: Path, mtime: int) -> bool:
    """Remove a pending request unless it was resubmitted (rewritten) since it was read; say if removed."""
    try:
        if path.stat().st_mtime_ns != mtime:
            return False
    except FileNotFoundError:
        return False
    path.unlink(missing_ok=True)
    return True


def _dirs(spool: Path) -> dict[str, Path]:
    return {name: spool / name for name in ("pending", "files", "done", "failed")}


def _place(src: str | Path, dest: Path) -> None:
    """Hard-link ``src`` to ``dest`` (no copy, and it outlives the work area); copy across file systems."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def submit_request(
    spool: str | Path,
    *,
    run: str,
    chain: str,
    data_id: Mapping[str, Any],
    raw_header: Mapping[str, Any],
    outputs: Mapping[str, tuple[str, str]],
    where: str,
) -> ExportRequest:
    """Queue one detector-visit's export in ``spool``: its files, then its request record.

    Parameters
    ----------
    spool : `str` or `pathlib.Path`
        The node's spool directory (created if missing).
    run, chain : `str`
        RUN collection and its CHAINED parent.
    data_id : `~collections.abc.Mapping`
        ``instrument``, ``visit``, ``detector``.
    raw_header : `~collections.abc.Mapping`
        JSON-safe primary header of the visit's first raw.
    outputs : `~collections.abc.Mapping` [`str`, `tuple` [`str`, `str`]]
        Dataset type -> (file, storage class).
    where : `str`
        Target description for messages.

    Returns
    -------
    request : `ExportRequest`
        The record written to ``pending/<id>.json``.

    Raises
    ------
    NonRetriableError
        If a storage class has no known file suffix or a file is missing; names ``where``.
    """
    dirs = _dirs(Path(spool))
    for directory in dirs.values():
        directory.mkdir(parents=True, exist_ok=True)
    rid = request_id(run, data_id)
    staging = dirs["files"] / f".{rid}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    datasets = []
    for dataset_type, (path, storage_class) in sorted(outputs.items()):
        if storage_class not in _SUFFIX:
            raise NonRetriableError(f"{where}: cannot queue {dataset_type} of storage class {storage_class}")
        name = f"{dataset_type}{_SUFFIX[storage_class]}"
        try:
            _place(path, staging / name)
        except OSError as exc:
            raise NonRetriableError(f"{where}: cannot queue {dataset_type} from {path}: {exc}") from exc
        datasets.append(ExportDataset(dataset_type=dataset_type, storage_class=storage_class, path=name))
    final = dirs["files"] / rid
    shutil.rmtree(final, ignore_errors=True)  # a rerun of the same target: replace its files
    staging.rename(final)
    request = ExportRequest(
        schema_version=SCHEMA_VERSION,
        request_id=rid,
        run=run,
        chain=chain,
        data_id=dict(data_id),
        raw_header=dict(raw_header),
        datasets=tuple(datasets),
        submitted_at=time.time(),
        where=where,
    )
    tmp = dirs["pending"] / f".{rid}.{os.getpid()}.tmp"
    tmp.write_text(request.to_json())
    tmp.replace(dirs["pending"] / f"{rid}.json")
    return request


def pending_requests(spool: str | Path) -> list[Path]:
    """Return the pending request files of ``spool``, oldest first."""
    pending = Path(spool) / "pending"
    if not pending.is_dir():
        return []
    entries = []
    for path in pending.glob("*.json"):
        try:
            entries.append((path.stat().st_mtime_ns, path))
        except FileNotFoundError:  # taken by a batch meanwhile
            continue
    return [path for _, path in sorted(entries)]


class ExportWriter:
    """The node's export writer: drains the spool into the central repo in batches.

    Parameters
    ----------
    repo : `str`
        Central repository (directory or ``butler.yaml``).
    spool : `str` or `pathlib.Path`
        The spool directory that export stages write to.
    instrument : `workflow.core.instrument.Instrument`
        The camera (visit and detector regions of the exposure records).
    max_batch : `int`, optional
        Most requests in one transaction.
    transfer : `str`, optional
        Butler ingest transfer mode from the spool (``copy``; ``hardlink`` when
        the datastore is on the spool's file system).
    open_butler : callable, optional
        ``repo -> Butler``; default `workflow.repo.central_repo.open_central_repo` (writeable).
    """

    def __init__(
        self,
        repo: str,
        spool: str | Path,
        instrument: Instrument,
        *,
        max_batch: int = 1000,
        transfer: str = "copy",
        open_butler: Callable[[str], Butler] | None = None,
    ) -> None:
        self.repo = repo
        # Absolute: Butler takes a relative ingest path as relative to the repo, not to us.
        self.spool = Path(spool).absolute()
        self.instrument = instrument
        self.max_batch = max_batch
        self.transfer = transfer
        self._open = open_butler
        self._butler: Butler | None = None
        self._types: dict[str, DatasetType] = {}
        self._collections: set[tuple[str, str]] = set()
        self._exposures: set[tuple[str, int]] = set()
        self._attempts: dict[str, int] = {}
        self._dirs = _dirs(self.spool)
        for directory in self._dirs.values():
            directory.mkdir(parents=True, exist_ok=True)

    def _get_butler(self) -> Butler:
        if self._butler is None:
            if self._open is not None:
                self._butler = self._open(self.repo)
            else:
                from workflow.repo.central_repo import open_central_repo

                self._butler = open_central_repo(self.repo, writeable=True)
        return self._butler

    def _forget_butler(self) -> None:
        """Drop the Butler and what was registered through it (after an error: reconnect, re-check)."""
        self._butler = None
        self._types.clear()
        self._collections.clear()
        self._exposures.clear()

    def _dataset_type(self, butler: Butler, name: str, storage_class: str) -> DatasetType:
        from lsst.daf.butler import DatasetType

        if name not in self._types:
            dataset_type = DatasetType(name, _DIMENSIONS, storage_class, universe=butler.dimensions)
            butler.registry.registerDatasetType(dataset_type)
            self._types[name] = dataset_type
        return self._types[name]

    def _ensure_collections(self, butler: Butler, run: str, chain: str) -> None:
        from lsst.daf.butler import CollectionType

        if (run, chain) in self._collections:
            return
        butler.registry.registerRun(run)
        butler.registry.registerCollection(chain, CollectionType.CHAINED)
        if run not in butler.registry.getCollectionChain(chain):
            butler.collections.prepend_chain(chain, run)  # atomic: a concurrent writer's run is kept
        self._collections.add((run, chain))

    def _register_exposure(self, butler: Butler, request: ExportRequest) -> None:
        from workflow.repo.butler_ingest import exposure_info_from_header
        from workflow.repo.central_repo import register_exposure

        key = (request.data_id["instrument"], int(request.data_id["visit"]))
        if key in self._exposures:
            return
        info, _ = exposure_info_from_header(request.raw_header, path=request.where)
        register_exposure(butler, info, self.instrument)
        self._exposures.add(key)

    def _read(self, paths: Sequence[Path]) -> tuple[list[tuple[Path, int, ExportRequest]], int]:
        """Parse pending files; move unreadable ones to ``failed/``.  Return (path, mtime, request)s and failures.

        A request whose files are missing is left for a later batch while it is young (a
        rerun of its target may be replacing them) and failed after `_MISSING_FILES_S`.
        """
        good, failed = [], 0
        for path in paths:
            mtime = 0
            try:
                mtime = path.stat().st_mtime_ns
                request = ExportRequest.from_json(path.read_text(), path=path)
                missing = [d.path for d in request.datasets if not (self._files(request) / d.path).is_file()]
                if missing and time.time() - request.submitted_at < _MISSING_FILES_S:
                    continue
                if missing:
                    raise NonRetriableError(f"{path}: files {missing} of {request.where} are not in the spool")
            except FileNotFoundError:
                continue
            except NonRetriableError as exc:
                _log.error("export writer: %s", exc)
                self._fail(path, mtime, str(exc))
                failed += 1
                continue
            good.append((path, mtime, request))
        return good, failed

    def _files(self, request: ExportRequest) -> Path:
        return self._dirs["files"] / request.request_id

    def _fail(self, path: Path, mtime: int, reason: str) -> None:
        record = {"schema_version": SCHEMA_VERSION, "request": path.name, "reason": reason, "failed_at": time.time()}
        (self._dirs["failed"] / path.name).write_text(json.dumps(record))
        _unlink_if_unchanged(path, mtime)

    def _existing(self, butler: Butler, batch: Sequence[ExportRequest]) -> set[tuple[str, str, int, int]]:
        """Return (run, dataset type, visit, detector) of the batch's datasets already in their runs."""
        wanted: dict[tuple[str, str, str], set[int]] = {}
        for request in batch:
            for dataset in request.datasets:
                key = (request.run, dataset.dataset_type, str(request.data_id["instrument"]))
                wanted.setdefault(key, set()).add(int(request.data_id["visit"]))
        found = set()
        for (run, name, instrument), visits in wanted.items():
            refs = butler.query_datasets(
                name,
                collections=run,
                where=f"instrument = instrument_name AND visit IN ({', '.join(str(v) for v in sorted(visits))})",
                bind={"instrument_name": instrument},
                find_first=False,
                limit=None,
                explain=False,
            )
            found |= {(run, name, int(r.dataId["visit"]), int(r.dataId["detector"])) for r in refs}
        return found

    def drain_once(self) -> BatchResult | None:
        """Ingest up to ``max_batch`` pending requests in one transaction; `None` if none were pending.

        Raises
        ------
        RetriableError
            If the registry or datastore failed; the requests stay pending.
        """
        paths = pending_requests(self.spool)[: self.max_batch]
        if not paths:
            return None
        start = time.monotonic()
        entries, failed = self._read(paths)
        if not entries:
            return BatchResult(requests=0, datasets_exported=0, datasets_skipped=0, failed=failed, seconds=0.0)
        try:
            try:
                exported, skipped = self._ingest([request for _, _, request in entries])
            except NonRetriableError as exc:
                # One bad request (e.g. conflicting exposure records) must not block the others: split it out.
                if len(entries) > 1:
                    return self._one_by_one(entries, failed, start)
                _log.error("export writer: %s", exc)
                self._fail(entries[0][0], entries[0][1], str(exc))
                return BatchResult(requests=0, datasets_exported=0, datasets_skipped=0, failed=failed + 1, seconds=0.0)
        except Exception as exc:
            self._forget_butler()
            if len(entries) > 1:  # a poison request, or an outage: one at a time tells which
                _log.warning("export writer: batch of %d failed (%s); trying one by one", len(entries), exc)
                return self._one_by_one(entries, failed, start)
            path, mtime, request = entries[0]
            if request.request_id in self._attempts:  # it failed before while others went through
                self._count_attempt(path, mtime, request.request_id, exc)
                return BatchResult(requests=0, datasets_exported=0, datasets_skipped=0, failed=failed, seconds=0.0)
            raise RetriableError(
                f"export writer: batch of {len(entries)} requests from {self.spool} failed, left pending: {exc}"
            ) from exc
        committed = time.time()
        for path, mtime, request in entries:
            self._finish(
                path, mtime, request, exported[request.request_id], skipped[request.request_id], committed, len(entries)
            )
        n_exported = sum(len(v) for v in exported.values())
        n_skipped = sum(len(v) for v in skipped.values())
        result = BatchResult(
            requests=len(entries),
            datasets_exported=n_exported,
            datasets_skipped=n_skipped,
            failed=failed,
            seconds=time.monotonic() - start,
        )
        _log.info("export writer: %s", result)
        return result

    def _one_by_one(self, entries: Sequence[tuple[Path, int, ExportRequest]], failed: int, start: float) -> BatchResult:
        """Ingest each request alone; fail the bad ones; raise `RetriableError` if none went through.

        A request that fails alone with an unexpected error while others succeed counts an
        attempt and is failed after `_MAX_ATTEMPTS`; when every request fails (the registry
        is down) nothing is counted and all stay pending.
        """
        n_exported = n_skipped = done = 0
        errors: dict[str, tuple[Path, int, Exception]] = {}
        for path, mtime, request in entries:
            try:
                exported, skipped = self._ingest([request])
            except NonRetriableError as exc:
                _log.error("export writer: %s", exc)
                self._fail(path, mtime, str(exc))
                failed += 1
                continue
            except Exception as exc:  # noqa: BLE001 - kept per request; all failing re-raises as RetriableError
                self._forget_butler()
                errors[request.request_id] = (path, mtime, exc)
                continue
            self._finish(
                path, mtime, request, exported[request.request_id], skipped[request.request_id], time.time(), 1
            )
            n_exported += len(exported[request.request_id])
            n_skipped += len(skipped[request.request_id])
            done += 1
        if errors and len(errors) == len(entries):
            first = next(iter(errors.values()))[2]
            raise RetriableError(f"export writer: all {len(entries)} requests of {self.spool} failed: {first}")
        for rid, (path, mtime, error) in errors.items():
            failed += self._count_attempt(path, mtime, rid, error)
        return BatchResult(
            requests=done,
            datasets_exported=n_exported,
            datasets_skipped=n_skipped,
            failed=failed,
            seconds=time.monotonic() - start,
        )

    def _count_attempt(self, path: Path, mtime: int, rid: str, error: Exception) -> int:
        """Count a failure of request ``rid`` on its own; fail it (return 1) at `_MAX_ATTEMPTS`."""
        self._attempts[rid] = self._attempts.get(rid, 0) + 1
        _log.warning("export writer: %s failed alone (attempt %d): %s", rid, self._attempts[rid], error)
        if self._attempts[rid] < _MAX_ATTEMPTS:
            return 0
        self._fail(path, mtime, f"failed {self._attempts.pop(rid)} times while other requests succeeded: {error}")
        return 1

    def _ingest(self, batch: Sequence[ExportRequest]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Register what the batch needs, then ingest its new datasets in one transaction."""
        from lsst.daf.butler import DataCoordinate, DatasetIdGenEnum, DatasetRef, FileDataset
        from lsst.daf.butler.registry import ConflictingDefinitionError

        butler = self._get_butler()
        for request in batch:
            for dataset in request.datasets:
                self._dataset_type(butler, dataset.dataset_type, dataset.storage_class)
            self._ensure_collections(butler, request.run, request.chain)
            self._register_exposure(butler, request)
        existing = self._existing(butler, batch)
        files: list[FileDataset] = []
        exported: dict[str, list[str]] = {}
        skipped: dict[str, list[str]] = {}
        for request in batch:
            exported[request.request_id], skipped[request.request_id] = [], []
            visit, detector = int(request.data_id["visit"]), int(request.data_id["detector"])
            for dataset in request.datasets:
                if (request.run, dataset.dataset_type, visit, detector) in existing:
                    skipped[request.request_id].append(dataset.dataset_type)
                    continue
                dataset_type = self._types[dataset.dataset_type]
                ref = DatasetRef(
                    dataset_type,
                    DataCoordinate.standardize(request.data_id, dimensions=dataset_type.dimensions),
                    run=request.run,
                    id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN,  # a retried batch makes the same ids
                )
                path = str(self._files(request) / dataset.path)
                files.append(FileDataset(path=path, refs=[ref], formatter=_FORMATTER.get(dataset.storage_class)))
                exported[request.request_id].append(dataset.dataset_type)
        if files:
            try:
                butler.ingest(*files, transfer=self.transfer, skip_existing=True)
            except ConflictingDefinitionError as exc:  # will not go away on a retry: split the batch
                where = ", ".join(r.where for r in batch[:3]) + (" ..." if len(batch) > 3 else "")
                raise NonRetriableError(f"export writer: cannot ingest the datasets of {where}: {exc}") from exc
        return exported, skipped

    def _finish(
        self,
        path: Path,
        mtime: int,
        request: ExportRequest,
        exported: list[str],
        skipped: list[str],
        committed: float,
        batch_size: int,
    ) -> None:
        """Write the receipt; drop the request and its files unless a rerun replaced them meanwhile."""
        receipt = ExportReceipt(
            schema_version=SCHEMA_VERSION,
            request_id=request.request_id,
            run=request.run,
            where=request.where,
            data_id=request.data_id,
            exported=exported,
            skipped=skipped,
            submitted_at=request.submitted_at,
            committed_at=committed,
            batch_size=batch_size,
        )
        tmp = self._dirs["done"] / f".{request.request_id}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(receipt), sort_keys=True))
        tmp.replace(self._dirs["done"] / f"{request.request_id}.json")
        if _unlink_if_unchanged(path, mtime):
            shutil.rmtree(self._files(request), ignore_errors=True)

    def warm_up(self, dataset_types: Mapping[str, str] = {}) -> None:
        """Open the Butler and register ``dataset_types`` (name -> storage class) before the first request.

        The first batch of a cold writer otherwise pays for both (seconds on a busy node).
        """
        butler = self._get_butler()
        for name, storage_class in dataset_types.items():
            self._dataset_type(butler, name, storage_class)

    def prune_receipts(self, keep_s: float) -> int:
        """Remove receipts older than ``keep_s`` (the spool would otherwise grow by one file per export)."""
        cutoff, removed = time.time() - keep_s, 0
        for path in self._dirs["done"].glob("*.json"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _settle(self, gather_s: float, max_wait_s: float) -> None:
        """Wait (at most ``max_wait_s``) until no request arrived for ``gather_s``: one batch per burst."""
        deadline = time.monotonic() + max_wait_s
        count = len(pending_requests(self.spool))
        while time.monotonic() < deadline:
            time.sleep(gather_s)
            now = len(pending_requests(self.spool))
            if now == count:
                return
            count = now

    def run(
        self,
        *,
        poll_s: float = 0.2,
        gather_s: float = 0.25,
        max_gather_s: float = 1.0,
        idle_exit_s: float | None = None,
        retry_s: float = 2.0,
        keep_receipts_s: float = 86400.0,
        should_stop: Callable[[], bool] | None = None,
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> int:
        """Drain the spool until stopped or idle; return the number of requests committed.

        Parameters
        ----------
        poll_s : `float`, optional
            Wait between looks at an empty spool.
        gather_s, max_gather_s : `float`, optional
            After new requests appear, wait until none arrived for ``gather_s``
            (at most ``max_gather_s``), so a visit's detectors, which finish
            within a second or two, go in one transaction rather than several.
        idle_exit_s : `float`, optional
            Return after this long with nothing pending; default: never.
        retry_s : `float`, optional
            First wait after a failed batch (its requests stay pending); doubles up to 30 s.
        keep_receipts_s : `float`, optional
            Receipts older than this are removed (checked every 10 minutes).
        should_stop : callable, optional
            Polled between batches; return `True` to stop.
        on_batch : callable, optional
            Called with each `BatchResult`.
        """
        committed, idle_since, backoff, pruned = 0, time.monotonic(), retry_s, 0.0
        while should_stop is None or not should_stop():
            if time.monotonic() - pruned > 600.0:
                self.prune_receipts(keep_receipts_s)
                pruned = time.monotonic()
            if not pending_requests(self.spool):
                if idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                    break
                time.sleep(poll_s)
                continue
            self._settle(gather_s, max_gather_s)
            try:
                result = self.drain_once()
            except RetriableError as exc:
                _log.warning("%s; retrying in %.1f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(30.0, 2 * backoff)
                continue
            backoff = retry_s
            idle_since = time.monotonic()
            if result is None:
                continue
            committed += result.requests
            if on_batch is not None:
                on_batch(result)
        return committed


def receipts(spool: str | Path, request_ids: Iterable[str] | None = None) -> dict[str, ExportReceipt]:
    """Return the receipts in ``spool`` (all, or those of ``request_ids`` that exist), by request id."""
    done = Path(spool) / "done"
    if request_ids is None:
        paths = sorted(done.glob("*.json"))
    else:
        paths = [done / f"{rid}.json" for rid in request_ids]
    return {p.stem: ExportReceipt.read(p) for p in paths if p.is_file()}
