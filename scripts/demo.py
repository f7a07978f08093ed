"""Run the embedded-default demo: everything local, no server.

At this stage of the project the demo exercises what exists end to end: it loads
and validates every instrument configuration, builds a next_visit message for the
default instrument, checks it the way the stream shim will (JSON and Avro), fans it
out into per-detector visit files, and asks Snakemake for a dry run of the targets.
It prints only what it measured.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from workflow.config import PROJECT_ROOT, known_instruments, load_config
from workflow.visit import CoordSys, Dome, NextVisit, RotSys, parse_next_visit

_log = logging.getLogger("demo")


def _sample_visit(instrument: str, filter_name: str) -> NextVisit:
    now = time.time() + 37.0  # TAI is ahead of UTC by 37 s
    return NextVisit(
        salIndex=2, scriptSalIndex=1, instrument=instrument,
        groupId=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000",
        coordinateSystem=CoordSys.ICRS, position=[150.1, 2.2], startTime=now,
        rotationSystem=RotSys.SKY, cameraAngle=12.0, filters=filter_name, dome=Dome.OPEN,
        duration=30.0, nimages=1, survey="demo", totalCheckpoints=0, private_sndStamp=now,
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in known_instruments():
        config = load_config(instrument=name)
        _log.info("config ok: %-14s %d filters, pipelines %s", name, len(config["filters"]),
                  [node["pipelines"] for node in config["pipelines"]])
    config = load_config()
    name = config["instrument"]["name"]
    visit = _sample_visit(name, config["filters"][0]["physical_filter"])
    for label, payload in (("JSON", visit.to_json()), ("Avro", visit.to_avro(schema_id=1))):
        parsed = parse_next_visit(payload, known_instruments=known_instruments())
        assert parsed == visit, f"{label} round trip changed the visit"
        _log.info("next_visit %s: %d bytes, parsed and validated", label, len(payload))

    detectors = range(len(config["focal_plane"]["rafts"]) * len(config["focal_plane"]["sensors"]))
    visit_dir = PROJECT_ROOT / config["paths"]["visits"] / name / visit.day_obs / visit.groupId
    visit_dir.mkdir(parents=True, exist_ok=True)
    for detector_visit in visit.fan_out(detectors):
        (visit_dir / f"{detector_visit.detector}.json").write_text(detector_visit.to_json())
    _log.info("fanned out group %s into %d visit files under %s", visit.groupId,
              len(detectors), visit_dir.relative_to(PROJECT_ROOT))

    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/local", "--quiet"],
        cwd=PROJECT_ROOT, capture_output=True, text=True,
    )
    _log.info("snakemake dry run: exit %d%s", result.returncode,
              "" if result.returncode == 0 else "\n" + result.stderr[-2000:])
    _log.info("the processing rules (prep, ingest, pipeline, export, apdb) are not built yet: "
              "nothing was processed")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
