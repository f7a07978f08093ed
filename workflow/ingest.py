"""Ingest: find a detector-visit's raw snaps, wait for late ones, check their headers.

Raws are not Snakemake inputs (one missing raw must not stop other targets), so the
ingest step looks for them itself: in the raw bucket (live; polling the listing
until the wait window closes) or in the central repo (replay).  Each snap found is
downloaded into the target's work area and its primary header is checked against
the visit: instrument, group, detector, filter, rotation within 1 degree.
"""

from __future__ import annotations

__all__ = [
    "RawTimeoutError",
    "CorruptRawError",
    "RawMismatchError",
    "FoundRaw",
    "wait_window_s",
    "RawFinder",
    "check_raw_header",
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

from .arrivals import ArrivalIndex
from .buckets import Bucket
from .exceptions import NonRetriableError, RetriableError
from .raw_keys import RawKeyLayout, sidecar_key
from .visit import DetectorVisit

_log = logging.getLogger(__name__)

_HEADER_BYTES = 2880 * 12  # enough for our primary headers; FITS blocks are 2880 B
_LISTING_INTERVAL_S = 5.0  # with an arrival index: list the bucket this often (missed notifications)


class RawTimeoutError(RetriableError, TimeoutError):
    """The raws of a detector-visit did not all arrive within the wait window.

    Retriable: rerunning the target after the raw lands succeeds.
    """


class CorruptRawError(NonRetriableError):
    """A raw file cannot be read as FITS (truncated, garbage)."""


class RawMismatchError(NonRetriableError):
    """A raw's header contradicts the visit it was found for."""


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
    end = next((i for i in range(0, len(data) - 79, 80)
                if data[i:i + 3] == b"END" and not data[i + 3:i + 80].strip()), None)
    try:
        if not data.startswith(b"SIMPLE") or end is None:
            raise ValueError("no SIMPLE ... END card sequence in the first "
                             f"{len(data)} bytes")
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
        _log.warning("%s: rotation %s differs from cameraAngle %.2f by more than 1 deg; dropped",
                     where, rotation, visit.cameraAngle)
        return False
    return True


class RawFinder:
    """Locate the raw snaps of one detector-visit in the raw bucket.

    Parameters
    ----------
    bucket : `workflow.buckets.Bucket`
        The raw bucket.
    layout : `workflow.raw_keys.RawKeyLayout`
        The instrument's key layout.
    visit : `workflow.visit.DetectorVisit`
        The detector-visit.
    detector_name : `str`
        Its detector's name (``R22_S11``) for layouts that use names.
    has_sidecar : `bool`
        Whether the camera writes JSON sidecars (LSST cameras): the group id is
        read from them instead of the FITS header.
    arrivals : `workflow.arrivals.ArrivalIndex`, optional
        Index of raw arrivals kept by the stream shim; default: the one named
        in the environment (`workflow.arrivals.ENV_VAR`), if any.  With an index
        the bucket is listed only every few seconds, for missed notifications.
    """

    def __init__(self, bucket: Bucket, layout: RawKeyLayout, visit: DetectorVisit,
                 detector_name: str, *, has_sidecar: bool, arrivals: ArrivalIndex | None = None) -> None:
        self.bucket = bucket
        self.layout = layout
        self.visit = visit
        self.detector_name = detector_name
        self.has_sidecar = has_sidecar
        self.arrivals = arrivals if arrivals is not None else ArrivalIndex.from_environment()
        self._group_of: dict[str, str | None] = {}  # key -> group; None (no sidecar yet) is asked again
        self._listed_at: float | None = None

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
        header = read_primary_header(self.bucket.read_head(key, _HEADER_BYTES), where=f"{self.bucket.name}/{key}")
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

    def wait(self, expected: int, window_s: float, *, poll_s: float = 0.5,
             sleep: Callable[[float], None] = time.sleep) -> list[str]:
        """Poll until ``expected`` raws are present or the window closes.

        Raises
        ------
        RawTimeoutError
            If fewer than ``expected`` raws arrived in time; names the visit,
            detector, what was found and how long it waited.
        """
        deadline, listed_last = time.monotonic() + window_s, self.arrivals is None
        while True:
            keys = self.find()
            if len(keys) >= expected:
                return keys[:expected] if expected else keys
            if time.monotonic() >= deadline and not listed_last:
                self._listed_at, listed_last = None, True  # one last bucket listing before giving up
                continue
            if time.monotonic() >= deadline:
                raise RawTimeoutError(
                    f"{self.visit.instrument} group {self.visit.groupId} detector {self.visit.detector}: "
                    f"{len(keys)} of {expected} raw(s) arrived in {window_s:.0f} s "
                    f"(bucket {self.bucket.name}, prefix {self.listing_prefix()!r})"
                )
            sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


def _template_parts(template: str) -> list[tuple[str, str | None]]:
    import string

    return [(literal, field) for literal, field, _, _ in string.Formatter().parse(template)]


def fetch_and_check(bucket: Bucket, keys: list[str], visit: DetectorVisit, dest_dir: Path) -> list[Path]:
    """Download raws into ``dest_dir`` and check each header against the visit.

    Returns
    -------
    paths : `list` [`pathlib.Path`]
        Local files of the usable snaps, in snap order.

    Raises
    ------
    CorruptRawError
        If a file is not readable FITS.
    RawMismatchError
        If a header contradicts the visit, or every snap was dropped for rotation.
    """
    usable = []
    for key in keys:
        data = bucket.get(key)
        where = f"{bucket.name}/{key}"
        try:
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                header = hdul[0].header.copy()
                hdul.verify("exception")
                for hdu in hdul[1:]:
                    _ = hdu.data  # force a read: truncated files fail here
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


def raws_from_central_repo(config: Mapping[str, Any], visit: DetectorVisit, dest_dir: Path) -> list[Path]:
    """Replay: copy a past visit's raws from the central repo and check them.

    Raises
    ------
    RawTimeoutError
        Never waits: if the repo holds fewer raws than expected the error says so
        (classified like a live timeout, since a later ingest could add them).
    CorruptRawError, RawMismatchError
        As for the bucket.
    """
    from lsst.resources import ResourcePath

    from .central_repo import open_central_repo, raw_collection

    butler = open_central_repo(config["central_repo"])
    refs = butler.query_datasets(
        "raw", collections=raw_collection(visit.instrument),
        where="instrument = inst AND detector = det AND exposure.group = grp",
        bind={"inst": visit.instrument, "det": visit.detector, "grp": visit.groupId},
        limit=None, explain=False,
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
        ResourcePath(dest).transfer_from(uri, transfer="copy", overwrite=True)
        where = f"{config['central_repo']}:{uri.basename()}"
        try:
            with fits.open(dest, memmap=False) as hdul:
                header = hdul[0].header.copy()
        except Exception as exc:
            raise CorruptRawError(f"{where}: corrupt raw for group {visit.groupId} detector {visit.detector}: {exc}") from exc
        if check_raw_header(header, visit, where=where):
            usable.append((int(header.get("SNAP", 0)), dest))
    if not usable:
        raise RawMismatchError(f"group {visit.groupId} detector {visit.detector}: every raw was dropped for rotation")
    return [path for _, path in sorted(usable)]
