"""A small recording fake of the Kubernetes API server, for tests and benchmarks without a cluster.

`FakeKubernetes` serves, on 127.0.0.1 in a thread, the part of the API that
``snakemake-executor-plugin-kubernetes`` (and `workflow.runtime.k8s_executor`)
uses through the ``kubernetes`` Python client: namespaces and secrets (create,
get, delete), ``batch/v1`` jobs (create, get, list by label, status, delete)
and pods (list by label, get, log, delete).  It records every request (with
its time) and every submitted manifest as the JSON the client sent, and when
each pod was created, finished, first reported finished and deleted.

What happens to a Job's pod depends on ``pod_mode``:

- ``"run"``: its container command runs here as a subprocess, in a fresh
  directory standing for the pod's ``emptyDir`` working directory, with the
  environment ``pod_env`` (the "image" environment) plus the container's
  ``env`` entries, ``secretKeyRef`` values resolved from the stored Secrets.
  Exit status 0 makes the Job Succeeded, anything else Failed.
- ``"fail"``: the pod terminates at once with exit code 1, nothing is run.
- ``"action"``: ``pod_delay_s`` after the Job's creation, ``pod_action(pod, job)``
  is called in a worker thread (a stand-in for the pod's work, e.g. writing
  the outputs the Job's command names); its return value is the exit code.

Pods carry the labels of the Job's pod template plus ``job-name`` and
``controller-uid``, as the Job controller sets them; label selectors are
equality-based (``a=b,c=d``).

Simplifications: no authentication, no watches, one pod per Job created with
the Job, a deleted Job takes its pod with it whatever the propagation policy,
images and resource requests are recorded but not acted on, and the log
endpoint ignores ``previous`` (the plugin asks for ``previous=true``; a real
API server may refuse that for a container that never restarted).
"""

from __future__ import annotations

__all__ = ["FakeKubernetes", "PodAction", "PodMode", "PodRun"]

import base64
import concurrent.futures
import dataclasses
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

from stream_shim.testbed.local_services import free_port

PodMode = Literal["run", "fail", "action"]
"""What the fake does with a Job's pod: run its command here, fail it at once, or call ``pod_action``."""

_NS = r"/api/v1/namespaces"
_JOBS = r"/apis/batch/v1/namespaces/(?P<ns>[^/]+)/jobs"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern + "$"), name)
    for method, pattern, name in [
        ("POST", _NS, "create_namespace"),
        ("DELETE", _NS + r"/(?P<name>[^/]+)", "delete_namespace"),
        ("POST", _NS + r"/(?P<ns>[^/]+)/secrets", "create_secret"),
        ("GET", _NS + r"/(?P<ns>[^/]+)/secrets/(?P<name>[^/]+)", "get_secret"),
        ("DELETE", _NS + r"/(?P<ns>[^/]+)/secrets/(?P<name>[^/]+)", "delete_secret"),
        ("POST", _JOBS, "create_job"),
        ("GET", _JOBS, "list_jobs"),
        ("GET", _JOBS + r"/(?P<name>[^/]+)(?:/status)?", "get_job"),
        ("DELETE", _JOBS + r"/(?P<name>[^/]+)", "delete_job"),
        ("GET", _NS + r"/(?P<ns>[^/]+)/pods", "list_pods"),
        ("GET", _NS + r"/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)", "get_pod"),
        ("GET", _NS + r"/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log", "pod_log"),
        ("DELETE", _NS + r"/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)", "delete_pod"),
    ]
]


class ApiError(Exception):
    """An API error answered as a ``Status`` object with an HTTP code."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclasses.dataclass
class PodRun:
    """One pod of a submitted Job, and what became of it."""

    name: str
    job: str
    namespace: str
    workdir: Path
    log_path: Path
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    exit_code: int | None = None
    deleted: bool = False
    process: subprocess.Popen[bytes] | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    """Unix time the Job (and this pod) was created."""
    finished_at: float | None = None
    """Unix time the pod terminated."""
    seen_finished_at: float | None = None
    """Unix time an API answer first showed the pod or its Job finished."""
    deleted_at: float | None = None
    """Unix time the pod (or its Job) was deleted."""


PodAction = Callable[[PodRun, Mapping[str, Any]], int]
"""``pod_action(pod, job_manifest) -> exit code``: what a pod does in ``"action"`` mode."""


def _selector(query: Mapping[str, str]) -> dict[str, str]:
    """The equality terms of a ``labelSelector`` query parameter."""
    terms = query.get("labelSelector", "").split(",")
    return dict(term.split("=", 1) for term in terms if "=" in term)


def _matches(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in wanted.items())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _status(code: int, reason: str = "", message: str = "") -> dict[str, Any]:
    ok = code < 400
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "code": code,
        "status": "Success" if ok else "Failure",
        "reason": reason,
        "message": message,
    }


class FakeKubernetes:
    """A recording fake Kubernetes API server in a thread on 127.0.0.1.

    Parameters
    ----------
    root : `pathlib.Path`
        Directory for the pods' working directories and logs.
    namespaces : sequence of `str`, optional
        Namespaces that exist from the start (others give 404, as in a cluster).
    pod_mode : {"run", "fail"}, optional
        What to do with each Job's pod (see the module docstring).
    pod_env : mapping, optional
        Environment of every pod before its container's ``env`` (the image's).
    pod_timeout : `float`, optional
        Seconds after which a running pod is killed and its Job fails.
    pod_action : callable, optional
        ``"action"`` mode: ``pod_action(pod, job) -> exit code`` (`PodAction`).
    pod_delay_s : `float`, optional
        ``"action"`` mode: seconds from a Job's creation to its pod's action.
    action_workers : `int`, optional
        ``"action"`` mode: threads running the actions.

    Attributes
    ----------
    url : `str`
        Base URL of the API.
    requests : `list` [`tuple` [`str`, `str`]]
        ``(method, path)`` of every request, in order.
    request_times : `list` [`float`]
        Unix time of each of `requests`.
    request_queries : `list` [`dict` [`str`, `str`]]
        Query parameters of each of `requests`.
    jobs : `list` [`dict`]
        Every Job manifest as submitted (kept after the Job is deleted).
    secrets : `list` [`dict`]
        Every Secret as created (kept after it is deleted).
    deleted : `list` [`tuple` [`str`, `str`, `str`]]
        ``(kind, namespace, name)`` of every deletion.
    pods : `dict` [`str`, `PodRun`]
        The pod of each Job, by Job name.
    """

    def __init__(
        self,
        root: Path,
        *,
        namespaces: tuple[str, ...] = ("default",),
        pod_mode: PodMode = "run",
        pod_env: Mapping[str, str] | None = None,
        pod_timeout: float = 120.0,
        pod_action: PodAction | None = None,
        pod_delay_s: float = 0.0,
        action_workers: int = 4,
    ) -> None:
        if pod_mode == "action" and pod_action is None:
            raise ValueError("fake k8s: pod_mode='action' needs a pod_action")
        self.root = Path(root)
        self.pod_mode = pod_mode
        self.pod_env = dict(pod_env or {"PATH": os.defpath})
        self.pod_timeout = pod_timeout
        self.pod_action = pod_action
        self.pod_delay_s = pod_delay_s
        self._actions = (
            concurrent.futures.ThreadPoolExecutor(action_workers, thread_name_prefix="fake-pod")
            if pod_mode == "action"
            else None
        )
        self._timers: list[threading.Timer] = []
        self.requests: list[tuple[str, str]] = []
        self.request_times: list[float] = []
        self.request_queries: list[dict[str, str]] = []
        self.jobs: list[dict[str, Any]] = []
        self.secrets: list[dict[str, Any]] = []
        self.deleted: list[tuple[str, str, str]] = []
        self.pods: dict[str, PodRun] = {}
        self._namespaces = set(namespaces)
        self._live_secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self._live_jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        self._server.daemon_threads = True
        self._serve_thread = threading.Thread(target=self._server.serve_forever, name="fake-k8s", daemon=True)

    def __enter__(self) -> Self:
        self._serve_thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill pods still running, then stop the server."""
        for pod in list(self.pods.values()):
            self._kill(pod)
        for timer in self._timers:
            timer.cancel()
        if self._actions is not None:
            self._actions.shutdown(wait=True, cancel_futures=True)
        for thread in self._threads:
            thread.join(timeout=10)
        self._server.shutdown()
        self._server.server_close()

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """Write a kubeconfig whose current context is this server.

        Parameters
        ----------
        path : `pathlib.Path`
            Where to write it (point ``KUBECONFIG`` at it).
        namespace : `str`, optional
            Namespace of the context.

        Returns
        -------
        path : `pathlib.Path`
            The file written.
        """
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }
        path.write_text(json.dumps(config, indent=1))
        return path

    def secret_values(self, secret: Mapping[str, Any]) -> dict[str, str]:
        """Decode the ``data`` of a recorded Secret.

        Parameters
        ----------
        secret : mapping
            One of `secrets`.

        Returns
        -------
        values : `dict` [`str`, `str`]
            Key to decoded value.
        """
        return {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}

    # -- request handling --------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
                pass

            def _dispatch(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null") if length else None
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                with fake._lock:
                    fake.requests.append((self.command, url.path))
                    fake.request_times.append(time.time())
                    fake.request_queries.append(query)
                try:
                    code, payload = fake._route(self.command, url.path, query, body)
                except ApiError as exc:
                    code, payload = exc.code, _status(exc.code, exc.reason, str(exc))
                if isinstance(payload, str):
                    data, ctype = payload.encode(), "text/plain"
                else:
                    data, ctype = json.dumps(payload).encode(), "application/json"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _dispatch

        return Handler

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        for route_method, pattern, name in _ROUTES:
            if route_method == method and (match := pattern.match(path)):
                with self._lock:
                    return getattr(self, "_" + name)(query=query, body=body, **match.groupdict())
        raise ApiError(404, "NotFound", f"fake k8s: no route for {method} {path}")

    def _check_ns(self, ns: str) -> None:
        if ns not in self._namespaces:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')

    def _create_namespace(self, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        name = body["metadata"]["name"]
        if name in self._namespaces:
            raise ApiError(409, "AlreadyExists", f'namespaces "{name}" already exists')
        self._namespaces.add(name)
        return 201, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}, "status": {"phase": "Active"}}

    def _delete_namespace(self, name: str, **_: Any) -> tuple[int, Any]:
        self._namespaces.discard(name)
        self.deleted.append(("Namespace", "", name))
        return 200, _status(200)

    def _create_secret(self, ns: str, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        self._check_ns(ns)
        name = body["metadata"]["name"]
        if (ns, name) in self._live_secrets:
            raise ApiError(409, "AlreadyExists", f'secrets "{name}" already exists')
        secret = {
            **body,
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {**body["metadata"], "namespace": ns, "uid": str(uuid.uuid4())},
        }
        self._live_secrets[ns, name] = secret
        self.secrets.append(json.loads(json.dumps(body)))
        return 201, secret

    def _get_secret(self, ns: str, name: str, **_: Any) -> tuple[int, Any]:
        if (ns, name) not in self._live_secrets:
            raise ApiError(404, "NotFound", f'secrets "{name}" not found')
        return 200, self._live_secrets[ns, name]

    def _delete_secret(self, ns: str, name: str, **_: Any) -> tuple[int, Any]:
        if self._live_secrets.pop((ns, name), None) is None:
            raise ApiError(404, "NotFound", f'secrets "{name}" not found')
        self.deleted.append(("Secret", ns, name))
        return 200, _status(200)

    def _create_job(self, ns: str, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        self._check_ns(ns)
        name = body["metadata"]["name"]
        if (ns, name) in self._live_jobs:
            raise ApiError(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
        self.jobs.append(json.loads(json.dumps(body)))
        job = {
            **body,
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {**body["metadata"], "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now()},
            "status": {"active": 1, "startTime": _now()},
        }
        self._live_jobs[ns, name] = job
        pod_dir = self.root / name
        labels = {
            **((body["spec"]["template"].get("metadata") or {}).get("labels") or {}),
            "job-name": name,
            "controller-uid": job["metadata"]["uid"],
        }
        pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
        pod = PodRun(pod_name, name, ns, pod_dir / "workdir", pod_dir / "pod.log", labels=labels)
        pod.workdir.mkdir(parents=True)
        self.pods[name] = pod
        if self.pod_mode == "run":
            thread = threading.Thread(target=self._run_pod, args=(pod, job), name=pod.name, daemon=True)
            self._threads.append(thread)
            thread.start()
        elif self.pod_mode == "action":
            timer = threading.Timer(self.pod_delay_s, self._schedule_action, args=(pod, job))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        else:
            pod.log_path.write_text("fake k8s: pod not run (pod_mode='fail')\n")
            self._finish(pod, 1)
        return 201, job

    def _seen(self, job_name: str) -> None:
        """An answer shows ``job_name``'s state: note when a finished one was first shown."""
        pod = self.pods.get(job_name)
        if pod is not None and pod.exit_code is not None and pod.seen_finished_at is None:
            pod.seen_finished_at = time.time()

    def _list_jobs(self, ns: str, query: dict[str, str], **_: Any) -> tuple[int, Any]:
        wanted = _selector(query)
        items = [
            job
            for (job_ns, name), job in self._live_jobs.items()
            if job_ns == ns and _matches(job["metadata"].get("labels") or {}, wanted)
        ]
        for job in items:
            self._seen(job["metadata"]["name"])
        return 200, {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items}

    def _get_job(self, ns: str, name: str, **_: Any) -> tuple[int, Any]:
        if (ns, name) not in self._live_jobs:
            raise ApiError(404, "NotFound", f'jobs.batch "{name}" not found')
        self._seen(name)
        return 200, self._live_jobs[ns, name]

    def _delete_job(self, ns: str, name: str, **_: Any) -> tuple[int, Any]:
        job = self._live_jobs.pop((ns, name), None)
        if job is None:
            raise ApiError(404, "NotFound", f'jobs.batch "{name}" not found')
        if name in self.pods:
            pod = self.pods[name]
            self._kill(pod)
            pod.deleted = True
            pod.deleted_at = pod.deleted_at or time.time()
        self.deleted.append(("Job", ns, name))
        return 200, _status(200)

    def _pod_object(self, pod: PodRun) -> dict[str, Any]:
        job = self._live_jobs.get((pod.namespace, pod.job)) or {}
        spec = job.get("spec", {}).get("template", {}).get("spec", {"containers": [{"name": "snakemake"}]})
        state: dict[str, Any]
        if pod.exit_code is None:
            phase, state = "Running", {"running": {"startedAt": _now()}}
        else:
            phase = "Succeeded" if pod.exit_code == 0 else "Failed"
            state = {
                "terminated": {
                    "exitCode": pod.exit_code,
                    "reason": "Completed" if pod.exit_code == 0 else "Error",
                    "finishedAt": _now(),
                }
            }
        statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": pod.exit_code is None,
                "restartCount": 0,
                "state": state,
            }
            for c in spec["containers"]
        ]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.labels)},
            "spec": spec,
            "status": {"phase": phase, "containerStatuses": statuses},
        }

    def _list_pods(self, ns: str, query: dict[str, str], **_: Any) -> tuple[int, Any]:
        wanted = _selector(query)
        pods = [
            pod
            for pod in self.pods.values()
            if pod.namespace == ns
            and not pod.deleted
            and (ns, pod.job) in self._live_jobs
            and _matches(pod.labels, wanted)
        ]
        for pod in pods:
            self._seen(pod.job)
        items = [self._pod_object(pod) for pod in pods]
        return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    def _find_pod(self, ns: str, name: str) -> PodRun:
        for pod in self.pods.values():
            if pod.namespace == ns and pod.name == name and not pod.deleted:
                return pod
        raise ApiError(404, "NotFound", f'pods "{name}" not found')

    def _get_pod(self, ns: str, name: str, **_: Any) -> tuple[int, Any]:
        pod = self._find_pod(ns, name)
        self._seen(pod.job)
        return 200, self._pod_object(pod)

    def _pod_log(self, ns: str, name: str, **_: Any) -> tuple[int, Any]:
        pod = self._find_pod(ns, name)
        return 200, pod.log_path.read_text(errors="replace") if pod.log_path.exists() else ""

    def _delete_pod(self, ns: str, name: str, **_: Any) -> tuple[int, Any]:
        pod = self._find_pod(ns, name)
        self._kill(pod)
        pod.deleted = True
        pod.deleted_at = pod.deleted_at or time.time()
        self.deleted.append(("Pod", ns, name))
        return 200, self._pod_object(pod)

    # -- pods ------------------------------------------------------------------

    def _container_env(self, namespace: str, container: Mapping[str, Any]) -> dict[str, str]:
        """Resolve a container's ``env``: literal values and ``secretKeyRef``s."""
        env = {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = (item.get("valueFrom") or {}).get("secretKeyRef") or {}
            secret = self._live_secrets.get((namespace, ref.get("name", "")))
            if secret is None or ref.get("key") not in (secret.get("data") or {}):
                raise RuntimeError(f"fake k8s: env {item['name']}: secret {ref} not found")
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    def _run_pod(self, pod: PodRun, job: Mapping[str, Any]) -> None:
        """Run the Job's (single) container command in the pod's directory."""
        container = job["spec"]["template"]["spec"]["containers"][0]
        with self._lock:
            try:
                pod.env = {
                    **self.pod_env,
                    "HOME": str(pod.workdir.parent),
                    **self._container_env(pod.namespace, container),
                }
            except RuntimeError as exc:
                pod.log_path.write_text(f"{exc}\n")
                self._finish(pod, 1)
                return
        command = [*(container.get("command") or []), *(container.get("args") or [])]
        with open(pod.log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=pod.workdir,
                env=pod.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            pod.process = process
            try:
                code = process.wait(timeout=self.pod_timeout)
            except subprocess.TimeoutExpired:
                self._kill(pod)
                code = process.wait()
        with self._lock:
            self._finish(pod, code)

    def _schedule_action(self, pod: PodRun, job: Mapping[str, Any]) -> None:
        assert self._actions is not None
        try:
            self._actions.submit(self._run_action, pod, job)
        except RuntimeError:  # shut down: the server is closing
            pass

    def _run_action(self, pod: PodRun, job: Mapping[str, Any]) -> None:
        """``"action"`` mode: the pod's stand-in work, then its end (a raising action fails the pod)."""
        assert self.pod_action is not None
        if pod.deleted:
            return
        try:
            code = self.pod_action(pod, job)
        except Exception as exc:  # noqa: BLE001 - any crash of the stand-in work fails the pod, as a process's would
            pod.log_path.write_text(f"fake k8s: pod action failed: {exc!r}\n")
            code = 1
        with self._lock:
            if not pod.deleted:
                self._finish(pod, code)

    def _finish(self, pod: PodRun, code: int) -> None:
        pod.exit_code = code
        pod.finished_at = time.time()
        job = self._live_jobs.get((pod.namespace, pod.job))
        if job is not None:
            job["status"] = {
                "startTime": job["status"].get("startTime"),
                "completionTime": _now(),
                "succeeded" if code == 0 else "failed": 1,
            }

    def _kill(self, pod: PodRun) -> None:
        if pod.process is not None and pod.process.poll() is None:
            try:
                os.killpg(pod.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
