"""Latency per detector-visit: last raw's notification -> its alerts on the alert topic.

    python scripts/bench_latency.py [--groups 4] [--detectors 2] [--camera replay|simulate]
        [--scale 1.0] [--repo demo/central_repo_full] [--workdir demo/bench_latency]
        [--design streaming|subprocess] [--exptime 30] [--slew-s 2]
        [--upload-arg=--skip-detector=8 ...] [--json out.json]

Runs the live stack (`stream_shim.testbed.live_stack.LiveStack`: Tansu, SeaweedFS with the
filer bridge, the shim on profiles/local), the camera for ``--groups`` visits of
LSSTComCamSim at the demo field, and two consumers of its own: the raw-notification
topic (when each raw was announced) and the alert topic (when each alert was
readable).  Per detector-visit it reports seconds from the notification of its last
raw to its last alert (detector-visits without DIA sources send no alert: for them,
and for all, it also reports notification -> ``done.json``), as p50/p95, plus the
shim's own submit -> outcome.  Builds the central repo at ``--scale`` if missing
(full size: a few minutes).

The goal is stated per detector on one core, so by default only ``--detectors 2``
detectors are active (one per core of this 2-core machine; the others are switched
off in the run's config) and the camera replays the central repo's raws under new
visits (``--camera replay``: header rewrite and upload only) instead of simulating
them on the same cores (``--camera simulate``, what the live demo does).

    python scripts/bench_latency.py --compare-designs [--visits 5] [--interval-s 8] [--repeats 2]

compares the two submission designs alone (`stream_shim.backends`): the same stream
of visits (9 targets each, a 6-job chain per target like the real one, each job
``sleep --job-s``) through the streaming design and the subprocess pool, on 2
cores, alternating; it reports submit -> done per target and per visit.  With
``--slow-ingest-s`` one detector per visit waits that long in ingest, like a missing
raw waiting for its timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stream_shim.raw_arrival import parse_s3_event
from stream_shim.status import percentile
from stream_shim.testbed.live_stack import LiveStack, ensure_central_repo
from workflow.core.config import PROJECT_ROOT, load_config
from workflow.core.instrument import Instrument
from workflow.core.raw_keys import RawKeyLayout, lsst_exposure_id
from workflow.stages.records import read_stage_record

INSTRUMENT = "LSSTComCamSim"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=4, help="visits (default 4)")
    parser.add_argument(
        "--detectors",
        type=int,
        default=2,
        help="active detectors per visit, the first N (default 2: one per core here)",
    )
    parser.add_argument(
        "--camera",
        default="replay",
        choices=("replay", "simulate"),
        help="replay the central repo's raws (default) or simulate new ones on these cores",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="detector shrink factor (default 1: full size)")
    parser.add_argument("--repo", default=None, help="central repo (default WORKDIR/central_repo_scale<S>, 0.5 -> 0p5)")
    parser.add_argument("--workdir", default=str(PROJECT_ROOT / "demo" / "bench_latency"), help="run directory")
    parser.add_argument("--design", default="streaming", choices=("streaming", "subprocess"))
    parser.add_argument("--exptime", type=float, default=30.0, help="seconds per exposure (default 30)")
    parser.add_argument("--slew-s", type=float, default=2.0, help="seconds between next_visit and exposure")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up waiting after this long")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument(
        "--upload-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass on to scripts/upload.py (e.g. --upload-arg=--skip-detector=8)",
    )
    parser.add_argument("--compare-designs", action="store_true", help="compare the submission designs alone")
    parser.add_argument("--visits", type=int, default=5, help="--compare-designs: visits (default 5)")
    parser.add_argument("--interval-s", type=float, default=8.0, help="--compare-designs: seconds between visits")
    parser.add_argument("--job-s", type=float, default=0.2, help="--compare-designs: seconds per job")
    parser.add_argument("--repeats", type=int, default=2, help="--compare-designs: runs per design")
    parser.add_argument(
        "--slow-ingest-s",
        type=float,
        default=0.0,
        help="--compare-designs: detector 8's ingest waits this long (a missing raw's timeout)",
    )
    return parser.parse_args(argv)


class _Watcher(threading.Thread):
    """Record when each message of a topic became readable, keyed by ``key_of(value)``."""

    def __init__(self, bootstrap: str, topic: str, key_of: Any, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.key_of, self.stop = bootstrap, topic, key_of, stop
        self.seen: dict[Any, list[float]] = {}

    def run(self) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"bench-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 2000,
                "heartbeat.interval.ms": 500,
            }
        )
        consumer.subscribe([self.topic])
        try:
            while not self.stop.is_set():
                message = consumer.poll(0.2)
                if message is None or message.error() is not None:
                    continue
                now = time.time()
                for key in self.key_of(message.value()):
                    self.seen.setdefault(key, []).append(now)
        finally:
            consumer.close()


def _raw_keys(config: Mapping[str, Any]) -> Any:
    layout, instrument = RawKeyLayout.from_config(config), Instrument.from_config(config)

    def key_of(value: bytes) -> list[tuple[int, int]]:
        found = []
        for event in parse_s3_event(value):
            fields = layout.parse(event.key)
            if fields is None or not event.event_name.startswith("ObjectCreated"):
                continue
            if fields.exposure is not None:
                exposure = fields.exposure
            else:
                assert fields.obs_id, "a raw key names its exposure id or its obs_id"
                day, seq = fields.obs_id.split("_")[2:4]
                exposure = lsst_exposure_id(day, int(seq))
            if fields.detector is not None:
                detector = fields.detector
            else:
                assert fields.detector_name is not None, "a raw key names its detector id or name"
                detector = instrument.detector(fields.detector_name).id
            found.append((exposure, detector))
        return found

    return key_of


def _alert_keys(value: bytes) -> list[tuple[int, int]]:
    from workflow.apdb.alerts import deserialize_alert

    source = deserialize_alert(value)["diaSource"]
    return [(int(source["visit"]), int(source["detector"]))]


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_s": _r(percentile(values, 50)),
        "p95_s": _r(percentile(values, 95)),
        "max_s": _r(max(values) if values else None),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _report(stack: LiveStack, raws: _Watcher, alerts: _Watcher) -> dict[str, Any]:
    to_alert, to_done, per_target = [], [], []
    for done in stack.workdir.glob(f"results/{INSTRUMENT}/*/*/*/done.json"):
        tail = done.parent.relative_to(stack.workdir / "results")  # {instrument}/{day_obs}/{group}/{detector}
        record = read_stage_record(stack.workdir / "work_area" / tail / "pipeline.json", "pipeline").body
        key = (int(record["visit_id"]), int(tail.name))
        if key not in raws.seen:
            continue
        notified = max(raws.seen[key])
        entry = {"visit": key[0], "detector": key[1], "to_done_s": _r(done.stat().st_mtime - notified)}
        to_done.append(done.stat().st_mtime - notified)
        if key in alerts.seen:
            to_alert.append(max(alerts.seen[key]) - notified)
            entry.update(to_last_alert_s=_r(to_alert[-1]), n_alerts=len(alerts.seen[key]))
        per_target.append(entry)
    status = stack.status()
    return {
        "notification_to_last_alert": _stats(to_alert),
        "notification_to_done": _stats(to_done),
        "shim_submit_to_outcome": status.get("latencies", {}).get("submit_to_outcome"),
        "targets": status.get("gauges", {}).get("targets"),
        "failures": status.get("counts", {}).get("failures"),
        "per_detector_visit": sorted(per_target, key=lambda e: (e["visit"], e["detector"])),
    }


_TOY_CHAIN = """
from stream_shim.queue_runner import TARGETS, FINISHED
W = "work/{inst}/{day}/{group}/{det}"
rule stream:
    input: from_queue(TARGETS, finish_sentinel=FINISHED)
    default_target: True
rule prep:
    output: W + "/prep.json"
    shell: "sleep %(job)s; touch {output}"
rule ingest:
    output: W + "/ingest.json"
    shell: "if [ {wildcards.det} = 8 ]; then sleep %(slow)s; fi; sleep %(job)s; touch {output}"
rule pipeline:
    input: W + "/prep.json", W + "/ingest.json"
    output: W + "/pipeline.json"
    shell: "sleep %(job)s; touch {output}"
rule export:
    input: W + "/pipeline.json"
    output: W + "/export.json"
    shell: "sleep %(job)s; touch {output}"
rule apdb:
    input: W + "/pipeline.json"
    output: W + "/apdb.json"
    shell: "sleep %(job)s; touch {output}"
rule finish:
    input: W + "/export.json", W + "/apdb.json"
    output: "results/{inst}/{day}/{group}/{det}/done.json"
    shell: "touch {output}"
"""


def _compare_designs(args: argparse.Namespace) -> dict[str, Any]:
    """Run the same visit stream through both designs (toy chain), alternating; return the stats."""
    import shutil

    from stream_shim.backends import Batch, StreamingBackend, SubprocessPoolBackend
    from stream_shim.process_group import ChildRegistry

    base = Path(args.workdir).resolve() / "designs"
    results: dict[str, dict[str, list[float]]] = {}
    for repeat in range(args.repeats):
        for design in ("streaming", "subprocess"):
            run = base / f"{design}-{repeat}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            snakefile = run / "Snakefile"
            snakefile.write_text(_TOY_CHAIN % {"job": args.job_s, "slow": args.slow_ingest_s})
            flags = [
                "--snakefile",
                str(snakefile),
                "--directory",
                str(run),
                "--nolock",
                "--keep-going",
                "--scheduler",
                "greedy",
                "--set-threads",
                "ingest=0",
            ]
            registry, env = ChildRegistry(run / "children.json"), {"PATH": "/usr/bin:/bin"}
            if design == "streaming":
                backend: Any = StreamingBackend(
                    [
                        sys.executable,
                        "-m",
                        "stream_shim.queue_runner",
                        *flags,
                        "--cores",
                        "2",
                        "--queue-input-wait-time",
                        "1",
                    ],
                    env=env,
                    log_dir=run,
                    registry=registry,
                    workdir=run,
                    unfinished=lambda: [],
                )
            else:

                def command(targets: Sequence[str], cores: int | None, flags: list[str] = flags) -> list[str]:
                    return [sys.executable, "-m", "snakemake", *flags, "--cores", str(cores), "--", *targets]

                backend = SubprocessPoolBackend(
                    command,
                    max_cores=2,
                    env=env,
                    log_dir=run,
                    registry=registry,
                    workdir=run,
                )
            backend.start(lambda targets, reason: None, lambda key: None)
            submitted: dict[str, float] = {}
            visits: list[list[str]] = []
            for index in range(args.visits):
                targets = [f"results/X/2026-11-27/g{index}/{d}/done.json" for d in range(9)]
                visits.append(targets)
                now = time.time()
                submitted.update({t: now for t in targets})
                backend.submit(Batch(f"g{index}", tuple(targets)))
                if index < args.visits - 1:
                    time.sleep(args.interval_s)
            deadline = time.monotonic() + 600
            while not all((run / t).exists() for t in submitted) and time.monotonic() < deadline:
                time.sleep(0.05)
            backend.drain(grace_s=30, term_wait_s=5)
            stats = results.setdefault(design, {"target": [], "visit": []})
            done = {t: (run / t).stat().st_mtime for t in submitted if (run / t).exists()}
            stats["target"] += [done[t] - submitted[t] for t in done]
            stats["visit"] += [max(done[t] for t in v) - submitted[v[0]] for v in visits if all(t in done for t in v)]
            print(f"{design} run {repeat}: {len(done)}/{len(submitted)} targets done", flush=True)
    return {
        design: {
            "submit_to_done_per_target": _stats(stats["target"]),
            "submit_to_last_done_per_visit": _stats(stats["visit"]),
        }
        for design, stats in results.items()
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print (and optionally save) the report."""
    args = _parse(argv)
    if args.compare_designs:
        report = {
            "visits": args.visits,
            "interval_s": args.interval_s,
            "job_s": args.job_s,
            "slow_ingest_s": args.slow_ingest_s,
            "repeats": args.repeats,
            **_compare_designs(args),
        }
        print(json.dumps(report, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return 0
    scale_tag = f"{args.scale:g}".replace(".", "p")  # no dot: the Butler would take ".125" for a file suffix
    repo = Path(args.repo or Path(args.workdir) / f"central_repo_scale{scale_tag}").resolve()
    started = time.monotonic()
    built = ensure_central_repo(repo, INSTRUMENT, args.scale)
    print(
        f"central repo {repo}: {'built in %.0f s' % (time.monotonic() - started) if built else 'existing'}", flush=True
    )
    detectors = [d.id for d in Instrument.from_config(load_config(instrument=INSTRUMENT)).active_detectors()]
    chosen, others = detectors[: args.detectors], detectors[args.detectors :]
    n_detectors = len(chosen)
    active = {"active_detectors": {"default": False, "overrides": {str(d): True for d in chosen}}}
    stack = LiveStack(
        Path(args.workdir),
        repo=repo,
        instrument=INSTRUMENT,
        scale=args.scale,
        design=args.design,
        overrides=active,
        shim_args=["--grace-s", "60"],
    )
    stop = threading.Event()
    with stack:
        assert stack.broker is not None  # started by LiveStack.__enter__
        topics = stack.config["kafka_topics"]
        raws = _Watcher(stack.broker.bootstrap, topics["raw_notification"], _raw_keys(stack.config), stop)
        alerts = _Watcher(stack.broker.bootstrap, topics["alerts"], _alert_keys, stop)
        raws.start()
        alerts.start()
        camera_args = ["--slew-s", str(args.slew_s), *args.upload_arg]
        if args.camera == "replay":
            skipped = [f"--skip-detector={d}" for d in others]
            upload = stack.upload_from_repo(args.groups, "--exposure-s", str(args.exptime), *skipped, *camera_args)
        else:
            wanted = ["--detectors", *map(str, chosen)]
            upload = stack.upload(args.groups, "--exptime", str(args.exptime), *wanted, *camera_args)
        print(upload.stdout.rstrip(), flush=True)
        ended = stack.wait_targets(args.groups * n_detectors, args.timeout_s)
        time.sleep(3.0)
        stop.set()
        raws.join(timeout=5)
        alerts.join(timeout=5)
        report = {
            "design": args.design,
            "scale": args.scale,
            "groups": args.groups,
            "detectors": n_detectors,
            "camera": args.camera,
            "exptime_s": args.exptime,
            "all_ended": ended,
            **_report(stack, raws, alerts),
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if ended else 1


if __name__ == "__main__":
    sys.exit(main())
