"""Time the simulator: one full-size LSSTCam raw, its FITS write, one template patch.

Prints one JSON object (seconds).  ``cold`` timings include the one-off
generation of the detector's flat/bias patterns and of the refcat/galaxy
shards; ``warm`` timings are a second detector-visit of the same detector
(a new snap, as in a multi-visit run).

Usage: ``python scripts/bench_simulate.py [--detector 94] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from workflow.core.config import load_config
from workflow.core.instrument import Instrument
from workflow.core.skymap import RingsSkyMap
from workflow.sim.exposures import make_exposures
from workflow.sim.simulate import simulate_raw
from workflow.sim.templates import make_template

_log = logging.getLogger("bench_simulate")


def _timed(func, *args, **kwargs):  # noqa: ANN001, ANN202 - tiny local helper
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return result, round(time.perf_counter() - start, 3)


def main() -> None:
    """Run the benchmark and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", type=int, default=94)
    parser.add_argument("--out", type=Path, default=None, help="directory for the FITS file (default: temp)")
    args = parser.parse_args()

    config = load_config(instrument="LSSTCam")
    instrument, t_instrument = _timed(Instrument.from_config, config)
    exposures = make_exposures(
        instrument,
        start="2026-03-01T03:00:00",
        seq_num=1,
        ra=53.1,
        dec=-28.1,
        rotation_deg=10.0,
        physical_filter="r_57",
        n_snaps=2,
    )
    raw, t_cold = _timed(simulate_raw, instrument, args.detector, exposures[0], seed=1)
    raw2, t_warm = _timed(simulate_raw, instrument, args.detector, exposures[1], seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        _, t_write = _timed(raw.write, out / "raw.fits")
        _, t_write_fz = _timed(raw.write, out / "raw.fz")
        sizes = {p.suffix: p.stat().st_size for p in (out / "raw.fits", out / "raw.fz")}

    skymap = RingsSkyMap.from_config(config)
    region = instrument.detector_region(args.detector, 53.1, -28.1, 10.0, padding_arcsec=50.0)
    patch = skymap.patches_overlapping(region)[0]
    template, t_template_cold = _timed(make_template, skymap, patch, "r", seed=1)
    _, t_template_warm = _timed(make_template, skymap, patch, "g", seed=1)

    print(
        json.dumps(
            {
                "instrument": instrument.name,
                "detector": instrument.detector(args.detector).name,
                "raw_shape_per_amp": list(instrument.geometry.raw_amp_shape),
                "n_amps": len(instrument.geometry.amplifiers),
                "stars_drawn": len(raw.stars),
                "galaxies_drawn": len(raw.galaxies),
                "injected": len(raw.truth),
                "instrument_from_config_s": t_instrument,
                "simulate_raw_cold_s": t_cold,
                "simulate_raw_warm_s": t_warm,
                "write_fits_s": t_write,
                "write_fits_rice_s": t_write_fz,
                "fits_bytes": sizes[".fits"],
                "fits_rice_bytes": sizes[".fz"],
                "template_patch_shape": list(template.image.shape),
                "template_patch_cold_s": t_template_cold,
                "template_patch_warm_s": t_template_warm,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
