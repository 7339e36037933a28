"""No graded exercise's answer appears, renamed, in another chapter's visible code.

tests/test_exercises.py compares lines as text, which a renamed variable defeats (``beta * u_prime`` in chapter 03
against ``row_sums`` in chapter 04). Here code is compared by its syntax tree with every local identifier
replaced by one placeholder: names, arguments, function names and attributes of locals (``cfg.beta`` and
``beta`` read the same), while imported names (``torch``, ``F.logsigmoid``, ``preference_loss``), called
method names (``.sum``, ``.gather``), keyword names and constants stay. A solution region leaks when, in the
code a student sees of any OTHER chapter (code cells with their solution regions removed, and ```python blocks
of the markdown, such as worked answers), one finds

- one of its statements of at least ``MIN_STATEMENT`` syntax nodes,
- two of its consecutive statements, or
- one of its expressions of at least ``MIN_EXPRESSION`` nodes (the formula inside a ``torch.where``, ...).
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import nbformat
import pytest

from tdpo_lab.course.exercises import BEGIN, END, strip_solutions

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MIN_STATEMENT = 7  # `u = a * (b + c)` and larger; smaller single statements are too common to mean anything
MIN_EXPRESSION = 11  # `(p.exp() * (p - q)).sum(-1)` and larger
PLACEHOLDER = "_"
_FENCE = re.compile(r"```python\n(.*?)```", re.S)
# Idioms every chapter from 04 on shows on purpose; matching one alone is no leak (a window of an idiom and the
# statement after it still is). Each is one statement a solution may contain.
IDIOMS = (
    "chosen, rejected = rows[:B], rows[B:]",  # the batch layout: chosen rows, then rejected rows
    "margin = rows[:B] - rows[B:]",  # chosen minus rejected, per pair
    "row_sums = torch.where(mask, values, 0.0).sum(-1)",  # a masked sum over the response
    "with torch.no_grad():\n    ref_logits = reference(**forward).logits",  # pi_ref is never trained
)
_FORMULA = (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Subscript)
_SIMPLE = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return)


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


class _Rename(ast.NodeTransformer):
    """Every local identifier becomes the placeholder; imported names, called attributes and keywords stay."""

    def __init__(self, keep: set[str]):
        self.keep = keep

    def visit_Name(self, node):
        return node if node.id in self.keep else ast.copy_location(ast.Name(PLACEHOLDER, node.ctx), node)

    def visit_arg(self, node):
        node.arg, node.annotation = PLACEHOLDER, None
        return node

    def visit_FunctionDef(self, node):
        node.name, node.returns, node.decorator_list = PLACEHOLDER, None, []
        node.body = [s for s in node.body if not _is_docstring(s)] or [ast.Pass()]
        self.generic_visit(node)
        return node

    def visit_Call(self, node):
        if isinstance(
            node.func, ast.Attribute
        ):  # a method call keeps its name: x.sum(-1), F.log_softmax(...)
            node.func.value = self.visit(node.func.value)
        else:
            node.func = self.visit(node.func)
        node.args = [self.visit(a) for a in node.args]
        node.keywords = [self.visit(k) for k in node.keywords]
        return node

    def visit_Attribute(self, node):  # not called: cfg.beta, stats.logps read like a local name
        base = node.value
        while isinstance(base, ast.Attribute):
            base = base.value
        if isinstance(base, ast.Name) and base.id in self.keep:
            return node  # torch.float64, F.softmax
        return ast.copy_location(ast.Name(PLACEHOLDER, node.ctx), node)


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _parse(code: str) -> ast.Module | None:
    code = "\n".join(line for line in code.split("\n") if not line.lstrip().startswith(("%", "!")))
    try:
        return ast.parse(textwrap.dedent(code))
    except SyntaxError:  # a region inside a function body (a `return`, ...): parse it as one
        try:
            return ast.parse("def _f():\n" + textwrap.indent(textwrap.dedent(code), "    "))
        except SyntaxError:
            return None


def _size(node: ast.AST) -> int:
    # statements and expressions only: contexts (Load, Store) and operators would inflate every count
    return sum(isinstance(n, (ast.stmt, ast.expr)) for n in ast.walk(node))


def fingerprints(tree: ast.Module, keep: set[str]) -> dict[str, set[str]]:
    """The renamed dumps of ``tree``: large statements, pairs of consecutive statements, large expressions."""
    tree = _Rename(keep).visit(tree)
    statements, windows, expressions = set(), set(), set()
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list):  # IfExp and Lambda have an expression as their body
                continue
            body = [s for s in body if isinstance(s, ast.stmt) and not _is_docstring(s)]
            windows.update(
                ast.dump(ast.Module(body=list(p), type_ignores=[])) for p in zip(body, body[1:], strict=False)
            )
        if (  # a simple statement that computes something (a bare API call such as torch.arange(n) is no answer)
            isinstance(node, _SIMPLE)
            and _size(node) >= MIN_STATEMENT
            and any(isinstance(n, _FORMULA) for n in ast.walk(node))
        ):
            statements.add(ast.dump(node))
        if isinstance(node, ast.expr) and _size(node) >= MIN_EXPRESSION:
            expressions.add(ast.dump(node))
    return {"statement": statements, "window": windows, "expression": expressions}


def _regions(source: str) -> list[str]:
    regions, current = [], None
    for line in source.split("\n"):
        if line.strip() == BEGIN:
            current = []
        elif line.strip() == END:
            regions.append("\n".join(current or []))
            current = None
        elif current is not None:
            current.append(line)
    return regions


def chapter_code(path: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(solution regions, code a student sees), each as (where, code)."""
    nb = nbformat.read(path, as_version=4)
    solutions, visible = [], []
    for i, cell in enumerate(nb.cells):
        where = f"{path.name} cell {i}"
        if cell.cell_type == "code":
            solutions += [(where, region) for region in _regions(cell.source)]
            visible.append((where, strip_solutions(cell.source, where)[0]))
        elif cell.cell_type == "markdown":
            visible += [(where + " (markdown)", block) for block in _FENCE.findall(cell.source)]
    return solutions, visible


def find_leaks(chapters: list[Path]) -> list[str]:
    """One line per (solution region, other chapter's code) that shares a statement, window or expression."""
    code = {path: chapter_code(path) for path in chapters}
    trees = {
        (path, where): tree
        for path, (sols, vis) in code.items()
        for where, text in sols + vis
        if (tree := _parse(text)) is not None
    }
    keep = set().union(*(_imported(t) for t in trees.values()))
    seen = {
        (path, where): fingerprints(trees[(path, where)], keep)
        for path, (_, vis) in code.items()
        for where, _ in vis
        if (path, where) in trees
    }
    idioms = set().union(*(fingerprints(ast.parse(i), keep)["statement"] for i in IDIOMS))
    idioms |= {ast.dump(_Rename(keep).visit(ast.parse(i)).body[0]) for i in IDIOMS}
    leaks = []
    for path, (sols, _) in code.items():
        for where, text in sols:
            if (path, where) not in trees:
                continue
            mine = fingerprints(_parse(text), keep)
            mine["statement"] -= idioms
            for (other, other_where), theirs in seen.items():
                if other == path:
                    continue
                for kind in ("window", "statement", "expression"):
                    if common := mine[kind] & theirs[kind]:
                        leaks.append(
                            f"{where}'s solution: a {kind} shows in {other_where} ({min(common)[:160]})"
                        )
                        break
    return leaks


def test_renaming_sees_through_other_names():
    keep = {"F", "torch"}
    a = fingerprints(ast.parse("row_sums = (stats.logps - stats.ref_logps).sum(-1)"), keep)["statement"]
    b = fingerprints(ast.parse("ratio = (s.logps - s.ref_logps).sum(-1)"), keep)["statement"]
    c = fingerprints(ast.parse("ratio = (s.logps + s.ref_logps).sum(-1)"), keep)["statement"]
    assert a == b and a != c
    e1 = fingerprints(ast.parse("k = torch.where(m, (lq.exp() * (lq - lp)).sum(-1), 0.0)"), keep)[
        "expression"
    ]
    e2 = fingerprints(ast.parse("def kl(a, b):\n    return (a.exp() * (a - b)).sum(-1)"), keep)["expression"]
    assert e1 & e2
    w1 = fingerprints(ast.parse("u = r[:B] - r[B:]\nloss = -F.logsigmoid(beta * u)"), keep)["window"]
    w2 = fingerprints(ast.parse("h = x[:n] - x[n:]\nmine = -F.logsigmoid(cfg.beta * h)"), keep)["window"]
    assert w1 & w2


def test_a_planted_leak_is_found(tmp_path):
    def notebook(name, *sources):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
        nbformat.write(nb, tmp_path / name)
        return tmp_path / name

    exercise = notebook(
        "04_a.ipynb",
        "import torch.nn.functional as F",
        f"{BEGIN}\nrow_sums = (stats.logps - stats.ref_logps).sum(-1)\n"
        f"mine = -F.logsigmoid(cfg.beta * (row_sums[:B] - row_sums[B:]))\n{END}",
    )
    clean = notebook("03_b.ipynb", "import torch\nx = torch.zeros(3)\ny = x.sum()")
    assert find_leaks([exercise, clean]) == []
    leaky = notebook("03_c.ipynb", "ratio = (out.logps - out.ref_logps).sum(-1)\nprint(ratio)")
    assert any("03_c.ipynb cell 0" in leak for leak in find_leaks([exercise, leaky]))


@pytest.mark.skipif(not CHAPTERS, reason="no chapters")
def test_no_solution_shows_in_another_chapter():
    leaks = find_leaks(CHAPTERS)
    assert not leaks, f"{len(leaks)} solution region(s) show elsewhere:\n" + "\n".join(leaks)
