"""Tests for the house plan: the wings of `workflow` and `stream_shim`, their walls, no import loops."""

from __future__ import annotations

import pytest
from import_graph import PACKAGES, import_cycles, import_graph, module_name

from workflow.core.config import PROJECT_ROOT

PRODUCT = {"workflow.core", "workflow.science", "workflow.repo", "workflow.apdb", "workflow.stages", "workflow.runtime"}

ALLOWED = {
    "workflow": set(),
    "workflow.data": set(),
    "workflow.core": set(),
    "workflow.science": {"workflow.core"},
    "workflow.repo": {"workflow.core"},
    "workflow.apdb": {"workflow.core"},
    "workflow.stages": {"workflow.core", "workflow.science", "workflow.repo", "workflow.apdb"},
    "workflow.runtime": {"workflow.core", "workflow.science", "workflow.repo", "workflow.apdb", "workflow.stages"},
    "workflow.sim": PRODUCT,
    "workflow.outcomes": PRODUCT,
    "stream_shim": PRODUCT,
    "stream_shim.testbed": PRODUCT | {"stream_shim", "workflow.sim"},
}
"""Wing -> the other wings it may import.  Below: core; science, repo, apdb on core; stages and
runtime above them; the simulator, outcomes and the shim use the product, never the reverse."""


def wing(module: str) -> str:
    """The wing a module belongs to (``workflow.<wing>``, ``stream_shim`` or its ``testbed``)."""
    parts = module.split(".")
    if parts[0] == "stream_shim":
        return "stream_shim.testbed" if parts[1:2] == ["testbed"] else "stream_shim"
    return ".".join(parts[:2])


GRAPH = import_graph()


def test_no_import_loop_anywhere():
    assert import_cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_import_respects_the_walls(module):
    own = wing(module)
    assert own in ALLOWED, f"{module} is in no known wing"
    crossing = {dep for dep in GRAPH[module] if wing(dep) != own}
    forbidden = sorted(dep for dep in crossing if wing(dep) not in ALLOWED[own])
    assert not forbidden, f"{module} ({own}) may not import {forbidden}"


def test_workflow_top_level_is_only_wings():
    top = sorted(p.name for p in (PROJECT_ROOT / "workflow").glob("*.py"))
    assert top == ["__init__.py"]
    wings = sorted(p.name for p in (PROJECT_ROOT / "workflow").iterdir() if (p / "__init__.py").is_file())
    assert wings == ["apdb", "core", "data", "outcomes", "repo", "runtime", "science", "sim", "stages"]


def test_the_graph_reader_sees_function_level_and_relative_imports():
    """The test above is only as good as the reader: a hidden import must show."""
    import ast

    import import_graph as ig

    tree = ast.parse("def f():\n    from workflow.sim.refcat import BANDS\nfrom . import masks\n")
    found = ig._imported(tree, "workflow.science.psf", False)
    assert {"workflow.sim.refcat", "workflow.science.masks"} <= found
    assert wing("workflow.sim.refcat") not in ALLOWED["workflow.science"]
    assert set(PACKAGES) == {"workflow", "stream_shim"}
    assert module_name(PROJECT_ROOT / "workflow" / "core" / "__init__.py") == "workflow.core"
