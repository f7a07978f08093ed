"""Ingest: find a detector-visit's raw snaps, wait for late ones, check their headers.

Raws are not Snakemake inputs (one missing raw must not stop other targets), so the
ingest step looks for them itself: in the raw bucket (live; polling the listing
until the wait window closes) or in the central repo (replay).  Each snap found is
downloaded into the target's work area and its primary header is checked against
the visit: instrument, group, detector, filter, rotation within 1 degree; its
amplifiers must be present, of the detector's shape, with finite pixels
(`workflow.stages.raw_checks`).  When the visit names no single filter (blank
``filters`` means any), the raw's ``FILTER`` decides and ingest stages the flat and
templates for it (`workflow.stages.prep.stage_filter_inputs`).  Transient S3 errors
(`workflow.stages.transient_errors`) are counted, logged and ridden through until the
wait window closes; only then does ingest give up, with a `RawTimeoutError` naming the
last of them.
"""

from __future__ import annotations

__all__ = [
    "run",
    "RawTimeoutError",
    "CorruptRawError",
    "RawMismatchError",
    "RawMissingError",
    "FoundRaw",
    "wait_window_s",
    "poll_interval",
    "RawFinder",
    "check_raw_header",
    "raw_filter",
    "read_primary_header",
    "fetch_and_check",
    "raws_from_central_repo",
]

import dataclasses
import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from astropy.io import fits

from workflow.core.amplifiers import DetectorGeometry
from workflow.core.arrivals import ArrivalIndex
from workflow.core.buckets import Bucket, open_bucket
from workflow.core.exceptions import NonRetriableError, RetriableError
from workflow.core.instrument import instrument_for_run
from workflow.core.raw_keys import RawKeyLayout, sidecar_key
from workflow.core.visit import DetectorVisit
from workflow.stages.prep import prep_filter, stage_filter_inputs
from workflow.stages.raw_checks import raw_problem
from workflow.stages.records import StageRecord
from workflow.stages.target import TargetPaths, load_target_visit, run_stage
from workflow.stages.transient_errors import TransientErrors, is_transient

_log = logging.getLogger(__name__)

_HEADER_BYTES = 2880 * 12  # enough for our primary headers; FITS blocks are 2880 B
_LISTING_INTERVAL_S = 5.0  # with an arrival index: list the bucket this often (missed notifications)


class RawTimeoutError(RetriableError, TimeoutError):
    """The raws of a detector-visit did not all arrive within the wait window.

    Retriable: rerunning the target after the raw lands succeeds.
    """


class CorruptRawError(NonRetriableError):
    """A raw file is unusable: not readable FITS (truncated, garbage), or its amplifiers
    are missing, of the wrong shape, or without finite pixels (all NaN)."""


class RawMismatchError(NonRetriableError):
    """A raw's header contradicts the visit it was found for."""


class RawMissingError(RetriableError, FileNotFoundError):
    """A raw vanished after it was found (deleted after its notification or listing).

    Retriable: a rerun waits for the raws again (a re-upload is then found).
    """


def _visit_name(visit: DetectorVisit) -> str:
    return f"{visit.instrument} group {visit.groupId} detector {visit.detector}"


@dataclasses.dataclass(frozen=True)
class FoundRaw:
    """One raw snap located for a detector-visit."""

    key: str
    snap: int
    header: fits.Header


def wait_window_s(visit: DetectorVisit, image_timeout_s: float) -> float:
    """Return how long to wait for raws, as Rubin does: 2 x duration + image timeout."""
    return 2.0 * max(visit.duration, 0.0) + image_timeout_s


def read_primary_header(data: bytes, *, where: str) -> fits.Header:
    """Parse a FITS primary header from the first bytes of a file.

    Raises
    ------
    CorruptRawError
        If the bytes do not start with a valid FITS header; names ``where``.
    """
    end = next(
        (i for i in range(0, len(data) - 79, 80) if data[i : i + 3] == b"END" and not data[i + 3 : i + 80].strip()),
        None,
    )
    try:
        if not data.startswith(b"SIMPLE") or end is None:
            raise ValueError(f"no SIMPLE ... END card sequence in the first {len(data)} bytes")
        return fits.Header.fromstring(data[: end + 80].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRawError(f"{where}: not a FITS file: {exc}") from exc


def _angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def check_raw_header(header: Mapping[str, Any], visit: DetectorVisit, *, where: str) -> bool:
    """Check a raw's header against its visit.

    Returns
    -------
    usable : `bool`
        False when only the rotation differs by more than 1 degree (Rubin drops
        such snaps); True when everything agrees.

    Raises
    ------
    RawMismatchError
        If instrument, group, detector or filter contradict the visit.
    """
    expected = {"INSTRUME": visit.instrument, "GROUPID": visit.groupId, "DETECTOR": visit.detector}
    for card, value in expected.items():
        if header.get(card) != value:
            raise RawMismatchError(
                f"{where}: header {card}={header.get(card)!r} but visit {visit.groupId} "
                f"detector {visit.detector} expects {value!r}"
            )
    if visit.filter_list and header.get("FILTER") not in visit.filter_list:
        raise RawMismatchError(
            f"{where}: header FILTER={header.get('FILTER')!r} not in the visit's filters {list(visit.filter_list)}"
        )
    rotation = header.get("ROTPA")
    if rotation is None or _angle_diff(float(rotation), visit.cameraAngle) > 1.0:
        _log.warning(
            "%s: rotation %s differs from cameraAngle %.2f by more than 1 deg; dropped",
            where,
            rotation,
            visit.cameraAngle,
        )
        return False
    return True


def raw_filter(header: Mapping[str, Any], config: Mapping[str, Any], *, where: str) -> str:
    """Return the physical filter a raw was taken with, from its primary header.

    Rubin's cameras write the physical filter as ``FILTER`` and its band as
    ``FILTBAND``; HSC writes ``FILTER01``.  A band that contradicts the filter's
    configured band is a mismatch.

    Raises
    ------
    RawMismatchError
        If the header names no filter, one the instrument does not have, or a
        ``FILTBAND`` other than that filter's band.
    """
    physical_filter = header.get("FILTER", header.get("FILTER01"))
    filters = {f["physical_filter"]: f["band"] for f in config["filters"]}
    if physical_filter not in filters:
        raise RawMismatchError(
            f"{where}: header FILTER={physical_filter!r} is not a filter of {config['instrument']['name']} "
            f"(expected one of {sorted(filters)}), and the visit names no single filter to use instead"
        )
    band = header.get("FILTBAND")
    if band is not None and band != filters[physical_filter]:
        raise RawMismatchError(
            f"{where}: header FILTBAND={band!r} but FILTER={physical_filter!r} is band {filters[physical_filter]!r}"
        )
    return str(physical_filter)


class RawFinder:
    """Locate the raw snaps of one detector-visit in the raw bucket.

    Parameters
    ----------
    bucket : `workflow.core.buckets.Bucket`
        The raw bucket.
    layout : `workflow.core.raw_keys.RawKeyLayout`
        The instrument's key layout.
    visit : `workflow.core.visit.DetectorVisit`
        The detector-visit.
    detector_name : `str`
        Its detector's name (``R22_S11``) for layouts that use names.
    has_sidecar : `bool`
        Whether the camera writes JSON sidecars (LSST cameras): the group id is
        read from them instead of the FITS header.
    arrivals : `workflow.core.arrivals.ArrivalIndex`, optional
        Index of raw arrivals kept by the stream shim; default: the one named
        in the environment (`workflow.core.arrivals.ENV_VAR`), if any.  With an index
        the bucket is listed only every few seconds, for missed notifications.
    """

    def __init__(
        self,
        bucket: Bucket,
        layout: RawKeyLayout,
        visit: DetectorVisit,
        detector_name: str,
        *,
        has_sidecar: bool,
        arrivals: ArrivalIndex | None = None,
    ) -> None:
        self.bucket = bucket
        self.layout = layout
        self.visit = visit
        self.detector_name = detector_name
        self.has_sidecar = has_sidecar
        self.arrivals = arrivals if arrivals is not None else ArrivalIndex.from_environment()
        self._group_of: dict[str, str | None] = {}  # key -> group; None (no sidecar yet) is asked again
        self._listed_at: float | None = None
        self.errors = TransientErrors(_visit_name(visit), deadline=time.monotonic())
        """Transient S3 errors of the last `wait` (its window is their deadline, also for fetching)."""

    def listing_prefix(self) -> str:
        """Return the longest key prefix fixed by what the visit tells us."""
        known = {
            "instrument": self.visit.instrument,
            "day_obs": self.visit.day_obs.replace("-", ""),
            "detector": self.visit.detector,
            "detector_name": self.detector_name,
            "group": self.visit.groupId,
        }
        prefix = ""
        for literal, field in _template_parts(self.layout.template):
            prefix += literal
            if field is None:
                continue
            if field not in known:
                break
            prefix += str(known[field])
        return prefix

    def _belongs(self, key: str) -> bool:
        fields = self.layout.parse(key)
        if fields is None:
            return False
        if fields.detector is not None and fields.detector != self.visit.detector:
            return False
        if fields.detector_name is not None and fields.detector_name != self.detector_name:
            return False
        if fields.group is not None:
            return fields.group == self.visit.groupId
        if self._group_of.get(key) is None:
            self._group_of[key] = self._group_from_metadata(key)
        return self._group_of[key] == self.visit.groupId

    def _group_from_metadata(self, key: str) -> str | None:
        # Sidecars are written after their image, so a missing sidecar means "not yet".
        if self.has_sidecar:
            try:
                return json.loads(self.bucket.get(sidecar_key(key))).get("GROUPID")
            except FileNotFoundError:
                return None
        where = f"{self.bucket.name}/{key}"
        try:
            head = self.bucket.read_head(key, _HEADER_BYTES)
        except FileNotFoundError:
            return None  # listed, then deleted: not (or no longer) a raw of ours
        try:
            header = read_primary_header(head, where=where)
        except CorruptRawError as exc:
            raise CorruptRawError(f"{exc} (a candidate raw of {_visit_name(self.visit)})") from exc
        return header.get("GROUPID")

    def _candidates(self) -> list[str]:
        """Keys that may be ours: the arrival index's, plus a bucket listing when due."""
        keys: set[str] = set()
        if self.arrivals is not None:
            keys.update(self.arrivals.keys(self.visit.instrument, self.visit.day_obs, self.visit.detector))
        due = self._listed_at is None or time.monotonic() - self._listed_at >= _LISTING_INTERVAL_S
        if self.arrivals is None or due:
            keys.update(self.bucket.list(self.listing_prefix()))
            self._listed_at = time.monotonic()
        return sorted(keys)

    def find(self) -> list[str]:
        """Return the keys of this detector-visit's raws present now."""
        found = [k for k in self._candidates() if self._belongs(k)]
        if self.has_sidecar:  # not complete until its sidecar exists
            found = [k for k in found if self._group_of.get(k) is not None]
        return found

    def wait(
        self, expected: int, window_s: float, *, poll_s: float = 0.5, sleep: Callable[[float], None] = time.sleep
    ) -> list[str]:
        """Poll until ``expected`` raws are present or the window closes.

        A transient S3 error (`workflow.stages.transient_errors.is_transient`) while
        looking is counted and logged (``errors``), and the polling goes on.

        Raises
        ------
        RawTimeoutError
            If fewer than ``expected`` raws arrived in time; names the visit,
            detector, what was found, how long it waited and the last transient
            S3 error, if any.
        """
        deadline, listed_last = time.monotonic() + window_s, self.arrivals is None
        self.errors = TransientErrors(_visit_name(self.visit), deadline=deadline, poll_s=poll_s, sleep=sleep)
        keys: list[str] = []
        while True:
            try:
                keys = self.find()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.errors.record(exc, f"looking for raws in bucket {self.bucket.name}")
            if len(keys) >= expected:
                return keys[:expected] if expected else keys
            if time.monotonic() >= deadline and not listed_last:
                self._listed_at, listed_last = None, True  # one last bucket listing before giving up
                continue
            if time.monotonic() >= deadline:
                raise RawTimeoutError(
                    f"{self.visit.instrument} group {self.visit.groupId} detector {self.visit.detector}: "
                    f"{len(keys)} of {expected} raw(s) arrived in {window_s:.0f} s "
                    f"(bucket {self.bucket.name}, prefix {self.listing_prefix()!r}){self.errors.describe_last()}"
                )
            sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


def poll_interval(settings: Mapping[str, Any], *, indexed: bool) -> float:
    """Return the wait between looks for raws: short with the shim's arrival index (a local lookup).

    Without the index each look lists the bucket, so it keeps ``poll_interval_s``.
    """
    poll_s = float(settings["poll_interval_s"])
    return float(settings.get("index_poll_interval_s", poll_s)) if indexed else poll_s


def _template_parts(template: str) -> list[tuple[str, str | None]]:
    import string

    return [(literal, field) for literal, field, _, _ in string.Formatter().parse(template)]


def _get_raw(bucket: Bucket, key: str, visit: DetectorVisit, errors: TransientErrors) -> bytes:
    """Download one raw, riding through transient S3 errors until the wait window closes."""
    where = f"{bucket.name}/{key}"

    def timed_out(exc: BaseException) -> Exception:
        return RawTimeoutError(
            f"{_visit_name(visit)}: raw {where} found but not readable before the wait window closed"
            f"{errors.describe_last()}"
        )

    try:
        return errors.call(lambda: bucket.get(key), f"reading {where}", on_expired=timed_out)
    except FileNotFoundError as exc:
        raise RawMissingError(f"{where}: raw of {_visit_name(visit)} vanished after it was found: {exc}") from exc


def _check_raw_content(hdul: fits.HDUList, geometry: DetectorGeometry | None, visit: DetectorVisit, where: str) -> None:
    problem = raw_problem(hdul, geometry)
    if problem is not None:
        raise CorruptRawError(f"{where}: corrupt raw for group {visit.groupId} detector {visit.detector}: {problem}")


def fetch_and_check(
    bucket: Bucket,
    keys: list[str],
    visit: DetectorVisit,
    dest_dir: Path,
    *,
    geometry: DetectorGeometry | None = None,
    errors: TransientErrors | None = None,
) -> list[Path]:
    """Download raws into ``dest_dir`` and check each header against the visit.

    Parameters
    ----------
    bucket : `workflow.core.buckets.Bucket`
        The raw bucket.
    keys : `list` [`str`]
        The raws found (`RawFinder.wait`).
    visit : `workflow.core.visit.DetectorVisit`
        Their detector-visit.
    dest_dir : `pathlib.Path`
        Where the usable snaps are written.
    geometry : `workflow.core.amplifiers.DetectorGeometry`, optional
        The detector's amplifiers, checked against each raw's segments.
    errors : `workflow.stages.transient_errors.TransientErrors`, optional
        The wait's transient-error tracker (`RawFinder.errors`): transient S3
        errors are ridden through until its deadline.  Default: no patience.

    Returns
    -------
    paths : `list` [`pathlib.Path`]
        Local files of the usable snaps, in snap order.

    Raises
    ------
    CorruptRawError
        If a file is not readable FITS, or its amplifiers are missing, of the wrong
        shape or without finite pixels.
    RawMismatchError
        If a header contradicts the visit, or every snap was dropped for rotation.
    RawMissingError
        If a raw vanished from the bucket after it was found.
    RawTimeoutError
        If transient S3 errors kept a raw from being read until the window closed.
    """
    errors = errors if errors is not None else TransientErrors(_visit_name(visit), deadline=time.monotonic())
    usable = []
    for key in keys:
        data = _get_raw(bucket, key, visit, errors)
        where = f"{bucket.name}/{key}"
        try:
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                header = hdul[0].header.copy()
                hdul.verify("exception")
                for hdu in hdul[1:]:
                    _ = hdu.data  # force a read: truncated files fail here
                _check_raw_content(hdul, geometry, visit, where)
        except CorruptRawError:
            raise
        except Exception as exc:  # astropy raises many types for damaged files
            raise CorruptRawError(
                f"{where}: corrupt raw for group {visit.groupId} detector {visit.detector}: {exc}"
            ) from exc
        if check_raw_header(header, visit, where=where):
            path = dest_dir / Path(key).name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            usable.append((int(header.get("SNAP", 0)), path))
    if not usable:
        raise RawMismatchError(
            f"group {visit.groupId} detector {visit.detector}: every raw was dropped "
            f"(rotation differs from cameraAngle {visit.cameraAngle} by more than 1 deg)"
        )
    return [path for _, path in sorted(usable)]


def raws_from_central_repo(
    config: Mapping[str, Any], visit: DetectorVisit, dest_dir: Path, *, geometry: DetectorGeometry | None = None
) -> list[Path]:
    """Replay: copy a past visit's raws from the central repo and check them.

    Raises
    ------
    RawTimeoutError
        Never waits: if the repo holds fewer raws than expected the error says so
        (classified like a live timeout, since a later ingest could add them).
    CorruptRawError, RawMismatchError, RawMissingError
        As for the bucket (``geometry``: the detector's amplifiers, checked against
        each raw's segments).
    """
    from lsst.resources import ResourcePath

    from workflow.repo.central_repo import open_central_repo, raw_collection

    butler = open_central_repo(config["central_repo"])
    refs = butler.query_datasets(
        "raw",
        collections=raw_collection(visit.instrument),
        where="instrument = inst AND detector = det AND exposure.group = grp",
        bind={"inst": visit.instrument, "det": visit.detector, "grp": visit.groupId},
        limit=None,
        explain=False,
    )
    expected = visit.nimages or int(config["raw"]["snaps_per_visit"])
    if len(refs) < expected:
        raise RawTimeoutError(
            f"{visit.instrument} group {visit.groupId} detector {visit.detector}: "
            f"{len(refs)} of {expected} raw(s) in the central repo {config['central_repo']}"
        )
    usable = []
    for ref in refs:
        uri = butler.getURI(ref)
        dest = dest_dir / uri.basename()
        dest.parent.mkdir(parents=True, exist_ok=True)
        where = f"{config['central_repo']}:{uri.basename()}"
        try:
            ResourcePath(dest).transfer_from(uri, transfer="copy", overwrite=True)
        except FileNotFoundError as exc:
            raise RawMissingError(f"{where}: raw of {_visit_name(visit)} is registered but missing: {exc}") from exc
        try:
            with fits.open(dest, memmap=False) as hdul:
                header = hdul[0].header.copy()
                _check_raw_content(hdul, geometry, visit, where)
        except CorruptRawError:
            raise
        except Exception as exc:
            raise CorruptRawError(
                f"{where}: corrupt raw for group {visit.groupId} detector {visit.detector}: {exc}"
            ) from exc
        if check_raw_header(header, visit, where=where):
            usable.append((int(header.get("SNAP", 0)), dest))
    if not usable:
        raise RawMismatchError(f"group {visit.groupId} detector {visit.detector}: every raw was dropped for rotation")
    return [path for _, path in sorted(usable)]


def run(*, visit: str, record: str, config: Mapping[str, Any], log: str | None = None) -> StageRecord:
    """Find (waiting if needed), download and check the raws; write the ingest record (rule ``ingest``)."""

    def ingest(target: TargetPaths) -> dict[str, Any]:
        detector_visit = load_target_visit(visit, config)
        dest = target.work_dir / "raws"
        source = config["ingest"]["source"]
        geometry = instrument_for_run(config).geometry
        s3_errors = 0
        if source == "central_repo":
            paths = raws_from_central_repo(config, detector_visit, dest, geometry=geometry)
        else:
            bucket = open_bucket(config, config["buckets"]["raw"])
            finder = RawFinder(
                bucket,
                RawKeyLayout.from_config(config),
                detector_visit,
                instrument_for_run(config).detector(detector_visit.detector).name,
                has_sidecar=bool(config["raw"]["sidecar"]),
            )
            expected = detector_visit.nimages or int(config["raw"]["snaps_per_visit"])
            window = wait_window_s(detector_visit, float(config["raw"]["image_timeout_s"]))
            keys = finder.wait(
                expected, window, poll_s=poll_interval(config["ingest"], indexed=finder.arrivals is not None)
            )
            paths = fetch_and_check(bucket, keys, detector_visit, dest, geometry=geometry, errors=finder.errors)
            s3_errors = finder.errors.count
        with open(paths[0], "rb") as stream:
            header = read_primary_header(stream.read(2880 * 12), where=str(paths[0]))
        record = {
            "source": source,
            "raws": [str(p) for p in paths],
            "transient_s3_errors": s3_errors,
            "header": {k: header[k] for k in header if k not in ("COMMENT", "HISTORY", "")},
        }
        if prep_filter(detector_visit) is None:  # prep left the flat and templates to the raw's filter
            physical_filter = raw_filter(header, config, where=str(paths[0]))
            record["filter_inputs"] = stage_filter_inputs(detector_visit, config, target.work_dir, physical_filter)
        return record

    return run_stage("ingest", visit=visit, record=record, config=config, log=log, body=ingest)
