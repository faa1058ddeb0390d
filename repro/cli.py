"""``repro``: reproduce the tables of LoMaR, LocalMIM and ExtreMA (and their baselines) from named recipes.

Every command takes a recipe name, a scale (``paper`` = the papers' protocol, ``tiny`` = the same code paths on
the embedded data, minutes on a CPU) and dotted overrides such as ``model.depth=4 optim.blr=1e-4``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from repro.config import ConfigError, list_recipes, to_yaml

EPILOG = """examples:
  repro recipes                                   list every recipe
  repro show mae --scale paper                    the resolved MAE ViT-B recipe, as the paper has it
  repro chain mae --scale tiny --baseline random  pretrain MAE, then fine-tune / linear / kNN it and random init
  repro pretrain mae --scale tiny optim.epochs=2  one stage, with an override
  repro finetune vit_base --init runs/tiny/pretrain/<stage>/encoder.pth --scale tiny
  repro report                                    render RESULTS.md from every finished stage
"""


def runs_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get("REPRO_RUNS") or "runs").absolute()


def _common(p: argparse.ArgumentParser, recipe: bool = True) -> None:
    if recipe:
        p.add_argument("recipe", help="recipe name (see `repro recipes`), e.g. mae")
    p.add_argument("--scale", default="tiny", choices=("tiny", "paper"),
                   help="paper: the protocol exactly (needs a real dataset: data.path=...); tiny: small models, "
                        "few epochs, the embedded data (default)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides applied after the scale, e.g. model.depth=4 optim.epochs=10")


def _run_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", help="where stage folders and results go (default: $REPRO_RUNS or ./runs)")
    p.add_argument("--force", action="store_true", help="rerun stages that are already done")
    p.add_argument("--devices", type=int, default=1,
                   help="processes per stage (DDP via torchrun; gloo on CPU). The effective batch stays the recipe's")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="repro", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("recipes", help="list the recipes, per stage kind",
                       description="List the recipes (named paper configurations), per stage kind.")
    p.add_argument("--kind", choices=("pretrain", "finetune", "linear", "knn"))

    p = sub.add_parser("show", help="print a recipe resolved at a scale (audit it against the paper)",
                       description="Print the fully resolved configuration of a recipe at a scale.")
    _common(p)

    p = sub.add_parser("pretrain", help="run one pretraining stage",
                       description="Pretrain with a method recipe; writes encoder.pth (timm-loadable) and result.json.")
    _common(p)
    _run_opts(p)

    for kind, what in (("finetune", "end-to-end fine-tuning"), ("linear", "linear probing"), ("knn", "kNN")):
        p = sub.add_parser(kind, help=f"evaluate an encoder by {what}",
                           description=f"Evaluate an encoder (--init PATH to an encoder.pth, or random) by {what}.")
        _common(p)
        _run_opts(p)
        p.add_argument("--init", required=True, help="encoder state dict written by `repro pretrain`, or `random`")

    p = sub.add_parser("chain", help="pretrain -> {fine-tune, linear, kNN} as a DAG of stages",
                       description="Pretrain a method, then run the evaluations its recipe names (evals:), each in its "
                                   "own process; finished stages are reused.")
    _common(p)
    _run_opts(p)
    p.add_argument("--baseline", choices=("none", "random"), default="none",
                   help="random: also evaluate a randomly initialised encoder with the same budget")
    p.add_argument("--evals", help="comma-separated subset of finetune,linear,knn")

    p = sub.add_parser("report", help="render RESULTS.md from the finished stages",
                       description="Collect every result.json under the runs folder and write RESULTS.md.")
    p.add_argument("--runs-dir", help="default: $REPRO_RUNS or ./runs")
    p.add_argument("--out", default="RESULTS.md")

    p = sub.add_parser("data", help="generate (or locate) the embedded datasets",
                       description="Generate the procedural shapes dataset or the sklearn digits dataset into the "
                                   "cache ($REPRO_CACHE, default ~/.cache/repro) and print its folder.")
    p.add_argument("name", choices=("synthetic", "digits"))
    p.add_argument("--img-size", type=int, default=32)
    return ap


def _stages_for(args: argparse.Namespace) -> list:
    from repro.pipeline.plan import chain
    from repro.pipeline.stage import Stage
    from repro.resolve import resolve

    if args.cmd == "chain":
        evals = args.evals.split(",") if args.evals else None
        return chain(args.recipe, args.scale, args.overrides, baseline=args.baseline == "random", evals=evals)
    cfg = resolve(args.recipe, args.scale, args.overrides, kind=args.cmd)
    if args.cmd != "pretrain":
        if args.init != "random" and not Path(args.init).is_file():
            raise ConfigError(f"--init {args.init} does not exist; pass an encoder.pth written by `repro pretrain`")
        cfg["init"] = str(Path(args.init).absolute()) if args.init != "random" else "random"
    return [Stage(args.cmd, cfg, label=args.recipe)]


def _check(stages: list, devices: int) -> None:
    """Everything that can be refused is refused here, before any stage starts."""
    from repro.data.datasets import check_dataset
    from repro.resolve import accumulation

    for s in stages:
        check_dataset(s.cfg["data"])
        if "optim" in s.cfg:
            accumulation(s.cfg, devices)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]  # overrides given after options
    try:
        if args.cmd == "recipes":
            for kind, names in list_recipes(args.kind).items():
                print(f"{kind}: {', '.join(names) or '-'}")
            return 0
        if args.cmd == "show":
            from repro.resolve import resolve

            print(to_yaml(resolve(args.recipe, args.scale, args.overrides)), end="")
            return 0
        if args.cmd == "data":
            from repro.data.datasets import dataset_root

            data = {"dataset": args.name, "img_size": args.img_size, "synthetic_train": 4000, "synthetic_val": 1000,
                    "synthetic_classes": 10}
            print(dataset_root(data))
            return 0
        if args.cmd == "report":
            from repro.report.results import write_results_md

            print(write_results_md(runs_root(args.runs_dir), Path(args.out)))
            return 0
        from repro.pipeline.execute import LocalExecutor, summary

        stages = _stages_for(args)
        _check(stages, args.devices)
        root = runs_root(args.runs_dir)
        status = LocalExecutor(devices=args.devices).run(stages, root, force=args.force)
        print(f"stages under {root}:\n{summary(stages, status, root)}")
        return 0 if all(v in ("done", "skipped") for v in status.values()) else 1
    except ConfigError as e:
        print(f"repro: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
