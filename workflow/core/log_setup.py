"""Configure logging once, at an entry point, from one setting string.

``log_levels`` in the config (like Rubin's SERVICE_LOG_LEVELS) reads
``"workflow=INFO timer=DEBUG stream_shim=INFO"``.  Library modules never set levels.
Every line goes through `workflow.core.redact.RedactingFilter`: a password in a URL
or a ``password=``/``AWS_SECRET_ACCESS_KEY=`` value is masked before it is written.
"""

from __future__ import annotations

__all__ = ["parse_log_levels", "configure_logging", "JsonFormatter"]

import json
import logging
import time
from typing import Any

from workflow.core.exceptions import ConfigError
from workflow.core.redact import RedactingFilter

_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def parse_log_levels(text: str) -> dict[str, str]:
    """Parse ``"logger=LEVEL ..."`` into a mapping.

    Raises
    ------
    ConfigError
        If an item is not ``name=LEVEL`` with a known level.
    """
    levels = {}
    for item in text.split():
        name, sep, level = item.partition("=")
        if not sep or not name or level.upper() not in _LEVELS:
            raise ConfigError(f"log_levels: item {item!r}: expected logger=LEVEL with LEVEL in {sorted(_LEVELS)}")
        levels[name] = level.upper()
    return levels


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any ``extra`` context fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_text:  # already formatted (and redacted) by a filter
            payload["exception"] = record.exc_text
        elif record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(
    log_levels: str = "", *, json_lines: bool = False, stream: Any = None, filename: str | None = None
) -> None:
    """Set up the root handler and per-logger levels.

    Parameters
    ----------
    log_levels : `str`
        ``"logger=LEVEL ..."``; the root logger stays at INFO unless named (``root=``).
    json_lines : `bool`
        Emit structured JSON lines (the shim) instead of plain text.
    stream, filename
        Where to write (a stream, or a file such as a rule's log).

    Notes
    -----
    The handler carries a `~workflow.core.redact.RedactingFilter`, so secrets are
    masked in the records of every logger, including third-party ones.
    """
    handler: logging.Handler = logging.FileHandler(filename) if filename else logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    levels = parse_log_levels(log_levels)
    root.setLevel(levels.pop("root", "INFO"))
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
