"""Error classes shared by the workflow package and the stream shim.

Retry meaning is carried by type: a `RetriableError` may succeed if the same
target runs again later (a server was down, a raw had not arrived yet); a
`NonRetriableError` will fail the same way every time (corrupt data, bad
config).  Each class also subclasses the builtin exception it means, so
callers that only know the builtins still catch them sensibly.
"""

from __future__ import annotations

__all__ = [
    "PromptSnakeError",
    "RetriableError",
    "NonRetriableError",
    "ConfigError",
    "InvalidVisit",
    "IgnorableVisit",
    "StaleVisit",
    "InvalidIdentifier",
    "UnknownInstrumentError",
    "ServiceStartError",
]


class PromptSnakeError(Exception):
    """Base class of every error raised on purpose by prompt-snake."""


class RetriableError(PromptSnakeError):
    """Failure that may go away if the same work is tried again later."""


class NonRetriableError(PromptSnakeError):
    """Failure that will repeat if the same work is tried again."""


class ConfigError(NonRetriableError, ValueError):
    """A configuration file is malformed or inconsistent.

    The message names the file, the key and what was expected.
    """


class InvalidVisit(NonRetriableError, ValueError):
    """A next_visit message is malformed: a field is missing or mistyped.

    The message names the offending field.
    """


class InvalidIdentifier(InvalidVisit):
    """A value that becomes a path or a target (group id, instrument, detector, day) is not allowed.

    Parameters
    ----------
    message : `str`
        What was wrong; names the field and shows the (shortened) value.
    reason : `str`
        The counted reason, e.g. ``invalid_group``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownInstrumentError(InvalidVisit, KeyError):
    """A message or request names an instrument we have no config for."""

    def __str__(self) -> str:
        # KeyError quotes its argument; keep the plain message.
        return str(self.args[0]) if self.args else ""


class IgnorableVisit(PromptSnakeError):
    """A well-formed next_visit that we deliberately do not process.

    Examples: a stale message, a position not in ICRS, a rotation not in SKY.
    The message names the field and the reason.
    """


class StaleVisit(IgnorableVisit):
    """A next_visit too old to process.

    Parameters
    ----------
    message : `str`
        The field, the age and the limit.
    field : `str`
        The time field that is too old (``private_sndStamp`` or ``startTime``).
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class ServiceStartError(RetriableError, RuntimeError):
    """A local server (PostgreSQL, Kafka broker, S3) failed to start in time."""
