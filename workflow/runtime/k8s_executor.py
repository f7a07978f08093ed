"""Run Snakemake's command line with the Kubernetes executor set for our image.

The stock ``snakemake-executor-plugin-kubernetes`` (0.5.1) declares
``auto_deploy_default_storage_provider=True``, so every pod command starts
with ``pip install --target ... snakemake-storage-plugin-s3``: about 12 s per
pod, a dependency on PyPI from inside the cluster, and an unpinned install
that can pull versions breaking our pins.  Our image already holds the pinned
storage plugin, so this module swaps, in Snakemake's executor registry, the
plugin's common settings for a copy with that flag off.  Everything else
(manifests, secrets, status polling) is the stock plugin's.

Snakemake 9.27.1 finds executor plugins only as top-level packages named
``snakemake_executor_plugin_*`` on ``sys.path`` (no entry points), and has no
command-line flag for this setting, so the change is made in-process before
Snakemake's own ``main`` runs::

    python -m workflow.runtime.k8s_executor --profile profiles/k8s [snakemake args] -- TARGETS

is exactly ``snakemake --profile profiles/k8s ...`` minus the per-pod pip
install.  Plain ``snakemake --profile profiles/k8s`` still works, with the
install.  Snakemake is imported inside the functions only, so importing this
module stays cheap.
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
    """Turn off the per-pod storage plugin install of the Kubernetes executor.

    Replaces the registered plugin by a copy whose common settings have
    ``auto_deploy_default_storage_provider=False``.  Idempotent.

    Returns
    -------
    changed : `bool`
        `True` if the setting was on and is now off, `False` if it was off already.

    Raises
    ------
    snakemake_interface_common.exceptions.InvalidPluginException
        Raised if ``snakemake-executor-plugin-kubernetes`` is not installed.
    """
    from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

    registry = ExecutorPluginRegistry()
    plugin = registry.get_plugin(PLUGIN_NAME)
    if not plugin.common_settings.auto_deploy_default_storage_provider:
        return False
    settings = dataclasses.replace(plugin.common_settings, auto_deploy_default_storage_provider=False)
    registry.plugins[PLUGIN_NAME] = dataclasses.replace(plugin, common_settings=settings)
    _log.debug("executor plugin %r: per-pod storage plugin install turned off", PLUGIN_NAME)
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
