"""Size the profiles' per-rule resources from what the stages really used.

Each target's ``done.json`` carries, per stage, the forked stage's own CPU and peak
RSS (`workflow.stages.records.StageResources`), not the stage client's that
Snakemake's benchmarks see.  `size_resources` turns their p95 over a run into
``mem_mb`` (p95 peak RSS plus headroom, rounded up) and a CPU figure per rule,
the numbers that ``profiles/k8s/config.yaml`` ``set-resources`` should hold.
"""

from __future__ import annotations

__all__ = ["RuleSize", "size_resources", "set_resources_lines"]

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from workflow.stages import STAGES
from workflow.stages.records import Outcome


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleSize:
    """Measured p95 use of one rule's stage and the request derived from it."""

    rule: str
    samples: int
    p95_max_rss_mb: float
    p95_cpu_s: float
    p95_wall_s: float
    mem_mb: int
    cpu_fraction: float
    """p95 of (user + sys CPU) / wall: the share of a core the stage keeps busy."""


def _p95(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), 95)) if values else 0.0


def size_resources(
    records: Sequence[Outcome], *, headroom: float = 1.25, step_mb: int = 100, floor_mb: int = 200
) -> list[RuleSize]:
    """Return one `RuleSize` per rule that has measurements, in chain order.

    Parameters
    ----------
    records : sequence of `workflow.stages.records.Outcome`
        The run's outcome records (failed ones carry no stage resources).
    headroom : `float`
        Factor on the p95 peak RSS for the memory request.
    step_mb, floor_mb : `int`
        The request is rounded up to a multiple of ``step_mb``, and at least ``floor_mb``.

    Returns
    -------
    sizes : `list` [`RuleSize`]
    """
    rss: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    share: dict[str, list[float]] = {}
    for record in records:
        for stage, used in record.stage_resources.items():
            rss.setdefault(stage, []).append(used.max_rss_mb)
            cpu.setdefault(stage, []).append(used.cpu_user_s + used.cpu_sys_s)
            wall.setdefault(stage, []).append(used.wall_s)
            share.setdefault(stage, []).append((used.cpu_user_s + used.cpu_sys_s) / max(used.wall_s, 1e-3))
    sizes = []
    for stage in (s for s in STAGES if s in rss):
        p95_rss = _p95(rss[stage])
        mem = max(floor_mb, int(math.ceil(p95_rss * headroom / step_mb) * step_mb))
        sizes.append(
            RuleSize(
                rule=stage,
                samples=len(rss[stage]),
                p95_max_rss_mb=round(p95_rss, 1),
                p95_cpu_s=round(_p95(cpu[stage]), 3),
                p95_wall_s=round(_p95(wall[stage]), 3),
                mem_mb=mem,
                cpu_fraction=round(min(_p95(share[stage]), 1.0), 2),
            )
        )
    return sizes


def set_resources_lines(sizes: Sequence[RuleSize]) -> list[str]:
    """Return ``set-resources`` entries (``rule:mem_mb=N``) for a Snakemake profile."""
    return [f"{size.rule}:mem_mb={size.mem_mb}" for size in sizes]
