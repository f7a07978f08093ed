"""Astrometric calibration: match detections to a reference catalogue, fit TAN-SIP.

The header WCS predicts reference positions; a vote over all source-reference
pair offsets (a 2-D histogram, repeated over a grid of small rotations) finds
the pointing error.  Matches are then refined with an affine fit and a
TAN-SIP fit (`astropy.wcs.utils.fit_wcs_from_points`) with outlier clipping.
"""

from __future__ import annotations

__all__ = ["AstrometryResult", "match_offset", "fit_astrometry"]

import dataclasses
import logging

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS
from astropy.wcs.utils import fit_wcs_from_points, proj_plane_pixel_scales
from scipy.spatial import cKDTree

from workflow.science.errors import TooFewStarsError

_log = logging.getLogger(__name__)

_STEP = "calibrate.astrometry"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AstrometryResult:
    """Outcome of `fit_astrometry`.

    Attributes
    ----------
    wcs : `astropy.wcs.WCS`
        Fitted TAN-SIP WCS.
    n_matched : `int`
        Matches used in the final fit.
    rms_mas : `float`
        RMS of the source-reference separations after the fit, in mas.
    offset_pix : `tuple` [`float`, `float`]
        Pointing error found by the vote, ``(dx, dy)`` pixels.
    rotation_deg : `float`
        Rotation error found by the vote, degrees.
    source_index, ref_index : `numpy.ndarray`
        Indices of the matched sources and reference objects.
    """

    wcs: WCS
    n_matched: int
    rms_mas: float
    offset_pix: tuple[float, float]
    rotation_deg: float
    source_index: np.ndarray
    ref_index: np.ndarray


def _rotate(xy: np.ndarray, angle_deg: float, center: np.ndarray) -> np.ndarray:
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    return (xy - center) @ np.array([[c, s], [-s, c]]) + center


def match_offset(
    src_xy: np.ndarray,
    ref_xy: np.ndarray,
    center: np.ndarray,
    *,
    max_offset: float,
    max_rotation: float = 0.3,
    rotation_step: float = 0.05,
    bin_size: float = 2.0,
) -> tuple[float, np.ndarray, int]:
    """Find the rotation and shift that best map reference onto source positions.

    Every pair closer than ``max_offset`` votes for its offset in a 2-D
    histogram (2x2-bin sums); the rotation with the highest peak wins.

    Returns
    -------
    rotation : `float`
        Rotation (degrees) applied to ``ref_xy`` about ``center``.
    offset : `numpy.ndarray`
        ``(dx, dy)`` to add to the rotated reference positions.
    votes : `int`
        Pairs in the winning peak.
    """
    tree = cKDTree(src_xy)
    nbins = int(np.ceil(2 * max_offset / bin_size))
    edges = np.linspace(-max_offset, max_offset, nbins + 1)
    best = (0.0, np.zeros(2), -1)
    for angle in np.arange(-max_rotation, max_rotation + 1e-9, rotation_step):
        rotated = _rotate(ref_xy, angle, center)
        pairs = tree.sparse_distance_matrix(cKDTree(rotated), max_offset, output_type="ndarray")
        if len(pairs) == 0:
            continue
        d = src_xy[pairs["i"]] - rotated[pairs["j"]]
        hist, _, _ = np.histogram2d(d[:, 0], d[:, 1], bins=[edges, edges])
        summed = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
        i, j = np.unravel_index(np.argmax(summed), summed.shape)
        if summed[i, j] > best[2]:
            near = (np.abs(d[:, 0] - edges[i + 1]) < bin_size) & (np.abs(d[:, 1] - edges[j + 1]) < bin_size)
            best = (float(angle), np.median(d[near], axis=0), int(summed[i, j]))
    return best


def _nearest(src_xy: np.ndarray, ref_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Return mutually nearest source/reference index pairs closer than ``radius``."""
    dist, j = cKDTree(src_xy).query(ref_xy, distance_upper_bound=radius)
    ok = np.isfinite(dist)
    ref_idx, src_idx = np.flatnonzero(ok), j[ok]
    back = cKDTree(ref_xy).query(src_xy[src_idx])[1]
    mutual = back == ref_idx
    return src_idx[mutual], ref_idx[mutual]


def _affine(src: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Least-squares affine map ref -> src as a (3, 2) matrix."""
    design = np.column_stack([ref, np.ones(len(ref))])
    return np.linalg.lstsq(design, src, rcond=None)[0]


def _residuals_arcsec(wcs: WCS, src_xy: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Return source-reference separations in arcsec (small-angle formula)."""
    sra, sdec = wcs.all_pix2world(src_xy[:, 0], src_xy[:, 1], 0)
    dra = (sra - ra + 180.0) % 360.0 - 180.0
    return np.hypot(dra * np.cos(np.radians(dec)), sdec - dec) * 3600.0


def _initial_matches(
    src_xy: np.ndarray, ref_xy: np.ndarray, shape: tuple[int, int], max_offset_pix: float, max_rotation: float
) -> tuple[float, np.ndarray, int, np.ndarray, np.ndarray]:
    """Vote for the pointing error, then match with an affine refinement."""
    center = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])
    angle, offset, votes = match_offset(src_xy, ref_xy, center, max_offset=max_offset_pix, max_rotation=max_rotation)
    predicted = _rotate(ref_xy, angle, center) + offset
    src_idx, ref_idx = _nearest(src_xy, predicted, 3.0)
    if len(src_idx) >= 3:
        matrix = _affine(src_xy[src_idx], ref_xy[ref_idx])
        predicted = np.column_stack([ref_xy, np.ones(len(ref_xy))]) @ matrix
        src_idx, ref_idx = _nearest(src_xy, predicted, 1.5)
    return angle, offset, votes, src_idx, ref_idx


def fit_astrometry(
    src_xy: np.ndarray,
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    wcs_guess: WCS,
    shape: tuple[int, int],
    *,
    max_offset_arcsec: float = 15.0,
    max_rotation: float = 0.3,
    sip_degree: int = 2,
    min_matches: int = 8,
    max_sources: int = 600,
) -> AstrometryResult:
    """Fit a TAN-SIP WCS by matching sources to a reference catalogue.

    Parameters
    ----------
    src_xy : `numpy.ndarray`
        Source centroids, shape (n, 2), 0-based pixels, brightest first.
    ref_ra, ref_dec : `numpy.ndarray`
        Reference positions in degrees, brightest first.
    wcs_guess : `astropy.wcs.WCS`
        Approximate WCS (from the header / pointing).
    shape : `tuple` [`int`, `int`]
        Image shape.
    max_offset_arcsec : `float`
        Largest pointing error searched.
    max_rotation : `float`
        Largest rotation error searched, degrees.
    sip_degree : `int`
        SIP polynomial degree (0 or less: pure TAN).
    min_matches : `int`
        Fewest matches accepted.
    max_sources : `int`
        Brightest sources and references used for the vote.

    Returns
    -------
    result : `AstrometryResult`
        The fit.

    Raises
    ------
    TooFewStarsError
        If fewer than ``min_matches`` matches are found.
    """
    scale = float(np.mean(proj_plane_pixel_scales(wcs_guess.celestial))) * 3600.0
    margin = max_offset_arcsec / scale
    ref_xy = np.column_stack(wcs_guess.all_world2pix(ref_ra, ref_dec, 0))
    inside = (ref_xy[:, 0] > -margin) & (ref_xy[:, 0] < shape[1] + margin)
    inside &= (ref_xy[:, 1] > -margin) & (ref_xy[:, 1] < shape[0] + margin)
    ref_keep = np.flatnonzero(inside)[:max_sources]
    src_xy = np.asarray(src_xy, dtype=float)
    n_src = min(len(src_xy), max_sources)
    if n_src < min_matches or len(ref_keep) < min_matches:
        message = f"{n_src} source(s) and {len(ref_keep)} reference star(s), need {min_matches}"
        raise TooFewStarsError(_STEP, message)
    angle, offset, votes, s_idx, r_idx = _initial_matches(src_xy[:n_src], ref_xy[ref_keep], shape, margin, max_rotation)
    if len(s_idx) < min_matches:
        raise TooFewStarsError(_STEP, f"only {len(s_idx)} source-reference match(es), need {min_matches}")
    r_idx = ref_keep[r_idx]
    ref_ra, ref_dec = np.asarray(ref_ra, dtype=float), np.asarray(ref_dec, dtype=float)
    wcs, s_idx, r_idx, resid = _fit_and_clip(src_xy, ref_ra, ref_dec, s_idx, r_idx, sip_degree, scale)
    rms = float(np.sqrt(np.mean(resid**2)) * 1000.0)
    _log.debug("Astrometry: %d votes, %d matches, rms %.1f mas, rot %.3f deg", votes, len(s_idx), rms, angle)
    return AstrometryResult(
        wcs=wcs,
        n_matched=len(s_idx),
        rms_mas=rms,
        offset_pix=(float(offset[0]), float(offset[1])),
        rotation_deg=angle,
        source_index=s_idx,
        ref_index=r_idx,
    )


def _fit_and_clip(
    src_xy: np.ndarray,
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    s_idx: np.ndarray,
    r_idx: np.ndarray,
    sip_degree: int,
    scale: float,
) -> tuple[WCS, np.ndarray, np.ndarray, np.ndarray]:
    """Fit TAN-SIP, re-match all sources with the fit, clip outliers, refit."""
    degree = sip_degree if sip_degree and sip_degree > 1 else None
    while degree is not None and len(s_idx) < 30 * ((degree + 1) * (degree + 2) // 2 - 3):
        degree = degree - 1 if degree > 2 else None  # too few stars to constrain this many SIP terms
    for iteration in range(2):
        xy = src_xy[s_idx]
        # fit_wcs_from_points evaluates the WCS with origin 0 internally, so it must
        # get 0-based pixels (checked: 1-based input shifts the solution by 1 px).
        world = SkyCoord(ref_ra[r_idx] * u.deg, ref_dec[r_idx] * u.deg)
        wcs = fit_wcs_from_points((xy[:, 0], xy[:, 1]), world, projection="TAN", sip_degree=degree)
        if iteration == 1:
            break
        ref_xy = np.column_stack(wcs.all_world2pix(ref_ra, ref_dec, 0))
        s_idx, r_idx = _nearest(src_xy, ref_xy, 0.6 / scale + 0.5)
        resid = _residuals_arcsec(wcs, src_xy[s_idx], ref_ra[r_idx], ref_dec[r_idx])
        keep = resid < max(3.0 * np.sqrt(np.mean(resid**2)), 0.02)
        s_idx, r_idx = s_idx[keep], r_idx[keep]
    resid = _residuals_arcsec(wcs, src_xy[s_idx], ref_ra[r_idx], ref_dec[r_idx])
    return wcs, s_idx, r_idx, resid
