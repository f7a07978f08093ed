"""Cameras built from configuration: detectors, filters and predicted WCS.

`Instrument.from_config` reads the ``instrument``, ``focal_plane``,
``active_detectors``, ``detector``, ``filters`` and ``raw`` sections of the
merged config.

Coordinates
-----------
*Focal plane*: millimetres, origin on the optical axis, flat.  Rafts layout:
raft ``R{row}{col}`` is centred at ``((col-2), (row-2)) * raft_pitch_mm``,
sensor ``S{r}{c}`` at ``((c-1), (r-1)) * sensor_pitch_mm`` inside it; a camera of
one detector (LATISS's ``R00_S00``) sits on the optical axis.  Corner rafts
(``focal_plane.corner_rafts``, LSSTCam's R00, R04, R40, R44) hold the guiders
``SG0``/``SG1`` and the wavefront pair ``SW0``/``SW1``; they are numbered after the
science detectors in raft order, each raft ``SG0, SG1, SW0, SW1``, as Rubin's
obs_lsst numbers them (``R00_SG0`` = 189 ... ``R44_SW1`` = 204 for LSSTCam).  Their
positions inside the raft are approximate (`_CORNER_OFFSETS`) and they share the
science detectors' pixel geometry.  Grid layout: cell ``(col, row)`` is centred at
``(col - (columns-1)/2) * pitch_x_mm, (row - (rows-1)/2) * pitch_y_mm``.

*Detector pixels*: 0-based ``(x, y)`` of the assembled image, pixel centres
at integers; pixel ``(x, y)`` sits at focal-plane position ``center_mm +
R(orientation) @ ((x - (nx-1)/2), (y - (ny-1)/2)) * pixel_size``.

*Sky*: the focal plane is a gnomonic (TAN) projection around the boresight
with plate scale ``pixel_scale_arcsec / pixel_size_um`` arcsec per micron.
The rotation angle (``ROTPA``, next_visit ``cameraAngle`` in the SKY system)
is the position angle of the focal-plane +y axis, measured from North
through East; at 0 North is +y and East is -x.  Each detector's WCS is then
exactly TAN with CRVAL at the boresight.
"""

from __future__ import annotations

__all__ = [
    "instrument_for_run",
    "Detector",
    "Instrument",
    "sky_to_vectors",
    "polygon_from_sky",
    "bounding_circle",
]

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lsst.sphgeom as sphgeom
import numpy as np
from astropy.wcs import WCS

from workflow.core.amplifiers import DetectorGeometry
from workflow.core.exceptions import ConfigError

_log = logging.getLogger(__name__)

_LSST_SENSORS = ("S00", "S01", "S02", "S10", "S11", "S12", "S20", "S21", "S22")
_CORNER_SENSORS = ("SG0", "SG1", "SW0", "SW1")
# Corner-sensor centres inside their raft, in sensor pitches (approximate, non-overlapping).
_CORNER_OFFSETS = {"SG0": (-1.0, 1.0), "SG1": (1.0, -1.0), "SW0": (-0.5, -0.5), "SW1": (0.5, 0.5)}
_CORNER_PURPOSE = {"SG0": "GUIDER", "SG1": "GUIDER", "SW0": "WAVEFRONT", "SW1": "WAVEFRONT"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Detector:
    """One detector of the focal plane.

    Attributes
    ----------
    id : `int`
        Detector number (Butler ``detector`` dimension).
    name : `str`
        ``R##_S##`` for raft cameras, ``"042"``-style for grid cameras.
    raft, sensor : `str` or `None`
        Raft and sensor slot (raft cameras only).
    center_mm : `tuple` [`float`, `float`]
        Focal-plane position of the detector centre.
    orientation_deg : `float`
        Rotation of the detector axes relative to the focal-plane axes.
    active : `bool`
        Whether prompt processing runs on it.
    purpose : `str`
        ``SCIENCE``, ``GUIDER`` or ``WAVEFRONT`` (Butler ``detector.purpose``).
    """

    id: int
    name: str
    raft: str | None
    sensor: str | None
    center_mm: tuple[float, float]
    orientation_deg: float
    active: bool
    purpose: str = "SCIENCE"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Instrument:
    """A camera: detectors, pixel geometry, filters and raw conventions.

    Build it with `Instrument.from_config`.

    Attributes
    ----------
    name : `str`
        Instrument name, e.g. ``"LSSTCam"``.
    camera_style : `str`
        ``"lsst"`` or ``"generic"``.
    obs_id_prefix, controller : `str` or `None`
        LSST-style obs id parts.
    pixel_scale_arcsec : `float`
        Pixel scale on the sky.
    geometry : `DetectorGeometry`
        Pixel and amplifier geometry shared by all detectors.
    detectors : `tuple` [`Detector`, ...]
        All detectors, ordered by id.
    filters : `dict` [`str`, `str`]
        Physical filter to band.
    snaps_per_visit : `int`
        Snaps per visit.
    sidecar : `bool`
        Whether raws come with a JSON sidecar.
    """

    name: str
    camera_style: str
    obs_id_prefix: str | None
    controller: str | None
    pixel_scale_arcsec: float
    geometry: DetectorGeometry
    detectors: tuple[Detector, ...]
    filters: Mapping[str, str]
    snaps_per_visit: int = 1
    sidecar: bool = False

    def __hash__(self) -> int:
        return hash((self.name, self.geometry.scale, self.pixel_scale_arcsec, len(self.detectors)))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, scale: float = 1.0) -> Instrument:
        """Build an instrument from the merged configuration.

        Parameters
        ----------
        config : `~collections.abc.Mapping`
            Merged config (`workflow.core.config.load_config`).
        scale : `float`, optional
            Pixel-size shrink factor for tests (`DetectorGeometry.from_config`).
            Detector positions in mm and the pixel scale are unchanged, so a
            scaled detector sees a smaller patch of sky at the same place.

        Returns
        -------
        instrument : `Instrument`

        Raises
        ------
        ConfigError
            If a section is inconsistent (e.g. an override names an unknown
            detector).
        """
        inst = config["instrument"]
        geometry = DetectorGeometry.from_config(config["detector"], scale=scale)
        layout = _layout_detectors(config["focal_plane"])
        active = _active_map(config["active_detectors"], [d["id"] for d in layout], inst["name"])
        detectors = tuple(Detector(active=active[d["id"]], orientation_deg=0.0, **d) for d in layout)
        raw = config.get("raw", {})
        return cls(
            name=inst["name"],
            camera_style=inst["camera_style"],
            obs_id_prefix=inst.get("obs_id_prefix"),
            controller=inst.get("controller"),
            pixel_scale_arcsec=float(inst["pixel_scale_arcsec"]),
            geometry=geometry,
            detectors=detectors,
            filters={f["physical_filter"]: f["band"] for f in config["filters"]},
            snaps_per_visit=int(raw.get("snaps_per_visit", 1)),
            sidecar=bool(raw.get("sidecar", False)),
        )

    # -- lookups -----------------------------------------------------------

    def detector(self, key: int | str | Detector) -> Detector:
        """Return a detector by id, name or itself.

        Raises
        ------
        KeyError
            If the instrument has no such detector.
        """
        if isinstance(key, Detector):
            return key
        for det in self.detectors:
            if det.id == key or det.name == key:
                return det
        raise KeyError(f"{self.name}: no detector {key!r} (ids 0..{len(self.detectors) - 1})")

    def active_detectors(self) -> list[Detector]:
        """Return the detectors prompt processing runs on."""
        return [d for d in self.detectors if d.active]

    def band(self, physical_filter: str) -> str:
        """Return the band of a physical filter.

        Raises
        ------
        KeyError
            If the filter is unknown; the message lists the known ones.
        """
        try:
            return self.filters[physical_filter]
        except KeyError:
            raise KeyError(
                f"{self.name}: unknown physical filter {physical_filter!r}; expected one of {list(self.filters)}"
            ) from None

    @property
    def plate_scale_arcsec_per_mm(self) -> float:
        """Sky angle per focal-plane millimetre."""
        return self.pixel_scale_arcsec / self.geometry.pixel_size_um * 1000.0

    # -- focal plane <-> pixels <-> sky ------------------------------------

    def pixel_to_focal_plane(self, detector: int | str | Detector, x: Any, y: Any) -> tuple[Any, Any]:
        """Convert detector pixel coordinates to focal-plane millimetres.

        Parameters
        ----------
        detector : `int`, `str` or `Detector`
            Detector id or name.
        x, y : `float` or `numpy.ndarray`
            0-based pixel coordinates of the assembled image (broadcastable).

        Returns
        -------
        u, v : `numpy.ndarray`
            Focal-plane position in mm.
        """
        det = self.detector(detector)
        geom = self.geometry
        pix_mm = geom.pixel_size_um / 1000.0
        dx = (np.asarray(x, dtype=float) - (geom.nx - 1) / 2.0) * pix_mm
        dy = (np.asarray(y, dtype=float) - (geom.ny - 1) / 2.0) * pix_mm
        c, s = _cos_sin(det.orientation_deg)
        return det.center_mm[0] + c * dx - s * dy, det.center_mm[1] + s * dx + c * dy

    def focal_plane_to_pixel(self, detector: int | str | Detector, u: Any, v: Any) -> tuple[Any, Any]:
        """Convert focal-plane millimetres to detector pixel coordinates.

        The inverse of `pixel_to_focal_plane`; positions off the detector
        give pixel coordinates outside ``[0, nx) x [0, ny)``.
        """
        det = self.detector(detector)
        geom = self.geometry
        pix_mm = geom.pixel_size_um / 1000.0
        du = np.asarray(u, dtype=float) - det.center_mm[0]
        dv = np.asarray(v, dtype=float) - det.center_mm[1]
        c, s = _cos_sin(det.orientation_deg)
        x = (c * du + s * dv) / pix_mm + (geom.nx - 1) / 2.0
        y = (-s * du + c * dv) / pix_mm + (geom.ny - 1) / 2.0
        return x, y

    def detector_wcs(self, detector: int | str | Detector, ra: float, dec: float, rotation_deg: float) -> WCS:
        """Predict the TAN WCS of one detector for a pointing.

        Parameters
        ----------
        detector : `int`, `str` or `Detector`
            Detector id or name.
        ra, dec : `float`
            Boresight in degrees (ICRS).
        rotation_deg : `float`
            Sky rotation angle (see the module docstring).

        Returns
        -------
        wcs : `astropy.wcs.WCS`
            Maps 0-based assembled-image pixels to ICRS.
        """
        det = self.detector(detector)
        x0, y0 = self.focal_plane_to_pixel(det, 0.0, 0.0)
        scale_deg = self.pixel_scale_arcsec / 3600.0
        rot, par = _cos_sin(rotation_deg)
        sky_from_fp = np.array([[-rot, par], [par, rot]])
        c, s = _cos_sin(det.orientation_deg)
        fp_from_pix = np.array([[c, -s], [s, c]])
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval = [float(ra) % 360.0, float(dec)]
        wcs.wcs.crpix = [float(x0) + 1.0, float(y0) + 1.0]
        wcs.wcs.cd = scale_deg * sky_from_fp @ fp_from_pix
        wcs.wcs.radesys = "ICRS"
        wcs.pixel_shape = (self.geometry.nx, self.geometry.ny)
        return wcs

    def detector_corners(
        self,
        detector: int | str | Detector,
        ra: float,
        dec: float,
        rotation_deg: float,
        *,
        padding_arcsec: float = 0.0,
    ) -> np.ndarray:
        """Return the sky corners of a detector, counter-clockwise in pixels.

        Parameters
        ----------
        detector, ra, dec, rotation_deg
            As for `detector_wcs`.
        padding_arcsec : `float`, optional
            Grow the detector by this much on each side.

        Returns
        -------
        corners : `numpy.ndarray`
            Shape ``(4, 2)``: ``(ra, dec)`` degrees of the pixel-box corners
            (outer pixel edges) in the order (0,0), (nx,0), (nx,ny), (0,ny).
        """
        wcs = self.detector_wcs(detector, ra, dec, rotation_deg)
        pad = padding_arcsec / self.pixel_scale_arcsec
        lo_x, lo_y = -0.5 - pad, -0.5 - pad
        hi_x, hi_y = self.geometry.nx - 0.5 + pad, self.geometry.ny - 0.5 + pad
        xs = np.array([lo_x, hi_x, hi_x, lo_x])
        ys = np.array([lo_y, lo_y, hi_y, hi_y])
        return np.column_stack(wcs.all_pix2world(xs, ys, 0))

    def detector_region(
        self,
        detector: int | str | Detector,
        ra: float,
        dec: float,
        rotation_deg: float,
        *,
        padding_arcsec: float = 0.0,
    ) -> sphgeom.ConvexPolygon:
        """Return a detector's sky footprint as a `lsst.sphgeom.ConvexPolygon`.

        Parameters are as for `detector_corners`; use ``padding_arcsec`` for
        preload queries (Rubin pads by 50 arcsec).
        """
        corners = self.detector_corners(detector, ra, dec, rotation_deg, padding_arcsec=padding_arcsec)
        return polygon_from_sky(corners[:, 0], corners[:, 1])

    def visit_region(
        self,
        ra: float,
        dec: float,
        rotation_deg: float,
        *,
        padding_arcsec: float = 0.0,
        detectors: Iterable[int | str | Detector] | None = None,
    ) -> sphgeom.ConvexPolygon:
        """Return the convex hull of several detectors' footprints.

        Parameters
        ----------
        ra, dec, rotation_deg : `float`
            Pointing (see `detector_wcs`).
        padding_arcsec : `float`, optional
            Growth of each detector.
        detectors : iterable, optional
            Detectors to include; default all active ones.

        Returns
        -------
        region : `lsst.sphgeom.ConvexPolygon`
        """
        dets = self.active_detectors() if detectors is None else [self.detector(d) for d in detectors]
        corners = np.concatenate(
            [self.detector_corners(d, ra, dec, rotation_deg, padding_arcsec=padding_arcsec) for d in dets]
        )
        return polygon_from_sky(corners[:, 0], corners[:, 1])


def _cos_sin(angle_deg: float) -> tuple[float, float]:
    rad = math.radians(angle_deg)
    return math.cos(rad), math.sin(rad)


def _layout_detectors(focal_plane: Mapping[str, Any]) -> list[dict[str, Any]]:
    if focal_plane["layout"] == "rafts":
        return _layout_rafts(focal_plane)
    if focal_plane["layout"] == "grid":
        return _layout_grid(focal_plane)
    raise ConfigError(f"focal_plane.layout: expected 'rafts' or 'grid', got {focal_plane['layout']!r}")


def _layout_rafts(focal_plane: Mapping[str, Any]) -> list[dict[str, Any]]:
    raft_pitch = float(focal_plane["raft_pitch_mm"])
    sensor_pitch = float(focal_plane["sensor_pitch_mm"])
    sensors = sorted(focal_plane["sensors"], key=_LSST_SENSORS.index)
    out: list[dict[str, Any]] = []

    def add(raft: str, sensor: str, offset: tuple[float, float], purpose: str) -> None:
        u = (int(raft[2]) - 2) * raft_pitch + offset[0] * sensor_pitch
        v = (int(raft[1]) - 2) * raft_pitch + offset[1] * sensor_pitch
        name = f"{raft}_{sensor}"
        out.append(
            {"id": len(out), "name": name, "raft": raft, "sensor": sensor, "center_mm": (u, v), "purpose": purpose}
        )

    for raft in focal_plane["rafts"]:
        for sensor in sensors:
            add(raft, sensor, (int(sensor[2]) - 1.0, int(sensor[1]) - 1.0), "SCIENCE")
    if len(out) == 1:  # a one-CCD camera (LATISS): its detector is on the optical axis
        out[0]["center_mm"] = (0.0, 0.0)
    corner_sensors = sorted(focal_plane.get("corner_sensors", []), key=_CORNER_SENSORS.index)
    for raft in focal_plane.get("corner_rafts", []):
        for sensor in corner_sensors:
            add(raft, sensor, _CORNER_OFFSETS[sensor], _CORNER_PURPOSE[sensor])
    return out


def _layout_grid(focal_plane: Mapping[str, Any]) -> list[dict[str, Any]]:
    cols, rows = int(focal_plane["columns"]), int(focal_plane["rows"])
    pitch_x, pitch_y = float(focal_plane["pitch_x_mm"]), float(focal_plane["pitch_y_mm"])
    skip = {tuple(cell) for cell in focal_plane.get("skip", [])}
    out: list[dict[str, Any]] = []
    for row in range(rows):
        for col in range(cols):
            if (col, row) in skip:
                continue
            center = ((col - (cols - 1) / 2.0) * pitch_x, (row - (rows - 1) / 2.0) * pitch_y)
            out.append({"id": len(out), "name": f"{len(out):03d}", "raft": None, "sensor": None, "center_mm": center})
    return out


def _active_map(section: Mapping[str, Any], ids: Sequence[int], instrument: str) -> dict[int, bool]:
    active = {i: bool(section["default"]) for i in ids}
    for key, value in section.get("overrides", {}).items():
        det = int(key)
        if det not in active:
            raise ConfigError(
                f"{instrument}: active_detectors.overrides names detector {det}, expected an id in 0..{len(ids) - 1}"
            )
        active[det] = bool(value)
    return active


def sky_to_vectors(ra: Any, dec: Any) -> list[sphgeom.UnitVector3d]:
    """Convert degrees to a list of `lsst.sphgeom.UnitVector3d`."""
    return [
        sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(a), float(d)))
        for a, d in zip(np.atleast_1d(ra), np.atleast_1d(dec), strict=True)
    ]


def polygon_from_sky(ra: Any, dec: Any) -> sphgeom.ConvexPolygon:
    """Return the convex hull of sky points (degrees) as a ConvexPolygon."""
    return sphgeom.ConvexPolygon.convexHull(sky_to_vectors(ra, dec))


def bounding_circle(region: sphgeom.Region, padding_arcsec: float = 0.0) -> sphgeom.Circle:
    """Return a region's bounding circle, optionally dilated.

    Parameters
    ----------
    region : `lsst.sphgeom.Region`
        Any sphgeom region (e.g. `Instrument.detector_region`).
    padding_arcsec : `float`, optional
        Extra radius.

    Returns
    -------
    circle : `lsst.sphgeom.Circle`
    """
    circle = region.getBoundingCircle()
    if padding_arcsec:
        circle = circle.dilatedBy(sphgeom.Angle.fromDegrees(padding_arcsec / 3600.0))
    return circle


@functools.cache
def _instrument_cached(name: str, frozen: str, scale: float) -> Instrument:
    return Instrument.from_config(json.loads(frozen), scale=scale)


def instrument_for_run(config: Mapping[str, Any]) -> Instrument:
    """Return the configured instrument at the run's simulation scale (cached)."""
    sections = {k: config[k] for k in ("instrument", "detector", "focal_plane", "active_detectors", "filters", "raw")}
    return _instrument_cached(
        config["instrument"]["name"],
        json.dumps(_str_keys(sections), sort_keys=True),
        float(config["simulation"]["scale"]),
    )


def _str_keys(value: Any) -> Any:
    """``value`` with every mapping key a string, as JSON has them.

    A YAML file's ``overrides: {189: false}`` has integer keys and a JSON or
    command-line layer ``{"0": true}`` string keys; merged, they cannot be sorted.
    """
    if isinstance(value, Mapping):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_keys(v) for v in value]
    return value
