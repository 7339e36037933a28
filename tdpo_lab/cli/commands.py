"""The commands of ``tdpo-lab``: each takes the parsed arguments and returns an exit status."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

from tdpo_lab.config import Config, ConfigError, config_from_file, load_config
from tdpo_lab.course.chapters import (
    NOTEBOOKS,
    failed_cell,
    notebooks_dir,
    run_chapters,
    sweep_notebook,
)
from tdpo_lab.course.pool import plan_runs, train_pool
from tdpo_lab.methods import method_names, reads_knob
from tdpo_lab.runs.claims import write_claims
from tdpo_lab.runs.rundir import RunDir, run_name
from tdpo_lab.runs.store import pending, store_run, store_runs


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
    from tdpo_lab.runs.train import train

    cfg = build_config(args)
    run = RunDir(train(cfg, args.out or Path("runs") / run_name(cfg), progress=not args.quiet))
    print(
        f"results: {run.eval_path} (evaluations), {run.metrics_path} (every step), {run.policy_dir} (model)"
    )
    return 0


def write_results(root: Path, out: Path | None = None) -> Path:
    """Collect every run under ``root`` into results.csv / results.md and the two figures; return results.md."""
    import matplotlib

    matplotlib.use("Agg")
    from tdpo_lab.runs.plots import frontier_plot, seqkl_plot
    from tdpo_lab.runs.results import collect, results_markdown, summarise

    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    table = collect(root)
    if table.empty:
        raise SystemExit(f"no finished evaluations under {root}: nothing to collect")
    summary = summarise(table)
    table.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(results_markdown(summary))
    # runs on your own pairs without a reward model have no reward-vs-KL points: no frontier to draw
    if {"reward", "kl_seq"} <= set(table.columns) and table[["reward", "kl_seq"]].notna().all(axis=None):
        frontier_plot(table).savefig(out / "frontier.png", dpi=120, bbox_inches="tight")
    else:
        print("no reward in these runs (your own pairs without a reward model): no frontier.png")
    seqkl_plot(table).savefig(out / "seqkl.png", dpi=120, bbox_inches="tight")
    return out / "results.md"


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.notebook:
        return _sweep_notebook(args)
    root = Path(args.out)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(method_names())}")
    points = []
    for method, beta, seed in itertools.product(methods, _floats(args.betas), _ints(args.seeds)):
        alphas = _floats(args.alphas) if reads_knob(method, "alpha") else [None]
        for alpha in alphas:
            extra = {"method": method, "beta": beta, "seed": seed}
            if alpha is not None:
                extra["alpha"] = alpha
            points.append(build_config(args, **extra))

    failures = _train_missing(points, [root / run_name(c) for c in points], args)
    report = write_results(Path(args.store), root) if args.store else write_results(root)
    print(f"results table: {report} (and results.csv); figures: {root}/frontier.png, {root}/seqkl.png")
    for name, exc in failures:
        print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failures else 0


def cmd_frontier_study(args: argparse.Namespace) -> int:
    """The beta-grid frontier study (docs/results_tiny.md): train the grid, then its envelopes and verdicts."""
    from tdpo_lab.runs.study import (
        STUDY_FIXED,
        STUDY_GRID,
        grid_configs,
        parse_betas,
        study_configs,
        write_study,
    )

    root = Path(args.out)
    grid = parse_betas(args.betas)
    configs = study_configs(lambda **extra: build_config(args, **extra), grid, _ints(args.seeds))
    if (
        args.grid == "retrain"
    ):  # the retrained study of issue 18: study.STUDY_GRID, study.STUDY_FIXED (eval every 40 steps, test pairs)
        make = lambda **extra: build_config(args, **extra)  # noqa: E731
        configs = grid_configs(make, STUDY_GRID, _ints(args.seeds), **STUDY_FIXED)
        grid = {m: knobs["beta"] for m, knobs in STUDY_GRID.items()}
    failures = []
    outs = [root / run_name(c) for c in configs]
    if not args.collect_only:
        failures = _train_missing(configs, outs, args)
    source = Path(args.store) if args.store else root
    report = write_study(source, grid, Path(args.report) if args.report else root)
    print(f"frontier study: {report} (table, verdicts), figure beside it")
    try:  # the monotone frontiers and the claims' verdicts, with prompts in the error bars
        print(f"claims: {write_claims(source, report.parent)}")
    except ValueError as exc:  # runs made before per-prompt logging, or methods without a shared KL range
        print(f"claims.md not written: {exc}", file=sys.stderr)
    for name, exc in failures:
        print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failures else 0


def cmd_claims(args: argparse.Namespace) -> int:
    """Print (and write claims.md) the verdict of every claim from the runs or the store under ROOT."""
    path = write_claims(Path(args.root), Path(args.out) if args.out else None)
    print(path.read_text())
    return 0


def _train_missing(configs, outs, args: argparse.Namespace) -> list:
    """Train the runs not in ``--store`` yet, ``--jobs`` at a time, storing each as it finishes; the failures."""
    from tdpo_lab.runs.fanout import train_points

    todo, todo_outs = pending(configs, outs, args.store)  # runs stored already are done
    store = (lambda out: store_run(out, args.store)) if args.store else None
    failures = train_points(
        todo, todo_outs, jobs=args.jobs, progress=not args.quiet, plugins=args.plugin, on_finished=store
    )
    if args.store:  # and any finished earlier that a previous call did not store
        _store_finished(todo_outs, args.store)
    return failures


def _store_finished(outs, into) -> None:
    finished = [o for o in outs if RunDir(o).is_finished]
    for out in finished:
        store_run(out, into)
    print(f"stored {len(finished)} finished run(s) of {len(outs)} into {into}")


def cmd_store(args: argparse.Namespace) -> int:
    """Copy the summaries of the finished runs under each RUN_ROOT into the results store --into."""
    done = store_runs(args.roots, args.into)
    print(f"stored {len(done['stored'])} finished run(s) into {args.into}")
    if done["unfinished"]:
        shown = ", ".join(done["unfinished"][:5]) + (", ..." if len(done["unfinished"]) > 5 else "")
        print(f"left out {len(done['unfinished'])} unfinished run(s): {shown}", file=sys.stderr)
    return 0


def _sweep_notebook(args: argparse.Namespace) -> int:
    if not args.grid:
        raise ConfigError("--notebook needs --grid GRID.yaml (parameter name -> list of values)")
    root = Path(args.out)
    failures = sweep_notebook(
        Path(args.notebook), args.grid, root, profile=args.profile, fast=args.fast, quiet=args.quiet
    )
    try:
        report = write_results(root)
        print(f"results table: {report}")
    except SystemExit as exc:
        print(exc, file=sys.stderr)
    return 1 if failures else 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import time

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.notebooks) if args.notebooks else notebooks_dir()
    chapters = NOTEBOOKS if not args.notebooks else tuple(sorted(p.name for p in source.glob("*.ipynb")))
    names = [n for n in chapters if not args.only or any(n.startswith(p) for p in args.only.split(","))]
    missing = [n for n in names if not (source / n).exists()]
    if missing:
        raise FileNotFoundError(f"notebook(s) {missing} are missing from {source}")
    if args.publish and args.fast:
        raise ConfigError(
            "--publish writes the committed chapters: they carry full-profile outputs, not --fast ones"
        )
    from tdpo_lab.config import default_seeds

    seeds = (
        _ints(args.seeds) if args.seeds else default_seeds(load_config(args.profile, fast=bool(args.fast)))
    )
    params = {
        "profile": args.profile,
        "fast": bool(args.fast),
        "run_root": str(out / "runs"),
        "figures_dir": str(out / "figures"),
        "seeds": seeds,  # read by the chapters that average seeds (05, 08); the others train seed 0
        "train_jobs": args.jobs,  # runs a chapter trains side by side
    }
    if args.publish:  # plt.show() embeds a PNG only under the inline backend (CI and pytest set Agg)
        from tdpo_lab.course.publish import INLINE_BACKEND

        os.environ["MPLBACKEND"] = INLINE_BACKEND
    started_all = time.perf_counter()
    print(
        f"reproduce: {len(names)} notebooks into {out}, up to {args.jobs} at a time; seeds {seeds}",
        flush=True,
    )
    # every run the chapters train, as one pool first (tdpo_lab.course.pool): they then find their runs finished
    if args.pool:
        runs = plan_runs(
            [source / n for n in names],
            profile=args.profile,
            fast=bool(args.fast),
            seeds=seeds,
            run_root=out / "runs",
        )
        print(f"pool: {len(runs)} runs, {args.jobs} at a time, longest first", flush=True)
        failures = train_pool(runs, jobs=args.jobs, progress=not args.quiet)
        if failures:
            print(
                f"\nreproduce stopped: {len(failures)} run(s) of the pool failed: {failures}", file=sys.stderr
            )
            return 1
        print(f"pool trained in {(time.perf_counter() - started_all) / 60:.1f} min", flush=True)
    failed = run_chapters(source, names, out, params, args.jobs)
    if failed:
        for name in failed:
            print(
                f"\nreproduce stopped: {name} failed in {failed_cell(out / name)}\n"
                f"open {out / name} (and {out / (Path(name).stem + '.log')}) to see the traceback; fix it and "
                "run the same command again (finished stages are cached and are not redone)",
                file=sys.stderr,
            )
        return 1
    print(f"all notebooks executed in {(time.perf_counter() - started_all) / 60:.1f} min", flush=True)
    if args.publish:
        from tdpo_lab.course.publish import publish_all

        written = publish_all(out, names, source, profile=args.profile)
        print(f"published {len(written)} chapters into {source} (outputs, figures, provenance)")
    if (out / "runs").is_dir():
        report = write_results(out / "runs", out)
        print(
            f"executed notebooks: {out}\nresults table: {report}\nfigures: {out}/frontier.png, {out}/seqkl.png"
        )
    return 0


def cmd_export_pairs(args: argparse.Namespace) -> int:
    from tdpo_lab.products.export_pairs import boundary_count, export_pairs

    cfg = build_config(args)
    ds = export_pairs(cfg, args.out, push_to_hub=args.push_to_hub, progress=not args.quiet)
    where = f" and pushed to the hub as {args.push_to_hub!r}" if args.push_to_hub else ""
    train, test = ds["train"], ds["test"]
    print(
        f"{train.num_rows + test.num_rows} pairs written to {args.out}{where}: datasets.load_from_disk({args.out!r}) "
        f"-> splits train ({train.num_rows}) and test ({test.num_rows}, held out); columns {train.column_names}"
    )
    inside = boundary_count(train)
    print(
        f"{inside} of {train.num_rows} training pairs ({100 * inside / max(train.num_rows, 1):.1f}%) have a prompt "
        "that ends inside a word (no space before the response): TRL tokenises prompt + response as one text "
        "and scores those differently from the kit (README, Coming from TRL)"
    )
    return 0


def cmd_exercises(args: argparse.Namespace) -> int:
    from tdpo_lab.course.exercises import write_exercises

    source = Path(args.notebooks) if args.notebooks else notebooks_dir()
    out = Path(args.out) if args.out else source.parent / "exercises"
    counts = write_exercises(source, out)
    for name, n in counts.items():
        print(f"{out / name}: {n} exercise(s)")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    report = write_results(Path(args.root), Path(args.out) if args.out else None)
    print(report.read_text())
    return 0
