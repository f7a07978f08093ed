"""Tests that every place pinning dependencies agrees with pyproject.toml."""

from __future__ import annotations

import tomllib

import yaml
from packaging.requirements import Requirement

from workflow.core.config import PROJECT_ROOT


def _pyproject_pins() -> dict[str, str]:
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as stream:
        project = tomllib.load(stream)["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    pins = {}
    for text in requirements:
        req = Requirement(text)
        (spec,) = req.specifier  # exactly one specifier: an exact pin
        assert spec.operator == "==", f"pyproject: {text!r} is not pinned with =="
        pins[req.name.lower()] = spec.version
    return pins


def _conda_pip_pins(path) -> dict[str, str]:
    with open(path) as stream:
        env = yaml.safe_load(stream)
    pins = {}
    for item in env["dependencies"]:
        if isinstance(item, dict):
            for text in item["pip"]:
                req = Requirement(text)
                (spec,) = req.specifier
                pins[req.name.lower()] = spec.version
    return pins


def test_pyproject_pins_every_dependency_exactly():
    pins = _pyproject_pins()
    assert "snakemake" in pins and pins["snakemake"].startswith("9.")


def test_conda_envs_agree_with_pyproject():
    expected = _pyproject_pins()
    envs = sorted((PROJECT_ROOT / "envs").glob("*.yaml"))
    assert envs, "no conda environments in envs/"
    seen: dict[str, str] = {}
    for path in envs:
        pins = _conda_pip_pins(path)
        for name, version in pins.items():
            assert name in expected, f"{path.name}: {name} is not a pyproject dependency"
            assert version == expected[name], f"{path.name}: {name}=={version}, pyproject pins {expected[name]}"
        seen.update(pins)
    runtime = {n for n in expected if n != "pytest"}
    assert runtime <= set(seen), f"missing from envs/: {sorted(runtime - set(seen))}"


def test_installed_versions_match_pins():
    from importlib.metadata import version

    for name, pinned in _pyproject_pins().items():
        assert version(name) == pinned, f"installed {name} {version(name)} != pinned {pinned}"
