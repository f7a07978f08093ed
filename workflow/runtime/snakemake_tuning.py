"""Adjustments to the running Snakemake scheduler.

`disable_job_rate_limiter` is applied from the Snakefile's ``onstart``;
`drop_group_level_pause` by `workflow.runtime.k8s_executor` in the submitting
process of the Job path.

Snakemake 9's default ``--max-jobs-per-timespan 100/1s`` makes its scheduler, after
every scheduling round, start a one-second timer that triggers one more round.  Each
job that finishes adds a round, hence one more timer chain, and the chains never end:
measured on 189 detector-visits (1,134 jobs, profiles/local), the scheduler ran
47,465 rounds, each re-checking the size of every ready job's inputs, and used about
half a core for itself.  A per-detector-visit workflow never needs to rate-limit job
starts (Kubernetes Jobs are created one API call at a time anyway), so the limiter is
switched off; rounds then happen when jobs finish, as before Snakemake 8.17.
"""

from __future__ import annotations

__all__ = ["disable_job_rate_limiter", "drop_group_level_pause"]

import asyncio
import logging
import types
from typing import Any

_log = logging.getLogger(__name__)


def disable_job_rate_limiter(smk_workflow: Any) -> bool:
    """Remove the job rate limiter of ``smk_workflow``'s scheduler, if it has one.

    Parameters
    ----------
    smk_workflow : `snakemake.workflow.Workflow`
        The running workflow (the Snakefile's ``workflow``); its scheduler exists
        when ``onstart`` hooks run.

    Returns
    -------
    disabled : `bool`
        Whether a limiter was removed (`False` if there was none, e.g. in a dry run,
        or if this Snakemake version keeps it elsewhere).
    """
    scheduler = getattr(smk_workflow, "scheduler", None)
    if scheduler is None or getattr(scheduler, "job_rate_limiter", None) is None:
        return False
    scheduler.job_rate_limiter = None
    _log.debug("Snakemake job rate limiter switched off")
    return True


class _AsyncioWithoutPause(types.ModuleType):
    """`asyncio` as seen by ``snakemake.jobs``, whose one ``asyncio.sleep`` becomes a bare yield."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        return await asyncio.sleep(0, result)


def drop_group_level_pause() -> bool:
    """Stop Snakemake pausing 0.1 s between the levels of every finished group job.

    Snakemake 9 post-processes a finished group job level by level (here: prep
    and ingest, pipeline, export and apdb, finish) and sleeps 0.1 s before each
    level after the first, so that outputs it touches get distinct modification
    times.  It does so in its main loop, one group job after the other: 0.3 s
    per detector-visit chain, 57 s of sleeping when a visit's 189 Jobs end
    together, during which no finished Job is noticed.  The pause buys nothing
    here: with S3 storage the submitter touches no file, and on a shared volume
    touches made in level order already get non-decreasing times, which is all
    ``rerun-triggers: mtime`` needs (an output is outdated only if an input is
    strictly newer).  The only ``asyncio.sleep`` of ``snakemake.jobs`` is that
    pause (checked here); it becomes a bare yield to the event loop.

    Returns
    -------
    dropped : `bool`
        `True` if the pause was dropped now, `False` if it was already, or if
        ``snakemake.jobs`` does not look as expected (then it is left alone).
    """
    import inspect

    import snakemake.jobs

    if isinstance(snakemake.jobs.asyncio, _AsyncioWithoutPause):
        return False
    source = inspect.getsource(snakemake.jobs)
    if source.count("asyncio.sleep(") != 1 or "await asyncio.sleep(0.1)" not in source:
        _log.warning("snakemake.jobs changed: its group-level pause is left as it is")
        return False
    snakemake.jobs.asyncio = _AsyncioWithoutPause("asyncio")
    _log.debug("Snakemake group job level pause dropped")
    return True
