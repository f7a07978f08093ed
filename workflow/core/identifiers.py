"""The identifiers that become paths and targets, and their strict patterns.

A detector-visit's files live at ``.../{instrument}/{day_obs}/{group}/{detector}``
(`workflow.stages.target.TargetPaths`), so these four values must each be one
plain path component.  The patterns here are the only definition: the
next_visit decoders (`workflow.core.visit`) check messages against them, the
workflow's wildcard constraints (``rules/common.smk``) use them, and the stream
shim checks its targets with them before Snakemake sees one.

- ``group``: Rubin's forms (an ISO TAI timestamp such as
  ``2025-01-10T03:00:40.000``, a plain integer such as ``2025011000042``) and
  the simulator's; a letter or digit first (so never ``.`` or ``..``), then
  letters, digits and ``_ . : + -``, at most 80 characters;
- ``instrument``: a letter, then letters, digits and ``-``, at most 32;
- ``day_obs``: ``YYYY-MM-DD``;
- ``detector``: a non-negative integer of at most 5 digits.
"""

from __future__ import annotations

__all__ = [
    "GROUP_PATTERN",
    "INSTRUMENT_PATTERN",
    "DAY_OBS_PATTERN",
    "DETECTOR_PATTERN",
    "PATTERNS",
    "MAX_DETECTOR",
    "is_valid",
    "check_identifier",
    "target_key",
]

import re
from pathlib import PurePosixPath

from workflow.core.exceptions import InvalidIdentifier
from workflow.core.log_fields import shorten

GROUP_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,79}"
"""Group id (the ``group`` wildcard)."""
INSTRUMENT_PATTERN = r"[A-Za-z][A-Za-z0-9-]{0,31}"
"""Short instrument name (the ``instrument`` wildcard)."""
DAY_OBS_PATTERN = r"\d{4}-\d{2}-\d{2}"
"""Observing day (the ``day_obs`` wildcard)."""
DETECTOR_PATTERN = r"\d{1,5}"
"""Detector id (the ``detector`` wildcard)."""
MAX_DETECTOR = 99_999
"""Largest detector id `DETECTOR_PATTERN` allows."""

PATTERNS: dict[str, str] = {
    "group": GROUP_PATTERN,
    "instrument": INSTRUMENT_PATTERN,
    "day_obs": DAY_OBS_PATTERN,
    "detector": DETECTOR_PATTERN,
}
"""Identifier kind -> pattern (as for Snakemake's ``wildcard_constraints``)."""

_COMPILED = {kind: re.compile(pattern) for kind, pattern in PATTERNS.items()}
_TARGET_NAMES = ("done.json", "failed.json")


def is_valid(kind: str, value: object) -> bool:
    """Return whether ``value`` is an allowed identifier of ``kind``.

    Parameters
    ----------
    kind : `str`
        One of `PATTERNS`' keys.
    value : `object`
        The value; anything but a `str` (or, for ``detector``, an `int`) is invalid.

    Returns
    -------
    valid : `bool`
        `True` if the whole value matches the pattern.
    """
    if kind == "detector" and isinstance(value, int) and not isinstance(value, bool):
        return 0 <= value <= MAX_DETECTOR
    return isinstance(value, str) and _COMPILED[kind].fullmatch(value) is not None


def check_identifier(kind: str, value: object, *, field: str | None = None, where: str = "next_visit") -> None:
    """Raise if ``value`` is not an allowed identifier of ``kind``.

    Parameters
    ----------
    kind : `str`
        One of `PATTERNS`' keys.
    value : `object`
        The value to check.
    field : `str`, optional
        Field name for the message (default: ``kind``).
    where : `str`, optional
        What holds the value, for the message (``next_visit``, a file, ...).

    Raises
    ------
    InvalidIdentifier
        Raised if the value does not match; ``reason`` is ``invalid_<kind>``
        and the message names the field, shows the value shortened and the pattern.
    """
    if not is_valid(kind, value):
        raise InvalidIdentifier(
            f"{where} field {field or kind!r}: {shorten(value)} is not an allowed {kind} "
            f"(it becomes a path; expected {PATTERNS[kind]})",
            reason=f"invalid_{kind}",
        )


def target_key(path: str | PurePosixPath) -> tuple[str, str, str, int] | None:
    """Return ``(instrument, day_obs, group, detector)`` of a target path, or `None` if it is not one.

    A target is ``<root>/{instrument}/{day_obs}/{group}/{detector}/done.json`` (or
    ``failed.json``) whose four identifiers all match their patterns and whose
    root holds no ``..``.

    Parameters
    ----------
    path : `str` or `pathlib.PurePosixPath`
        The target, relative to the run directory.

    Returns
    -------
    key : `tuple` or `None`
        The identifiers, or `None` if the path is not a well-formed target.
    """
    parts = PurePosixPath(path).parts
    if len(parts) < 6 or parts[-1] not in _TARGET_NAMES or ".." in parts or parts[0] == "/":
        return None
    instrument, day_obs, group, detector = parts[-5:-1]
    checks = (("instrument", instrument), ("day_obs", day_obs), ("group", group), ("detector", detector))
    if not all(is_valid(kind, value) for kind, value in checks):
        return None
    return instrument, day_obs, group, int(detector)
