"""Stored profiles and the projection of a stage's device-hours from them, for ``repro plan --scale paper``.

``tables/efficiency/profiles.json`` (beside the cost tables it feeds, never inside the installed package) holds
one measured step cost per cost key in each *profile set*: one device (CPU model / GPU name), one precision and one
mode of the engine's speed switches (eager / compiled, fused AdamW or not), so a GPU measurement never replaces a
CPU one and an eager one never replaces a compiled one. A projection uses one set only (``--device``), never a mix.
Measured profiles enter the store from ``repro profile --json`` files (``profiles_from_json``, ``repro profile
--import``); a run with a switch off its default (``variant_of``) stays out of it.


No torch (planning imports it): the dataset sizes, the cost key of a configuration and the
projection of a measured time per image to a schedule live here; ``repro.profile.bench`` re-exports them.

Which stages project: pretraining and the evaluations whose step ``repro profile`` times (``STEP_KINDS``): fine-tuning
(semi-supervised too), linear probing and kNN; each stored profile says its step kind (``kind``; none: pretraining).
A stage whose exact cost key is stored in the chosen set is *measured*: images through its step (epochs x the
dataset's training images; kNN: one pass over train + val) x the measured time per image. Else it is *estimated*:
its FLOPs per image (counted for its cost key in any stored set, else ``repro.profile.cost``'s analytic count)
divided by the FLOP/s the nearest measured profile of the same step kind and architecture family achieved on the
chosen set's device, with ``ESTIMATE_MARGIN`` on top; the estimate names that profile. A kNN stage adds its vote:
``knn_vote_flops`` at the fp32 FLOP/s of a measured kNN forward on that device (else ``KNN_VOTE_FLOPS``). Segmentation
and detection (``TRANSFER_STEPS``) are not timed: always estimated, from their counted FLOPs (``TRANSFER_FLOPS``) at
the rate of a published timing (``TRANSFER_REFERENCE``), with ``ESTIMATE_MARGIN`` on top.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.config import ConfigError
from repro.io import atomic_write_json
from repro.profile.tables import resolve_row

PROFILES = Path("tables") / "efficiency" / "profiles.json"
FORMAT = 2
# GPU classes the papers' timings were taken on (LoMaR: A100; LocalMIM, ExtreMA: V100): preferred by default.
PAPER_GPUS = ("A100", "V100")
# Training images per epoch of each dataset, as the papers use them.
DATASET_SIZES = {
    "imagenet1k": 1_281_167,   # ILSVRC-2012 train
    "imagenet22k": 14_197_122,  # full ImageNet-21K/22K (ExtreMA Table 3: "about 10 times larger")
    "inat2018": 437_513,       # iNaturalist 2018 train
    "inat2019": 265_213,       # iNaturalist 2019 train
    "coco": 118_287,           # COCO 2017 train (detection: epochs of it)
}
# Validation images of each dataset (a kNN stage embeds train + val once).
VAL_SIZES = {
    "imagenet1k": 50_000,      # ILSVRC-2012 val
    "inat2018": 24_426,        # iNaturalist 2018 val
    "inat2019": 3_030,         # iNaturalist 2019 val
}
# Stage kind -> the step ``repro profile`` times for it (semi-supervised stages run the fine-tuning recipe).
STEP_KINDS = {"pretrain": "pretrain", "finetune": "finetune", "semisup": "finetune", "linear": "linear",
              "knn": "knn", "segment": "segment", "detect": "detect"}
# Transfer steps (the frameworks' own runners: segment, detect) are not timed by `repro profile`. Their training
# FLOPs per image are counted on the CPU (`repro profile --transfer-flops`, TRANSFER_FLOPS beside the stored
# profiles) and run at the FLOP rate of the one published timing of such a step, TRANSFER_REFERENCE, on any GPU: a
# step of one or two images per GPU waits on the host as much as on the chip, so a newer GPU is not assumed faster.
TRANSFER_STEPS = ("segment", "detect")
TRANSFER_FLOPS = "transfer-flops.json"
# Encoder geometry a transfer stage takes from its pretraining (element-wise, or a few percent of a 512-1024 px step
# at most): not part of its cost key, so the count of the recipe's own geometry serves every input.
TRANSFER_FREE_KEYS = ("drop_path", "pos_embed", "rel_pos", "layer_scale", "class_token")
TRANSFER_REFERENCE = {"recipe": "vitdet_vit_base", "kind": "detect", "s_per_image": 0.314,
                      "source": "detectron2's ViTDet ViT-B Mask R-CNN, 0.314 s per training image on an A100 (64 "
                                "A100s, one image each; projects/ViTDet model zoo)"}
# An estimate from FLOPs (no measurement of the exact configuration) gets this factor over the cluster's margin.
ESTIMATE_MARGIN = 1.5
# FLOP/s of a kNN vote's fp32 matrix products where the set has no kNN profile with a FLOPs count: conservative,
# below the fp32 (no TF32) GEMM rate of a V100 (15.7 TFLOP/s peak) or any later data-centre GPU.
KNN_VOTE_FLOPS = 10e12
# What an evaluation step's cost depends on in its model section (drop path: element-wise, left out).
EVAL_MODEL_KEYS = ("arch", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "window_size", "pos_embed",
                   "rel_pos", "layer_scale", "class_token")


def step_kind(cfg: Mapping[str, Any]) -> str | None:
    """The profiled step a stage's config runs (``STEP_KINDS``), None for a kind that is not profiled."""
    return STEP_KINDS.get(str(cfg.get("kind", "pretrain")))


def eval_feature(cfg: Mapping[str, Any]) -> str:
    """The feature a linear / kNN stage reads; ``auto`` without an input is the cls token (as the worker sets it)."""
    f = cfg.get("feature", "auto")
    return "cls" if f == "auto" else str(f)


def instance_head(cfg: Mapping[str, Any], input_cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """For ``feature: instance``: the head the evaluation rebuilds from its input (ExtreMA's class-attention head:
    design and depth from the input's method section); ``{"method": None}`` when the input is not known; None for
    other features."""
    if step_kind(cfg) not in ("linear", "knn") or eval_feature(cfg) != "instance":
        return None
    method = (input_cfg or {}).get("method")
    if not method:
        return {"method": None}
    return {"method": method.get("name"), "design": method.get("cls_design"), "depth": method.get("ca_blocks")}


def cost_key(cfg: Mapping[str, Any], input_cfg: Mapping[str, Any] | None = None) -> str:
    """What a step's cost depends on (not epochs, data sizes, lr). Pretraining: the method section, the model and the
    resolution. An evaluation: its step kind, the model's shape keys (``EVAL_MODEL_KEYS``) and the resolution;
    fine-tuning adds the pool and the classes, linear probing the classes and the feature, kNN the feature (an
    instance feature: the head of ``input_cfg``, its pretraining)."""
    step = step_kind(cfg)
    if step == "pretrain" or "method" in cfg:
        from repro.methods.registry import get_spec

        free = get_spec(cfg["method"]["name"]).cost_free
        method = {k: v for k, v in cfg["method"].items() if k not in free}
        key: dict[str, Any] = {"method": method, "model": dict(cfg["model"]), "img_size": cfg["data"]["img_size"]}
    elif step in TRANSFER_STEPS:  # the model section shapes backbone and heads, but for TRANSFER_FREE_KEYS
        key = {"kind": step, "framework": cfg.get("framework"), "img_size": cfg["data"]["img_size"],
               "model": {k: v for k, v in cfg["model"].items() if k not in TRANSFER_FREE_KEYS}}
    else:
        model = cfg["model"]
        key = {"kind": step or cfg.get("kind"), "model": {k: model.get(k) for k in EVAL_MODEL_KEYS},
               "img_size": cfg["data"]["img_size"]}
        if step == "finetune":
            key["global_pool"] = model.get("global_pool")
        if step in ("finetune", "linear"):
            key["num_classes"] = cfg["data"].get("num_classes")
        if step in ("linear", "knn"):
            key["feature"] = eval_feature(cfg)
            head = instance_head(cfg, input_cfg)
            if head is not None:
                key["head"] = head
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_images(cfg: Mapping[str, Any]) -> int:
    """Training images per epoch of the config's dataset (the paper's, at paper scale)."""
    data = cfg["data"]
    name = data["dataset"]
    if name not in DATASET_SIZES:
        raise ConfigError(f"no known size for data.dataset={name}; profile a paper-scale recipe "
                          f"({', '.join(DATASET_SIZES)})")
    return int(round(DATASET_SIZES[name] * float(data.get("train_fraction", 1.0))))


def val_images(cfg: Mapping[str, Any]) -> int:
    """Validation images of the config's dataset (the paper's)."""
    name = cfg["data"]["dataset"]
    if name not in VAL_SIZES:
        raise ConfigError(f"no known validation size for data.dataset={name}; known: {', '.join(VAL_SIZES)}")
    return VAL_SIZES[name]


def stage_work(cfg: Mapping[str, Any]) -> tuple[int, float] | None:
    """(images per pass, passes) through the profiled step of a paper-scale stage: epochs of the training set
    (pretraining, fine-tuning, linear probing, detection), one pass over train + val (kNN), iterations x the global
    batch (segmentation); None for a kind that is not profiled, a config without a schedule or a dataset of unknown
    size (tiny / synthetic data)."""
    step = step_kind(cfg)
    if step is None or (step == "pretrain" and "method" not in cfg):
        return None
    try:
        if step == "knn":
            return train_images(cfg) + val_images(cfg), 1.0
        if "optim" not in cfg:
            return None
        if step == "segment":  # iterations of the global batch (crops of the training set)
            if cfg["data"].get("dataset") == "synthetic":
                return None
            return int(cfg["optim"]["iters"]) * int(cfg["optim"]["batch_size"]), 1.0
        return train_images(cfg), float(cfg["optim"]["epochs"])
    except Exception:  # noqa: BLE001 - tiny / synthetic data: no paper-scale projection
        return None


def knn_feature_dim(cfg: Mapping[str, Any]) -> int | None:
    """Width of the feature a kNN stage compares: a ViT's embedding (cls, average or instance head), a Swin's last
    stage; None for an unknown architecture."""
    from repro.models.archs import arch_dims, is_swin, swin_dims

    model = cfg["model"]
    try:
        if is_swin(str(model.get("arch"))):
            d = swin_dims(model)
            return int(d["embed_dim"]) * 2 ** (len(d["depths"]) - 1)
        return int(arch_dims(model)["embed_dim"])
    except (ValueError, KeyError, ConfigError):
        return None


def knn_vote_flops(cfg: Mapping[str, Any]) -> float | None:
    """FLOPs of a paper-scale kNN stage's vote: the query x gallery similarities, 2 x N_query x N_gallery x dim per
    k (``run_knn`` votes once per k; top-k and the weighted sums are left out); None without known sizes."""
    dim = knn_feature_dim(cfg)
    try:
        gallery, query = train_images(cfg), val_images(cfg)
    except ConfigError:
        return None
    ks = cfg.get("k") or ()
    ks = [ks] if isinstance(ks, int) else list(ks)
    return 2.0 * query * gallery * dim * len(ks) if dim and ks else None


def project(s_per_image: float, images_per_epoch: int, epochs: float, devices: int = 1) -> dict[str, float]:
    """Time per epoch (wall, on ``devices`` devices that each reach the measured per-image time) and the total
    device-hours (wall x devices, so independent of ``devices`` under perfect scaling)."""
    if s_per_image <= 0 or images_per_epoch <= 0 or epochs <= 0 or devices <= 0:
        raise ValueError("projection needs positive time per image, images, epochs and devices")
    epoch_s = s_per_image * images_per_epoch / devices
    return {"epoch_hours": epoch_s / 3600.0, "device_hours_per_epoch": epoch_s * devices / 3600.0,
            "total_wall_hours": epoch_s * epochs / 3600.0, "total_device_hours": epoch_s * epochs * devices / 3600.0}


def repo_root() -> Path:
    """The checkout that holds tables/: the one this package lives in (an editable install), else the working
    directory (an installed package has no tables/ of its own)."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def profiles_path(root: Path | None = None) -> Path:
    """``$REPRO_PROFILES`` if set, else ``<repo>/tables/efficiency/profiles.json``."""
    env = os.environ.get("REPRO_PROFILES")
    if env:
        return Path(env)
    return (root or repo_root()) / PROFILES


CUDA_GRAPHS = "reduce-overhead"  # the torch.compile mode that captures CUDA graphs (train.compile_mode)


def compile_label(prof: Mapping[str, Any]) -> str:
    """``eager`` or ``compiled``, with the torch.compile mode where it is not inductor's default: ``compiled + CUDA
    graphs`` (``train.compile_mode=reduce-overhead``), ``compiled (max-autotune)``."""
    if not prof.get("compile"):
        return "eager"
    cm = prof.get("compile_mode")
    return "compiled" + (" + CUDA graphs" if cm == CUDA_GRAPHS else f" ({cm})" if cm and cm != "default" else "")


def profile_set(prof: Mapping[str, Any]) -> str:
    """The set a profile belongs to: ``device | precision | mode``, e.g.
    ``NVIDIA H200 | bf16 autocast | compiled + fused AdamW``; a run under another torch.compile mode (CUDA graphs)
    is a set of its own: a projection of the default mode never reads it."""
    mode = compile_label(prof)
    if prof.get("fused_optim"):
        mode += " + fused AdamW"
    return f"{prof['device']} | {prof['precision']} | {mode}"


def set_device(set_name: str) -> str:
    return set_name.split(" | ", 1)[0]


def set_on_gpu(set_name: str, profiles: Mapping[str, Any]) -> bool:
    """Whether a set was measured on a GPU: its profiles' ``device_type``, else its name (``CPU ...`` is not)."""
    types = {p.get("device_type") for p in profiles.values() if isinstance(p, Mapping)} - {None}
    if types:
        return types != {"cpu"}
    return not set_device(set_name).upper().startswith("CPU")


def load_profiles(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Profile set -> cost key -> profile. A file of the first format (cost key -> profile, one device) is read as
    the sets its profiles name."""
    p = path or profiles_path()
    if not p.exists():
        return {}
    data = json.loads(p.read_text())
    if data.get("format") == FORMAT:
        return data["sets"]
    sets: dict[str, dict[str, Any]] = {}
    for k, prof in data.items():
        sets.setdefault(profile_set(prof), {})[k] = prof
    return sets


def _keep_old(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """A stored profile wins over a new one of the same set and key when it timed more steps, or when the new one
    is only derived from a cost table's row (no full profile) and the stored one is not."""
    if int(old.get("timed_steps") or 0) > int(new.get("timed_steps") or 0):
        return True
    return bool(new.get("derived_from")) and not old.get("derived_from")


def store_profiles(new: Mapping[str, Mapping[str, Any]], path: Path | None = None, *, replace: bool = False,
                   log: Callable[[str], Any] = print) -> Path:
    """Merge ``new`` (cost key -> profile) into its profile sets. A stored profile with more timed steps is kept
    (said in ``log``) unless ``replace`` (``repro profile --store``)."""
    p = path or profiles_path()
    sets = load_profiles(p)
    for k, prof in new.items():
        s = sets.setdefault(profile_set(prof), {})
        old = s.get(k)
        if old is not None and not replace and _keep_old(old, prof):
            log(f"[profile] kept the stored profile of {prof.get('recipe')} at {prof.get('img_size')} px on "
                f"{profile_set(prof)} ({old.get('timed_steps')} timed steps, {old.get('date')}) over this one "
                f"({prof.get('timed_steps')} steps); pass --store to replace it")
            continue
        s[k] = dict(prof)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, {"format": FORMAT, "sets": sets})
    return p


def variant_of(prof: dict[str, Any]) -> str:
    """The switches a debugging / comparison run turned from the device's default (``train.compile_scope=all``,
    ``train.sdpa`` set, ``train.embed_visible`` off on a GPU), as a mode suffix: ``, compile_scope all``,
    ``, sdpa flash>efficient``, ``, embed_visible off``."""
    out = ""
    if prof.get("compile") and prof.get("compile_scope") == "all" and _scope_matters(prof):
        out += ", compile_scope all"
    if prof.get("sdpa"):
        out += ", sdpa " + ">".join(prof["sdpa"])
    if prof.get("embed_visible") is False and prof.get("device_type") == "cuda":
        out += ", embed_visible off"
    return out


def _scope_matters(prof: dict[str, Any]) -> bool:
    """Whether ``train.compile_scope=all`` compiles more than the blocks for a profile's method: it has compiled
    units, or visible-only Swin blocks."""
    from repro.methods.registry import METHODS

    name = prof.get("method")
    if not name:
        return False
    spec = METHODS.get(str(name))
    return bool(spec is not None and spec.compiled_units) or str(prof.get("arch", "")).startswith("swin")


def profiles_from_json(paths: Sequence[Path], variants: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """Profiles (profile set -> cost key -> profile) in ``repro profile --json`` files (a folder: its
    ``repro-*.json``): each recipe target's full profile, and for a cost table's row without one a profile derived
    from the row (its step time, batch, MFU and the table's device and switches; marked ``derived_from``). Later
    files win. A comparison run with a switch off its default (``variant_of``) is left out unless
    ``variants``: it is the side-by-side table's, not a projection's."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("repro-*.json")) if p.is_dir() else [p]
    full: dict[str, dict[str, dict[str, Any]]] = {}
    derived: dict[str, dict[str, dict[str, Any]]] = {}
    for f in files:
        for target, entry in json.loads(f.read_text()).items():
            if "rows" not in entry:
                if "cost_key" not in entry:
                    raise ConfigError(f"{f}: '{target}' is neither a profile nor a cost table")
                if variant_of(entry) and not variants:
                    continue
                full.setdefault(profile_set(entry), {})[entry["cost_key"]] = entry
                continue
            meta = entry["meta"]
            for r in entry["rows"]:
                if r.get("status") != "measured":
                    continue
                cfg = resolve_row(r["recipe"], dict(o.split("=", 1) for o in (r.get("overrides") or "").split()))
                prof = {
                    "recipe": cfg.get("recipe"), "method": cfg["method"]["name"], "img_size": cfg["data"]["img_size"],
                    "batch": r["batch"], "step_time_s": r["step_time_s"], "s_per_image": r["step_time_s"] / r["batch"],
                    "images_per_s": r["images_per_s"], "mfu": r.get("mfu"), "mfu_peak": meta.get("mfu_peak"),
                    **{k: r.get(k) for k in ("loader_images_per_s", "loader_jpeg_cpu_images_per_s",
                                             "loader_jpeg_device_images_per_s")},
                    "flops_per_image": (r.get("gflops_per_image") or 0) * 1e9 or None,
                    "device": meta["device"], "device_type": meta.get("device_type"),
                    "precision": meta["precision"], "attention": meta.get("attention"), "torch": meta.get("torch"),
                    "compile": meta.get("compile"), "compile_mode": meta.get("compile_mode"),
                    "fused_optim": meta.get("fused_optim"),
                    "recompiles": r.get("recompiles"), "timed_steps": meta.get("steps"),
                    "warmup_steps": meta.get("warmup"), "date": meta.get("date"), "cost_key": cost_key(cfg),
                    "derived_from": f"{meta['table']} row '{r['row']}' ({f.name})"}
                derived.setdefault(profile_set(prof), {})[prof["cost_key"]] = prof
    out = {}
    for name in dict.fromkeys([*derived, *full]):
        out[name] = {**derived.get(name, {}), **full.get(name, {})}
    return out


def import_profiles(paths: Sequence[Path], store: bool = False) -> int:
    """``repro profile --import``: store the profiles of ``--json`` files, each in its device's set."""
    for name, profs in profiles_from_json(paths).items():
        store_profiles(profs, replace=store)
        print(f"[profile] {len(profs)} profile(s) of {name}: "
              f"{', '.join(sorted({str(p['recipe']) for p in profs.values()}))}")
    return 0


def choose_set(sets: Mapping[str, Mapping[str, Any]], cfgs: Iterable[Mapping[str, Any]] = (),
               device: str | None = None) -> str | None:
    """The one profile set a projection uses. ``device``: a case-insensitive part of a set's name (``H200``,
    ``CPU``, ``H200 | bf16 autocast | eager``); it must not name sets of more than one device. Among the candidates:
    the set that covers most of ``cfgs`` (stage configs), then one of the papers' GPU classes, then the set
    with most profiles. None when nothing is stored."""
    names = list(sets)
    if device:
        names = [n for n in names if device.lower() in n.lower()]
        if not names:
            raise ConfigError(f"no stored profiles on a device matching '{device}'; stored: "
                              + ("; ".join(sets) or "none (run `repro profile`)"))
        devices = sorted({set_device(n) for n in names})
        if len(devices) > 1 and not any(n.lower() == device.lower() for n in names):
            raise ConfigError(f"--device {device} matches profiles of several devices ({', '.join(devices)}); a "
                              "projection uses one: name it more precisely")
        exact = [n for n in names if n.lower() == device.lower()]
        names = exact or names
    if not names:
        return None
    keys = [cost_key(c) for c in cfgs if stage_work(c) is not None]

    def score(n: str) -> tuple[int, bool, int]:
        return (sum(k in sets[n] for k in keys), any(g in set_device(n) for g in PAPER_GPUS), len(sets[n]))

    return max(names, key=score)


def arch_family(arch: str | None) -> str | None:
    """``vit_base`` -> ``vit``, ``swin_large`` -> ``swin``."""
    return str(arch).split("_", 1)[0] if arch else None


def profile_flops(prof: Mapping[str, Any]) -> float | None:
    """FLOPs per image of a profile's step: counted, else analytic (the same conventions, ``repro.profile.cost``)."""
    return prof.get("flops_per_image") or prof.get("analytic_flops_per_image") or None


def stage_flops(cfg: Mapping[str, Any], input_cfg: Mapping[str, Any] | None = None) -> float | None:
    """Analytic FLOPs per image of a stage's profiled step (``repro.profile.cost``; a transfer step: its count in
    ``TRANSFER_FLOPS``); None where no formula covers it (a Swin, a method without a cost model)."""
    from repro.profile.cost import analytic_flops, eval_flops

    step = step_kind(cfg)
    if step in TRANSFER_STEPS:
        return transfer_flops().get(cost_key(cfg))
    try:
        if step == "pretrain":
            return (analytic_flops(cfg) or {}).get("total")
        if step is not None:
            return eval_flops(cfg, instance_head(cfg, input_cfg))
    except (KeyError, ValueError, ConfigError):
        return None
    return None


def transfer_counts(path: Path | None = None) -> dict[str, Any]:
    """``TRANSFER_FLOPS`` beside the stored profiles (``rows``: counted training FLOPs per image of each transfer
    recipe by cost key; ``reference``: ``TRANSFER_REFERENCE`` with its FLOP rate), or {} when absent."""
    p = path or profiles_path().parent / TRANSFER_FLOPS
    return json.loads(p.read_text()) if p.is_file() else {}


def transfer_flops(path: Path | None = None) -> dict[str, float]:
    """Counted training FLOPs per image of the transfer recipes, by cost key."""
    return {r["cost_key"]: float(r["flops_per_image"]) for r in transfer_counts(path).get("rows", [])
            if r.get("flops_per_image")}


def smaller_batch(prof: Mapping[str, Any], stage_cfg: Mapping[str, Any]) -> str:
    """Why a measured projection is optimistic, or "": the profile's step ran a larger batch per device than the
    stage will (``train.batch_per_device`` bounds its micro-batch; a GPU step on fewer images is no faster per
    image, and a host-bound one is slower). Such a stage's ``--time`` gets ``ESTIMATE_MARGIN`` on top."""
    measured = int(prof.get("batch") or 0)
    per = int((stage_cfg.get("train") or {}).get("batch_per_device") or 0)
    if step_kind(stage_cfg) == "knn" or not per or measured <= per:
        return ""
    return (f"profiled at batch {measured} per device, the stage runs at most {per} "
            f"(train.batch_per_device={measured} runs it as profiled)")


@dataclass(frozen=True)
class Projection:
    """A stage's device-hours on the projection's device (one device doing all its images), how they were found
    and the extra margin that goes with that."""

    device_hours: float  # shared by the stage's GPUs (kNN too: each rank embeds and votes for its shard)
    basis: str  # "measured" or "estimated from FLOPs vs <recipe> (<TFLOP/s>)"
    margin: float = 1.0  # over the cluster's time_margin (ESTIMATE_MARGIN: an estimate, or a smaller batch)
    parts: str = ""  # what the device-hours are made of, where there are several (kNN: forward + vote)

    @property
    def estimated(self) -> bool:
        return self.basis != "measured"


@dataclass
class Projector:
    """Projected device-hours of stages from one profile set (``set_name``; None: nothing stored). ``flops``: counted
    FLOPs per image by cost key, from every stored set (a count does not depend on the device)."""
    set_name: str | None
    profiles: Mapping[str, Any]
    flops: Mapping[str, float] = field(default_factory=dict)

    def __call__(self, stage_cfg: Mapping[str, Any], input_cfg: Mapping[str, Any] | None = None) -> float | None:
        """Device-hours of a stage whose exact configuration was measured in this set; else None."""
        p, _ = self.projection(stage_cfg, input_cfg, estimate=False)
        return p.device_hours if p is not None else None

    def projection(self, stage_cfg: Mapping[str, Any], input_cfg: Mapping[str, Any] | None = None,
                   estimate: bool = True) -> tuple[Projection | None, str]:
        """(the stage's projection, "") or (None, why there is none). ``input_cfg``: its input's pretraining config
        (the instance head of a linear / kNN stage). Measured when this set holds its cost key; else, with
        ``estimate``, from FLOPs (``estimate_from_flops``)."""
        step = step_kind(stage_cfg)
        if step is None:
            return None, f"no profile: {stage_cfg.get('kind')} steps are not profiled yet"
        work = stage_work(stage_cfg)
        if work is None:
            return None, "no stored profile covers this stage (no paper-scale dataset size or schedule)"
        images, passes = work
        key = cost_key(stage_cfg, input_cfg)
        prof = self.profiles.get(key)
        if prof:
            hours = project(prof["s_per_image"], images, passes)["total_device_hours"]
            note = smaller_batch(prof, stage_cfg)
            found: Projection | None = Projection(hours, basis="measured", margin=ESTIMATE_MARGIN if note else 1.0,
                                                  parts=note)
            why = ""
        elif not estimate:
            return None, "no stored profile covers this stage"
        else:
            found, why = self.estimate_from_flops(stage_cfg, input_cfg, key, images * passes)
        if found is not None and step == "knn":
            found = self.with_knn_vote(found, stage_cfg, key)
        return found, why

    def knn_vote_rate(self, key: str) -> tuple[float, str]:
        """(FLOP/s, its source) of a kNN vote's fp32 matrix products on this set's device: the fp32 forward rate of
        the kNN profile of ``key`` when it has a FLOPs count, else the slowest such kNN profile in the set, else the
        stated ``KNN_VOTE_FLOPS``."""
        def rate(p: Any) -> float | None:
            ok = isinstance(p, Mapping) and p.get("kind") == "knn" and p.get("s_per_image") and profile_flops(p)
            return float(profile_flops(p)) / float(p["s_per_image"]) if ok else None

        own = rate(self.profiles.get(key))
        if own:
            return own, "the fp32 rate of this kNN forward, measured"
        rates = [r for r in map(rate, self.profiles.values()) if r]
        if rates:
            return min(rates), "the slowest fp32 rate of a measured kNN forward on this device"
        return KNN_VOTE_FLOPS, "a stated conservative fp32 rate: no kNN profile with a FLOPs count on this device"

    def with_knn_vote(self, forward: Projection, stage_cfg: Mapping[str, Any], key: str) -> Projection:
        """A kNN stage's projection: its encoder forward over gallery + query (``forward``) plus its vote
        (``knn_vote_flops`` at ``knn_vote_rate``), both shared by the stage's GPUs; the parts are named."""
        vote = knn_vote_flops(stage_cfg)
        if vote is None:
            return Projection(forward.device_hours, forward.basis, forward.margin,
                              f"kNN device-hours: encoder forward {forward.device_hours:.2f} h + a vote of unknown "
                              "feature width (not counted)")
        rate, source = self.knn_vote_rate(key)
        vote_h = vote / rate / 3600.0
        how = "estimated" if forward.estimated else "measured"
        return Projection(forward.device_hours + vote_h, forward.basis, forward.margin,
                          f"kNN device-hours: encoder forward {forward.device_hours:.2f} h ({how}) + vote "
                          f"{vote_h * 60:.1f} min ({vote:.3g} FLOPs at {rate / 1e12:.1f} TFLOP/s, {source})")

    def estimate_from_flops(self, stage_cfg: Mapping[str, Any], input_cfg: Mapping[str, Any] | None, key: str,
                            images: float) -> tuple[Projection | None, str]:
        """The stage's FLOPs per image (counted for ``key`` in any stored set, else analytic) over the FLOP/s of the
        nearest measured profile of its step kind and architecture family in this set: the same method (pretraining)
        first, then the same architecture, then the closest FLOPs per image."""
        step = step_kind(stage_cfg)
        if step in TRANSFER_STEPS:
            return self.estimate_transfer(key, images)
        family, arch = arch_family(stage_cfg["model"].get("arch")), stage_cfg["model"].get("arch")
        same_kind = [p for p in self.profiles.values()
                     if isinstance(p, Mapping) and p.get("kind", "pretrain") == step and p.get("s_per_image")]
        if not same_kind:
            return None, "no stored profile covers this stage"
        target = self.flops.get(key) or stage_flops(stage_cfg, input_cfg)
        if not target:
            return None, (f"no stored profile covers this stage, and its FLOPs per image are not known (no stored "
                          f"count, no analytic formula for a {arch} {step} step)")
        refs = [p for p in same_kind if profile_flops(p) and arch_family(p.get("arch")) == family]
        if not refs:
            return None, (f"no stored profile covers this stage, and no measured {step} profile of a {family} with a "
                          f"FLOPs count on {self.device} to estimate from")
        method = (stage_cfg.get("method") or {}).get("name")

        def nearness(p: Mapping[str, Any]) -> tuple[bool, bool, float]:
            return (step == "pretrain" and p.get("method") == method, p.get("arch") == arch,
                    -abs(math.log(float(profile_flops(p)) / target)))

        ref = max(refs, key=nearness)
        rate = float(profile_flops(ref)) / float(ref["s_per_image"])  # FLOP/s achieved by the reference
        hours = project(target / rate, int(images), 1.0)["total_device_hours"]
        name = f"{step}/{ref.get('recipe')}" if step != "pretrain" else str(ref.get("recipe"))
        if ref.get("img_size") and ref.get("img_size") != stage_cfg["data"]["img_size"]:
            name += f" at {ref['img_size']} px"
        return Projection(hours, margin=ESTIMATE_MARGIN,
                          basis=f"estimated from FLOPs vs {name} ({rate / 1e12:.1f} TFLOP/s)"), ""

    def estimate_transfer(self, key: str, images: float) -> tuple[Projection | None, str]:
        """A segment / detect stage: its counted FLOPs per image at the FLOP rate of ``TRANSFER_REFERENCE`` (its
        published time per image over our count of its FLOPs), whatever the device."""
        counts = transfer_counts()
        target = transfer_flops().get(key)
        ref = counts.get("reference") or {}
        if not target or not ref.get("flops_per_s"):
            return None, (f"no stored profile covers this stage, and {TRANSFER_FLOPS} has no count of its model "
                          "(`repro profile --transfer-flops` counts the transfer recipes)")
        rate = float(ref["flops_per_s"])
        hours = project(target / rate, int(images), 1.0)["total_device_hours"]
        return Projection(hours, margin=ESTIMATE_MARGIN,
                          basis=f"estimated from FLOPs at the rate of {ref['kind']}/{ref['recipe']} "
                                f"({rate / 1e12:.1f} TFLOP/s: {ref['s_per_image']} s per image published, on any "
                                "GPU)"), ""

    @property
    def device(self) -> str | None:
        """The set's device (``NVIDIA H200``, ``CPU (...)``); None when nothing is stored."""
        return set_device(self.set_name) if self.set_name else None

    @property
    def on_gpu(self) -> bool:
        """Whether the set was measured on a GPU (``set_on_gpu``)."""
        return self.set_name is not None and set_on_gpu(self.set_name, self.profiles)

    def describe(self, all_sets: Iterable[str] = ()) -> str:
        if self.set_name is None:
            return "projection: no stored profiles (run `repro profile`)"
        others = [s for s in all_sets if s != self.set_name]
        return (f"projection device: {self.set_name} ({len(self.profiles)} stored profiles); other stored sets: "
                + ("; ".join(others) or "none") + " (choose with --device NAME)")


def counted_flops(sets: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Counted FLOPs per image by cost key over every stored set (full profiles first, then derived ones)."""
    out: dict[str, float] = {}
    for derived in (False, True):
        for profs in sets.values():
            for k, p in profs.items():
                if isinstance(p, Mapping) and p.get("flops_per_image") and bool(p.get("derived_from")) == derived:
                    out.setdefault(k, float(p["flops_per_image"]))
    return out


def projector(cfgs: Iterable[Mapping[str, Any]] = (), device: str | None = None,
              path: Path | None = None, gpu: bool = False) -> tuple[Projector, list[str]]:
    """The projector for a plan's stage configs (see ``choose_set``) and every stored set's name. ``gpu``:
    without ``device``, only sets measured on a GPU are candidates (a Slurm submission to GPU nodes)."""
    sets = load_profiles(path)
    pool = {n: v for n, v in sets.items() if set_on_gpu(n, v)} if gpu and not device else sets
    name = choose_set(pool, cfgs, device)
    return Projector(name, sets.get(name, {}) if name else {}, counted_flops(sets)), list(sets)


def projected_hours(stage_cfg: Mapping[str, Any], path: Path | None = None, device: str | None = None,
                    ) -> float | None:
    """Projected device-hours of one stage (pretraining, or an evaluation whose step is profiled) measured at its
    exact configuration (cost key) in the stored set ``choose_set`` picks; None when its kind is not profiled, its
    dataset has no known size, or that set has no profile of its configuration (no FLOPs estimate here)."""
    return projector([stage_cfg], device, path)[0](stage_cfg)
