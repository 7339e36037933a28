"""The ``tdpo-lab`` command line: run one experiment, sweep a grid, reproduce the notebooks, collect results.

    tdpo-lab run --profile tiny --method tdpo2 --beta 0.1 --alpha 0.5 --seed 0 --out runs/tdpo2
    tdpo-lab sweep --methods dpo,tdpo2 --betas 0.1,0.5 --alphas 0.5 --seeds 0,1 --out runs/sweep
    tdpo-lab sweep --notebook notebooks/05_tdpo.ipynb --grid grid.yaml --out runs/nb-sweep
    tdpo-lab frontier-study --profile tiny --seeds 0,1,2 --jobs 2 --out runs/frontier
    tdpo-lab reproduce --profile tiny --out reproduce
    tdpo-lab collect runs/sweep
    tdpo-lab run --method tdpo2 --set pairs=my_pairs.jsonl          # your own preference data
    tdpo-lab export-pairs --profile tiny --out pairs_tiny              # the kit's pairs as a datasets.Dataset

Every stage that is cached already (tokenizer, SFT model, pairs, AttentionPO weights) is reused. The
commands that execute notebooks (``reproduce``, ``sweep --notebook``) leave that to :mod:`tdpo_lab.chapters`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

from tdpo_lab.chapters import (
    NOTEBOOKS,
    NotebookToolsMissing,
    failed_cell,
    notebooks_dir,
    run_chapters,
    sweep_notebook,
)
from tdpo_lab.config import PROFILES, Config, ConfigError, config_from_file, load_config
from tdpo_lab.data import DataError
from tdpo_lab.methods import method_names, reads_knob
from tdpo_lab.pool import plan_runs, train_pool
from tdpo_lab.rundir import RunDir, run_name


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
    run = RunDir(train(cfg, args.out or Path("runs") / run_name(cfg), progress=not args.quiet))
    print(
        f"results: {run.eval_path} (evaluations), {run.metrics_path} (every step), {run.policy_dir} (model)"
    )
    return 0


def write_results(root: Path, out: Path | None = None) -> Path:
    """Collect every run under ``root`` into results.csv / results.md and the two figures; return results.md."""
    import matplotlib

    matplotlib.use("Agg")
    from tdpo_lab.plots import frontier_plot, seqkl_plot
    from tdpo_lab.results import collect, results_markdown, summarise

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
    from tdpo_lab.fanout import train_points

    failures = train_points(
        points, [root / run_name(c) for c in points], jobs=args.jobs, progress=not args.quiet
    )
    report = write_results(root)
    print(f"results table: {report} (and results.csv); figures: {root}/frontier.png, {root}/seqkl.png")
    for name, exc in failures:
        print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failures else 0


def cmd_frontier_study(args: argparse.Namespace) -> int:
    """The beta-grid frontier study (docs/results_tiny.md): train the grid, then its envelopes and verdicts."""
    from tdpo_lab.fanout import train_points
    from tdpo_lab.study import parse_betas, study_configs, write_study

    root = Path(args.out)
    grid = parse_betas(args.betas)
    configs = study_configs(lambda **extra: build_config(args, **extra), grid, _ints(args.seeds))
    failures = []
    if not args.collect_only:
        failures = train_points(
            configs, [root / run_name(c) for c in configs], jobs=args.jobs, progress=not args.quiet
        )
    report = write_study(root, grid, Path(args.report) if args.report else root)
    print(f"frontier study: {report} (table, verdicts), figure beside it")
    for name, exc in failures:
        print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failures else 0


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
        from tdpo_lab.publish import INLINE_BACKEND

        os.environ["MPLBACKEND"] = INLINE_BACKEND
    started_all = time.perf_counter()
    print(
        f"reproduce: {len(names)} notebooks into {out}, up to {args.jobs} at a time; seeds {seeds}",
        flush=True,
    )
    # every run the chapters train, as one pool first (tdpo_lab.pool): they then find their runs finished
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
        from tdpo_lab.publish import publish_all

        written = publish_all(out, names, source, profile=args.profile)
        print(f"published {len(written)} chapters into {source} (outputs, figures, provenance)")
    if (out / "runs").is_dir():
        report = write_results(out / "runs", out)
        print(
            f"executed notebooks: {out}\nresults table: {report}\nfigures: {out}/frontier.png, {out}/seqkl.png"
        )
    return 0


def cmd_export_pairs(args: argparse.Namespace) -> int:
    from tdpo_lab.user_pairs import export_pairs

    cfg = build_config(args)
    ds = export_pairs(cfg, args.out, push_to_hub=args.push_to_hub, progress=not args.quiet)
    where = f" and pushed to the hub as {args.push_to_hub!r}" if args.push_to_hub else ""
    print(
        f"{len(ds)} pairs written to {args.out}{where}: datasets.load_from_disk({args.out!r}); columns {ds.column_names}"
    )
    return 0


def cmd_exercises(args: argparse.Namespace) -> int:
    from tdpo_lab.exercises import write_exercises

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
    p.add_argument("--method", choices=method_names(), help="a registered method (tdpo_lab.methods)")
    p.add_argument("--beta", type=float)
    p.add_argument("--alpha", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run folder (default runs/<method>_beta<b>[_alpha<a>]_seed<s>)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep", help="a grid of methods x betas (x alphas) x seeds, or a notebook over a grid"
    )
    _common(p)
    p.add_argument("--methods", default=",".join(method_names()), help="comma-separated registered methods")
    p.add_argument("--betas", default="0.1")
    p.add_argument("--alphas", default="0.5", help="for tdpo2 and tidpo (tdpo1 has no alpha)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--notebook", help="execute this chapter once per grid point with papermill")
    p.add_argument("--grid", help="YAML mapping of notebook parameters to lists of values")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="points trained at once (one per GPU on GPUs, one thread each on CPU)",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "frontier-study",
        help="DPO, TDPO1 and TDPO2 over their own beta grids and seeds: frontier envelopes and verdicts",
    )
    _common(p)
    p.add_argument(
        "--betas",
        default="",
        help="per-method grids, e.g. 'dpo=0.1,0.3,1;tdpo2=0.03,0.1' (default: tdpo_lab.study.FRONTIER_BETAS)",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="points trained at once")
    p.add_argument("--out", default="runs/frontier", help="run root of the study's runs")
    p.add_argument("--report", help="folder of frontier_study.md / .png (default: --out)")
    p.add_argument("--collect-only", action="store_true", help="only write the report from finished runs")
    p.set_defaults(func=cmd_frontier_study)

    p = sub.add_parser("reproduce", help="the main job: execute every notebook in order into --out")
    p.add_argument("--profile", default="tiny", choices=PROFILES)
    p.add_argument("--fast", action="store_true", help="the small CI configuration")
    p.add_argument("--out", default="reproduce")
    p.add_argument("--only", help="comma-separated notebook number prefixes, e.g. 00,01")
    p.add_argument("--notebooks", help="folder of the chapters (default: the checkout's notebooks/)")
    p.add_argument(
        "--seeds",
        help="training seeds the results chapters average (default: 0,1,2 on the full tiny profile, else 0)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="chapters run side by side when they do not depend on each other (each uses one thread)",
    )
    p.add_argument(
        "--publish",
        action="store_true",
        help="write the executed chapters back into the notebooks folder (figures, provenance; full profile only)",
    )
    p.add_argument(
        "--no-pool",
        dest="pool",
        action="store_false",
        help="let each chapter train its own runs (default: train them all first, --jobs at a time)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "export-pairs", help="write the kit's preference pairs as a datasets.Dataset (TRL's column names)"
    )
    _common(p)
    p.add_argument("--out", required=True, help="folder for Dataset.save_to_disk")
    p.add_argument("--push-to-hub", metavar="NAME", help="also push the dataset to the hub as NAME (online)")
    p.set_defaults(func=cmd_export_pairs)

    p = sub.add_parser("exercises", help="write the student notebooks (solutions stubbed) from the chapters")
    p.add_argument("--notebooks", help="folder of the chapters (default: the checkout's notebooks/)")
    p.add_argument("--out", help="folder of the student notebooks (default: exercises/ beside the chapters)")
    p.set_defaults(func=cmd_exercises)

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
    except (ConfigError, NotebookToolsMissing, DataError) as exc:
        parser.exit(2, f"tdpo-lab: error: {exc}\n")
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
