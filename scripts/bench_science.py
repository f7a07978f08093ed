"""Benchmark the alert-production science chain (ApPipe) on simulated full-size detectors.

Each detector-visit comes from the project simulator (`workflow.sim.simulate`
raws, `workflow.sim.calibs`, `workflow.sim.refcat`, `workflow.sim.templates`, assembled
by ``tests/science_images.simulate_detector_visit``) on a static sky (no
simulated variables or transients).  On "injection" detectors, point sources
drawn with the simulator's PSF are added to the raw amplifier segments (flat
pattern, photon noise, gain: as the simulator draws sources) at nominal PSF
S/N uniform in [3, 20]; "static" detectors get nothing, so every DiaSource
on them is false.

Prints one JSON object: per-step seconds (wall and CPU, one thread), the
ApPipe total, completeness versus the injections' S/N on the difference
image (binned, logistic fit, 50 % point), false DiaSources per static
detector, forced-photometry flux pulls at the injected positions, DiaSource
position errors, the fitted WCS against the true one and the zero point
against the truth.

Usage: ``python scripts/bench_science.py [--instrument LSSTComCamSim] [--injection-detectors 4]
[--static-detectors 4] [--injections 300] [--scale 1.0] [--method alard_lupton] [--poisson-sky]``

``--poisson-sky`` draws Poisson photon noise at every level (the simulator's default is
Gaussian above 30 e-, which hides the bias of mode-type sky estimates).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import curve_fit  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from science_images import simulate_detector_visit, true_zero_point, wcs_error_mas  # noqa: E402

from workflow.core.amplifiers import disassemble_image  # noqa: E402
from workflow.core.config import load_yaml  # noqa: E402
from workflow.science.masks import MaskPlane  # noqa: E402
from workflow.science.photometry import psf_photometry  # noqa: E402
from workflow.science.pipelines import run_pipelines  # noqa: E402
from workflow.sim.calibs import flat_pattern  # noqa: E402
from workflow.sim.render import add_point_sources  # noqa: E402
from workflow.sim.simulate import SimOptions  # noqa: E402
from workflow.sim.sky_model import SkyModel  # noqa: E402

_log = logging.getLogger("bench_science")

STEPS = ["isr", "calibrate", "warp_template", "subtract_images", "detect_dia_sources"]
UNUSABLE = int(MaskPlane.BAD | MaskPlane.SAT | MaskPlane.NO_DATA | MaskPlane.EDGE | MaskPlane.SUSPECT)
FIELD = (150.1, 2.2)


def _positions(
    shape: tuple[int, int], n: int, rng: np.random.Generator, border: int = 40, min_sep: float = 30.0
) -> np.ndarray:
    """Return up to ``n`` random positions ``(x, y)``, ``min_sep`` apart, ``border`` inside."""
    xy = rng.uniform((border, border), (shape[1] - border, shape[0] - border), size=(4 * n, 2))
    keep = [0]
    tree_points = [xy[0]]
    for i in range(1, len(xy)):
        if len(keep) == n:
            break
        if np.hypot(*(np.array(tree_points) - xy[i]).T).min() >= min_sep:
            keep.append(i)
            tree_points.append(xy[i])
    return xy[keep]


def inject(visit, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Add point sources at nominal PSF S/N 3-20 to the raw segments; return their truth (nJy)."""
    raw, geom = visit.raw, visit.instrument.geometry
    xy = _positions(geom.shape, n, rng)
    stamp = raw.psf.stamp(int(np.ceil(4 * raw.psf.fwhm)))
    noise = np.sqrt((raw.truth.meta["sky_e_per_pix"] + geom.read_noise**2) / (stamp**2).sum())
    snr = rng.uniform(3.0, 20.0, len(xy))
    electrons = np.zeros(geom.shape, np.float32)
    add_point_sources(electrons, xy[:, 0], xy[:, 1], snr * noise, raw.psf, threshold=0.01)
    electrons *= flat_pattern(visit.instrument, raw.detector, visit.band, visit.seed)
    electrons += rng.standard_normal(geom.shape, dtype=np.float32) * np.sqrt(np.maximum(electrons, 0.0))
    segments = disassemble_image(electrons / np.float32(geom.gain), geom, fill=0.0)
    snaps = visit.inputs.raws
    amps = geom.amplifiers
    snaps[0] = [np.rint(seg + segments[amp.name]).astype(np.int32) for seg, amp in zip(snaps[0], amps, strict=False)]
    flux = snr * noise / raw.truth.meta["e_per_nJy"]
    return {"x": xy[:, 0], "y": xy[:, 1], "flux": flux, "nominal_snr": snr}


def run_detector(args: argparse.Namespace, index: int, n_inject: int) -> dict:
    """Simulate one detector-visit, inject, run ApPipe; return its measurements."""
    seed = args.seed + index
    sky = SkyModel(seed=seed, variable_density_per_deg2=0.0, transient_density_per_deg2=0.0)
    detectors = args.detector_ids or [4]
    start = time.perf_counter()
    visit = simulate_detector_visit(
        instrument=args.instrument,
        scale=args.scale,
        detector=detectors[index % len(detectors)],
        seed=seed,
        sky=sky,
        field=(FIELD[0] + 0.05 * index, FIELD[1]),
        start=f"2025-02-{1 + index % 27:02d}T03:00:00",
        options=SimOptions(poisson_noise=args.poisson_sky),
    )
    truth = inject(visit, n_inject, np.random.default_rng(seed)) if n_inject else None
    simulated = time.perf_counter() - start
    visit.inputs.options = {"subtract_images": {"method": args.method}}
    run = run_pipelines(["ApPipe"], {"ApPipe": STEPS}, visit.inputs)
    calexp, diff, dia = run.outputs["calexp"], run.outputs["difference"], run.outputs["dia_sources"]
    out = {
        "seed": seed,
        "detector": visit.raw.detector.id,
        "simulate_s": round(simulated, 2),
        "seeing_arcsec": round(visit.raw.conditions.seeing_arcsec, 3),
        "subtraction_convolved": diff.metadata["SUBCONV"],
        "timings": {t.step: (t.wall_s, t.cpu_s) for t in run.timings},
        "wcs_error_mas": wcs_error_mas(calexp.wcs, visit.raw.true_wcs, calexp.shape),
        "zero_point_error_mag": calexp.zero_point - true_zero_point(visit.raw),
        "n_dia": len(dia),
        "n_dia_negative": int((dia["snr"] < 0).sum()),
        "blank_sky_mean_sigma": _blank_sky_mean(diff),
        "pixel_arcsec": visit.instrument.pixel_scale_arcsec,
    }
    if truth is not None:
        out |= _score_injections(truth, diff, dia)
    _log.info("detector %s: %s", index, {k: v for k, v in out.items() if np.isscalar(v)})
    return out


def _blank_sky_mean(diff) -> float:  # noqa: ANN001
    """Mean of the unmasked difference pixels within 5 sigma, in units of the median pixel noise.

    A scalar noise: dividing each pixel by its own (data-derived) variance would bias the
    mean negative.
    """
    noise = float(np.sqrt(np.median(diff.variance[::4, ::4])))
    values = diff.image[diff.mask == 0]
    values = values[np.abs(values) < 5.0 * noise]
    return float(np.mean(values)) / noise if values.size else float("nan")


def _score_injections(truth: dict, diff, dia) -> dict:  # noqa: ANN001
    """Match injections to positive DiaSources; forced photometry at the injected positions."""
    x, y = truth["x"], truth["y"]
    forced = psf_photometry(diff.image, diff.variance, diff.psf, x, y, mask=diff.mask)
    scale = diff.njy_per_count * float(diff.metadata.get("APCORR", 1.0))  # PSF-stamp to total flux
    flux, err = forced["flux"].to_numpy() * scale, forced["flux_err"].to_numpy() * scale
    usable = (diff.mask[np.rint(y).astype(int), np.rint(x).astype(int)] & UNUSABLE) == 0
    positive = dia[dia["snr"] > 0]
    dist, index = np.full(len(x), np.inf), np.zeros(len(x), int)
    if len(positive):
        dist, index = cKDTree(positive[["x", "y"]].to_numpy()).query(np.column_stack([x, y]))
    found = dist < 2.0
    near = cKDTree(np.column_stack([x, y])).query(dia[["x", "y"]].to_numpy())[0] if len(dia) else np.zeros(0)
    rows = positive.iloc[index[found]]
    return {
        "snr": truth["flux"] / err,
        "found": found,
        "usable": usable,
        "pull": (flux - truth["flux"]) / err,
        "offset_px": dist[found],
        "snr_found": (truth["flux"] / err)[found],
        "dia_pull": ((rows["psfFlux"] - truth["flux"][found]) / rows["psfFluxErr"]).to_numpy(),
        "false_with_injections": int((near > 2.0).sum()),
    }


def _logistic(s, s50, width):  # noqa: ANN001, ANN202
    return 1.0 / (1.0 + np.exp(-(s - s50) / width))


def _fraction(flags: np.ndarray) -> list:
    """Return ``[fraction true (None if empty), count]``."""
    return [round(float(flags.mean()), 3) if len(flags) else None, int(len(flags))]


def summarize(injected: list[dict], static: list[dict]) -> dict:
    """Aggregate completeness, pulls, astrometry, false counts and timings."""
    use = np.concatenate([r["usable"] for r in injected])
    snr = np.concatenate([r["snr"] for r in injected])[use]
    found = np.concatenate([r["found"] for r in injected])[use]
    pull = np.concatenate([r["pull"] for r in injected])[use]
    (s50, width), _ = curve_fit(_logistic, snr, found.astype(float), p0=(5.0, 0.5))
    bins = np.arange(3.0, 21.0, 1.0)
    offsets = np.concatenate([r["offset_px"][r["snr_found"] > 10] * r["pixel_arcsec"] for r in injected])
    dia_pull = np.concatenate([r["dia_pull"][r["snr_found"] > 10] for r in injected])
    everything = injected + static
    seconds = {}
    for step in STEPS + ["ApPipe"]:
        if step == "ApPipe":
            wall = [sum(r["timings"][s][0] for s in STEPS) for r in everything]
            cpu = [sum(r["timings"][s][1] for s in STEPS) for r in everything]
        else:
            wall = [r["timings"][step][0] for r in everything]
            cpu = [r["timings"][step][1] for r in everything]
        seconds[step] = {
            "wall_median": round(float(np.median(wall)), 2),
            "cpu_median": round(float(np.median(cpu)), 2),
            "cpu_max": round(float(np.max(cpu)), 2),
        }
    return {
        "completeness_s50": round(float(s50), 3),
        "completeness_width": round(float(width), 3),
        "completeness_by_snr": {f"{b:g}-{b + 1:g}": _fraction(found[(snr >= b) & (snr < b + 1)]) for b in bins[:-1]},
        "injections_used": int(use.sum()),
        "injections_masked_fraction": round(float(1.0 - use.mean()), 4),
        "false_per_static_detector": [r["n_dia"] for r in static],
        "false_per_static_detector_mean": float(np.mean([r["n_dia"] for r in static])) if static else None,
        "false_negative_per_static_detector": [r["n_dia_negative"] for r in static],
        "blank_sky_mean_sigma_static": [round(r["blank_sky_mean_sigma"], 4) for r in static],
        "false_per_injection_detector": [r["false_with_injections"] for r in injected],
        "forced_flux_pull_mean": round(float(np.mean(pull)), 4),
        "forced_flux_pull_width": round(float(np.std(pull)), 4),
        "forced_flux_pull_width_robust": round(float(1.4826 * np.median(np.abs(pull - np.median(pull)))), 4),
        "dia_flux_pull_snr_gt_10_mean": round(float(np.mean(dia_pull)), 4),
        "dia_flux_pull_snr_gt_10_width": round(float(np.std(dia_pull)), 4),
        "dia_position_rms_snr_gt_10_mas": round(float(np.sqrt(np.mean(offsets**2)) * 1000), 1),
        "wcs_error_vs_truth_mas": [round(r["wcs_error_mas"], 2) for r in everything],
        "zero_point_error_mag": [round(r["zero_point_error_mag"], 4) for r in everything],
        "seeing_arcsec": [r["seeing_arcsec"] for r in everything],
        "subtraction_convolved": [r["subtraction_convolved"] for r in everything],
        "seconds": seconds,
    }


def main() -> None:
    """Run the benchmark and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instrument", default="LSSTComCamSim", choices=["LSSTComCamSim", "LSSTCam"])
    parser.add_argument("--detector-ids", type=int, nargs="*", help="detectors to cycle through (default 4)")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--injection-detectors", type=int, default=4)
    parser.add_argument("--static-detectors", type=int, default=4)
    parser.add_argument("--injections", type=int, default=300)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--method", default="alard_lupton", choices=["alard_lupton", "zogy"])
    parser.add_argument("--poisson-sky", action="store_true", help="Poisson photon noise at every level")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    definitions = load_yaml(ROOT / "config" / "pipelines.yaml")["pipeline_definitions"]
    if definitions["ApPipe"] != STEPS:
        raise SystemExit(f"ApPipe is {definitions['ApPipe']}, the benchmark times {STEPS}")
    load_before = os.getloadavg()
    n_inj = args.injection_detectors
    injected = [run_detector(args, i, args.injections) for i in range(n_inj)]
    static = [run_detector(args, n_inj + i, 0) for i in range(args.static_detectors)]
    report = {
        "instrument": args.instrument,
        "scale": args.scale,
        "method": args.method,
        "injection_detectors": n_inj,
        "static_detectors": args.static_detectors,
        "poisson_sky": args.poisson_sky,
        **summarize(injected, static),
    }
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["process"] = {
        "cpu_user_s": round(usage.ru_utime, 2),
        "cpu_sys_s": round(usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1),
        "loadavg_start": [round(v, 2) for v in load_before],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
