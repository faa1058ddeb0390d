"""``repro profile --side-by-side DIR``: the official code and ours, per paper pretraining configuration, from one
GPU job's measured files (no number typed by hand).

DIR (a job folder, e.g. ``tables/efficiency/gpu/h200-2026-11-26b``) holds ``official*.json``
(../shared/bench/bench_official.py's or benchmarks/official/bench_extra.py's ``--json``: per configuration the
official code's median step) and ``repro-*.json`` (``repro profile --json``: our profiles and cost tables whose rows
carry step times). A profile that a job's log (``log*.txt``) printed under a section whose ``--json`` file did not
come back is read from the log (marked in the table). Our profiles are told apart by mode: eager / compiled (CUDA
graphs when ``train.compile_mode=reduce-overhead``), fused AdamW or not, and a batch other than the job's usual one
as a mode of its own, so no measurement replaces another.

Writes, per job, ``tables/efficiency/side-by-side-<device>-<job>.md`` and ``.csv`` (the table, where the device
time goes by kernel category from ``--trace`` profiles, and the input pipeline's figures), and per device the index
``side-by-side-<device>.md`` / ``.csv``: each configuration from the newest job that measured it on both sides.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from repro.config import ConfigError
from repro.io import atomic_write_text
from repro.profile.bench import KERNEL_CATEGORIES
from repro.profile.projection import CUDA_GRAPHS, compile_label, cost_key, profiles_from_json, variant_of
from repro.profile.tables import cost_suffix, resolve_row

# (label, official benchmark config, our recipe): the paper configurations measured side by side.
CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("MAE 224", "mae-224", "mae"), ("MAE 384", "mae-384", "mae_384"), ("MAE 448", "mae-448", "mae_448"),
    ("LoMaR 224 (4 windows)", "lomar-224", "lomar"), ("LoMaR 384 (6 windows)", "lomar-384", "lomar_384"),
    ("LoMaR 448 (9 windows)", "lomar-448", "lomar_448"),
    ("ExtreMA 80% x1", "extrema-x1", "extrema_1mask"), ("ExtreMA 80% x2", "extrema-x2", "extrema_2mask"),
    ("ExtreMA 80% x5", "extrema-x5", "extrema"),
)
# Then benchmarks/official/bench_extra.py's configurations, and configurations with no official benchmark (ours
# only). A job lists the configurations it measured (either side). BEiT twice against the same recipe of ours (which
# runs its k-means tokenizer in the step): the official model step with the token ids given, and with the official
# DALL-E dVAE forward (random weights) that makes them. MaskFeat: SlowFast's code imports only with packages the GPU
# image lacks, so only CPU jobs measure its official step (benchmarks/official/export_maskfeat.sh says why).
LATER_CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("LocalMIM 224", "localmim-vit-224", "localmim"),
    ("LocalMIM Swin-B 224", "localmim-swin-224", "localmim_swin_base"),
    ("SimMIM 224", "simmim-vit-224", "simmim"),
    ("SimMIM Swin-B 192", "simmim-swin-192", "simmim_swin_base"),
    ("BEiT 224", "beit-224", "beit"),
    ("BEiT 224 (official + its dVAE)", "beit-224-dvae", "beit"),
    ("GreenMIM Swin-B 224", "greenmim-swin-224", "greenmim_swin_base"),
    ("MaskFeat 224", "maskfeat-224", "maskfeat"),
)
# Official benchmarks that only a CPU job can run (their code does not import on the GPU image).
CPU_ONLY = frozenset({"maskfeat-224"})
# Always columns of the table (measured or not); other modes a job measured follow them.
MODES = ("eager", "eager + fused AdamW", "compiled + fused AdamW")
COMPILED = "compiled + fused AdamW"
LOG_MARK = "‡"


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
    env["official_batches"] = [r["batch"] for r in runs]
    return out, env


_SECTION = re.compile(r"^### (\S+): start .* :: (.*)$")


def log_profiles(directory: Path) -> list[dict[str, Any]]:
    """Profiles printed in DIR's ``log*.txt`` (``repro profile``'s summary of each recipe target) under a section
    whose command wrote a ``--json`` file that is not in DIR (it did not come back from the device); each marked
    with ``_from``. The command's ``--warmup`` / ``--steps`` and ``train.compile_mode=`` fill what the summary
    lacks."""
    out: list[dict[str, Any]] = []
    for log in sorted(Path(directory).glob("log*.txt")):
        cmd: str | None = None
        buf: list[str] | None = None
        for line in log.read_text().splitlines():
            m = _SECTION.match(line)
            if m:
                js = re.search(r"--json\s+(\S+)", m.group(2))
                lost = js is not None and not (Path(directory) / Path(js.group(1)).name).exists()
                cmd, buf = (m.group(2) if lost else None), None
                src = f"{log.name} ({Path(js.group(1)).name} did not come back)" if lost and js else ""
                continue
            if line.startswith("### "):
                cmd, buf = None, None
            if cmd is None:
                continue
            if line == "{":
                buf = [line]
            elif buf is not None:
                buf.append(line)
                if line == "}":
                    p = json.loads("\n".join(buf))
                    buf = None
                    if "recipe" not in p or "images_per_s" not in p:
                        continue
                    ov = dict(t.split("=", 1) for t in cmd.split() if "=" in t and not t.startswith("-"))
                    num = {k: re.search(rf"--{k}\s+(\d+)", cmd) for k in ("warmup", "steps")}
                    p.update({"_from": src, "compile_mode": p.get("compile_mode", ov.get("train.compile_mode")),
                              "warmup_steps": int(num["warmup"].group(1)) if num["warmup"] else None,
                              "timed_steps": int(num["steps"].group(1)) if num["steps"] else None,
                              "cost_key": cost_key(resolve_row(p["recipe"], {k: v for k, v in ov.items()
                                                                              if not k.startswith("train.")}))})
                    out.append(p)
    return out


def _file_profiles(directory: Path) -> list[dict[str, Any]]:
    """Our profiles in DIR's repro-*.json, each marked with its file (``_from``), in the order later ones win: a
    cost-table row's derived profile before any full profile, then by file name."""
    found: list[tuple[bool, int, dict[str, Any]]] = []
    for i, f in enumerate(sorted(Path(directory).glob("repro-*.json"))):
        for profs in profiles_from_json([f], variants=True).values():
            found += [(not p.get("derived_from"), i, {**p, "_from": f.name}) for p in profs.values()]
    return [p for *_, p in sorted(found, key=lambda t: (t[0], t[1]))]


def mode_of(prof: dict[str, Any], batch: int | None) -> str:
    """A profile's mode: eager / compiled (+ CUDA graphs, or another torch.compile mode), + fused AdamW, and
    ``, batch N`` when its batch is not the job's usual ``batch``."""
    mode = compile_label(prof)
    if prof.get("fused_optim"):
        mode += " + fused AdamW"
    mode += variant_of(prof)
    if batch is not None and prof.get("batch") not in (None, batch):
        mode += f", batch {prof['batch']}"
    return mode


def mode_tag(mode: str) -> str:
    """CSV column prefix of a mode: ``eager``, ``eager_fused``, ``compiled_fused``, ``compiled_cudagraphs_fused``,
    ``compiled_fused_b256``."""
    tag = mode.replace(" + fused AdamW", "_fused").replace(" + CUDA graphs", "_cudagraphs")
    tag = re.sub(r", batch (\d+)", r"_b\1", tag)
    return re.sub(r"[^a-z0-9_]+", "_", tag.lower()).strip("_")


def _mode_order(mode: str) -> tuple[int, int, str]:
    """The usual batch first (MODES, then other modes by name), then each larger batch."""
    base = mode.split(", batch ")[0]
    batch = int(mode.split(", batch ")[1]) if ", batch " in mode else 0
    return (batch, MODES.index(base) if base in MODES else len(MODES), mode)


def _match(profs: dict[str, dict[str, Any]], key: str, recipe: str) -> dict[str, Any] | None:
    """Our profile of a configuration: by cost key, else (recipes edited since) a full profile of the recipe."""
    if key in profs:
        return profs[key]
    return next((p for p in profs.values() if p.get("recipe") == recipe and not p.get("derived_from")), None)


def trace_summary(prof: dict[str, Any]) -> dict[str, Any] | None:
    """From a profile's ``trace`` (``repro profile --trace``): the device's idle fraction of the timed step (1 - the
    traced kernels' time per step / the median timed step: the profiler's own host overhead lengthens the traced
    steps, not the kernels) and of the traced step, busy and wall s/step, s/step by kernel category, and the largest
    category other than matmul."""
    t = prof.get("trace")
    if not t or t.get("device_idle_fraction") is None:
        return None
    busy, step = t.get("device_busy_s_per_step"), prof.get("step_time_s")
    cats = dict(t.get("device_s_per_step_by_category") or {})
    other = {k: v for k, v in cats.items() if k != "matmul"}
    top = max(other.items(), key=lambda kv: kv[1]) if other else (None, None)
    return {"idle": max(0.0, 1 - busy / step) if busy is not None and step else None,
            "idle_traced": t["device_idle_fraction"], "busy_s": busy, "step_s": step,
            "wall_s": t.get("wall_s_per_step"), "host_calls": t.get("host_calls_per_step"),
            "kernels": t.get("kernels_per_step"), "by_category": cats, "top_non_matmul": top[0],
            "top_non_matmul_s": top[1], "file": Path(str(t.get("table") or "")).name, "label": t.get("label")}


def side_by_side(directory: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per configuration: official s/step and img/s; ours per mode (img/s, ratio to official, MFU, where it
    was read); the compiled run's first-step time, graphs and recompiles and its trace's idle fraction and largest
    non-matmul kernel category. Returns the frame and what the job shares (``modes``, ``traces``, ``loaders``)."""
    directory = Path(directory)
    official, env = _official(official_files(directory))
    files, logged = _file_profiles(directory), log_profiles(directory)
    ours_devices, official_devices = {p["device"] for p in files + logged}, set(env.pop("devices"))
    if "cpu" in official_devices and len(ours_devices) == 1 and next(iter(ours_devices)).startswith("CPU"):
        # bench_official.py names any CPU "cpu" (bench_extra.py as ours does); the job ran on one machine
        official_devices = (official_devices - {"cpu"}) | ours_devices
    devices = ours_devices | official_devices
    if len(devices) != 1:
        raise ConfigError(f"{directory}: measurements from {len(devices)} devices ({', '.join(sorted(devices))}); a "
                          "side-by-side table compares one device")
    batches = Counter(env.pop("official_batches") or [p["batch"] for p in files + logged if p.get("batch")])
    batch = batches.most_common(1)[0][0] if batches else None
    # a recipe's usual batch: its official configuration's (a CPU job runs 8 at 224 px, 4 above), else the job's
    usual = {recipe: official[off]["batch"] for _, off, recipe in CONFIGS + LATER_CONFIGS
             if "batch" in official.get(off, {})}

    def prof_mode(p: dict[str, Any]) -> str:
        return mode_of(p, usual.get(p.get("recipe"), batch))

    ours: dict[str, dict[str, dict[str, Any]]] = {}
    for p in files:  # later ones win
        ours.setdefault(prof_mode(p), {})[p["cost_key"]] = p
    for p in logged:  # only where no file has the measurement (a file's key may predate a cost-free recipe edit)
        same = ours.setdefault(prof_mode(p), {})
        if not any(f.get("recipe") == p.get("recipe") and not f.get("derived_from") for f in same.values()):
            same.setdefault(p["cost_key"], p)
    modes = sorted(set(MODES) | set(ours), key=_mode_order)
    rows: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    traces: list[dict[str, Any]] = []
    for label, off_name, recipe in CONFIGS + LATER_CONFIGS:
        key = cost_key(resolve_row(recipe, {}))
        off = official.get(off_name)
        found = [p for mode in modes if (p := _match(ours.get(mode, {}), key, recipe))]
        if off is None and not [p for p in found if not p.get("derived_from")]:
            continue  # no official run and ours only from a cost table's row: not measured by this job
        if off is None and any(r["recipe"] == recipe for r in rows):
            continue  # ours is in an earlier row already; this one only adds an official variant
        row: dict[str, Any] = {"config": label, "official_config": off_name or None, "recipe": recipe}
        if off and "error" in off:
            row["official_error"] = off["error"]
            off = None
        if off:
            row.update({"official_batch": off["batch"], "official_s_per_step": off["s_per_step"],
                        "official_img_per_s": off["batch"] / off["s_per_step"], "official_peak_gib": off["peak_gib"]})
        for mode in modes:
            p = _match(ours.get(mode, {}), key, recipe)
            if p is None:
                continue
            seen.append(p)
            tag = mode_tag(mode)
            row[f"{tag}_img_per_s"] = p["images_per_s"]
            row[f"{tag}_s_per_step"] = p["step_time_s"]
            row[f"{tag}_batch"] = p["batch"]
            row[f"{tag}_mfu"] = p.get("mfu")
            if off:
                row[f"{tag}_over_official"] = p["images_per_s"] / row["official_img_per_s"]
            row[f"{tag}_from"] = p["_from"]
            tr = trace_summary(p)
            if tr:
                traces.append({"config": label, "mode": mode, "images_per_s": p["images_per_s"], **tr})
                row[f"{tag}_device_idle_fraction"] = tr["idle"]
                row[f"{tag}_device_idle_fraction_traced"] = tr["idle_traced"]
                row[f"{tag}_top_non_matmul"] = tr["top_non_matmul"]
                row[f"{tag}_top_non_matmul_ms"] = tr["top_non_matmul_s"] * 1e3
            if mode == COMPILED:
                row.update({"compiled_first_step_s": p.get("first_step_s"), "compiled_graphs": p.get("graphs_compiled"),
                            "compiled_recompiles": p.get("recompiles")})
        rows.append(row)
    first = next((p for p in seen if p.get("torch")), seen[0] if seen else {})
    env.update({"device": devices.pop(), "our_torch": first.get("torch"), "precision": first.get("precision"),
                "attention": first.get("attention"), "mfu_peak": first.get("mfu_peak"), "batch": batch,
                "dates": sorted({p["date"] for p in seen if p.get("date")}),
                "our_steps": sorted({(p.get("warmup_steps"), p.get("timed_steps")) for p in seen}, key=str),
                "modes": [m for m in modes if m in MODES or any(f"{mode_tag(m)}_img_per_s" in r for r in rows)],
                "traces": traces, "job": directory.name, "readme": (directory / "README.md").is_file(),
                "logged": sorted({p["_from"] for p in seen if p["_from"].startswith("log")})})
    env["loaders"] = _loaders([p for m in modes for p in ours.get(m, {}).values()], rows, env["modes"], prof_mode)
    return pd.DataFrame(rows), env


def _loaders(profs: list[dict[str, Any]], rows: list[dict[str, Any]], modes: list[str],
             mode: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """The input pipeline's figures of each profile that measured them, beside the model: that profile's img/s (its
    mode: ``mode(profile)``) and the fastest img/s of the same configuration in this job (any of ``modes``)."""
    out = []
    for p in profs:
        if p.get("loader_images_per_s") is None and p.get("loader_jpeg_cpu_images_per_s") is None:
            continue
        label = next((c[0] for c in CONFIGS + LATER_CONFIGS if c[2] == p.get("recipe")), str(p.get("recipe")))
        row = next((r for r in rows if r["config"] == label), {})
        found = [(v, m) for m in modes if (v := row.get(f"{mode_tag(m)}_img_per_s")) is not None and not pd.isna(v)]
        fastest = max(found, key=lambda t: t[0], default=(None, None))
        jpeg = p.get("loader_jpeg") or {}
        out.append({"config": label, "mode": mode(p), "from": p["_from"], "batch": p.get("batch"),
                    "workers": jpeg.get("workers"), "decoded": p.get("loader_images_per_s"),
                    "jpeg_cpu": p.get("loader_jpeg_cpu_images_per_s"),
                    "jpeg_device": p.get("loader_jpeg_device_images_per_s"), "jpeg": jpeg,
                    "model": p["images_per_s"], "fastest": fastest[0], "fastest_mode": fastest[1]})
    return out


def _x(v: Any, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and pd.isna(v)) else format(v, fmt)


def _rate(v: float) -> str:
    """Images/s: whole numbers from 100 up, three significant digits below (a CPU step takes seconds)."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _drop_empty_columns(lines: list[str]) -> list[str]:
    """A markdown table (header, rule, rows) without the columns no row has a figure in."""
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    keep = [j for j in range(len(cells[0]))
            if any(row[j].strip() not in ("—", "not measured", "— / —") for row in cells[2:])]
    return ["| " + " | ".join(row[j] for j in keep) + " |" if i != 1 else "|" + "---|" * len(keep)
            for i, row in enumerate(cells)]


def _get(r: pd.Series, k: str) -> Any:
    v = r.get(k)
    return None if v is None or (isinstance(v, float) and pd.isna(v)) else v


def _short(mode: str) -> str:
    return mode.replace(" + fused AdamW", "")


def render(df: pd.DataFrame, env: dict[str, Any], source: str) -> str:
    """The job's markdown: the side-by-side table, then where the device time goes and the input pipeline."""
    modes = env.get("modes") or list(MODES)

    def ours(r: pd.Series, mode: str) -> str:
        tag = mode_tag(mode)
        v = _get(r, f"{tag}_img_per_s")
        if v is None:
            return "not measured"
        mark = LOG_MARK if str(_get(r, f"{tag}_from") or "").startswith("log") else ""
        ratio = _get(r, f"{tag}_over_official")
        return _rate(v) + (f" ({ratio:.2f}x)" if ratio is not None else "") + mark

    def official_img_per_s(r: pd.Series) -> str:
        if isinstance(_get(r, "official_error"), str):
            return "failed"
        if not _get(r, "official_config"):
            return "no official benchmark"
        measured = _get(r, "official_img_per_s")
        if measured is None and _get(r, "official_config") in CPU_ONLY and not on_cpu(env["device"]):
            return "CPU jobs only"
        return _rate(measured) if measured is not None else "not measured in this job"

    dates = env["dates"]
    steps = ", ".join(f"{w} + {s}" for w, s in env["our_steps"])
    files = env.get("official_files") or ["official.json"]
    later = set(df["config"]) & {c[0] for c in LATER_CONFIGS}
    bench = "../shared/bench/bench_official.py" + (
        ", benchmarks/official/bench_extra.py" if files != ["official.json"] else "")
    attention = "authors' explicit softmax attention in LoMaR and ExtreMA"
    if later:
        attention += ("; timm's fused SDPA in LocalMIM's ViT and decoders, the authors' explicit softmax (with "
                      "relative position bias) in LocalMIM's Swin encoder and in SimMIM")
    if later & {c[0] for c in LATER_CONFIGS if c[1].startswith(("beit", "greenmim"))}:
        attention += ("; the authors' explicit softmax with a shared relative position bias in BEiT and with "
                      "GreenMIM's group mask in its Swin encoder (timm's fused SDPA in its decoder). BEiT's official "
                      "step has no tokenizer (ids given) or the official DALL-E dVAE encoder (random weights, fp16 "
                      "convs); ours runs its k-means substitute tokenizer in the step")
    named = " unless named" if any("Swin" in c for c in df["config"]) else ""
    extra = [m for m in modes if m not in MODES]
    traced = "compiled_fused_device_idle_fraction" in df.columns
    cols = ([f"config (ViT-B/16{named})", "batch", "official s/step", "official img/s"]
            + [f"ours {m}" for m in modes] + ["ours s/step (compiled)", "MFU eager", "MFU compiled"]
            + [f"MFU {_short(m)}" for m in extra] + ["first step s (compiled)", "graphs / recompiles"]
            + (["device idle % (compiled)", "largest non-matmul kernels (compiled), ms/step"] if traced else [])
            + ["official peak GiB"])
    notes = []
    if extra:
        notes.append(f"Other modes of this job: {'; '.join(extra)}.")
        if any("CUDA graphs" in m for m in extra):
            notes.append(f"CUDA graphs: `train.compile_mode={CUDA_GRAPHS}` (torch.compile's mode that captures them).")
        if any(", batch " in m for m in extra):
            notes.append(f"A batch other than the job's {env.get('batch')} is a mode of its own; its ratio compares "
                         "its images/s with the official code's at the official batch.")
    if env.get("readme"):
        notes.append("The job's README (in its folder) says which device call measured what and the code each ran.")
    if env.get("logged"):
        notes.append(f"{LOG_MARK}: read from the job's log, its printed summary of the profile "
                     f"({'; '.join(env['logged'])}).")
    if traced:
        notes.append("Device idle % and kernel categories: `repro profile --trace` (torch.profiler over a few more "
                     "steps after the timed ones); idle = 1 - the traced kernels' summed time per step / the median "
                     "timed step: the share of the step the device waits on the host.")
    cpu = on_cpu(env["device"])
    amp = "fp32" if env["amp"] in (None, "fp32") else f"{env['amp']} autocast"
    target = ("reported, not a target: the bars are a GPU's" if cpu else "target: >= 1.3x")
    mfu = (f"MFU = counted FLOPs per image (fwd+bwd) x images/s / {env['mfu_peak']} (target: >= 40% for ViT-B at "
           "224). " if env.get("mfu_peak") else "no MFU: no peak FLOP rate is known for this device. ")
    lines = [
        f"# Official code vs ours, side by side on {env['device']} (job {env.get('job', '?')})", "",
        f"One {'CPU' if cpu else 'GPU'} job: the official code ({bench}, torch {env['torch']}, timm {env['timm']}, "
        f"{amp}) and ours (`repro profile --json`, torch {env['our_torch']}, {env['precision']}; "
        f"attention: {env['attention']}), random images, median step of each ({steps} warm-up + timed steps for "
        f"ours; the official runs' counts are in {', '.join(files)}), measured {dates[0] if dates else '?'}"
        f"{' to ' + dates[-1] if len(dates) > 1 else ''}. Official attention: timm's fused SDPA in MAE (timm 1.x), the "
        f"{attention}. Images/s with the ratio to the official code in "
        f"brackets ({target}); " + mfu + (
            "Both sides run their CPU defaults: ours eager (nothing compiled, AdamW unfused), the official script "
            "its fused AdamW." if cpu else
            "First step: the compiled run's first step (compilation included); recompiles: graphs made after it. "
            "Peak memory: the official runs' (ours in that job were not reset between configurations of one "
            "process, so they are not shown).") + "".join(" " + n for n in notes), "",
        f"Source: `{source}`. Regenerate: `repro profile --side-by-side {source}`.", "",
    ]
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [r["config"], _x(_get(r, "official_batch"), ".0f"), _x(_get(r, "official_s_per_step"), ".4f"),
                 official_img_per_s(r)]
        cells += [ours(r, m) for m in modes]
        cells += [_x(_get(r, "compiled_fused_s_per_step"), ".4f"), _x(_get(r, "eager_mfu"), ".0%"),
                  _x(_get(r, "compiled_fused_mfu"), ".0%")]
        cells += [_x(_get(r, f"{mode_tag(m)}_mfu"), ".0%") for m in extra]
        cells += [_x(_get(r, "compiled_first_step_s"), ".1f"),
                  f"{_x(_get(r, 'compiled_graphs'), '.0f')} / {_x(_get(r, 'compiled_recompiles'), '.0f')}"]
        if traced:
            top = _get(r, "compiled_fused_top_non_matmul")
            cells += [_x(_get(r, "compiled_fused_device_idle_fraction"), ".0%"),
                      f"{top}: {_get(r, 'compiled_fused_top_non_matmul_ms'):.1f}" if top else "—"]
        cells.append(_x(_get(r, "official_peak_gib"), ".1f"))
        table.append("| " + " | ".join(cells) + " |")
    lines += _drop_empty_columns(table) if cpu else table  # a CPU job has no compiled, MFU or CUDA-memory figures
    lines += _trace_lines(env.get("traces") or [], source) + _loader_lines(env.get("loaders") or [])
    return "\n".join(lines) + "\n"


def _trace_lines(traces: list[dict[str, Any]], source: str) -> list[str]:
    if not traces:
        return []
    order = [c for c, _ in KERNEL_CATEGORIES if c != "matmul"] + ["other"]
    cats = ["matmul"] + [c for c in order if any(c in t["by_category"] for t in traces)]
    lines = ["", "## Where the device time goes (traced steps)", "",
             "Per traced configuration and mode: the median timed step, the traced kernels' summed time per step "
             "(device busy), the device's idle share of the timed step (1 - busy / timed step) and of the traced "
             "step (the profiler's host overhead lengthens traced steps, so that share is larger where the host "
             "limits the step), and the busy time by kernel category in ms/step (repro.profile.bench's "
             f"KERNEL_CATEGORIES, from kernel names); host calls and kernels per step: what the host dispatches "
             f"(repro.profile.bench.host_calls; jobs before 2026-11-27 did not count them). Ops tables: "
             f"`{source}/traces/`.", "",
             "| config | mode | img/s (timed) | timed ms/step | traced ms/step | device busy ms/step | idle % of timed "
             "step | idle % of traced step | host calls / step | kernels / step | " + " | ".join(cats)
             + " | matmul share of busy | trace |",
             "|" + "---|" * (12 + len(cats))]
    for t in traces:
        busy = t["busy_s"] or 0.0
        lines.append("| " + " | ".join(
            [t["config"], t["mode"], f"{t['images_per_s']:.0f}", _x((t["step_s"] or 0) * 1e3, ".1f"),
             _x((t["wall_s"] or 0) * 1e3, ".1f"), f"{busy * 1e3:.1f}", _x(t["idle"], ".0%"),
             _x(t["idle_traced"], ".0%"), _x(t.get("host_calls"), ".0f"), _x(t.get("kernels"), ".0f")]
            + [_x(t["by_category"][c] * 1e3, ".1f") if c in t["by_category"] else "—" for c in cats]
            + [_x(t["by_category"].get("matmul", 0.0) / busy if busy else None, ".0%"), t["file"] or "—"]) + " |")
    lines += ["", "What the traces show, per row (computed from the figures above):", ""]
    for t in traces:
        busy = t["busy_s"] or 0.0
        if not busy:
            lines.append(f"- {t['config']}, {t['mode']}: no device time recorded.")
            continue
        mm = t["by_category"].get("matmul", 0.0)
        top = t["top_non_matmul_s"] or 0.0
        lines.append(f"- {t['config']}, {t['mode']}: kernels run {busy * 1e3:.1f} ms of the "
                     f"{_x((t['step_s'] or 0) * 1e3, '.1f')} ms step (idle {_x(t['idle'], '.0%')}); matmul takes "
                     f"{mm * 1e3:.1f} ms ({mm / busy:.0%} of busy), the largest other category is "
                     f"{t['top_non_matmul']} ({top * 1e3:.1f} ms, {top / busy:.0%}).")
    return lines


def _loader_lines(loaders: list[dict[str, Any]]) -> list[str]:
    if not loaders:
        return []
    lines = ["", "## Input pipeline vs the model", "",
             "The loader measured beside the model (`repro profile` without `--no-loader`, the profile's loader "
             "workers): decoded-image loader = the method's own per-image transform on a decoded ImageNet-sized "
             "image, no JPEG decoding, timed from the loader's start over a few batches (3 by default, worker "
             "start-up included); JPEG CPU path = real JPEG files decoded by PIL and transformed in the workers "
             "(`data.decode: cpu`), timed from the loader's start over two batches per worker; JPEG device path = "
             "workers read bytes and draw the crops, decoding and augmentation on the device (`data.decode: device`), "
             "after one warm-up batch. Model img/s: the profile's own step, and the fastest step of the same "
             "configuration in this job.", "",
             "| config | profile (mode, file) | batch | workers | JPEG files | decoded-image loader img/s | JPEG CPU "
             "path img/s | JPEG device path img/s | model img/s (this profile) | fastest model img/s in this job | "
             "JPEG CPU / fastest | JPEG device / fastest |", "|" + "---|" * 12]
    for x in loaders:
        j = x["jpeg"]
        files = (f"{j.get('files')} x {j.get('size')}, q{j.get('quality')}, {j.get('mean_kb', 0):.0f} KB mean"
                 if j else "—")
        fast = x["fastest"]
        lines.append("| " + " | ".join([
            x["config"], f"{x['mode']}, {x['from']}", _x(x["batch"], "d"), _x(x["workers"], "d"), files,
            _x(x["decoded"], ".0f"), _x(x["jpeg_cpu"], ".0f"), _x(x["jpeg_device"], ".0f"), f"{x['model']:.0f}",
            f"{fast:.0f} ({x['fastest_mode']})" if fast else "—",
            _x(x["jpeg_cpu"] / fast if fast and x["jpeg_cpu"] else None, ".2f"),
            _x(x["jpeg_device"] / fast if fast and x["jpeg_device"] else None, ".2f")]) + " |")
    lines += [""]
    for x in loaders:
        fast = x["fastest"]
        if not fast:
            continue
        parts = [f"- {x['config']}: the fastest step of this job consumes {fast:.0f} img/s ({x['fastest_mode']})"]
        for name, v in (("the decoded-image loader", x["decoded"]),
                        (f"the JPEG CPU path ({x['workers']} workers)", x["jpeg_cpu"]),
                        ("the JPEG device path", x["jpeg_device"])):
            if v:
                verdict = "keeps up" if v >= fast else "would hold the step back"
                parts.append(f"{name} delivers {v:.0f} img/s ({v / fast:.2f}x: {verdict})")
        if x["jpeg_device"]:  # decoding shares the device with the step
            parts.append(f"decoding on the device and stepping one after the other (no overlap) would give "
                         f"{1 / (1 / fast + 1 / x['jpeg_device']):.0f} img/s")
        lines.append("; ".join(parts) + ".")
    return lines


def device_index(job_dirs: list[Path], device: str) -> tuple[pd.DataFrame, str]:
    """Per configuration, the newest job (by its profiles' latest date, then folder name) in ``job_dirs`` on
    ``device`` that measured it on both sides (official img/s and ours compiled + fused AdamW at the official
    batch): its figures, each ratio within that job, and the fastest mode of ours there. Jobs of other devices are
    left out."""
    jobs = []
    for d in job_dirs:
        try:
            df, env = side_by_side(d)
        except ConfigError:
            continue
        if env["device"] == device:
            jobs.append(((env["dates"][-1] if env["dates"] else "", d.name), d, df, env))
    jobs.sort(key=lambda t: t[0], reverse=True)
    default = "eager" if on_cpu(device) else COMPILED  # the engine's default mode on this device
    ref = mode_tag(default)
    rows = []
    for label, *_ in CONFIGS + LATER_CONFIGS:
        for _, d, df, env in jobs:
            hit = df[df["config"] == label]
            if hit.empty:
                continue
            r = hit.iloc[0]
            if _get(r, "official_img_per_s") is None or _get(r, f"{ref}_img_per_s") is None:
                continue
            best = max(((v, m) for m in env["modes"] if (v := _get(r, f"{mode_tag(m)}_img_per_s")) is not None),
                       key=lambda t: t[0])
            tag = mode_tag(best[1])
            rows.append({"config": label, "job": d.name, "official_batch": _get(r, "official_batch"),
                         "official_img_per_s": r["official_img_per_s"],
                         "default_img_per_s": r[f"{ref}_img_per_s"],
                         "default_over_official": r[f"{ref}_over_official"],
                         "default_mfu": _get(r, f"{ref}_mfu"),
                         "default_device_idle_fraction": _get(r, f"{ref}_device_idle_fraction"),
                         "fastest_mode": best[1], "fastest_img_per_s": best[0],
                         "fastest_over_official": _get(r, f"{tag}_over_official"), "fastest_mfu": _get(r, f"{tag}_mfu"),
                         "fastest_from_log": str(_get(r, f"{tag}_from") or "").startswith("log")})
            break
    idx = pd.DataFrame(rows)
    lines = [f"# Official code vs ours on {device}: the newest job per configuration", "",
             "Each row from the newest job that measured the configuration on both sides (the official code and "
             f"ours {default} at the official batch); every ratio stays within that job (one of several "
             "device calls says in its README which call measured what). The job's own "
             "table (all modes, traces, input pipeline) is linked. Fastest: the fastest mode of ours in that job "
             f"(a larger batch counts; {LOG_MARK}: read from the job's log). Regenerate: `repro profile "
             "--side-by-side <job folder>` (any job of the device).", "",
    ]
    table = [f"| config | job | batch | official img/s | ours {default} | MFU {_short(default)} | device idle % "
             f"({_short(default)}) | ours fastest (mode) | MFU fastest |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = job_file_name(device, r["job"])
        table.append("| " + " | ".join([
            r["config"], f"[{r['job']}]({name}.md)", _x(r["official_batch"], ".0f"), _rate(r["official_img_per_s"]),
            f"{_rate(r['default_img_per_s'])} ({r['default_over_official']:.2f}x)",
            _x(r["default_mfu"], ".0%"), _x(r["default_device_idle_fraction"], ".0%"),
            f"{_rate(r['fastest_img_per_s'])} ({_x(r['fastest_over_official'], '.2f')}x, {r['fastest_mode']})"
            + (LOG_MARK if r["fastest_from_log"] else ""), _x(r["fastest_mfu"], ".0%")]) + " |")
    lines += _drop_empty_columns(table) if on_cpu(device) and rows else table
    return idx, "\n".join(lines) + "\n"


def on_cpu(device: str) -> bool:
    """Whether a profile device name is a CPU's (``CPU (x86_64, 2 threads)``)."""
    return str(device).upper().startswith("CPU")


def device_file_name(device: str) -> str:
    """``side-by-side-<device>`` (``-cpu`` for a CPU)."""
    return "side-by-side" + (cost_suffix(device).replace(".", "-", 1) or "-cpu")


def job_file_name(device: str, job: str) -> str:
    """``side-by-side-<device>-<job folder>``."""
    return f"{device_file_name(device)}-{re.sub(r'[^A-Za-z0-9._-]+', '-', job)}"


def write_side_by_side(directory: Path, repo_root: Path) -> list[Path]:
    """Write the job's ``tables/efficiency/side-by-side-<device>-<job>.md`` and ``.csv`` from DIR's measured files,
    and the device's index ``side-by-side-<device>.md`` / ``.csv`` over DIR and the job folders beside it."""
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
    name = job_file_name(env["device"], directory.name)
    written = [atomic_write_text(out / f"{name}.md", render(df, env, source)),
               atomic_write_text(out / f"{name}.csv", df.to_csv(index=False, float_format="%.6g"))]
    jobs = sorted(d for d in directory.resolve().parent.iterdir() if d.is_dir() and official_files(d))
    idx, md = device_index(jobs, env["device"])
    base = device_file_name(env["device"])
    return written + [atomic_write_text(out / f"{base}.md", md),
                      atomic_write_text(out / f"{base}.csv", idx.to_csv(index=False, float_format="%.6g"))]
