"""Template coadds: the static synthetic sky rendered on a patch.

A template is what a deep coadd of ``depth_visits`` visits would be: the
same renderer as the raws (`workflow.sim.render.render_scene`) on the patch
WCS, with stars, galaxies and variables at their *mean* flux, no transients,
a slightly broader PSF than the median visit, background subtracted, and
Gaussian noise ``1/sqrt(depth_visits)`` of a single LSST-like 30 s visit's
(sky + source shot noise).  Pixels are calibrated fluxes in nJy.
"""

from __future__ import annotations

__all__ = ["TemplateOptions", "Template", "make_template"]

import dataclasses
import logging
import zlib

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from workflow.core.amplifiers import Box
from workflow.core.skymap import PatchInfo, RingsSkyMap
from workflow.sim.refcat import BANDS
from workflow.sim.render import GaussianMixturePsf, render_scene
from workflow.sim.simulate import SKY_MAGNITUDES, ZEROPOINTS
from workflow.sim.sky_model import SkyModel

_log = logging.getLogger(__name__)

_TEMPLATE_STREAM = 31


@dataclasses.dataclass(frozen=True, kw_only=True)
class TemplateOptions:
    """Knobs of template generation.

    Attributes
    ----------
    fwhm_arcsec : `float`
        PSF FWHM of the coadd.
    depth_visits : `float`
        Noise is that of one visit divided by ``sqrt(depth_visits)``.
    exptime : `float`
        Exposure time of the notional single visit.
    zeropoint_offset_mag : `float`
        Shift of the LSST-like zero points (telescope size).
    """

    fwhm_arcsec: float = 0.9
    depth_visits: float = 20.0
    exptime: float = 30.0
    zeropoint_offset_mag: float = 0.0


@dataclasses.dataclass(kw_only=True)
class Template:
    """A template image of (part of) a patch.

    Attributes
    ----------
    tract, patch : `int`
        Sky-map tract and sequential patch id.
    band : `str`
        Band.
    bbox : `workflow.core.amplifiers.Box`
        Region of the tract the image covers (tract pixels).
    image, variance : `numpy.ndarray`
        float32 nJy and nJy^2.
    wcs : `astropy.wcs.WCS`
        WCS of ``image`` (0-based).
    psf : `workflow.sim.render.GaussianMixturePsf`
        PSF in pixels.
    header : `astropy.io.fits.Header`
        WCS and identification cards.
    stars, galaxies, variables : `astropy.table.Table`
        Rendered stars, galaxies and variables with pixel positions (truth).
    """

    tract: int
    patch: int
    band: str
    bbox: Box
    image: np.ndarray
    variance: np.ndarray
    wcs: WCS
    psf: GaussianMixturePsf
    header: fits.Header
    stars: Table
    galaxies: Table
    variables: Table

    def to_hdulist(self) -> fits.HDUList:
        """Return the template as FITS: primary header, IMAGE and VARIANCE HDUs."""
        return fits.HDUList(
            [
                fits.PrimaryHDU(header=self.header),
                fits.ImageHDU(self.image, header=self.header, name="IMAGE"),
                fits.ImageHDU(self.variance, name="VARIANCE"),
            ]
        )


def _sub_wcs(patch: PatchInfo, bbox: Box) -> WCS:
    wcs = patch.wcs.deepcopy()
    wcs.wcs.crpix = [
        wcs.wcs.crpix[0] - (bbox.x0 - patch.outer_bbox.x0),
        wcs.wcs.crpix[1] - (bbox.y0 - patch.outer_bbox.y0),
    ]
    wcs.pixel_shape = (bbox.width, bbox.height)
    return wcs


def _shift_slices(bbox: Box, outer: Box) -> tuple[slice, slice]:
    return (slice(bbox.y0 - outer.y0, bbox.y1 - outer.y0), slice(bbox.x0 - outer.x0, bbox.x1 - outer.x0))


def make_template(
    skymap: RingsSkyMap,
    patch: PatchInfo,
    band: str,
    *,
    seed: int = 0,
    sky: SkyModel | None = None,
    options: TemplateOptions | None = None,
    bbox: Box | None = None,
) -> Template:
    """Render the template of one patch in one band.

    Parameters
    ----------
    skymap : `workflow.core.skymap.RingsSkyMap`
        The sky map (pixel scale, name).
    patch : `workflow.core.skymap.PatchInfo`
        The patch.
    band : `str`
        Band (``u``..``y``).
    seed : `int`, optional
        Universe seed (as given to the simulator).
    sky : `workflow.sim.sky_model.SkyModel`, optional
        Synthetic sky (default ``SkyModel(seed=seed)``); use the same as for
        the raws.
    options : `TemplateOptions`, optional
        PSF and depth.
    bbox : `workflow.core.amplifiers.Box`, optional
        Sub-region of the patch's outer box (tract pixels) to render;
        default the whole outer box.

    Returns
    -------
    template : `Template`

    Raises
    ------
    ValueError
        If ``band`` is unknown or ``bbox`` is not inside the patch.
    """
    if band not in BANDS:
        raise ValueError(f"template: unknown band {band!r}; expected one of {BANDS}")
    opts = options or TemplateOptions()
    sky = sky or SkyModel(seed=seed)
    outer = patch.outer_bbox
    bbox = bbox or outer
    inside = outer.x0 <= bbox.x0 and outer.y0 <= bbox.y0 and bbox.x1 <= outer.x1 and bbox.y1 <= outer.y1
    if not inside or bbox.is_empty():
        raise ValueError(f"template: bbox {bbox} is not inside patch {patch.tract}/{patch.id} outer box {outer}")
    wcs = _sub_wcs(patch, bbox)
    scale = skymap.pixel_scale_arcsec
    psf = GaussianMixturePsf.from_fwhm(opts.fwhm_arcsec / scale)
    image = np.zeros(bbox.shape, dtype=np.float32)
    stars, galaxies, variables = render_scene(
        image, wcs, band, psf, sky=sky, flux_scale=1.0, mjd=None, pixel_scale_arcsec=scale
    )
    zp = ZEROPOINTS[band] + opts.zeropoint_offset_mag
    e_per_njy = opts.exptime * 10.0 ** (-0.4 * (31.4 - zp))
    sky_e = 10.0 ** (-0.4 * (SKY_MAGNITUDES[band] - zp)) * scale**2 * opts.exptime
    variance = (sky_e + np.maximum(image, 0.0) * e_per_njy) / (e_per_njy**2 * opts.depth_visits)
    variance = variance.astype(np.float32)
    rng = np.random.default_rng(
        np.random.SeedSequence(
            [seed, _TEMPLATE_STREAM, zlib.crc32(skymap.name.encode()), patch.tract, patch.id, BANDS.index(band)]
        )
    )
    # Noise is drawn for the whole outer box so a pixel's value does not
    # depend on the sub-box requested.
    noise = rng.standard_normal(outer.shape, dtype=np.float32)
    image += noise[_shift_slices(bbox, outer)] * np.sqrt(variance)
    header = fits.Header()
    header["SKYMAP"] = skymap.name
    header["TRACT"] = patch.tract
    header["PATCH"] = patch.id
    header["BAND"] = band
    header["BUNIT"] = "nJy"
    header["PSFFWHM"] = (opts.fwhm_arcsec, "[arcsec]")
    header["NVISITS"] = opts.depth_visits
    header["BBOX_X0"] = (bbox.x0, "tract pixel of image column 0")
    header["BBOX_Y0"] = (bbox.y0, "tract pixel of image row 0")
    header.extend(wcs.to_header(), update=True)
    _log.debug("template %s/%d %s: %s", patch.tract, patch.id, band, bbox)
    return Template(
        tract=patch.tract,
        patch=patch.id,
        band=band,
        bbox=bbox,
        image=image,
        variance=variance,
        wcs=wcs,
        psf=psf,
        header=header,
        stars=stars,
        galaxies=galaxies,
        variables=variables,
    )
