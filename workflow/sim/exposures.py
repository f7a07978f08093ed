"""Identity of simulated exposures: ids, obs ids, group ids, times, pointing.

Conventions (as Rubin's):

- ``day_obs``: the TAI date 12 hours before the exposure start, ``YYYYMMDD``.
- ``exposure_id = day_obs * 100000 + seq_num``; each snap is its own exposure
  with the next ``seq_num``.
- ``obs_id``: ``{obs_id_prefix}_{controller}_{day_obs}_{seq_num:06d}`` for
  LSST-style cameras, ``{instrument}-{exposure_id}`` otherwise.
- ``group_id``: the ISO TAI start time of the visit (LSST style) or the
  first snap's exposure id (generic cameras), shared by the visit's snaps.
"""

from __future__ import annotations

__all__ = ["make_exposures", "exposure_from_visit"]

import logging
from typing import Any

from astropy.time import Time, TimeDelta

from workflow.core.exposure_info import ExposureInfo, to_tai
from workflow.core.instrument import Instrument

_log = logging.getLogger(__name__)

_DAY_OBS_OFFSET = TimeDelta(12 * 3600.0, format="sec")
_READOUT_S = 2.0


def _day_obs(start: Time) -> int:
    return int((start - _DAY_OBS_OFFSET).strftime("%Y%m%d"))


def make_exposures(
    instrument: Instrument,
    *,
    start: Time | float | str,
    seq_num: int,
    ra: float,
    dec: float,
    rotation_deg: float,
    physical_filter: str,
    exptime: float | None = None,
    group_id: str | None = None,
    n_snaps: int | None = None,
) -> list[ExposureInfo]:
    """Return the snaps of one visit.

    Parameters
    ----------
    instrument : `workflow.core.instrument.Instrument`
        The camera.
    start : `astropy.time.Time`, `float` or `str`
        Start of the first snap (Time, unix-TAI seconds or ISO TAI).
    seq_num : `int`
        Sequence number of the first snap.
    ra, dec, rotation_deg : `float`
        Commanded pointing.
    physical_filter : `str`
        Filter; must be known to the instrument.
    exptime : `float`, optional
        Per-snap exposure time (default 30 s / number of snaps).
    group_id : `str`, optional
        Visit group id (default: see the module docstring).
    n_snaps : `int`, optional
        Number of snaps (default ``instrument.snaps_per_visit``).

    Returns
    -------
    exposures : `list` [`ExposureInfo`]

    Raises
    ------
    KeyError
        If the filter is unknown to the instrument.
    """
    instrument.band(physical_filter)
    start = to_tai(start)
    n_snaps = n_snaps or instrument.snaps_per_visit
    exptime = float(exptime) if exptime is not None else 30.0 / n_snaps
    day_obs = _day_obs(start)
    if group_id is None:
        group_id = start.isot if instrument.camera_style == "lsst" else str(day_obs * 100000 + seq_num)
    out = []
    for snap in range(n_snaps):
        seq = seq_num + snap
        exposure_id = day_obs * 100000 + seq
        if instrument.camera_style == "lsst":
            obs_id = f"{instrument.obs_id_prefix or 'XX'}_{instrument.controller or 'O'}_{day_obs}_{seq:06d}"
        else:
            obs_id = f"{instrument.name}-{exposure_id}"
        out.append(
            ExposureInfo(
                instrument=instrument.name,
                exposure_id=exposure_id,
                obs_id=obs_id,
                group_id=group_id,
                day_obs=day_obs,
                seq_num=seq,
                snap=snap,
                n_snaps=n_snaps,
                start=start + TimeDelta(snap * (exptime + _READOUT_S), format="sec"),
                exptime=exptime,
                ra=float(ra),
                dec=float(dec),
                rotation_deg=float(rotation_deg),
                physical_filter=physical_filter,
            )
        )
    return out


def exposure_from_visit(
    instrument: Instrument, visit: Any, *, seq_num: int, exptime: float | None = None
) -> list[ExposureInfo]:
    """Return the snaps a next_visit message announces.

    Parameters
    ----------
    instrument : `workflow.core.instrument.Instrument`
        The camera.
    visit : `workflow.core.visit.NextVisit` or `workflow.core.visit.DetectorVisit`
        Any object with the next_visit fields ``position``, ``cameraAngle``,
        ``groupId``, ``filters``, ``startTime`` (unix TAI) and ``nimages``.
    seq_num : `int`
        Sequence number of the first snap.
    exptime : `float`, optional
        Per-snap exposure time.

    Returns
    -------
    exposures : `list` [`ExposureInfo`]
    """
    filters = [f for f in str(visit.filters).split(",") if f]
    physical_filter = filters[0] if filters else next(iter(instrument.filters))
    return make_exposures(
        instrument,
        start=float(visit.startTime),
        seq_num=seq_num,
        ra=float(visit.position[0]),
        dec=float(visit.position[1]),
        rotation_deg=float(visit.cameraAngle),
        physical_filter=physical_filter,
        exptime=exptime,
        group_id=str(visit.groupId),
        n_snaps=int(visit.nimages) or None,
    )
