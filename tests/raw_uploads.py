"""Test helper: simulate one detector's raw for a next_visit and put it in a bucket."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from workflow.core.instrument import Instrument
from workflow.core.raw_keys import RawKeyLayout, sidecar_key
from workflow.core.visit import CoordSys, Dome, NextVisit, RotSys
from workflow.sim.exposures import exposure_from_visit
from workflow.sim.simulate import simulate_raw


def make_visit(
    instrument: str,
    group: str,
    filters: str,
    *,
    snd_stamp: float,
    angle: float = 0.0,
    ra: float = 150.1,
    dec: float = 2.2,
    duration: float = 30.0,
) -> NextVisit:
    """Return a next_visit message with test defaults (the demo field, ICRS, SKY)."""
    return NextVisit(
        salIndex=1,
        scriptSalIndex=1,
        instrument=instrument,
        groupId=group,
        coordinateSystem=CoordSys.ICRS,
        position=[ra, dec],
        startTime=snd_stamp,
        rotationSystem=RotSys.SKY,
        cameraAngle=angle,
        filters=filters,
        dome=Dome.OPEN,
        duration=duration,
        nimages=1,
        survey="test",
        totalCheckpoints=0,
        private_sndStamp=snd_stamp,
    )


def upload_raw(
    bucket: Any,
    config: dict,
    instrument: Instrument,
    visit: NextVisit,
    detector: int,
    *,
    corrupt: bool = False,
    rotation_deg: float | None = None,
    seq_num: int = 7,
    seed: int = 0,
) -> str:
    """Simulate ``detector``'s raw for ``visit``, upload it (and its sidecar); return the key.

    ``corrupt`` uploads only the first third of the file (a truncated raw).
    """
    exposure = exposure_from_visit(instrument, visit, seq_num=seq_num)[0]
    if rotation_deg is not None:
        exposure = dataclasses.replace(exposure, rotation_deg=rotation_deg)
    raw = simulate_raw(instrument, detector, exposure, seed=seed)
    det = instrument.detector(detector)
    key = RawKeyLayout.from_config(config).format(
        instrument=instrument.name,
        day_obs=str(exposure.day_obs),
        obs_id=exposure.obs_id,
        detector=det.id,
        detector_name=det.name,
        group=exposure.group_id,
        snap=exposure.snap,
        exposure=exposure.exposure_id,
        physical_filter=exposure.physical_filter,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "raw.fits"
        raw.write(path)
        data = path.read_bytes()
    bucket.put(key, data[: len(data) // 3] if corrupt else data)
    if config["raw"]["sidecar"]:
        bucket.put(sidecar_key(key), json.dumps(raw.sidecar()).encode())
    return key
