"""Camera tester replaying central-repo raws: announce them as new visits and upload them.

`upload_from_repo` selects past groups with a Butler query (`load_repo_query`)
and replays them under new group ids, exposure ids and times, through the
upload machinery of `workflow.sim.testers` (pacing, Kafka, worker processes).
"""

from __future__ import annotations

__all__ = ["load_repo_query", "upload_from_repo"]

import io
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from astropy.io import fits

from workflow.core.config import PROJECT_ROOT, load_config, load_yaml
from workflow.core.exceptions import ConfigError
from workflow.core.exposure_info import ExposureInfo
from workflow.core.instrument import Instrument
from workflow.core.visit import NextVisit
from workflow.sim.testers import (
    GroupReport,
    NoMatchingRawsError,
    UploadedRaw,
    UploadOptions,
    _detector_ids,
    _drive,
    _Job,
    _new_visit,
    _put,
    _Seqs,
)

_log = logging.getLogger(__name__)


def _replay_task(uri: str, exposure: ExposureInfo, detector: int, late: bool) -> UploadedRaw:
    from lsst.resources import ResourcePath

    with fits.open(io.BytesIO(ResourcePath(uri).read()), memmap=False) as hdul:
        for card, value in {  # item assignment keeps the cards' comments
            "OBSID": exposure.obs_id,
            "EXPID": exposure.exposure_id,
            "GROUPID": exposure.group_id,
            "DAYOBS": str(exposure.day_obs),
            "SEQNUM": exposure.seq_num,
            "SNAP": exposure.snap,
            "NSNAPS": exposure.n_snaps,
            "TIMESYS": "TAI",
            "DATE-OBS": exposure.start.isot,
            "DATE-BEG": exposure.start.isot,
            "DATE-END": exposure.end.isot,
            "MJD-OBS": float(exposure.start.mjd),
            "MJD-BEG": float(exposure.start.mjd),
            "MJD-END": float(exposure.end.mjd),
        }.items():
            hdul[0].header[card] = value
        buffer = io.BytesIO()
        hdul.writeto(buffer)
        header = hdul[0].header.copy()
    return _put(header, lambda _key: buffer.getvalue(), exposure, detector, late)


_QUERY_KEYS = {
    "instrument": str,
    "central_repo": str,
    "collections": list,
    "where": str,
    "bind": dict,
    "config_files": list,
    "seed": int,
}


def _under_root(path: str) -> str:
    return path if "://" in path else str(PROJECT_ROOT / path)


def load_repo_query(path: str | Path) -> dict[str, Any]:
    """Read the YAML file naming what `upload_from_repo` replays.

    Keys (see ``config/testers/upload_from_repo.example.yaml``): ``instrument``;
    optional ``central_repo`` (default: the config's), ``collections`` (default
    ``<inst>/raw/all``), ``where`` and ``bind`` (Butler query on the raws),
    ``config_files`` merged over the instrument's, ``seed`` of the random choice.
    Relative paths are relative to the checkout root, as in ``config/config.yaml``.

    Returns
    -------
    query : `dict` [`str`, `~typing.Any`]
        Every key, defaults filled in, paths resolved.

    Raises
    ------
    ConfigError
        If the file is missing or not YAML, a key is unknown or mistyped, or ``instrument`` is missing.
    """
    data = load_yaml(path)
    for key in ("collections", "config_files"):
        data[key] = [data[key]] if isinstance(data.get(key), str) else data.get(key, [])
    for key, value in data.items():
        if key not in _QUERY_KEYS:
            raise ConfigError(f"{path}: key {key!r} is not allowed; expected one of {list(_QUERY_KEYS)}")
        if not isinstance(value, _QUERY_KEYS[key]) and not (key == "central_repo" and value is None):
            raise ConfigError(f"{path}: key {key!r}: expected {_QUERY_KEYS[key].__name__}, got {value!r}")
    if "instrument" not in data:
        raise ConfigError(f"{path}: key 'instrument' is missing; expected an instrument name")
    return {
        "where": "",
        "bind": {},
        "seed": 0,
        **data,
        "config_files": list(map(_under_root, data["config_files"])),
        "central_repo": data.get("central_repo") and _under_root(data["central_repo"]),
    }


def _past_groups(butler: Any, query: Mapping[str, Any], root: str) -> list[list[tuple[Any, dict[int, Any]]]]:
    """Return the matching groups in exposure order, each a list of (exposure record, raw refs by detector)."""
    from workflow.repo.central_repo import raw_collection

    collections = list(query["collections"]) or [raw_collection(query["instrument"])]
    try:
        refs = butler.query_datasets(
            "raw",
            collections=collections,
            where=query["where"],
            bind=query["bind"],
            instrument=query["instrument"],
            with_dimension_records=True,
            limit=None,
            explain=False,
        )
    except Exception as exc:  # noqa: BLE001 - the Butler raises many types for bad expressions
        raise ConfigError(f"central repo {root}: query for raws in {collections} failed: {exc}") from None
    if not refs:
        raise NoMatchingRawsError(
            f"central repo {root}: no {query['instrument']} raws in {collections} match where {query['where']!r}"
        )
    exposures: dict[int, tuple[Any, dict[int, Any]]] = {}
    for ref in refs:
        record = ref.dataId.records["exposure"]
        exposures.setdefault(record.id, (record, {}))[1][ref.dataId["detector"]] = ref
    groups: dict[str, list[tuple[Any, dict[int, Any]]]] = {}
    for exposure_id in sorted(exposures):
        groups.setdefault(exposures[exposure_id][0].group, []).append(exposures[exposure_id])
    return list(groups.values())


def upload_from_repo(
    query: Mapping[str, Any],
    n_groups: int,
    *,
    ordered: bool = False,
    options: UploadOptions | None = None,
    extra_config_files: Sequence[str | Path] = (),
) -> list[GroupReport]:
    """Replay ``n_groups`` groups of central-repo raws as new visits.

    Groups are chosen at random (seeded) or in exposure order, cycling if the query
    has fewer.  Each replay gets a new group id, exposure ids and times, in its
    next_visit and the raws' headers (GROUPID, EXPID, OBSID, DAYOBS, SEQNUM, SNAP,
    DATE-*, MJD-*); pointing, filter and pixels are kept; ``survey`` is
    ``options.survey`` or the exposure's science program.

    Parameters
    ----------
    query : `~collections.abc.Mapping`
        What to replay, as returned by `load_repo_query`.
    n_groups : `int`
        Number of visits.
    ordered : `bool`, optional
        Replay in exposure order instead of at random.
    options : `UploadOptions`, optional
        Pacing, message form, workers, skipped and late detectors.
    extra_config_files : sequence of `str` or `pathlib.Path`, optional
        Config files merged after the query's.

    Returns
    -------
    reports : `list` [`GroupReport`]
        One per group, in order.

    Raises
    ------
    ConfigError
        Unknown instrument or detector, bad query or config.
    NonRetriableError
        No repository at the path.
    NoMatchingRawsError
        The query selects no raws.
    BucketUnavailableError, BrokerUnavailableError
        The raw bucket or the broker cannot be reached.
    """
    from workflow.repo.central_repo import open_central_repo

    config = load_config(instrument=query["instrument"], extra_files=[*query["config_files"], *extra_config_files])
    instrument = Instrument.from_config(config)
    options = options or UploadOptions()
    skip = _detector_ids(instrument, options.skip_detectors, "skipped detectors")
    late = _detector_ids(instrument, options.late_detectors, "late detectors")
    root = query["central_repo"] or _under_root(config["central_repo"])
    butler = open_central_repo(root)
    groups, rng = _past_groups(butler, query, root), random.Random(query["seed"])
    chosen: list[list[tuple[Any, dict[int, Any]]]] = []
    while len(chosen) < n_groups:
        chosen += groups if ordered else rng.sample(groups, len(groups))

    def plan(index: int, seqs: _Seqs) -> tuple[NextVisit, list[tuple[ExposureInfo, list[_Job]]]]:
        first = chosen[index][0][0]
        visit, snaps = _new_visit(
            instrument,
            seqs,
            index,
            ra=first.tracking_ra,
            dec=first.tracking_dec,
            rotation_deg=first.sky_angle,
            physical_filter=first.physical_filter,
            exptime=first.exposure_time,
            n_snaps=len(chosen[index]),
            slew_s=options.slew_s,
            survey=options.survey or first.science_program or "SURVEY",
        )
        return visit, [
            (e, [(det, (butler.getURI(ref).geturl(), e)) for det, ref in sorted(refs.items()) if det not in skip])
            for e, (_, refs) in zip(snaps, chosen[index], strict=False)
        ]

    return _drive(config, n_groups, plan, _replay_task, options, late=late)
