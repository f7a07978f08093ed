"""A rings sky map of tracts and patches, from the ``skymap`` config section.

Layout (the same scheme as ``lsst.skymap.RingsSkyMap``, re-implemented):
the sky is cut into ``num_rings`` declination rings of height ``ring =
180 deg / (num_rings + 1)`` plus two polar caps of radius ``ring / 2``.
Tract 0 is the south cap, then the rings from south to north, each split
into ``int(360 cos(dec_nearest_equator) / ring) + 1`` tracts in RA (tract j of
a ring centred at ``ra = j * 360 / n``), and the last tract is the north cap.

Each tract has a TAN WCS centred on it (north up, east left) with
``pixel_scale_arcsec`` pixels; its pixel box covers its inner region plus
``tract_overlap_deg`` and is rounded up to whole patches of
``patch_inner_pixels``.  Patch ``(px, py)`` (sequential id ``py * nx +
px``) has the inner box ``[px*inner, (px+1)*inner) x [py*inner, ...)`` in
tract pixels, and the outer box grown by ``patch_border_pixels``; a patch
image is its outer box, with `PatchInfo.wcs`.
"""

from __future__ import annotations

__all__ = ["TractInfo", "PatchInfo", "RingsSkyMap"]

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import lsst.sphgeom as sphgeom
import numpy as np
from astropy.wcs import WCS

from workflow.core.amplifiers import Box
from workflow.core.instrument import polygon_from_sky

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TractInfo:
    """One tract.

    Attributes
    ----------
    id : `int`
        Tract number.
    ring : `int`
        Ring index; -1 for the south cap, ``num_rings`` for the north cap.
    ra, dec : `float`
        Centre (degrees).
    wcs : `astropy.wcs.WCS`
        Tract pixels (0-based) to sky.
    bbox : `Box`
        Tract pixel box, from (0, 0).
    num_patches : `tuple` [`int`, `int`]
        Patches along x and y.
    """

    id: int
    ring: int
    ra: float
    dec: float
    wcs: WCS
    bbox: Box
    num_patches: tuple[int, int]

    def polygon(self) -> sphgeom.ConvexPolygon:
        """Return the sky polygon of the tract's pixel box."""
        return _box_polygon(self.wcs, self.bbox)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchInfo:
    """One patch of one tract.

    Attributes
    ----------
    tract : `int`
        Tract number.
    index : `tuple` [`int`, `int`]
        ``(px, py)``.
    id : `int`
        Sequential patch number ``py * nx + px``.
    inner_bbox, outer_bbox : `Box`
        In tract pixels.
    wcs : `astropy.wcs.WCS`
        WCS of the patch image: pixel (0, 0) is the outer box's corner.
    """

    tract: int
    index: tuple[int, int]
    id: int
    inner_bbox: Box
    outer_bbox: Box
    wcs: WCS

    @property
    def shape(self) -> tuple[int, int]:
        """Numpy shape of the patch image (outer box)."""
        return self.outer_bbox.shape

    def polygon(self, outer: bool = False) -> sphgeom.ConvexPolygon:
        """Return the sky polygon of the inner (or outer) box."""
        box = self.outer_bbox if outer else self.inner_bbox
        return _box_polygon(self.wcs, _shift(box, -self.outer_bbox.x0, -self.outer_bbox.y0))


def _shift(box: Box, dx: int, dy: int) -> Box:
    return Box(box.x0 + dx, box.y0 + dy, box.x1 + dx, box.y1 + dy)


def _box_polygon(wcs: WCS, box: Box) -> sphgeom.ConvexPolygon:
    xs = np.array([box.x0, box.x1, box.x1, box.x0], dtype=float) - 0.5
    ys = np.array([box.y0, box.y0, box.y1, box.y1], dtype=float) - 0.5
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    return polygon_from_sky(ra, dec)


def _tan_wcs(ra: float, dec: float, scale_deg: float, crpix: tuple[float, float]) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra % 360.0, dec]
    wcs.wcs.crpix = list(crpix)
    wcs.wcs.cd = np.array([[-scale_deg, 0.0], [0.0, scale_deg]])
    wcs.wcs.radesys = "ICRS"
    return wcs


class RingsSkyMap:
    """The rings sky map (see the module docstring).

    Parameters
    ----------
    name : `str`
        Sky map name.
    num_rings : `int`
        Declination rings.
    patch_inner_pixels, patch_border_pixels : `int`
        Patch sizes.
    pixel_scale_arcsec : `float`
        Pixel scale.
    tract_overlap_deg : `float`
        Tract overlap.
    """

    def __init__(
        self,
        *,
        name: str,
        num_rings: int,
        patch_inner_pixels: int,
        patch_border_pixels: int,
        pixel_scale_arcsec: float,
        tract_overlap_deg: float,
    ) -> None:
        self.name = name
        self.num_rings = int(num_rings)
        self.patch_inner = int(patch_inner_pixels)
        self.patch_border = int(patch_border_pixels)
        self.pixel_scale_arcsec = float(pixel_scale_arcsec)
        self.tract_overlap_deg = float(tract_overlap_deg)
        self.ring_size_deg = 180.0 / (self.num_rings + 1)
        self._ring_counts = [self._count_in_ring(i) for i in range(self.num_rings)]
        self._ring_first = np.concatenate([[1], 1 + np.cumsum(self._ring_counts)]).astype(int)
        self._tracts: dict[int, TractInfo] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RingsSkyMap:
        """Build the sky map from a merged config (or its ``skymap`` section)."""
        section = config.get("skymap", config)
        keys = (
            "name",
            "num_rings",
            "patch_inner_pixels",
            "patch_border_pixels",
            "pixel_scale_arcsec",
            "tract_overlap_deg",
        )
        return cls(**{k: section[k] for k in keys})

    def __repr__(self) -> str:
        return f"RingsSkyMap({self.name!r}, {self.num_rings} rings, {self.num_tracts} tracts)"

    @property
    def num_tracts(self) -> int:
        """Number of tracts."""
        return int(self._ring_first[-1]) + 1

    def _ring_dec_range(self, ring: int) -> tuple[float, float]:
        start = self.ring_size_deg * (ring + 0.5) - 90.0
        return start, start + self.ring_size_deg

    def _count_in_ring(self, ring: int) -> int:
        start, stop = self._ring_dec_range(ring)
        dec = min(abs(start), abs(stop)) if start * stop > 0 else 0.0
        return int(360.0 * math.cos(math.radians(dec)) / self.ring_size_deg) + 1

    def _locate(self, tract_id: int) -> tuple[int, int]:
        """Return (ring, index in ring) of a tract; caps are (-1, 0), (num_rings, 0)."""
        if not 0 <= tract_id < self.num_tracts:
            raise KeyError(f"skymap {self.name}: no tract {tract_id} (0..{self.num_tracts - 1})")
        if tract_id == 0:
            return -1, 0
        if tract_id == self.num_tracts - 1:
            return self.num_rings, 0
        ring = int(np.searchsorted(self._ring_first, tract_id, side="right")) - 1
        return ring, tract_id - int(self._ring_first[ring])

    def _inner_boundary(self, ring: int, index: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        if ring < 0 or ring >= self.num_rings:
            dec0 = -90.0 if ring < 0 else 90.0
            edge = dec0 + (self.ring_size_deg / 2.0 if ring < 0 else -self.ring_size_deg / 2.0)
            ra = np.linspace(0.0, 360.0, 73)
            return ra, np.full_like(ra, edge), 0.0, dec0
        n = self._ring_counts[ring]
        width = 360.0 / n
        ra0 = index * width
        start, stop = self._ring_dec_range(ring)
        t = np.linspace(0.0, 1.0, 21)
        ra = np.concatenate(
            [
                ra0 - width / 2 + width * t,
                np.full(21, ra0 + width / 2),
                ra0 + width / 2 - width * t,
                np.full(21, ra0 - width / 2),
            ]
        )
        dec = np.concatenate(
            [np.full(21, start), start + (stop - start) * t, np.full(21, stop), stop - (stop - start) * t]
        )
        return ra, dec, ra0 % 360.0, (start + stop) / 2.0

    def _make_tract(self, tract_id: int) -> TractInfo:
        ring, index = self._locate(tract_id)
        ra, dec, ra0, dec0 = self._inner_boundary(ring, index)
        scale = self.pixel_scale_arcsec / 3600.0
        probe = _tan_wcs(ra0, dec0, scale, (0.0, 0.0))
        x, y = probe.all_world2pix(ra, dec, 0)
        overlap = self.tract_overlap_deg / scale
        nums = [max(1, math.ceil(2.0 * (np.max(np.abs(v)) + overlap) / self.patch_inner)) for v in (x, y)]
        nx, ny = nums[0] * self.patch_inner, nums[1] * self.patch_inner
        wcs = _tan_wcs(ra0, dec0, scale, (nx / 2.0 + 0.5, ny / 2.0 + 0.5))
        return TractInfo(
            id=tract_id, ring=ring, ra=ra0, dec=dec0, wcs=wcs, bbox=Box(0, 0, nx, ny), num_patches=(nums[0], nums[1])
        )

    def tract(self, tract_id: int) -> TractInfo:
        """Return one tract (cached).

        Raises
        ------
        KeyError
            If there is no such tract.
        """
        tract_id = int(tract_id)
        if tract_id not in self._tracts:
            self._tracts[tract_id] = self._make_tract(tract_id)
        return self._tracts[tract_id]

    def find_tract(self, ra: float, dec: float) -> TractInfo:
        """Return the tract whose inner region holds a sky position (degrees)."""
        if dec < -90.0 + self.ring_size_deg / 2.0:
            return self.tract(0)
        if dec >= 90.0 - self.ring_size_deg / 2.0:
            return self.tract(self.num_tracts - 1)
        ring = min(int((dec + 90.0 - self.ring_size_deg / 2.0) // self.ring_size_deg), self.num_rings - 1)
        n = self._ring_counts[ring]
        index = int(math.floor((ra % 360.0) / (360.0 / n) + 0.5)) % n
        return self.tract(int(self._ring_first[ring]) + index)

    def patch(self, tract: int | TractInfo, patch: int | tuple[int, int]) -> PatchInfo:
        """Return one patch by sequential id or ``(px, py)``.

        Raises
        ------
        KeyError
            If the patch is outside the tract.
        """
        info = tract if isinstance(tract, TractInfo) else self.tract(tract)
        nx, ny = info.num_patches
        px, py = (patch % nx, patch // nx) if isinstance(patch, (int, np.integer)) else patch
        if not (0 <= px < nx and 0 <= py < ny):
            raise KeyError(f"skymap {self.name}: tract {info.id} has no patch {patch!r} ({nx}x{ny} patches)")
        inner = Box(
            px * self.patch_inner, py * self.patch_inner, (px + 1) * self.patch_inner, (py + 1) * self.patch_inner
        )
        b = self.patch_border
        outer = Box(inner.x0 - b, inner.y0 - b, inner.x1 + b, inner.y1 + b)
        wcs = info.wcs.deepcopy()
        wcs.wcs.crpix = [wcs.wcs.crpix[0] - outer.x0, wcs.wcs.crpix[1] - outer.y0]
        wcs.pixel_shape = (outer.width, outer.height)
        return PatchInfo(
            tract=info.id, index=(int(px), int(py)), id=int(py * nx + px), inner_bbox=inner, outer_bbox=outer, wcs=wcs
        )

    def patches(self, tract: int | TractInfo) -> list[PatchInfo]:
        """Return every patch of a tract."""
        info = tract if isinstance(tract, TractInfo) else self.tract(tract)
        return [self.patch(info, i) for i in range(info.num_patches[0] * info.num_patches[1])]

    def tracts_overlapping(self, region: sphgeom.ConvexPolygon) -> list[TractInfo]:
        """Return the tracts whose pixel boxes overlap a sky region (a `lsst.sphgeom.ConvexPolygon`)."""
        circle = region.getBoundingCircle()
        center = sphgeom.LonLat(circle.getCenter())
        ra_c, dec_c = center.getLon().asDegrees(), center.getLat().asDegrees()
        radius = circle.getOpeningAngle().asDegrees()
        margin = radius + self.ring_size_deg * 1.5 + self.tract_overlap_deg
        out = []
        for tract_id in self._candidates(ra_c, dec_c, margin):
            info = self.tract(tract_id)
            if not region.isDisjointFrom(info.polygon()):
                out.append(info)
        return out

    def _candidates(self, ra: float, dec: float, margin: float) -> list[int]:
        ids = [0] if dec - margin < -90.0 + self.ring_size_deg else []
        for ring in range(self.num_rings):
            start, stop = self._ring_dec_range(ring)
            if stop < dec - margin or start > dec + margin:
                continue
            n = self._ring_counts[ring]
            cos_dec = max(math.cos(math.radians(min(abs(dec) + margin, 89.999))), 1e-6)
            half_ra = 180.0 if margin / cos_dec >= 180.0 else margin / cos_dec + 180.0 / n
            for j in range(n):
                if abs((j * 360.0 / n - ra + 180.0) % 360.0 - 180.0) <= half_ra:
                    ids.append(int(self._ring_first[ring]) + j)
        if dec + margin > 90.0 - self.ring_size_deg:
            ids.append(self.num_tracts - 1)
        return ids

    def patches_overlapping(self, region: sphgeom.ConvexPolygon, *, outer: bool = False) -> list[PatchInfo]:
        """Return the patches whose inner (or outer) boxes overlap a sky region.

        Parameters
        ----------
        region : `lsst.sphgeom.ConvexPolygon`
            Sky region, e.g. a padded detector footprint.
        outer : `bool`, optional
            Test the outer (bordered) boxes instead of the inner ones.

        Returns
        -------
        patches : `list` [`PatchInfo`]
            From every overlapping tract, ordered by tract then patch id.
        """
        circle = region.getBoundingCircle()
        center = sphgeom.LonLat(circle.getCenter())
        radius = circle.getOpeningAngle().asDegrees()
        angles = np.linspace(0.0, 2 * np.pi, 73)
        out = []
        for info in self.tracts_overlapping(region):
            # Candidate patches from the region's bounding circle in tract pixels.
            lonlat = [[center.getLon().asDegrees(), center.getLat().asDegrees()]]
            x0, y0 = info.wcs.all_world2pix(lonlat, 0)[0]
            r_pix = radius * 3600.0 / self.pixel_scale_arcsec * 1.05 + self.patch_border + 1
            xs, ys = x0 + r_pix * np.cos(angles), y0 + r_pix * np.sin(angles)
            nx, ny = info.num_patches
            inner = self.patch_inner
            px = range(max(0, int(np.min(xs) // inner)), min(nx, int(np.max(xs) // inner) + 1))
            py = range(max(0, int(np.min(ys) // inner)), min(ny, int(np.max(ys) // inner) + 1))
            for j in py:
                for i in px:
                    patch = self.patch(info, (i, j))
                    if not region.isDisjointFrom(patch.polygon(outer=outer)):
                        out.append(patch)
        return out
