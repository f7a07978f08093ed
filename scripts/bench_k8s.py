"""Kubernetes Job path benchmark: one visit's targets through ``--profile profiles/k8s*`` against a fake API server.

    python scripts/bench_k8s.py [--targets 189] [--delays 0 20] [--variants before k8s k8s-pvc ...]
        [--workdir demo/bench_k8s] [--timeout-s 900] [--json out.json]

Kubernetes cannot run here: the API server is `stream_shim.testbed.fake_k8s.FakeKubernetes`
(in a thread of this process), whose pods run nothing: ``--delays`` seconds after a
Job is created its pod writes the files the Job's ``--target-jobs`` would write
(each rule's output, log and benchmark, as the real Snakefile names them) and ends
with exit code 0.  The submitting Snakemake is the real one, on the real Snakefile,
with the profile of each variant (`VARIANTS`): S3 variants use a SeaweedFS server
(`stream_shim.testbed.local_services.S3Server`) as default storage, the shared-volume
variant a directory standing for the PersistentVolumeClaim.

For each variant and delay, one JSON entry: time from the invocation's start to the
first Job created and to the last pod finished; completion -> noticed (the pod's
end to the line where Snakemake's main process reports the group's ``finish`` job
finished), p50/p95/max; completion -> first API answer showing it finished (what the
status thread sees); API calls by kind; the submitting Snakemake's CPU user and sys
and peak RSS (its rusage, ``os.wait4``); the load average before and after.  All
numbers are measured against the fake API, not a cluster.  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from stream_shim.testbed.fake_k8s import FakeKubernetes, PodAction, PodRun
from stream_shim.testbed.local_services import S3Server
from workflow.core.config import PROJECT_ROOT
from workflow.core.visit import CoordSys, DetectorVisit, Dome, NextVisit, RotSys

_log = logging.getLogger("bench_k8s")

INSTRUMENT = "LSSTCam"
BUCKET = "bench-k8s"
NAMESPACE_KEY = "kubernetes-namespace"
RULES = ("prep", "ingest", "pipeline", "export", "apdb", "finish")
_MARKER = ".bench_k8s"
_RESOURCES = {"jobs", "pods", "secrets", "namespaces"}
_TARGET_JOB = re.compile(r"'(\w+):([^']*detector=\d+[^']*)'")
_FINISHED = re.compile(r"Finished jobid: (\d+) \(Rule: finish\)")
_SUCCEEDED = re.compile(r"Job (snakejob-[0-9a-f-]+) succeeded\.")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the Job path.

    Attributes
    ----------
    profile : `str`
        Profile directory under profiles/.
    entry : `str`
        Module started with ``python -m`` (``snakemake``: the stock executor).
    drop : `tuple` [`str`, ...]
        Profile keys removed (Snakemake's defaults apply).
    set : `dict`
        Profile keys set or replaced.
    shared_fs : `bool`
        Files on a shared volume (a local directory here) instead of S3.
    note : `str`
    """

    profile: str
    entry: str
    note: str
    drop: tuple[str, ...] = ()
    set: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    shared_fs: bool = False


VARIANTS: dict[str, Variant] = {
    "before": Variant(
        "k8s",
        "snakemake",
        "the profile before issue 14: stock executor (2 API calls per Job per round), "
        "Snakemake's default polling (10 s between rounds, 10 calls/s), scheduler-subsample 100, metadata kept",
        drop=("seconds-between-status-checks", "max-status-checks-per-second", "shared-fs-usage", "drop-metadata"),
        set={"scheduler-subsample": 100},
    ),
    "stock-1s": Variant(
        "k8s",
        "snakemake",
        "profiles/k8s with the stock executor (plain snakemake) polled every 1 s at 1000 calls/s",
        set={"seconds-between-status-checks": 1, "max-status-checks-per-second": 1000},
    ),
    "k8s": Variant(
        "k8s",
        "workflow.runtime.k8s_executor",
        "profiles/k8s as it is: workflow.runtime.k8s_executor (one listing per round), S3",
    ),
    "k8s-group4": Variant(
        "k8s",
        "workflow.runtime.k8s_executor",
        "profiles/k8s with four detector-visits per Job (the stand-in pods take no longer for four)",
        set={"group-components": ["detector_visit=4"]},
    ),
    "k8s-pvc": Variant(
        "k8s-pvc",
        "workflow.runtime.k8s_executor",
        "profiles/k8s-pvc as it is: files on a shared volume (a local directory here), no S3",
        shared_fs=True,
    ),
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=189, help="detector-visits of one visit (default 189)")
    parser.add_argument(
        "--delays", type=float, nargs="+", default=[0.0, 20.0], help="pod run time(s), seconds (default 0 20)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS), help="default: all")
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "demo" / "bench_k8s")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per Snakemake run (default 900)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


# -- the stand-in pods ----------------------------------------------------------------


def _rule_files(rule: str, tail: str) -> list[str]:
    """Output, log and benchmark of one rule for one detector-visit, as the real rules/ name them."""
    output = f"results/{tail}/done.json" if rule == "finish" else f"work_area/{tail}/{rule}.json"
    return [output, f"logs/{rule}/{tail}.log", f"benchmarks/{rule}/{tail}.tsv"]


_BENCHMARK_TSV = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n" + (
    "0.0100\t0:00:00\t1.0\t1.0\t1.0\t1.0\t0\t0\t0\t0\n"
)


def job_files(job: Mapping[str, Any]) -> list[str]:
    """Every file a Job's ``--target-jobs`` would write (paths relative to the workflow's root).

    Parameters
    ----------
    job : mapping
        The Job manifest as submitted.

    Returns
    -------
    paths : `list` [`str`]
    """
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    files = []
    for rule, spec in _TARGET_JOB.findall(command):
        wildcards = dict(item.split("=", 1) for item in spec.split(","))
        tail = "/".join(wildcards[name] for name in ("instrument", "day_obs", "group", "detector"))
        files += _rule_files(rule, tail)
    return files


def job_detectors(job: Mapping[str, Any]) -> set[int]:
    """The detectors whose chains a Job runs."""
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    return {int(d) for _, spec in _TARGET_JOB.findall(command) for d in re.findall(r"detector=(\d+)", spec)}


def _writer(put: Callable[[str, bytes], None]) -> PodAction:
    """A pod action that writes its Job's files through ``put(path, data)`` and succeeds."""

    def action(pod: PodRun, job: Mapping[str, Any]) -> int:
        files = job_files(job)
        if not files:
            raise RuntimeError(f"pod {pod.name}: no --target-jobs in its command")
        for path in files:
            put(path, _BENCHMARK_TSV.encode() if path.endswith(".tsv") else b'{"bench": true}\n')
        return 0

    return action


# -- one run ---------------------------------------------------------------------------------


def _visits(n: int) -> list[DetectorVisit]:
    stamp = time.time() + 37.0  # TAI-ish; only the names matter here
    visit = NextVisit(
        salIndex=1,
        scriptSalIndex=1,
        instrument=INSTRUMENT,
        groupId="2026-12-02T05:00:00.000",
        coordinateSystem=CoordSys.ICRS,
        position=[150.1, 2.2],
        startTime=stamp,
        rotationSystem=RotSys.SKY,
        cameraAngle=0.0,
        filters="r_57",
        dome=Dome.OPEN,
        duration=30.0,
        nimages=1,
        survey="bench-k8s",
        totalCheckpoints=0,
        private_sndStamp=stamp,
    )
    return visit.fan_out(range(n))


def _tail(visit: DetectorVisit) -> str:
    return f"{visit.instrument}/{visit.day_obs}/{visit.groupId}/{visit.detector}"


def _copy_workflow(dest: Path) -> Path:
    """The workflow sources Snakemake ships to pods (Snakefile, rules/, scripts/, config/, envs/)."""
    dest.mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "Snakefile", dest / "Snakefile")
    for name in ("rules", "scripts", "config", "envs"):
        if (PROJECT_ROOT / name).is_dir():
            shutil.copytree(PROJECT_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _profile_dir(variant: Variant, dest: Path) -> Path:
    """Write the variant's profile (the repository's, with ``drop`` and ``set`` applied) into ``dest``."""
    profile = yaml.safe_load((PROJECT_ROOT / "profiles" / variant.profile / "config.yaml").read_text())
    for key in variant.drop:
        profile.pop(key, None)
    profile.update(variant.set)
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile))
    return dest


class _Lines(threading.Thread):
    """Read a stream, keeping each line with the time it arrived."""

    def __init__(self, stream: Any, log_path: Path) -> None:
        super().__init__(daemon=True)
        self.stream, self.log_path = stream, log_path
        self.lines: list[tuple[float, str]] = []

    def run(self) -> None:
        with open(self.log_path, "w") as log:
            for raw in self.stream:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append((time.time(), line))
                log.write(line + "\n")


def _noticed_by_detector(lines: list[tuple[float, str]], detectors_of_job: Mapping[str, set[int]]) -> dict[int, float]:
    """When the main process reported each detector-visit's ``finish`` job finished (from its log).

    Both executors log ``Job <name> succeeded.`` from the status thread, in the
    order they hand the Jobs to Snakemake's main loop, which then post-processes
    them in that order and logs ``Finished jobid: N (Rule: finish)`` for each
    ``finish`` job of the Job (one per detector-visit it ran).
    """
    pending: list[int] = []
    noticed = {}
    for when, line in lines:
        if match := _SUCCEEDED.search(line):
            pending += sorted(detectors_of_job.get(match.group(1), ()))
        elif _FINISHED.search(line) and pending:
            noticed[pending.pop(0)] = when
    return noticed


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 2),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "max": round(ordered[-1], 2),
    }


def _api_calls(requests: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Count requests by method and resource: ``GET jobs`` (a list), ``GET job/status``, ``DELETE pod``..."""
    kinds: Counter[str] = Counter()
    for method, path in requests:
        parts = path.strip("/").split("/")
        where = max((i for i, part in enumerate(parts) if part in _RESOURCES), default=len(parts) - 1)
        kind = parts[where] if where == len(parts) - 1 else f"{parts[where].rstrip('s')}"
        if where + 2 < len(parts):
            kind += "/" + parts[-1]
        kinds[f"{method} {kind}"] += 1
    return dict(sorted(kinds.items()))


def run_variant(
    name: str, variant: Variant, delay_s: float, n_targets: int, s3: S3Server, root: Path, timeout_s: float
) -> dict[str, Any]:
    """Run one visit of ``n_targets`` through ``variant`` with pods lasting ``delay_s``; return its entry."""
    run_dir = root / f"{name}-{delay_s:g}s"
    checkout = _copy_workflow(run_dir / "checkout")
    profile_dir = _profile_dir(variant, run_dir / "profile")
    profile = yaml.safe_load((profile_dir / "config.yaml").read_text())
    visits = _visits(n_targets)
    client = s3.client()
    key_prefix = f"{name}-{delay_s:g}s-{secrets.token_hex(3)}"
    put: Callable[[str, bytes], None]
    if variant.shared_fs:

        def put(path: str, data: bytes) -> None:
            target = checkout / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

        storage_args = ["--kubernetes-persistent-volumes", f"bench-claim:{run_dir}"]
    else:

        def put(path: str, data: bytes) -> None:
            client.put_object(Bucket=BUCKET, Key=f"{key_prefix}/{path}", Body=data)

        storage_args = [
            "--storage-s3-endpoint-url",
            s3.endpoint_url,
            "--default-storage-prefix",
            f"s3://{BUCKET}/{key_prefix}",
        ]
    for visit in visits:
        put(f"visits/{_tail(visit)}.json", visit.to_json().encode())
    targets = [f"results/{_tail(visit)}/done.json" for visit in visits]
    with FakeKubernetes(
        run_dir / "pods",
        namespaces=(profile[NAMESPACE_KEY],),
        pod_mode="action",
        pod_action=_writer(put),
        pod_delay_s=delay_s,
        action_workers=4,
    ) as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "AWS_", "SNAKEMAKE_", "PG"))}
        env.update(
            HOME=str(run_dir),
            AWS_ACCESS_KEY_ID=s3.access_key,
            AWS_SECRET_ACCESS_KEY=s3.secret_key,
            AWS_DEFAULT_REGION=s3.region,
            PGPASSWORD="bench-not-used",
            KUBECONFIG=str(fake.write_kubeconfig(run_dir / "kubeconfig", profile[NAMESPACE_KEY])),
        )
        command = [
            sys.executable,
            "-m",
            variant.entry,
            "--profile",
            str(profile_dir),
            "--nolock",
            "--rerun-incomplete",
            "--set-threads",
            "ingest=0",
            *storage_args,
            "--configfile",
            f"config/instruments/{INSTRUMENT}.yaml",
            "--",
            *targets,
        ]
        load_before = os.getloadavg()
        started = time.time()
        process = subprocess.Popen(
            command, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        reader = _Lines(process.stdout, run_dir / "snakemake.log")
        reader.start()
        killer = threading.Timer(timeout_s, process.kill)
        killer.start()
        _, status, usage = os.wait4(process.pid, 0)
        ended = time.time()
        killer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        reader.join(timeout=30)
        load_after = os.getloadavg()
        pods = list(fake.pods.values())
        requests = list(fake.requests)
        detectors_of_job = {job["metadata"]["name"]: job_detectors(job) for job in fake.jobs}
    noticed = _noticed_by_detector(reader.lines, detectors_of_job)
    finished = {
        detector: pod.finished_at
        for pod in pods
        if pod.finished_at is not None
        for detector in detectors_of_job[pod.job]
    }
    done_missing = sum(1 for path in targets if not _exists(variant, client, key_prefix, checkout, path))
    n_visits = 1
    return {
        "variant": name,
        "note": variant.note,
        "profile": profile,
        "entry": variant.entry,
        "pod_delay_s": delay_s,
        "targets": n_targets,
        "exit_code": process.returncode,
        "targets_done": n_targets - done_missing,
        "jobs_created": len(pods),
        "wall_s": round(ended - started, 2),
        "targets_per_s": round(n_targets / (ended - started), 2),
        "first_job_created_s": round(min(pod.created_at for pod in pods) - started, 2) if pods else None,
        "last_job_created_s": round(max(pod.created_at for pod in pods) - started, 2) if pods else None,
        "last_pod_finished_s": round(max(finished.values()) - started, 2) if finished else None,
        "last_noticed_s": round(max(noticed.values()) - started, 2) if noticed else None,
        "completion_to_noticed_s": _stats(
            [noticed[d] - finished[d] for d in noticed if d in finished and noticed[d] >= finished[d] - 1]
        ),
        "completion_to_status_seen_s": _stats(
            [pod.seen_finished_at - pod.finished_at for pod in pods if pod.seen_finished_at and pod.finished_at]
        ),
        "api_calls": len(requests),
        "api_calls_per_visit": len(requests) // n_visits,
        "api_calls_by_kind": _api_calls(requests),
        "submitter": {
            "cpu_user_s": round(usage.ru_utime, 2),
            "cpu_sys_s": round(usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "targets_per_cpu_s": round(n_targets / max(usage.ru_utime + usage.ru_stime, 1e-9), 2),
        },
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "log": str(run_dir / "snakemake.log"),
    }


def _exists(variant: Variant, client: Any, key_prefix: str, checkout: Path, path: str) -> bool:
    if variant.shared_fs:
        return (checkout / path).is_file()
    try:
        client.head_object(Bucket=BUCKET, Key=f"{key_prefix}/{path}")
    except client.exceptions.ClientError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the JSON document.

    Returns
    -------
    status : `int`
        0 if every run ended with every target done, 1 otherwise.
    """
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    root = args.workdir.resolve()
    if root.exists():
        if not (root / _MARKER).exists():
            raise SystemExit(f"{root} exists and was not made by this script; choose another --workdir")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / _MARKER).touch()
    runs = []
    with S3Server(root / "s3") as s3:
        s3.client().create_bucket(Bucket=BUCKET)
        for delay in args.delays:
            for name in args.variants:
                _log.info("variant %s, pods %g s, %d targets", name, delay, args.targets)
                entry = run_variant(name, VARIANTS[name], delay, args.targets, s3, root, args.timeout_s)
                _log.info(
                    "%s %g s: exit %s, %d/%d done, wall %.1f s, noticed %s, cpu %s",
                    name,
                    delay,
                    entry["exit_code"],
                    entry["targets_done"],
                    args.targets,
                    entry["wall_s"],
                    entry["completion_to_noticed_s"],
                    entry["submitter"],
                )
                runs.append(entry)
    document = {
        "benchmark": "bench_k8s",
        "api": "fake (stream_shim.testbed.fake_k8s.FakeKubernetes), not a cluster",
        "targets": args.targets,
        "delays_s": args.delays,
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    text = json.dumps(document, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = all(run["exit_code"] == 0 and run["targets_done"] == args.targets for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
