"""Stage kinds as one registry: every fact about a kind of stage (pretrain, finetune, ...) in one place.

A ``StageKind`` names its recipe folder (``repro/recipes/<recipes>/``), its runner (``"module:function"``, imported
only when a stage of the kind runs), its input, what it takes from the method that made its input, the measures it
records, its default recipe, its command-line subcommand and its Slurm resources. The planner
(``repro.pipeline.plan``), the worker (``repro.pipeline.worker``), the recipe loader (``repro.config``), the table
specs (``repro.spec``) and the CLI read them from here; a table row whose measures need a kind that is not registered
is planned as pending.

Adding a kind (e.g. ``segment``) = its runner module + one ``register_kind(...)`` call below + its recipes folder
with a ``_base.yaml``. This module imports nothing from torch or from the rest of ``repro`` but the error type.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from repro.errors import ConfigError

# What a stage of the kind takes as input.
NO_INPUT = "none"  # nothing (a pretraining)
ENCODER = "encoder"  # a pretrained encoder (the ``init`` input); a random init is refused
ENCODER_OR_RANDOM = "encoder_or_random"  # a pretrained encoder, or a random init (a baseline row, ``--init random``)
INPUTS = (NO_INPUT, ENCODER, ENCODER_OR_RANDOM)
# What an evaluation takes from the method that pretrained its input, besides the architecture and data keys every
# evaluation inherits (repro.pipeline.plan applies them): the fine-tuning pool, or the feature probes read.
INHERITS = ("global_pool", "feature")


@dataclass(frozen=True)
class StageKind:
    """One kind of stage. ``measures`` maps a measure (a spec column's ``measure:``; a name without a dot stands for
    ``<kind>.<name>``) to the key of the stage's ``result.json`` metrics (or accounting) it is read from."""

    name: str
    runner: str  # "module:function" with the signature (cfg, out_dir) -> {"metrics", "accounting", ...}
    recipes: str = ""  # recipe folder under repro/recipes (default: the name; semi-supervised runs "finetune")
    input: str = ENCODER_OR_RANDOM
    inherits: tuple[str, ...] = ()  # of INHERITS
    input_files: Mapping[str, str] = field(default_factory=dict)  # config key -> file of the input stage's folder
    measures: Mapping[str, str] = field(default_factory=dict)
    default_recipe: str | None = None  # when neither the row nor the pretraining recipe's `evals:` names one
    cli_help: str | None = None  # help line of `repro <name>`; None: no subcommand
    cli_description: str = ""
    # Slurm resources (slurm/resources.yaml keys) this kind needs over the scale's defaults; no shipped kind has any
    resources: Mapping[str, Any] = field(default_factory=dict)
    # Whether the kind inherits the pretraining's data keys (plan.INHERITED["data"], and the resolution-coupled
    # model.window_size); False for kinds with datasets and sizes of their own (segment, detect).
    inherit_data: bool = True
    # Its own tiny rule, "module:function" (cfg) -> cfg, torch-free, used by repro.scales.apply_scale instead of the
    # common rule; None: the common rule.
    tiny: str | None = None
    # Bumped by any change to the kind's runner that alters the numbers a finished stage would give: versions above 1
    # enter the identity of the kind's stages (repro.pipeline.stage.results_version), so they are recomputed.
    results_version: int = 1

    def __post_init__(self) -> None:
        if not self.recipes:
            object.__setattr__(self, "recipes", self.name)

    def measure_names(self) -> dict[str, str]:
        """``measures`` with full names (``knn.top1``)."""
        return {(m if "." in m else f"{self.name}.{m}"): key for m, key in self.measures.items()}

    @property
    def takes_input(self) -> bool:
        return self.input != NO_INPUT

    def load_runner(self) -> Callable[..., dict[str, Any]]:
        """The runner function (imports its module: torch, for the shipped kinds)."""
        return _load(self.runner)  # type: ignore[no-any-return]

    def tiny_rule(self) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """The kind's own tiny rule (imports its torch-free module), or None."""
        return _load(self.tiny) if self.tiny else None


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


KINDS: dict[str, StageKind] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def register_kind(kind: StageKind) -> StageKind:
    """Add ``kind`` to the registry (a name registered twice is refused)."""
    if not _NAME.fullmatch(kind.name) or not _NAME.fullmatch(kind.recipes):
        raise ValueError(f"stage kind {kind.name!r} / recipes {kind.recipes!r}: lower-case names (a-z, 0-9, _)")
    if kind.name in KINDS:
        raise ValueError(f"stage kind '{kind.name}' is registered already")
    if kind.input not in INPUTS or any(i not in INHERITS for i in kind.inherits):
        raise ValueError(f"stage kind '{kind.name}': input one of {INPUTS}, inherits of {INHERITS}")
    if ":" not in kind.runner or (kind.tiny is not None and ":" not in kind.tiny):
        raise ValueError(f"stage kind '{kind.name}': runner and tiny must be 'module:function', got "
                         f"{kind.runner!r}, {kind.tiny!r}")
    KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind (tests that register one of their own)."""
    KINDS.pop(name, None)


def get_kind(name: str) -> StageKind:
    if name not in KINDS:
        raise ConfigError(f"unknown stage kind {name!r}; valid kinds: {', '.join(KINDS)}")
    return KINDS[name]


def is_kind(name: str) -> bool:
    return name in KINDS


def recipe_kind(recipes: str) -> StageKind | None:
    """The first registered kind whose recipe folder is ``recipes`` (None: none is)."""
    return next((k for k in KINDS.values() if k.recipes == recipes), None)


def recipe_kinds() -> tuple[str, ...]:
    """The recipe folders of the registered kinds, in registration order, each once."""
    return tuple(dict.fromkeys(k.recipes for k in KINDS.values()))


def eval_kinds() -> tuple[str, ...]:
    """Kinds that evaluate an input (every kind but the pretraining)."""
    return tuple(k.name for k in KINDS.values() if k.takes_input)


def cli_kinds() -> tuple[str, ...]:
    """Kinds with a `repro <kind>` subcommand."""
    return tuple(k.name for k in KINDS.values() if k.cli_help)


# ---- the kinds the suite runs ---------------------------------------------------------------------------------------

register_kind(StageKind(
    "pretrain", "repro.pretrain:run_pretrain", input=NO_INPUT,
    measures={"hours": "device_hours", "hours_per_epoch": "device_hours_per_epoch", "knn_curve": "knn_curve",
              "loss_curve": "loss_curve"},
    cli_help="run one pretraining stage",
    cli_description="Pretrain with a method recipe; writes encoder.pth (timm-loadable) and result.json.",
    results_version=2))  # 2: augmentation seeded per batch, not per image (repro.data.loader)
register_kind(StageKind(
    "finetune", "repro.evals.finetune:run_finetune", inherits=("global_pool",), measures={"top1": "top1"},
    cli_help="evaluate an encoder by end-to-end fine-tuning",
    cli_description="Evaluate an encoder (--init PATH to an encoder.pth, or random) by end-to-end fine-tuning.",
    results_version=2))  # 2: augmentation seeded per batch (semi-supervised stages run this recipe kind too)
register_kind(StageKind(
    "linear", "repro.evals.linear:run_linear", inherits=("feature",), measures={"top1": "linear_top1"},
    cli_help="evaluate an encoder by linear probing",
    cli_description="Evaluate an encoder (--init PATH to an encoder.pth, or random) by linear probing.",
    results_version=2))  # 2: augmentation seeded per batch
register_kind(StageKind(
    "knn", "repro.evals.knn:run_knn", inherits=("feature",),
    measures={"top1": "knn_top1_k200", "top1_k20": "knn_top1_k20"},  # k = 200 unless a table says otherwise
    default_recipe="default", cli_help="evaluate an encoder by kNN",
    cli_description="Evaluate an encoder (--init PATH to an encoder.pth, or random) by kNN."))
register_kind(StageKind(  # semi-supervised: fine-tuning on a label fraction
    "semisup", "repro.evals.finetune:run_finetune", recipes="finetune", inherits=("global_pool",),
    measures={"top1": "top1"}, default_recipe="semisup_vit_base"))
register_kind(StageKind(  # reads the pretraining's history (gradient norms) from its result.json
    "analysis", "repro.evals.analysis:run_analysis", input_files={"init_result": "result.json"},
    measures={"nmi": "nmi", "kl": "kl", "grad_norm": "grad_norm"}, default_recipe="default"))
register_kind(StageKind(  # ADE20K UperNet with mmsegmentation (repro/transfer/mmseg.py)
    "segment", "repro.transfer.mmseg:run_segment", input=ENCODER_OR_RANDOM, inherit_data=False,
    tiny="repro.transfer.tiny:tiny_segment",
    measures={"segmentation.miou": "miou", "aacc": "aacc", "macc": "macc", "trivial_miou": "trivial_miou"},
    results_version=2,  # 2: tiny rule iterations / 400 (was / 1600)
    # the MAE / BEiT protocol the papers compare with; at paper scale slurm/resources.yaml's one node of 8 GPUs is
    # mmseg's MAE config (8 GPUs x 2 images)
    default_recipe="upernet_vit_base"))
register_kind(StageKind(  # COCO Mask R-CNN: detectron2 ViTDet or mmdet (`framework`; repro/transfer/detect.py)
    "detect", "repro.transfer.detect:run_detect", input=ENCODER_OR_RANDOM, inherit_data=False,
    measures={"detection.ap_box": "box_ap", "detection.ap50_box": "box_ap50", "detection.ap75_box": "box_ap75",
              "detection.ap_mask": "mask_ap", "detection.ap50_mask": "mask_ap50", "detection.ap75_mask": "mask_ap75",
              "trivial_ap_box": "trivial_box_ap", "trivial_ap_mask": "trivial_mask_ap"},
    results_version=2,  # 2: tiny budgets of 3 epochs, Swin at 32 px, layer decay for the mmdet ViT at tiny
    # one node of 8 GPUs at paper scale (mmdet: 2 images per GPU); ViTDet's 64 GPUs (8 nodes, one image each) are its
    # recipes' entries in slurm/resources.yaml
    default_recipe="vitdet_vit_base"))
