"""Benchmark the alert-production science chain on 4096x4096 synthetic images.

Prints one JSON object: per-step seconds (one core), the ApPipe chain total
(median over runs), and quality measures: completeness versus injected PSF
S/N (logistic fit, 50 % point), false DiaSources per detector on a static
pair, forced-photometry flux pulls of the injections, and the astrometric
error of the fitted WCS against the true one.

Images come from ``tests/science_images.py`` (Gaussian PSF stars from a
synthetic reference catalogue) until the project simulator is plugged in.

Usage: ``python scripts/bench_science.py [--size 4096] [--runs 3] [--method alard_lupton]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import curve_fit  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from science_images import make_raw, make_scene  # noqa: E402

from workflow.calibrate import calibrate  # noqa: E402
from workflow.dia_sources import detect_dia_sources  # noqa: E402
from workflow.isr import run_isr  # noqa: E402
from workflow.photometry import psf_photometry  # noqa: E402
from workflow.subtract import subtract_images  # noqa: E402
from workflow.template_warp import warp_template  # noqa: E402


def _timed(times: dict[str, list[float]], name: str, func, *args, **kwargs):  # noqa: ANN001, ANN202
    start = time.perf_counter()
    result = func(*args, **kwargs)
    times.setdefault(name, []).append(time.perf_counter() - start)
    return result


def _wcs_error_mas(fitted, truth, shape: tuple[int, int]) -> float:  # noqa: ANN001
    yy, xx = np.mgrid[0 : shape[0] : 128, 0 : shape[1] : 128]
    r1, d1 = truth.all_pix2world(xx.ravel(), yy.ravel(), 0)
    r2, d2 = fitted.all_pix2world(xx.ravel(), yy.ravel(), 0)
    return float(np.sqrt(np.mean(((r1 - r2) * np.cos(np.radians(d1))) ** 2 + (d1 - d2) ** 2)) * 3.6e6)


def run_chain(shape, seed, snr, method, times):  # noqa: ANN001, ANN201
    """Simulate one detector-visit and run ISR -> DIA detection; return outputs and truth."""
    scene = make_scene(shape, inject_snr=snr, seed=seed)
    raw, amps = make_raw(scene.science.image, columns=8, rows=2, serial=64, parallel=48, bias_level=20000.0)
    start = time.perf_counter()
    post_isr = _timed(times, "isr", run_isr, [raw], amps)
    cal = _timed(times, "calibrate", calibrate, post_isr, scene.refcat, scene.wcs_guess, band="r")
    template = _timed(times, "warp_template", warp_template, [scene.template], cal.exposure.wcs, shape)
    sub = _timed(
        times, "subtract_images", subtract_images, cal.exposure, template, stars=cal.sources, method=method
    )
    dia = _timed(
        times, "detect_dia_sources", detect_dia_sources, sub.difference,
        visit=seed, detector=0, band="r", midpoint_mjd_tai=60000.0, science=cal.exposure,
    )  # fmt: skip
    times.setdefault("chain", []).append(time.perf_counter() - start)
    return scene, cal, sub.difference, dia


def _logistic(s, s50, width):  # noqa: ANN001, ANN202
    return 1.0 / (1.0 + np.exp(-(s - s50) / width))


def quality(results) -> dict:  # noqa: ANN001
    """Completeness fit, false positives, pulls and astrometry from the runs."""
    snr_all, found_all, pulls, false_inj, astro = [], [], [], [], []
    for scene, cal, diff, dia in results:
        inj = scene.injected
        truth_xy = inj[["x", "y"]].to_numpy()
        pos = dia[dia["snr"] > 0]
        dist = np.full(len(inj), np.inf)
        if len(pos):
            dist = cKDTree(pos[["x", "y"]].to_numpy()).query(truth_xy)[0]
        found = dist < 2.0
        snr_all.append(inj["snr"].to_numpy())
        found_all.append(found)
        near = cKDTree(truth_xy).query(dia[["x", "y"]].to_numpy())[0] if len(dia) else np.zeros(0)
        false_inj.append(int((near >= 2.0).sum()))
        x, y = inj["x"].to_numpy(), inj["y"].to_numpy()
        forced = psf_photometry(diff.image, diff.variance, diff.psf, x, y, mask=diff.mask)
        flux = forced["flux"].to_numpy() * diff.njy_per_count
        err = forced["flux_err"].to_numpy() * diff.njy_per_count
        pulls.append((flux - inj["flux_njy"].to_numpy()) / err)
        astro.append(_wcs_error_mas(cal.exposure.wcs, scene.science.wcs, diff.shape))
    snr, found, pull = np.concatenate(snr_all), np.concatenate(found_all), np.concatenate(pulls)
    (s50, width), _ = curve_fit(_logistic, snr, found.astype(float), p0=(5.0, 0.5))
    bins = np.arange(3, 21, 1.0)
    return {
        "completeness_s50": round(float(s50), 3),
        "completeness_width": round(float(width), 3),
        "completeness_by_snr": {
            f"{b:g}-{b + 1:g}": round(float(found[(snr >= b) & (snr < b + 1)].mean()), 3) for b in bins[:-1]
        },
        "false_per_detector_with_injections": float(np.mean(false_inj)),
        "flux_pull_mean": round(float(np.mean(pull)), 4),
        "flux_pull_width": round(float(np.std(pull)), 4),
        "astrometric_rms_vs_truth_mas": round(float(np.mean(astro)), 2),
        "astrometric_rms_vs_refcat_mas": round(float(np.mean([r[1].astrometry.rms_mas for r in results])), 2),
        "zero_point_error_mag": round(float(np.mean([r[1].exposure.zero_point - 31.0 for r in results])), 4),
    }


def main() -> None:
    """Run the benchmark and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--injections", type=int, default=400)
    parser.add_argument("--method", default="alard_lupton", choices=["alard_lupton", "zogy"])
    args = parser.parse_args()
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    shape = (args.size, args.size)
    times: dict[str, list[float]] = {}
    rng = np.random.default_rng(123)
    results = [
        run_chain(shape, 100 + run, rng.uniform(3.0, 20.0, args.injections), args.method, times)
        for run in range(args.runs)
    ]
    static_times: dict[str, list[float]] = {}
    static_false = [
        len(run_chain(shape, 200 + run, None, args.method, static_times)[3]) for run in range(args.runs)
    ]
    report = {
        "image": f"{args.size}x{args.size}",
        "method": args.method,
        "runs": args.runs,
        "seconds_median": {k: round(float(np.median(v)), 3) for k, v in times.items()},
        "chain_seconds_all": [round(t, 3) for t in times["chain"]],
        "false_per_detector_static": float(np.mean(static_false)),
        "false_static_all": static_false,
        **quality(results),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
