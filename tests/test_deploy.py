"""Tests for the worker-pool manifests in ``deploy/`` (Kubernetes cannot run here).

They check what a cluster would not tell us until the night: every manifest is
listed and parses, the containers' arguments are ones `python -m stream_shim`
accepts, the KEDA trigger watches the consumer group and topic the workers really
use, the pods' memory and shutdown grace cover what the stages and the shim need,
and no credential is written in a manifest.  With ``kubectl`` (this machine has it)
the overlay is also rendered by kustomize itself.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_shim.__main__ import _parse
from stream_shim.work_items import work_topic
from workflow.core.config import PROJECT_ROOT, load_config, load_yaml

DEPLOY = PROJECT_ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAY = DEPLOY / "overlays" / "lsstcam"


def _documents(path: Path) -> list[dict[str, Any]]:
    with open(path) as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def _base() -> dict[str, dict[str, Any]]:
    """The base's resources by ``Kind/name``."""
    kustomization = load_yaml(BASE / "kustomization.yaml")
    out = {}
    for name in kustomization["resources"]:
        for doc in _documents(BASE / name):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def _container(resources: dict[str, dict[str, Any]], deployment: str) -> dict[str, Any]:
    (container,) = resources[f"Deployment/{deployment}"]["spec"]["template"]["spec"]["containers"]
    return container


def _shim_args(container: dict[str, Any]) -> Any:
    """The container's arguments as `python -m stream_shim` parses them (``$(POD_NAME)`` filled in)."""
    args = [a.replace("$(POD_NAME)", "prompt-snake-worker-abc12") for a in container["args"]]
    assert args[0] == "stream_shim"
    return _parse(args[1:])


def _live_config(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(resources["ConfigMap/prompt-snake-live"]["data"]["live.yaml"])


class TestManifests:
    def test_every_file_is_listed_and_parses(self) -> None:
        listed = set(load_yaml(BASE / "kustomization.yaml")["resources"])
        on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == on_disk
        resources = _base()
        assert set(resources) == {
            "PersistentVolumeClaim/prompt-snake-run",
            "ConfigMap/prompt-snake-live",
            "Deployment/prompt-snake-fanout",
            "Deployment/prompt-snake-worker",
            "ScaledObject/prompt-snake-worker",
        }

    def test_containers_run_the_roles_the_shim_accepts(self) -> None:
        resources = _base()
        fanout = _shim_args(_container(resources, "prompt-snake-fanout"))
        worker = _shim_args(_container(resources, "prompt-snake-worker"))
        assert (fanout.role, worker.role) == ("fanout", "worker")
        assert worker.worker_id == "prompt-snake-worker-abc12"
        # Each worker its own state directory (journal, arrival index) in the shared run directory.
        assert worker.state_dir == f"{worker.workdir}/workers/prompt-snake-worker-abc12"
        for name, args in (("prompt-snake-fanout", fanout), ("prompt-snake-worker", worker)):
            mounts = {m["name"]: m["mountPath"] for m in _container(resources, name)["volumeMounts"]}
            assert mounts["run"] == args.workdir
            assert [f"{mounts['live-config']}/live.yaml"] == args.config_file
            probe = _container(resources, name)["livenessProbe"]["httpGet"]
            assert (probe["path"], args.status_host, args.status_port) == ("/healthz", "0.0.0.0", 8080)

    def test_the_live_config_is_valid_for_the_instrument(self, tmp_path: Path) -> None:
        live = tmp_path / "live.yaml"
        live.write_text(yaml.safe_dump(_live_config(_base())))
        config = load_config(instrument="LSSTCam", extra_files=[live])  # validates against config/schema
        assert config["kafka"]["bootstrap"]

    def test_keda_watches_the_workers_group_and_topic(self) -> None:
        resources = _base()
        worker = _shim_args(_container(resources, "prompt-snake-worker"))
        config = load_config(instrument=worker.instrument)
        live = _live_config(resources)
        (trigger,) = resources["ScaledObject/prompt-snake-worker"]["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == live["kafka"]["worker_group"]
        assert meta["topic"] == work_topic(config)
        assert meta["bootstrapServers"] == live["kafka"]["bootstrap"]
        scaled = resources["ScaledObject/prompt-snake-worker"]["spec"]
        assert scaled["scaleTargetRef"]["name"] == "prompt-snake-worker"
        assert scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= config["pool"]["partitions"]

    def test_pods_fit_the_stages_and_the_shutdown(self) -> None:
        resources = _base()
        container = _container(resources, "prompt-snake-worker")
        worker = _shim_args(container)
        stage_mb = max(
            int(entry.split("mem_mb=")[1])
            for entry in load_yaml(PROJECT_ROOT / "profiles" / "k8s" / "config.yaml")["set-resources"]
            if "mem_mb=" in entry
        )
        request = container["resources"]["requests"]["memory"]
        assert request.endswith("Gi")
        assert int(request[:-2]) * 1024 >= stage_mb + 500  # + the shim, its Snakemake, the stage server
        pod = resources["Deployment/prompt-snake-worker"]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > worker.grace_s + worker.term_wait_s

    def test_no_credentials_in_manifests(self) -> None:
        resources = _base()
        assert not [name for name in resources if name.startswith("Secret/")]
        for name in ("prompt-snake-fanout", "prompt-snake-worker"):
            container = _container(resources, name)
            assert container["envFrom"] == [{"secretRef": {"name": "prompt-snake-credentials"}}]
            literal = {e["name"] for e in container.get("env", []) if "value" in e}
            assert not literal & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"}
        assert "password" not in resources["ConfigMap/prompt-snake-live"]["data"]["live.yaml"].lower()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_the_lsstcam_overlay_renders() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAY)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    docs = {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(rendered) if d}
    scaled = docs["ScaledObject/prompt-snake-worker"]
    config = load_config(instrument="LSSTCam")
    assert scaled["spec"]["maxReplicaCount"] == config["pool"]["partitions"] == 189
    assert all(d["metadata"]["namespace"] == "prompt-processing" for d in docs.values())
