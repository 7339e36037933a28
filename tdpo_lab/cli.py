"""The ``tdpo-lab`` command line: run one experiment, sweep a grid, reproduce the notebooks, collect results.

    tdpo-lab run --profile tiny --method tdpo2 --beta 0.1 --alpha 0.5 --seed 0 --out runs/tdpo2
    tdpo-lab sweep --methods dpo,tdpo2 --betas 0.1,0.5 --alphas 0.5 --seeds 0,1 --out runs/sweep
    tdpo-lab sweep --notebook notebooks/05_tdpo.ipynb --grid grid.yaml --out runs/nb-sweep
    tdpo-lab reproduce --profile tiny --out reproduce
    tdpo-lab collect runs/sweep

Every stage that is cached already (tokenizer, SFT model, pairs, AttentionPO weights) is reused.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from pathlib import Path

from tdpo_lab.config import METHODS, PROFILES, Config, ConfigError, config_from_file, load_config
from tdpo_lab.runs import ALPHA_METHODS, run_name

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


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_config(args: argparse.Namespace, **extra) -> Config:
    """Config from --config (a recipe file), --profile, --fast, explicit flags and --set KEY=VALUE."""
    overrides = _overrides(getattr(args, "set", None))
    for name in ("method", "beta", "alpha", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    overrides.update(extra)
    fast = True if getattr(args, "fast", False) else None
    if getattr(args, "config", None):
        return config_from_file(
            args.config, profile=args.profile, **({"fast": fast} if fast else {}), **overrides
        )
    return load_config(args.profile, fast=fast, **overrides)


# --- commands ---------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from tdpo_lab.train import train

    cfg = build_config(args)
    out = Path(args.out) if args.out else Path("runs") / run_name(cfg)
    train(cfg, out, progress=not args.quiet)
    print(f"results: {out}/eval.jsonl (evaluations), {out}/metrics.jsonl (every step), {out}/policy (model)")
    return 0


def write_results(root: Path, out: Path | None = None) -> Path:
    """Collect every run under ``root`` into results.csv / results.md and the two figures; return results.md."""
    import matplotlib

    matplotlib.use("Agg")
    from tdpo_lab.runs import collect, frontier_plot, results_markdown, seqkl_plot, summarise

    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    table = collect(root)
    if table.empty:
        raise SystemExit(f"no finished evaluations under {root}: nothing to collect")
    summary = summarise(table)
    table.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(results_markdown(summary))
    frontier_plot(table).savefig(out / "frontier.png", dpi=120, bbox_inches="tight")
    seqkl_plot(table).savefig(out / "seqkl.png", dpi=120, bbox_inches="tight")
    return out / "results.md"


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.notebook:
        return _sweep_notebook(args)
    from tdpo_lab.train import train

    root = Path(args.out)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    points = []
    for method, beta, seed in itertools.product(methods, _floats(args.betas), _ints(args.seeds)):
        alphas = _floats(args.alphas) if method in ALPHA_METHODS else [None]
        for alpha in alphas:
            extra = {"method": method, "beta": beta, "seed": seed}
            if alpha is not None:
                extra["alpha"] = alpha
            points.append(build_config(args, **extra))
    failures = []
    for i, cfg in enumerate(points, 1):
        name = run_name(cfg)
        print(f"[{i}/{len(points)}] {name}", flush=True)
        try:
            train(cfg, root / name, progress=not args.quiet)
        except Exception as exc:  # one failing point must not stop the others
            failures.append((name, exc))
            traceback.print_exc()
    report = write_results(root)
    print(f"results table: {report} (and results.csv); figures: {root}/frontier.png, {root}/seqkl.png")
    for name, exc in failures:
        print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failures else 0


def _grid_points(grid_path: str) -> list[dict]:
    """A grid file maps parameter names to a value or a list of values; the product is the sweep."""
    import yaml

    grid = yaml.safe_load(Path(grid_path).read_text()) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{grid_path}: a grid is a mapping of notebook parameters to lists of values")
    keys = list(grid)
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def _sweep_notebook(args: argparse.Namespace) -> int:
    import papermill as pm

    if not args.grid:
        raise ConfigError("--notebook needs --grid GRID.yaml (parameter name -> list of values)")
    root = Path(args.out)
    notebook = Path(args.notebook)
    declared = _notebook_parameters(notebook)
    failures = []
    points = _grid_points(args.grid)
    for i, params in enumerate(points, 1):
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ConfigError(
                f"grid parameter(s) {unknown} are not in the parameters cell of {notebook} "
                f"(it has {sorted(declared)})"
            )
        name = "_".join(f"{k}{v}" for k, v in params.items()) or "default"
        point_dir = root / name
        extra = {
            "run_dir": str(point_dir / "run"),
            "profile": args.profile,
            **({"fast": True} if args.fast else {}),
        }
        params = {**{k: v for k, v in extra.items() if k in declared}, **params}
        done = point_dir / "run" / "policy" / "config.json"
        if done.exists():
            print(f"[{i}/{len(points)}] {name}: done already, skipped")
            continue
        print(f"[{i}/{len(points)}] {name}", flush=True)
        point_dir.mkdir(parents=True, exist_ok=True)
        try:
            pm.execute_notebook(
                str(notebook),
                str(point_dir / notebook.name),
                parameters=params,
                progress_bar=not args.quiet,
                kernel_name="python3",
            )
        except Exception as exc:
            failures.append((name, exc))
            print(
                f"FAILED {name}: {_failed_cell(point_dir / notebook.name)} ({type(exc).__name__})",
                file=sys.stderr,
            )
    try:
        report = write_results(root)
        print(f"results table: {report}")
    except SystemExit as exc:
        print(exc, file=sys.stderr)
    return 1 if failures else 0


def _notebook_parameters(path: Path) -> dict:
    import papermill as pm

    return pm.inspect_notebook(str(path))


def notebooks_dir() -> Path:
    """The notebooks folder: beside the installed package (editable install) or the current checkout."""
    here = Path(__file__).resolve().parent.parent / "notebooks"
    if here.is_dir():
        return here
    local = Path.cwd() / "notebooks"
    if local.is_dir():
        return local
    raise FileNotFoundError("cannot find the notebooks/ folder: run from a checkout of tdpo-lab")


# What each chapter needs from the ones before it (the caches make any order correct; this order lets
# independent chapters run side by side without training the same thing twice).
CHAPTER_NEEDS = {
    "00": (),
    "01": ("00",),
    "02": ("01",),
    "03": (),
    "04": ("02",),
    "05": ("04",),
    "06": ("02",),
    "07": ("06",),
    "08": ("05", "07"),
}


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


def _failed_cell(path: Path) -> str:
    """'cell [k] raised Name: message' from an executed notebook's first error output."""
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


def cmd_reproduce(args: argparse.Namespace) -> int:
    import subprocess
    import time

    import yaml

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.notebooks) if args.notebooks else notebooks_dir()
    chapters = NOTEBOOKS if not args.notebooks else tuple(sorted(p.name for p in source.glob("*.ipynb")))
    names = [n for n in chapters if not args.only or any(n.startswith(p) for p in args.only.split(","))]
    missing = [n for n in names if not (source / n).exists()]
    if missing:
        raise FileNotFoundError(f"notebook(s) {missing} are missing from {source}")
    params = {
        "profile": args.profile,
        "fast": bool(args.fast),
        "run_root": str(out / "runs"),
        "figures_dir": str(out / "figures"),
    }
    needs, done, running, failed = _needs(names), set(), {}, []
    started_all = time.perf_counter()
    print(f"reproduce: {len(names)} notebooks into {out}, up to {args.jobs} at a time", flush=True)
    while len(done) + len(failed) < len(names):
        ready = [
            n
            for n in names
            if n not in done and n not in running and n not in failed and all(d in done for d in needs[n])
        ]
        while ready and len(running) < args.jobs and not failed:
            name = ready.pop(0)
            declared = _notebook_parameters(source / name)
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
    if failed:
        for name in failed:
            print(
                f"\nreproduce stopped: {name} failed in {_failed_cell(out / name)}\n"
                f"open {out / name} (and {out / (Path(name).stem + '.log')}) to see the traceback; fix it and "
                "run the same command again (finished stages are cached and are not redone)",
                file=sys.stderr,
            )
        return 1
    print(f"all notebooks executed in {(time.perf_counter() - started_all) / 60:.1f} min", flush=True)
    if (out / "runs").is_dir():
        report = write_results(out / "runs", out)
        print(
            f"executed notebooks: {out}\nresults table: {report}\nfigures: {out}/frontier.png, {out}/seqkl.png"
        )
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    report = write_results(Path(args.root), Path(args.out) if args.out else None)
    print(report.read_text())
    return 0


# --- parser -------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile", default="tiny", choices=PROFILES, help="tiny (offline default) or gpt2 (hub, GPU)"
    )
    p.add_argument("--fast", action="store_true", help="shrink every size (as TDPO_LAB_FAST=1)")
    p.add_argument("--config", help="a recipe file (YAML) of config keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdpo-lab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train and evaluate one method (every missing stage first)")
    _common(p)
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--beta", type=float)
    p.add_argument("--alpha", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run folder (default runs/<method>_beta<b>[_alpha<a>]_seed<s>)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep", help="a grid of methods x betas (x alphas) x seeds, or a notebook over a grid"
    )
    _common(p)
    p.add_argument("--methods", default="dpo,tdpo1,tdpo2,attnpo,tidpo")
    p.add_argument("--betas", default="0.1")
    p.add_argument("--alphas", default="0.5", help="for tdpo2 and tidpo (tdpo1 has no alpha)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--notebook", help="execute this chapter once per grid point with papermill")
    p.add_argument("--grid", help="YAML mapping of notebook parameters to lists of values")
    p.add_argument("--out", default="runs/sweep")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("reproduce", help="the main job: execute every notebook in order into --out")
    p.add_argument("--profile", default="tiny", choices=PROFILES)
    p.add_argument("--fast", action="store_true", help="the small CI configuration")
    p.add_argument("--out", default="reproduce")
    p.add_argument("--only", help="comma-separated notebook number prefixes, e.g. 00,01")
    p.add_argument("--notebooks", help="folder of the chapters (default: the checkout's notebooks/)")
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="chapters run side by side when they do not depend on each other (each uses one thread)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("collect", help="collect the runs under ROOT into a results table and figures")
    p.add_argument("root")
    p.add_argument("--out")
    p.set_defaults(func=cmd_collect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        parser.exit(2, f"tdpo-lab: error: {exc}\n")
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
