"""The stage-kind registry (repro.kinds): the shipped kinds keep the facts the planner, worker, recipe loader and CLI
used to hard-code; a row needing an unregistered kind is pending with a derived reason; and a new kind is one
``register_kind`` call + a runner + its recipes folder, planned and run through the worker like the shipped ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import repro.config as config
import repro.resolve as resolve_mod
from repro.config import ConfigError, list_recipes, recipe_kinds, recipes_root
from repro.kinds import (
    ENCODER,
    KINDS,
    StageKind,
    cli_kinds,
    eval_kinds,
    get_kind,
    register_kind,
    unregister_kind,
)
from repro.pipeline.plan import row_plan, row_status
from repro.spec import get_spec, load_specs
from repro.spec.schema import MEASURES, parse_paper


def test_every_kind_has_a_recipes_folder_with_a_base_and_a_runner() -> None:
    for kind in KINDS.values():
        assert (recipes_root() / kind.recipes / "_base.yaml").is_file(), kind.name
        assert callable(kind.load_runner()), kind.name


SHIPPED = ("pretrain", "finetune", "linear", "knn", "semisup", "analysis")  # kinds added later come after these


def test_the_registry_keeps_the_facts_that_were_scattered() -> None:
    assert tuple(KINDS)[:6] == SHIPPED
    assert recipe_kinds()[:5] == ("pretrain", "finetune", "linear", "knn", "analysis")  # was config.KINDS
    assert eval_kinds()[:5] == ("finetune", "linear", "knn", "semisup", "analysis")  # was plan.EVAL_KINDS
    shipped = {k: KINDS[k] for k in SHIPPED}
    assert {k: v.recipes for k, v in shipped.items() if v.recipes != k} == {"semisup": "finetune"}  # RECIPE_KIND
    assert {k: v.default_recipe for k, v in shipped.items() if v.default_recipe} == {  # was plan.DEFAULT_EVALS
        "knn": "default", "semisup": "semisup_vit_base", "analysis": "default"}
    assert cli_kinds()[:4] == ("pretrain", "finetune", "linear", "knn")
    assert get_kind("semisup").runner == get_kind("finetune").runner
    assert dict(get_kind("analysis").input_files) == {"init_result": "result.json"}
    before = {  # the table of spec/schema.py before the registry (the transfer measures: test below)
        "finetune.top1": ("finetune", "top1"), "linear.top1": ("linear", "linear_top1"),
        "knn.top1": ("knn", "knn_top1_k200"), "knn.top1_k20": ("knn", "knn_top1_k20"),
        "pretrain.hours": ("pretrain", "device_hours"),
        "pretrain.hours_per_epoch": ("pretrain", "device_hours_per_epoch"),
        "pretrain.knn_curve": ("pretrain", "knn_curve"), "pretrain.loss_curve": ("pretrain", "loss_curve"),
        "semisup.top1": ("semisup", "top1"),
        "analysis.nmi": ("analysis", "nmi"), "analysis.kl": ("analysis", "kl"),
        "analysis.grad_norm": ("analysis", "grad_norm"), "derived.speedup": ("derived", "speedup")}
    assert {m: MEASURES[m] for m in before} == before


def test_unknown_kind_is_one_line_listing_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as e:
        get_kind("segmentation")
    assert str(e.value).startswith("unknown stage kind 'segmentation'; valid kinds: pretrain, finetune, linear, "
                                   "knn, semisup, analysis")
    with pytest.raises(ValueError, match="registered already"):
        register_kind(StageKind("knn", "repro.evals.knn:run_knn"))


def test_pending_is_derived_from_the_registry() -> None:
    t11 = get_spec("extrema/t11")
    detect = KINDS.pop("detect")
    try:
        assert row_status(t11, t11.row("MAE 1600")) == ("pending", "no `detect` stage kind yet")
    finally:
        KINDS["detect"] = detect
    assert row_status(t11, t11.row("MAE 1600")) == ("trainable", "")
    assert row_status(t11, t11.row("DINO"))[0] == "reported"
    t2 = get_spec("lomar/t2")
    assert row_status(t2, t2.row("MAE")) == ("trainable", "")
    # No spec row restates by hand what the planner derives.
    assert not [(s.id, r.label) for s in load_specs().values() for r in s.rows
                if r.pending and "not implemented" in r.pending]


def test_transfer_kinds_read_the_frameworks_metrics() -> None:
    """The spec's transfer measures read the keys the runners write (repro.transfer.mmseg / detect)."""
    assert MEASURES["segmentation.miou"] == ("segment", "miou")
    assert {m: MEASURES[f"detection.{m}"] for m in ("ap_box", "ap50_box", "ap75_box", "ap_mask", "ap50_mask",
                                                       "ap75_mask")} == {
        "ap_box": ("detect", "box_ap"), "ap50_box": ("detect", "box_ap50"), "ap75_box": ("detect", "box_ap75"),
        "ap_mask": ("detect", "mask_ap"), "ap50_mask": ("detect", "mask_ap50"), "ap75_mask": ("detect", "mask_ap75")}
    for name in ("segment", "detect"):
        k = get_kind(name)
        assert not k.inherit_data and k.input != ENCODER and k.default_recipe


def test_transfer_stages_take_the_encoder_not_its_data() -> None:
    """segment / detect inherit the pretraining's model keys but keep their own datasets and sizes, at both scales;
    an ImageNet-22K pretraining does not move them to ImageNet-1K."""
    for scale in ("paper", "tiny"):
        for table, label, kind in (("extrema/t9", "ExtreMA (22k)", "segment"), ("lomar/t3", "LoMaR", "detect"),
                                   ("localmim/t3", "SimMIM192", "detect")):
            spec = get_spec(table)
            plan = row_plan(spec, spec.row(label), scale)
            pre, ev = plan.pretrain, plan.evals[kind]
            assert pre is not None and ev.deps == {"init": pre}
            for key in ("arch", "patch_size", "rel_pos", "class_token", "layer_scale"):
                assert ev.cfg["model"][key] == pre.cfg["model"][key], (scale, table, key)
            own = resolve_mod.resolve(ev.cfg["recipe"], scale, kind=kind)
            assert ev.cfg["data"] == own["data"], (scale, table)
            assert ev.cfg["model"]["window_size"] == own["model"]["window_size"]
            assert ev.cfg["data"]["dataset"] == ("synthetic" if scale == "tiny" else
                                                 {"segment": "ade20k", "detect": "coco"}[kind])


# ---- a new kind: one registration, a runner, a recipes folder ------------------------------------------------------

def run_dummy(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The dummy kind's runner: a score from its recipe knob and whether it had an encoder."""
    return {"metrics": {"score": float(cfg["offset"]) + (cfg["init"] != "random")}, "accounting": {"wall_s": 0.0}}


@pytest.fixture
def dummy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StageKind]:
    """A `dummy` stage kind with its recipes in a copy of the recipes root (links to the shipped folders)."""
    root = tmp_path / "recipes"
    root.mkdir()
    for p in recipes_root().iterdir():
        (root / p.name).symlink_to(p)
    (root / "dummy").mkdir()
    (root / "dummy" / "_base.yaml").write_text("init: random\noffset: 0.0\ntiny_overrides: {}\ntiny_reason: ''\n")
    (root / "dummy" / "default.yaml").write_text("description: a dummy evaluation\noffset: 2.0\n")
    monkeypatch.setattr(config, "recipes_root", lambda: root)
    monkeypatch.setattr(resolve_mod, "recipes_root", lambda: root, raising=False)
    kind = register_kind(StageKind("dummy", f"{__name__}:run_dummy", measures={"score": "score"},
                                   default_recipe="default", cli_help="evaluate an encoder by a dummy score"))
    try:
        yield kind
    finally:
        unregister_kind("dummy")
    assert "dummy" not in KINDS and "dummy.score" not in MEASURES


def _table(rows: list[dict[str, Any]]) -> Any:
    data = {"paper": "lomar", "title": "dummy", "tables": [{
        "id": "dummy", "caption": "a dummy score", "source": "tests/test_kinds.py",
        "columns": [{"id": "s", "title": "Score", "measure": "dummy.score"}], "rows": rows}]}
    return parse_paper(data, "dummy.yaml")[0]


def test_a_new_kind_is_planned_and_run_through_the_worker(dummy: StageKind, tmp_path: Path) -> None:
    from repro.cli import build_parser
    from repro.pipeline import worker
    from repro.pipeline.execute import write_spec

    assert "dummy" in recipe_kinds() and list_recipes("dummy") == {"dummy": ["default"]}
    assert MEASURES["dummy.score"] == ("dummy", "score") and "dummy" in eval_kinds()
    assert build_parser().parse_args(["dummy", "default", "--init", "random"]).cmd == "dummy"
    spec = _table([{"label": "scratch", "init": "random", "values": {"s": 3.0}},
                   {"label": "MAE", "pretrain": "mae", "values": {"s": 4.0}}])

    scratch = row_plan(spec, spec.row("scratch"), "tiny")
    assert scratch.status == "trainable" and list(scratch.evals) == ["dummy"]
    stage = scratch.evals["dummy"]
    assert stage.kind == "dummy" and not stage.deps and stage.cfg["init"] == "random"
    assert stage.cfg["offset"] == 2.0 and stage.cfg["recipe"] == "default"

    mae = row_plan(spec, spec.row("MAE"), "tiny")  # on a pretraining: it inherits the encoder's architecture
    ev = mae.evals["dummy"]
    assert mae.pretrain is not None and ev.deps == {"init": mae.pretrain}
    assert ev.cfg["model"]["arch"] == mae.pretrain.cfg["model"]["arch"]

    runs = tmp_path / "runs"
    assert worker.execute(write_spec(stage, runs)).code == 0
    result = json.loads((stage.dir(runs) / "result.json").read_text())
    assert result["kind"] == "dummy" and result["status"] == "done"
    assert result["metrics"][MEASURES["dummy.score"][1]] == 2.0
    assert stage.done(runs)


def test_a_kind_that_needs_an_encoder_refuses_a_random_init_row(dummy: StageKind) -> None:
    unregister_kind("dummy")
    register_kind(StageKind("dummy", f"{__name__}:run_dummy", input=ENCODER, measures={"score": "score"},
                            default_recipe="default"))
    spec = _table([{"label": "scratch", "init": "random"}])
    with pytest.raises(ConfigError, match="needs a pretrained encoder"):
        row_plan(spec, spec.row("scratch"), "tiny")
