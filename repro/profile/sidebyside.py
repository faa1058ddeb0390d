"""``repro profile --side-by-side DIR``: the official code and ours, per paper pretraining configuration, from one
GPU job's measured files (no number typed by hand).

DIR holds ``official*.json`` (../shared/bench/bench_official.py's or benchmarks/official/bench_localmim.py's
``--json``: per configuration the official code's median step; e.g. official.json + official-localmim.json) and
``repro-*.json`` (``repro profile --json``: our profiles, eager / fused AdamW / compiled, and cost tables whose rows
carry step times). Writes ``tables/efficiency/side-by-side-<device>.md`` and ``.csv``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from repro.config import ConfigError
from repro.io import atomic_write_text
from repro.profile.bench import cost_key
from repro.profile.tables import resolve_row

# (label, official benchmark config, our recipe): the paper configurations measured side by side.
CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("MAE 224", "mae-224", "mae"), ("MAE 384", "mae-384", "mae_384"), ("MAE 448", "mae-448", "mae_448"),
    ("LoMaR 224 (4 windows)", "lomar-224", "lomar"), ("LoMaR 384 (6 windows)", "lomar-384", "lomar_384"),
    ("LoMaR 448 (9 windows)", "lomar-448", "lomar_448"),
    ("ExtreMA 80% x1", "extrema-x1", "extrema_1mask"), ("ExtreMA 80% x2", "extrema-x2", "extrema_2mask"),
    ("ExtreMA 80% x5", "extrema-x5", "extrema"),
)
# Listed only when DIR measured them (either side): benchmarks/official/bench_localmim.py's configurations.
LATER_CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("LocalMIM 224", "localmim-vit-224", "localmim"),
    ("LocalMIM Swin-B 224", "localmim-swin-224", "localmim_swin_base"),
    ("SimMIM 224", "simmim-vit-224", "simmim"),
    ("SimMIM Swin-B 192", "simmim-swin-192", "simmim_swin_base"),
)
MODES = ("eager", "eager + fused AdamW", "compiled + fused AdamW")


def official_files(directory: Path) -> list[Path]:
    """The official code's benchmark outputs in DIR: official.json first, then the other official*.json by name."""
    return sorted(Path(directory).glob("official*.json"), key=lambda p: (p.name != "official.json", p.name))


def _official(paths: list[Path]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Official config -> {s_per_step, batch, peak_gib, runs} (or {error} for a configuration that failed), and what
    the runs share (device, torch, timm, amp: several values joined by " / ")."""
    runs: list[dict[str, Any]] = []
    aggs: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for path in paths:
        data = json.loads(path.read_text())
        runs += [r for r in data.get("runs", []) if r.get("mode", "default") == "default" and "error" not in r]
        for a in data.get("agg", []):
            if a.get("mode", "default") == "default":
                aggs.setdefault(a["config"], []).append(a)
        errors.update({e["config"]: e.get("error", "failed") for e in data.get("errors", [])})
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        o = out.setdefault(r["config"], {"s_per_step": [], "batch": r["batch"], "peak_gib": None,
                                         "warmup": r.get("warmup"), "steps": r.get("steps")})
        o["s_per_step"].append(r["s_per_step"])
        if r.get("peak_cuda_MiB"):
            o["peak_gib"] = max(o["peak_gib"] or 0.0, r["peak_cuda_MiB"] / 1024)
    for c, o in out.items():
        o["runs"] = len(o["s_per_step"])
        one = aggs.get(c, [])
        o["s_per_step"] = one[0]["s_per_step"] if len(one) == 1 else float(pd.Series(o["s_per_step"]).median())
    for c, err in errors.items():
        out.setdefault(c, {"error": err})
    env: dict[str, Any] = {}
    for k in ("device", "torch", "timm", "amp"):
        values = list(dict.fromkeys(r.get(k) for r in runs))
        env[k] = " / ".join(str(v) for v in values) if len(values) > 1 else (values[0] if values else None)
    env["devices"] = sorted({r["device"] for r in runs if r.get("device")})
    env["official_files"] = [p.name for p in paths]
    return out, env


def _ours(directory: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Our profiles in DIR: mode -> cost key -> profile (recipe targets' full profiles over table-row ones)."""
    from repro.profile.run import profiles_from_json

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for set_name, profs in profiles_from_json([directory]).items():
        out.setdefault(set_name.rsplit(" | ", 1)[1], {}).update(profs)
    return out


def _match(profs: dict[str, dict[str, Any]], key: str, recipe: str) -> dict[str, Any] | None:
    """Our profile of a configuration: by cost key, else (recipes edited since) a full profile of the recipe."""
    if key in profs:
        return profs[key]
    return next((p for p in profs.values() if p.get("recipe") == recipe and not p.get("derived_from")), None)


def side_by_side(directory: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per configuration: official s/step and img/s; ours per mode (img/s, ratio to official, MFU); the
    compiled run's first-step time, graphs and recompiles. Returns the frame and what the run shares."""
    official, env = _official(official_files(directory))
    ours = _ours(directory)
    devices = {p["device"] for m in ours.values() for p in m.values()}
    devices |= set(env.pop("devices"))
    if len(devices) != 1:
        raise ConfigError(f"{directory}: measurements from {len(devices)} devices ({', '.join(sorted(devices))}); a "
                          "side-by-side table compares one device")
    rows: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    for label, off_name, recipe in CONFIGS + LATER_CONFIGS:
        key = cost_key(resolve_row(recipe, {}))
        off = official.get(off_name)
        if (label, off_name, recipe) in LATER_CONFIGS and off is None and not any(
                _match(ours.get(mode, {}), key, recipe) for mode in MODES):
            continue  # not measured by this job
        row: dict[str, Any] = {"config": label, "official_config": off_name, "recipe": recipe}
        if off and "error" in off:
            row["official_error"] = off["error"]
            off = None
        if off:
            row.update({"official_batch": off["batch"], "official_s_per_step": off["s_per_step"],
                        "official_img_per_s": off["batch"] / off["s_per_step"], "official_peak_gib": off["peak_gib"]})
        for mode in MODES:
            p = _match(ours.get(mode, {}), key, recipe)
            if p is None:
                continue
            seen.append(p)
            tag = mode.replace(" + fused AdamW", "_fused").replace(" ", "_")
            row[f"{tag}_img_per_s"] = p["images_per_s"]
            row[f"{tag}_s_per_step"] = p["step_time_s"]
            row[f"{tag}_batch"] = p["batch"]
            row[f"{tag}_mfu"] = p.get("mfu")
            if off:
                row[f"{tag}_over_official"] = p["images_per_s"] / row["official_img_per_s"]
            if mode.startswith("compiled"):
                row.update({"compiled_first_step_s": p.get("first_step_s"), "compiled_graphs": p.get("graphs_compiled"),
                            "compiled_recompiles": p.get("recompiles")})
        rows.append(row)
    first = seen[0] if seen else {}
    env.update({"device": devices.pop(), "our_torch": first.get("torch"), "precision": first.get("precision"),
                "attention": first.get("attention"), "mfu_peak": first.get("mfu_peak"),
                "dates": sorted({p["date"] for p in seen if p.get("date")}),
                "our_steps": sorted({(p.get("warmup_steps"), p.get("timed_steps")) for p in seen}, key=str)})
    return pd.DataFrame(rows), env


def _x(v: Any, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and pd.isna(v)) else format(v, fmt)


def render(df: pd.DataFrame, env: dict[str, Any], source: str) -> str:
    def ours(r: pd.Series, tag: str) -> str:
        v = r.get(f"{tag}_img_per_s")
        if v is None or pd.isna(v):
            return "not measured"
        ratio = r.get(f"{tag}_over_official")
        return f"{v:.0f} ({_x(ratio, '.2f')}x)"

    def official_img_per_s(r: pd.Series) -> str:
        err = r.get("official_error")
        return "failed" if isinstance(err, str) else _x(r.get("official_img_per_s"), ".0f")

    dates = env["dates"]
    steps = ", ".join(f"{w} + {s}" for w, s in env["our_steps"])
    files = env.get("official_files") or ["official.json"]
    later = set(df["config"]) & {c[0] for c in LATER_CONFIGS}
    bench = "../shared/bench/bench_official.py" + (
        ", benchmarks/official/bench_localmim.py" if later or files != ["official.json"] else "")
    attention = "authors' explicit softmax attention in LoMaR and ExtreMA"
    if later:
        attention += ("; timm's fused SDPA in LocalMIM's ViT and decoders, the authors' explicit softmax (with "
                      "relative position bias) in LocalMIM's Swin encoder and in SimMIM")
    named = " unless named" if any("Swin" in c for c in df["config"]) else ""
    lines = [
        f"# Official code vs ours, side by side on {env['device']}", "",
        f"One GPU job: the official code ({bench}, torch {env['torch']}, timm {env['timm']}, "
        f"{env['amp']} autocast) and ours (`repro profile --json`, torch {env['our_torch']}, {env['precision']}; "
        f"attention: {env['attention']}), random images, median step of each ({steps} warm-up + timed steps for "
        f"ours; the official runs' counts are in {', '.join(files)}), measured {dates[0] if dates else '?'}"
        f"{' to ' + dates[-1] if len(dates) > 1 else ''}. Official attention: timm's fused SDPA in MAE (timm 1.x), the "
        f"{attention}. Images/s with the ratio to the official code in "
        f"brackets (target: >= 1.3x); MFU = counted FLOPs per image (fwd+bwd) x images/s / {env['mfu_peak']} "
        "(target: >= 40% for ViT-B at 224). First step: the compiled run's first step (compilation included); "
        "recompiles: graphs made after it. Peak memory: the official runs' (ours in that job were not reset between "
        "configurations of one process, so they are not shown).", "",
        f"Source: `{source}`. Regenerate: `repro profile --side-by-side {source}`.", "",
        f"| config (ViT-B/16{named}) | batch | official s/step | official img/s | ours eager | "
        "ours eager + fused AdamW | ours compiled + fused AdamW | ours s/step (compiled) | MFU eager | MFU compiled "
        "| first step s (compiled) | graphs / recompiles | official peak GiB |",
        "|" + "---|" * 13,
    ]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join([
            r["config"], _x(r.get("official_batch"), ".0f"), _x(r.get("official_s_per_step"), ".4f"),
            official_img_per_s(r), ours(r, "eager"), ours(r, "eager_fused"),
            ours(r, "compiled_fused"), _x(r.get("compiled_fused_s_per_step"), ".4f"),
            _x(r.get("eager_mfu"), ".0%"), _x(r.get("compiled_fused_mfu"), ".0%"),
            _x(r.get("compiled_first_step_s"), ".1f"),
            f"{_x(r.get('compiled_graphs'), '.0f')} / {_x(r.get('compiled_recompiles'), '.0f')}",
            _x(r.get("official_peak_gib"), ".1f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def write_side_by_side(directory: Path, repo_root: Path) -> list[Path]:
    """Write ``tables/efficiency/side-by-side-<device>.md`` and ``.csv`` from DIR's measured files."""
    from repro.profile.run import cost_suffix

    directory = Path(directory)
    if not official_files(directory):
        raise ConfigError(f"{directory}: no official*.json (the official code's benchmark output)")
    df, env = side_by_side(directory)
    try:
        source = str(directory.resolve().relative_to(Path(repo_root).resolve()))
    except ValueError:
        source = str(directory)
    out = Path(repo_root) / "tables" / "efficiency"
    out.mkdir(parents=True, exist_ok=True)
    name = "side-by-side" + (cost_suffix(env["device"]).replace(".", "-", 1) or "-cpu")
    return [atomic_write_text(out / f"{name}.md", render(df, env, source)),
            atomic_write_text(out / f"{name}.csv", df.to_csv(index=False, float_format="%.6g"))]
