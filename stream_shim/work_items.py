"""Work items of the worker pool: one detector-visit per Kafka message of the work topic.

The fan-out (`stream_shim.fanout`) turns each usable next_visit into one `WorkItem` per
active detector and produces it to the work topic (``kafka_topics.detector_visit``),
keyed by detector, on partition `partition_for` (the detector modulo the partition
count): a detector always lands on the same partition, hence on the same worker
between rebalances, whose node-local calib/template cache then stays warm.

The value is JSON: the fields of `workflow.core.visit.DetectorVisit.to_dict` plus
``schema_version``.  `decode_work_item` refuses anything else with a `BadWorkItem`
naming the reason (``malformed``, ``unknown_version``, ``invalid_<identifier>``) and
where the message was; the worker counts it and moves on, so a bad item never blocks
its partition.
"""

from __future__ import annotations

__all__ = [
    "WORK_ITEM_VERSION",
    "BadWorkItem",
    "WorkItem",
    "decode_work_item",
    "partition_for",
    "work_topic",
]

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from workflow.core.exceptions import InvalidIdentifier, InvalidVisit
from workflow.core.log_fields import shorten
from workflow.core.visit import DetectorVisit

WORK_ITEM_VERSION = 1
"""Version of the work item record; a worker drops items of any other version."""
_MAX_ITEM_BYTES = 64 * 1024  # a detector-visit is ~600 bytes: anything far larger is not one


class BadWorkItem(ValueError):
    """A work item that cannot be processed.

    Parameters
    ----------
    reason : `str`
        Counted reason: ``malformed``, ``unknown_version`` or ``invalid_<kind>``.
    message : `str`
        What is wrong, and where the item was.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One detector-visit to process: the record crossing the work topic.

    Attributes
    ----------
    visit : `workflow.core.visit.DetectorVisit`
        The detector's visit (its visit file's content).
    schema_version : `int`
        `WORK_ITEM_VERSION` when made here.
    """

    visit: DetectorVisit
    schema_version: int = WORK_ITEM_VERSION

    @property
    def detector(self) -> int:
        """The detector id (`int`)."""
        return self.visit.detector

    def to_dict(self) -> dict[str, Any]:
        """Return the record: the visit's fields and ``schema_version``."""
        return {"schema_version": self.schema_version, **self.visit.to_dict()}

    def encode(self) -> bytes:
        """Return the Kafka message value (UTF-8 JSON)."""
        return json.dumps(self.to_dict(), allow_nan=False, sort_keys=True).encode()

    def key(self) -> bytes:
        """Return the Kafka message key: the detector id."""
        return str(self.visit.detector).encode()


def decode_work_item(value: bytes | str | None, *, where: str = "work item") -> WorkItem:
    """Read a work item from a Kafka message value.

    Parameters
    ----------
    value : `bytes`, `str` or `None`
        The message value.
    where : `str`, optional
        Where the message was (topic, partition, offset), for the error message.

    Returns
    -------
    item : `WorkItem`

    Raises
    ------
    BadWorkItem
        If the value is empty, too large, not a JSON object, of another
        ``schema_version``, misses a field or has a bad one (``reason``
        ``malformed``), or holds an identifier that would be a bad path
        (``reason`` ``invalid_<kind>``, `workflow.core.identifiers`).
    """
    if value is None or len(value) == 0:
        raise BadWorkItem("malformed", f"{where}: empty message")
    if len(value) > _MAX_ITEM_BYTES:
        raise BadWorkItem("malformed", f"{where}: {len(value)} bytes, more than a work item's {_MAX_ITEM_BYTES}")
    try:
        data = json.loads(value)
    except (ValueError, TypeError) as exc:
        raise BadWorkItem("malformed", f"{where}: not JSON: {shorten(str(exc))}") from None
    except RecursionError:
        raise BadWorkItem("malformed", f"{where}: nested too deeply") from None
    if not isinstance(data, Mapping):
        raise BadWorkItem("malformed", f"{where}: a JSON {type(data).__name__}, not an object")
    version = data.get("schema_version")
    if version != WORK_ITEM_VERSION:
        raise BadWorkItem(
            "unknown_version", f"{where}: schema_version {shorten(version)}, this worker reads {WORK_ITEM_VERSION}"
        )
    try:
        visit = DetectorVisit.from_dict(data)
    except InvalidIdentifier as exc:
        raise BadWorkItem(exc.reason, f"{where}: {exc}") from None
    except (InvalidVisit, TypeError, ValueError) as exc:
        raise BadWorkItem("malformed", f"{where}: {shorten(str(exc))}") from None
    return WorkItem(visit, int(version))


def partition_for(detector: int, partitions: int) -> int:
    """Return the work topic partition of a detector: ``detector % partitions``.

    Parameters
    ----------
    detector : `int`
        Detector id (non-negative).
    partitions : `int`
        Partitions of the work topic (``pool.partitions``).

    Raises
    ------
    ValueError
        If ``partitions`` < 1 or ``detector`` < 0.
    """
    if partitions < 1:
        raise ValueError(f"work topic partitions {partitions}: must be >= 1")
    if detector < 0:
        raise ValueError(f"detector {detector}: must be >= 0")
    return int(detector) % int(partitions)


def work_topic(config: Mapping[str, Any]) -> str:
    """Return the work topic's name: ``kafka_topics.detector_visit``, or ``detector-visit-<instrument>``."""
    name = config["kafka_topics"].get("detector_visit")
    return str(name) if name else f"detector-visit-{config['instrument']['name']}"
