"""Tests for `workflow.apdb.alerts`: packets round-trip through a real broker and Avro files."""

from __future__ import annotations

import io
import struct
import time
import uuid
from pathlib import Path

import astropy.time
import fastavro
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from lsst.alert.packet import Schema, get_latest_schema_version, get_schema_path
from lsst.dax.apdb import Apdb

from stream_shim.testbed.local_services import KafkaBroker, free_port
from workflow.apdb.alerts import (
    DEFAULT_SCHEMA,
    SCHEMA_ID,
    SCHEMA_VERSION,
    AlertBuildError,
    AlertDeliveryError,
    AlertSchema,
    AvroFileAlertSink,
    CutoutMaker,
    KafkaAlertSink,
    alert_schema,
    build_alerts,
    deserialize_alert,
    make_alert_sink,
    serialize_alert,
    serialize_alert_fastavro,
    write_alert_file,
)
from workflow.apdb.association import padded_region
from workflow.apdb.load import associate_store_alert
from workflow.apdb.outbox import AlertOutbox
from workflow.apdb.store import create_apdb, open_apdb, preload
from workflow.core.config import known_instruments, load_config
from workflow.core.exceptions import RetriableError

RA, DEC, DETECTOR = 30.0, -10.0, 9
SHAPE = (400, 400)
WAIT = 15.0


def _wcs() -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype, wcs.wcs.crval, wcs.wcs.crpix = ["RA---TAN", "DEC--TAN"], [RA, DEC], [200.5, 200.5]
    wcs.wcs.cd = [[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]]
    return wcs


def _sources(visit: int, mjd: float, rng: np.random.Generator, n: int = 6) -> pd.DataFrame:
    """Row 0: a variable at the image centre (jittered); others random on the image."""
    x = np.r_[199.5 + rng.normal(0, 0.2), rng.uniform(5, 395, n - 1)]
    y = np.r_[199.5 + rng.normal(0, 0.2), rng.uniform(5, 395, n - 1)]
    ra, dec = _wcs().all_pix2world(x, y, 0)
    return pd.DataFrame(
        {
            "diaSourceId": (np.int64(visit) << 22) | (np.int64(DETECTOR) << 14) | np.arange(n, dtype=np.int64),
            "visit": visit,
            "detector": DETECTOR,
            "midpointMjdTai": mjd,
            "ra": ra,
            "dec": dec,
            "x": x.astype(np.float32),
            "y": y.astype(np.float32),
            "psfFlux": 800.0,
            "psfFluxErr": 30.0,
            "snr": 26.0,
            "psfNdata": 20,
            "trailNdata": 0,
            "dipoleNdata": 0,
            "timeProcessedMjdTai": mjd + 0.001,
            "bboxSize": 15,
            "band": "g",
            "isDipole": False,
            "pixelFlags_bad": False,
            "reliability": np.float32(0.9),
        }
    )


def _cutouts(seed: int) -> dict[str, CutoutMaker]:
    rng = np.random.default_rng(seed)
    keys = ("difference", "science", "template")
    return {k: CutoutMaker(rng.normal(0, 1, SHAPE).astype(np.float32), _wcs()) for k in keys}


def _batch(visit: int, n: int, stamp: int = 60) -> list[dict[str, object]]:
    """``n`` alerts of one detector-visit: a DiaObject each, two earlier sources each, three stamps."""
    rng = np.random.default_rng(visit)
    src = _sources(visit, 60100.0 + visit, rng, n=n)
    src["diaObjectId"] = src["diaSourceId"]
    history = pd.concat([_sources(visit - k, 60100.0 + visit - k, rng, n=n) for k in (1, 2)], ignore_index=True)
    history["diaObjectId"] = np.tile(src["diaObjectId"].to_numpy(), 2)
    objects = pd.DataFrame({"diaObjectId": src["diaObjectId"], "ra": src["ra"], "dec": src["dec"], "nDiaSources": 3})
    for band in "ugrizy":
        objects[f"{band}_psfFluxNdata"] = 3 if band == "g" else 0
    objects["g_psfFluxMean"] = rng.normal(800.0, 10.0, n).astype(np.float32)  # a float field: exact
    images = np.random.default_rng(visit + 1).normal(0, 1, (3, *SHAPE)).astype(np.float32)
    makers = {
        k: CutoutMaker(images[i], _wcs(), size=stamp) for i, k in enumerate(("difference", "science", "template"))
    }
    return build_alerts(src, objects, history, cutouts=makers, visit_mjd_tai=60100.0 + visit)


def _tai(mjd: float) -> astropy.time.Time:
    return astropy.time.Time(mjd, format="mjd", scale="tai")


@pytest.fixture
def apdb(tmp_path: Path) -> Apdb:
    create_apdb(f"sqlite:///{tmp_path}/apdb.sqlite3")
    return open_apdb({"db_url": f"sqlite:///{tmp_path}/apdb.sqlite3"})


def _visit(apdb: Apdb, visit: int, k: int, sink: object | None, outbox: AlertOutbox | None = None) -> object:
    region = padded_region([RA - 0.02, RA + 0.02], [DEC - 0.02, DEC + 0.02], 50.0)
    return associate_store_alert(
        apdb,
        _sources(visit, 60100.0 + k, np.random.default_rng(visit)),
        preload(apdb, region, _tai(60100.0 + k)),
        visit=visit,
        detector=DETECTOR,
        visit_time=_tai(60100.0 + k),
        radius_arcsec=1.0,
        sink=sink,
        cutouts=_cutouts(visit),
        outbox=outbox,
    )


def _topic(broker: KafkaBroker) -> str:
    topic = f"alerts-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(timeout=WAIT)
    return topic


def _consume(broker: KafkaBroker, topic: str, count: int, wait: float = WAIT) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
        }
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got: list[bytes] = []
    deadline = time.monotonic() + wait
    try:
        while len(got) < count and time.monotonic() < deadline:
            got.extend(_poll(consumer, 0.2))
        extra = _poll(consumer, 1.0)  # nothing beyond what we expect
    finally:
        consumer.close()
    assert len(got) == count and not extra, f"got {len(got)} + {len(extra)} messages, expected {count}"
    return got


def _poll(consumer: Consumer, seconds: float) -> list[bytes]:
    message = consumer.poll(seconds)
    if message is None:
        return []
    assert message.error() is None, message.error()
    return [message.value()]


class TestSchema:
    """Tests for the pinned schema of `workflow.apdb.alerts`."""

    def test_default_is_rubin_production(self) -> None:
        """Rubin's production stream: 11.0, id 1100, topic lsst-alerts-v11 (11.1 is the installed latest)."""
        assert SCHEMA_VERSION == (11, 0) and get_latest_schema_version() == (11, 1)
        production = Schema.from_file(get_schema_path(11, 0) + "/lsst.v11_0.alert.avsc")
        assert SCHEMA_ID == 1100 == production.get_schema_id() == DEFAULT_SCHEMA.schema_id
        assert Schema.from_file().get_schema_id() == 1101 == AlertSchema((11, 1)).schema_id
        assert alert_schema() is alert_schema() is alert_schema((11, 0))  # parsed once
        config = load_config(instrument="LSSTCam")
        assert AlertSchema.from_config(config) == DEFAULT_SCHEMA and config["alerts"]["schema_version"] == "11.0"
        assert config["kafka_topics"]["alerts"] == f"lsst-alerts-v{SCHEMA_VERSION[0]}"

    def test_every_instrument_topic_follows_rubin(self) -> None:
        """Real-camera alerts go to lsst-alerts-v<major>; simulated ones to Rubin's alerts-simulated."""
        for name in sorted(known_instruments()):
            topic = load_config(instrument=name)["kafka_topics"]["alerts"]
            assert topic == f"lsst-alerts-v{SCHEMA_VERSION[0]}" or topic.startswith("alerts-"), (name, topic)

    def test_configured_schema_and_id(self, tmp_path: Path) -> None:
        """alerts.schema_version / schema_id choose the schema, its fields, the encoder and the framing."""
        config = {"kafka": {"bootstrap": None}, "kafka_topics": {"alerts": "x"}}
        newer = AlertSchema.from_config({**config, "alerts": {"schema_version": "11.1", "schema_id": 7001}})
        assert newer == AlertSchema((11, 1), 7001) and newer.name == "11.1"
        with pytest.raises(ValueError, match="expected <major>.<minor>"):
            AlertSchema.from_config({"alerts": {"schema_version": "v11"}})
        src = _sources(1, 60100.0, np.random.default_rng(0))
        src["diaObjectId"] = src["diaSourceId"]
        src["exposureTime"] = 30.0  # an 11.1 field: 11.0 has no room for it
        old, new = build_alerts(src, src.iloc[:0]), build_alerts(src, src.iloc[:0], schema=newer)
        assert "exposureTime" not in old[0]["diaSource"] and new[0]["diaSource"]["exposureTime"] == 30.0
        payload = serialize_alert(new[0], newer)
        assert payload[:5] == struct.pack(">bI", 0, 7001) and payload == serialize_alert_fastavro(new[0], newer)
        assert deserialize_alert(payload, newer)["diaSource"]["exposureTime"] == 30.0
        with pytest.raises(AlertBuildError, match="schema id 7001; expected 0 and 1100"):
            deserialize_alert(payload)
        sink = make_alert_sink({**config, "alerts": {"schema_version": "11.1", "schema_id": None}}, tmp_path / "a.avro")
        assert sink.schema == AlertSchema((11, 1)) and sink.schema.schema_id == 1101
        with pytest.raises(AlertBuildError, match="alert schema 11.7 is not in the installed"):
            build_alerts(src, src.iloc[:0], schema=AlertSchema((11, 7)))

    @pytest.mark.parametrize("version", [(11, 0), (11, 1)])
    def test_alerts_valid_under_lsst_alert_packet(self, version: tuple[int, int]) -> None:
        """Every packet decodes with lsst.alert.packet's own schema of its framing id and validates."""
        schema = AlertSchema(version)
        major, minor = version
        theirs = Schema.from_file(get_schema_path(major, minor) + f"/lsst.v{major}_{minor}.alert.avsc")
        parsed = fastavro.parse_schema(theirs.definition)
        alerts = _batch(7, 25)
        for alert in alerts:
            payload = serialize_alert(dict(alert), schema)
            assert struct.unpack(">bI", payload[:5]) == (0, theirs.get_schema_id())
            record = fastavro.schemaless_reader(io.BytesIO(payload[5:]), parsed, None)
            assert fastavro.validation.validate(record, parsed, raise_errors=True)

    def test_missing_required_field(self) -> None:
        src = _sources(1, 60100.0, np.random.default_rng(0)).drop(columns=["bboxSize"])
        src["diaObjectId"] = src["diaSourceId"]
        with pytest.raises(AlertBuildError, match="'bboxSize'"):
            build_alerts(src, pd.DataFrame({"diaObjectId": []}))

    def test_compiled_encoder_writes_fastavro_bytes(self) -> None:
        alerts = _batch(3, 20)
        assert all(len(a["prvDiaSources"]) == 2 for a in alerts) and alerts[0]["diaObject"]["g_psfFluxMean"]
        odd = dict(alerts[1], observation_reason="test", diaSourceId=np.int64(alerts[1]["diaSourceId"]))
        odd["diaSource"] = dict(odd["diaSource"], psfFlux=np.float32(5.5), snr=1, isDipole=True)
        huge = dict(alerts[2], diaSource=dict(alerts[2]["diaSource"], x=1e39))  # past float32: fastavro decides
        sparse = {"diaSourceId": 7, "diaSource": alerts[3]["diaSource"]}  # optional fields left out
        for alert in [*alerts, odd, huge, sparse]:
            assert serialize_alert(alert) == serialize_alert_fastavro(alert)
        assert deserialize_alert(serialize_alert(odd))["diaSource"]["isDipole"] is True
        for bad in ({"ra": None}, {"isDipole": np.bool_(True)}):  # a required field; a union no branch takes
            alert = dict(alerts[4], diaSource=dict(alerts[4]["diaSource"], **bad))
            with pytest.raises((TypeError, ValueError)) as compiled:
                serialize_alert(alert)
            with pytest.raises(type(compiled.value)):
                serialize_alert_fastavro(alert)

    def test_framing_checked(self) -> None:
        src = _sources(1, 60100.0, np.random.default_rng(0))
        src["diaObjectId"] = src["diaSourceId"]
        payload = serialize_alert(build_alerts(src, src.iloc[:0])[0])
        assert payload[:5] == struct.pack(">bI", 0, 1100)
        assert deserialize_alert(payload)["diaSource"]["diaSourceId"] == int(src["diaSourceId"].iloc[0])
        with pytest.raises(AlertBuildError, match="schema id 1101"):
            deserialize_alert(struct.pack(">bI", 0, 1101) + payload[5:])


class TestKafka:
    """Tests for `workflow.apdb.alerts.KafkaAlertSink` through a real broker."""

    def test_round_trip(self, apdb: Apdb, kafka_broker: KafkaBroker) -> None:
        topic = _topic(kafka_broker)
        for k, visit in enumerate((11, 12)):
            assert _visit(apdb, visit, k, None).store.stored
        sink = make_alert_sink(
            {"kafka": {"bootstrap": kafka_broker.bootstrap}, "kafka_topics": {"alerts": topic}},
            "unused.avro",
            timeout_s=WAIT,
        )
        assert isinstance(sink, KafkaAlertSink)
        result = _visit(apdb, 13, 2, sink)
        assert result.alerts is not None and result.alerts.n_alerts == 6 and result.alerts.schema_version == "11.0"
        payloads = _consume(kafka_broker, topic, 6)
        assert result.alerts.n_bytes == sum(len(p) for p in payloads)
        reader = fastavro.parse_schema(Schema.from_file(get_schema_path(11, 0) + "/lsst.v11_0.alert.avsc").definition)
        alerts = []
        for payload in payloads:
            magic, schema_id = struct.unpack(">bI", payload[:5])
            assert (magic, schema_id) == (0, 1100)
            alerts.append(fastavro.schemaless_reader(io.BytesIO(payload[5:]), reader, None))
        sent = result.association.sources.set_index("diaSourceId")
        assert sorted(a["diaSourceId"] for a in alerts) == sorted(sent.index.tolist())
        variable = next(a for a in alerts if a["diaSourceId"] == int(sent.index[0]))
        first_id = int(_sources(11, 0.0, np.random.default_rng(11))["diaSourceId"].iloc[0])
        assert variable["diaSource"]["diaObjectId"] == variable["diaObject"]["diaObjectId"] == first_id
        assert variable["diaObject"]["nDiaSources"] == 3
        assert [p["visit"] for p in variable["prvDiaSources"]] == [11, 12]
        assert all(a["prvDiaSources"] is None for a in alerts if a is not variable)
        for key in ("cutoutDifference", "cutoutScience", "cutoutTemplate"):
            with fits.open(io.BytesIO(variable[key])) as hdus:
                assert hdus[0].data.shape == (30, 30)
                ra, dec = WCS(hdus[0].header).all_pix2world(15, 15, 0)
            assert abs(ra - variable["diaSource"]["ra"]) * 3600 < 0.5
            assert abs(dec - variable["diaSource"]["dec"]) * 3600 < 0.5

        rerun = _visit(apdb, 13, 2, sink)  # retry of a stored detector-visit sends nothing
        assert not rerun.store.stored and rerun.alerts is None
        _consume(kafka_broker, topic, 6)

    def test_many_alerts_with_cutouts_arrive_once(self, kafka_broker: KafkaBroker) -> None:
        topic = _topic(kafka_broker)
        sent: dict[int, dict[str, object]] = {}
        for visit in (61, 62, 63):  # one producer per detector-visit, as the APDB stage
            alerts = _batch(visit, 150)
            sink = KafkaAlertSink(kafka_broker.bootstrap, topic, timeout_s=WAIT)
            sink.check()
            assert sink.send(alerts, visit=visit, detector=DETECTOR).n_alerts == 150
            sent |= {a["diaSourceId"]: a for a in alerts}
        payloads = _consume(kafka_broker, topic, 450, wait=60.0)
        received = [deserialize_alert(p) for p in payloads]
        ids = [a["diaSourceId"] for a in received]
        assert len(set(ids)) == 450 and set(ids) == set(sent)
        for alert in received[::50]:
            assert alert == {k: sent[alert["diaSourceId"]].get(k) for k in alert}
            with fits.open(io.BytesIO(alert["cutoutScience"])) as hdus:
                assert hdus[0].data.shape == (60, 60)

    def test_broker_down_stores_nothing(self, apdb: Apdb) -> None:
        sink = KafkaAlertSink(f"127.0.0.1:{free_port()}", "alerts", timeout_s=2.0)
        start = time.monotonic()
        with pytest.raises(AlertDeliveryError, match=r"Kafka broker 127\.0\.0\.1:\d+ unreachable") as info:
            _visit(apdb, 21, 0, sink)
        assert isinstance(info.value, RetriableError) and time.monotonic() - start < 10
        assert not apdb.containsVisitDetector(21, DETECTOR)

    def test_unknown_topic_refused_before_store(self, apdb: Apdb, kafka_broker: KafkaBroker) -> None:
        sink = KafkaAlertSink(kafka_broker.bootstrap, f"missing-{uuid.uuid4().hex[:8]}", timeout_s=5.0)
        try:
            sink.check()
        except AlertDeliveryError as exc:  # the broker does not auto-create: refused before any write
            assert "alert topic" in str(exc)
        else:  # the broker auto-created it: then alerts can go there
            assert _visit(apdb, 31, 0, sink).alerts is not None


class TestAvroFile:
    """Tests for `workflow.apdb.alerts.AvroFileAlertSink` (no broker configured)."""

    def test_file_per_detector_visit(self, apdb: Apdb, tmp_path: Path) -> None:
        path = tmp_path / "alerts" / "visit41_det9.avro"
        sink = make_alert_sink({"kafka": {"bootstrap": None}, "kafka_topics": {"alerts": "x"}}, path)
        assert isinstance(sink, AvroFileAlertSink)
        result = _visit(apdb, 41, 0, sink)
        with open(path, "rb") as stream:
            records = list(fastavro.reader(stream))
        assert len(records) == 6 == result.alerts.n_alerts and result.alerts.n_bytes == path.stat().st_size
        assert records[0]["diaObject"]["diaObjectId"] == records[0]["diaSourceId"]
        assert records[0]["diaSource"]["band"] == "g" and records[0]["diaSource"]["reliability"] == pytest.approx(0.9)
        assert fits.open(io.BytesIO(records[0]["cutoutScience"]))[0].data.shape == (30, 30)
        assert not list(path.parent.glob("*.tmp"))

    def test_container_reads_as_fastavro_writes(self) -> None:
        alerts = _batch(5, 150, stamp=30)  # several blocks
        alerts[70] = dict(alerts[70], diaSource=dict(alerts[70]["diaSource"], x=1e39))  # a record fastavro writes
        ours, theirs = io.BytesIO(), io.BytesIO()
        write_alert_file(ours, alerts)
        fastavro.writer(theirs, alert_schema(), alerts)
        ours.seek(0), theirs.seek(0)
        assert list(fastavro.reader(ours)) == list(fastavro.reader(theirs))
        assert len(ours.getvalue()) < len(theirs.getvalue()) + 1000  # same records, not more


class TestOutbox:
    """Tests for `workflow.apdb.outbox.AlertOutbox`: alerts survive a broker lost between store and send."""

    def test_broker_lost_after_store_then_retry_sends_once(
        self,
        apdb: Apdb,
        kafka_broker: KafkaBroker,
        tmp_path: Path,
    ) -> None:
        dying = KafkaBroker(tmp_path / "dying-broker")
        dying.start()
        try:
            dying_topic = _topic(dying)

            class BrokerDiesBeforeSend(KafkaAlertSink):
                def send(self, *args: object, **kwargs: object) -> object:
                    dying.stop()  # checked before the store; gone by the time alerts go out
                    return super().send(*args, **kwargs)

            outbox = AlertOutbox(tmp_path / "work" / "alert_outbox.avro")
            with pytest.raises(AlertDeliveryError, match="alerts acknowledged"):
                _visit(apdb, 51, 0, BrokerDiesBeforeSend(dying.bootstrap, dying_topic, timeout_s=3.0), outbox)
        finally:
            dying.stop()
        assert apdb.containsVisitDetector(51, DETECTOR)  # stored: a plain retry would skip store and send
        assert outbox.path.exists() and not outbox.sent

        topic = _topic(kafka_broker)
        sink = KafkaAlertSink(kafka_broker.bootstrap, topic, timeout_s=WAIT)
        retry = _visit(apdb, 51, 0, sink, outbox)
        assert not retry.store.stored and retry.alerts is not None and retry.alerts.n_alerts == 6
        assert outbox.sent and not outbox.path.exists()
        sent_ids = sorted(deserialize_alert(p)["diaSourceId"] for p in _consume(kafka_broker, topic, 6))
        assert sent_ids == sorted(retry.association.sources["diaSourceId"].tolist())

        again = _visit(apdb, 51, 0, sink, outbox)  # after delivery: nothing more
        assert again.alerts is None
        _consume(kafka_broker, topic, 6)

    def test_first_attempt_writes_outbox_then_marks_sent(self, apdb: Apdb, tmp_path: Path) -> None:
        path = tmp_path / "alerts.avro"
        sink = make_alert_sink({"kafka": {"bootstrap": None}, "kafka_topics": {"alerts": "x"}}, path)
        outbox = AlertOutbox(tmp_path / "alert_outbox.avro")
        result = _visit(apdb, 52, 0, sink, outbox)
        assert result.store.stored and result.alerts.n_alerts == 6
        with open(outbox.sent_path, "rb") as stream:  # what was sent is kept, as sent
            kept = [r["diaSourceId"] for r in fastavro.reader(stream)]
        with open(path, "rb") as stream:
            assert kept == [r["diaSourceId"] for r in fastavro.reader(stream)]
