"""The demo central repository: plan it, simulate its data, build it.

`plan_demo` decides what an instrument's demo holds, `DemoSources` where its data
come from (the simulator by default), and `build_demo_repo` stores it all with
`workflow.repo.butler_ingest`.  The CLI is ``scripts/make_central_repo.py``.
"""

from __future__ import annotations

__all__ = [
    "DEMO_FIELD",
    "DEMO_START",
    "DemoPlan",
    "plan_demo",
    "DemoSources",
    "simulated_calibs",
    "simulated_refcat_shard",
    "simulated_template",
    "simulated_raw",
    "build_demo_repo",
]

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import astropy.time
import lsst.sphgeom as sphgeom
import numpy as np
from astropy.io import fits
from lsst.daf.butler import Butler

from workflow.core.exposure_info import ExposureInfo
from workflow.repo.butler_ingest import (
    CalibInput,
    Source,
    define_defaults_chain,
    ingest_calibs,
    ingest_exposure_raws,
    ingest_refcat_shards,
    ingest_templates,
)
from workflow.repo.central_repo import count_datasets, create_central_repo, register_instrument, register_skymap
from workflow.repo.queries import shard_ids_for

if TYPE_CHECKING:
    from astropy.table import Table

    from workflow.core.instrument import Detector, Instrument
    from workflow.core.skymap import PatchInfo, RingsSkyMap

_log = logging.getLogger(__name__)

DEMO_FIELD = (150.1, 2.2)
"""Centre (ICRS degrees) of the simulated demo field (COSMOS-like)."""
DEMO_START = "2025-01-10T03:00:00"
"""TAI start of the first past visit of the demo."""
_DEMO_DITHER_ARCSEC = 10.0
_DEMO_CADENCE_S = 40.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoPlan:
    """What the demo repository holds for one instrument.

    Attributes
    ----------
    config : `dict`
        Merged instrument config.
    scale, seed : `float`, `int`
        Detector shrink factor and universe seed of the simulation.
    instrument : `workflow.core.instrument.Instrument`
        The (scaled) camera.
    skymap : `workflow.core.skymap.RingsSkyMap`
        Its sky map.
    detectors : `list` [`workflow.core.instrument.Detector`]
        Detectors that get raws and templates.
    exposures : `list` [`workflow.sim.exposures.ExposureInfo`]
        Past visits (one snap each) to simulate raws for.
    region : `lsst.sphgeom.ConvexPolygon`
        Sky the refcat shards cover: the focal plane at the field centre, at
        any rotation, plus dithers and the preload padding.
    footprints : `list` [`lsst.sphgeom.ConvexPolygon`]
        Every planned detector-visit footprint grown by the preload padding:
        the sky templates cover (scaled detectors leave gaps between them).
    shards : `list` [`int`]
        Refcat shards (htm7) over ``region``.
    templates : `list` [`tuple`]
        ``(patch, band, footprints on the patch)`` for every patch that a
        footprint overlaps, in each band of the visits.
    """

    config: dict[str, Any]
    scale: float
    seed: int
    instrument: Instrument
    skymap: RingsSkyMap
    detectors: list[Detector]
    exposures: list[ExposureInfo]
    region: sphgeom.ConvexPolygon
    footprints: list[sphgeom.ConvexPolygon]
    shards: list[int]
    templates: list[tuple[PatchInfo, str, list[sphgeom.ConvexPolygon]]]


def _demo_filters(instrument: Instrument) -> list[str]:
    """Return one physical filter per band among r, i, g (in that order), else the first filters."""
    chosen = [
        next(pf for pf, b in instrument.filters.items() if b == band)
        for band in ("r", "i", "g")
        if band in instrument.filters.values()
    ]
    return chosen or list(instrument.filters)[:3]


def _circle_polygon(ra: float, dec: float, radius_deg: float, n: int = 24) -> sphgeom.ConvexPolygon:
    """Return a polygon circumscribing a circle (Circle.isDisjointFrom(ConvexPolygon) is unsupported)."""
    from workflow.core.instrument import polygon_from_sky

    angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    radius = math.radians(radius_deg / math.cos(math.pi / n))
    ras = ra + np.degrees(np.arctan2(radius * np.cos(angles), math.cos(math.radians(dec))))
    return polygon_from_sky(ras, dec + np.degrees(radius * np.sin(angles)))


def plan_demo(
    name: str,
    *,
    n_visits: int = 3,
    scale: float | None = None,
    seed: int | None = None,
    n_detectors: int = 9,
    field: tuple[float, float] = DEMO_FIELD,
    start: str = DEMO_START,
) -> DemoPlan:
    """Plan the demo content of one instrument: dithered visits over one field.

    Visits step ``_DEMO_DITHER_ARCSEC`` around ``field`` on a 3x3 pattern at
    rotation 0 and cycle through the r, i and g filters.  Raws and templates
    are made for the ``n_detectors`` detectors nearest the boresight (0: all);
    calibs for every detector, refcats for the whole focal plane, so other
    detectors can still run the template-free fallback pipelines.  Padding
    is ``apdb.preload_padding_arcsec`` of the instrument config; ``scale``
    and ``seed`` default to its ``simulation`` section, which the processing
    of these raws uses too.

    Raises
    ------
    ConfigError
        If the instrument is unknown.
    """
    from workflow.core.config import load_config
    from workflow.core.instrument import Instrument
    from workflow.core.skymap import RingsSkyMap
    from workflow.sim.exposures import make_exposures

    config = load_config(instrument=name)
    simulation = config.get("simulation", {})
    scale = float(simulation.get("scale", 1.0) if scale is None else scale)
    seed = int(simulation.get("seed", 0) if seed is None else seed)
    instrument = Instrument.from_config(config, scale=scale)
    detectors = sorted(instrument.detectors, key=lambda d: (math.hypot(*d.center_mm), d.id))
    detectors = sorted(detectors[:n_detectors] if n_detectors > 0 else detectors, key=lambda d: d.id)
    filters = _demo_filters(instrument)
    padding = float(config.get("apdb", {}).get("preload_padding_arcsec", 50.0))
    exposures: list[ExposureInfo] = []
    t0 = astropy.time.Time(start, scale="tai")
    for i in range(n_visits):
        dx, dy = (((i % 3) - 1) * _DEMO_DITHER_ARCSEC / 3600.0, ((i // 3) % 3 - 1) * _DEMO_DITHER_ARCSEC / 3600.0)
        exposures += make_exposures(
            instrument,
            start=t0 + astropy.time.TimeDelta(i * _DEMO_CADENCE_S, format="sec"),
            seq_num=i + 1,
            ra=field[0] + dx / max(math.cos(math.radians(field[1])), 1e-6),
            dec=field[1] + dy,
            rotation_deg=0.0,
            physical_filter=filters[i % len(filters)],
            n_snaps=1,
        )
    focal_plane = instrument.visit_region(*field, 0.0, detectors=instrument.detectors).getBoundingCircle()
    radius = focal_plane.getOpeningAngle().asDegrees() + (1.5 * _DEMO_DITHER_ARCSEC + padding) / 3600.0
    footprints = [
        instrument.detector_region(det, e.ra, e.dec, e.rotation_deg, padding_arcsec=padding)
        for e in exposures
        for det in detectors
    ]
    region, skymap = _circle_polygon(*field, radius), RingsSkyMap.from_config(config)
    bands = list(dict.fromkeys(instrument.band(e.physical_filter) for e in exposures))
    return DemoPlan(
        config=config,
        scale=scale,
        seed=seed,
        instrument=instrument,
        skymap=skymap,
        detectors=detectors,
        exposures=exposures,
        region=region,
        footprints=footprints,
        shards=shard_ids_for(region),
        templates=_template_keys(skymap, region, footprints, bands),
    )


def simulated_calibs(instrument: Instrument, seed: int = 0) -> list[CalibInput]:
    """Return lazy bias, defects and per-filter flat calibs of every detector (`workflow.sim.calibs`)."""
    from workflow.sim.calibs import DEFAULT_VALID_END, DEFAULT_VALID_START, make_bias, make_defects, make_flat

    begin, end = (astropy.time.Time(t, scale="tai") for t in (DEFAULT_VALID_START, DEFAULT_VALID_END))
    span = {"begin": begin, "end": end}
    out = []
    for det in instrument.detectors:
        out.append(
            CalibInput(
                dataset_type="bias",
                detector=det.id,
                **span,
                source=lambda d=det: make_bias(instrument, d, seed=seed).to_hdulist(),
            )
        )
        out.append(
            CalibInput(
                dataset_type="defects",
                detector=det.id,
                **span,
                source=lambda d=det: make_defects(instrument, d, seed=seed),
            )
        )
        out += [
            CalibInput(
                dataset_type="flat",
                detector=det.id,
                physical_filter=f,
                **span,
                source=lambda d=det, f=f: make_flat(instrument, d, f, seed=seed).to_hdulist(),
            )
            for f in instrument.filters
        ]
    return out


def simulated_template(
    skymap: RingsSkyMap, patch: PatchInfo, band: str, footprints: Sequence[sphgeom.ConvexPolygon], seed: int = 0
) -> fits.HDUList:
    """Render a patch's template over the bounding box of some footprints (`workflow.sim.templates`).

    Parameters
    ----------
    skymap : `workflow.core.skymap.RingsSkyMap`
        The sky map.
    patch : `workflow.core.skymap.PatchInfo`
        The patch.
    band : `str`
        Band.
    footprints : sequence of `lsst.sphgeom.ConvexPolygon`
        Padded detector footprints overlapping the patch; the image covers
        their bounding box within the patch's outer box.
    seed : `int`, optional
        Universe seed.

    Returns
    -------
    template : `astropy.io.fits.HDUList`
        Primary header (with ``BBOX_X0``/``BBOX_Y0``), IMAGE and VARIANCE.
    """
    from workflow.core.amplifiers import Box
    from workflow.sim.templates import make_template

    points = [sphgeom.LonLat(v) for poly in footprints for v in poly.getVertices()]
    ra = np.array([p.getLon().asDegrees() for p in points])
    dec = np.array([p.getLat().asDegrees() for p in points])
    x, y = patch.wcs.all_world2pix(ra, dec, 0)
    outer = patch.outer_bbox
    bbox = Box(
        max(outer.x0, outer.x0 + int(np.floor(x.min()))),
        max(outer.y0, outer.y0 + int(np.floor(y.min()))),
        min(outer.x1, outer.x0 + int(np.ceil(x.max())) + 1),
        min(outer.y1, outer.y0 + int(np.ceil(y.max())) + 1),
    )
    return make_template(skymap, patch, band, seed=seed, bbox=None if bbox.is_empty() else bbox).to_hdulist()


def simulated_raw(instrument: Instrument, detector: int, exposure: ExposureInfo, path: Path, seed: int = 0) -> Path:
    """Simulate one raw (`workflow.sim.simulate`) and write it to ``path`` (``.fz``: compressed)."""
    from workflow.sim.simulate import simulate_raw

    return simulate_raw(instrument, detector, exposure, seed=seed).write(path)


def simulated_refcat_shard(shard: int, seed: int = 0) -> Table:
    """Generate one refcat shard of the synthetic sky (`workflow.sim.refcat`)."""
    from workflow.sim.refcat import RefcatModel, make_shard

    return make_shard(shard, RefcatModel(seed=seed))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSources:
    """Where the demo repository's data come from; replace any to use other data.

    Attributes
    ----------
    calibs : callable
        ``(instrument, seed) -> list[CalibInput]``.
    refcat_shard : callable
        ``(htm7, seed) -> astropy.table.Table``.
    template : callable
        ``(skymap, patch, band, footprints, seed) -> astropy.io.fits.HDUList``.
    raw : callable
        ``(instrument, detector, exposure, path, seed) -> path`` of the written raw.
    """

    calibs: Callable[[Instrument, int], list[CalibInput]] = simulated_calibs
    refcat_shard: Callable[[int, int], Table] = simulated_refcat_shard
    template: Callable[..., fits.HDUList] = simulated_template
    raw: Callable[[Instrument, int, ExposureInfo, Path, int], Path] = simulated_raw


def _counting(items: list[Any], bar: Any) -> tuple[list[Any], Callable[[], None]]:
    """Wrap lazy sources so the progress bar moves when each is made; return (items, finish)."""
    made = [0]

    def wrap(source: Source) -> Source:
        if not callable(source):
            return source

        def call() -> Any:
            made[0] += 1
            bar.update(1)
            return source()

        return call

    def finish() -> None:
        bar.update(len(items) - made[0])

    return [wrap(item) for item in items], finish


def _build_instrument(
    butler: Butler, plan: DemoPlan, calibs: list[CalibInput], sources: DemoSources, work: Path, bar: Any
) -> dict[str, Any]:
    """Fill the repository for one instrument; return added counts and seconds per stage."""
    inst, skymap, name, seed = plan.instrument, plan.skymap, plan.instrument.name, plan.seed
    stats: dict[str, Any] = {}
    clock = time.perf_counter()

    def stage(label: str, added: int) -> None:
        nonlocal clock
        now = time.perf_counter()
        stats[label] = {"added": added, "seconds": round(now - clock, 3)}
        clock = now

    bar.set_description(f"{name}: dimensions")
    register_instrument(butler, inst)
    register_skymap(butler, skymap, skymap.tracts_overlapping(plan.region))
    stage("dimensions", 0)
    bar.set_description(f"{name}: calibs")
    wrapped, finish = _counting([c.source for c in calibs], bar)
    stage(
        "calibs",
        ingest_calibs(butler, name, [dataclasses.replace(c, source=w) for c, w in zip(calibs, wrapped, strict=True)]),
    )
    finish()
    bar.set_description(f"{name}: refcats")
    wrapped, finish = _counting([lambda i=i: sources.refcat_shard(i, seed) for i in plan.shards], bar)
    stage("refcats", ingest_refcat_shards(butler, dict(zip(plan.shards, wrapped, strict=False))))
    finish()
    bar.set_description(f"{name}: templates")
    wrapped, finish = _counting(
        [lambda p=p, b=b, f=f: sources.template(skymap, p, b, f, seed) for p, b, f in plan.templates], bar
    )
    stage(
        "templates",
        ingest_templates(
            butler,
            name,
            skymap.name,
            [(p.tract, p.id, b, w) for (p, b, _), w in zip(plan.templates, wrapped, strict=True)],
        ),
    )
    finish()
    bar.set_description(f"{name}: raws")
    suffix = ".fz" if str(plan.config.get("raw", {}).get("key_template", "")).endswith(".fz") else ".fits"

    def make_raw(info: ExposureInfo, det: int) -> Path:
        bar.update(1)
        return sources.raw(inst, det, info, work / name / f"{info.exposure_id}_{det:03d}{suffix}", seed)

    added = ingest_exposure_raws(
        butler, inst, plan.exposures, make_raw, detectors=[d.id for d in plan.detectors], transfer="move"
    )
    bar.update(len(plan.exposures) * len(plan.detectors) - added)
    stage("raws", added)
    define_defaults_chain(butler, name)
    return stats


def _template_keys(
    skymap: RingsSkyMap, region: sphgeom.ConvexPolygon, footprints: list[sphgeom.ConvexPolygon], bands: list[str]
) -> list[tuple[PatchInfo, str, list[sphgeom.ConvexPolygon]]]:
    """Return (patch, band, footprints on the patch) for every patch some footprint overlaps."""
    keys = []
    for patch in skymap.patches_overlapping(region, outer=True):
        outer = patch.polygon(outer=True)
        on_patch = [f for f in footprints if not outer.isDisjointFrom(f)]
        keys += [(patch, band, on_patch) for band in bands if on_patch]
    return keys


def build_demo_repo(
    root: str | Path,
    instruments: Sequence[str],
    *,
    registry_url: str | None = None,
    s3_root: str | None = None,
    registry_namespace: str | None = None,
    n_visits: int = 3,
    scale: float | None = None,
    n_detectors: int = 9,
    seed: int | None = None,
    sources: DemoSources | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Create (or complete) the demo central repository.

    For each instrument (see `plan_demo`): dimension records, the skymap
    tracts over the demo field, simulated calibs of every detector (bias,
    defects, flats of every filter), refcat shards over the focal plane, and
    for the ``n_detectors`` central detectors the templates and the raws of
    ``n_visits`` past visits.  A rerun adds nothing.

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        Repository directory (``butler.yaml``; SQLite and files by default).
    instruments : sequence of `str`
        Instrument names with a config file.
    registry_url, s3_root, registry_namespace : `str`, optional
        PostgreSQL registry and S3 datastore (see `workflow.repo.central_repo.create_central_repo`).
    n_visits : `int`, optional
        Past visits per instrument.
    scale : `float`, optional
        Detector shrink factor (`workflow.core.instrument.Instrument.from_config`);
        default ``simulation.scale`` of each instrument's config.
    n_detectors : `int`, optional
        Detectors nearest the boresight with raws and templates (0: all).
    seed : `int`, optional
        Universe seed of the simulated sky, calibs and raws; default
        ``simulation.seed``.
    sources : `DemoSources`, optional
        Data sources (default: the simulator).
    progress : `bool`, optional
        Show a tqdm progress bar on stderr.

    Returns
    -------
    report : `dict`
        ``seconds`` (total), ``stages`` (per instrument: added and seconds),
        ``datasets`` (counts per dataset type after the build).

    Raises
    ------
    ConfigError
        If an instrument is unknown.
    NonRetriableError
        If the repository cannot be created.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    sources = sources or DemoSources()
    plans = [
        plan_demo(name, n_visits=n_visits, scale=scale, seed=seed, n_detectors=n_detectors) for name in instruments
    ]
    butler = create_central_repo(
        root, registry_url=registry_url, datastore_s3=s3_root, registry_namespace=registry_namespace
    )
    calibs = [sources.calibs(plan.instrument, plan.seed) for plan in plans]
    total = sum(
        len(c) + len(p.shards) + len(p.templates) + len(p.exposures) * len(p.detectors)
        for p, c in zip(plans, calibs, strict=True)
    )
    stages = {}
    with (
        tempfile.TemporaryDirectory(prefix="central-repo-") as work,
        tqdm(total=total, disable=not progress, unit="dataset", dynamic_ncols=True) as bar,
    ):
        for plan, plan_calibs in zip(plans, calibs, strict=False):
            stages[plan.instrument.name] = _build_instrument(butler, plan, plan_calibs, sources, Path(work), bar)
    report = {
        "repo": str(root),
        "instruments": list(instruments),
        "n_visits": n_visits,
        "scale": {p.instrument.name: p.scale for p in plans},
        "seed": {p.instrument.name: p.seed for p in plans},
        "n_detectors": n_detectors,
        "seconds": round(time.perf_counter() - start, 3),
        "stages": stages,
        "datasets": count_datasets(butler),
    }
    _log.info("central repo %s built in %.1f s: %s", root, report["seconds"], report["datasets"])
    return report
