"""Every command the README shows works as written.

Each command line of the README's code blocks (and each ``make`` target of its
command table) is checked one of three ways:

- cheap ones run as written in a scratch run directory (dry runs, rule graphs,
  the kustomize rendering);
- long-running ones (the shim, a replay, benchmarks) get their arguments parsed
  by the program's own argument parser, stopped right after parsing: a renamed or
  removed flag fails here;
- ``make`` targets: ``make -n`` shows their recipe (``make test`` itself is what CI runs).

A command the test does not know fails it, so a new README command gets checked.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workflow.core.config import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
PROGRAMS = ("python", "snakemake", "make", "kubectl", "apdb-cli")
LINKED = ("Snakefile", "rules", "config", "workflow", "stream_shim", "scripts", "profiles", "envs", "deploy")


def _commands() -> list[str]:
    """The README's command lines (comments after ``#`` dropped), in order."""
    text = README.read_text()
    lines = []
    for block in FENCE.findall(text):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command.split(" ", 1)[0] in PROGRAMS:
                lines.append(command)
    lines += [f"make {name}" for name in re.findall(r"^\| `make ([\w-]+)` \|", text, re.M)]
    return lines


class _Parsed(Exception):
    """Raised by the patched parser once the arguments parsed."""


def _parse_only(command: str, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Run the Python program of ``command`` up to its argument parsing; return the parsed namespace."""
    argv = shlex.split(command)[1:]
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self: argparse.ArgumentParser, args: object = None, namespace: object = None) -> None:
        raise _Parsed(original(self, args, namespace))  # type: ignore[arg-type]

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.chdir(PROJECT_ROOT)
    with pytest.raises(_Parsed) as parsed:
        if argv[0] == "-m":
            monkeypatch.setattr(sys, "argv", [argv[1], *argv[2:]])
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            monkeypatch.setattr(sys, "argv", argv)
            runpy.run_path(str(PROJECT_ROOT / argv[0]), run_name="__main__")
    namespace = parsed.value.args[0]
    assert isinstance(namespace, argparse.Namespace)
    return namespace


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory linking the checkout's files (no visit files: dry runs have nothing to do)."""
    root = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (root / name).symlink_to(PROJECT_ROOT / name)
    return root


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _kind(command: str) -> str:
    """How a command is checked: ``run``, ``parse``, ``make`` or ``placeholder``."""
    words = command.split()
    if words[0] == "make":
        return "make"
    if words[0] in ("kubectl", "apdb-cli"):
        return "run"
    if words[0] == "python":
        return "parse"
    if words[0] == "snakemake":
        # `...` stands for targets: the line shows flags to add to a command.
        return "placeholder" if "..." in words else "run"
    raise AssertionError(f"README command with no check: {command!r}")


COMMANDS = _commands()


def _demo_apdb(run_dir: Path) -> Path:
    """Write the demo's APDB and its ``apdb-cli`` config under ``run_dir`` as ``make demo`` does."""
    from workflow.apdb.config_file import default_config_path, write_apdb_config
    from workflow.core.config import instrument_config_path, load_config

    config = load_config(instrument_config_path("LSSTComCamSim"), extra_files=[PROJECT_ROOT / "config" / "demo.yaml"])
    path = default_config_path(config["apdb"], "LSSTComCamSim", base_dir=run_dir)
    return write_apdb_config(config["apdb"], path, base_dir=run_dir)


def test_the_readme_shows_its_commands() -> None:
    kinds = {_kind(c) for c in COMMANDS}
    assert kinds >= {"run", "parse", "make"}
    assert "make demo" in COMMANDS and "make test" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_command(command: str, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kind = _kind(command)
    if kind == "make":
        result = subprocess.run(["make", "-n", *command.split()[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), f"{command}: empty recipe"
    elif kind == "parse":
        _parse_only(command, monkeypatch)
    elif kind == "run":
        if command.split()[0] in ("dot", "kubectl") or "| dot" in command:
            needed = "kubectl" if command.startswith("kubectl") else "dot"
            if shutil.which(needed) is None:
                pytest.skip(f"{needed} not installed")
        if command.startswith("apdb-cli"):  # on what make demo leaves: the demo's APDB and its config file
            _demo_apdb(scratch)
        result = _run(command, scratch)
        assert result.returncode == 0, f"{command}\n--- stderr:\n{result.stderr[-3000:]}"
    else:
        # A line of flags: the flags before `...` with a dry run and no target must be accepted.
        flags = command.split("...")[0].strip()
        if "profiles/k8s" in flags:
            pytest.skip("a dry run with profiles/k8s queries the S3 prefix (tests/test_k8s_profile.py runs it)")
        result = _run(f"{flags} -n" if " -n" not in f" {flags}" else flags, scratch)
        assert result.returncode == 0, f"{command}\n--- stderr:\n{result.stderr[-3000:]}"


def test_default_profile_holds_only_what_every_profile_agrees_on() -> None:
    """profiles/default is read by every snakemake command (its keys win over --profile's)."""
    import yaml

    default = yaml.safe_load((PROJECT_ROOT / "profiles" / "default" / "config.yaml").read_text())
    assert default == {"rerun-triggers": "mtime"}
    for path in sorted((PROJECT_ROOT / "profiles").glob("*/config.yaml")):
        profile = yaml.safe_load(path.read_text())
        for key, value in default.items():
            assert profile.get(key) == value, f"{path}: {key} is {profile.get(key)!r}, profiles/default says {value!r}"


def test_plain_dry_run_uses_the_default_profile(scratch: Path) -> None:
    """``snakemake -n --configfile ...`` (the README's dry run) picks up the project's settings by itself."""
    result = _run("snakemake -n --configfile config/instruments/LSSTComCamSim.yaml", scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Using workflow specific profile profiles/default" in result.stdout + result.stderr
