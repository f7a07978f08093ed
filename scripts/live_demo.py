"""Live demo: camera -> Kafka/S3 -> stream shim -> Snakemake -> alerts on Kafka, all on this machine.

    python scripts/live_demo.py [--groups 2] [--workdir demo/live] [--repo WORKDIR/central_repo]
        [--scale 0.25] [--design streaming|subprocess] [--late-detector ID ...] [--skip-detector ID ...]

1. Build the demo central repo if it is missing (LSSTComCamSim at --scale, templates at the
   demo field ra=150.1 dec=2.2: `scripts/make_central_repo.py --instruments LSSTComCamSim
   --repo REPO --scale 0.25 --visits 1`).  It belongs with WORKDIR: runs export their
   exposures to it, and WORKDIR keeps the raw bucket whose sequence numbers follow on.
2. Start a Kafka broker (Tansu), S3 (SeaweedFS, publishing filer events) and the shim
   (``python -m stream_shim`` with the filer bridge; its JSON log is WORKDIR/shim.log).
3. Run the camera, ``scripts/upload.py``, for a few groups at the demo field.
4. Print alerts as they arrive on the alert topic, then the targets' outcomes.
5. Stop the shim (SIGTERM: graceful) and the servers.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
import uuid
from pathlib import Path

from stream_shim.testbed.live_stack import LiveStack, ensure_central_repo
from workflow.core.config import PROJECT_ROOT

INSTRUMENT = "LSSTComCamSim"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=2, help="visits the camera takes (default 2)")
    parser.add_argument("--repo", default=None, help="central repo (default WORKDIR/central_repo)")
    parser.add_argument("--workdir", default=str(PROJECT_ROOT / "demo" / "live"), help="run directory")
    parser.add_argument("--scale", type=float, default=0.25, help="detector shrink factor (the repo's)")
    parser.add_argument("--design", default="streaming", choices=("streaming", "subprocess"))
    parser.add_argument("--late-detector", action="append", default=None, help="uploaded late (default 4)")
    parser.add_argument("--skip-detector", action="append", default=[], help="never uploaded")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="give up waiting after this long")
    return parser.parse_args(argv)


def _count_alerts(bootstrap: str, topic: str, stop: threading.Event, counts: collections.Counter) -> None:
    from confluent_kafka import Consumer

    from workflow.apdb.alerts import deserialize_alert

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"live-demo-alerts-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
        }
    )
    consumer.subscribe([topic])
    try:
        while not stop.is_set():
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            payload = message.value()
            assert payload is not None  # alerts are never tombstones
            source = deserialize_alert(payload)["diaSource"]
            key = (source["visit"], source["detector"])
            counts[key] += 1
            if counts[key] == 1:
                print(
                    f"  alerts arriving: visit {key[0]} detector {key[1]} (total so far {sum(counts.values())})",
                    flush=True,
                )
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return 0 if every target ended (done, or failed with a classified error)."""
    args = _parse(argv)
    workdir = Path(args.workdir).resolve()
    repo = Path(args.repo).resolve() if args.repo else workdir / "central_repo"
    print(
        f"central repo {repo}: "
        + (
            "built"
            if ensure_central_repo(repo, INSTRUMENT, args.scale)
            else f"existing (it must have been built at scale {args.scale})"
        ),
        flush=True,
    )
    late = args.late_detector if args.late_detector is not None else ["4"]
    stack = LiveStack(
        workdir,
        repo=repo,
        instrument=INSTRUMENT,
        scale=args.scale,
        design=args.design,
        overrides={"raw": {"image_timeout_s": 20.0}},
        shim_args=["--grace-s", "30"],
    )
    with stack:
        assert stack.broker is not None and stack.s3 is not None  # started by LiveStack.__enter__
        topic = stack.config["kafka_topics"]["alerts"]
        print(
            f"Kafka {stack.broker.bootstrap}, S3 {stack.s3.endpoint_url}; shim running (design {args.design}), "
            f"status {stack.state_dir / 'status.json'}, log {workdir / 'shim.log'}",
            flush=True,
        )
        stop = threading.Event()
        counts: collections.Counter[tuple[int, int]] = collections.Counter()  # (visit, detector) -> alerts
        counter = threading.Thread(
            target=_count_alerts, args=(stack.broker.bootstrap, topic, stop, counts), daemon=True
        )
        counter.start()
        started = time.monotonic()
        print(f"camera: {args.groups} group(s), late detector(s) {late}, skipped {args.skip_detector}", flush=True)
        upload = stack.upload(
            args.groups,
            "--slew-s",
            "2",
            "--exptime",
            "5",
            *[f"--late-detector={d}" for d in late],
            *[f"--skip-detector={d}" for d in args.skip_detector],
        )
        print(upload.stdout.rstrip(), flush=True)
        ended = stack.wait_targets(args.groups * 9, args.timeout_s)
        time.sleep(3.0)  # the last alerts
        stop.set()
        counter.join(timeout=5)
        status = stack.status()
    print(f"\nsummary after {time.monotonic() - started:.0f} s (shim exit {stack.shim_exit})")
    print("  targets:", status.get("gauges", {}).get("targets"))
    print("  failures by error:", status.get("counts", {}).get("failures", {}))
    print("  next_visit:", status.get("counts", {}).get("next_visit"))
    print("  raw notifications:", status.get("counts", {}).get("raw_notification"))
    print("  submit -> outcome:", status.get("latencies", {}).get("submit_to_outcome"))
    print(f"  alerts on topic {topic}: {sum(counts.values())} from {len(counts)} detector-visit(s)")
    for (visit, detector), n in sorted(counts.items()):
        print(f"    visit {visit} detector {detector}: {n}")
    return 0 if ended else 1


if __name__ == "__main__":
    sys.exit(main())
