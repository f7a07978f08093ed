"""Run Snakemake on a list of detector-visit targets, as a subprocess.

Used by replay (batches of past visits) and the stream shim (live visits).  A
subprocess keeps each run isolated (Snakemake's API is not re-entrant and keeps
process-global state) and lets the caller stop it cleanly.
"""

from __future__ import annotations

__all__ = [
    "SnakemakeRun",
    "has_remote_outputs",
    "is_kubernetes_profile",
    "resolve_profile",
    "run_snakemake",
    "snakemake_command",
    "snakemake_entry",
]

import dataclasses
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from workflow.core.config import PROJECT_ROOT, load_yaml

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SnakemakeRun:
    """What one Snakemake invocation did."""

    returncode: int
    seconds: float
    targets: int
    log_tail: str


def resolve_profile(profile: str | Path) -> Path:
    """Return a profile directory; relative paths are taken from the checkout."""
    profile = Path(profile)
    return profile if profile.is_absolute() else PROJECT_ROOT / profile


def is_kubernetes_profile(profile: str | Path) -> bool:
    """Return whether a profile runs jobs as Kubernetes Jobs (its ``executor: kubernetes``).

    By the profile's own setting, not its name: ``profiles/k8s`` and ``profiles/k8s-pvc`` both do.
    """
    settings = load_yaml(resolve_profile(profile) / "config.yaml")
    return settings.get("executor") == "kubernetes"


def has_remote_outputs(profile: str | Path) -> bool:
    """Return whether a profile keeps the workflow's files on a remote default storage (S3), not here."""
    settings = load_yaml(resolve_profile(profile) / "config.yaml")
    return settings.get("default-storage-provider") is not None


def snakemake_entry(profile: str | Path) -> list[str]:
    """Return the ``python`` arguments that start Snakemake for a profile.

    The Kubernetes entry point is Snakemake's own main with the kubernetes executor
    replaced by the batched one (`workflow.runtime.k8s_executor`).
    """
    return ["-m", "workflow.runtime.k8s_executor" if is_kubernetes_profile(profile) else "snakemake"]


def snakemake_command(
    targets: Sequence[str],
    *,
    profile: str | Path = "profiles/local",
    snakefile: str | Path | None = None,
    entry: Sequence[str] | None = None,
    configfiles: Sequence[str | Path] = (),
    directory: str | Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """Build the Snakemake command line for some targets.

    Parameters
    ----------
    targets : sequence of `str`
        Target files (``results/.../done.json``), relative to ``directory``.
    profile : `str` or `pathlib.Path`
        Profile directory (relative paths are taken from the checkout).
    snakefile : `str` or `pathlib.Path`, optional
        The Snakefile (default: the checkout's).
    entry : sequence of `str`, optional
        The ``python`` arguments that start Snakemake (default: `snakemake_entry` of
        the profile), e.g. ``["-m", "stream_shim.queue_runner"]``.
    configfiles : sequence
        Config files merged after the Snakefile's defaults (instrument file first).
    directory : `str` or `pathlib.Path`, optional
        Working directory of the run, where the config's relative paths point
        (default: the current directory).
    extra : sequence of `str`
        Further flags (e.g. ``--nolock``).

    Returns
    -------
    command : `list` [`str`]
        The command, starting with this Python.
    """
    words = list(entry) if entry is not None else snakemake_entry(profile)
    command = [
        sys.executable,
        *words,
        "--snakefile",
        str(Path(snakefile or PROJECT_ROOT / "Snakefile")),
        "--profile",
        str(resolve_profile(profile)),
        "--directory",
        str(Path(directory or Path.cwd()).resolve()),
    ]
    if configfiles:
        command += ["--configfile", *(str(Path(c).resolve()) for c in configfiles)]
    return [*command, *extra, "--", *targets] if targets else [*command, *extra]


def run_snakemake(
    targets: Sequence[str], *, log_file: str | Path | None = None, timeout: float | None = None, **kwargs: object
) -> SnakemakeRun:
    """Run Snakemake on ``targets`` and wait for it.

    The run's output goes to ``log_file`` (or is captured); a non-zero return code
    means some targets failed (``--keep-going`` lets the others finish).
    """
    command = snakemake_command(targets, **kwargs)  # type: ignore[arg-type]
    started = time.monotonic()
    _log.info("snakemake on %d target(s)", len(targets))
    result: subprocess.CompletedProcess[bytes] | subprocess.CompletedProcess[str]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as log:
            result = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, stdin=subprocess.DEVNULL
            )
        tail = "\n".join(Path(log_file).read_text(errors="replace").splitlines()[-30:])
    else:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
    return SnakemakeRun(result.returncode, time.monotonic() - started, len(targets), tail)
