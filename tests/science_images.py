"""Synthetic images for the science-step tests and the benchmark.

Two sources.  `make_scene` and friends: stars are pixel-integrated circular
Gaussians drawn from a synthetic reference catalogue; images carry sky,
Poisson-like Gaussian noise and read noise; plain numpy/astropy, independent
of the project's simulator.  `simulate_detector_visit`: one detector-visit
from the project simulator (`workflow.sim.simulate`, `workflow.sim.templates`,
`workflow.sim.calibs`, `workflow.sim.refcat`) turned into `ProcessingInputs` by
`workflow.stages.pipeline.build_processing_inputs`, with its truth; `wcs_error_mas`
and `true_zero_point` compare results with that truth.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from scipy.special import erf

from workflow.science.isr import AmpGeometry, Box

ZP = 31.0
"""Default zero point: AB magnitude of one electron."""


def njy_per_count(zero_point: float) -> float:
    """Return nJy per count for an AB zero point."""
    return 10.0 ** (0.4 * (31.4 - zero_point))


def make_wcs(
    shape: tuple[int, int], ra: float = 150.0, dec: float = 2.0, scale: float = 0.2, rotation: float = 0.0
) -> WCS:
    """Return a TAN WCS centred on the image, ``scale`` arcsec/px, rotated ``rotation`` degrees."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0]
    c, s = np.cos(np.radians(rotation)), np.sin(np.radians(rotation))
    wcs.wcs.cd = scale / 3600.0 * np.array([[-c, s], [s, c]])
    wcs.array_shape = shape
    return wcs


def offset_wcs(wcs: WCS, dx_arcsec: float, dy_arcsec: float, rotation: float = 0.0) -> WCS:
    """Return a copy of ``wcs`` with its pointing moved and rotated (a pointing error)."""
    out = wcs.deepcopy()
    out.wcs.crval = [
        wcs.wcs.crval[0] + dx_arcsec / 3600.0 / np.cos(np.radians(wcs.wcs.crval[1])),
        wcs.wcs.crval[1] + dy_arcsec / 3600.0,
    ]
    c, s = np.cos(np.radians(rotation)), np.sin(np.radians(rotation))
    out.wcs.cd = np.array([[c, -s], [s, c]]) @ wcs.wcs.cd
    return out


def make_refcat(
    wcs: WCS,
    shape: tuple[int, int],
    density: float = 3e-4,
    mag_range: tuple[float, float] = (17.0, 23.5),
    seed: int = 1,
    band: str = "r",
) -> pd.DataFrame:
    """Return a catalogue of stars (``ra``, ``dec``, ``<band>_flux`` nJy) over the image plus 60 px."""
    rng = np.random.default_rng(seed)
    pad = 60
    n = rng.poisson(density * (shape[0] + 2 * pad) * (shape[1] + 2 * pad))
    x = rng.uniform(-pad, shape[1] + pad, n)
    y = rng.uniform(-pad, shape[0] + pad, n)
    # Number counts rising with magnitude (slope 0.3 dex/mag).
    lo, hi = 10 ** (0.3 * mag_range[0]), 10 ** (0.3 * mag_range[1])
    mag = np.log10(rng.uniform(lo, hi, n)) / 0.3
    ra, dec = wcs.all_pix2world(x, y, 0)
    flux = 10 ** (-0.4 * (mag - 31.4))
    return pd.DataFrame({"ra": ra, "dec": dec, f"{band}_flux": flux, f"{band}_fluxErr": 0.01 * flux})


def render(shape: tuple[int, int], x, y, flux, fwhm: float) -> np.ndarray:  # noqa: ANN001
    """Return an image of pixel-integrated circular Gaussians (total ``flux`` each)."""
    image = np.zeros(shape, dtype=np.float64)
    sigma = fwhm / 2.3548
    half = int(np.ceil(5 * sigma)) + 1
    for xi, yi, fi in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux), strict=False):
        ix, iy = int(np.rint(xi)), int(np.rint(yi))
        x0, x1 = max(ix - half, 0), min(ix + half + 1, shape[1])
        y0, y1 = max(iy - half, 0), min(iy + half + 1, shape[0])
        if x0 >= x1 or y0 >= y1:
            continue
        ex = np.diff(erf((np.arange(x0, x1 + 1) - 0.5 - xi) / (np.sqrt(2) * sigma))) / 2
        ey = np.diff(erf((np.arange(y0, y1 + 1) - 0.5 - yi) / (np.sqrt(2) * sigma))) / 2
        image[y0:y1, x0:x1] += fi * np.outer(ey, ex)
    return image


@dataclasses.dataclass
class SimImage:
    """A simulated image with its truth."""

    image: np.ndarray
    variance: np.ndarray
    model: np.ndarray
    wcs: WCS
    fwhm: float
    zero_point: float
    sky: float


def observe(
    refcat: pd.DataFrame,
    wcs: WCS,
    shape: tuple[int, int],
    *,
    fwhm: float = 3.5,
    sky: float = 1000.0,
    read_noise: float = 6.0,
    zero_point: float = ZP,
    seed: int = 2,
    band: str = "r",
    extra: tuple | None = None,
    noise_scale: float = 1.0,
) -> SimImage:
    """Render ``refcat`` through ``wcs`` with sky and noise, in electrons.

    ``extra`` = (x, y, flux_counts) adds point sources not in the catalogue.
    ``noise_scale`` < 1 gives a deeper (template-like) image.
    """
    x, y = wcs.all_world2pix(refcat["ra"].to_numpy(), refcat["dec"].to_numpy(), 0)
    counts = refcat[f"{band}_flux"].to_numpy() / njy_per_count(zero_point)
    model = render(shape, x, y, counts, fwhm)
    if extra is not None:
        model += render(shape, extra[0], extra[1], extra[2], fwhm)
    variance = (model + sky + read_noise**2) * noise_scale**2
    rng = np.random.default_rng(seed)
    image = model + sky + rng.standard_normal(shape) * np.sqrt(variance)
    return SimImage(image.astype(np.float32), variance.astype(np.float32), model, wcs, fwhm, zero_point, sky)


def make_raw(
    image_e: np.ndarray,
    columns: int = 2,
    rows: int = 2,
    *,
    prescan: int = 3,
    serial: int = 16,
    parallel: int = 8,
    gain: float = 1.6,
    read_noise: float = 6.0,
    bias_level: float = 2000.0,
    seed: int = 3,
) -> tuple[np.ndarray, list[AmpGeometry]]:
    """Split an electron image into one raw array with per-amp prescan/overscan.

    Each amplifier's bias drifts with row; top-row amps are stored flipped in y
    and right-half amps flipped in x, as read out from the far corner.
    """
    rng = np.random.default_rng(seed)
    ny, nx = image_e.shape
    ay, ax = ny // rows, nx // columns
    rw, rh = prescan + ax + serial, ay + parallel
    raw = np.zeros((rows * rh, columns * rw), dtype=np.float32)
    amps = []
    for r in range(rows):
        for c in range(columns):
            flip_x, flip_y = c >= columns / 2, r >= rows / 2
            data = image_e[r * ay : (r + 1) * ay, c * ax : (c + 1) * ax] / gain
            data = data[:, ::-1] if flip_x else data
            data = data[::-1, :] if flip_y else data
            ox, oy = c * rw, r * rh
            level = bias_level + 3.0 * r + 5.0 * np.sin(np.arange(rh) / 40.0 + c)
            block = np.repeat(level[:, None], rw, axis=1) + rng.standard_normal((rh, rw)) * read_noise / gain
            block[:ay, prescan : prescan + ax] += data
            raw[oy : oy + rh, ox : ox + rw] = block
            amps.append(
                AmpGeometry(
                    name=f"C{r}{c}",
                    data_box=Box(ox + prescan, oy, ox + prescan + ax, oy + ay),
                    serial_overscan_box=Box(ox + prescan + ax, oy, ox + rw, oy + ay),
                    parallel_overscan_box=Box(ox + prescan, oy + ay, ox + prescan + ax, oy + rh),
                    detector_box=Box(c * ax, r * ay, (c + 1) * ax, (r + 1) * ay),
                    flip_x=flip_x,
                    flip_y=flip_y,
                    gain=gain,
                    read_noise=read_noise,
                    saturation=bias_level + 1.0e5,
                )
            )
    return raw, amps


def random_positions(
    shape: tuple[int, int], n: int, border: int = 30, seed: int = 4, min_sep: float = 15.0
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n`` random positions ``border`` px inside the image, ``min_sep`` px apart."""
    rng = np.random.default_rng(seed)
    xy = np.zeros((0, 2))
    while len(xy) < n:
        cand = rng.uniform((border, border), (shape[1] - border, shape[0] - border))[None, :]
        if len(xy) == 0 or np.hypot(*(xy - cand).T).min() >= min_sep:
            xy = np.vstack([xy, cand])
    return xy[:, 0], xy[:, 1]


def psf_snr_flux(snr: np.ndarray, fwhm: float, noise_var: float) -> np.ndarray:
    """Return the counts giving PSF-fit S/N ``snr`` for a Gaussian PSF on flat noise."""
    sigma = fwhm / 2.3548
    return np.asarray(snr) * np.sqrt(noise_var * 4.0 * np.pi * sigma**2)


@dataclasses.dataclass
class ScenePair:
    """A science image, a template patch covering it, and their truth."""

    science: SimImage
    template: object
    refcat: pd.DataFrame
    wcs_guess: WCS
    injected: pd.DataFrame


def make_scene(
    shape: tuple[int, int] = (512, 512),
    *,
    science_fwhm: float = 3.5,
    template_fwhm: float = 2.5,
    inject_snr: np.ndarray | None = None,
    seed: int = 7,
    density: float = 3e-4,
    template_rotation: float = 0.4,
    band: str = "r",
) -> ScenePair:
    """Return a static scene seen by a science image and a deeper template patch.

    The template patch (nJy units, sky subtracted, 10x deeper) has its own WCS,
    shifted and rotated by ``template_rotation`` degrees and 40 px larger on each
    side.  ``inject_snr`` adds point sources at those PSF S/N to the science
    image only (truth in ``injected``, with ``x``, ``y``, ``flux_njy``).
    """
    from workflow.science.template_warp import TemplatePatch

    wcs = make_wcs(shape)
    refcat = make_refcat(wcs, shape, density=density, seed=seed, band=band)
    injected = pd.DataFrame({"x": [], "y": [], "flux_njy": [], "snr": []})
    extra = None
    if inject_snr is not None:
        x, y = random_positions(shape, len(inject_snr), seed=seed + 1)
        noise_var = 1000.0 + 36.0 + (0.3**2) * 1036.0
        counts = psf_snr_flux(inject_snr, science_fwhm, noise_var)
        injected = pd.DataFrame({"x": x, "y": y, "flux_njy": counts * njy_per_count(ZP), "snr": inject_snr})
        extra = (x, y, counts)
    science = observe(refcat, wcs, shape, fwhm=science_fwhm, seed=seed + 2, band=band, extra=extra)
    tshape = (shape[0] + 80, shape[1] + 80)
    twcs = make_wcs(tshape, rotation=template_rotation)
    twcs.wcs.crpix = twcs.wcs.crpix + np.array([0.37, -0.21])
    deep = observe(refcat, twcs, tshape, fwhm=template_fwhm, seed=seed + 3, band=band, noise_scale=0.3)
    unit = njy_per_count(ZP)
    template = TemplatePatch(
        image=(deep.image - deep.sky) * unit,
        variance=deep.variance * unit**2,
        wcs=twcs,
        zero_point=31.4,
        name="sim",
    )
    guess = offset_wcs(wcs, 6.0, -4.0, 0.05)
    return ScenePair(science, template, refcat, guess, injected)


@dataclasses.dataclass
class SimulatedVisit:
    """Science inputs of one simulated detector-visit and the simulator's truth."""

    inputs: object
    raw: object
    templates: list
    instrument: object
    seed: int
    band: str


def _template_box(patch, region):  # noqa: ANN001, ANN202
    """Tract-pixel box of ``patch`` covering a sky polygon (as `workflow.repo.central_repo.simulated_template`)."""
    import lsst.sphgeom as sphgeom

    from workflow.core.amplifiers import Box as TractBox

    points = [sphgeom.LonLat(v) for v in region.getVertices()]
    ra = np.array([p.getLon().asDegrees() for p in points])
    dec = np.array([p.getLat().asDegrees() for p in points])
    x, y = patch.wcs.all_world2pix(ra, dec, 0)
    outer = patch.outer_bbox
    return TractBox(
        max(outer.x0, outer.x0 + int(np.floor(x.min()))),
        max(outer.y0, outer.y0 + int(np.floor(y.min()))),
        min(outer.x1, outer.x0 + int(np.ceil(x.max())) + 1),
        min(outer.y1, outer.y0 + int(np.ceil(y.max())) + 1),
    )


def simulate_detector_visit(
    *,
    instrument: str = "LSSTComCamSim",
    scale: float = 0.125,
    detector: int = 4,
    seed: int = 1,
    sky=None,
    options=None,
    field: tuple[float, float] = (150.1, 2.2),
    rotation_deg: float = 0.0,
    physical_filter: str | None = None,
    start: str = "2025-02-01T03:00:00",
    templates: bool = True,
    refcat: bool = True,
    padding_arcsec: float = 20.0,
) -> SimulatedVisit:  # noqa: ANN001
    """Simulate raw, calibs, refcat and templates of one detector-visit (no Butler).

    ``sky`` (`workflow.sim.sky_model.SkyModel`) and ``options`` (`workflow.sim.simulate.SimOptions`)
    are passed to the simulator; templates are rendered from the same sky.
    """
    from workflow.core.config import load_config
    from workflow.core.instrument import Instrument
    from workflow.core.skymap import RingsSkyMap
    from workflow.sim.calibs import make_bias, make_defects, make_flat
    from workflow.sim.exposures import make_exposures
    from workflow.sim.refcat import load_refcat
    from workflow.sim.simulate import simulate_raw
    from workflow.sim.sky_model import SkyModel
    from workflow.sim.templates import make_template
    from workflow.stages.pipeline import build_processing_inputs, template_patch

    config = load_config(instrument=instrument)
    inst = Instrument.from_config(config, scale=scale)
    sky = sky or SkyModel(seed=seed)
    physical_filter = physical_filter or next(f for f, b in inst.filters.items() if b == "r")
    band = inst.band(physical_filter)
    exposure = make_exposures(
        inst,
        start=start,
        seq_num=1,
        ra=field[0],
        dec=field[1],
        rotation_deg=rotation_deg,
        physical_filter=physical_filter,
        n_snaps=1,
    )[0]
    raw = simulate_raw(inst, detector, exposure, seed=seed, sky=sky, options=options)
    region = inst.detector_region(detector, field[0], field[1], rotation_deg, padding_arcsec=padding_arcsec)
    made, patches = [], []
    if templates:
        skymap = RingsSkyMap.from_config(config)
        for patch in skymap.patches_overlapping(region):
            box = _template_box(patch, region)
            made.append(make_template(skymap, patch, band, seed=seed, sky=sky, bbox=box))
            patches.append(
                template_patch(
                    made[-1].image, made[-1].variance, made[-1].header, name=f"tract {patch.tract} patch {patch.id}"
                )
            )
    bias = make_bias(inst, detector, seed=seed)
    inputs = build_processing_inputs(
        [raw],
        inst.geometry,
        detector=detector,
        band=band,
        bias=bias.image,
        bias_unit=bias.header["BUNIT"],
        flat=make_flat(inst, detector, physical_filter, seed=seed).image,
        defects=make_defects(inst, detector, seed=seed),
        refcat=[load_refcat(region, model=sky.refcat_model())] if refcat else [],
        templates=patches,
    )
    return SimulatedVisit(inputs=inputs, raw=raw, templates=made, instrument=inst, seed=seed, band=band)


def wcs_error_mas(fitted: WCS, truth: WCS, shape: tuple[int, int], step: int = 32) -> float:
    """Return the rms sky offset (mas) between two WCSs over a grid of image pixels."""
    yy, xx = np.mgrid[0 : shape[0] : step, 0 : shape[1] : step]
    r1, d1 = truth.all_pix2world(xx.ravel(), yy.ravel(), 0)
    r2, d2 = fitted.all_pix2world(xx.ravel(), yy.ravel(), 0)
    dra = ((r1 - r2 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(d1))
    return float(np.sqrt(np.mean(dra**2 + (d1 - d2) ** 2)) * 3.6e6)


def true_zero_point(raw) -> float:  # noqa: ANN001
    """Return the AB magnitude of one post-ISR electron of a `workflow.sim.simulate.SimulatedRaw`."""
    return float(31.4 + 2.5 * np.log10(raw.truth.meta["e_per_nJy"]))
