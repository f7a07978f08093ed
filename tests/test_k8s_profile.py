"""Tests for the k8s profile (``profiles/k8s``) and `workflow.k8s_executor`, without a cluster.

Snakemake runs as a subprocess with the real profile, against the real S3 of
the `s3_server` fixture (the profile's storage prefix and endpoint are
overridden on the command line) and, for real runs, against
`fake_k8s.FakeKubernetes` (tests/fake_k8s.py), which records what the Kubernetes executor
submits and can run each Job's container command here.

- The real Snakefile (a copy of Snakefile, rules/, scripts/ and config/ in a
  temporary directory, so nothing is written into the checkout) is dry-run,
  and run with pods that fail at once: that shows the Jobs it would submit.
- A small stand-in Snakefile with the same rule names, group, file layout and
  resources but trivial steps runs to completion, its pods' commands run
  locally by the fake: the real chain needs a central repository and more
  time than this module may take.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from fake_k8s import FakeKubernetes, PodMode, PodRun
from stream_shim.local_services import S3Server
from workflow.config import PROJECT_ROOT
from workflow.visit import DetectorVisit, NextVisit

PROFILE = PROJECT_ROOT / "profiles" / "k8s"
RULES = ("prep", "ingest", "run_pipeline", "export_outputs", "apdb_load", "finish_target")
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD")
BUCKET = "k8s-profile"
DETECTORS = (3, 7)
RUN_TIMEOUT = 120

STAND_IN_SNAKEFILE = '''\
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
step("run_pipeline", {"visit": VISIT_FILE, "prep": WORK + "/prep.json", "ingest": WORK + "/ingest.json"},
     {"mem_mb": 4000})
step("export_outputs", {"visit": VISIT_FILE, "pipeline": WORK + "/run_pipeline.json"}, {"mem_mb": 1000})
step("apdb_load", {"visit": VISIT_FILE, "pipeline": WORK + "/run_pipeline.json"}, {"mem_mb": 1000})


rule finish_target:
    input:
        visit=VISIT_FILE,
        records=expand(WORK + "/{name}.json", name=["prep", "ingest", "run_pipeline", "export_outputs",
                       "apdb_load"], allow_missing=True),
    output:
        done="results/" + TAIL + "/done.json",
    group:
        "detector_visit"
    script:
        "scripts/step.py"
'''

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
        salIndex=2, scriptSalIndex=1, instrument="LSSTComCamSim", groupId="2026-11-28T07:35:00.000",
        coordinateSystem=2, position=[150.1, 2.2], startTime=stamp, rotationSystem=2, cameraAngle=12.0,
        filters="u_02", dome=2, duration=30.0, nimages=1, survey="k8s-test", totalCheckpoints=0,
        private_sndStamp=stamp,
    )
    return next_visit.fan_out(DETECTORS)


def _visit_key(visit: DetectorVisit) -> str:
    return f"visits/{visit.instrument}/{visit.day_obs}/{visit.groupId}/{visit.detector}.json"


def _target(visit: DetectorVisit) -> str:
    return f"results/{visit.instrument}/{visit.day_obs}/{visit.groupId}/{visit.detector}/done.json"


def _copy_workflow(dest: Path) -> Path:
    """Copy the real workflow sources (what Snakemake ships to pods) into ``dest``."""
    dest.mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "Snakefile", dest / "Snakefile")
    for name in ("rules", "scripts", "config"):
        shutil.copytree(PROJECT_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _write_stand_in(dest: Path) -> Path:
    """Write the stand-in workflow (Snakefile and its one script) into ``dest``."""
    (dest / "scripts").mkdir(parents=True)
    (dest / "Snakefile").write_text(STAND_IN_SNAKEFILE)
    (dest / "scripts" / "step.py").write_text(STAND_IN_STEP)
    return dest


def _snakemake(
    entry: str, workdir: Path, s3_server: S3Server, prefix: str, env: Mapping[str, str], *args: str,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <entry> --profile profiles/k8s`` in ``workdir`` against the test S3."""
    command = [
        sys.executable, "-m", entry, "--profile", str(PROFILE), "--nolock",
        "--storage-s3-endpoint-url", s3_server.endpoint_url, "--default-storage-prefix", prefix,
        *args,
    ]
    return subprocess.run(command, cwd=workdir, env=dict(env), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)


def _submit_env(home: Path, s3_server: S3Server, kubeconfig: Path | None) -> dict[str, str]:
    """Environment of the submitting shell: the credentials, and a kubeconfig or none at all."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KUBE", "AWS_", "SNAKEMAKE_", "PG"))}
    env.update(HOME=str(home), AWS_ACCESS_KEY_ID=s3_server.access_key,
               AWS_SECRET_ACCESS_KEY=s3_server.secret_key, PGPASSWORD=f"pg-{secrets.token_hex(8)}")
    env["KUBECONFIG"] = str(kubeconfig) if kubeconfig else str(home / "no-such-kubeconfig")
    return env


def _container(job: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _target_jobs(job: Mapping[str, Any]) -> set[tuple[str, int]]:
    """``(rule, detector)`` of each job that a Job's snakemake command runs (``--target-jobs``)."""
    command = " ".join(_container(job)["args"])
    return {(rule, int(detector)) for rule, detector in re.findall(r"'(\w+):[^']*detector=(\d+)'", command)}


def _upload_visits(s3_server: S3Server, prefix_key: str) -> list[DetectorVisit]:
    """Put the visit files of `_visits` under ``s3://BUCKET/<prefix_key>/``, where the targets' inputs are."""
    client = s3_server.client()
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    visits = _visits()
    for visit in visits:
        client.put_object(Bucket=BUCKET, Key=f"{prefix_key}/{_visit_key(visit)}", Body=visit.to_json().encode())
    return visits


@pytest.fixture
def fake_k8s(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FakeKubernetes]:
    """A fake API server with the profile's namespace; ``pod_mode`` from the test's parameter."""
    mode: PodMode = getattr(request, "param", "run")
    pod_env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.defpath}", "LANG": "C.UTF-8"}
    with FakeKubernetes(tmp_path / "pods", namespaces=(_profile()["kubernetes-namespace"],), pod_mode=mode,
                        pod_env=pod_env, pod_timeout=RUN_TIMEOUT) as fake:
        yield fake


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
        for needed in (*CREDENTIAL_VARS, "KUBECONFIG", "python -m workflow.k8s_executor",
                       "default-storage-prefix", "container-image", "-n"):
            assert needed in header, needed

    def test_one_component_per_group_job(self) -> None:
        profile = _profile()
        assert profile["executor"] == "kubernetes"
        assert profile["group-components"] == ["detector_visit=1"]
        assert profile["default-storage-provider"] == "s3"


class TestK8sExecutor:
    """Tests for `workflow.k8s_executor`."""

    def test_install_turns_off_pod_pip_install_once(self) -> None:
        code = (
            "from workflow.k8s_executor import install\n"
            "from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry as R\n"
            "before = R().get_plugin('kubernetes').common_settings\n"
            "print(install(), install())\n"
            "after = R().get_plugin('kubernetes').common_settings\n"
            "print(before.auto_deploy_default_storage_provider, after.auto_deploy_default_storage_provider)\n"
            "print(before.implies_no_shared_fs == after.implies_no_shared_fs, after.job_deploy_sources)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                cwd=PROJECT_ROOT)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:3] == ["True False", "True False", "True True"]


# -- Snakemake with the profile ------------------------------------------------------------


class TestK8sProfileDryRun:
    """Tests for ``snakemake --profile profiles/k8s -n``."""

    def test_builds_dag_from_s3_without_kubeconfig(self, tmp_path: Path, s3_server: S3Server) -> None:
        """The default config, two targets: one group job per detector-visit, no kubeconfig anywhere."""
        visits = _upload_visits(s3_server, "dry")
        workdir = _copy_workflow(tmp_path / "checkout")
        env = _submit_env(tmp_path, s3_server, kubeconfig=None)
        result = _snakemake("snakemake", workdir, s3_server, f"s3://{BUCKET}/dry", env,
                            "-n", "--", *map(_target, visits))
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
        workdir = _copy_workflow(tmp_path / "checkout")
        env = _submit_env(tmp_path, s3_server, kubeconfig=None)
        missing = _target(visits[0]).replace(f"/{visits[0].detector}/done.json", "/99/done.json")
        result = _snakemake("snakemake", workdir, s3_server, f"s3://{BUCKET}/dry-missing", env, "-n", "--", missing)
        output = result.stdout + result.stderr
        assert result.returncode == 1
        assert "Missing input files for rule prep" in output
        assert f"s3://{BUCKET}/dry-missing/{_visit_key(visits[0]).replace(f'/{visits[0].detector}.json', '/99.json')}" \
            " (in storage)" in output


class TestK8sProfileJobs:
    """Tests for the Jobs that ``snakemake --profile profiles/k8s`` submits for the real Snakefile."""

    @pytest.mark.parametrize("fake_k8s", ["fail"], indirect=True)
    def test_one_job_per_detector_visit_with_profile_settings(
        self, tmp_path: Path, s3_server: S3Server, fake_k8s: FakeKubernetes,
    ) -> None:
        visits = _upload_visits(s3_server, "jobs")
        workdir = _copy_workflow(tmp_path / "checkout")
        env = _submit_env(tmp_path, s3_server, fake_k8s.write_kubeconfig(tmp_path / "kubeconfig"))
        result = _snakemake("snakemake", workdir, s3_server, f"s3://{BUCKET}/jobs", env,
                            "--seconds-between-status-checks", "1", "--", *map(_target, visits))
        output = result.stdout + result.stderr
        # The fake fails every pod at once: the run fails, having submitted everything.
        assert result.returncode == 1, output[-3000:]
        profile = _profile()
        namespace = profile["kubernetes-namespace"]

        # One Job per detector-visit, each running that detector's whole chain.
        assert len(fake_k8s.jobs) == len(visits)
        assert sorted(sorted(_target_jobs(job)) for job in fake_k8s.jobs) == sorted(
            sorted((rule, visit.detector) for rule in RULES) for visit in visits)
        assert {ns for _, path in fake_k8s.requests for ns in re.findall(r"/namespaces/([^/]+)/", path)} == {
            namespace}

        # Requests: CPU = cores x scalar; memory and disk = run_pipeline's, the chain's maximum
        # (prep + ingest, or export_outputs + apdb_load, side by side need less).
        expected_cpu = f"{int(profile['cores'] * profile['kubernetes-cpu-scalar'] * 1000)}m"
        run_pipeline = dict(item.split(":", 1)[1].split("=") for item in profile["set-resources"]
                            if item.startswith("run_pipeline:"))
        for job in fake_k8s.jobs:
            container = _container(job)
            assert container["image"] == profile["container-image"]
            assert container["command"] == ["/bin/sh"]
            command = container["args"][1]
            assert "python -m snakemake --snakefile 'Snakefile'" in command and "--mode 'remote'" in command
            assert f"--default-storage-prefix 's3://{BUCKET}/jobs'" in command
            # Stock plugin: every pod pip-installs the storage plugin (why workflow.k8s_executor exists).
            assert "pip install" in command
            assert container["resources"]["requests"] == {
                "cpu": expected_cpu, "memory": f"{run_pipeline['mem_mb']}M",
                "ephemeral-storage": f"{run_pipeline['disk_mb']}M",
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
    """Tests for a run to completion with ``python -m workflow.k8s_executor --profile profiles/k8s``."""

    def test_chain_runs_to_completion_in_one_pod_per_detector_visit(
        self, tmp_path: Path, s3_server: S3Server, fake_k8s: FakeKubernetes,
    ) -> None:
        visits = _upload_visits(s3_server, "run")
        workdir = _write_stand_in(tmp_path / "checkout")
        env = _submit_env(tmp_path, s3_server, fake_k8s.write_kubeconfig(tmp_path / "kubeconfig"))
        result = _snakemake("workflow.k8s_executor", workdir, s3_server, f"s3://{BUCKET}/run", env,
                            "--seconds-between-status-checks", "1", "--", *map(_target, visits))
        output = result.stdout + result.stderr
        pod_logs = {name: pod.log_path.read_text(errors="replace")[-2000:] for name, pod in fake_k8s.pods.items()
                    if pod.log_path.exists()}
        assert result.returncode == 0, output[-3000:] + json.dumps(pod_logs, indent=1)

        assert len(fake_k8s.jobs) == len(visits)
        pods_by_detector: dict[int, PodRun] = {}
        for job in fake_k8s.jobs:
            command = _container(job)["args"][1]
            assert "pip install" not in command
            assert "--deploy-sources" in command
            (detector,) = {d for _, d in _target_jobs(job)}
            assert _target_jobs(job) == {(rule, detector) for rule in RULES}
            pods_by_detector[detector] = fake_k8s.pods[job["metadata"]["name"]]
        assert {pod.exit_code for pod in fake_k8s.pods.values()} == {0}

        client = s3_server.client()
        digests = {name: hashlib.sha256(env[name].encode()).hexdigest() for name in CREDENTIAL_VARS}
        for visit in visits:
            key = f"run/{_target(visit)}"
            done = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            pod = pods_by_detector[visit.detector]
            assert done["rule"] == "finish_target" and done["detector"] == visit.detector
            assert done["visit"] == json.loads(visit.to_json())
            steps = [done, *done["inputs"], *(r for record in done["inputs"] for r in record["inputs"])]
            assert {step["rule"] for step in steps} == set(RULES)
            # Every step ran in this detector-visit's pod, with the credentials from the Secret.
            assert {Path(step["cwd"]) for step in steps} == {pod.workdir}
            assert all(step["credentials_sha256"] == digests for step in steps)
        # The pods got the credentials only from the Secret: the fake's pod environment has none.
        assert not set(CREDENTIAL_VARS) & set(fake_k8s.pod_env)
        assert ("Secret", fake_k8s.secrets[0]["metadata"]["name"]) in {(k, n) for k, _, n in fake_k8s.deleted}
