"""The fault suite's stand-in workflow: the night simulator's, with S3 reads, PostgreSQL rows and a poison target.

`write_fault_snakefile` writes `stream_shim.testbed.night_standin`'s Snakefile with
these changes:

- *ingest* reads its raw from the raw bucket (``fetch_raw``), so an S3 outage
  reaches the jobs, not only the camera and the shim;
- optionally, one detector-visit no rule can build: the ``visit``-th group the
  camera announces (its expectation files ``night/expect/{group}.txt``, in the
  order of their names, which are the groups' ISO timestamps), detector ``detector``.
  Its *prep* then needs ``night/unbuildable/{instrument}/{day_obs}/{group}/{detector}.json``,
  which no rule makes: the streaming Snakemake meets a ``MissingInputException``
  and the shim quarantines that target alone (`stream_shim.quarantine`).  The
  camera writes a visit's expectations before it publishes the next_visit, so the
  position is known when the target reaches Snakemake;
- optionally (``apdb``: an `ApdbRows` table on a PostgreSQL server), *apdb* stores
  one row per detector-visit in that table before its sleep, at most once, the way
  the real APDB store is guarded (`workflow.apdb.store.store_detector_visit` asks
  ``containsVisitDetector`` first: here one ``INSERT ... WHERE NOT EXISTS``, so a
  row stored twice shows as a duplicate).  A server that cannot be reached fails
  the stage with `StandinApdbUnavailable`, a `workflow.core.exceptions.RetriableError`,
  and its ``failed.json`` says ``retriable: true`` (the rule of
  `workflow.stages.target.classify_error`): the shim's automatic retries redo it.
  The stage is ``python -m stream_shim.testbed.fault_standin`` (`main`).
"""

from __future__ import annotations

__all__ = [
    "UNBUILDABLE_DIR",
    "ApdbRows",
    "StandinApdbUnavailable",
    "Unbuildable",
    "main",
    "store_row",
    "write_fault_snakefile",
]

import argparse
import dataclasses
import logging
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stream_shim.testbed.night_standin import EXPECT_DIR, CostModel, write_standin_snakefile
from workflow.core.exceptions import NonRetriableError, RetriableError
from workflow.stages.records import FailedRecord, write_record

_log = logging.getLogger(__name__)

UNBUILDABLE_DIR = "night/unbuildable"
"""Under the run directory: where the missing input of the crafted poison target would be (never written)."""


@dataclasses.dataclass(frozen=True)
class Unbuildable:
    """The detector-visit no rule can build.

    Attributes
    ----------
    ordinal : `int`
        Position (0-based) of its group among the camera's expectation files, by name.
    detector : `int`
        Its detector id.
    """

    ordinal: int
    detector: int


class StandinApdbUnavailable(RetriableError, ConnectionError):
    """The stand-in APDB's PostgreSQL cannot be reached now; the message names the server and the target."""


_TABLE = re.compile(r"[a-z_][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class ApdbRows:
    """Where the stand-in *apdb* stores its rows: a table of a PostgreSQL database.

    Attributes
    ----------
    host, port, database, user : `str`, `int`, `str`, `str`
        The server (trust authentication, as `stream_shim.testbed.local_services.PostgresServer`).
    table : `str`
        Table name (created by `create`).
    connect_timeout_s : `int`
        libpq's ``connect_timeout``.
    """

    host: str
    port: int
    database: str
    user: str
    table: str = "standin_apdb_rows"
    connect_timeout_s: int = 5

    def __post_init__(self) -> None:
        if not _TABLE.fullmatch(self.table):
            raise ValueError(f"stand-in APDB table {self.table!r} must match {_TABLE.pattern}")

    @property
    def where(self) -> str:
        """The server and table, for messages."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database} table {self.table}"

    def connect(self) -> Any:
        """Return a psycopg2 connection (autocommit off).

        Raises
        ------
        StandinApdbUnavailable
            If the server cannot be reached.
        """
        import psycopg2

        try:
            return psycopg2.connect(
                host=self.host,
                port=self.port,
                dbname=self.database,
                user=self.user,
                connect_timeout=self.connect_timeout_s,
            )
        except psycopg2.OperationalError as exc:
            raise StandinApdbUnavailable(f"stand-in APDB at {self.where} is unreachable: {exc}".strip()) from exc

    def create(self) -> None:
        """Create the table unless it exists (no unique key: a duplicate row must be countable)."""
        conn = self.connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} (group_id text NOT NULL, detector integer NOT NULL, "
                    "stored_at timestamptz NOT NULL DEFAULT now())"
                )
        finally:
            conn.close()

    def rows(self, groups: Sequence[str]) -> list[tuple[str, int]]:
        """Return ``(group, detector)`` of every row of ``groups`` (a duplicate row appears twice)."""
        conn = self.connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(f"SELECT group_id, detector FROM {self.table} WHERE group_id = ANY(%s)", (list(groups),))
                return [(str(g), int(d)) for g, d in cur.fetchall()]
        finally:
            conn.close()

    def args(self) -> list[str]:
        """Return the command-line options of `main` that name this table."""
        return [
            f"--{name.replace('_', '-')}={getattr(self, name)}"
            for name in ("host", "port", "database", "user", "table", "connect_timeout_s")
        ]


def store_row(rows: ApdbRows, *, instrument: str, day_obs: str, group: str, detector: int) -> bool:
    """Store the detector-visit's row unless it is there; return whether it was stored now.

    Raises
    ------
    StandinApdbUnavailable
        If the server cannot be reached, or the connection broke (the transaction is rolled back).
    """
    import psycopg2

    target = f"{instrument} {day_obs} group {group} detector {detector}"
    conn = rows.connect()
    try:
        with conn, conn.cursor() as cur:
            # Only the same target ever stores this row, and never two of its runs at once (the shim's dedupe).
            cur.execute(
                f"INSERT INTO {rows.table} (group_id, detector) SELECT %s, %s "
                f"WHERE NOT EXISTS (SELECT 1 FROM {rows.table} WHERE group_id = %s AND detector = %s)",
                (group, detector, group, detector),
            )
            return bool(cur.rowcount)
    except psycopg2.OperationalError as exc:
        raise StandinApdbUnavailable(f"stand-in APDB at {rows.where}: {target}: connection lost: {exc}") from exc
    finally:
        conn.close()


def _classify(error: BaseException) -> tuple[str, bool | None]:
    """`workflow.stages.target.classify_error`'s rule (not imported: its astropy import costs seconds per job)."""
    if isinstance(error, RetriableError):
        return type(error).__name__, True
    if isinstance(error, NonRetriableError):
        return type(error).__name__, False
    return type(error).__name__, None


def main(argv: Sequence[str] | None = None) -> int:
    """The stand-in *apdb* store: ``python -m stream_shim.testbed.fault_standin --failed F ... --detector D``.

    Stores the row (`store_row`); on a failure writes the target's ``failed.json``
    (a `workflow.stages.records.FailedRecord`, stage ``apdb``) and returns 1.
    """
    parser = argparse.ArgumentParser(description="stand-in apdb: one PostgreSQL row per detector-visit")
    for name in ("host", "database", "user", "table", "instrument", "day-obs", "group", "failed"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("port", "connect-timeout-s", "detector"):
        parser.add_argument(f"--{name}", type=int, required=True)
    args = parser.parse_args(argv)
    rows = ApdbRows(args.host, args.port, args.database, args.user, args.table, args.connect_timeout_s)
    started = time.monotonic()
    try:
        stored = store_row(
            rows, instrument=args.instrument, day_obs=args.day_obs, group=args.group, detector=args.detector
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes the target's failed.json
        error, retriable = _classify(exc)
        write_record(
            args.failed,
            FailedRecord(
                error=error,
                retriable=retriable,
                message=str(exc),
                stage="apdb",
                instrument=args.instrument,
                day_obs=args.day_obs,
                group=args.group,
                detector=args.detector,
                seconds=round(time.monotonic() - started, 3),
            ),
        )
        print(f"apdb failed: {error}: {exc}", file=sys.stderr)
        return 1
    print(f"apdb row {'stored' if stored else 'already there'}: {args.group} detector {args.detector}")
    return 0


_PRELUDE = '''\
import os


def unbuildable_input(wildcards):
    """The fault suite's poison: one detector-visit needs a file that no rule makes."""
    if int(wildcards.detector) != {detector}:
        return []
    try:
        groups = sorted(name[:-4] for name in os.listdir({expect!r}) if name.endswith(".txt"))
    except OSError:
        return []
    if {ordinal} < len(groups) and groups[{ordinal}] == wildcards.group:
        return {missing!r}.format(
            instrument=wildcards.instrument,
            day_obs=wildcards.day_obs,
            group=wildcards.group,
            detector=wildcards.detector,
        )
    return []
'''


def write_fault_snakefile(
    path: Path,
    cost: CostModel,
    *,
    paths: Mapping[str, str],
    poll_s: float,
    raw_timeout_s: float,
    unbuildable: Unbuildable | None = None,
    apdb: ApdbRows | None = None,
) -> Path:
    """Write the fault suite's stand-in Snakefile to ``path`` and return it.

    Parameters
    ----------
    path : `pathlib.Path`
        Where to write it.
    cost : `stream_shim.testbed.night_standin.CostModel`
        Seconds per stage.
    paths : `~collections.abc.Mapping`
        The config's ``paths``.
    poll_s : `float`
        Ingest's poll interval (arrival index and S3 reads).
    raw_timeout_s : `float`
        Ingest's deadline for its raw, found and read.
    unbuildable : `Unbuildable`, optional
        The crafted poison target, if any.
    apdb : `ApdbRows`, optional
        The table *apdb* stores its rows in (default: it only sleeps).
    """
    prelude, extra = "", None
    if unbuildable is not None:
        missing = UNBUILDABLE_DIR + "/{instrument}/{day_obs}/{group}/{detector}.json"
        prelude = _PRELUDE.format(
            detector=int(unbuildable.detector), ordinal=int(unbuildable.ordinal), expect=EXPECT_DIR, missing=missing
        )
        extra = {"prep": {"poison": "unbuildable_input"}}
    written = write_standin_snakefile(
        path,
        cost,
        paths=paths,
        poll_s=poll_s,
        raw_timeout_s=raw_timeout_s,
        fetch_raw=True,
        prelude=prelude,
        extra_inputs=extra,
    )
    if apdb is not None:
        written.write_text(_with_apdb_rows(written.read_text(), apdb, paths["results"]))
    return written


_JOB_START = 'extra=""; '
"""Where a stand-in job's bash starts its work (`stream_shim.testbed.night_standin`'s ``_START``)."""


def _with_apdb_rows(text: str, apdb: ApdbRows, results: str) -> str:
    """Return the Snakefile ``text`` whose *apdb* rule stores its row first (`main`)."""
    start = text.index("rule apdb:")
    end = text.index("\nrule ", start + 1)
    rule = text[start:end]
    if rule.count(_JOB_START) != 1:
        raise ValueError(f"stand-in Snakefile: rule apdb does not start its work with {_JOB_START!r} once")
    failed = f"{results}/{{wildcards.instrument}}/{{wildcards.day_obs}}/{{wildcards.group}}/{{wildcards.detector}}"
    words = [shlex.quote(sys.executable), "-m", "stream_shim.testbed.fault_standin", *apdb.args()]
    words += [
        "--instrument={wildcards.instrument:q}",
        "--day-obs={wildcards.day_obs:q}",
        "--group={wildcards.group:q}",
        "--detector={wildcards.detector}",
        f"--failed={failed}/failed.json",
    ]
    command = " ".join(words)
    if "'" in command or '"' in command or "\\" in command:
        raise ValueError(f"stand-in apdb command {command!r}: quotes or backslashes would break the rule")
    return text[:start] + rule.replace(_JOB_START, _JOB_START + command + "; ") + text[end:]


if __name__ == "__main__":
    sys.exit(main())
