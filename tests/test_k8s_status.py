"""Tests for `workflow.runtime.k8s_batched` (one listing per status round) and profiles/k8s-pvc, without a cluster.

Snakemake runs as a subprocess through ``python -m workflow.runtime.k8s_executor``
against `fake_k8s.FakeKubernetes` (tests/fake_k8s.py) in ``"action"`` mode: a pod
runs nothing, it writes the outputs its Job's ``--target-jobs`` name into the
test's directory (the "shared volume" of profiles/k8s-pvc) and ends, or fails.
The workflow is a stand-in with the real rule names, group and file layout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_k8s import FakeKubernetes, PodRun

from workflow.core.config import PROJECT_ROOT
from workflow.runtime.k8s_batched import FINISHED_TTL_S, RUN_LABEL, JobOutcome, job_outcome

PROFILE = PROJECT_ROOT / "profiles" / "k8s-pvc"
TAIL = "LSSTCam/2026-12-02/g1/{detector}"
DETECTORS = (0, 1, 2)
FAILING = 1
TIMEOUT = 180

SNAKEFILE = """\
TAIL = "{instrument}/{day_obs}/{group}/{detector}"
WORK = "work_area/" + TAIL


def step(name, inputs):
    rule:
        name: name
        input: visit="visits/" + TAIL + ".json", **inputs
        output: WORK + f"/{name}.json"
        group: "detector_visit"
        shell: "exit 1  # the fake's pods run nothing"


step("prep", {})
step("ingest", {})
step("pipeline", {"prep": WORK + "/prep.json", "ingest": WORK + "/ingest.json"})
step("export", {"pipeline": WORK + "/pipeline.json"})
step("apdb", {"pipeline": WORK + "/pipeline.json"})


rule finish:
    input:
        export=WORK + "/export.json",
        apdb=WORK + "/apdb.json",
    output:
        "results/" + TAIL + "/done.json",
    group:
        "detector_visit"
    shell:
        "exit 1"
"""

_TARGET_JOB = re.compile(r"'(\w+):([^']*)'")


def _outputs(job: Mapping[str, Any]) -> tuple[int, list[str]]:
    """The detector of a Job and the outputs its ``--target-jobs`` name."""
    command = _container(job)["args"][1]
    outputs, detectors = [], set()
    for rule, spec in _TARGET_JOB.findall(command.split("--target-jobs", 1)[1]):
        wildcards = dict(item.split("=", 1) for item in spec.split(","))
        tail = "/".join(wildcards[k] for k in ("instrument", "day_obs", "group", "detector"))
        detectors.add(int(wildcards["detector"]))
        outputs.append(f"results/{tail}/done.json" if rule == "finish" else f"work_area/{tail}/{rule}.json")
    (detector,) = detectors
    return detector, outputs


def _container(job: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _run(workdir: Path, fake: FakeKubernetes, volume: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "AWS_", "SNAKEMAKE_", "PG"))}
    env.update(
        HOME=str(workdir.parent),
        AWS_ACCESS_KEY_ID="test-id",
        AWS_SECRET_ACCESS_KEY="test-secret",
        PGPASSWORD="test-pg",
        KUBECONFIG=str(fake.write_kubeconfig(workdir.parent / "kubeconfig")),
    )
    targets = [f"results/{TAIL.format(detector=d)}/done.json" for d in DETECTORS]
    command = [
        sys.executable,
        "-m",
        "workflow.runtime.k8s_executor",
        "--profile",
        str(PROFILE),
        "--nolock",
        "--kubernetes-persistent-volumes",
        f"test-claim:{volume}",
        "--seconds-between-status-checks",
        "1",
        *extra,
        "--",
        *targets,
    ]
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL
    )


def _workdir(root: Path) -> Path:
    workdir = root / "volume" / "night"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(SNAKEFILE)
    for detector in DETECTORS:
        visit = workdir / "visits" / f"{TAIL.format(detector=detector)}.json"
        visit.parent.mkdir(parents=True, exist_ok=True)
        visit.write_text(json.dumps({"detector": detector}))
    return workdir


def _pod_writes_into(workdir: Path):  # -> PodAction
    def action(pod: PodRun, job: Mapping[str, Any]) -> int:
        detector, outputs = _outputs(job)
        if detector == FAILING:
            pod.log_path.write_text(f"stand-in pod of detector {detector}: failing on purpose\n")
            return 1
        for path in outputs:
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
            (workdir / path).write_text(json.dumps({"detector": detector, "pod": pod.name}))
        return 0

    return action


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return _workdir(tmp_path)


@pytest.fixture
def fake(tmp_path: Path, workdir: Path):
    namespace = yaml.safe_load((PROFILE / "config.yaml").read_text())["kubernetes-namespace"]
    with FakeKubernetes(
        tmp_path / "pods", namespaces=(namespace,), pod_mode="action", pod_action=_pod_writes_into(workdir)
    ) as server:
        yield server


class TestJobOutcome:
    """Tests for `workflow.runtime.k8s_batched.job_outcome` (on the API's JSON, as listed)."""

    @staticmethod
    def _pod(exit_code: int | None, name: str = "snakemake") -> dict[str, Any]:
        state = {"running": {}} if exit_code is None else {"terminated": {"exitCode": exit_code}}
        return {"status": {"containerStatuses": [{"name": name, "state": state}]}}

    @pytest.mark.parametrize(
        ("job_status", "exit_code", "expected"),
        [
            ({"active": 1}, None, JobOutcome.RUNNING),
            ({"succeeded": 1}, 0, JobOutcome.SUCCEEDED),
            ({"failed": 1}, 1, JobOutcome.FAILED),
            ({"failed": 1}, None, JobOutcome.FAILED),
            # A sidecar keeps the Job active after our container ended: the container decides.
            ({"active": 1}, 0, JobOutcome.SUCCEEDED),
            ({"active": 1}, 2, JobOutcome.FAILED),
        ],
    )
    def test_outcome(self, job_status: dict[str, int], exit_code: int | None, expected: JobOutcome) -> None:
        pod = None if exit_code is None and "failed" in job_status else self._pod(exit_code)
        assert job_outcome({"status": job_status}, pod) is expected

    def test_other_containers_do_not_count_and_a_missing_job_is_missing(self) -> None:
        job = {"metadata": {"name": "j"}, "status": {"active": 1}}
        assert job_outcome(job, self._pod(0, name="istio-proxy")) is JobOutcome.RUNNING
        assert job_outcome(job, None) is JobOutcome.RUNNING
        assert job_outcome({"metadata": {"name": "j"}}, {}) is JobOutcome.RUNNING  # no status yet
        assert job_outcome(None, None) is JobOutcome.MISSING


class TestBatchedStatus:
    """Tests for the status rounds and Job manifests of `workflow.runtime.k8s_batched.BatchedStatusExecutor`."""

    def test_outcomes_noticed_from_one_listing_per_round(self, tmp_path: Path, workdir: Path, fake) -> None:
        result = _run(workdir, fake, tmp_path / "volume")
        output = result.stdout + result.stderr
        # One pod fails on purpose: the run fails, the others complete (keep-going).
        assert result.returncode == 1, output[-3000:]
        assert len(fake.jobs) == len(DETECTORS), output[-3000:]
        by_detector = {_outputs(job)[0]: job for job in fake.jobs}
        (secret,) = fake.secrets
        run_id = secret["metadata"]["name"]

        # Outcomes: the good chains are finished for Snakemake (no incomplete marker left, done.json
        # in place), the failing one is reported with its pod's log saved.
        for detector in DETECTORS:
            done = workdir / "results" / TAIL.format(detector=detector) / "done.json"
            assert done.exists() == (detector != FAILING)
        incomplete = workdir / ".snakemake" / "incomplete"
        assert not incomplete.exists() or not any(p.is_file() for p in incomplete.rglob("*"))
        failed_name = by_detector[FAILING]["metadata"]["name"]
        saved = workdir / ".snakemake" / "auxiliary" / "kubernetes-logs" / f"{failed_name}.log"
        assert "failing on purpose" in saved.read_text()
        assert f"Job {failed_name} failed." in output
        for detector in set(DETECTORS) - {FAILING}:
            assert f"Job {by_detector[detector]['metadata']['name']} succeeded." in output

        # Calls: each round lists the run's Jobs and pods by label, nothing per Job.
        calls = list(zip(fake.requests, fake.request_queries, strict=True))
        gets = [(path, query) for (method, path), query in calls if method == "GET"]
        lists = [("GET", path.rsplit("/", 1)[1], query) for path, query in gets if path.endswith(("/jobs", "/pods"))]
        # The one other read: the failed pod's log.
        (log_read,) = [path for path, _ in gets if not path.endswith(("/jobs", "/pods"))]
        assert log_read.endswith(f"/pods/{fake.pods[failed_name].name}/log")
        assert {(kind, query.get("labelSelector")) for _, kind, query in lists} == {
            ("jobs", f"{RUN_LABEL}={run_id}"),
            ("pods", f"{RUN_LABEL}={run_id}"),
        }
        assert [kind for _, kind, _ in lists].count("jobs") == [kind for _, kind, _ in lists].count("pods") >= 1
        assert not any(path.endswith("/status") for _, path in fake.requests)
        # Cleanup: each finished Job deleted once, its pod left to the garbage collector.
        deletes = [(path.rsplit("/", 1)[1], query) for (method, path), query in calls if method == "DELETE"]
        job_deletes = sorted(name for name, query in deletes if name.startswith("snakejob-"))
        assert job_deletes == sorted(job["metadata"]["name"] for job in fake.jobs)
        assert all(query.get("propagationPolicy") == "Background" for name, query in deletes if name in job_deletes)
        assert [kind for kind, _, _ in fake.deleted].count("Pod") == 0

        # Manifests: run label on the Job and its pods, a TTL, the pods working in our directory on the volume.
        for job in fake.jobs:
            assert job["metadata"]["labels"][RUN_LABEL] == run_id
            assert job["spec"]["template"]["metadata"]["labels"][RUN_LABEL] == run_id
            assert job["spec"]["ttlSecondsAfterFinished"] == FINISHED_TTL_S
            container = _container(job)
            assert container["workingDir"] == str(workdir)
            volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
            assert volumes["test-claim"]["persistentVolumeClaim"] == {"claimName": "test-claim"}
            assert {"name": "test-claim", "mountPath": str(tmp_path / "volume")} in container["volumeMounts"]
            command = container["args"][1]
            # No storage plugin, no source archive: the pods read the checkout on the volume.
            for absent in ("pip install", "--deploy-sources", "--default-storage-provider"):
                assert absent not in command
            assert "--shared-fs-usage" in command and "input-output" in command

    def test_refuses_a_working_directory_off_the_volumes(self, tmp_path: Path, workdir: Path, fake) -> None:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        result = _run(workdir, fake, elsewhere)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert f"the working directory {workdir} is on no volume of --kubernetes-persistent-volumes" in output
        assert fake.jobs == [] and fake.secrets == []  # refused before the run's Secret was made


def test_group_level_pause_dropped_once() -> None:
    """`drop_group_level_pause` replaces the one ``asyncio.sleep`` of ``snakemake.jobs``, nothing else."""
    code = (
        "import asyncio, snakemake.jobs as j\n"
        "from workflow.runtime.snakemake_tuning import drop_group_level_pause\n"
        "print(drop_group_level_pause(), drop_group_level_pause())\n"
        "print(j.asyncio.sleep is asyncio.sleep, j.asyncio.TaskGroup is asyncio.TaskGroup)\n"
        "print(asyncio.run(j.asyncio.sleep(3600, 'went on')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["True False", "False True", "went on"]
