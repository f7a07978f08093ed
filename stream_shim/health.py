"""Start-up health checks: Kafka, S3 (raw bucket), central repo, APDB.

The checks run side by side (the Butler and APDB imports take ~2 s each) and
every failure is reported in one `HealthCheckError` message, one line per
service, so an operator sees at once what is missing.  Missing topics are
created (a broker that refuses is a failure); a missing SQLite APDB is created,
which also keeps two first targets from racing to create it.  Every message is
passed through `workflow.core.redact.redact_text` (a ``db_url`` password never
reaches the log or the `HealthCheckError`), and a password written in
``apdb.db_url`` itself draws a warning: it belongs in ``db-auth.yaml`` or
``PGPASSWORD`` (docs/operations.md, "Credentials").
"""

from __future__ import annotations

__all__ = [
    "Check",
    "HealthCheckError",
    "check_kafka",
    "check_s3",
    "check_central_repo",
    "check_apdb",
    "run_health_checks",
]

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from workflow.core.exceptions import RetriableError
from workflow.core.redact import redact_text, redact_url

_log = logging.getLogger(__name__)


class HealthCheckError(RetriableError, RuntimeError):
    """A service the shim needs is unavailable; the message lists every failed check."""


@dataclasses.dataclass(frozen=True)
class Check:
    """The result of one check."""

    name: str
    ok: bool
    message: str
    seconds: float


def _timed(name: str, probe: Callable[[], str]) -> Check:
    start = time.monotonic()
    try:
        message = probe()
        return Check(name, True, redact_text(message), time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001 - every failure becomes part of the report
        text = " ".join(str(exc).split()) or type(exc).__name__
        return Check(name, False, redact_text(f"{type(exc).__name__}: {text}"), time.monotonic() - start)


def check_kafka(bootstrap: str | None, topics: Sequence[str], *, timeout_s: float = 10.0) -> str:
    """Check the broker answers; create missing topics.

    Raises
    ------
    ConnectionError
        If the broker does not answer or refuses to create a topic.
    ValueError
        If no broker is configured.
    """
    if not bootstrap:
        raise ValueError(
            "kafka.bootstrap is null: the shim consumes Kafka topics; set it in an extra config "
            "file (scripts/live_demo.py starts a local broker)"
        )
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise ConnectionError(f"broker {bootstrap} not reachable within {timeout_s:g} s: {exc}") from None
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if missing:
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=1, replication_factor=1) for t in missing], operation_timeout=timeout_s
        )
        for topic, future in futures.items():
            try:
                future.result(timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - already-exists races are fine
                if "exist" not in str(exc).lower():
                    raise ConnectionError(f"broker {bootstrap}: cannot create topic {topic!r}: {exc}") from None
    return f"broker {bootstrap}: {len(topics)} topic(s) ready" + (f", created {missing}" if missing else "")


def check_s3(config: Mapping[str, Any], bucket: str) -> str:
    """Check the raw bucket exists and can be listed.

    Raises
    ------
    workflow.core.buckets.BucketUnavailableError
        If the server or the bucket is unavailable.
    """
    from workflow.core.buckets import open_bucket

    store = open_bucket(config, bucket)
    store.list("prompt-snake-health-check/")
    where = config["storage"].get("endpoint_url") or f"directory {config['storage']['local_root']}"
    return f"bucket {bucket} at {where} readable"


def check_central_repo(root: str) -> str:
    """Check the central Butler repository opens.

    Raises
    ------
    workflow.core.exceptions.NonRetriableError
        If there is no repository there.
    """
    from workflow.repo.central_repo import open_central_repo

    butler = open_central_repo(root)
    return f"central repo {root}: {len(butler.collections.query('*'))} collection(s)"


def check_apdb(apdb_config: Mapping[str, Any]) -> str:
    """Check the APDB opens (a missing SQLite one is created).

    Raises
    ------
    workflow.apdb.store.ApdbUnavailableError, workflow.apdb.store.ApdbNotFoundError,
    workflow.apdb.store.ApdbVersionError
        As `workflow.apdb.store.open_apdb`.
    """
    from workflow.apdb.store import open_apdb

    db_url = apdb_config.get("db_url") or ""
    if db_url and redact_url(db_url) != db_url:
        _log.warning(
            "apdb.db_url %s carries its password in the URL; move it to db-auth.yaml or PGPASSWORD "
            "(docs/operations.md)",
            redact_url(db_url),
        )
    open_apdb(apdb_config, create=True)
    return f"APDB {redact_url(db_url) if db_url else apdb_config.get('config_file')} ready"


def run_health_checks(config: Mapping[str, Any], *, workdir: Path, topics: Sequence[str]) -> list[Check]:
    """Run every check; raise if any failed.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration.
    workdir : `pathlib.Path`
        Run directory (relative paths of the config are relative to it).
    topics : sequence of `str`
        Topics that must exist (created if missing).

    Returns
    -------
    checks : `list` [`Check`]
        All passed.

    Raises
    ------
    HealthCheckError
        If any check failed; one line per failed check.
    """
    root = str(config["central_repo"])
    if "://" not in root and not Path(root).is_absolute():
        root = str(Path(workdir) / root)
    probes = {
        "kafka": lambda: check_kafka(config["kafka"]["bootstrap"], topics),
        "s3": lambda: check_s3(config, config["buckets"]["raw"]),
        "central_repo": lambda: check_central_repo(root),
        "apdb": lambda: check_apdb(config["apdb"]),
    }
    with concurrent.futures.ThreadPoolExecutor(len(probes), thread_name_prefix="health") as pool:
        futures = {name: pool.submit(_timed, name, probe) for name, probe in probes.items()}
        checks = [future.result() for future in futures.values()]
    for check in checks:
        _log.info(
            "health %s: %s (%.2f s)",
            check.name,
            check.message if check.ok else "FAILED " + check.message,
            check.seconds,
        )
    failed = [c for c in checks if not c.ok]
    if failed:
        raise HealthCheckError("start-up health check failed: " + "; ".join(f"{c.name}: {c.message}" for c in failed))
    return checks
