"""Tests that credentials stay secret: `workflow.core.redact`, the logging filter, snapshots, health, status."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stream_shim.health import HealthCheckError, run_health_checks
from stream_shim.status import ShimStatus
from stream_shim.testbed.local_services import PostgresServer
from workflow.core.config import load_config, write_config_snapshot
from workflow.core.log_setup import configure_logging
from workflow.core.redact import redact_text, redact_url
from workflow.stages.target import classify_error

SECRET = "hunter2-Zq9"


def _with_password(url: str) -> str:
    """``postgresql+psycopg2://user@host...`` -> ``...://user:SECRET@host...`` (trust auth accepts any)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{SECRET}@{host}"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back as it was after a test configures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class TestRedact:
    """Tests for `workflow.core.redact.redact_url` / `redact_text`."""

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
            ("postgresql+psycopg2://u:p%40ss@127.0.0.1:5432/db", "postgresql+psycopg2://u:***@127.0.0.1:5432/db"),
            ("postgresql+psycopg2://u@host/db", "postgresql+psycopg2://u@host/db"),
            ("sqlite:////tmp/apdb.sqlite3", "sqlite:////tmp/apdb.sqlite3"),
            ("http://s3.svc:8333/bucket/key", "http://s3.svc:8333/bucket/key"),
            ("postgresql://u@h/db?password=pw&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
            (
                "https://b.s3/k?X-Amz-Signature=abc&X-Amz-Expires=60",
                "https://b.s3/k?X-Amz-Signature=***&X-Amz-Expires=60",
            ),
        ],
    )
    def test_redact_url(self, url: str, expected: str) -> None:
        assert redact_url(url) == expected
        assert redact_url(expected) == expected  # idempotent

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("APDB postgresql://u:pw@h/db ready (0.1 s)", "APDB postgresql://u:***@h/db ready (0.1 s)"),
            ("host=h dbname=d user=u password=pw", "host=h dbname=d user=u password=***"),
            (
                "AWS_SECRET_ACCESS_KEY=abc/def+g PGPASSWORD=x PATH=/bin",
                "AWS_SECRET_ACCESS_KEY=*** PGPASSWORD=*** PATH=/bin",
            ),
            ('{"aws_secret_access_key": "abc", "region": "us"}', '{"aws_secret_access_key": "***", "region": "us"}'),
            ("sasl.password: pw", "sasl.password: ***"),
            ("Authorization: Bearer eyJ0eXAi.x.y", "Authorization: Bearer ***"),
            ("visit 42: 3 DIA sources", "visit 42: 3 DIA sources"),
        ],
    )
    def test_redact_text(self, text: str, expected: str) -> None:
        assert redact_text(text) == expected


class TestLogging:
    """Every handler that `workflow.core.log_setup.configure_logging` installs redacts."""

    @pytest.mark.parametrize("json_lines", [False, True])
    def test_message_arguments_traceback_and_extras_are_redacted(self, root_logging: None, json_lines: bool) -> None:
        stream = io.StringIO()
        configure_logging("root=DEBUG", json_lines=json_lines, stream=stream)
        log = logging.getLogger("stream_shim.anything")
        url = f"postgresql+psycopg2://prompt_snake:{SECRET}@db.example:5432/apdb"
        log.info("connecting to %s", url)
        log.warning("env: PGPASSWORD=%s", SECRET, extra={"db_url": url})
        try:
            raise ConnectionError(f"cannot reach {url}")
        except ConnectionError:
            log.exception("failed")
        text = stream.getvalue()
        assert SECRET not in text
        assert "prompt_snake:***@db.example:5432/apdb" in text and "PGPASSWORD=***" in text
        assert "ConnectionError: cannot reach" in text  # the traceback is kept, without the password
        if json_lines:
            assert all(json.loads(line) for line in text.splitlines() if line.startswith("{"))

    def test_stage_error_messages_are_redacted(self) -> None:
        record = classify_error(ConnectionError(f"APDB at postgresql://u:{SECRET}@h/db is unreachable"))
        assert SECRET not in record["message"] and "postgresql://u:***@h/db" in record["message"]


def _shim_config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "central_repo": str(tmp_path / "no-repo"),
                "storage": {"endpoint_url": None, "local_root": str(tmp_path / "buckets")},
                "apdb": {"db_url": db_url},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def apdb_url(postgres_server: PostgresServer) -> str:
    """An APDB in the server's default schema, as a URL with a password in it (trust auth ignores it)."""
    from workflow.apdb.store import create_apdb

    create_apdb(postgres_server.url, drop=True)
    return _with_password(postgres_server.url)


class TestHealthCheck:
    """The shim's start-up health check on a PostgreSQL APDB whose URL holds a password."""

    def test_password_never_reaches_the_log_or_the_error(
        self, tmp_path: Path, apdb_url: str, root_logging: None
    ) -> None:
        config = load_config(instrument="LSSTComCamSim", extra_files=[_shim_config(tmp_path, apdb_url)])
        stream = io.StringIO()
        configure_logging(config["log_levels"], json_lines=True, stream=stream)  # as stream_shim.__main__
        with pytest.raises(HealthCheckError) as info:  # no Kafka, no repo: only the APDB passes
            run_health_checks(config, workdir=tmp_path, topics=["t"])
        text = stream.getvalue()
        assert "health apdb: APDB postgresql+psycopg2://prompt_snake:***@127.0.0.1" in text
        assert "carries its password in the URL; move it to db-auth.yaml or PGPASSWORD" in text
        assert SECRET not in text and SECRET not in str(info.value)

    def test_cli_stderr_holds_no_password(self, tmp_path: Path, apdb_url: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "stream_shim", "--instrument", "LSSTComCamSim"]
            + ["--config-file", str(_shim_config(tmp_path, apdb_url)), "--workdir", str(tmp_path / "run")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 69, result.stderr
        assert "prompt_snake:***@" in result.stderr
        assert SECRET not in result.stderr and SECRET not in result.stdout


class TestSnapshot:
    """`workflow.core.config.write_config_snapshot` keeps the config (and any password in it) to its user."""

    def test_snapshot_is_0600_in_a_0700_directory(self, tmp_path: Path) -> None:
        path = write_config_snapshot(load_config(), tmp_path / ".snakemake" / "prompt-snake")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    def test_an_older_world_readable_snapshot_is_tightened(self, tmp_path: Path) -> None:
        directory = tmp_path / "snap"
        path = write_config_snapshot(load_config(), directory)
        os.chmod(path, 0o644)
        os.chmod(directory, 0o755)
        assert write_config_snapshot(load_config(), directory) == path
        assert (stat.S_IMODE(path.stat().st_mode), stat.S_IMODE(directory.stat().st_mode)) == (0o600, 0o700)


def test_status_page_redacts_condition_details_and_gauge_errors() -> None:
    status = ShimStatus("LSSTComCamSim", "queue")
    status.state = "running"
    status.set_condition("apdb", "degraded", f"APDB at postgresql://u:{SECRET}@h/db is unreachable")

    def failing() -> dict[str, int]:
        raise ConnectionError(f"postgresql://u:{SECRET}@h/db")

    status.gauge("targets", failing)
    texts = [json.dumps(status.snapshot()), status.prometheus(), status.health()[1]]
    assert all(SECRET not in text for text in texts)
    assert "postgresql://u:***@h/db" in texts[0] and "postgresql://u:***@h/db" in texts[2]


class TestDbAuth:
    """A password-free ``db_url`` gets its password from db-auth.yaml, through dax_apdb (lsst.utils.db_auth)."""

    URL = "postgresql+psycopg2://prompt_snake@db.example:5432/apdb"

    def _auth_file(self, tmp_path: Path, mode: int) -> Path:
        path = tmp_path / "db-auth.yaml"
        path.write_text(yaml.safe_dump([{"url": "postgresql://prompt_snake@db.example/apdb", "password": SECRET}]))
        os.chmod(path, mode)
        return path

    def test_password_comes_from_the_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from lsst.dax.apdb.sql import ApdbSql

        monkeypatch.delenv("LSST_DB_AUTH_CREDENTIALS", raising=False)
        monkeypatch.setenv("LSST_DB_AUTH", str(self._auth_file(tmp_path, 0o600)))
        url = str(ApdbSql._connection_url(self.URL, create=False))
        assert url == f"postgresql+psycopg2://prompt_snake:{SECRET}@db.example:5432/apdb"

    def test_a_file_others_can_read_is_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from lsst.dax.apdb.sql import ApdbSql
        from lsst.utils.db_auth import DbAuthPermissionsError

        monkeypatch.delenv("LSST_DB_AUTH_CREDENTIALS", raising=False)
        monkeypatch.setenv("LSST_DB_AUTH", str(self._auth_file(tmp_path, 0o644)))
        with pytest.raises(DbAuthPermissionsError, match="incorrect permissions"):
            ApdbSql._connection_url(self.URL, create=False)
