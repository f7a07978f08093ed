"""Hide secrets in text that leaves the process: log lines, status pages, messages.

One place knows what a secret looks like: the password of a URL's user info
(``postgresql+psycopg2://user:pw@host/db``), a ``key=value`` or ``"key": "value"``
pair whose key names a password, secret, token or key (``password=``,
``AWS_SECRET_ACCESS_KEY=``, ``PGPASSWORD=``, ``sasl.password``), and an HTTP
``Bearer`` token.  Each value becomes `MASK`; the rest of the text is kept, so a
message still names the host and database.  `RedactingFilter` applies
`redact_text` to every record a logging handler emits
(`workflow.core.log_setup.configure_logging` installs it).
"""

from __future__ import annotations

__all__ = ["MASK", "RedactingFilter", "redact_text", "redact_url"]

import logging
import re

MASK = "***"
"""What a secret value is replaced with."""

_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s\"']*:)(?P<secret>[^@\s\"']*)(?=@)")
"""``scheme://user:`` then the password, up to the ``@`` of the user info."""

_KEYED_SECRET = re.compile(
    r"(?P<head>(?<![A-Za-z0-9])[\w.\-]*(?:passw(?:or)?d|pwd|secret|token|signature|api[_-]?key|access[_-]?key|credentials?)"
    r"[\w.\-]*[\"']?\s*[=:]\s*[\"']?)(?P<secret>[^\s\"'&,;{}\[\]]+)",
    re.IGNORECASE,
)
"""``<name holding password/secret/token/...>`` then ``=`` or ``:`` then the value."""

_KEYED_HINT = re.compile(r"passw|pwd|secret|token|signature|api.?key|access.?key|credential", re.IGNORECASE)
"""Cheap test run first: most lines name no secret, and `_KEYED_SECRET` costs more."""

_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<secret>[A-Za-z0-9._~+/=\-]+)", re.IGNORECASE)


def _mask(match: re.Match[str]) -> str:
    return match.group("head") + MASK


def redact_url(url: str) -> str:
    """Return ``url`` with its password (and any secret query value) replaced by `MASK`.

    Parameters
    ----------
    url : `str`
        A URL such as ``postgresql://user:pw@host/db`` or ``s3://b/k?X-Amz-Credential=...``.

    Returns
    -------
    url : `str`
        E.g. ``postgresql://user:***@host/db``; a URL without secrets is unchanged.
    """
    return redact_text(url)


def redact_text(text: str) -> str:
    """Return ``text`` with every URL password, keyed secret and bearer token replaced by `MASK`.

    Parameters
    ----------
    text : `str`
        Any text: a log message, an exception message, a traceback, a status detail.

    Returns
    -------
    text : `str`
        The same text with secret values masked (idempotent).
    """
    if "://" in text:
        text = _URL_PASSWORD.sub(_mask, text)
    if _KEYED_HINT.search(text):
        text = _KEYED_SECRET.sub(_mask, text)
    if "earer" in text:
        text = _BEARER.sub(_mask, text)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets in a record's message, traceback and string extras.

    The message is formatted once (``record.getMessage()``) and replaced, with its
    arguments, by the redacted text; a traceback is formatted into
    ``record.exc_text`` and redacted, which `logging.Formatter` then prints as is.
    """

    _STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
    _traceback_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always let it through."""
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._traceback_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        for key, value in vars(record).items():
            if key not in self._STANDARD and isinstance(value, str):
                setattr(record, key, redact_text(value))
        return True
