"""``repro``: reproduce the tables of LoMaR, LocalMIM and ExtreMA (and their baselines) from named recipes.

Every command takes a recipe name, a scale (``paper`` = the papers' protocol, ``tiny`` = the same code paths on
the embedded data, minutes on a CPU) and dotted overrides such as ``model.depth=4 optim.blr=1e-4``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path

from repro.config import CONTROL, ConfigError, list_recipes, short, to_yaml
from repro.kinds import ENCODER, cli_kinds, eval_kinds, get_kind

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


def _table_args(p: argparse.ArgumentParser, tables_help: str) -> None:
    """The arguments `plan` and `run` share: the tables (and overrides), the scale and the seeds."""
    p.add_argument("tables", nargs="+", metavar="TABLE|key=value",
                   help=tables_help + "; key=value overrides (after the scale) apply to every stage that has the key")
    p.add_argument("--scale", default="tiny", choices=("tiny", "paper"),
                   help="tiny (default): micro models, few epochs, the embedded data, a CPU; its numbers check that "
                        "the code paths run and learn, never the paper's values. paper: the papers' protocol "
                        "(real datasets and a cluster: `repro run --help`)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="run every trainable row with N seeds (seed, seed+1, ...; the report shows mean +- std and a "
                        "noise verdict per difference); default: 3 for the rows a claim rests on at tiny scale "
                        "(repro/spec/claims.yaml), 1 elsewhere and at paper scale")


def _run_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", help="where stage folders and results go (default: $REPRO_RUNS or ./runs)")
    p.add_argument("--force", action="store_true", help="rerun stages that are already done")
    p.add_argument("--devices", type=int, default=1,
                   help="processes per stage (DDP via torchrun; gloo on CPU). The effective batch stays the recipe's")
    p.add_argument("--jobs", type=int, default=1,
                   help="local executor: stages run at once (each gets cores / jobs threads; on a 2-core CPU, "
                        "--jobs 2 runs the tiny scale faster)")
    g = p.add_argument_group("Slurm (submitit)")
    g.add_argument("--cluster", metavar="NAME",
                   help="submit the whole DAG to Slurm with the cluster profile slurm/clusters/NAME.yaml (or a path "
                        "to a profile .yaml); the run root must be on the shared filesystem")
    g.add_argument("--dry-run", action="store_true", help="with --cluster: print the sbatch scripts, submit nothing")
    g.add_argument("--log-dir", help="with --cluster: Slurm logs (default: the profile's log_root, else "
                                     "<runs>/slurm/logs)")
    g.add_argument("--res", action="append", default=[], metavar="KEY=VALUE",
                   help="with --cluster: override a stage resource (nodes, gpus_per_node, tasks_per_node, "
                        "cpus_per_task, mem_gb, time_min; defaults in slurm/resources.yaml)")
    g.add_argument("--detach", action="store_true",
                   help="with --cluster: return after submitting (follow with `repro status`, stop with "
                        "`repro cancel`)")
    g.add_argument("--device", metavar="NAME",
                   help="with --cluster: derive each stage's --time from the stored profiles of this device, as "
                        "`repro plan --device` (default: the GPU set that covers most paper-scale pretraining stages)")


def chain_kinds() -> tuple[str, ...]:
    """Evaluations `repro chain --evals` can pick: the kinds with a subcommand that evaluate an encoder."""
    return tuple(k for k in cli_kinds() if get_kind(k).takes_input)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="repro", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("recipes", help="list the recipes, per stage kind",
                       description="List the recipes (named paper configurations), per stage kind.")
    p.add_argument("--kind", choices=tuple(dict.fromkeys(get_kind(k).recipes for k in cli_kinds())))

    p = sub.add_parser("show", help="print a recipe resolved at a scale (audit it against the paper)",
                       description="Print the fully resolved configuration of a recipe at a scale.")
    _common(p)

    for name in cli_kinds():  # one subcommand per stage kind that has one (repro.kinds)
        kind = get_kind(name)
        p = sub.add_parser(name, help=kind.cli_help, description=kind.cli_description or kind.cli_help)
        _common(p)
        _run_opts(p)
        if kind.takes_input:
            p.add_argument("--init", required=True, help="encoder state dict written by `repro pretrain`"
                           + (", or `random`" if kind.input != ENCODER else ""))

    p = sub.add_parser("chain", help="pretrain -> {fine-tune, linear, kNN} as a DAG of stages",
                       description="Pretrain a method, then run the evaluations its recipe names (evals:), each in its "
                                   "own process; finished stages are reused.")
    _common(p)
    _run_opts(p)
    p.add_argument("--baseline", choices=("none", "random"), default="none",
                   help="random: also evaluate a randomly initialised encoder with the same budget")
    p.add_argument("--evals", help=f"comma-separated subset of {','.join(chain_kinds())}")

    tables_help = ("table ids (e.g. lomar/t2 localmim/t4a), paper names (lomar, localmim, extrema), `claims` (only "
                   "the rows the signal bars and the papers' headline claims rest on, repro/spec/claims.yaml: the "
                   "quickest run that fills RESULTS.md's verdicts) or `all`; `repro tables` lists them")
    p = sub.add_parser("tables", help="list the paper tables and figures the suite reproduces",
                       description="List every table / figure spec: id, caption, rows (trainable / reported-only / "
                                   "pending).")
    p.add_argument("ids", nargs="*", default=["all"], help=tables_help)
    p.add_argument("--check", action="store_true",
                   help="list rows that print different values but resolve to the same stage, and row overrides "
                        "that change nothing (at paper scale); exit 1 if any")

    p = sub.add_parser("plan", help="print the DAG of stages a table needs, without running anything",
                       description="Expand paper tables into stages (shared stages appear once) and print them with "
                                   "their dependencies, what is done already and, at paper scale, the projected "
                                   "device-hours from stored profiles.")
    _table_args(p, tables_help)
    p.add_argument("--runs-dir", help="default: $REPRO_RUNS or ./runs")
    p.add_argument("--device", metavar="NAME",
                   help="with --scale paper: project from the stored profiles of this device (part of a profile "
                        "set's name, e.g. H200, CPU, 'H200 | bf16 autocast | eager'); default: the set that covers "
                        "most stages")
    p.set_defaults(overrides=[])

    p = sub.add_parser("run", help="run paper tables end to end (pretrain -> evaluations), then render the report",
                       description="Run every stage the named tables need, in dependency order, skipping finished "
                                   "stages, then write tables/, plots/ and RESULTS.md.",
                       epilog="examples:\n  repro run lomar/t2 --scale tiny\n  repro run all --scale tiny --jobs 2\n"
                              "  repro run localmim/t4b --scale paper data.path=/datasets/imagenet",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _table_args(p, tables_help)
    p.set_defaults(overrides=[])
    _run_opts(p)
    p.add_argument("--no-report", action="store_true", help="do not render tables/, plots/ and RESULTS.md afterwards")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="root of a real dataset for paper-scale stages, e.g. --data imagenet1k=/datasets/imagenet "
                        "(repeat per dataset: imagenet22k, inat2018, inat2019)")
    p.add_argument("--commit", metavar="REV",
                   help="run with the code of git revision REV (a temporary worktree; same data cache; stage folders "
                        "under <runs>/commits/<sha>/), into the same results store, for `repro compare`")

    p = sub.add_parser("profile", help="measure pretraining cost at paper configurations (cost tables, FLOPs)",
                       description="Time training steps of every row of an efficiency table (or one pretraining "
                                   "recipe) at its paper configuration on this device; project time per epoch and "
                                   "device-hours for the paper's schedule; write tables/<paper>/<id>-cost.md/.csv, "
                                   "plots/<paper>/<id>-cost.png and the stored profiles `repro plan` reads.",
                       epilog="examples:\n  repro profile all --flops          every cost table + tables/efficiency/"
                              "flops.md\n  repro profile lomar/t1 --steps 5\n  repro profile mae data.img_size=384\n"
                              "  repro profile pretrain/mae train.compile_mode=reduce-overhead --compile on --trace "
                              "traces/\n  repro profile finetune/vit_base@mae linear/mae@mae knn/default   "
                              "evaluation steps (Slurm --time of those stages)\n"
                              "  repro profile --transfer-flops   FLOPs of the segment / detect recipes (their Slurm "
                              "--time)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="efficiency table ids (lomar/t1 ...), a paper, `all`, a pretraining recipe, or an "
                        "evaluation step KIND/RECIPE[@PRETRAIN] (finetune/vit_base@mae, linear/mae@mae, "
                        "knn/default: configured as a plan configures it after that pretraining); key=value items "
                        "are overrides of a recipe target")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch", type=int, help="fixed batch (default: 8 / 4 images at <=224 / >224 px on a CPU; the "
                                             "largest of 256..32 that fits on a GPU)")
    p.add_argument("--loader-workers", type=int, help="loader workers for the loader throughput (default: the "
                                                      "recipe's train.num_workers)")
    p.add_argument("--flops", action="store_true", help="also count FLOPs at 224/384/448 (tables/efficiency/flops.md)")
    p.add_argument("--transfer-flops", action="store_true",
                   help="count the training FLOPs of every segment / detect recipe on the CPU through the frameworks' "
                        "own models (tables/efficiency/transfer-flops.md; the Slurm --time of those stages)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile of the transformer blocks, as the engine's train.compile (auto: on for CUDA)")
    p.add_argument("--fused-optim", choices=("auto", "on", "off"), default="auto",
                   help="fused AdamW, as the engine's train.fused_optim (auto: on for CUDA)")
    p.add_argument("--no-loader", action="store_true", help="skip the loader throughput measurement")
    p.add_argument("--trace", metavar="DIR",
                   help="after timing, run a few steps under torch.profiler: DIR/<recipe>-<px>-b<batch>-<mode>.txt "
                        "(ops and kernels by device time) and, in the profile, the device's busy / idle time per "
                        "step by kernel category (what holds the step back)")
    p.add_argument("--json", metavar="PATH", help="also write every profile measured by this call to PATH")
    p.add_argument("--store", action="store_true",
                   help="replace stored profiles even when they timed more steps than this call")
    p.add_argument("--side-by-side", metavar="DIR",
                   help="write tables/efficiency/side-by-side-<device>.md/.csv from a GPU job's DIR (official.json "
                        "of the official code's benchmark + repro-*.json written by `repro profile --json`)")
    p.add_argument("--import", dest="import_json", metavar="PATH", nargs="+",
                   help="store the profiles of `repro profile --json` files (or folders of repro-*.json)")
    p.set_defaults(overrides=[])

    p = sub.add_parser("status", help="state of every stage under the runs folder (files + Slurm)",
                       description="Each stage's state (done / pending / running / resumable: stopped with a "
                                   "checkpoint / failed with its log / corrupt: a damaged record / not run) from its "
                                   "files and, for submitted stages, the scheduler. Exits 1 when a stage failed.")
    p.add_argument("--runs-dir", help="default: $REPRO_RUNS or ./runs")

    p = sub.add_parser("cancel", help="cancel the Slurm jobs of the latest submission",
                       description="scancel the still queued or running jobs of the latest `--cluster` submission "
                                   "under the runs folder (all submissions with --all).")
    p.add_argument("--runs-dir", help="default: $REPRO_RUNS or ./runs")
    p.add_argument("--all", action="store_true", help="every recorded submission, not just the latest")

    p = sub.add_parser("report", help="render RESULTS.md from the finished stages",
                       description="Collect every result.json under the runs folder and write RESULTS.md.")
    p.add_argument("--runs-dir", help="default: $REPRO_RUNS or ./runs")
    p.add_argument("--out", default="RESULTS.md")

    p = sub.add_parser("data", help="generate (or locate) the embedded datasets",
                       description="Generate the procedural shapes dataset or the sklearn digits dataset into the "
                                   "cache ($REPRO_CACHE, default ~/.cache/repro) and print its folder.")
    p.add_argument("name", choices=("synthetic", "digits"))
    p.add_argument("--img-size", type=int, default=32)

    from repro.record.bench import add_parser as add_bench
    from repro.record.compare import add_parsers

    add_parsers(sub, "default: $REPRO_RUNS or ./runs")
    add_bench(sub, "default: $REPRO_RUNS or ./runs")
    return ap


def _stages_for(args: argparse.Namespace) -> list:
    from repro.pipeline.plan import chain
    from repro.pipeline.stage import Stage
    from repro.resolve import resolve

    if args.cmd == "chain":
        evals = args.evals.split(",") if args.evals else None
        return chain(args.recipe, args.scale, args.overrides, baseline=args.baseline == "random", evals=evals)
    kind = get_kind(args.cmd)
    cfg = resolve(args.recipe, args.scale, args.overrides, kind=kind.recipes)
    if kind.takes_input:
        if args.init == "random" and kind.input == ENCODER:
            raise ConfigError(f"--init random: a {args.cmd} stage needs a pretrained encoder (an encoder.pth)")
        if args.init != "random" and not Path(args.init).is_file():
            raise ConfigError(f"--init {args.init} does not exist; pass an encoder.pth written by `repro pretrain`")
        cfg["init"] = str(Path(args.init).absolute()) if args.init != "random" else "random"
    return [Stage(args.cmd, cfg, label=args.recipe)]


def _tables_cmd(args: argparse.Namespace) -> int:
    from repro.pipeline.plan import all_stages, describe, parse_data_paths, plan_tables

    root = runs_root(args.runs_dir)
    if getattr(args, "commit", None):
        from repro.record.worktree import run_at_commit, strip_options

        return run_at_commit(args.commit, strip_options(args.argv, ("--commit", "--runs-dir")), root)
    ids = [t for t in args.tables if "=" not in t]
    overrides = [*(t for t in args.tables if "=" in t), *getattr(args, "overrides", [])]
    if not ids:
        raise ConfigError("name at least one table (e.g. lomar/t2), a paper (lomar) or all; see `repro tables`")
    plans = plan_tables(ids, args.scale, overrides, parse_data_paths(getattr(args, "data", [])),
                        seeds=getattr(args, "seeds", None))
    stages = all_stages(plans)
    if args.cmd == "plan":
        projected, sets = None, []
        if args.scale == "paper":
            from repro.profile.projection import projector

            projected, sets = projector([s.cfg for s in stages if s.kind == "pretrain"], args.device)
        print(describe(plans, root, projected))
        if projected is not None:
            print(projected.describe(sets))
        return 0
    if not args.dry_run:  # a dry run does not look for the datasets (they live on the cluster)
        _check(stages, args.devices)
    from repro.pipeline.execute import summary
    from repro.pipeline.slurm import make_executor, runs_root_for

    root = runs_root_for(args, root)
    if not args.dry_run:
        from repro.report.tables import write_manifests

        write_manifests(plans, root, args.scale, overrides)
    t0 = time.time()
    try:
        status = make_executor(args, tables={p.spec.id: p.stages for p in plans}).run(stages, root, force=args.force)
    except KeyboardInterrupt:  # recorded too, so the report says what the interrupted run did and how long it took
        if not args.dry_run:
            _record(args, root, stages, {s.name: "done" for s in stages if s.done(root)}, t0, interrupted=True)
        raise
    if args.dry_run:
        return 0
    print(f"stages under {root}:\n{summary(stages, status, root)}")
    from repro.report.results import write_results_md

    _record(args, root, stages, status, t0)
    from repro.record.store import ingest_quietly

    print(ingest_quietly(root))
    if not args.no_report:
        print(write_results_md(root, Path("RESULTS.md")))
    return 0 if all(v in ("done", "skipped", "submitted") for v in status.values()) else 1


def _record(args: argparse.Namespace, root: Path, stages: list, status: dict[str, str], t0: float,
            interrupted: bool = False) -> None:
    """Append this `repro run` to the runs folder's history (an interrupted one: the stages done by then)."""
    from repro.pipeline.plan import CLAIM_SEEDS
    from repro.record.provenance import provenance
    from repro.report.results import record_run

    prov = provenance({})
    ran = (sum(v in ("done", "failed") for v in status.values()) if not interrupted
           else sum(1 for s in stages if s.done(root) and (s.result(root) or {}).get("finished", 0) >= t0))
    record_run(root, {"tables": list(args.tables), "scale": args.scale, "wall_s": time.time() - t0, "jobs": args.jobs,
                      "ran": ran, "skipped": sum(v == "skipped" for v in status.values()) if not interrupted
                      else sum(1 for s in stages if s.done(root)) - ran,
                      "failed": sum(v in ("failed", "blocked") for v in status.values()),
                      "commit": prov.get("commit") or "?", "host": prov.get("host", "?"), "cpus": os.cpu_count(),
                      "seeds": args.seeds if args.seeds is not None else f"{CLAIM_SEEDS} on claim rows at tiny, else 1",
                      "stages": len(stages), "interrupted": interrupted,
                      "left": sum(1 for s in stages if not s.done(root)) if interrupted else 0})


def _check(stages: list, devices: int) -> None:
    """Everything that can be refused is refused here, before any stage starts."""
    from repro.config import accumulation
    from repro.data.datasets import check_dataset

    for s in stages:
        check_dataset(s.cfg["data"])
        if "optim" in s.cfg:
            accumulation(s.cfg, devices)
        if not s.deps and s.cfg.get("init") not in (None, "random"):
            check_init(s.cfg)


def check_init(cfg: dict) -> None:
    """Open an ``--init`` file weights-only and load it into the stage's encoder: one line if it does not fit."""
    import torch

    from repro.evals.features import eval_encoder
    from repro.io import CheckpointError, load_checkpoint

    path, m = cfg["init"], cfg["model"]
    want = f"an encoder state dict for {m['arch']}/{m['patch_size']} (an encoder.pth written by `repro pretrain`)"
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"--init: {e}") from None
    inner = state.get("encoder", state.get("model")) if isinstance(state, dict) else None  # ours / official layout
    state = inner if isinstance(inner, dict) else state
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = type(state).__name__ if not isinstance(state, dict) else "a mapping without tensors" if state \
            else "an empty mapping"
        raise ConfigError(f"--init {path}: expected {want}, found {found}")
    try:
        eval_encoder(cfg, path)
    except ConfigError as e:
        raise ConfigError(f"--init {path}: expected {want}; {e}") from None
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise ConfigError(f"--init {path}: expected {want}, found weights that do not fit ({short(first, 160)})") \
            from None


def check_path(value: str | None, what: str) -> None:
    """A user path: non-empty, no control characters, no component longer than the filesystem allows."""
    if value is None:
        return
    if not value.strip() or CONTROL.search(value) or len(value) > 4096:
        raise ConfigError(f"{what} {short(value)} is not a usable path (empty, too long or with a control character)")
    if any(len(part.encode()) > 255 for part in Path(value).parts):
        raise ConfigError(f"{what} {short(value)} has a name longer than 255 bytes; use a shorter path")


def check_run_root(root: Path, what: str = "run root") -> None:
    """Refuse a run root that cannot be created or written (under a file, in /proc, read-only), creating nothing."""
    import tempfile

    anc = root
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{what} {root} cannot be created: {anc} is a file, not a folder; pick another folder")
    try:
        tempfile.TemporaryDirectory(dir=anc).cleanup()
    except OSError as e:
        raise ConfigError(f"{what} {root} is not writable ({e.strerror} in {anc}); pick a writable folder") from None


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]  # overrides given after options
    try:
        _check_args(args)
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
        if args.cmd == "tables" and args.check:
            from repro.spec.check import check

            found = check(args.ids)
            for kind, line in found:
                print(f"{kind}: {line}")
            return 1 if found else 0
        if args.cmd == "tables":
            from repro.pipeline.plan import row_status
            from repro.spec import select

            for spec in select(args.ids):
                kinds = {"trainable": 0, "reported": 0, "pending": 0}
                for r in spec.rows:
                    kinds[row_status(spec, r)[0]] += 1
                print(f"{spec.id:18s} {spec.kind:6s} {spec.caption}  [{kinds['trainable']} trainable, "
                      f"{kinds['reported']} reported-only, {kinds['pending']} pending]")
            return 0
        if args.cmd in ("plan", "run"):
            return _tables_cmd(args)
        if args.cmd == "profile":
            from repro.profile.run import cli_main

            return cli_main(args)
        if args.cmd == "report":
            from repro.record.store import ingest_quietly
            from repro.report.results import write_results_md

            print(ingest_quietly(runs_root(args.runs_dir)))
            print(write_results_md(runs_root(args.runs_dir), Path(args.out)))
            return 0
        if args.cmd in ("compare", "history"):
            from repro.record.compare import cli_main as compare_main

            return compare_main(args, runs_root(args.runs_dir))
        if args.cmd == "bench":
            from repro.record.bench import main as bench_main

            return bench_main(runs_root(args.runs_dir), args.update_baseline, Path(args.baseline), args.jobs,
                              args.skip_accuracy, args.skip_ratios)
        if args.cmd in ("status", "cancel"):
            from repro.pipeline import slurm

            root = runs_root(args.runs_dir)
            if args.cmd == "status":
                rows = slurm.status_report(root)
                print(f"stages under {root}:\n{slurm.format_status(rows)}")
                return 1 if any(r["state"] in ("failed", "corrupt") for r in rows) else 0
            print(f"cancelled: {' '.join(slurm.cancel(root, args.all)) or 'nothing (no job queued or running)'}")
            return 0
        from repro.pipeline.execute import summary
        from repro.pipeline.slurm import make_executor, runs_root_for

        stages = _stages_for(args)
        if not args.dry_run:  # a dry run does not look for the datasets (they live on the cluster)
            _check(stages, args.devices)
        root = runs_root_for(args, runs_root(args.runs_dir))
        status = make_executor(args).run(stages, root, force=args.force)
        if args.dry_run:
            return 0
        print(f"stages under {root}:\n{summary(stages, status, root)}")
        return 0 if all(v in ("done", "skipped", "submitted") for v in status.values()) else 1
    except ConfigError as e:
        print(f"repro: error: {str(e).splitlines()[0] if str(e) else 'bad input'}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENAMETOOLONG, errno.EACCES, errno.EROFS, errno.ENOTDIR):
            raise
        print(f"repro: error: {e.strerror}: {short(str(e.filename or ''))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: running stages have checkpointed (pipeline.execute)
        signum = getattr(e, "signum", 2)
        print(f"repro: interrupted by signal {signum}; run the same command again to resume", file=sys.stderr)
        return 128 + signum


def _check_args(args: argparse.Namespace) -> None:
    """Option values, range-checked before anything runs."""
    for opt, lo in (("jobs", 1), ("devices", 1), ("steps", 1), ("warmup", 0), ("batch", 1), ("loader_workers", 0),
                    ("img_size", 8)):
        v = getattr(args, opt, None)
        if v is not None and v < lo:
            raise ConfigError(f"--{opt.replace('_', '-')} {v} is out of range; it must be an integer >= {lo}")
    for opt in ("runs_dir", "log_dir", "init", "out"):
        check_path(getattr(args, opt, None), f"--{opt.replace('_', '-')}")
    for item in getattr(args, "data", None) or []:
        check_path(item.partition("=")[2] or item, "--data")
    if getattr(args, "evals", None) is not None:
        bad = [e for e in args.evals.split(",") if e not in chain_kinds()]
        if bad:
            raise ConfigError(f"--evals {short(args.evals)}: unknown evaluation(s) {', '.join(map(short, bad))}; "
                              f"valid: {', '.join(chain_kinds())} (of {', '.join(eval_kinds())})")
    if getattr(args, "runs_dir", None) is not None or args.cmd in (*cli_kinds(), "chain", "run"):
        check_run_root(runs_root(getattr(args, "runs_dir", None)))
    if args.cmd == "report":
        check_run_root(Path(args.out).absolute().parent, "report output folder")


if __name__ == "__main__":
    sys.exit(main())
