"""The alert outbox of one detector-visit: alerts are written before the APDB store, sent from here.

Without it, a job killed between the APDB store and the end of sending loses those
alerts: its retry finds the detector-visit already stored and skips store and send.
With it, the APDB load writes the alerts to ``<outbox>.avro`` before storing, sends
them, then renames the file to ``<outbox>.avro.sent``.  A retry that finds a pending
file sends it (the alerts computed together with what was stored); one that finds
``.sent`` sends nothing.  Delivery becomes at least once: a kill after the broker
acknowledged but before the rename sends them again, and consumers dedupe on
``alertId``.
"""

from __future__ import annotations

__all__ = ["AlertOutbox"]

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import fastavro

from workflow.apdb.alerts import write_alert_file

_log = logging.getLogger(__name__)


class AlertOutbox:
    """Pending and sent alerts of one detector-visit, as files next to its work area.

    Parameters
    ----------
    path : `str` or `os.PathLike`
        The pending file (Avro object container); ``<path>.sent`` once delivered.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.sent_path = self.path.with_name(self.path.name + ".sent")

    @property
    def sent(self) -> bool:
        """Whether these alerts were delivered by an earlier attempt (`bool`)."""
        return self.sent_path.exists()

    def prepare(self, alerts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
        """Return the alerts this attempt must send, writing them to the outbox first if new.

        Parameters
        ----------
        alerts : sequence of `~collections.abc.Mapping`
            The alerts this attempt built.

        Returns
        -------
        to_send : `list` [`dict`] or `None`
            An earlier attempt's pending alerts if there are any (they belong to what
            that attempt may have stored), else ``alerts`` (now in the outbox);
            `None` if they were already sent.
        """
        if self.sent:
            return None
        if self.path.exists():
            with open(self.path, "rb") as stream:
                pending = [dict(cast(dict[str, Any], record)) for record in fastavro.reader(stream)]  # alert records
            _log.info("%s: %d alerts pending from an earlier attempt", self.path, len(pending))
            return pending
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as stream:
            write_alert_file(stream, alerts)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, self.path)
        return [dict(a) for a in alerts]

    def mark_sent(self) -> None:
        """Record that the pending alerts were delivered."""
        os.replace(self.path, self.sent_path)
