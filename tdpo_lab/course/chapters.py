"""The notebook chapters as jobs: which there are, what each needs first, and executing them with papermill.

Two commands of :mod:`tdpo_lab.cli` execute chapters: ``tdpo-lab reproduce`` runs them all in dependency
order, side by side where they are independent (:func:`run_chapters`), and ``tdpo-lab sweep --notebook``
runs one chapter once per point of a parameter grid (:func:`sweep_notebook`). Both hand the chapters their
run folders through the parameters cell, so every result lands in run folders that ``collect`` reads.

Executing notebooks needs the ``[notebooks]`` extra (papermill, nbformat, ipykernel); the core install
leaves it out so that a notebook runtime such as Colab keeps its own Jupyter stack. Every function here that
needs it says so with :class:`NotebookToolsMissing` before it starts.
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
import time
from pathlib import Path

from tdpo_lab.config import ConfigError
from tdpo_lab.course.schedule import chapter_needs
from tdpo_lab.runs.rundir import RunDir

NOTEBOOKS = (
    "00_setup_and_data.ipynb",
    "01_sft_reference.ipynb",
    "02_preference_pairs.ipynb",
    "03_bradley_terry_token_reward.ipynb",
    "04_dpo_baseline.ipynb",
    "05_tdpo.ipynb",
    "06_ti_dpo.ipynb",
    "07_attention_po.ipynb",
    "08_frontier_and_results.ipynb",
)

# What each chapter needs from the ones before it (the caches make any order correct; this order lets
# independent chapters run side by side without training the same thing twice).
CHAPTER_NEEDS = chapter_needs()  # derived from what each chapter builds and uses (tdpo_lab.cache.plan)


# papermill's options that stream a running chapter's cell outputs (stdout as INFO, stderr as WARNING lines)
# to its own stderr, which run_chapters sends to the chapter's .log file.
CHAPTER_LOG_OPTIONS = ("--log-output", "--log-level", "INFO")

# What executing a chapter imports: the [notebooks] extra.
NOTEBOOK_TOOLS = ("papermill", "nbformat", "ipykernel")
INSTALL_NOTEBOOK_TOOLS = 'pip install "tdpo-lab[notebooks]"'


class NotebookToolsMissing(ImportError):
    """The notebook tooling (the ``[notebooks]`` extra) is not installed; the message says how to add it."""


def require_notebook_tools(what: str, modules: tuple[str, ...] = NOTEBOOK_TOOLS) -> None:
    """Raise :class:`NotebookToolsMissing` naming ``what`` and the install command if any of ``modules`` is absent."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise NotebookToolsMissing(
            f"{what} needs {', '.join(missing)}, which the core install of tdpo-lab leaves out; install the "
            f"notebook tooling with: {INSTALL_NOTEBOOK_TOOLS}"
        )


def notebooks_dir() -> Path:
    """The notebooks folder: beside the installed package (editable install) or the current checkout."""
    here = Path(__file__).resolve().parents[2] / "notebooks"
    if here.is_dir():
        return here
    local = Path.cwd() / "notebooks"
    if local.is_dir():
        return local
    raise FileNotFoundError("cannot find the notebooks/ folder: run from a checkout of tdpo-lab")


def notebook_parameters(path: Path) -> dict:
    """The names (and defaults) of a notebook's ``parameters`` cell, as papermill reads them."""
    require_notebook_tools("reading a chapter's parameters", ("papermill",))
    import papermill as pm

    return pm.inspect_notebook(str(path))


def failed_cell(path: Path) -> str:
    """'cell [k] raised Name: message' from an executed notebook's first error output."""
    require_notebook_tools("reading an executed chapter", ("nbformat",))
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # noqa: BLE001 - the notebook may not have been written at all
        return "a cell (the output notebook could not be read)"
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell [{cell.get('execution_count')}] raised {output.get('ename')}: {output.get('evalue')}"
    return "a cell (no error output was recorded)"


# --- one chapter over a grid ---------------------------------------------------------------------------


def grid_points(grid_path: str) -> list[dict]:
    """A grid file maps parameter names to a value or a list of values; the product is the sweep."""
    import yaml

    grid = yaml.safe_load(Path(grid_path).read_text()) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{grid_path}: a grid is a mapping of notebook parameters to lists of values")
    keys = list(grid)
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def sweep_notebook(
    notebook: Path, grid: str, root: Path, *, profile: str, fast: bool, quiet: bool
) -> list[tuple[str, Exception]]:
    """Execute ``notebook`` once per point of ``grid`` into ``root/<point>/``; return the failed points.

    Each point's run folder is ``root/<point>/run`` (passed as ``run_dir`` when the notebook declares it);
    a point whose run is finished already is skipped, and a failing point does not stop the others. A grid
    parameter the notebook does not declare is a :class:`ConfigError`.
    """
    require_notebook_tools("tdpo-lab sweep --notebook")
    import papermill as pm

    declared = notebook_parameters(notebook)
    failures = []
    points = grid_points(grid)
    for i, params in enumerate(points, 1):
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ConfigError(
                f"grid parameter(s) {unknown} are not in the parameters cell of {notebook} "
                f"(it has {sorted(declared)})"
            )
        name = "_".join(f"{k}{v}" for k, v in params.items()) or "default"
        point_dir = root / name
        run = RunDir(point_dir / "run")
        extra = {"run_dir": str(run.path), "profile": profile, **({"fast": True} if fast else {})}
        params = {**{k: v for k, v in extra.items() if k in declared}, **params}
        if run.is_finished:
            print(f"[{i}/{len(points)}] {name}: done already, skipped")
            continue
        print(f"[{i}/{len(points)}] {name}", flush=True)
        point_dir.mkdir(parents=True, exist_ok=True)
        try:
            pm.execute_notebook(
                str(notebook),
                str(point_dir / notebook.name),
                parameters=params,
                progress_bar=not quiet,
                kernel_name="python3",
            )
        except Exception as exc:
            failures.append((name, exc))
            print(
                f"FAILED {name}: {failed_cell(point_dir / notebook.name)} ({type(exc).__name__})",
                file=sys.stderr,
            )
    return failures


# --- every chapter, in dependency order ----------------------------------------------------------------


def _needs(names: list[str]) -> dict[str, list[str]]:
    """Dependencies among the selected notebooks; a chapter the table does not know follows the previous one."""
    by_number = {n[:2]: n for n in names}
    needs = {}
    for i, name in enumerate(names):
        known = CHAPTER_NEEDS.get(name[:2])
        if known is None or name not in NOTEBOOKS:
            needs[name] = names[i - 1 : i]
        else:
            needs[name] = [by_number[k] for k in known if k in by_number]
    return needs


def run_chapters(source: Path, names: list[str], out: Path, params: dict, jobs: int) -> list[str]:
    """Execute the chapters ``names`` of folder ``source`` into ``out``; return those that failed.

    Each runs in its own ``papermill`` process (``--cwd out``) with the
    entries of ``params`` its parameters cell declares, once every chapter it needs (:data:`CHAPTER_NEEDS`)
    has finished, at most ``jobs`` at a time. After a failure nothing new starts: later chapters would only
    fail on the missing result or redo its work.

    The log ``out/<chapter>.log`` grows while the chapter runs (:data:`CHAPTER_LOG_OPTIONS`): papermill's
    "Executing Cell k" / "Ending Cell k" lines and every output of every cell as it arrives, so
    ``tail -f out/05_tdpo.log`` follows a chapter. Progress bars drawn as notebook widgets (tqdm with
    ipywidgets installed) show there once, as they start; the executed notebook holds their final state.
    """
    import yaml

    require_notebook_tools("executing the chapters (tdpo-lab reproduce)")

    needs, done, running, failed = _needs(names), set(), {}, []
    while len(done) + len(failed) < len(names):
        ready = [
            n
            for n in names
            if n not in done and n not in running and n not in failed and all(d in done for d in needs[n])
        ]
        while ready and len(running) < jobs and not failed:
            name = ready.pop(0)
            declared = notebook_parameters(source / name)
            given = {k: v for k, v in params.items() if k in declared}
            command = [
                sys.executable,
                "-m",
                "papermill",
                str(source / name),
                str(out / name),
                "-y",
                yaml.safe_dump(given),
                "-k",
                "python3",
                "--cwd",
                str(out),
                "--no-progress-bar",
                *CHAPTER_LOG_OPTIONS,
            ]
            log = open(out / f"{Path(name).stem}.log", "w")  # noqa: SIM115 - closed when the process ends
            running[name] = (
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
                time.perf_counter(),
                log,
            )
            print(f"  started  {name}", flush=True)
        if not running:
            break  # a failure left the rest waiting on it
        time.sleep(1.0)
        for name, (proc, started, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            minutes = (time.perf_counter() - started) / 60
            if proc.returncode == 0:
                done.add(name)
                print(f"  finished {name} in {minutes:.1f} min", flush=True)
            else:
                failed.append(name)
                print(f"  FAILED   {name} after {minutes:.1f} min", flush=True)
    return failed
