"""When the shim submits a failed target again, and after how long.

A target is retried when its failure may go away by itself: its ``failed.json`` says
``retriable: true`` (a `workflow.core.exceptions.RetriableError`: broker, S3 or
PostgreSQL down, raws late), or it never reached an outcome (``NoOutcome``: its job
was killed).  Non-retriable failures, and unexpected ones (``retriable: null``, a bug
until proven otherwise), stand.  Retrying is safe: the APDB store is guarded per
detector-visit and the alert outbox sends stored alerts once.  The settings are the
``submission.retry`` config section.
"""

from __future__ import annotations

__all__ = ["NO_OUTCOME", "RetryPolicy"]

import dataclasses
from collections.abc import Mapping
from typing import Any

from workflow.stages.records import NO_OUTCOME, FailedRecord


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Bounded attempts with exponential back-off.

    Attributes
    ----------
    max_attempts : `int`
        Attempts in all, the first included (1: never retry).
    backoff_s : `float`
        Wait before the first retry; doubled before each further one.
    backoff_max_s : `float`
        Cap of the wait.
    """

    max_attempts: int = 3
    backoff_s: float = 5.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError(f"retry policy {self}: max_attempts must be >= 1 and back-offs >= 0")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RetryPolicy:
        """Return the policy of the ``submission.retry`` section (defaults for what it omits)."""
        section = dict(config.get("submission", {}).get("retry") or {})
        return cls(**{field.name: section[field.name] for field in dataclasses.fields(cls) if field.name in section})

    def should_retry(self, failure: FailedRecord, attempt: int) -> bool:
        """Return whether a target that failed on attempt ``attempt`` (1-based) is submitted again."""
        return attempt < self.max_attempts and (failure.retriable is True or failure.error == NO_OUTCOME)

    def delay_s(self, attempt: int) -> float:
        """Return the back-off after failed attempt ``attempt`` (1-based): ``backoff_s * 2**(attempt-1)``, capped."""
        return float(min(self.backoff_s * 2.0 ** max(attempt - 1, 0), self.backoff_max_s))
