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
    is_kind,
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
    before = {  # the table of spec/schema.py before the registry, the transfer measures by their kinds' names
        "finetune.top1": ("finetune", "top1"), "linear.top1": ("linear", "linear_top1"),
        "knn.top1": ("knn", "knn_top1_k200"), "knn.top1_k20": ("knn", "knn_top1_k20"),
        "pretrain.hours": ("pretrain", "device_hours"),
        "pretrain.hours_per_epoch": ("pretrain", "device_hours_per_epoch"),
        "pretrain.knn_curve": ("pretrain", "knn_curve"), "pretrain.loss_curve": ("pretrain", "loss_curve"),
        "semisup.top1": ("semisup", "top1"), "segmentation.miou": ("segment", "miou"),
        "detection.ap_box": ("detect", "ap_box"), "detection.ap_mask": ("detect", "ap_mask"),
        "detection.ap50_box": ("detect", "ap50_box"), "detection.ap75_box": ("detect", "ap75_box"),
        "detection.ap50_mask": ("detect", "ap50_mask"), "detection.ap75_mask": ("detect", "ap75_mask"),
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
    assert row_status(get_spec("lomar/t4"), get_spec("lomar/t4").row("LoMaR")) == (
        "pending", "no `segment` stage kind yet")
    t11 = get_spec("extrema/t11")
    assert row_status(t11, t11.row("MAE 1600")) == ("pending", "no `detect` stage kind yet")
    assert row_status(t11, t11.row("DINO"))[0] == "reported"
    t2 = get_spec("lomar/t2")
    assert row_status(t2, t2.row("MAE")) == ("trainable", "")
    # No spec row restates by hand what the planner derives.
    assert not [(s.id, r.label) for s in load_specs().values() for r in s.rows
                if r.pending and "not implemented" in r.pending]


def test_registering_the_missing_kind_makes_its_rows_trainable() -> None:
    t4 = get_spec("lomar/t4")
    added = not is_kind("segment")
    if added:
        register_kind(StageKind("segment", f"{__name__}:run_dummy"))
    try:
        assert MEASURES["segmentation.miou"] == ("segment", "miou")
        assert row_status(t4, t4.row("LoMaR")) == ("trainable", "")
    finally:
        if added:
            unregister_kind("segment")
    assert not added or row_status(t4, t4.row("LoMaR"))[0] == "pending"


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
