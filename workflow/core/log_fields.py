"""Bounded renderings of untrusted values, for log lines and error messages.

A message field can be megabytes long or nested thousands deep; copying it into
a log line (or an exception's text, which ends up in one) costs memory and
floods the logs.  `shorten` renders any value in a few hundred characters and
says how long it was.
"""

from __future__ import annotations

__all__ = ["LIMIT", "shorten"]

import reprlib

LIMIT = 200
"""Default number of characters kept of a value."""

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = LIMIT
_REPR.maxother = LIMIT
_REPR.maxlong = 60


def shorten(value: object, limit: int = LIMIT) -> str:
    """Return ``repr(value)``, cut to about ``limit`` characters, saying how long the value was.

    Parameters
    ----------
    value : `object`
        Any value (a message field, say); never rendered in full if long or deep.
    limit : `int`, optional
        Characters kept.

    Returns
    -------
    text : `str`
        ``'abc'`` for a short string; for a longer one its first ``limit``
        characters then ``... (5242880 chars)``; containers are rendered a few
        levels and items deep.

    Examples
    --------
    >>> shorten("x" * 10, limit=4)
    "'xxxx'... (10 chars)"
    """
    if isinstance(value, (str, bytes, bytearray)):
        if len(value) <= limit:
            return repr(value)
        unit = "chars" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    try:
        text = _REPR.repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"
