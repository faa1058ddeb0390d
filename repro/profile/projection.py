"""Stored profiles and the projection of a stage's device-hours from them, for ``repro plan --scale paper``.

``tables/efficiency/profiles.json`` (beside the cost tables it feeds, never inside the installed package) holds
one measured step cost per cost key in each *profile set*: one device (CPU model / GPU name), one precision and one
mode of the engine's speed switches (eager / compiled, fused AdamW or not), so a GPU measurement never replaces a
CPU one and an eager one never replaces a compiled one. A projection uses one set only (``--device``), never a mix.


Pure arithmetic, no torch (planning imports it): the dataset sizes, the cost key of a configuration and the
projection of a measured time per image to a schedule live here; ``repro.profile.bench`` re-exports them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.config import ConfigError
from repro.io import atomic_write_json

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
}


def cost_key(cfg: Mapping[str, Any]) -> str:
    """What a step's cost depends on: the method section, the model and the resolution (not epochs, data, lr)."""
    from repro.methods.registry import get_spec

    free = get_spec(cfg["method"]["name"]).cost_free
    method = {k: v for k, v in cfg["method"].items() if k not in free}
    key = {"method": method, "model": dict(cfg["model"]), "img_size": cfg["data"]["img_size"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_images(cfg: Mapping[str, Any]) -> int:
    """Training images per epoch of the config's dataset (the paper's, at paper scale)."""
    data = cfg["data"]
    name = data["dataset"]
    if name not in DATASET_SIZES:
        raise ConfigError(f"no known size for data.dataset={name}; profile a paper-scale recipe "
                          f"({', '.join(DATASET_SIZES)})")
    return int(round(DATASET_SIZES[name] * float(data.get("train_fraction", 1.0))))


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


def profile_set(prof: Mapping[str, Any]) -> str:
    """The set a profile belongs to: ``device | precision | mode``, e.g.
    ``NVIDIA H200 | bf16 autocast | compiled + fused AdamW``."""
    mode = "compiled" if prof.get("compile") else "eager"
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


def _stage_images(stage_cfg: Mapping[str, Any]) -> int | None:
    if stage_cfg.get("kind", "pretrain") != "pretrain" or "method" not in stage_cfg or "optim" not in stage_cfg:
        return None
    try:
        return train_images(stage_cfg)
    except Exception:  # noqa: BLE001 - tiny / synthetic data: no paper-scale projection
        return None


def choose_set(sets: Mapping[str, Mapping[str, Any]], cfgs: Iterable[Mapping[str, Any]] = (),
               device: str | None = None) -> str | None:
    """The one profile set a projection uses. ``device``: a case-insensitive part of a set's name (``H200``,
    ``CPU``, ``H200 | bf16 autocast | eager``); it must not name sets of more than one device. Among the candidates:
    the set that covers most of ``cfgs`` (pretraining configs), then one of the papers' GPU classes, then the set
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
    keys = [cost_key(c) for c in cfgs if _stage_images(c) is not None]

    def score(n: str) -> tuple[int, bool, int]:
        return (sum(k in sets[n] for k in keys), any(g in set_device(n) for g in PAPER_GPUS), len(sets[n]))

    return max(names, key=score)


@dataclass
class Projector:
    """Projected device-hours of pretraining stages from one profile set (``set_name``; None: nothing stored)."""
    set_name: str | None
    profiles: Mapping[str, Any]

    def __call__(self, stage_cfg: Mapping[str, Any]) -> float | None:
        images = _stage_images(stage_cfg)
        prof = self.profiles.get(cost_key(stage_cfg)) if images is not None else None
        if not prof:
            return None
        return project(prof["s_per_image"], images, float(stage_cfg["optim"]["epochs"]))["total_device_hours"]

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


def projector(cfgs: Iterable[Mapping[str, Any]] = (), device: str | None = None,
              path: Path | None = None, gpu: bool = False) -> tuple[Projector, list[str]]:
    """The projector for a plan's pretraining configs (see ``choose_set``) and every stored set's name. ``gpu``:
    without ``device``, only sets measured on a GPU are candidates (a Slurm submission to GPU nodes)."""
    sets = load_profiles(path)
    pool = {n: v for n, v in sets.items() if set_on_gpu(n, v)} if gpu and not device else sets
    name = choose_set(pool, cfgs, device)
    return Projector(name, sets.get(name, {}) if name else {}), list(sets)


def projected_hours(stage_cfg: Mapping[str, Any], path: Path | None = None, device: str | None = None,
                    ) -> float | None:
    """Projected device-hours of one pretraining stage (same method, model and resolution) from the stored set
    ``choose_set`` picks; None when it is not a pretraining stage, its dataset has no known size, or that set has
    no profile of its configuration."""
    return projector([stage_cfg], device, path)[0](stage_cfg)
