"""Tests for ``docker/Dockerfile.base``, ``docker/Dockerfile.service`` and
``.github/workflows/containers.yml``: pins agree with pyproject.toml, image names with
profiles/k8s, and the service image holds what pods and the shim need.

No Docker daemon is needed: the files are parsed, not built.
"""

from __future__ import annotations

import re
import shlex
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from workflow.core.config import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"


def _project() -> dict:
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as stream:
        return tomllib.load(stream)["project"]


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for text in requirements:
        req = Requirement(text)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{text!r} is not an exact pin"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def _instructions(path) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"^\s*#.*\n", "", path.read_text(), flags=re.M)
    text = re.sub(r"\\\n", " ", text)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in text.splitlines()
        if line.strip()
    ]


def _pip_installs(path) -> list[list[str]]:
    """Arguments of every `pip install` in the RUN instructions."""
    installs = []
    for keyword, args in _instructions(path):
        if keyword == "RUN":
            for command in re.split(r"&&|;", args):
                words = shlex.split(command)
                if "pip" in words and "install" in words:
                    installs.append(words[words.index("install") + 1 :])
    return installs


def _profile_image() -> tuple[str, str]:
    with open(PROJECT_ROOT / "profiles" / "k8s" / "config.yaml") as stream:
        image = yaml.safe_load(stream)["container-image"]
    repository, _, tag = image.rpartition(":")
    return repository, tag


def _workflow() -> dict:
    with open(PROJECT_ROOT / ".github" / "workflows" / "containers.yml") as stream:
        return yaml.safe_load(stream)


class TestBaseImage:
    """Tests for ``docker/Dockerfile.base``."""

    def test_python_311_slim(self):
        froms = [args for keyword, args in _instructions(DOCKER / "Dockerfile.base") if keyword == "FROM"]
        assert froms == ["python:3.11-slim"]
        assert _project()["requires-python"] == ">=3.11,<3.12"

    def test_pins_are_pyproject_dependencies(self):
        installs = _pip_installs(DOCKER / "Dockerfile.base")
        assert len(installs) == 1, installs
        # The base image installs the runtime lock (pyproject dependencies + their locked closure).
        assert installs[0] == ["-r", "/tmp/requirements-runtime.lock"], installs
        copies = [args.split() for keyword, args in _instructions(DOCKER / "Dockerfile.base") if keyword == "COPY"]
        assert ["requirements-runtime.lock", "/tmp/requirements-runtime.lock"] in copies
        lock = (PROJECT_ROOT / "requirements-runtime.lock").read_text().splitlines()
        locked = _pins([line for line in lock if line[:1].isalnum()])
        wanted = _pins(_project()["dependencies"])
        requirements = [f"{name}=={locked[name]}" for name in wanted if name in locked]
        expected = _pins(_project()["dependencies"])
        pinned = _pins(requirements)
        missing = sorted(set(expected) - set(pinned))
        extra = sorted(set(pinned) - set(expected))
        differ = {
            name: (pinned[name], expected[name])
            for name in expected
            if name in pinned and pinned[name] != expected[name]
        }
        assert not (missing or extra or differ), (
            f"docker/Dockerfile.base vs pyproject dependencies: missing {missing}, not in pyproject {extra}, "
            f"different versions (Dockerfile, pyproject) {differ}"
        )


class TestServiceImage:
    """Tests for ``docker/Dockerfile.service``."""

    def test_built_on_base_without_own_pins(self):
        steps = _instructions(DOCKER / "Dockerfile.service")
        assert steps[0] == ("ARG", "BASE_IMAGE") and ("FROM", "${BASE_IMAGE}") in steps
        (install,) = _pip_installs(DOCKER / "Dockerfile.service")
        assert install == ["--no-deps", "-e", "."], install

    def test_copies_what_pods_and_shim_need(self):
        copied = set()
        for keyword, args in _instructions(DOCKER / "Dockerfile.service"):
            if keyword == "COPY":
                sources = args.split()[:-1]
                for source in sources:
                    assert (PROJECT_ROOT / source).exists(), f"COPY {source}: no such path"
                    copied.add(source.rstrip("/"))
        needed = {
            "pyproject.toml",
            "Snakefile",
            "workflow",
            "stream_shim",
            "rules",
            "scripts",
            "config",
            "profiles",
            "envs",
        }
        assert needed <= copied, sorted(needed - copied)
        rules_scripts = {
            m for smk in (PROJECT_ROOT / "rules").glob("*.smk") for m in re.findall(r'"\.\./(\w+)/', smk.read_text())
        }
        assert rules_scripts <= copied, rules_scripts - copied

    def test_entrypoint_runs_modules(self):
        steps = dict(_instructions(DOCKER / "Dockerfile.service"))
        assert steps["ENTRYPOINT"] == '["python", "-m"]'
        assert steps["CMD"] == '["stream_shim", "--help"]'
        assert steps["USER"] == "prompt"


class TestContainersWorkflow:
    """Tests for ``.github/workflows/containers.yml``."""

    def test_runs_on_version_tags_only(self):
        on = _workflow().get("on", _workflow().get(True))  # YAML 1.1 reads a bare `on` as True
        assert on == {"push": {"tags": ["v*"]}}

    def test_image_names_match_the_k8s_profile(self):
        repository, tag = _profile_image()
        assert _workflow()["env"]["SERVICE_IMAGE"] == repository
        assert _workflow()["env"]["BASE_IMAGE"] == repository.replace("-service", "-base")
        assert tag == _project()["version"], (
            f"profiles/k8s/config.yaml runs image tag {tag}, but the version is {_project()['version']}"
        )

    def test_builds_both_dockerfiles_with_the_tag_version(self):
        steps = _workflow()["jobs"]["images"]["steps"]
        builds = {s["with"]["file"]: s["with"] for s in steps if s.get("uses", "").startswith("docker/build-push")}
        assert list(builds) == ["docker/Dockerfile.base", "docker/Dockerfile.service"]
        version = "${{ steps.version.outputs.version }}"
        assert builds["docker/Dockerfile.base"]["tags"] == "${{ env.BASE_IMAGE }}:" + version
        assert builds["docker/Dockerfile.service"]["tags"] == "${{ env.SERVICE_IMAGE }}:" + version
        assert f"BASE_IMAGE=${{{{ env.BASE_IMAGE }}}}:{version}" in builds["docker/Dockerfile.service"]["build-args"]
        check = next(s["run"] for s in steps if s.get("id") == "version")
        assert 'version="${GITHUB_REF_NAME#v}"' in check and "pyproject.toml" in check
