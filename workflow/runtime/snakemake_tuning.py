"""Adjustments to the running Snakemake scheduler, applied from the Snakefile's ``onstart``.

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

__all__ = ["disable_job_rate_limiter"]

import logging
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
