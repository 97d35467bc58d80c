"""`edgesmith run [RECIPE]` and `edgesmith recipes`: a recipe from training to the report."""

from __future__ import annotations

import argparse

from toolchain.pipeline import run_pipeline, run_step_job
from toolchain.recipe import list_recipes, load_recipe


def run(args: argparse.Namespace) -> None:
    if args.step_job is not None:  # a torchrun rank of a multi-process step of a run
        return run_step_job(args.step_job)
    recipe = load_recipe(args.recipe, args.overrides)
    s = run_pipeline(recipe, args.out)
    print()
    print(s["console"])


def recipes(args: argparse.Namespace) -> None:
    found = list_recipes()
    width = max(len(n) for n, _ in found)
    for name, description in found:
        print(f"{name:<{width}}  {description}")
    print("\nrun one with `edgesmith run NAME` (no name: demo); a recipe file: `edgesmith run FILE.toml`")


def register(sub) -> None:
    r = sub.add_parser("run", help="run a recipe: train or load, compress, export, bench, report (default: demo)")
    r.add_argument("recipe", nargs="?", default="demo", metavar="RECIPE",
                   help="a bundled recipe name (see `edgesmith recipes`) or a .toml file (default: demo)")
    r.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<recipe name>)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. source.train.steps=100, pass[0].bits=8, target.device=pixel-8")
    r.add_argument("--step-job", default=None, help=argparse.SUPPRESS)  # torchrun ranks of a multi-process step
    r.set_defaults(func=run)

    rc = sub.add_parser("recipes", help="list the bundled recipes")
    rc.set_defaults(func=recipes)
