"""The fake Kubernetes API server of the tests: `stream_shim.testbed.fake_k8s` (benchmarks use it too)."""

from __future__ import annotations

__all__ = ["FakeKubernetes", "PodAction", "PodMode", "PodRun"]

from stream_shim.testbed.fake_k8s import FakeKubernetes, PodAction, PodMode, PodRun
