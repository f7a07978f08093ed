"""The stock Kubernetes executor with one status query per round instead of two per Job, and less work per Job.

``snakemake-executor-plugin-kubernetes`` 0.5.1 asks, in every status round,
``read_namespaced_job_status`` and ``list_namespaced_pod`` for each active Job,
through Snakemake's status rate limiter (``--max-status-checks-per-second``,
default 10): a round over 189 Jobs takes at least 37.8 s of waiting for the
limiter.  `BatchedStatusExecutor` labels every Job and its pod template with the
run (`RUN_LABEL` = the run's id, the name of its Secret) and lists, once per
round, the run's Jobs and the run's pods by that label: two calls per round
whatever the number of Jobs, read as JSON (building client model objects for
189 Jobs and pods took seconds of CPU per round).  Each Job's outcome is decided
as the stock plugin does (`job_outcome`).  A finished Job is deleted with one
call (propagation ``Background``: the garbage collector removes its pod)
instead of the stock list-pods, delete-pod, delete-job, and carries
``ttlSecondsAfterFinished`` (`FINISHED_TTL_S`) so a Job this process could not
delete still goes away.

Creating and deleting Jobs happens in `API_WORKERS` threads, so that neither
Snakemake's main loop (which submits Jobs and post-processes finished ones) nor
the status thread waits for those requests; and, unlike the stock plugin, no
request holds the executor's lock, which also guards the list of active Jobs.
`share_model_configuration` spares the client's model objects a fresh
``Configuration()`` each (about 20 per Job manifest).

With ``--shared-fs-usage input-output ...`` (a PersistentVolumeClaim mounted in
the submitting pod and in every Job's pod at the same path,
``--kubernetes-persistent-volumes claim:/path``), the pods work in the
submitting Snakemake's working directory (on that volume) instead of the
stock ``/workdir`` emptyDir: see profiles/k8s-pvc.

Everything else (manifests, secret, resources, failure logs) is the stock
plugin's.  This module imports the plugin, hence the ``kubernetes`` client: it
is imported by `workflow.runtime.k8s_executor.install` only.
"""

from __future__ import annotations

__all__ = [
    "FINISHED_TTL_S",
    "RUN_LABEL",
    "BatchedStatusExecutor",
    "JobOutcome",
    "job_outcome",
    "share_model_configuration",
]

import concurrent.futures
import enum
import json
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import Any

import kubernetes.client
import urllib3
from snakemake_executor_plugin_kubernetes import Executor as StockExecutor
from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.settings import SharedFSUsage

RUN_LABEL = "prompt-snake/run"
"""Label of every Job (and its pods) with the submitting run's id."""

CONTAINER = "snakemake"
"""Name of the stock plugin's one container."""

FINISHED_TTL_S = 600
"""``ttlSecondsAfterFinished`` of every Job: Kubernetes deletes a finished Job this late at most."""

API_WORKERS = 4
"""Threads making the create and delete requests."""

API_OUTAGE_WAIT_S = 300
"""Seconds to wait, once, when the API server is unreachable (the stock plugin's choice)."""


class JobOutcome(enum.Enum):
    """What a status round concludes about one Job."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    MISSING = "missing"


def _container_exit_code(pod: Mapping[str, Any] | None) -> int | None:
    """Exit code of the ``snakemake`` container of ``pod`` (`None`: no pod, or not terminated)."""
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER:
            terminated = (status.get("state") or {}).get("terminated")
            return int(terminated["exitCode"]) if terminated else None
    return None


def job_outcome(job: Mapping[str, Any] | None, pod: Mapping[str, Any] | None) -> JobOutcome:
    """Decide a Job's state from its object and its pod's, as the stock plugin does.

    The container's exit code counts as well as the Job's counters: a cluster
    may inject sidecar containers that keep the Job active after the
    ``snakemake`` container ended.

    Parameters
    ----------
    job : mapping or `None`
        The Job as listed (the API's JSON), `None` if it was not in the list.
    pod : mapping or `None`
        Its pod (JSON), if listed.

    Returns
    -------
    outcome : `JobOutcome`
    """
    if job is None:
        return JobOutcome.MISSING
    code = _container_exit_code(pod)
    status = job.get("status") or {}
    if (status.get("failed") or 0) > 0 or (code is not None and code != 0):
        return JobOutcome.FAILED
    if (status.get("succeeded") or 0) >= 1 or code == 0:
        return JobOutcome.SUCCEEDED
    return JobOutcome.RUNNING


class _SharedConfiguration:
    """Stands for `kubernetes.client.Configuration` in the client's model modules: one instance for all.

    Every model object of the client (``V1Job``, ``V1EnvVar``, ...) built without
    an explicit configuration makes a fresh ``Configuration()``, which counts the
    CPUs and resets the level of the client's loggers (clearing the cache of
    every logger of the process): about 20 per Job manifest the stock
    ``run_job`` builds, in Snakemake's main loop.  The models only read
    ``client_side_validation`` from it, the same for all.
    """

    def __init__(self, configuration_class: type) -> None:
        self._class = configuration_class
        self._instance: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return self._class(*args, **kwargs)
        if self._instance is None:
            self._instance = self._class()
        return self._instance

    def __getattr__(self, name: str) -> Any:
        return getattr(self._class, name)


def share_model_configuration() -> int:
    """Make the client's models share one default `kubernetes.client.Configuration` (`_SharedConfiguration`).

    Only the model modules (``kubernetes.client.models.*``) are changed; the API
    client keeps making its own configurations.  Idempotent.

    Returns
    -------
    changed : `int`
        Model modules changed now.
    """
    import sys

    from kubernetes.client.configuration import Configuration

    shared = _SharedConfiguration(Configuration)
    changed = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("kubernetes.client.models.") and getattr(module, "Configuration", None) is Configuration:
            module.Configuration = shared  # type: ignore[attr-defined]
            changed += 1
    return changed


class _AsyncCreatingBatchApi:
    """A `kubernetes.client.BatchV1Api` whose ``create_namespaced_job`` hands the Job to its executor.

    The stock ``run_job`` builds the manifest and calls ``create_namespaced_job``
    in Snakemake's main loop; here that call returns at once (a future), and the
    request is made by the executor's API threads (`BatchedStatusExecutor.submit_job`).
    """

    def __init__(self, api: Any, executor: BatchedStatusExecutor) -> None:
        self.api = api
        self._executor = executor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)

    def create_namespaced_job(self, namespace: str, body: Any, **kwargs: Any) -> concurrent.futures.Future[None]:
        return self._executor.submit_job(namespace, body, kwargs)


class BatchedStatusExecutor(StockExecutor):
    """The stock Kubernetes executor, with run-labelled Jobs and one listing per status round.

    Jobs are created, and finished Jobs deleted, by `API_WORKERS` threads, off
    Snakemake's main loop and the status thread; a Job whose creation has not
    returned before a round's listing started counts as running in that round.
    """

    @property
    def batchapi(self) -> Any:
        return self._batchapi

    @batchapi.setter
    def batchapi(self, api: Any) -> None:
        # The stock plugin (re)creates its BatchV1Api in __post_init__ and on re-authentication.
        self._batchapi = _AsyncCreatingBatchApi(api, self)

    def submit_job(self, namespace: str, body: Any, kwargs: dict[str, Any]) -> concurrent.futures.Future[None]:
        """Adjust a Job manifest (`_adjust_job`) and have an API thread create it.

        Parameters
        ----------
        namespace : `str`
        body : `kubernetes.client.V1Job`
            The manifest the stock ``run_job`` built.
        kwargs : `dict`
            Further arguments of ``create_namespaced_job``.

        Returns
        -------
        creation : `concurrent.futures.Future`
            Done when the API server has answered; its exception, if any, is
            reported as the Job's error by the next status round.
        """
        self._adjust_job(body)
        name = body.metadata.name
        creation = self._api_threads.submit(self._create, namespace, body, kwargs)
        self._creating[name] = creation
        return creation

    def _create(self, namespace: str, body: Any, kwargs: dict[str, Any]) -> None:
        # The stock plugin keeps the answer unread (SubmittedJobInfo.aux): skip turning it into a V1Job.
        response = self._kubernetes_retry(
            lambda: self._batchapi.api.create_namespaced_job(namespace, body, _preload_content=False, **kwargs)
        )
        response.drain_conn()  # read and drop the body, so the connection can be reused
        response.release_conn()

    def _in_api_thread(self, func: Callable[..., None], *args: Any) -> None:
        """Run ``func(*args)`` in an API thread, or here once those are shut down (end of the run)."""
        try:
            self._api_threads.submit(func, *args)
        except RuntimeError:
            func(*args)

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        """Let pending creations finish, so that every created Job is cancelled too."""
        concurrent.futures.wait(list(self._creating.values()))
        super().cancel_jobs(active_jobs)

    def shutdown(self) -> None:
        """Finish pending creations and deletions, then the stock shutdown (the run's Secret goes)."""
        self._api_threads.shutdown(wait=True)
        super().shutdown()

    def __post_init__(self) -> None:
        self._reauth_lock = threading.Lock()
        self._api_threads = concurrent.futures.ThreadPoolExecutor(API_WORKERS, thread_name_prefix="k8s-api")
        self._creating: dict[str, concurrent.futures.Future[None]] = {}
        if SharedFSUsage.INPUT_OUTPUT in self.workflow.storage_settings.shared_fs_usage:
            # Checked before the stock __post_init__, which creates the run's Secret.
            workdir = os.getcwd()
            volumes = self.workflow.executor_settings.persistent_volumes
            if not any(Path(workdir).is_relative_to(volume.path) for volume in volumes):
                raise WorkflowError(
                    f"--shared-fs-usage input-output: the working directory {workdir} is on no volume of "
                    "--kubernetes-persistent-volumes (claim:/path, mounted at the same path here and in the pods); "
                    "without a shared volume use --shared-fs-usage none and S3 storage (profiles/k8s)"
                )
        super().__post_init__()

    def _kubernetes_retry(self, func: Callable[[], Any]) -> Any:
        """Call the API as the stock plugin does, without holding the executor's lock meanwhile.

        The stock version holds ``self.lock`` during every request; that lock also
        guards the list of active jobs, so Snakemake's main loop, registering a
        submitted Job, waited for whatever request the status thread had in flight.
        The client is thread-safe; only re-authentication is serialised here.
        """
        try:
            return func()
        except kubernetes.client.rest.ApiException as exc:
            if exc.status == 401:
                with self._reauth_lock:
                    return self._reauthenticate_and_retry(func)
            raise WorkflowError("Kubernetes request failed.", exc) from exc
        except urllib3.exceptions.MaxRetryError:
            # As the stock plugin: the API server may be upgrading (GKE); wait, then try once more.
            msg = f"Kubernetes API unreachable; waiting {API_OUTAGE_WAIT_S} s before one more try"
            self.logger.warning(msg)
            time.sleep(API_OUTAGE_WAIT_S)
            try:
                return func()
            except Exception as exc:
                raise WorkflowError(exc, "the Kubernetes API server is still unreachable") from exc

    @property
    def run_selector(self) -> str:
        """Label selector of this run's Jobs and pods."""
        return f"{RUN_LABEL}={self.run_namespace}"

    def _adjust_job(self, body: Any) -> None:
        """Label the Job and its pods with the run; on a shared volume, work in our working directory."""
        labels = {**(body.metadata.labels or {}), RUN_LABEL: self.run_namespace}
        body.metadata.labels = labels
        template = body.spec.template
        template.metadata = template.metadata or kubernetes.client.V1ObjectMeta()
        template.metadata.labels = {**(template.metadata.labels or {}), RUN_LABEL: self.run_namespace}
        if not self.workflow.executor_settings.omit_job_cleanup:
            body.spec.ttl_seconds_after_finished = FINISHED_TTL_S
        if SharedFSUsage.INPUT_OUTPUT in self.workflow.storage_settings.shared_fs_usage:
            # The pods see the submitter's directory at the same path (a volume mounted there in both).
            for container in template.spec.containers:
                container.working_dir = os.getcwd()

    def _list_run(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """This run's Jobs by name, and their pods by Job name, as the API's JSON (two API calls).

        The answers are read as JSON, not turned into client models: building
        ``V1Job`` and ``V1Pod`` objects for a visit's 189 Jobs and pods took
        seconds of CPU per round.
        """
        jobs = self._list_json(
            lambda: self._batchapi.api.list_namespaced_job(
                self.namespace, label_selector=self.run_selector, _preload_content=False
            )
        )
        pods = self._list_json(
            lambda: self.kubeapi.list_namespaced_pod(
                self.namespace, label_selector=self.run_selector, _preload_content=False
            )
        )
        pods_by_job: dict[str, Any] = {}
        for pod in pods:
            job_name = ((pod.get("metadata") or {}).get("labels") or {}).get("job-name")
            # A Job with backoff_limit=0 has one pod; prefer one whose container state is known.
            known = (pod.get("status") or {}).get("containerStatuses")
            if job_name is not None and (job_name not in pods_by_job or known):
                pods_by_job[job_name] = pod
        return {job["metadata"]["name"]: job for job in jobs}, pods_by_job

    def _list_json(self, request: Callable[[], Any]) -> list[dict[str, Any]]:
        response = self._kubernetes_retry(request)
        try:
            items: list[dict[str, Any]] = json.loads(response.data).get("items") or []
        finally:
            response.release_conn()
        return items

    async def check_active_jobs(self, active_jobs: list[SubmittedJobInfo]) -> AsyncGenerator[SubmittedJobInfo, None]:
        """Report the finished among ``active_jobs`` from one listing of the run; yield the others."""
        if not active_jobs:
            return
        # Snakemake's executor logger prints a record's message as is (no %-arguments): format first.
        msg = f"Checking status of {len(active_jobs)} jobs (one listing)"
        self.logger.debug(msg)
        # Jobs whose creation returned before the listing starts are in it (or gone).
        created = {name for name, creation in list(self._creating.items()) if creation.done()}
        try:
            async with self.status_rate_limiter:
                jobs, pods = self._list_run()
        except (kubernetes.client.rest.ApiException, WorkflowError) as exc:
            msg = f"Listing the run's Jobs failed, will retry: {exc}"
            self.logger.error(msg)
            for job_info in active_jobs:
                yield job_info
            return
        for job_info in active_jobs:
            name = job_info.external_jobid
            creation = self._creating.get(name)
            if creation is not None:
                if name not in created:
                    yield job_info
                    continue
                del self._creating[name]
                if (error := creation.exception()) is not None:
                    msg = f"Creating Job {name} failed: {error}"
                    self.logger.error(msg)
                    self.report_job_error(job_info, msg=msg)
                    continue
            outcome = job_outcome(jobs.get(name), pods.get(name))
            if outcome is JobOutcome.RUNNING:
                yield job_info
            elif outcome is JobOutcome.SUCCEEDED:
                msg = f"Job {name} succeeded."
                self.logger.info(msg)
                self.report_job_success(job_info)
                self._in_api_thread(self._delete, name)
            elif outcome is JobOutcome.FAILED:
                aux_logs = self._save_log(name, pods.get(name))
                msg = f"Job {name} failed."
                self.logger.error(msg)
                self.report_job_error(job_info, msg="", aux_logs=aux_logs)
                self._in_api_thread(self._delete, name)
            else:
                msg = f"Job {name} is not in namespace {self.namespace}: deleted by someone else?"
                self.logger.error(msg)
                self.report_job_error(job_info, msg=msg)

    def _save_log(self, name: str, pod: Mapping[str, Any] | None) -> list[str]:
        """Save a failed Job's pod log under the run's kubernetes-logs (as the stock plugin does)."""
        if pod is None:
            return []
        path = self.log_path / f"{name}.log"
        try:
            text = self._kubernetes_retry(
                lambda: self.kubeapi.read_namespaced_pod_log(
                    name=pod["metadata"]["name"], namespace=self.namespace, container=CONTAINER, previous=True
                )
            )
        except WorkflowError as exc:
            text = f"reading the log of pod {pod['metadata']['name']} failed: {exc}"
        path.write_text(f"{text}\n")
        return [str(path)]

    def _delete(self, name: str) -> None:
        """Delete a finished Job and, through the garbage collector, its pod (one call; 404 is fine)."""
        if self.workflow.executor_settings.omit_job_cleanup:
            return
        try:
            self._kubernetes_retry(
                lambda: self._batchapi.api.delete_namespaced_job(
                    name,
                    self.namespace,
                    propagation_policy="Background",
                    body=kubernetes.client.V1DeleteOptions(),
                )
            )
        except WorkflowError as exc:
            # The TTL removes it anyway; a 404 means it is gone already.
            msg = f"Deleting Job {name}: {exc}"
            self.logger.debug(msg)
