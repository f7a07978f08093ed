"""Tests for the shim with ``--profile profiles/k8s``: the same submission path creates Kubernetes Jobs.

The shim runs against the real broker and S3 of conftest.py and the fake API server
of tests/fake_k8s.py, whose pods fail at once: enough to see one Job per
detector-visit submitted, the visit files put under the storage prefix (no shared
file system with the pods), and the failures classified when the run ends without
an outcome file.  The workflow sources are a copy in a temporary directory: with
the k8s profile Snakemake ships the sources below its working directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml
from astropy.time import Time
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from fake_k8s import FakeKubernetes
from raw_uploads import make_visit
from shared_helpers import copy_workflow

from workflow.core.config import PROJECT_ROOT

PROFILE = PROJECT_ROOT / "profiles" / "k8s"


class TestShimK8s:
    """Tests for `stream_shim.service.StreamShim` with ``profiles/k8s``."""

    def test_submits_one_job_per_detector_visit(self, tmp_path: Path, kafka_broker, s3_server) -> None:
        """The same submission path submits Kubernetes Jobs; visit files go to the storage prefix."""
        token = uuid.uuid4().hex[:8]
        topics = {"next_visit": f"nv-{token}", "raw_notification": f"raw-{token}", "alerts": f"alerts-{token}"}
        work_bucket, raw_bucket = f"work-{token}", f"raw-{token}"
        client = s3_server.client()
        for bucket in (work_bucket, raw_bucket):
            client.create_bucket(Bucket=bucket)
        admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
        for future in admin.create_topics([NewTopic(t, num_partitions=1) for t in topics.values()]).values():
            future.result(timeout=10)
        extra = tmp_path / "k8s.yaml"
        extra.write_text(
            yaml.safe_dump(
                {
                    "kafka": {"bootstrap": kafka_broker.bootstrap, "consumer_group": f"k8s-{token}"},
                    "storage": {"endpoint_url": s3_server.endpoint_url, "local_root": str(tmp_path / "unused")},
                    "kafka_topics": topics,
                    "buckets": {"raw": raw_bucket},
                    "submission": {"retry": {"max_attempts": 1}},  # failing pods: one Job per target
                }
            )
        )
        checkout = copy_workflow(tmp_path / "checkout")
        profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
        with FakeKubernetes(tmp_path / "pods", namespaces=(profile["kubernetes-namespace"],), pod_mode="fail") as fake:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "AWS_", "SNAKEMAKE_", "PG"))}
            env.update(
                HOME=str(tmp_path),
                AWS_ACCESS_KEY_ID=s3_server.access_key,
                AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
                AWS_DEFAULT_REGION=s3_server.region,
                PGPASSWORD="unused",
                KUBECONFIG=str(fake.write_kubeconfig(tmp_path / "kubeconfig")),
            )
            log = tmp_path / "shim.log"
            with open(log, "wb") as stream:
                shim = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "stream_shim",
                        "--instrument",
                        "LSSTComCamSim",
                        "--profile",
                        str(PROFILE),
                        "--config-file",
                        str(extra),
                        "--workdir",
                        str(checkout),
                        "--snakefile",
                        str(checkout / "Snakefile"),
                        "--storage-prefix",
                        f"s3://{work_bucket}/night",
                        "--storage-endpoint-url",
                        s3_server.endpoint_url,
                        "--snakemake-arg=--seconds-between-status-checks=1",
                        "--no-health-check",
                        "--grace-s",
                        "5",
                    ],
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=PROJECT_ROOT,
                )
            status_file = checkout / "shim" / "status.json"
            try:
                deadline = time.monotonic() + 60
                while not status_file.exists() or json.loads(status_file.read_text())["state"] != "running":
                    assert shim.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.5)
                visit = make_visit("LSSTComCamSim", "2026-11-28T05:00:00.000", "r_03", snd_stamp=Time.now().unix_tai)
                producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
                producer.produce(topics["next_visit"], visit.to_avro(schema_id=1))
                assert producer.flush(10) == 0
                deadline = time.monotonic() + 240
                while True:
                    status = json.loads(status_file.read_text())
                    if status["gauges"]["targets"].get("failed", 0) >= 9:
                        break
                    assert shim.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1.0)
            finally:
                shim.send_signal(signal.SIGTERM)
                shim.wait(timeout=60)
        assert shim.returncode == 0, log.read_text()[-3000:]
        # One Job per detector-visit, each running that detector's whole chain.
        detectors = sorted(
            int(d)
            for job in fake.jobs
            for d in set(
                re.findall(r"detector=(\d+)", " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"]))
            )
        )
        assert detectors == list(range(9))
        # The visit files are where the pods read them: under the storage prefix.
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=work_bucket, Prefix="night/visits/")["Contents"]}
        assert keys == {f"night/visits/LSSTComCamSim/{visit.day_obs}/{visit.groupId}/{d}.json" for d in range(9)}
        # Pods that fail at once write no failed.json: the shim classifies the targets itself.
        assert status["counts"]["failures"] == {"NoOutcome": 9}
