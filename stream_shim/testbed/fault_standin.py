"""The fault suite's stand-in workflow: the night simulator's, with S3 reads and a crafted poison target.

`write_fault_snakefile` writes `stream_shim.testbed.night_standin`'s Snakefile with
two changes:

- *ingest* reads its raw from the raw bucket (``fetch_raw``), so an S3 outage
  reaches the jobs, not only the camera and the shim;
- optionally, one detector-visit no rule can build: the ``visit``-th group the
  camera announces (its expectation files ``night/expect/{group}.txt``, in the
  order of their names, which are the groups' ISO timestamps), detector ``detector``.
  Its *prep* then needs ``night/unbuildable/{instrument}/{day_obs}/{group}/{detector}.json``,
  which no rule makes: the streaming Snakemake meets a ``MissingInputException``
  and the shim quarantines that target alone (`stream_shim.quarantine`).  The
  camera writes a visit's expectations before it publishes the next_visit, so the
  position is known when the target reaches Snakemake.
"""

from __future__ import annotations

__all__ = ["UNBUILDABLE_DIR", "Unbuildable", "write_fault_snakefile"]

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from stream_shim.testbed.night_standin import EXPECT_DIR, CostModel, write_standin_snakefile

UNBUILDABLE_DIR = "night/unbuildable"
"""Under the run directory: where the missing input of the crafted poison target would be (never written)."""


@dataclasses.dataclass(frozen=True)
class Unbuildable:
    """The detector-visit no rule can build.

    Attributes
    ----------
    ordinal : `int`
        Position (0-based) of its group among the camera's expectation files, by name.
    detector : `int`
        Its detector id.
    """

    ordinal: int
    detector: int


_PRELUDE = '''\
import os


def unbuildable_input(wildcards):
    """The fault suite's poison: one detector-visit needs a file that no rule makes."""
    if int(wildcards.detector) != {detector}:
        return []
    try:
        groups = sorted(name[:-4] for name in os.listdir({expect!r}) if name.endswith(".txt"))
    except OSError:
        return []
    if {ordinal} < len(groups) and groups[{ordinal}] == wildcards.group:
        return {missing!r}.format(
            instrument=wildcards.instrument,
            day_obs=wildcards.day_obs,
            group=wildcards.group,
            detector=wildcards.detector,
        )
    return []
'''


def write_fault_snakefile(
    path: Path,
    cost: CostModel,
    *,
    paths: Mapping[str, str],
    poll_s: float,
    raw_timeout_s: float,
    unbuildable: Unbuildable | None = None,
) -> Path:
    """Write the fault suite's stand-in Snakefile to ``path`` and return it.

    Parameters
    ----------
    path : `pathlib.Path`
        Where to write it.
    cost : `stream_shim.testbed.night_standin.CostModel`
        Seconds per stage.
    paths : `~collections.abc.Mapping`
        The config's ``paths``.
    poll_s : `float`
        Ingest's poll interval (arrival index and S3 reads).
    raw_timeout_s : `float`
        Ingest's deadline for its raw, found and read.
    unbuildable : `Unbuildable`, optional
        The crafted poison target, if any.
    """
    prelude, extra = "", None
    if unbuildable is not None:
        missing = UNBUILDABLE_DIR + "/{instrument}/{day_obs}/{group}/{detector}.json"
        prelude = _PRELUDE.format(
            detector=int(unbuildable.detector), ordinal=int(unbuildable.ordinal), expect=EXPECT_DIR, missing=missing
        )
        extra = {"prep": {"poison": "unbuildable_input"}}
    return write_standin_snakefile(
        path,
        cost,
        paths=paths,
        poll_s=poll_s,
        raw_timeout_s=raw_timeout_s,
        fetch_raw=True,
        prelude=prelude,
        extra_inputs=extra,
    )
