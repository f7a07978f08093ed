"""Transient object-store errors: tell them apart, and ride through them until a deadline.

The raw bucket is polled for minutes while a detector-visit's raws arrive; an S3
hiccup in that time (a dropped connection, a 503, a timed-out request) must not end
the wait.  `is_transient` says whether an error raised by a `workflow.core.buckets`
call may go away by itself; `TransientErrors` counts and logs each one, and retries a
call until the caller's deadline.  What to raise when the deadline passes is the
caller's business (ingest raises its retriable `RawTimeoutError`).
"""

from __future__ import annotations

__all__ = ["is_transient", "TransientErrors"]

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from workflow.core.buckets import BucketUnavailableError

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
    }
)
"""S3 error codes that mean "try again later" (besides any HTTP 5xx)."""


def _client_error_is_transient(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500) or code.startswith("5")


def is_transient(exc: BaseException) -> bool:
    """Return whether an object-store error may go away if the call is made again later.

    Parameters
    ----------
    exc : `BaseException`
        What a bucket call raised.

    Returns
    -------
    transient : `bool`
        True for an unreachable store (`BucketUnavailableError`, `ConnectionError`,
        `TimeoutError`), a botocore transport error (connection refused or closed,
        connect or read timeout) and an S3 error response that asks to retry
        (HTTP 5xx, ``SlowDown``, ``RequestTimeout``...).  False for everything else,
        notably a missing object (`FileNotFoundError`) and client errors (4xx).
    """
    if isinstance(exc, FileNotFoundError):
        return False
    if isinstance(exc, (BucketUnavailableError, ConnectionError, TimeoutError)):
        return True
    try:
        import botocore.exceptions
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    if isinstance(exc, botocore.exceptions.ClientError):
        return _client_error_is_transient(exc)
    transport = (
        botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
        botocore.exceptions.HTTPClientError,  # ReadTimeoutError, ConnectionClosedError
        botocore.exceptions.ResponseStreamingError,
        botocore.exceptions.IncompleteReadError,
    )
    return isinstance(exc, transport)


class TransientErrors:
    """Count, log and ride through the transient object-store errors of one operation.

    Parameters
    ----------
    what : `str`
        The operation, for logs (e.g. ``"LSSTCam group ... detector 4: raws"``).
    deadline : `float`
        `time.monotonic` time after which a transient error is no longer retried.
    poll_s : `float`, optional
        Pause between attempts of `call`.
    sleep : callable, optional
        How to pause (tests pass a fake clock).

    Attributes
    ----------
    count : `int`
        Transient errors seen so far.
    last : `BaseException` or `None`
        The last of them.
    """

    def __init__(
        self, what: str, *, deadline: float, poll_s: float = 0.5, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.what, self.deadline, self.poll_s, self.sleep = what, deadline, poll_s, sleep
        self.count = 0
        self.last: BaseException | None = None

    def expired(self) -> bool:
        """Return whether the deadline has passed."""
        return time.monotonic() >= self.deadline

    def record(self, exc: BaseException, doing: str) -> None:
        """Count and log one transient error.

        Parameters
        ----------
        exc : `BaseException`
            The error (`is_transient` said so).
        doing : `str`
            The call that raised it (``"listing bucket raw"``, ``"reading raw/key"``).
        """
        self.count += 1
        self.last = exc
        _log.warning(
            "%s: transient object-store error #%d while %s (%.0f s left to wait): %s: %s",
            self.what,
            self.count,
            doing,
            max(self.deadline - time.monotonic(), 0.0),
            type(exc).__name__,
            exc,
        )

    def describe_last(self) -> str:
        """Return ``"; N transient S3 error(s), the last: <class>: <message>"``, or ``""`` if none."""
        if self.last is None:
            return ""
        return f"; {self.count} transient S3 error(s), the last: {type(self.last).__name__}: {self.last}"

    def call(self, function: Callable[[], _T], doing: str, *, on_expired: Callable[[BaseException], Exception]) -> _T:
        """Return ``function()``, calling it again after each transient error until the deadline.

        Parameters
        ----------
        function : callable
            The bucket call.
        doing : `str`
            What it does, for logs.
        on_expired : callable
            Builds the exception raised (from the last error) when a transient error
            happens after the deadline.

        Raises
        ------
        Exception
            ``on_expired(error)`` once the deadline has passed; any non-transient
            error of ``function`` at once.
        """
        while True:
            try:
                return function()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.record(exc, doing)
                if self.expired():
                    raise on_expired(exc) from exc
            self.sleep(min(self.poll_s, max(self.deadline - time.monotonic(), 0.0)))
