"""The long-lived Snakemake process of the streaming design, fed targets on stdin.

The shim starts ``python -m stream_shim.queue_runner <snakemake arguments>`` once.
Its ``--snakefile`` is a small wrapper (`write_wrapper_snakefile`) that includes
the project's Snakefile and adds one default rule whose input is Snakemake's
``from_queue(TARGETS, finish_sentinel=FINISHED)``.  A thread here reads target
paths from stdin, one per line, into ``TARGETS``; Snakemake adds them to its DAG
every ``--queue-input-wait-time`` seconds and schedules their jobs with the
others under one ``--cores`` bound.  End of stdin puts ``FINISHED``: Snakemake
then completes what it has and exits, which is how the shim drains it without
a signal.
"""

from __future__ import annotations

__all__ = ["TARGETS", "FINISHED", "WRAPPER_RULE", "write_wrapper_snakefile", "main"]

import logging
import os
import queue
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

_log = logging.getLogger(__name__)

TARGETS: queue.Queue[object] = queue.Queue()
"""Target paths read from stdin (the wrapper rule's input)."""
FINISHED = object()
"""Queued after the last target when stdin closes."""
WRAPPER_RULE = "shim_stream"
"""Name of the wrapper's queue-fed rule."""

_WRAPPER = """\
# Written by the stream shim (stream_shim.queue_runner): the project's workflow plus
# one default rule whose inputs arrive on stdin while Snakemake runs.
from stream_shim.queue_runner import TARGETS, FINISHED


include: {snakefile!r}


rule {rule}:
    input:
        from_queue(TARGETS, finish_sentinel=FINISHED),
    default_target: True
"""


def write_wrapper_snakefile(directory: str | Path, snakefile: str | Path) -> Path:
    """Write the wrapper Snakefile into ``directory`` and return its path.

    The project's Snakefile finds its config files under ``workflow.basedir``,
    which is the wrapper's directory: a ``config`` link there points to the
    project's ``config`` directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    snakefile = Path(snakefile).resolve()
    link = directory / "config"
    if link.is_symlink() and Path(os.readlink(link)) != snakefile.parent / "config":
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(snakefile.parent / "config", target_is_directory=True)
    path = directory / "Snakefile"
    path.write_text(_WRAPPER.format(snakefile=str(snakefile), rule=WRAPPER_RULE))
    return path


def _feed(stream: IO[str]) -> None:
    for line in stream:
        target = line.strip()
        if target:
            TARGETS.put(target)
    TARGETS.put(FINISHED)


def main(argv: Sequence[str] | None = None) -> int:
    """Feed stdin into `TARGETS` and run Snakemake's command line; return its exit status.

    ``--k8s`` as the first argument runs `workflow.runtime.k8s_executor` instead of plain Snakemake.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    threading.Thread(target=_feed, args=(sys.stdin,), name="target-feed", daemon=True).start()
    if args[:1] == ["--k8s"]:
        from workflow.runtime.k8s_executor import main as k8s_main

        return k8s_main(args[1:])
    from snakemake.cli import main as snakemake_main

    try:
        snakemake_main(args)
    except SystemExit as exc:  # snakemake's main always ends with sys.exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    # Run the importable module's main, so that the wrapper Snakefile's import sees the same TARGETS.
    from stream_shim.queue_runner import main as _main

    sys.exit(_main())
