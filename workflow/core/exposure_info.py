"""Identity of one exposure (snap): the record the repo registers and the camera names.

Conventions (as Rubin's): ``day_obs`` is the TAI date 12 hours before the exposure
start; ``exposure_id = day_obs * 100000 + seq_num``; ``group_id`` is shared by a
visit's snaps.  `workflow.sim.exposures` makes these records for simulated visits.
"""

from __future__ import annotations

__all__ = ["ExposureInfo", "to_tai"]

import dataclasses

from astropy.time import Time, TimeDelta


def to_tai(when: Time | float | str) -> Time:
    """Return a TAI `astropy.time.Time` from a Time, unix-TAI seconds or ISO TAI string."""
    if isinstance(when, Time):
        return when.tai
    if isinstance(when, str):
        return Time(when, scale="tai")
    return Time(float(when), format="unix_tai", scale="tai")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExposureInfo:
    """Everything that identifies one snap of one visit (all detectors).

    Attributes
    ----------
    instrument : `str`
        Instrument name.
    exposure_id : `int`
        Butler exposure id.
    obs_id : `str`
        Observation id (raw file names of LSST cameras).
    group_id : `str`
        Visit group, shared by snaps (next_visit ``groupId``).
    day_obs : `int`
        Observing day ``YYYYMMDD``.
    seq_num : `int`
        Sequence number of this snap.
    snap : `int`
        Snap index in the visit.
    n_snaps : `int`
        Snaps in the visit.
    start : `astropy.time.Time`
        Shutter open (TAI).
    exptime : `float`
        Exposure time in seconds.
    ra, dec : `float`
        Commanded boresight (degrees, ICRS).
    rotation_deg : `float`
        Commanded sky rotation (see `workflow.core.instrument`).
    physical_filter : `str`
        Filter in the beam.
    """

    instrument: str
    exposure_id: int
    obs_id: str
    group_id: str
    day_obs: int
    seq_num: int
    snap: int
    n_snaps: int
    start: Time
    exptime: float
    ra: float
    dec: float
    rotation_deg: float
    physical_filter: str

    @property
    def end(self) -> Time:
        """Shutter close (TAI)."""
        return self.start + TimeDelta(self.exptime, format="sec")

    @property
    def mjd_mid(self) -> float:
        """Mid-exposure MJD (TAI)."""
        return float(self.start.mjd + self.exptime / 2.0 / 86400.0)
