"""Stages wing: one module per rule of a detector-visit's chain, plus its paths and records.

`STAGES` is the stage table: one word per stage, used alike by the rule
(``rules/*.smk``), its module here (``workflow.stages.<word>``, entry point ``run``),
its log, benchmark and record names and the stage server's requests.
"""

from __future__ import annotations

__all__ = ["STAGES"]

STAGES = ("prep", "ingest", "pipeline", "export", "apdb", "finish")
"""Stages in chain order; each is a rule and a module ``workflow.stages.<stage>`` with ``run(**kwargs)``."""
