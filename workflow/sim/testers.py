"""Camera testers: announce visits on Kafka and upload their raws, as the summit does.

`upload_simulated` simulates new visits; `workflow.sim.testers_replay.upload_from_repo` replays
central-repo raws under new group ids, exposure ids and times.  Per group: publish a next_visit (JSON,
or summit Avro with schema-registry framing), wait slew and exposure, then upload each
detector's raw from worker processes under the key layout, any JSON sidecar after its
image.  Sequence numbers continue after the bucket's highest of the day, so reruns
never overwrite raws.  `exit_status` maps errors to the CLIs' exit status.
"""

from __future__ import annotations

import argparse  # noqa: F401 - annotations of the CLI helpers

__all__ = [
    "BrokerUnavailableError",
    "GroupReport",
    "NoMatchingRawsError",
    "UploadOptions",
    "UploadedRaw",
    "add_upload_arguments",
    "exit_status",
    "next_seq_num",
    "run_upload_cli",
    "upload_options_from_args",
    "upload_simulated",
]

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import string
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import botocore.exceptions
from astropy.io import fits
from astropy.time import Time, TimeDelta
from tqdm import tqdm

from workflow.core.buckets import Bucket, BucketUnavailableError, open_bucket
from workflow.core.exceptions import ConfigError, NonRetriableError, RetriableError
from workflow.core.exposure_info import ExposureInfo
from workflow.core.instrument import Instrument
from workflow.core.raw_fits import raw_sidecar, write_raw
from workflow.core.raw_keys import RawKeyLayout, sidecar_key
from workflow.core.visit import CoordSys, Dome, NextVisit, RotSys
from workflow.sim.exposures import make_exposures

_log = logging.getLogger(__name__)

DEFAULT_POSITION = (150.1, 2.2)
"""Default pointing (ICRS deg): the demo field of `workflow.sim.demo_repo`, where templates exist."""
_READOUT_S = 2.0
_HALF_DAY = TimeDelta(12 * 3600.0, format="sec")
_Seqs = Callable[[int, int], int]  # (day_obs, count) -> first of `count` fresh sequence numbers
_Job = tuple[int, tuple[Any, ...]]  # detector id, task arguments before (detector, late)
_Plan = Callable[[int, _Seqs], tuple[NextVisit, list[tuple[ExposureInfo, list[_Job]]]]]


class BrokerUnavailableError(RetriableError, ConnectionError):
    """The Kafka broker could not be reached, or did not take a message in time."""


class NoMatchingRawsError(NonRetriableError, LookupError):
    """A central-repo query selected no raws to replay."""


_EXIT_STATUS = {ConfigError: 78, NoMatchingRawsError: 66, NonRetriableError: 65, RetriableError: 75}


def exit_status(exc: BaseException) -> int:
    """Return the CLI exit status of an error (sysexits: 78 config, 66 no input, 65 data, 75 retry; else 1)."""
    return next((code for cls, code in _EXIT_STATUS.items() if isinstance(exc, cls)), 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UploadOptions:
    """How a tester paces and shapes its uploads.

    Attributes
    ----------
    slew_s, exposure_s, late_delay_s : `float`
        Waits: after the next_visit; per snap before its upload (`None`: its
        exposure time); before the late detectors of a snap.
    workers, avro, schema_id, kafka_timeout_s, progress
        Upload processes; Avro (with this schema id) instead of JSON; bound on
        reaching the broker and on each delivery; progress bar on stderr.
    skip_detectors, late_detectors : `tuple` [`int` or `str`, ...]
        Detector ids or names never uploaded / uploaded late.
    survey : `str` or `None`
        ``survey`` of the next_visits (`None`: the tester's default).
    """

    slew_s: float = 2.0
    exposure_s: float | None = None
    late_delay_s: float = 5.0
    workers: int = 2
    avro: bool = False
    schema_id: int = 1
    kafka_timeout_s: float = 10.0
    progress: bool = False
    skip_detectors: tuple[int | str, ...] = ()
    late_detectors: tuple[int | str, ...] = ()
    survey: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class UploadedRaw:
    """One raw snap uploaded: keys, detector, snap, whether late, unix time it was complete."""

    key: str
    sidecar: str | None
    detector: int
    snap: int
    late: bool
    finished: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupReport:
    """What a tester did for one group: the next_visit sent, the raws uploaded, seconds taken."""

    visit: NextVisit
    raws: tuple[UploadedRaw, ...]
    seconds: float

    @property
    def keys(self) -> list[str]:
        """Every object key written (images and sidecars), sorted (`list` [`str`])."""
        return sorted([r.key for r in self.raws] + [r.sidecar for r in self.raws if r.sidecar])


class _KafkaLog:
    """Receive librdkafka's log lines (as the Producer's ``logger``): DEBUG, not straight to stderr."""

    def log(self, level: int, msg: str, *args: Any) -> None:
        _log.debug("librdkafka: " + msg, *args)


def _publisher(config: Mapping[str, Any], options: UploadOptions) -> Callable[[NextVisit], None]:
    """Reach the configured broker; return a function publishing one next_visit, delivery bounded."""
    from confluent_kafka import KafkaException, Producer

    bootstrap, topic = config["kafka"]["bootstrap"], config["kafka_topics"]["next_visit"]
    timeout = options.kafka_timeout_s
    if not bootstrap:
        raise ConfigError(
            "kafka.bootstrap is null: the testers publish next_visits and need a broker "
            "(set it in an extra config file)"
        )
    errors: list[str] = []
    try:
        producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "client.id": "prompt-snake-tester",
                "logger": _KafkaLog(),
                "message.timeout.ms": int(timeout * 1000),
                "error_cb": lambda e: errors.append(e.str()),
            }
        )
        producer.list_topics(timeout=timeout)
    except KafkaException as exc:
        first = exc.args[0] if exc.args else exc
        reason = first.str() if hasattr(first, "str") else first
        raise BrokerUnavailableError(f"Kafka broker {bootstrap} not reachable within {timeout:g} s: {reason}") from None

    def publish(visit: NextVisit) -> None:
        results: list[Any] = []
        try:
            producer.produce(
                topic,
                visit.to_avro(options.schema_id) if options.avro else visit.to_json().encode(),
                key=visit.instrument.encode(),
                on_delivery=lambda error, _msg: results.append(error),
            )
            producer.flush(timeout + 1.0)
        except (KafkaException, BufferError) as exc:
            results = [exc]
        if not results or results[0] is not None:
            reason = getattr(results[0], "str", lambda: results[0])() if results else "no delivery report"
            raise BrokerUnavailableError(
                f"next_visit {visit.groupId} not delivered to topic {topic} at {bootstrap} "
                f"within {timeout:g} s: {reason}" + "".join(f" ({e})" for e in errors[-1:])
            )

    return publish


def next_seq_num(bucket: Bucket, layout: RawKeyLayout, day_obs: int) -> int:
    """Return one more than the highest sequence number of ``day_obs`` among the bucket's raws (1 if none)."""
    known, prefix = {"instrument": layout.instrument, "day_obs": str(day_obs)}, ""
    for literal, field, _, _ in string.Formatter().parse(layout.template):
        prefix += literal
        if field not in known:
            break
        prefix += known[field]
    highest = 0
    for fields in filter(None, map(layout.parse, bucket.list(prefix))):
        if fields.exposure is not None and fields.exposure // 100_000 == day_obs:
            highest = max(highest, fields.exposure % 100_000)
        elif fields.obs_id is not None and fields.obs_id.split("_")[2] == str(day_obs):
            highest = max(highest, int(fields.obs_id.split("_")[3]))
    return highest + 1


def _detector_ids(instrument: Instrument, keys: Sequence[int | str], what: str) -> set[int]:
    try:
        return {instrument.detector(int(k) if str(k).isdigit() else k).id for k in keys}
    except KeyError as exc:
        raise ConfigError(f"{what}: {exc.args[0]}") from None


def _new_visit(
    instrument: Instrument,
    seqs: _Seqs,
    index: int,
    *,
    ra: float,
    dec: float,
    rotation_deg: float,
    physical_filter: str,
    exptime: float | None,
    n_snaps: int,
    survey: str,
    slew_s: float,
) -> tuple[NextVisit, list[ExposureInfo]]:
    """Plan one new group sent now: its next_visit and its snaps (new ids and times)."""
    sent = Time.now().tai
    start = sent + TimeDelta(slew_s, format="sec")
    if (start - _HALF_DAY).strftime("%Y%m%d") != (sent - _HALF_DAY).strftime("%Y%m%d"):
        start = sent  # keep the keys' day_obs equal to the next_visit's
    snaps = make_exposures(
        instrument,
        start=start,
        seq_num=seqs(int((start - _HALF_DAY).strftime("%Y%m%d")), n_snaps),
        ra=ra,
        dec=dec,
        rotation_deg=rotation_deg,
        physical_filter=physical_filter,
        exptime=exptime,
        group_id=sent.isot if instrument.camera_style == "lsst" else None,
        n_snaps=n_snaps,
    )
    return NextVisit(
        salIndex=2 if instrument.name == "LATISS" else 1,
        scriptSalIndex=index + 1,
        instrument=instrument.name,
        groupId=snaps[0].group_id,
        coordinateSystem=CoordSys.ICRS,
        position=[ra, dec],
        startTime=start.unix_tai,
        rotationSystem=RotSys.SKY,
        cameraAngle=rotation_deg,
        filters=physical_filter,
        dome=Dome.OPEN,
        duration=slew_s + n_snaps * (snaps[0].exptime + _READOUT_S),
        nimages=n_snaps,
        survey=survey,
        totalCheckpoints=0,
        private_sndStamp=sent.unix_tai,
    ), snaps


# -- worker processes: one raw each ---------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(config: dict[str, Any], scale: float, seed: int, env: dict[str, str]) -> None:
    os.environ.update(env)  # the forkserver's environment may predate the caller's credentials
    _WORKER.update(
        instrument=Instrument.from_config(config, scale=scale),
        layout=RawKeyLayout.from_config(config),
        bucket=open_bucket(config, config["buckets"]["raw"]),
        seed=seed,
        sidecar=config["raw"]["sidecar"],
    )


def _put(
    header: fits.Header, encode: Callable[[str], bytes], exposure: ExposureInfo, detector: int, late: bool
) -> UploadedRaw:
    """Upload one raw, then its sidecar, under the layout's key."""
    det, bucket = _WORKER["instrument"].detector(detector), _WORKER["bucket"]
    key = _WORKER["layout"].format(
        instrument=exposure.instrument,
        day_obs=exposure.day_obs,
        obs_id=exposure.obs_id,
        detector=det.id,
        detector_name=det.name,
        group=exposure.group_id,
        snap=exposure.snap,
        exposure=exposure.exposure_id,
        physical_filter=exposure.physical_filter,
    )
    side = sidecar_key(key) if _WORKER["sidecar"] else None
    try:
        bucket.put(key, encode(key))
        if side is not None:
            bucket.put(side, json.dumps(raw_sidecar(header)).encode())
    except (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise BucketUnavailableError(f"bucket {bucket.name}: cannot upload {key}: {exc}") from None
    return UploadedRaw(key=key, sidecar=side, detector=det.id, snap=exposure.snap, late=late, finished=time.time())


def _simulate_task(exposure: ExposureInfo, detector: int, late: bool) -> UploadedRaw:
    from workflow.sim.simulate import simulate_raw

    raw = simulate_raw(_WORKER["instrument"], detector, exposure, seed=_WORKER["seed"])

    def encode(key: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return write_raw(Path(tmp) / "raw.fits", raw, compress=key.endswith(".fz")).read_bytes()

    return _put(raw.header, encode, exposure, detector, late)


def _drive(
    config: Mapping[str, Any],
    n_groups: int,
    plan: _Plan,
    task: Callable[..., UploadedRaw],
    options: UploadOptions,
    *,
    late: set[int],
    scale: float = 1.0,
    seed: int = 0,
) -> list[GroupReport]:
    """Check bucket and broker, then per group: publish, wait, upload its detectors in worker processes."""
    layout, bucket = RawKeyLayout.from_config(config), open_bucket(config, config["buckets"]["raw"], create=True)
    publish = _publisher(config, options)
    following: dict[int, int] = {}  # day_obs -> next free seq_num

    def seqs(day_obs: int, count: int) -> int:
        following[day_obs] = max(following.get(day_obs, 0), next_seq_num(bucket, layout, day_obs)) + count
        return following[day_obs] - count

    context = multiprocessing.get_context("forkserver")  # workers never inherit the producer's threads
    context.set_forkserver_preload([__name__])
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    pool = concurrent.futures.ProcessPoolExecutor(
        options.workers, mp_context=context, initializer=_init_worker, initargs=(dict(config), scale, seed, env)
    )
    reports = []
    with pool, tqdm(total=0, unit="raw", disable=not options.progress) as bar:
        concurrent.futures.wait([pool.submit(time.sleep, 0.1) for _ in range(options.workers)])  # start workers now
        for index in range(n_groups):
            visit, snaps = plan(index, seqs)
            bar.total += sum(len(jobs) for _, jobs in snaps)
            t0, raws = time.monotonic(), []
            publish(visit)
            time.sleep(options.slew_s)
            for exposure, jobs in snaps:
                time.sleep(exposure.exptime if options.exposure_s is None else options.exposure_s)
                for is_late in (False, True):
                    batch = [(det, args) for det, args in jobs if (det in late) == is_late]
                    time.sleep(options.late_delay_s if is_late and batch else 0.0)
                    futures = [pool.submit(task, *args, det, is_late) for det, args in batch]
                    try:
                        for future in concurrent.futures.as_completed(futures):
                            raws.append(future.result())
                            bar.update()
                    finally:
                        for future in futures:
                            future.cancel()
            reports.append(GroupReport(visit=visit, raws=tuple(raws), seconds=time.monotonic() - t0))
            _log.info("group %s: %d raws uploaded in %.1f s", visit.groupId, len(raws), reports[-1].seconds)
    return reports


def upload_simulated(
    config: Mapping[str, Any],
    n_groups: int,
    *,
    options: UploadOptions = UploadOptions(),
    scale: float = 1.0,
    ra: float | None = None,
    dec: float | None = None,
    rotation_deg: float = 0.0,
    physical_filter: str | None = None,
    exptime: float | None = None,
    detectors: Sequence[int | str] | None = None,
    seed: int = 0,
) -> list[GroupReport]:
    """Announce ``n_groups`` new visits and upload a simulated raw of each detector.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration (instrument, ``raw``, ``kafka``, ``kafka_topics``, ``buckets``, ``storage``).
    n_groups : `int`
        Number of visits.
    options : `UploadOptions`, optional
        Pacing, message form, workers, skipped and late detectors.
    scale, seed, ra, dec, rotation_deg, physical_filter, exptime, detectors : optional
        Simulation: detector shrink factor, universe seed, pointing in degrees
        (default `DEFAULT_POSITION`, 0), filter (default the first r-band one),
        seconds per snap (default 30 / snaps), detector ids or names (default: active).

    Returns
    -------
    reports : `list` [`GroupReport`]
        One per group, in order.

    Raises
    ------
    ConfigError
        Unknown filter or detector, or no broker configured.
    BucketUnavailableError, BrokerUnavailableError
        The raw bucket or the broker cannot be reached.
    """
    instrument = Instrument.from_config(config, scale=scale)
    bands = instrument.filters
    physical_filter = physical_filter or next((f for f, b in bands.items() if b == "r"), next(iter(bands)))
    if physical_filter not in bands:
        raise ConfigError(
            f"{instrument.name}: unknown physical filter {physical_filter!r}; expected one of {list(bands)}"
        )
    wanted = (
        _detector_ids(instrument, detectors, "detectors")
        if detectors is not None
        else {d.id for d in instrument.active_detectors()}
    )
    wanted -= _detector_ids(instrument, options.skip_detectors, "skipped detectors")
    late = _detector_ids(instrument, options.late_detectors, "late detectors")
    position = (DEFAULT_POSITION[0] if ra is None else ra, DEFAULT_POSITION[1] if dec is None else dec)

    def plan(index: int, seqs: _Seqs) -> tuple[NextVisit, list[tuple[ExposureInfo, list[_Job]]]]:
        visit, snaps = _new_visit(
            instrument,
            seqs,
            index,
            ra=position[0],
            dec=position[1],
            rotation_deg=rotation_deg,
            physical_filter=physical_filter,
            exptime=exptime,
            n_snaps=instrument.snaps_per_visit,
            survey=options.survey or "SURVEY",
            slew_s=options.slew_s,
        )
        return visit, [(e, [(det, (e,)) for det in sorted(wanted)]) for e in snaps]

    return _drive(config, n_groups, plan, _simulate_task, options, late=late, scale=scale, seed=seed)


def add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options both camera testers take (Kafka form, waits, detectors, logging)."""
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        metavar="FILE",
        help="extra config file merged over the instrument's (repeatable)",
    )
    parser.add_argument("--avro", action="store_true", help="publish the summit's Avro form instead of JSON")
    parser.add_argument("--schema-id", type=int, default=1, help="schema-registry id in the Avro framing")
    parser.add_argument("--slew-s", type=float, default=2.0, help="wait after each next_visit (default 2)")
    parser.add_argument("--exposure-s", type=float, default=None, help="wait per snap (default: its exptime)")
    parser.add_argument("--skip-detector", action="append", default=[], metavar="ID", help="never upload this one")
    parser.add_argument("--late-detector", action="append", default=[], metavar="ID", help="upload this one late")
    parser.add_argument("--late-delay-s", type=float, default=5.0, help="delay of late detectors (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="upload processes (default 2)")
    parser.add_argument("--survey", default=None, help="survey of the next_visits")
    parser.add_argument("--kafka-timeout-s", type=float, default=10.0, help="bound on broker contact (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG and show tracebacks")


def upload_options_from_args(args: argparse.Namespace, *, progress: bool) -> UploadOptions:
    """Build `UploadOptions` from the options `add_upload_arguments` added."""
    return UploadOptions(
        slew_s=args.slew_s,
        exposure_s=args.exposure_s,
        late_delay_s=args.late_delay_s,
        workers=args.workers,
        avro=args.avro,
        schema_id=args.schema_id,
        kafka_timeout_s=args.kafka_timeout_s,
        progress=progress and not args.no_progress,
        skip_detectors=tuple(args.skip_detector),
        late_detectors=tuple(args.late_detector),
        survey=args.survey,
    )


def run_upload_cli(name: str, args: argparse.Namespace, upload: Callable[[UploadOptions], list[GroupReport]]) -> int:
    """Run a camera tester's upload for its CLI: logging, one error line, one line per group.

    Parameters
    ----------
    name : `str`
        The command's name, for the error line.
    args : `argparse.Namespace`
        Parsed options, including those of `add_upload_arguments`.
    upload : callable
        Does the uploads with the options built from ``args``; returns the reports.

    Returns
    -------
    status : `int`
        0, or the error's `exit_status`.
    """
    from workflow.core.log_setup import configure_logging

    configure_logging(f"root={'DEBUG' if args.debug else 'INFO' if args.verbose else 'WARNING'}", stream=sys.stderr)
    options = upload_options_from_args(args, progress=sys.stderr.isatty())
    try:
        reports = upload(options)
    except Exception as exc:  # noqa: BLE001 - the CLI reports any failure as one line.
        if args.debug:
            _log.exception("%s failed", name)
        print(f"{name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exit_status(exc)
    for report in reports:
        print(f"{report.visit.groupId}: {len(report.raws)} raws, {len(report.keys)} objects in {report.seconds:.1f} s")
    return 0
