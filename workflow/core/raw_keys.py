"""Object keys of raw snaps in the raw bucket, per the instrument's key template.

Each instrument config names a ``raw.key_template`` such as
``{instrument}/{day_obs}/{obs_id}/{obs_id}_{detector_name}.fits``.  This module
formats keys from raw metadata (the camera testers, replay) and parses keys back into
fields (raw-arrival notifications, bucket listings at ingest).

Parsing accepts what Rubin's own parser (``shared/raw.py`` of prompt_processing)
accepts: a template ending ``.fits`` also matches the compressed forms ``.fits.fz``
and ``.fits.gz``, and detector names include LSSTCam's corner sensors
(``R00_SG0``, ``R00_SG1``, ``R00_SW0``, ``R00_SW1`` and the other corner rafts).
"""

from __future__ import annotations

__all__ = [
    "RawKeyFields",
    "RawKeyLayout",
    "lsst_obs_id",
    "lsst_exposure_id",
    "sidecar_key",
]

import dataclasses
import re
import string
from collections.abc import Mapping
from typing import Any

from workflow.core.exceptions import ConfigError

# What each template field may match when parsing a key.
_FIELD_PATTERNS = {
    "instrument": r"[A-Za-z][A-Za-z0-9-]*",
    "day_obs": r"\d{8}",
    "obs_id": r"[A-Z]{2}_[A-Z]_\d{8}_\d{6}",
    "detector": r"\d+",
    # Raft cameras: science sensors S00..S22 and corner guider/wavefront sensors SG0, SG1,
    # SW0, SW1; grid cameras name detectors by number ("042").
    "detector_name": r"R\d{2}_S(?:\d{2}|[GW]\d)|[A-Za-z0-9]+",
    "group": r"[^/]+?",
    "snap": r"\d+",
    "exposure": r"\d+",
    "physical_filter": r"[^/]+?",
}
_INT_FIELDS = {"detector", "snap", "exposure"}
# Compressed forms of a ``.fits`` raw that a ``.fits`` template also matches.
_FITS_SUFFIX = r"\.fits(?:\.fz|\.gz)?"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RawKeyFields:
    """What a raw key says about its raw; fields absent from the template are None."""

    instrument: str
    detector: int | None = None
    detector_name: str | None = None
    day_obs: str | None = None
    obs_id: str | None = None
    group: str | None = None
    snap: int | None = None
    exposure: int | None = None
    physical_filter: str | None = None


def lsst_obs_id(prefix: str, controller: str, day_obs: str, seq_num: int) -> str:
    """Return an LSST camera observation id, e.g. ``CC_S_20261128_000042``.

    Parameters
    ----------
    prefix, controller : `str`
        Camera code (``MC``, ``CC``, ``AT``) and controller (``O``, ``S``).
    day_obs : `str`
        Observing day as ``YYYYMMDD`` or ``YYYY-MM-DD``.
    seq_num : `int`
        Sequence number of the exposure within the day.
    """
    return f"{prefix}_{controller}_{day_obs.replace('-', '')}_{seq_num:06d}"


def lsst_exposure_id(day_obs: str, seq_num: int) -> int:
    """Return the integer exposure id Rubin derives from day and sequence number."""
    return int(day_obs.replace("-", "")) * 100_000 + seq_num


def sidecar_key(raw_key: str) -> str:
    """Return the key of the JSON sidecar that accompanies an LSST-camera raw.

    The sidecar replaces the whole extension: ``x.fits``, ``x.fits.fz`` -> ``x.json``.
    """
    return re.sub(r"(\.fits)?(\.fz|\.gz)?$", "", raw_key) + ".json"


class RawKeyLayout:
    """Format and parse raw object keys with one instrument's key template.

    Parameters
    ----------
    template : `str`
        ``raw.key_template`` from the instrument config.
    instrument : `str`
        Instrument name, checked when parsing.

    Raises
    ------
    ConfigError
        If the template uses a field this module does not know.
    """

    def __init__(self, template: str, instrument: str) -> None:
        self.template = template
        self.instrument = instrument
        self.fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        unknown = sorted(set(self.fields) - set(_FIELD_PATTERNS))
        if unknown:
            raise ConfigError(
                f"raw.key_template {template!r}: unknown field(s) {unknown}; "
                f"expected fields among {sorted(_FIELD_PATTERNS)}"
            )
        self._regex = re.compile(self._to_regex(template))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RawKeyLayout:
        """Build the layout of the configured instrument."""
        return cls(config["raw"]["key_template"], config["instrument"]["name"])

    @staticmethod
    def _to_regex(template: str) -> str:
        parts = ["^"]
        seen: set[str] = set()
        for literal, field, _, _ in string.Formatter().parse(template):
            if field is None and literal.endswith(".fits"):  # the key's tail: compressed forms too
                parts.append(re.escape(literal.removesuffix(".fits")) + _FITS_SUFFIX)
                continue
            parts.append(re.escape(literal))
            if field is None:
                continue
            if field in seen:  # repeated field: must equal its first occurrence
                parts.append(f"(?P={field})")
            else:
                parts.append(f"(?P<{field}>{_FIELD_PATTERNS[field]})")
                seen.add(field)
        parts.append("$")
        return "".join(parts)

    def format(self, **values: Any) -> str:
        """Return the key of one raw snap.

        Parameters
        ----------
        **values
            A value for every field in the template (``day_obs`` may be given as
            ``YYYY-MM-DD``; it is written as ``YYYYMMDD``).

        Raises
        ------
        KeyError
            If a template field has no value; the message names it.
        """
        missing = [f for f in self.fields if f not in values]
        if missing:
            raise KeyError(f"raw key template {self.template!r} needs field(s) {missing}")
        if "day_obs" in values:
            values = {**values, "day_obs": str(values["day_obs"]).replace("-", "")}
        return self.template.format(**values)

    def parse(self, key: str) -> RawKeyFields | None:
        """Parse an object key; return None if it is not a raw of this instrument.

        Sidecars (``.json``) and keys of other layouts or instruments give None, so a
        caller can skip them and count why.
        """
        match = self._regex.match(key)
        if match is None:
            return None
        fields: dict[str, Any] = match.groupdict()
        if fields.get("instrument", self.instrument) != self.instrument:
            return None
        for name in _INT_FIELDS & fields.keys():
            fields[name] = int(fields[name])
        fields["instrument"] = self.instrument
        return RawKeyFields(**fields)
