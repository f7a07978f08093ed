"""Tests for ``docs/operations.md``: its ``sh runnable`` blocks run as written, its
links resolve, and its error-class table lists every error class with the right
retry meaning."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import fabricate_run

from workflow.core.config import PROJECT_ROOT
from workflow.core.exceptions import NonRetriableError, RetriableError

DOC = PROJECT_ROOT / "docs" / "operations.md"
RUNNABLE = re.compile(r"^```sh runnable\n(.*?)^```", re.M | re.S)
LINKED = (
    "Snakefile",
    "rules",
    "config",
    "workflow",
    "stream_shim",
    "scripts",
    "profiles",
    "report",
    "envs",
    "pyproject.toml",
)
ROW = re.compile(r"^\| `(\w+)` \| `([\w.]+)` \| (yes|no|n/a) \| (.+) \|$", re.M)


def _blocks() -> list[str]:
    return RUNNABLE.findall(DOC.read_text())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory linking the checkout's files, with a fabricated night in results/."""
    root = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        (root / name).symlink_to(PROJECT_ROOT / name)
    return fabricate_run(root, with_products=False)


def test_runnable_blocks_exist():
    commands = "\n".join(_blocks())
    for expected in (
        "snakemake -n",
        "snakemake --rulegraph",
        "load_config",
        "release_notes.py",
        "apdb-cli create-sql",
        "--drop",
        "timer=DEBUG",
        "failed.json",
    ):
        assert expected in commands, f"docs/operations.md: no runnable block with {expected!r}"


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_runnable_block(scratch, index):
    block = _blocks()[index]
    skipped = []
    if shutil.which("dot") is None:  # graphviz: optional here, installed by .ci/run
        skipped = [line for line in block.splitlines() if line.startswith("dot ")]
        block = "\n".join(line for line in block.splitlines() if not line.startswith("dot "))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=scratch, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"block {index} failed:\n{block}\n--- stderr:\n{result.stderr[-3000:]}"
    if "release_notes.py" in block:
        assert "APDB schema 10.0.0, ApdbSql 1.2.1" in result.stdout
    if "apdb-cli metadata show" in block:
        assert "version:schema: 10.0.0" in result.stdout
    if "failed.json" in block:
        assert "failed.json" in result.stdout and "failures: ingest:RawTimeoutError x1" in result.stdout
    if "timer=DEBUG" in block:
        assert result.stdout.strip() == "workflow=INFO stream_shim=INFO timer=DEBUG"
    if skipped:
        pytest.skip(f"graphviz dot not installed: did not run {skipped}")


def test_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)\)", DOC.read_text()):
        assert (DOC.parent / target).exists(), f"docs/operations.md links to missing {target}"


def _error_classes() -> dict[str, tuple[str, type]]:
    """Every exception class defined in workflow/ and stream_shim/ whose name or bases say Error or Visit."""
    found = {}
    for package in ("workflow", "stream_shim"):
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            for name, bases in re.findall(r"^class (\w+)\(([^)]*)\)", path.read_text(), re.M):
                if not re.search(r"Error|Visit", name + bases):
                    continue
                module = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
                cls = getattr(importlib.import_module(module), name)
                if isinstance(cls, type) and issubclass(cls, BaseException):
                    found[name] = (module, cls)
    return found


def test_error_table_lists_every_class_with_its_retry_meaning():
    rows = {name: (module, retry) for name, module, retry, _ in ROW.findall(DOC.read_text())}
    classes = _error_classes()
    missing = sorted(set(classes) - set(rows))
    assert not missing, f"docs/operations.md: add a row to the error table for {missing}"
    for name, (module, retry) in rows.items():
        assert name in classes, f"docs/operations.md lists {name}, which no module defines"
        assert module == classes[name][0], f"{name} is defined in {classes[name][0]}, not {module}"
        cls = classes[name][1]
        actual = "yes" if issubclass(cls, RetriableError) else "no" if issubclass(cls, NonRetriableError) else "n/a"
        assert retry == actual, f"docs/operations.md says {name} retry={retry}, the class says {actual}"
