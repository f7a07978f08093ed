"""Tests for the k8s profile (``profiles/k8s``) and `workflow.runtime.k8s_executor`, without a cluster.

Snakemake runs as a subprocess with the real profile, against the real S3 of
the `s3_server` fixture (the profile's storage prefix and endpoint are
overridden on the command line) and, for real runs, against
`fake_k8s.FakeKubernetes` (tests/fake_k8s.py), which records what the Kubernetes executor
submits and can run each Job's container command here.

- The real Snakefile (a copy of Snakefile, rules/, scripts/ and config/ in a
  temporary directory, so nothing is written into the checkout) is dry-run,
  and run with pods that fail at once: that shows the Jobs it would submit.
- The real Snakefile runs to completion, the fake running its pods' commands
  locally: a small LSSTComCamSim central repo (SQLite + files) and an SQLite
  APDB in the test's directory, raws in a raw bucket on the test S3, and a
  config overlay that travels to the pods in the source archive
  (``--configfile``, relative).  Each pod runs one detector-visit's whole
  chain through the node's stage server; ``done.json`` and the stage records
  land in S3, the exported datasets in the central repo, the DIA sources in
  the APDB.  A stage server that a pod started outlives the pod (its own
  session, idle timeout): the test stops it.
- A small stand-in Snakefile with the same rule names, group, file layout and
  resources but trivial steps runs to completion too: each step records its
  pod directory and the credentials it saw, which the real stages do not.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_k8s import FakeKubernetes, PodMode, PodRun
from raw_uploads import make_visit, upload_raw
from shared_helpers import copy_workflow

from stream_shim.testbed.local_services import S3Server
from workflow.core.buckets import S3Bucket
from workflow.core.config import PROJECT_ROOT, load_config
from workflow.core.instrument import instrument_for_run
from workflow.core.visit import DetectorVisit, NextVisit
from workflow.repo.central_repo import open_central_repo
from workflow.runtime.snakemake_runner import is_kubernetes_profile, snakemake_entry
from workflow.sim.demo_repo import build_demo_repo
from workflow.stages.export import output_chain

PROFILE = PROJECT_ROOT / "profiles" / "k8s"
RULES = ("prep", "ingest", "pipeline", "export", "apdb", "finish")
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD")
BUCKET = "k8s-profile"
DETECTORS = (3, 7)
RUN_TIMEOUT = 120
REAL_SCALE = 0.125
# The demo repo's two detectors nearest the boresight: they get templates (plan_demo, n_detectors=2).
REAL_DETECTORS = (1, 4)
REAL_FILTER = "r_03"  # a band of the demo's templates
REAL_STAMP = 1795851637.4  # TAI unix seconds: 2026-11-28T07:40:37, in the calibs' validity
STAGE_RECORDS = ("prep", "ingest", "pipeline", "export", "apdb")

STAND_IN_SNAKEFILE = """\
# Stand-in for the real Snakefile: same rules, group, paths and resources; each
# step only records where it ran (tests/test_k8s_profile.py).
TAIL = "{instrument}/{day_obs}/{group}/{detector}"
VISIT_FILE = "visits/" + TAIL + ".json"
WORK = "work_area/" + TAIL


wildcard_constraints:
    instrument=r"[A-Za-z][A-Za-z0-9-]*",
    day_obs=r"\\d{4}-\\d{2}-\\d{2}",
    group=r"[^/]+",
    detector=r"\\d+",


def step(name, inputs, resources):
    rule:
        name: name
        input: **inputs
        output: record=WORK + f"/{name}.json"
        group: "detector_visit"
        resources: **resources
        script: "scripts/step.py"


step("prep", {"visit": VISIT_FILE}, {"mem_mb": 1000})
step("ingest", {"visit": VISIT_FILE}, {"mem_mb": 1000})
step("pipeline", {"visit": VISIT_FILE, "prep": WORK + "/prep.json", "ingest": WORK + "/ingest.json"},
     {"mem_mb": 4000})
step("export", {"visit": VISIT_FILE, "pipeline": WORK + "/pipeline.json"}, {"mem_mb": 1000})
step("apdb", {"visit": VISIT_FILE, "pipeline": WORK + "/pipeline.json"}, {"mem_mb": 1000})


rule finish:
    input:
        visit=VISIT_FILE,
        records=expand(WORK + "/{name}.json", name=["prep", "ingest", "pipeline", "export",
                       "apdb"], allow_missing=True),
    output:
        done="results/" + TAIL + "/done.json",
    group:
        "detector_visit"
    script:
        "scripts/step.py"
"""

STAND_IN_STEP = '''\
"""One stand-in step: record the rule, its inputs, the pod directory and the credentials seen."""
import hashlib
import json
import os

paths = [p for key, value in snakemake.input.items() if key != "visit"
         for p in ([value] if isinstance(value, str) else value)]
records = [json.load(open(path)) for path in paths]
with open(snakemake.output[0], "w") as out:
    json.dump({
        "rule": snakemake.rule,
        "detector": int(snakemake.wildcards.detector),
        "visit": json.load(open(snakemake.input.visit)),
        "cwd": os.getcwd(),
        "credentials_sha256": {name: hashlib.sha256(os.environ[name].encode()).hexdigest()
                               for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD")
                               if name in os.environ},
        "inputs": records,
    }, out)
'''


# -- helpers ------------------------------------------------------------------------


def _profile() -> dict[str, Any]:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def _visits() -> list[DetectorVisit]:
    """Two detector-visits of one LSSTComCamSim group."""
    stamp = 1795851337.4
    next_visit = NextVisit(
        salIndex=2,
        scriptSalIndex=1,
        instrument="LSSTComCamSim",
        groupId="2026-11-28T07:35:00.000",
        coordinateSystem=2,
        position=[150.1, 2.2],
        startTime=stamp,
        rotationSystem=2,
        cameraAngle=12.0,
        filters="u_02",
        dome=2,
        duration=30.0,
        nimages=1,
        survey="k8s-test",
        totalCheckpoints=0,
        private_sndStamp=stamp,
    )
    return next_visit.fan_out(DETECTORS)


def _visit_key(visit: DetectorVisit) -> str:
    return f"visits/{visit.instrument}/{visit.day_obs}/{visit.groupId}/{visit.detector}.json"


def _target(visit: DetectorVisit) -> str:
    return f"results/{visit.instrument}/{visit.day_obs}/{visit.groupId}/{visit.detector}/done.json"


def _write_stand_in(dest: Path) -> Path:
    """Write the stand-in workflow (Snakefile and its one script) into ``dest``."""
    (dest / "scripts").mkdir(parents=True)
    (dest / "Snakefile").write_text(STAND_IN_SNAKEFILE)
    (dest / "scripts" / "step.py").write_text(STAND_IN_STEP)
    return dest


def _snakemake(
    entry: str,
    workdir: Path,
    s3_server: S3Server,
    prefix: str,
    env: Mapping[str, str],
    *args: str,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <entry> --profile profiles/k8s`` in ``workdir`` against the test S3."""
    command = [
        sys.executable,
        "-m",
        entry,
        "--profile",
        str(PROFILE),
        "--nolock",
        "--storage-s3-endpoint-url",
        s3_server.endpoint_url,
        "--default-storage-prefix",
        prefix,
        *args,
    ]
    return subprocess.run(
        command,
        cwd=workdir,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def _submit_env(home: Path, s3_server: S3Server, kubeconfig: Path | None) -> dict[str, str]:
    """Environment of the submitting shell: the credentials, and a kubeconfig or none at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "AWS_", "SNAKEMAKE_", "PG"))}
    env.update(
        HOME=str(home),
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        PGPASSWORD=f"pg-{secrets.token_hex(8)}",
    )
    env["KUBECONFIG"] = str(kubeconfig) if kubeconfig else str(home / "no-such-kubeconfig")
    return env


def _container(job: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _target_jobs(job: Mapping[str, Any]) -> set[tuple[str, int]]:
    """``(rule, detector)`` of each job that a Job's snakemake command runs (``--target-jobs``)."""
    command = " ".join(_container(job)["args"])
    return {(rule, int(detector)) for rule, detector in re.findall(r"'(\w+):[^']*detector=(\d+)'", command)}


def _upload_visits(
    s3_server: S3Server, prefix_key: str, visits: list[DetectorVisit] | None = None
) -> list[DetectorVisit]:
    """Put visit files (default: `_visits`) under ``s3://BUCKET/<prefix_key>/``, where the targets' inputs are."""
    client = s3_server.client()
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    visits = _visits() if visits is None else visits
    for visit in visits:
        client.put_object(Bucket=BUCKET, Key=f"{prefix_key}/{_visit_key(visit)}", Body=visit.to_json().encode())
    return visits


def _real_run_setup(run_dir: Path, workdir: Path, s3_server: S3Server) -> tuple[dict[str, Any], list[DetectorVisit]]:
    """Prepare a run of the real chain: central repo, APDB path, raws in S3, the config overlay.

    Builds a small LSSTComCamSim central repo (SQLite + files) in ``run_dir``,
    writes the overlay ``workdir/k8s-site.yaml`` (central repo, APDB and raw bucket
    on the test S3; absolute local paths, which the fake's local pods can reach),
    and uploads the raws of two detector-visits, with templates, to the raw bucket.

    Returns
    -------
    config : `dict`
        The merged configuration the pods see.
    visits : `list` [`workflow.core.visit.DetectorVisit`]
        The two detector-visits (their visit files not yet uploaded).
    """
    raw_bucket = f"raw-{secrets.token_hex(4)}"
    site = {
        "central_repo": str(run_dir / "repo"),
        "simulation": {"scale": REAL_SCALE, "seed": 0},
        "storage": {"endpoint_url": s3_server.endpoint_url, "local_root": str(run_dir / "unused-buckets")},
        "buckets": {"raw": raw_bucket},
        "apdb": {"db_url": f"sqlite:///{run_dir / 'apdb.sqlite3'}"},
        "raw": {"image_timeout_s": 10.0},
    }
    overlay = workdir / "k8s-site.yaml"
    overlay.write_text(yaml.safe_dump(site))
    config = load_config(instrument="LSSTComCamSim", extra_files=[overlay])
    build_demo_repo(
        config["central_repo"],
        ["LSSTComCamSim"],
        n_visits=1,
        scale=REAL_SCALE,
        n_detectors=len(REAL_DETECTORS),
        progress=False,
    )
    client = s3_server.client()
    client.create_bucket(Bucket=raw_bucket)
    # A fixed time (the day of `_visits`), so the simulated raws, and what the pipeline finds, are the same each run.
    visit = make_visit("LSSTComCamSim", "2026-11-28T07:40:00.000", REAL_FILTER, snd_stamp=REAL_STAMP)
    instrument = instrument_for_run(config)
    for detector in REAL_DETECTORS:
        upload_raw(S3Bucket(client, raw_bucket), config, instrument, visit, detector)
    return config, visit.fan_out(REAL_DETECTORS)


def _ran_one_pod_per_detector_visit(
    result: subprocess.CompletedProcess[str], fake_k8s: FakeKubernetes, visits: list[DetectorVisit]
) -> dict[int, PodRun]:
    """Check the run succeeded with one Job per detector-visit running its whole chain; return pods by detector."""
    output = result.stdout + result.stderr
    pod_logs = {
        name: pod.log_path.read_text(errors="replace")[-3000:]
        for name, pod in fake_k8s.pods.items()
        if pod.log_path.exists()
    }
    assert result.returncode == 0, output[-3000:] + json.dumps(pod_logs, indent=1)
    assert len(fake_k8s.jobs) == len(visits)
    pods_by_detector: dict[int, PodRun] = {}
    for job in fake_k8s.jobs:
        command = _container(job)["args"][1]
        assert "pip install" not in command and "--deploy-sources" in command
        (detector,) = {d for _, d in _target_jobs(job)}
        assert _target_jobs(job) == {(rule, detector) for rule in RULES}
        pods_by_detector[detector] = fake_k8s.pods[job["metadata"]["name"]]
    assert sorted(pods_by_detector) == sorted(v.detector for v in visits)
    assert {pod.exit_code for pod in fake_k8s.pods.values()} == {0}
    return pods_by_detector


@pytest.fixture
def fake_k8s(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FakeKubernetes]:
    """A fake API server with the profile's namespace; ``pod_mode`` from the test's parameter."""
    mode: PodMode = getattr(request, "param", "run")
    pod_env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.defpath}", "LANG": "C.UTF-8"}
    with FakeKubernetes(
        tmp_path / "pods",
        namespaces=(_profile()["kubernetes-namespace"],),
        pod_mode=mode,
        pod_env=pod_env,
        pod_timeout=RUN_TIMEOUT,
    ) as fake:
        yield fake


def _stage_servers_under(root: Path) -> dict[int, str]:
    """Return ``pid: socket path`` of the stage servers running with their working directory under ``root``.

    A pod's stage client starts the node's stage server (`workflow.runtime.stage_client`) in
    its own session, with the pod's directory as working directory: the fake's
    killing of a pod's process group does not reach it, and it exits only after
    `workflow.runtime.stage_server.IDLE_TIMEOUT_S` idle.
    """
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if argv[-2:-1] == ["workflow.runtime.stage_server"] and cwd.is_relative_to(root):
            found[int(proc.name)] = argv[-1]
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def stage_servers(tmp_path: Path) -> Iterator[None]:
    """At teardown, stop the stage servers that this test's pods started (by pid), and their stale sockets.

    A server still serving a stage (of another run sharing it) is left to its idle exit.
    """
    yield
    stopped = {}
    for pid, path in _stage_servers_under(tmp_path).items():
        try:
            if not Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                os.kill(pid, signal.SIGTERM)
                stopped[pid] = path
        except OSError:  # it has just exited
            pass
    deadline = time.monotonic() + 10.0
    while any(_alive(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.1)
    for path in set(stopped.values()):
        # Under the clients' start lock (workflow.runtime.stage_client), no server is starting: if nobody
        # listens, the socket is the stale one of a server stopped above.
        with open(f"{path}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a client is starting a server, which replaces the socket
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                except OSError:
                    Path(path).unlink(missing_ok=True)


# -- the profile file ------------------------------------------------------------------


class TestK8sProfileFile:
    """Tests for ``profiles/k8s/config.yaml`` as a file."""

    def test_names_credentials_but_holds_no_values(self) -> None:
        assert sorted(_profile()["envvars"]) == sorted(CREDENTIAL_VARS)
        suspicious = re.compile(r"secret|password|passwd|token|access[-_]?key|credential", re.I)
        for path in sorted((PROJECT_ROOT / "profiles").glob("*/config.yaml")):
            profile = yaml.safe_load(path.read_text())
            assert [key for key in profile if suspicious.search(key) and key != "envvars"] == [], path
            text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
            assert not re.search(r"(AWS_\w+|PGPASSWORD)\s*[=:]\s*\S", text), f"a credential value in {path}"

    def test_documents_how_to_run_in_production(self) -> None:
        header = (PROFILE / "config.yaml").read_text().split("\nexecutor:")[0]
        for needed in (
            *CREDENTIAL_VARS,
            "KUBECONFIG",
            "python -m workflow.runtime.k8s_executor",
            "default-storage-prefix",
            "container-image",
            "-n",
        ):
            assert needed in header, needed

    def test_one_component_per_group_job(self) -> None:
        profile = _profile()
        assert profile["executor"] == "kubernetes"
        assert profile["group-components"] == ["detector_visit=1"]
        assert profile["default-storage-provider"] == "s3"
        # workflow.runtime.k8s_executor leaves this to the profile (the stock plugin forces it).
        assert profile["shared-fs-usage"] == "none"

    def test_shared_volume_variant_differs_only_in_storage(self) -> None:
        """profiles/k8s-pvc: the same Jobs and requests, files on a volume instead of S3."""
        pvc = yaml.safe_load((PROJECT_ROOT / "profiles" / "k8s-pvc" / "config.yaml").read_text())
        storage = {"default-storage-provider", "default-storage-prefix", "storage-s3-endpoint-url"}
        shared = {"shared-fs-usage", "kubernetes-persistent-volumes"}
        s3 = _profile()
        assert {k: v for k, v in s3.items() if k not in storage | shared} == {
            k: v for k, v in pvc.items() if k not in shared
        }
        assert "input-output" in pvc["shared-fs-usage"] and "software-deployment" not in pvc["shared-fs-usage"]
        assert not storage & set(pvc)


class TestK8sExecutor:
    """Tests for `workflow.runtime.k8s_executor`."""

    def test_install_swaps_in_our_executor_once(self) -> None:
        code = (
            "from workflow.runtime.k8s_executor import install\n"
            "from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry as R\n"
            "before = R().get_plugin('kubernetes')\n"
            "print(install(), install())\n"
            "after = R().get_plugin('kubernetes')\n"
            "b, a = before.common_settings, after.common_settings\n"
            "print(b.auto_deploy_default_storage_provider, a.auto_deploy_default_storage_provider)\n"
            "print(b.implies_no_shared_fs, a.implies_no_shared_fs, a.job_deploy_sources)\n"
            "print(before.executor.__module__, after.executor.__module__)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:4] == [
            "True False",
            "True False",
            "True False True",
            "snakemake_executor_plugin_kubernetes workflow.runtime.k8s_batched",
        ]


# -- Snakemake with the profile ------------------------------------------------------------


class TestK8sProfileDryRun:
    """Tests for ``snakemake --profile profiles/k8s -n``."""

    def test_builds_dag_from_s3_without_kubeconfig(self, tmp_path: Path, s3_server: S3Server) -> None:
        """The default config, two targets: one group job per detector-visit, no kubeconfig anywhere."""
        visits = _upload_visits(s3_server, "dry")
        workdir = copy_workflow(tmp_path / "checkout")
        env = _submit_env(tmp_path, s3_server, kubeconfig=None)
        result = _snakemake(
            "snakemake", workdir, s3_server, f"s3://{BUCKET}/dry", env, "-n", "--", *map(_target, visits)
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        assert not Path(env["KUBECONFIG"]).exists() and not (tmp_path / ".kube").exists()
        for rule in RULES:
            assert re.search(rf"^{rule}\s+2$", output, re.M), f"{rule} x2 not in job stats"
        assert output.count("Group job detector_visit") == len(visits)
        assert f"s3://{BUCKET}/dry/{_visit_key(visits[0])} (retrieve from storage)" in output

    def test_missing_visit_in_s3_fails_naming_it(self, tmp_path: Path, s3_server: S3Server) -> None:
        """A dry run does read S3: a target whose visit file is not there fails, naming that file."""
        visits = _upload_visits(s3_server, "dry-missing")
        workdir = copy_workflow(tmp_path / "checkout")
        env = _submit_env(tmp_path, s3_server, kubeconfig=None)
        missing = _target(visits[0]).replace(f"/{visits[0].detector}/done.json", "/99/done.json")
        result = _snakemake("snakemake", workdir, s3_server, f"s3://{BUCKET}/dry-missing", env, "-n", "--", missing)
        output = result.stdout + result.stderr
        assert result.returncode == 1
        assert "Missing input files for rule prep" in output
        assert (
            f"s3://{BUCKET}/dry-missing/{_visit_key(visits[0]).replace(f'/{visits[0].detector}.json', '/99.json')}"
            " (in storage)" in output
        )


class TestK8sProfileJobs:
    """Tests for the Jobs that ``snakemake --profile profiles/k8s`` submits for the real Snakefile."""

    @pytest.mark.parametrize("fake_k8s", ["fail"], indirect=True)
    def test_one_job_per_detector_visit_with_profile_settings(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        fake_k8s: FakeKubernetes,
    ) -> None:
        visits = _upload_visits(s3_server, "jobs")
        workdir = copy_workflow(tmp_path / "checkout")
        env = _submit_env(tmp_path, s3_server, fake_k8s.write_kubeconfig(tmp_path / "kubeconfig"))
        result = _snakemake(
            "snakemake",
            workdir,
            s3_server,
            f"s3://{BUCKET}/jobs",
            env,
            "--seconds-between-status-checks",
            "1",
            "--",
            *map(_target, visits),
        )
        output = result.stdout + result.stderr
        # The fake fails every pod at once: the run fails, having submitted everything.
        assert result.returncode == 1, output[-3000:]
        profile = _profile()
        namespace = profile["kubernetes-namespace"]

        # One Job per detector-visit, each running that detector's whole chain.
        assert len(fake_k8s.jobs) == len(visits), output[-3000:]
        assert sorted(sorted(_target_jobs(job)) for job in fake_k8s.jobs) == sorted(
            sorted((rule, visit.detector) for rule in RULES) for visit in visits
        )
        assert {ns for _, path in fake_k8s.requests for ns in re.findall(r"/namespaces/([^/]+)/", path)} == {namespace}

        # Requests: CPU = cores x scalar; memory and disk = pipeline's, the chain's maximum
        # (prep + ingest, or export + apdb, side by side need less).
        expected_cpu = f"{int(profile['cores'] * profile['kubernetes-cpu-scalar'] * 1000)}m"
        pipeline = dict(
            item.split(":", 1)[1].split("=") for item in profile["set-resources"] if item.startswith("pipeline:")
        )
        for job in fake_k8s.jobs:
            container = _container(job)
            assert container["image"] == profile["container-image"]
            assert container["command"] == ["/bin/sh"]
            command = container["args"][1]
            assert "python -m snakemake --snakefile 'Snakefile'" in command and "--mode 'remote'" in command
            assert f"--default-storage-prefix 's3://{BUCKET}/jobs'" in command
            # Stock plugin: every pod pip-installs the storage plugin (why workflow.runtime.k8s_executor exists).
            assert "pip install" in command
            assert container["resources"]["requests"] == {
                "cpu": expected_cpu,
                "memory": f"{pipeline['mem_mb']}M",
                "ephemeral-storage": f"{pipeline['disk_mb']}M",
            }
            assert expected_cpu == "1000m"
            assert "limits" not in container["resources"]
        self._check_credentials_via_secret(fake_k8s, env, output)
        # Nor did the submitting side write one to disk (logs, metadata, kubernetes-logs).
        leaked = [str(p) for p in workdir.rglob("*") if p.is_file() and env["PGPASSWORD"].encode() in p.read_bytes()]
        assert leaked == []
        # Cleanup: each failed Job and its pod deleted, then the run's Secret.
        deleted = {(kind, name) for kind, _, name in fake_k8s.deleted}
        assert {("Job", job["metadata"]["name"]) for job in fake_k8s.jobs} <= deleted
        assert ("Secret", fake_k8s.secrets[0]["metadata"]["name"]) in deleted

    @staticmethod
    def _check_credentials_via_secret(fake_k8s: FakeKubernetes, env: Mapping[str, str], output: str) -> None:
        """Every credential reaches the pods through the one Secret, never inline."""
        (secret,) = fake_k8s.secrets
        values = fake_k8s.secret_values(secret)
        for name in CREDENTIAL_VARS:
            assert values[name.lower()] == env[name]
        for job in fake_k8s.jobs:
            container = _container(job)
            by_name = {item["name"]: item for item in container["env"]}
            assert set(CREDENTIAL_VARS) <= set(by_name)
            for item in container["env"]:
                assert "value" not in item, f"{item['name']} inline in the manifest"
                assert item["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
            text = json.dumps(job)
            # (The fixture's access key id, "prompt-snake", is also part of the image name.)
            for name in ("AWS_SECRET_ACCESS_KEY", "PGPASSWORD"):
                assert env[name] not in text
                assert base64.b64encode(env[name].encode()).decode() not in text
        assert env["PGPASSWORD"] not in output


class TestK8sProfileRun:
    """Tests for a run to completion with ``python -m workflow.runtime.k8s_executor --profile profiles/k8s``."""

    def test_chain_runs_to_completion_in_one_pod_per_detector_visit(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        fake_k8s: FakeKubernetes,
    ) -> None:
        visits = _upload_visits(s3_server, "run")
        workdir = _write_stand_in(tmp_path / "checkout")
        env = _submit_env(tmp_path, s3_server, fake_k8s.write_kubeconfig(tmp_path / "kubeconfig"))
        result = _snakemake(
            "workflow.runtime.k8s_executor",
            workdir,
            s3_server,
            f"s3://{BUCKET}/run",
            env,
            "--seconds-between-status-checks",
            "1",
            "--",
            *map(_target, visits),
        )
        pods_by_detector = _ran_one_pod_per_detector_visit(result, fake_k8s, visits)

        client = s3_server.client()
        digests = {name: hashlib.sha256(env[name].encode()).hexdigest() for name in CREDENTIAL_VARS}
        for visit in visits:
            key = f"run/{_target(visit)}"
            done = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            pod = pods_by_detector[visit.detector]
            assert done["rule"] == "finish" and done["detector"] == visit.detector
            assert done["visit"] == json.loads(visit.to_json())
            steps = [done, *done["inputs"], *(r for record in done["inputs"] for r in record["inputs"])]
            assert {step["rule"] for step in steps} == set(RULES)
            # Every step ran in this detector-visit's pod, with the credentials from the Secret.
            assert {Path(step["cwd"]) for step in steps} == {pod.workdir}
            assert all(step["credentials_sha256"] == digests for step in steps)
        # The pods got the credentials only from the Secret: the fake's pod environment has none.
        assert not set(CREDENTIAL_VARS) & set(fake_k8s.pod_env)
        assert ("Secret", fake_k8s.secrets[0]["metadata"]["name"]) in {(k, n) for k, _, n in fake_k8s.deleted}

    def test_real_chain_runs_to_completion_in_one_pod_per_detector_visit(
        self,
        tmp_path: Path,
        s3_server: S3Server,
        stage_servers: None,
        fake_k8s: FakeKubernetes,
    ) -> None:
        """The real Snakefile, a small central repo and APDB: each pod runs a detector's whole chain."""
        workdir = copy_workflow(tmp_path / "checkout")
        config, visits = _real_run_setup(tmp_path, workdir, s3_server)
        prefix = f"real-{secrets.token_hex(4)}"  # the visits are the same each run: a fresh prefix for each
        _upload_visits(s3_server, prefix, visits)
        env = _submit_env(tmp_path, s3_server, fake_k8s.write_kubeconfig(tmp_path / "kubeconfig"))
        result = _snakemake(
            "workflow.runtime.k8s_executor",
            workdir,
            s3_server,
            f"s3://{BUCKET}/{prefix}",
            env,
            "--seconds-between-status-checks",
            "1",
            "--configfile",
            "config/instruments/LSSTComCamSim.yaml",
            "k8s-site.yaml",
            "--",
            *map(_target, visits),
        )
        pods_by_detector = _ran_one_pod_per_detector_visit(result, fake_k8s, visits)
        for job in fake_k8s.jobs:  # config files by relative path, unpacked from the source archive into each pod
            command = _container(job)["args"][1]
            assert "--configfiles 'config/instruments/LSSTComCamSim.yaml' 'k8s-site.yaml'" in command
            assert str(tmp_path) not in command
        for pod in pods_by_detector.values():
            assert (pod.workdir / "k8s-site.yaml").read_text() == (workdir / "k8s-site.yaml").read_text()
        # S3 credentials (raw bucket, work prefix) came from the Secret only, deleted after the run.
        assert not set(CREDENTIAL_VARS) & set(fake_k8s.pod_env)
        assert all(pod.env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key for pod in fake_k8s.pods.values())
        assert ("Secret", fake_k8s.secrets[0]["metadata"]["name"]) in {(k, n) for k, _, n in fake_k8s.deleted}

        client = s3_server.client()
        exported: dict[str, set[tuple[int, int]]] = {}  # dataset type: {(visit, detector)}
        apdb_rows: dict[tuple[int, int], int] = {}  # (visit, detector): DIA sources the APDB record says it stored
        for visit in visits:
            tail = f"{visit.instrument}/{visit.day_obs}/{visit.groupId}/{visit.detector}"
            done = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/{_target(visit)}")["Body"].read())
            where = f"detector {visit.detector}: {done}"
            assert (done["detector"], done["group"], done["day_obs"]) == (
                visit.detector,
                visit.groupId,
                visit.day_obs,
            ), where
            # Both detectors have a template: the first-choice pipeline ran, with DIA sources.
            assert (done["outcome"], done["pipeline"]) == ("ok", "ApPipe"), where
            assert set(done["stage_seconds"]) == set(STAGE_RECORDS), where
            assert all(isinstance(seconds, float) for seconds in done["stage_seconds"].values()), where
            assert done["stage_seconds"]["pipeline"] > 0, where
            # The stage records went to S3 under work_area/, as in production (no shared filesystem).
            records = {
                name: json.loads(
                    client.get_object(Bucket=BUCKET, Key=f"{prefix}/work_area/{tail}/{name}.json")["Body"].read()
                )["body"]
                for name in STAGE_RECORDS
            }
            assert records["ingest"]["source"] == "bucket" and len(records["ingest"]["raws"]) == 1
            assert records["pipeline"]["pipeline"] == "ApPipe"
            export = records["export"]
            assert sorted(done["exported"]) == sorted(export["exported"]) and export["skipped"] == []
            assert {"difference_image", "dia_source_unfiltered"} <= set(done["exported"]), where
            assert export["chain"] == output_chain(visit.instrument, visit.day_obs)
            data_id = (export["data_id"]["visit"], export["data_id"]["detector"])
            assert data_id[1] == visit.detector
            for dataset_type in export["exported"]:
                exported.setdefault(dataset_type, set()).add(data_id)
            # The chain ran in this detector-visit's pod: its scratch (raws, products) is there, not elsewhere.
            for detector, pod in pods_by_detector.items():
                assert (pod.workdir / "work_area" / tail / "raws").is_dir() == (detector == visit.detector)
            # The APDB record: this detector-visit's DIA sources, stored.
            assert done["apdb"] == records["apdb"]
            # What each forked stage used, from its own rusage (not the stage client's).
            assert done["stage_resources"]["pipeline"]["cpu_user_s"] > 0, where
            assert done["apdb"]["stored"] is True and done["apdb"]["n_dia_sources"] > 0, where
            apdb_rows[data_id] = done["apdb"]["n_dia_sources"]

        # The exported datasets are in the central repo, in the night's output chain, one per detector-visit.
        butler = open_central_repo(config["central_repo"])
        chain = output_chain(visits[0].instrument, visits[0].day_obs)
        assert {data_id[1] for data_id in exported["difference_image"]} == set(REAL_DETECTORS)
        for dataset_type, data_ids in exported.items():
            refs = butler.query_datasets(dataset_type, collections=chain, limit=None, explain=False)
            assert sorted((ref.dataId["visit"], ref.dataId["detector"]) for ref in refs) == sorted(data_ids)
        # The APDB holds exactly the DIA sources the records say were stored.
        with closing(sqlite3.connect(config["apdb"]["db_url"].removeprefix("sqlite:///"))) as apdb:
            rows = apdb.execute('SELECT visit, detector, COUNT(*) FROM "DiaSource" GROUP BY visit, detector')
            assert {(visit_id, detector): n for visit_id, detector, n in rows} == apdb_rows


def test_the_job_path_is_known_by_the_profiles_executor_not_its_name() -> None:
    assert [is_kubernetes_profile(f"profiles/{p}") for p in ("local", "k8s", "k8s-pvc")] == [False, True, True]
    assert snakemake_entry("profiles/k8s-pvc") == ["-m", "workflow.runtime.k8s_executor"]
    assert snakemake_entry("profiles/local") == ["-m", "snakemake"]
