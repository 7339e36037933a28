"""The package's shape: layer contracts (import-linter), no kit import hidden in a function, small modules, and
chapters that use only the public places of each layer."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tdpo_lab"
MAX_LINES = 400
# the command line may load its command modules on use (start-up time); nothing else may
LAZY_IMPORTS_ALLOWED = {"tdpo_lab/cli/__init__.py", "tdpo_lab/cli/commands.py"}
PUBLIC = {
    "tdpo_lab",
    "tdpo_lab.core",
    "tdpo_lab.methods",
    "tdpo_lab.cache",
    "tdpo_lab.products",
    "tdpo_lab.runs",
    "tdpo_lab.course",
}
GRADING = re.compile(r"^tdpo_lab\.course\.grading\.ch\d\d$")  # one checker module per chapter


def function_level_kit_imports(source: str, filename: str = "<source>") -> list[str]:
    """``file:line`` of every ``tdpo_lab`` import inside a function or method of ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom):
                names = [inner.module or ""] if not inner.level else ["tdpo_lab (relative)"]
            elif isinstance(inner, ast.Import):
                names = [alias.name for alias in inner.names]
            else:
                continue
            if any(name.split(".")[0] == "tdpo_lab" or name.startswith("tdpo_lab ") for name in names):
                found.append(f"{filename}:{inner.lineno} in {node.name}()")
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_layer_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("lint-imports not found: install the dev extra (pip install -e '.[dev]')")
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and " 0 broken" in result.stdout


def test_no_kit_module_is_imported_inside_a_function():
    found = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel not in LAZY_IMPORTS_ALLOWED:
            found += function_level_kit_imports(path.read_text(), rel)
    assert not found, "kit modules imported inside functions (move them to the top):\n" + "\n".join(found)


def test_the_lazy_import_check_catches_one():
    source = "import torch\n\ndef f():\n    import torch.nn\n    from tdpo_lab.runs import train\n    return train\n"
    assert function_level_kit_imports(source, "x.py") == ["x.py:5 in f()"]
    assert function_level_kit_imports("def g():\n    from . import sibling\n", "y.py") == ["y.py:2 in g()"]


def test_no_module_is_over_400_lines():
    long = {
        p.relative_to(ROOT).as_posix(): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_config_imports_nothing_from_the_package():
    outside = []  # the config package's modules may import each other, nothing else of the kit
    for path in sorted((PACKAGE / "config").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if not node.level else ["(relative)"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            outside += [
                f"{path.name}:{node.lineno} {n}"
                for n in names
                if n.startswith("tdpo_lab") and not n.startswith("tdpo_lab.config")
            ]
    assert outside == []


def notebook_imports(path: Path) -> set[str]:
    """The ``tdpo_lab`` modules a notebook's code cells import from."""
    modules = set()
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        source = "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tdpo_lab"):
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules |= {a.name for a in node.names if a.name.startswith("tdpo_lab")}
    return modules


def _internal(modules: set[str]) -> set[str]:
    return {m for m in modules if m not in PUBLIC and not GRADING.match(m)}


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "exercises").glob("*.ipynb")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_chapters_import_only_the_public_places(path):
    internal = _internal(notebook_imports(path))
    assert not internal, f"{path.name} imports internal modules {sorted(internal)}; use {sorted(PUBLIC)}"


def test_the_public_import_check_catches_an_internal_module():
    assert _internal({"tdpo_lab.methods.attnpo_judge", "tdpo_lab.runs", "tdpo_lab.course.grading.ch04"}) == {
        "tdpo_lab.methods.attnpo_judge"
    }


def test_readme_examples_import_only_the_public_places():
    modules = set(re.findall(r"from (tdpo_lab[\w.]*) import", (ROOT / "README.md").read_text()))
    internal = {m for m in _internal(modules) if not m.startswith("tdpo_lab.integrations")}
    assert not internal, f"README imports internal modules {sorted(internal)}"
