"""Tests for `workflow.core.schema_registry` and schema-id resolution of framed Avro next_visits.

The summit evolves its ``logevent_nextVisit`` schema (fields added, removed, moved) and
frames each message with the registry id of the schema it was written with; these
tests write bodies with such writer schemas, as the summit would, and read them
through shipped-style schema files and through a small stand-in of Confluent's
registry REST API (``GET /schemas/ids/{id}``) that confluent-kafka's real
`SchemaRegistryClient` talks to.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fastavro
import pytest
from test_visit import SND_STAMP, make_fields

from stream_shim.consumer import VisitGate
from stream_shim.status import ShimStatus
from stream_shim.testbed.local_services import free_port
from workflow.core.config import PROJECT_ROOT, load_config
from workflow.core.exceptions import InvalidVisit, RetriableError
from workflow.core.schema_registry import (
    NEXT_VISIT_SCHEMA_ID,
    LocalSchemas,
    RegistrySchemas,
    SchemaRegistryUnavailableError,
    UnknownSchemaError,
    schema_source,
    shipped_schemas,
)
from workflow.core.visit import NextVisit, decode_next_visit

INSTRUMENT = "LSSTComCamSim"
SHIPPED = json.loads((PROJECT_ROOT / "workflow" / "data" / "next_visit.1.avsc").read_text())
WHERE = {"topic": "next-visit-test", "partition": 3, "offset": 41}


def _fields(**changes: Any) -> dict[str, Any]:
    # test_visit's summit fields, with the two the Avro schema has beyond the JSON form's
    base = {"private_efdStamp": SND_STAMP - 36.5, "private_seqNum": 42}
    return make_fields(instrument=INSTRUMENT, filters="r_03", **(base | changes))


def _evolved(kind: str) -> dict[str, Any]:
    """The shipped schema as the summit might evolve it (a plain JSON schema)."""
    schema = copy.deepcopy(SHIPPED)
    fields = schema["fields"]
    if kind == "added":  # appended, with a default: our reader ignores it
        fields.append({"name": "private_marker", "type": "string", "default": ""})
    elif kind == "removed":  # gone: our reader gives its default
        schema["fields"] = [f for f in fields if f["name"] not in ("totalCheckpoints", "survey")]
    elif kind == "inserted":  # a new field mid-record, before groupId: resolution is by name, not position
        at = next(i for i, f in enumerate(fields) if f["name"] == "groupId")
        fields.insert(at, {"name": "blockId", "type": "long", "default": 0})
        fields.insert(at + 1, {"name": "note", "type": "string", "default": ""})
    else:
        raise AssertionError(kind)
    return schema


def _write(schema: dict[str, Any], schema_id: int, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    buffer.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(copy.deepcopy(schema)), record)
    return buffer.getvalue()


EVOLVED = {"added": 2, "removed": 3, "inserted": 4}
RECORDS = {
    "added": _fields(private_marker="x" * 40),
    "removed": {k: v for k, v in _fields().items() if k not in ("totalCheckpoints", "survey")},
    "inserted": _fields(blockId=365, note="moved on"),
}
EXPECTED = {
    "added": NextVisit.from_dict(_fields()),
    "removed": NextVisit.from_dict(_fields(totalCheckpoints=0, survey="")),
    "inserted": NextVisit.from_dict(_fields()),
}


@pytest.fixture(scope="module")
def schema_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site's schema directory: the shipped schema as id 1 and three evolved writer schemas."""
    root = tmp_path_factory.mktemp("schemas")
    (root / "1.avsc").write_text(json.dumps(SHIPPED))
    for kind, schema_id in EVOLVED.items():
        (root / f"{schema_id}.avsc").write_text(json.dumps(_evolved(kind)))
    (root / "README.txt").write_text("not a schema")
    return root


class _Registry(BaseHTTPRequestHandler):
    """Confluent's ``GET /schemas/ids/{id}``: ``{"schema": "<json>"}`` or 404 ``{"error_code": 40403}``."""

    schemas: dict[int, str] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        head, _, tail = self.path.partition("?")[0].rpartition("/")
        if head == "/schemas/ids" and tail.isdigit() and int(tail) in self.schemas:
            status, body = 200, {"schema": self.schemas[int(tail)]}
        else:
            status, body = 404, {"error_code": 40403, "message": f"Schema {tail} not found"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Quiet."""


@pytest.fixture
def registry() -> Iterator[tuple[str, list[str]]]:
    """A registry stand-in on 127.0.0.1 knowing the evolved ids (not the shipped id 1); (url, request log)."""
    handler = type("Registry", (_Registry,), {"requests": []})
    handler.schemas = {schema_id: json.dumps(_evolved(kind)) for kind, schema_id in EVOLVED.items()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


class _Gate(VisitGate):
    """The door alone: a usable visit is ``accepted`` (and kept)."""

    def accept(self, visit: NextVisit, *, kafka: dict[str, Any] | None = None) -> str:
        self.accepted = visit
        return "accepted"


def _gate(tmp_path: Path, **kafka: Any) -> tuple[_Gate, ShimStatus]:
    config = load_config(instrument=INSTRUMENT)
    config = {**config, "kafka": {**config["kafka"], **kafka}}
    status = ShimStatus(INSTRUMENT, "streaming")
    return _Gate(config, detectors=[0], status=status, workdir=tmp_path), status


class TestShippedSchemas:
    """The embedded default: the current summit schema under `NEXT_VISIT_SCHEMA_ID`."""

    def test_shipped_id_decodes_and_round_trips(self) -> None:
        assert shipped_schemas().ids() == [NEXT_VISIT_SCHEMA_ID]
        visit = NextVisit.from_dict(_fields())
        assert decode_next_visit(visit.to_avro(NEXT_VISIT_SCHEMA_ID)) == visit
        assert decode_next_visit(visit.to_avro()) == visit  # bare: the reader schema itself

    def test_unknown_id_refused_not_accepted(self) -> None:
        data = _write(SHIPPED, 99999, _fields())  # a good body: only the id is wrong
        with pytest.raises(UnknownSchemaError, match="schema id 99999, which the schema directory") as info:
            decode_next_visit(data)
        assert info.value.schema_id == 99999 and isinstance(info.value, InvalidVisit)

    @pytest.mark.parametrize("kind", sorted(EVOLVED))
    def test_evolved_writer_unknown_to_the_shipped_files(self, kind: str) -> None:
        with pytest.raises(UnknownSchemaError, match=f"schema id {EVOLVED[kind]}"):
            decode_next_visit(_write(_evolved(kind), EVOLVED[kind], RECORDS[kind]))


class TestSchemaDirectory:
    """`LocalSchemas`: a directory of ``<id>.avsc`` (``kafka.schema_dir``)."""

    @pytest.mark.parametrize("kind", sorted(EVOLVED))
    def test_evolved_writer_resolved_to_reader(self, schema_dir: Path, kind: str) -> None:
        schemas = LocalSchemas(schema_dir)
        assert schemas.ids() == [1, 2, 3, 4]
        assert (
            decode_next_visit(_write(_evolved(kind), EVOLVED[kind], RECORDS[kind]), schemas=schemas) == (EXPECTED[kind])
        )

    def test_body_of_another_schema_under_a_known_id_is_malformed(self, schema_dir: Path) -> None:
        data = _write(_evolved("inserted"), EVOLVED["removed"], RECORDS["inserted"])  # id and body disagree
        with pytest.raises(InvalidVisit) as info:
            decode_next_visit(data, schemas=LocalSchemas(schema_dir))
        assert not isinstance(info.value, UnknownSchemaError)

    def test_config_selects_directory(self, schema_dir: Path, tmp_path: Path) -> None:
        source = schema_source(
            {"kafka": {"schema_registry_url": None, "schema_dir": schema_dir.name}}, base_dir=schema_dir.parent
        )
        assert isinstance(source, LocalSchemas) and source.ids() == [1, 2, 3, 4]
        assert schema_source({"kafka": {"schema_registry_url": None, "schema_dir": None}}) is shipped_schemas()

    def test_gate_counts_unknown_schema_and_names_where(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        gate, status = _gate(tmp_path)
        with caplog.at_level(logging.WARNING, logger="stream_shim.consumer"):
            outcome = gate.handle(_write(SHIPPED, 99999, _fields()), kafka=WHERE, now=SND_STAMP + 1.0)
        assert outcome == "unknown_schema" and status.counts("next_visit") == {"unknown_schema": 1}
        [line] = [r.getMessage() for r in caplog.records if "unknown_schema" in r.getMessage()]
        assert "schema id 99999" in line and "'topic': 'next-visit-test'" in line, line
        assert "'partition': 3" in line and "'offset': 41" in line, line
        assert gate.handle(NextVisit.from_dict(_fields()).to_avro(1), kafka=WHERE, now=SND_STAMP + 1.0) == "accepted"

    def test_gate_accepts_evolved_writers_from_its_schema_dir(self, schema_dir: Path, tmp_path: Path) -> None:
        gate, status = _gate(tmp_path, schema_dir=str(schema_dir))
        for kind, schema_id in EVOLVED.items():
            assert gate.handle(_write(_evolved(kind), schema_id, RECORDS[kind]), now=SND_STAMP + 1.0) == "accepted"
            assert gate.accepted == EXPECTED[kind]
        assert status.counts("next_visit") == {}  # accepted is counted by the subclasses


class TestRegistry:
    """`RegistrySchemas` through confluent-kafka's `SchemaRegistryClient` against a registry stand-in."""

    def test_evolved_writers_fetched_once(self, registry: tuple[str, list[str]]) -> None:
        url, requests = registry
        schemas = RegistrySchemas(url)
        for _ in range(2):
            for kind, schema_id in EVOLVED.items():
                data = _write(_evolved(kind), schema_id, RECORDS[kind])
                assert decode_next_visit(data, schemas=schemas) == EXPECTED[kind]
        assert sorted(requests) == [f"/schemas/ids/{i}" for i in (2, 3, 4)]  # cached after the first

    def test_unknown_id_asked_once_then_remembered(self, registry: tuple[str, list[str]]) -> None:
        url, requests = registry
        schemas = RegistrySchemas(url)
        for _ in range(3):
            with pytest.raises(UnknownSchemaError, match=f"schema id 99999, which the schema registry {url}"):
                decode_next_visit(_write(SHIPPED, 99999, _fields()), schemas=schemas)
        assert requests == ["/schemas/ids/99999"]

    def test_gate_with_registry_url(self, registry: tuple[str, list[str]], tmp_path: Path) -> None:
        url, _ = registry
        gate, status = _gate(tmp_path, schema_registry_url=url, schema_dir="ignored-when-a-registry-is-set")
        assert isinstance(gate.schemas, RegistrySchemas)
        data = _write(_evolved("inserted"), EVOLVED["inserted"], RECORDS["inserted"])
        assert gate.handle(data, kafka=WHERE, now=SND_STAMP + 1.0) == "accepted"
        assert gate.accepted == EXPECTED["inserted"]
        # the registry is the authority: the shipped id 1 means nothing there
        assert gate.handle(NextVisit.from_dict(_fields()).to_avro(1), kafka=WHERE, now=SND_STAMP + 1.0) == (
            "unknown_schema"
        )
        assert status.counts("next_visit") == {"unknown_schema": 1}

    def test_registry_down_is_retriable_not_a_drop(self, tmp_path: Path) -> None:
        url = f"http://127.0.0.1:{free_port()}"
        gate, status = _gate(tmp_path, schema_registry_url=url)
        with pytest.raises(SchemaRegistryUnavailableError, match=f"schema registry {url} unreachable") as info:
            gate.handle(_write(SHIPPED, 7, _fields()), kafka=WHERE, now=SND_STAMP + 1.0)
        assert isinstance(info.value, RetriableError) and status.counts("next_visit") == {}
