"""Tests that every place pinning dependencies agrees with pyproject.toml, and the locks with both."""

from __future__ import annotations

import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    runtime = {n for n in expected if n not in ("pytest", "pytest-xdist")}  # test tools: not in the rules
    assert runtime <= set(seen), f"missing from envs/: {sorted(runtime - set(seen))}"


def test_installed_versions_match_pins():
    from importlib.metadata import version

    for name, pinned in _pyproject_pins().items():
        assert version(name) == pinned, f"installed {name} {version(name)} != pinned {pinned}"


def _lock_pins(name: str) -> dict[str, str]:
    """``name==version`` lines of a lock written by ``make lock`` (uv pip compile)."""
    pins = {}
    for line in (PROJECT_ROOT / name).read_text().splitlines():
        if line[:1].isalnum():
            req = Requirement(line.split(" ;", 1)[0])
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line!r} is not pinned with =="
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_lock_has_every_direct_pin_at_its_version():
    """requirements.lock (make setup, CI) holds every pyproject pin, extras included, at the same version."""
    lock = _lock_pins("requirements.lock")
    for name, version in _pyproject_pins().items():
        name = canonicalize_name(name)
        assert name in lock, f"requirements.lock lacks {name}: run make lock"
        assert lock[name] == version, f"requirements.lock: {name}=={lock[name]}, pyproject: {version}: run make lock"
    assert len(lock) > len(_pyproject_pins()), "requirements.lock holds no transitive dependency"


def test_runtime_lock_is_the_runtime_part_of_the_lock():
    """requirements-runtime.lock (the base image) holds the runtime pins, at requirements.lock's versions."""
    full, runtime = _lock_pins("requirements.lock"), _lock_pins("requirements-runtime.lock")
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as stream:
        dependencies = tomllib.load(stream)["project"]["dependencies"]
    for text in dependencies:
        name = canonicalize_name(Requirement(text).name)
        assert name in runtime, f"requirements-runtime.lock lacks {name}: run make lock"
    differ = {name: (v, full.get(name)) for name, v in runtime.items() if full.get(name) != v}
    assert not differ, f"requirements-runtime.lock vs requirements.lock (runtime, full): {differ}: run make lock"
    assert "pytest" not in runtime and "ruff" not in runtime


def test_installed_versions_match_the_lock():
    """What make setup installed is what the lock says (a stale venv or lock shows here)."""
    from importlib.metadata import PackageNotFoundError, version

    wrong = {}
    for name, locked in _lock_pins("requirements.lock").items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != locked:
            wrong[name] = (installed, locked)
    assert not wrong, f"installed vs locked: {wrong}: run make setup"
