"""Writer schemas of framed Avro messages, by schema-registry id.

A Kafka message in the Confluent wire format starts with magic byte 0 and a
4-byte big-endian schema id; the id names the schema the body was *written*
with, which may differ from the one we read with (schema evolution on the
summit: a field added, removed, moved).  A `SchemaSource` turns an id into that
writer schema, parsed for fastavro, or `None` when it does not know the id:

- `LocalSchemas`: a directory of ``<id>.avsc`` files; the embedded default,
  `shipped_schemas`, is ``workflow/data/next_visit.<id>.avsc``, which holds the
  current summit schema under `NEXT_VISIT_SCHEMA_ID`;
- `RegistrySchemas`: a Confluent schema registry (``GET /schemas/ids/{id}``)
  through confluent-kafka's `SchemaRegistryClient`, which caches what it fetched;
  ids it does not know are remembered for a while, so a stream of messages with a
  bad id costs one request, not one each.

`schema_source` picks one from the configuration (``kafka.schema_registry_url``,
``kafka.schema_dir``).
"""

from __future__ import annotations

__all__ = [
    "NEXT_VISIT_SCHEMA_ID",
    "LocalSchemas",
    "RegistrySchemas",
    "SchemaRegistryUnavailableError",
    "SchemaSource",
    "UnknownSchemaError",
    "schema_source",
    "shipped_schemas",
]

import functools
import json
import logging
import threading
import time
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Protocol, cast

import fastavro

from workflow.core.exceptions import InvalidVisit, RetriableError

_log = logging.getLogger(__name__)

NEXT_VISIT_SCHEMA_ID = 1
"""Id of the shipped summit ``logevent_nextVisit`` schema among the shipped schemas."""
_SHIPPED_PACKAGE = "workflow.data"
_SHIPPED_PREFIX = "next_visit."
_REGISTRY_TIMEOUT_S = 5.0
_UNKNOWN_TTL_S = 60.0
"""How long an id the registry said it does not know is not asked again."""


class UnknownSchemaError(InvalidVisit):
    """A framed message names a schema id that the schema source does not know.

    Parameters
    ----------
    message : `str`
        What happened (names the id and the source).
    schema_id : `int`
        The id in the framing.
    """

    def __init__(self, message: str, *, schema_id: int) -> None:
        super().__init__(message)
        self.schema_id = schema_id


class SchemaRegistryUnavailableError(RetriableError, ConnectionError):
    """The schema registry did not answer (or answered with a server error); the message names its URL."""


class SchemaSource(Protocol):
    """Where writer schemas come from, by id."""

    def writer_schema(self, schema_id: int) -> dict[str, Any] | None:
        """Return the parsed writer schema of ``schema_id``, or `None` if it is unknown."""
        ...

    def describe(self) -> str:
        """Return where the schemas come from, for messages."""
        ...


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        schema = fastavro.parse_schema(json.loads(text))
    except Exception as exc:  # noqa: BLE001 - json and fastavro raise many types on a bad schema
        raise InvalidVisit(f"Avro schema {where} does not parse: {type(exc).__name__}: {exc}") from exc
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise InvalidVisit(f"Avro schema {where} is not a record schema")
    return cast(dict[str, Any], schema)


class LocalSchemas:
    """Schemas from a directory: ``<prefix><id>.avsc`` per schema id.

    Parameters
    ----------
    directory : `pathlib.Path` or `importlib.resources.abc.Traversable`
        The directory; read once, when first asked.
    prefix : `str`, optional
        What the file names start with before the id.
    """

    def __init__(self, directory: Path | Traversable, *, prefix: str = "") -> None:
        self.directory, self.prefix = directory, prefix
        self._schemas: dict[int, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        """Return ``schema directory <path>``."""
        return f"schema directory {self.directory} ({self.prefix}<id>.avsc)"

    def ids(self) -> list[int]:
        """Return the schema ids the directory holds, sorted."""
        return sorted(self._load())

    def writer_schema(self, schema_id: int) -> dict[str, Any] | None:
        """Return the parsed schema of ``<prefix><schema_id>.avsc``, or `None` if there is no such file."""
        return self._load().get(schema_id)

    def _load(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            if self._schemas is None:
                schemas = {}
                for entry in self.directory.iterdir():
                    name = entry.name
                    stem = name[len(self.prefix) : -len(".avsc")]
                    if name.startswith(self.prefix) and name.endswith(".avsc") and stem.isdigit():
                        where = f"{self.directory}/{entry.name}"
                        schemas[int(stem)] = _parse(entry.read_text(encoding="utf-8"), where)
                self._schemas = schemas
            return self._schemas


class RegistrySchemas:
    """Schemas from a Confluent schema registry (``GET /schemas/ids/{id}``), cached.

    Parameters
    ----------
    url : `str`
        Base URL of the registry.
    timeout_s : `float`, optional
        Bound on one request.
    client_config : `~collections.abc.Mapping`, optional
        Further `SchemaRegistryClient` settings (e.g. ``basic.auth.user.info``).
    """

    def __init__(
        self, url: str, *, timeout_s: float = _REGISTRY_TIMEOUT_S, client_config: Mapping[str, Any] | None = None
    ) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.url = url
        # one retry: the consume loop retries a message whose handling raised (RetriableError)
        settings = {"url": url, "timeout": timeout_s, "max.retries": 1, "retries.wait.ms": 200}
        self._client = SchemaRegistryClient({**settings, **(client_config or {})})
        self._parsed: dict[int, dict[str, Any]] = {}
        self._unknown: dict[int, float] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        """Return ``schema registry <url>``."""
        return f"schema registry {self.url}"

    def writer_schema(self, schema_id: int) -> dict[str, Any] | None:
        """Fetch (once) and return the Avro schema registered under ``schema_id``; `None` if not registered.

        Raises
        ------
        SchemaRegistryUnavailableError
            If the registry cannot be reached or answers with anything but the
            schema or "not found".
        InvalidVisit
            If the registered schema is not an Avro record schema.
        """
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        with self._lock:
            if schema_id in self._parsed:
                return self._parsed[schema_id]
            if time.monotonic() < self._unknown.get(schema_id, -1.0):
                return None
        try:
            registered = self._client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                with self._lock:
                    self._unknown[schema_id] = time.monotonic() + _UNKNOWN_TTL_S
                return None
            raise SchemaRegistryUnavailableError(f"schema registry {self.url}: schema id {schema_id}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - httpx raises many types when a server is away
            raise SchemaRegistryUnavailableError(
                f"schema registry {self.url} unreachable (schema id {schema_id}): {type(exc).__name__}: {exc}"
            ) from exc
        kind = registered.schema_type or "AVRO"
        if kind != "AVRO":
            raise InvalidVisit(f"schema registry {self.url}: schema id {schema_id} is {kind}, not AVRO")
        if not registered.schema_str:
            raise InvalidVisit(f"schema registry {self.url}: schema id {schema_id} has no schema text")
        schema = _parse(registered.schema_str, f"id {schema_id} of {self.url}")
        with self._lock:
            self._parsed[schema_id] = schema
        _log.info("schema registry %s: fetched writer schema id %d (%s)", self.url, schema_id, schema.get("name"))
        return schema


@functools.cache
def shipped_schemas() -> LocalSchemas:
    """Return the shipped schemas (``workflow/data/next_visit.<id>.avsc``), shared by the process."""
    return LocalSchemas(resources.files(_SHIPPED_PACKAGE), prefix=_SHIPPED_PREFIX)


def schema_source(config: Mapping[str, Any], *, base_dir: str | Path | None = None) -> SchemaSource:
    """Return the writer-schema source the configuration asks for.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration: ``kafka.schema_registry_url`` (a registry; wins when
        set) or ``kafka.schema_dir`` (a directory of ``<id>.avsc``); neither: the
        shipped schemas.
    base_dir : `str` or `pathlib.Path`, optional
        Directory a relative ``schema_dir`` is relative to (default: the cwd).
    """
    kafka = config.get("kafka") or {}
    url = kafka.get("schema_registry_url")
    if url:
        return RegistrySchemas(str(url))
    directory = kafka.get("schema_dir")
    if directory:
        path = Path(directory)
        return LocalSchemas(path if path.is_absolute() else Path(base_dir or Path.cwd()) / path)
    return shipped_schemas()
