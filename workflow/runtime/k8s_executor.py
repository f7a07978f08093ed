"""Run Snakemake's command line with the Kubernetes executor set for our image and our scale.

The stock ``snakemake-executor-plugin-kubernetes`` (0.5.1) declares
``auto_deploy_default_storage_provider=True``, so every pod command starts
with ``pip install --target ... snakemake-storage-plugin-s3``: about 12 s per
pod, a dependency on PyPI from inside the cluster, and an unpinned install
that can pull versions breaking our pins.  Our image already holds the pinned
storage plugin.  The stock plugin also asks the API server two questions per
active Job in every status round, which at 189 Jobs and Snakemake's default
10 status checks per second makes a round last 38 s.  This module swaps, in
Snakemake's executor registry, the plugin for a copy that

- has the per-pod install off;
- runs `workflow.runtime.k8s_batched.BatchedStatusExecutor`: two API calls
  per status round whatever the number of Jobs, one call to delete a finished
  Job, Job creation off Snakemake's main loop;
- leaves ``--shared-fs-usage`` to the command line or profile instead of forcing
  ``none``: profiles/k8s says ``none`` (everything through S3),
  profiles/k8s-pvc shares input and output files on a PersistentVolumeClaim.

and, in this (submitting) process only, drops Snakemake's 0.1 s pause between
the levels of each finished group job
(`workflow.runtime.snakemake_tuning.drop_group_level_pause`).

Snakemake 9.27.1 finds executor plugins only as top-level packages named
``snakemake_executor_plugin_*`` on ``sys.path`` (no entry points), and has no
command-line flag for these settings, so the change is made in-process before
Snakemake's own ``main`` runs::

    python -m workflow.runtime.k8s_executor --profile profiles/k8s [snakemake args] -- TARGETS

is ``snakemake --profile profiles/k8s ...`` with the changes above.  Plain
``snakemake --profile profiles/k8s`` still works, with the stock plugin (pip
install per pod, per-Job status calls).  Snakemake is imported inside the
functions only, so importing this module stays cheap.
"""

from __future__ import annotations

__all__ = ["PLUGIN_NAME", "install", "main"]

import dataclasses
import logging
import sys
from collections.abc import Sequence

_log = logging.getLogger(__name__)

PLUGIN_NAME = "kubernetes"
"""Name of the executor plugin adjusted (``--executor kubernetes``)."""


def install() -> bool:
    """Register our Kubernetes executor in place of the stock one.

    Replaces the registered plugin by a copy whose executor is
    `workflow.runtime.k8s_batched.BatchedStatusExecutor` and whose common
    settings have ``auto_deploy_default_storage_provider=False`` and
    ``implies_no_shared_fs=False`` (the profile's ``shared-fs-usage`` decides),
    drops the group-level pause of this process's Snakemake and makes the
    Kubernetes client's models share one configuration.  Idempotent.

    Returns
    -------
    changed : `bool`
        `True` if the registry held the stock plugin and now holds ours, `False` if it held ours already.

    Raises
    ------
    snakemake_interface_common.exceptions.InvalidPluginException
        Raised if ``snakemake-executor-plugin-kubernetes`` is not installed.
    """
    from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

    from workflow.runtime.k8s_batched import BatchedStatusExecutor, share_model_configuration
    from workflow.runtime.snakemake_tuning import drop_group_level_pause

    drop_group_level_pause()
    share_model_configuration()
    registry = ExecutorPluginRegistry()
    plugin = registry.get_plugin(PLUGIN_NAME)
    if plugin.executor is BatchedStatusExecutor:
        return False
    settings = dataclasses.replace(
        plugin.common_settings, auto_deploy_default_storage_provider=False, implies_no_shared_fs=False
    )
    registry.plugins[PLUGIN_NAME] = dataclasses.replace(
        plugin, executor=BatchedStatusExecutor, common_settings=settings
    )
    _log.debug("executor plugin %r: batched status checks, no per-pod storage plugin install", PLUGIN_NAME)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run Snakemake's command line after `install`.

    Parameters
    ----------
    argv : sequence of `str`, optional
        Snakemake arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    status : `int`
        Snakemake's exit status.
    """
    from snakemake.cli import main as snakemake_main

    install()
    try:
        snakemake_main(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # snakemake's main always ends with sys.exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
