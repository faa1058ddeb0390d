"""``repro profile``: measure every row of an efficiency table (or one named recipe) at its paper configuration and
write ``tables/<paper>/<id>-cost.{md,csv,json}``, ``plots/<paper>/<id>-cost.png`` and the stored profiles; and the
FLOPs benchmark ``tables/efficiency/flops.md``. Evaluation steps too, for the Slurm time of those stages:
``finetune/RECIPE``, ``linear/RECIPE``, ``knn/RECIPE`` (the recipe at paper scale), or ``KIND/RECIPE@PRETRAIN`` (as a
plan configures it after that pretraining recipe: the architecture, resolution, pool and feature it inherits).

Every number of a table comes from one run of this module (one process, rows measured back to back); rows with the
same step cost (same method, model and resolution: e.g. MAE 800 and 1600 epochs) share one measurement.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from repro.config import ConfigError
from repro.io import atomic_write_json, atomic_write_text
from repro.profile.bench import (
    calibrate,
    calibration_factor,
    cost_key,
    profile_config,
    project,
    speedups,
    train_images,
)
from repro.profile.cost import analytic_flops, describe
from repro.profile.projection import import_profiles, repo_root, store_profiles
from repro.profile.tables import CALIBRATION, EFFICIENCY_TABLES, CostRow, cost_suffix, cost_table, resolve_row

CSV_FIELDS = ("row", "recipe", "overrides", "status", "batch", "step_time_s", "images_per_s", "mfu", "compile",
              "recompiles", "loader_images_per_s", "loader_jpeg_cpu_images_per_s", "loader_jpeg_device_images_per_s",
              "gflops_per_image", "analytic_gflops_per_image", "epochs", "dataset_images",
              "measured_h_per_epoch", "measured_total_device_h", "calibrated_h", "paper_time", "reference",
              "measured_speedup", "paper_speedup", "measured_over_paper")


def _onoff(x: Any) -> str:
    return "—" if x is None else ("on" if x else "off")


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None or x == "":
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return str(x)


class _Cache:
    """One measurement per cost key within a run."""

    def __init__(self, **opts: Any) -> None:
        self.opts = opts
        self.by_key: dict[str, dict[str, Any]] = {}

    def get(self, cfg: dict[str, Any], log: Any) -> dict[str, Any]:
        key = cost_key(cfg)
        if key not in self.by_key:
            log(f"  measuring {cfg.get('recipe')} at {cfg['data']['img_size']} px ...")
            self.by_key[key] = profile_config(cfg, **self.opts)
        return self.by_key[key]


def _measure_row(row: CostRow, cache: _Cache, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"row": row.label, "recipe": row.recipe or "",
                           "overrides": " ".join(f"{k}={v}" for k, v in row.overrides.items()),
                           "paper_time": row.paper}
    if row.skip:
        return {**out, "status": f"not measured: {row.skip}"}
    if row.recipe is None:
        return {**out, "status": "not measured: no pretraining recipe"}
    try:
        cfg = resolve_row(row.recipe, row.overrides)
    except ConfigError as e:
        return {**out, "status": f"not measured: {e}"}
    try:
        prof = cache.get(cfg, log)
    except ConfigError as e:  # e.g. a method that needs real data even to build
        return {**out, "status": f"not measured: {e}"}
    except torch.cuda.OutOfMemoryError:  # a fixed --batch too large for this row: the other rows still run
        torch.cuda.empty_cache()
        return {**out, "status": f"not measured: out of GPU memory at batch {cache.opts.get('batch')}"}
    images = train_images(cfg)
    epochs = float(cfg["optim"]["epochs"])
    proj = project(prof["s_per_image"], images, epochs)
    return {**out, "status": "measured", "batch": prof["batch"], "step_time_s": prof["step_time_s"],
            "images_per_s": prof["images_per_s"], "loader_images_per_s": prof["loader_images_per_s"],
            "loader_jpeg_cpu_images_per_s": prof.get("loader_jpeg_cpu_images_per_s"),
            "loader_jpeg_device_images_per_s": prof.get("loader_jpeg_device_images_per_s"),
            "mfu": prof.get("mfu"), "compile": prof.get("compile"), "recompiles": prof.get("recompiles"),
            "gflops_per_image": prof["flops_per_image"] / 1e9 if prof["flops_per_image"] else None,
            "analytic_gflops_per_image": (prof["analytic_flops_per_image"] or 0) / 1e9 or None,
            "analytic": describe(analytic_flops(cfg)), "epochs": epochs, "dataset_images": images,
            "measured_h_per_epoch": proj["device_hours_per_epoch"],
            "measured_total_device_h": proj["total_device_hours"], "_profile": prof}


def profile_table(table_id: str, repo_root: Path, *, warmup: int = 1, steps: int = 3, batch: int | None = None,
                  loader_workers: int | None = None, log: Any = print, store: bool = False,
                  **switches: Any) -> dict[str, Any]:
    """Measure one table's rows (+ its paper's calibration row when the table lacks it) and write its outputs (file
    names carry the device, ``cost_suffix``); ``switches``: ``compile``, ``fused_optim``, ``loader`` of
    ``profile_config``; ``store``: replace stored profiles that timed more steps."""
    table = cost_table(table_id)
    log(f"[profile] {table_id}: {len(table.rows)} rows ({table.source})")
    cache = _Cache(warmup=warmup, steps=steps, batch=batch, loader_workers=loader_workers, **switches)
    rows = [_measure_row(r, cache, log) for r in table.rows]
    # Calibration: the paper's declared reference row, measured in this same run.
    cal = CALIBRATION[table.paper]
    cal_row = next((r for r in rows if r["row"] == cal.label and cal.table == table_id), None)
    if cal_row is None:
        cal_row = _measure_row(CostRow(f"{cal.label} [{cal.table}]", cal.recipe, dict(cal.overrides), cal.paper),
                               cache, log)
    factor = None
    if cal_row.get("status") == "measured":
        measured = cal_row["measured_h_per_epoch"] if cal.per_epoch else cal_row["measured_total_device_h"]
        factor = calibration_factor(cal.paper, measured)
    key = "measured_h_per_epoch" if table.per_epoch else "measured_total_device_h"
    for r in rows + ([] if cal_row in rows else [cal_row]):
        if r.get("status") == "measured" and factor is not None:
            r["calibrated_h"] = calibrate(r[key], factor)
    by_label = {r["row"]: r for r in rows}
    for r in rows:
        ref = table.reference(r["row"])
        r["reference"] = ref
        ref_row = by_label.get(ref)
        if ref_row is None:
            continue
        m = speedups({ref: ref_row.get(key), r["row"]: r.get(key)}, ref)[r["row"]]
        p = speedups({ref: ref_row.get("paper_time"), r["row"]: r.get("paper_time")}, ref)[r["row"]]
        r["measured_speedup"], r["paper_speedup"] = m, p
        r["measured_over_paper"] = m / p if (m and p) else None
    profiles = {k: v for k, v in cache.by_key.items()}
    first = next(iter(profiles.values()), None)
    meta = {
        "table": table_id, "paper": table.paper, "unit": table.unit, "per_epoch": table.per_epoch,
        "source": table.source, "steps": steps, "warmup": warmup,
        "device": first["device"] if first else None, "device_type": first["device_type"] if first else None,
        "attention": first["attention"] if first else None, "precision": first["precision"] if first else None,
        "compile": first["compile"] if first else None, "compile_mode": first.get("compile_mode") if first else None,
        "fused_optim": first["fused_optim"] if first else None,
        "recompiles": sum(p["recompiles"] or 0 for p in profiles.values()),
        "mfu_peak": first["mfu_peak"] if first else None,
        "batch_rule": first["batch_rule"] if first else None, "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "calibration": {"table": cal.table, "row": cal.label, "paper": cal.paper, "hardware": cal.hardware,
                        "per_epoch": cal.per_epoch, "factor": factor,
                        "measured_row": cal_row["row"]},
        "command": f"repro profile {table_id} --steps {steps} --warmup {warmup}"
                   + (f" --compile {'on' if first['compile'] else 'off'}" if first else ""),
    }
    _write_outputs(table_id, repo_root, meta, rows, cal_row)
    if profiles:
        store_profiles(profiles, replace=store, log=log)
    return {"meta": meta, "rows": rows}


def _write_outputs(table_id: str, repo_root: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                   cal_row: dict[str, Any]) -> None:
    paper, tid = table_id.split("/", 1)
    tid += "-cost" + cost_suffix(meta.get("device"))
    tdir, pdir = repo_root / "tables" / paper, repo_root / "plots" / paper
    tdir.mkdir(parents=True, exist_ok=True)
    pdir.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(clean)
    atomic_write_text(tdir / f"{tid}.csv", buf.getvalue())
    extra = [] if cal_row in rows else [{k: v for k, v in cal_row.items() if not k.startswith("_")}]
    atomic_write_json(tdir / f"{tid}.json", {"meta": meta, "rows": clean, "calibration_row": extra})
    atomic_write_text(tdir / f"{tid}.md", render_markdown(meta, clean, extra))
    plot_speedups(meta, clean, pdir / f"{tid}.png")


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]], extra: list[dict[str, Any]]) -> str:
    unit = meta["unit"]
    per = "per epoch" if meta["per_epoch"] else "total"
    cal = meta["calibration"]
    lines = [
        f"# {meta['table']}: pretraining cost, measured vs paper",
        "",
        f"Measured {meta['date']} on **{meta['device']}** ({meta['precision']}; attention: {meta['attention']}; "
        f"torch.compile of the blocks: {_onoff(meta.get('compile'))} ({meta.get('recompiles')} recompiles after the "
        f"first step); fused AdamW: {_onoff(meta.get('fused_optim'))}; MFU against "
        f"{meta.get('mfu_peak') or 'no known peak'}; "
        f"torch {meta['torch']}); {meta['warmup']} warm-up + {meta['steps']} timed steps per configuration, median "
        f"step time; batch: {meta['batch_rule']}. One run: `{meta['command']}`. Rows source: {meta['source']}.",
        "",
        f"Paper time: {unit} ({per}). Speed-up = reference time / row time (each row's reference is named), "
        f"measured on the {per} device-hours projected for the paper's schedule (epochs x dataset images x "
        f"measured s/image), paper from the paper's own time column. Calibrated = measured x the factor that makes "
        f"the declared reference row '{cal['row']}' ({cal['table']}, {cal['paper']} {cal['hardware']}) match "
        f"the paper (factor {_fmt(cal['factor'], 4)}; measured in this run as '{cal['measured_row']}').",
        "",
        "| row | status | batch | s/step | img/s | MFU | loader img/s | JPEG loader img/s, CPU path | JPEG loader "
        "img/s, device path | GFLOPs/img fwd+bwd (counted) | analytic GFLOPs/img (tokens) | measured device-h/epoch "
        "| projected device-h total | calibrated " + unit + " | paper " + unit + " | reference | speed-up measured | "
        "speed-up paper | measured / paper |",
        "|" + "---|" * 19,
    ]
    for r in rows + extra:
        lines.append("| " + " | ".join([
            r["row"] + (f" (`{r['recipe']}` {r['overrides']})".rstrip() if r.get("recipe") else ""),
            r.get("status", ""), _fmt(r.get("batch")), _fmt(r.get("step_time_s")), _fmt(r.get("images_per_s")),
            f"{r['mfu']:.0%}" if r.get("mfu") else "—",
            _fmt(r.get("loader_images_per_s"), 1), _fmt(r.get("loader_jpeg_cpu_images_per_s"), 1),
            _fmt(r.get("loader_jpeg_device_images_per_s"), 1), _fmt(r.get("gflops_per_image"), 1),
            r.get("analytic", "—"),
            _fmt(r.get("measured_h_per_epoch"), 1), _fmt(r.get("measured_total_device_h"), 0),
            _fmt(r.get("calibrated_h"), 2 if meta["per_epoch"] else 1), _fmt(r.get("paper_time")),
            r.get("reference", "—") if r.get("reference") != r["row"] else "(itself)",
            _fmt(r.get("measured_speedup")), _fmt(r.get("paper_speedup")), _fmt(r.get("measured_over_paper")),
        ]) + " |")
    lines += ["", "Loader img/s: the method's own per-image training transform on decoded ImageNet-sized images "
              "(no JPEG decoding), with the recipe's `train.num_workers` (or `--loader-workers`) workers; JPEG "
              "loader: real JPEG files (ImageNet-sized), decoded by PIL in those workers (CPU path, `data.decode: "
              "cpu`) or read as bytes and decoded and augmented on the profile's device (device path, `data.decode: "
              "device`; — where the method's transform has none). When a loader figure is below the model's img/s, "
              "that loading path would be the bottleneck on this machine.", ""]
    return "\n".join(lines)


def plot_speedups(meta: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: measured vs paper speed-up against each row's reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("reference") and r.get("reference") != r["row"]
           and (r.get("measured_speedup") or r.get("paper_speedup"))]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(pts) + 2), 4.0))
    xs = range(len(pts))
    ax.bar([x - 0.2 for x in xs], [r.get("measured_speedup") or 0 for r in pts], 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], [r.get("paper_speedup") or 0 for r in pts], 0.4, label="paper")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['row']}\nvs {r['reference']}" for r in pts], fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("speed-up (reference time / row time)")
    ax.set_title(f"{meta['table']}: measured on {meta['device_type']} vs paper", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the FLOPs benchmark -----------------------------------------------------------------------------------------

FLOPS_CONFIGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("MAE", "mae", {}), ("LoMaR", "lomar", {}), ("LoMaR, 4 windows at every size", "lomar", {"method.num_windows": 4}),
    ("LocalMIM", "localmim", {}),
)
LOMAR_VIEWS = {224: 4, 384: 6, 448: 9}  # LoMaR paper Sec. 2.1 (the lomar, lomar_384, lomar_448 recipes)


def flops_benchmark(repo_root: Path, resolutions: Sequence[int] = (224, 384, 448), log: Any = print) -> Path:
    """FLOPs per image (fwd + bwd, attention counted) at each resolution for MAE, LoMaR and LocalMIM ViT-B/16,
    counted on one image and beside the analytic model; writes tables/efficiency/flops.md (+ .json)."""
    from repro.profile.bench import method_flops_per_image

    rows = []
    for label, recipe, ov in FLOPS_CONFIGS:
        for res in resolutions:
            o = {**ov, "data.img_size": res}
            if recipe == "lomar" and "method.num_windows" not in ov:
                o["method.num_windows"] = LOMAR_VIEWS.get(res, 4)
            cfg = resolve_row(recipe, o)
            log(f"  counting {label} at {res} px ...")
            f = method_flops_per_image(cfg)
            a = analytic_flops(cfg)
            rows.append({"method": label, "recipe": recipe, "img_size": res,
                         "overrides": " ".join(f"{k}={v}" for k, v in o.items()),
                         "gflops": f["total"] / 1e9, "gflops_forward": f["forward"] / 1e9,
                         "analytic_gflops": a["total"] / 1e9 if a else None, "tokens": describe(a)})
    base = {r["method"]: r["gflops"] for r in rows if r["img_size"] == resolutions[0]}
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# FLOPs per image, one pretraining step (forward + backward), ViT-B/16", "",
             f"Counted {date} with torch.utils.flop_counter.FlopCounterMode (torch {torch.__version__}) on one "
             "image, with the fused-attention formulas registered by repro.profile.flops (attention counted; a "
             "multiply-add = 2 FLOPs; norms and element-wise ops not counted). Analytic: repro.profile.cost. "
             "LoMaR uses 4 / 6 / 9 windows at 224 / 384 / 448 (paper Sec. 2.1); `x 224` is the ratio to the same "
             "method at 224. Command: `repro profile --flops`.", "",
             "| method | px | overrides | GFLOPs fwd+bwd | GFLOPs fwd | analytic GFLOPs (tokens) | x 224 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['img_size']} | {r['overrides']} | {r['gflops']:.1f} | "
                     f"{r['gflops_forward']:.1f} | {describe_analytic(r)} | {r['gflops'] / base[r['method']]:.2f} |")
    out = repo_root / "tables" / "efficiency"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "flops.json", {"date": date, "torch": torch.__version__, "rows": rows})
    return atomic_write_text(out / "flops.md", "\n".join(lines) + "\n")


def transfer_flops_benchmark(repo_root: Path, images: int = 2, log: Any = print) -> Path:
    """Training FLOPs per image (forward + backward) of every segment and detect recipe at paper scale, counted on
    the CPU on ``images`` synthetic images through each framework's own model (random weights); writes
    ``TRANSFER_FLOPS`` beside the stored profiles (what projections read) and tables/efficiency/transfer-flops.md."""
    from repro.config import list_recipes
    from repro.profile.flops import count_loss_flops
    from repro.profile.projection import TRANSFER_FLOPS, TRANSFER_REFERENCE, profiles_path
    from repro.resolve import resolve

    rows = []
    for kind in ("segment", "detect"):
        for name in list_recipes(kind)[kind]:
            cfg = resolve(name, "paper", kind=kind)
            framework = "mmseg" if kind == "segment" else cfg.get("framework")
            log(f"  counting {kind}/{name} ({framework}, {cfg['model']['arch']}, {cfg['data']['img_size']} px) ...")
            if kind == "segment":
                from repro.transfer.mmseg import synthetic_loss
            elif framework == "mmdet":
                from repro.transfer.mmdet import synthetic_loss
            else:
                from repro.transfer.detectron2 import synthetic_loss
            f = count_loss_flops(synthetic_loss(cfg, images))
            rows.append({"kind": kind, "recipe": name, "framework": framework, "arch": cfg["model"]["arch"],
                         "img_size": cfg["data"]["img_size"], "cost_key": cost_key(cfg),
                         "flops_per_image": f["total"] / images, "forward_flops_per_image": f["forward"] / images})
    ref = dict(TRANSFER_REFERENCE)
    counted = next(r for r in rows if (r["kind"], r["recipe"]) == (ref["kind"], ref["recipe"]))
    ref.update(flops_per_image=counted["flops_per_image"], flops_per_s=counted["flops_per_image"] / ref["s_per_image"])
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path = atomic_write_json(profiles_path().parent / TRANSFER_FLOPS,
                             {"date": date, "torch": torch.__version__, "images": images, "rows": rows,
                              "reference": ref})
    lines = ["# FLOPs per image, one transfer training step (forward + backward)", "",
             f"Counted {date} with torch.utils.flop_counter.FlopCounterMode (torch {torch.__version__}) on the CPU, "
             f"{images} synthetic images per recipe through the framework's own model with random weights "
             "(segmentation: random crops and labels, both heads; detection: 8 random boxes and box masks per image, "
             "the pipeline's largest training input). A multiply-add = 2 FLOPs. Command: `repro profile "
             "--transfer-flops`.", "",
             f"`repro plan` and the Slurm --time of these stages run them at the FLOP rate of one published "
             f"timing: {ref['source']}, which by the count below is {ref['flops_per_s'] / 1e12:.1f} TFLOP/s "
             f"({ref['flops_per_s'] / 312e12:.1%} of an A100's dense bf16 peak), assumed on any GPU.", "",
             "| kind | recipe | framework | arch | px | GFLOPs fwd+bwd | GFLOPs fwd |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['recipe']} | {r['framework']} | {r['arch']} | {r['img_size']} | "
                     f"{r['flops_per_image'] / 1e9:.0f} | {r['forward_flops_per_image'] / 1e9:.0f} |")
    atomic_write_text(repo_root / "tables" / "efficiency" / "transfer-flops.md", "\n".join(lines) + "\n")
    return path


def describe_analytic(r: dict[str, Any]) -> str:
    return r["tokens"] if r.get("tokens") else "n/a"


EVAL_TARGETS = ("finetune", "linear", "knn")


def is_recipe_target(t: str) -> bool:
    """A pretraining recipe (``mae``, ``pretrain/lomar``) or an evaluation target (``finetune/vit_base@mae``), not a
    table or a paper."""
    head = t.split("/", 1)[0]
    return ("/" not in t and t not in ("all", "lomar", "localmim", "extrema")) or head in ("pretrain", *EVAL_TARGETS)


def resolve_eval_target(target: str, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config, input pretraining config or None) of ``KIND/RECIPE`` (the recipe at paper scale) or
    ``KIND/RECIPE@PRETRAIN`` (``KIND/@PRETRAIN``: the pretraining's own ``evals`` recipe), configured as a plan
    configures that evaluation after the pretraining (``repro.pipeline.plan.eval_overrides``); ``overrides`` last."""
    from repro.config import deep_merge
    from repro.kinds import get_kind
    from repro.resolve import nested, resolve

    kind, _, rest = target.partition("/")
    recipe, _, after = rest.partition("@")
    sk = get_kind(kind)
    if not after:
        if not recipe:
            raise ConfigError(f"'{target}': name a {kind} recipe (see `repro recipes`), e.g. {kind}/RECIPE or "
                              f"{kind}/RECIPE@PRETRAIN")
        return resolve(recipe, "paper", list(overrides), kind=sk.recipes), None
    from repro.pipeline.plan import eval_overrides, input_eval_defaults

    pre = resolve(after, "paper", [], kind="pretrain")
    recipe = recipe or (pre.get("evals") or {}).get(kind) or sk.default_recipe or ""
    if not recipe:
        raise ConfigError(f"'{target}': pretraining {after} names no {kind} recipe; use {kind}/RECIPE@{after}")
    row = input_eval_defaults(after, kind=kind)
    ov = deep_merge(eval_overrides(pre, kind, recipe, row), nested(list(overrides)))
    return resolve(recipe, "paper", ov, kind=sk.recipes, paper_overrides=row), pre


def _profile_eval(target: str, overrides: Sequence[str], store: bool = False, **opts: Any) -> dict[str, Any]:
    """One evaluation target (``resolve_eval_target``): print the measurement and the projection of the stage's
    device-hours; store the profile in its set."""
    from repro.profile.projection import stage_work

    cfg, pre = resolve_eval_target(target, overrides)
    opts.pop("loader", None)
    opts.pop("loader_workers", None)
    prof = profile_config(cfg, input_cfg=pre, **opts)
    line = {k: prof[k] for k in ("kind", "recipe", "input", "img_size", "feature", "batch", "step_time_s",
                                 "images_per_s", "flops_per_image", "analytic_flops_per_image", "mfu", "device",
                                 "precision", "step_runs", "compile", "recompiles", "fused_optim", "cost_key")}
    work = stage_work(cfg)
    line["projection"] = (project(prof["s_per_image"], work[0], work[1]) if work
                          else "no paper-scale dataset size or schedule")
    print(json.dumps(line, indent=2, default=str), flush=True)
    store_profiles({prof["cost_key"]: prof}, replace=store)
    return prof


def main(targets: Sequence[str], repo_root: Path, *, warmup: int = 1, steps: int = 3, batch: int | None = None,
         flops: bool = False, loader_workers: int | None = None, overrides: Sequence[str] = (),
         json_out: Path | None = None, store: bool = False, transfer_flops: bool = False, **switches: Any) -> int:
    """The CLI: table ids (or ``all`` = the efficiency tables), a paper name, a pretraining recipe name, or an
    evaluation target (``finetune/RECIPE[@PRETRAIN]``, ``linear/...``, ``knn/...``: ``resolve_eval_target``);
    ``switches``: ``compile``, ``fused_optim``, ``loader``, ``trace`` of ``profile_config``; ``json_out``: every profile
    measured by this call, in one file; ``store``: replace stored profiles that timed more steps."""
    ids: list[str] = []
    measured: dict[str, Any] = {}
    for t in targets:
        if t == "all":
            ids += list(EFFICIENCY_TABLES)
        elif t in ("lomar", "localmim", "extrema"):
            ids += [i for i in EFFICIENCY_TABLES if i.startswith(t + "/")]
        elif t.split("/", 1)[0] in EVAL_TARGETS and "/" in t:
            measured[t] = _profile_eval(t, overrides, warmup=warmup, steps=steps, batch=batch,
                                        loader_workers=loader_workers, store=store, **switches)
            _dump(json_out, measured)
        elif "/" in t and not t.startswith("pretrain/"):
            if t not in EFFICIENCY_TABLES:
                raise ConfigError(f"'{t}' is not an efficiency table; valid: all, lomar, localmim, extrema, "
                                  f"{', '.join(EFFICIENCY_TABLES)}, a pretraining recipe (pretrain/NAME for "
                                  "one named as a paper), or an evaluation: finetune/RECIPE, linear/RECIPE, "
                                  "knn/RECIPE (@PRETRAIN: as planned after that pretraining)")
            ids.append(t)
        else:  # a recipe; `pretrain/lomar` is the recipe where `lomar` alone is the paper
            measured[t] = _profile_recipe(t.removeprefix("pretrain/"), overrides, warmup=warmup, steps=steps,
                                          batch=batch, loader_workers=loader_workers, store=store, **switches)
            _dump(json_out, measured)
    for i in dict.fromkeys(ids):
        res = profile_table(i, repo_root, warmup=warmup, steps=steps, batch=batch, loader_workers=loader_workers,
                            store=store, **switches)
        measured[i] = {"meta": res["meta"], "rows": [{k: v for k, v in r.items() if k != "_profile"}
                                                     for r in res["rows"]]}
        _dump(json_out, measured)
        name = f"{i}-cost{cost_suffix(res['meta'].get('device'))}"
        print(f"[profile] wrote tables/{name}.md, tables/{name}.csv, plots/{name}.png", flush=True)
    if flops:
        path = flops_benchmark(repo_root)
        print(f"[profile] wrote {path}", flush=True)
    if transfer_flops:
        path = transfer_flops_benchmark(repo_root)
        print(f"[profile] wrote {path} and tables/efficiency/transfer-flops.md", flush=True)
    return 0


def _dump(path: Path | None, measured: dict[str, Any]) -> None:
    """Rewrite ``path`` after every target, so a run cut short still leaves what it measured."""
    if path is not None:
        atomic_write_json(Path(path), measured)


def _profile_recipe(recipe: str, overrides: Sequence[str], store: bool = False, **opts: Any) -> dict[str, Any]:
    """One named recipe at paper scale (with dotted overrides): print the measurement and the projection."""
    from repro.resolve import resolve

    cfg = resolve(recipe, "paper", list(overrides), kind="pretrain")
    prof = profile_config(cfg, **opts)
    line = {k: prof[k] for k in ("recipe", "img_size", "batch", "step_time_s", "images_per_s", "loader_images_per_s",
                                 "loader_jpeg_cpu_images_per_s", "loader_jpeg_device_images_per_s",
                                 "flops_per_image", "analytic_flops_per_image", "mfu", "mfu_peak", "device",
                                 "precision", "attention", "compile", "graphs_compiled", "recompiles",
                                 "first_step_s", "fused_optim")}
    try:
        line["projection"] = project(prof["s_per_image"], train_images(cfg), float(cfg["optim"]["epochs"]))
    except ConfigError as e:
        line["projection"] = str(e)
    print(json.dumps(line, indent=2, default=str), flush=True)
    store_profiles({cost_key(cfg): prof}, replace=store)
    return prof


def cli_main(args: Any) -> int:
    """``repro profile``: split TARGETs from key=value overrides, then run ``main`` (or ``--side-by-side`` /
    ``--import``)."""
    targets = [t for t in args.targets if "=" not in t]
    overrides = [t for t in args.targets if "=" in t] + list(args.overrides)
    side, imports = getattr(args, "side_by_side", None), getattr(args, "import_json", None)
    store = bool(getattr(args, "store", False))
    if side or imports:
        if targets or overrides or args.flops or getattr(args, "transfer_flops", False):
            raise ConfigError("--side-by-side / --import read measured files; they take no targets")
        if imports:
            import_profiles([Path(p) for p in imports], store=store)
        if side:
            from repro.profile.sidebyside import write_side_by_side

            for path in write_side_by_side(Path(side), repo_root()):
                print(f"[profile] wrote {path}", flush=True)
        return 0
    transfer = bool(getattr(args, "transfer_flops", False))
    if not targets and not args.flops and not transfer:
        raise ConfigError("name what to profile: an efficiency table (e.g. lomar/t1), a paper, `all`, a pretraining "
                          "recipe, or --flops / --transfer-flops")
    if overrides and not all(is_recipe_target(t) for t in targets):
        raise ConfigError("key=value overrides apply to a recipe target only; tables use their paper configurations")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")
    switch = {"on": True, "off": False, "auto": None}
    return main(targets, repo_root(), warmup=args.warmup, steps=args.steps, batch=args.batch, flops=args.flops,
                transfer_flops=transfer, loader_workers=args.loader_workers, overrides=overrides,
                json_out=Path(args.json) if getattr(args, "json", None) else None, store=store,
                compile=switch[getattr(args, "compile", "auto")],
                fused_optim=switch[getattr(args, "fused_optim", "auto")], loader=not getattr(args, "no_loader", False),
                trace=Path(args.trace) if getattr(args, "trace", None) else None)
