"""The ``tdpo-lab`` command line: run one experiment, sweep a grid, reproduce the notebooks, collect results.

    tdpo-lab run --profile tiny --method tdpo2 --beta 0.1 --alpha 0.5 --seed 0 --out runs/tdpo2
    tdpo-lab sweep --methods dpo,tdpo2 --betas 0.1,0.5 --alphas 0.5 --seeds 0,1 --out runs/sweep
    tdpo-lab sweep --notebook notebooks/05_tdpo.ipynb --grid grid.yaml --out runs/nb-sweep
    tdpo-lab frontier-study --profile tiny --seeds 0,1,2 --jobs 2 --out runs/frontier
    tdpo-lab reproduce --profile tiny --out reproduce
    tdpo-lab collect runs/sweep
    tdpo-lab store runs/frontier --into results/tiny                # finished runs' summaries, to commit
    tdpo-lab claims results/tiny                                    # one verdict per claim, from the store
    tdpo-lab run --method tdpo2 --set pairs=my_pairs.jsonl          # your own preference data
    tdpo-lab export-pairs --profile tiny --out pairs_tiny              # the kit's pairs as a DatasetDict (train, test)

Every stage that is cached already (tokenizer, SFT model, pairs, AttentionPO weights) is reused. The
commands that execute notebooks (``reproduce``, ``sweep --notebook``) leave that to :mod:`tdpo_lab.course.chapters`.
"""

from __future__ import annotations

import argparse
import sys

from tdpo_lab.cli.commands import (
    cmd_claims,
    cmd_collect,
    cmd_exercises,
    cmd_export_pairs,
    cmd_frontier_study,
    cmd_reproduce,
    cmd_run,
    cmd_store,
    cmd_sweep,
)
from tdpo_lab.config import PROFILES, ConfigError
from tdpo_lab.core.data import DataError
from tdpo_lab.course.chapters import NotebookToolsMissing
from tdpo_lab.methods import load_plugin, method_names


# --- parser -------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile", default="tiny", choices=PROFILES, help="tiny (offline default) or gpt2 (hub, GPU)"
    )
    p.add_argument("--fast", action="store_true", help="shrink every size (as TDPO_LAB_FAST=1)")
    p.add_argument("--config", help="a recipe file (YAML) of config keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first: it registers methods of its own (repeatable; also in --jobs workers)",
    )


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
        "--store",
        help="a results store (tdpo_lab.runs.store): skip runs stored there, store the finished ones, report from it",
    )
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
        help="per-method grids, e.g. 'dpo=0.1,0.3,1;tdpo2=0.03,0.1' (default: tdpo_lab.runs.study.FRONTIER_BETAS)",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--grid",
        choices=("betas", "retrain"),
        default="betas",
        help="betas: --betas (DPO, TDPO1, TDPO2); retrain: tdpo_lab.runs.study.STUDY_GRID, every method, eval every 40",
    )
    p.add_argument("--jobs", type=int, default=2, help="points trained at once")
    p.add_argument("--out", default="runs/frontier", help="run root of the study's runs")
    p.add_argument("--report", help="folder of frontier_study.md / .png (default: --out)")
    p.add_argument("--collect-only", action="store_true", help="only write the report from finished runs")
    p.add_argument(
        "--store",
        help="a results store (tdpo_lab.runs.store): skip runs stored there, store the finished ones, report from it",
    )
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
        "export-pairs",
        help="write the kit's preference pairs as a datasets.DatasetDict, train and test (TRL's column names)",
    )
    _common(p)
    p.add_argument("--out", required=True, help="folder for Dataset.save_to_disk")
    p.add_argument("--push-to-hub", metavar="NAME", help="also push the dataset to the hub as NAME (online)")
    p.set_defaults(func=cmd_export_pairs)

    p = sub.add_parser("exercises", help="write the student notebooks (solutions stubbed) from the chapters")
    p.add_argument("--notebooks", help="folder of the chapters (default: the checkout's notebooks/)")
    p.add_argument("--out", help="folder of the student notebooks (default: exercises/ beside the chapters)")
    p.set_defaults(func=cmd_exercises)

    p = sub.add_parser("store", help="copy finished runs' summaries (no weights) into a results store")
    p.add_argument(
        "roots", nargs="+", metavar="RUN_ROOT", help="folders holding run folders (or run folders)"
    )
    p.add_argument("--into", required=True, help="the store, e.g. results/tiny")
    p.set_defaults(func=cmd_store)

    p = sub.add_parser(
        "claims", help="one verdict per claim of the papers from the runs (or store) under ROOT"
    )
    p.add_argument("root")
    p.add_argument("--out", help="folder of claims.md (default: ROOT)")
    p.set_defaults(func=cmd_claims)

    p = sub.add_parser("collect", help="collect the runs under ROOT into a results table and figures")
    p.add_argument("root")
    p.add_argument("--out")
    p.set_defaults(func=cmd_collect)
    return parser


def _plugins(argv: list[str]) -> list[str]:
    """The modules named by ``--plugin M`` / ``--plugin=M``: loaded before the parser lists the methods."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            out.append(arg.split("=", 1)[1])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        for module in _plugins(argv):
            load_plugin(module)
    except ValueError as exc:
        print(f"tdpo-lab: error: {exc}", file=sys.stderr)
        return 2
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
