"""Issue 10, planning half: a row's own evaluation settings win over what it inherits, evaluations at another
resolution resample the position tables, the audited spec rows resolve to the papers' experiments, the spec
consistency check, and results-versions in the stage identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from repro.cli import main
from repro.config import ConfigError
from repro.evals.features import load_encoder
from repro.methods import METHODS, get_method
from repro.models.vit import create_vit, encoder_state_dict
from repro.pipeline.plan import chain, eval_overrides, plan_tables
from repro.pipeline.stage import Stage, results_version
from repro.record.provenance import provenance
from repro.report.tables import current_code
from repro.spec import get_spec
from repro.spec.check import no_effect_overrides, same_stage_conflicts
from repro.spec.schema import parse_paper

torch.set_num_threads(1)


def _row(table: str, label: str, scale: str = "paper", overrides: list[str] | None = None) -> Any:
    tp = plan_tables([table], scale, overrides or [])[0]
    return next(r for r in tp.rows if r.row.label == label)


# ---- precedence: recipe < inherited < row eval_overrides < command line ----------------------------------------------


@pytest.mark.parametrize("scale,size", [("paper", 384), ("tiny", 56)])
def test_row_eval_override_beats_the_inherited_resolution(scale: str, size: int) -> None:
    ft384 = _row("lomar/t2", "LoMaR 384-FT (text)", scale)
    ft224 = _row("lomar/t2", "LoMaR 1600ep (text)", scale)
    assert ft384.pretrain.key == ft224.pretrain.key  # the same 1,600-epoch pretraining at 224
    assert ft384.evals["finetune"].cfg["data"]["img_size"] == size  # 384 through the scale rule at tiny
    assert ft224.evals["finetune"].cfg["data"]["img_size"] == ft224.pretrain.cfg["data"]["img_size"]
    assert ft384.evals["finetune"].key != ft224.evals["finetune"].key


def test_command_line_overrides_beat_the_row() -> None:
    row = _row("lomar/t2", "LoMaR 384-FT (text)", "tiny", ["data.img_size=48"])
    assert row.evals["finetune"].cfg["data"]["img_size"] == 48


def test_eval_overrides_leaves_out_the_rows_keys_and_their_coupled_keys() -> None:
    pre = _row("extrema/t3", "x1").pretrain.cfg
    inherited = eval_overrides(pre, "finetune", "extrema_vit_base")
    assert inherited["data"]["dataset"] == "imagenet22k" and inherited["data"]["num_classes"] == 21841
    own = eval_overrides(pre, "finetune", "extrema_vit_base", {"data": {"dataset": "imagenet1k", "img_size": 384}})
    for key in ("dataset", "path", "num_classes", "img_size"):
        assert key not in own["data"]
    assert "window_size" not in own["model"] and own["model"]["arch"] == pre["model"]["arch"]


IN22K_ROWS = [*(("extrema/t3", f"x{n}") for n in (1, 2, 4, 8, 10)),
              ("extrema/t7", "ExtreMA (22k), ViT-S"), ("extrema/t7", "ExtreMA (22k), ViT-B")]


@pytest.mark.parametrize("table,label", IN22K_ROWS)
def test_in22k_pretraining_is_evaluated_on_in1k(table: str, label: str) -> None:
    row = _row(table, label)
    assert row.pretrain.cfg["data"]["dataset"] == "imagenet22k"
    assert set(row.evals) == {"finetune", "linear"}
    for stage in row.evals.values():
        assert (stage.cfg["data"]["dataset"], stage.cfg["data"]["num_classes"]) == ("imagenet1k", 1000)
        assert stage.cfg["model"]["arch"] == row.pretrain.cfg["model"]["arch"]


def test_chain_of_an_in22k_recipe_evaluates_on_in1k() -> None:
    pre, *evals = chain("extrema_in22k", "paper")
    assert pre.cfg["data"]["dataset"] == "imagenet22k"
    assert evals and all(s.cfg["data"]["dataset"] == "imagenet1k" for s in evals)


# ---- another resolution: resample the position tables ----------------------------------------------------------------


@pytest.mark.parametrize("rel_pos", ["none", "bias", "irpe"])
def test_finetune_at_another_resolution_resamples_positions(tmp_path: Path, rel_pos: str) -> None:
    torch.manual_seed(0)
    model = {"arch": "vit_micro", "patch_size": 4, "rel_pos": rel_pos, "pos_embed": "sincos"}
    src = create_vit(model, 32)
    state = encoder_state_dict(src)
    if rel_pos == "bias":
        for k in state:
            if k.endswith("rel_table"):
                state[k] = torch.randn_like(state[k])
    path = tmp_path / "encoder.pth"
    torch.save(state, path)
    dst = create_vit({**model, "pos_embed": "learned"}, 56, num_classes=10)
    load_encoder(dst, str(path))
    want = resample_abs_pos_embed(state["pos_embed"], [14, 14], [8, 8], num_prefix_tokens=1)
    assert torch.equal(dst.pos_embed.detach(), want)
    if rel_pos == "bias":
        table = dst.blocks[0].attn.rel_table.detach()
        assert table.shape[0] == 27 * 27 + 3
        assert torch.equal(table[-3:], state["blocks.0.attn.rel_table"][-3:])  # cls entries kept
        centre = 13 * 27 + 13  # offset (0, 0) stays the source's (0, 0) entry
        assert torch.allclose(table[centre], state["blocks.0.attn.rel_table"][7 * 15 + 7], atol=1e-5)
    assert dst(torch.randn(2, 3, 56, 56)).shape == (2, 10)


def test_position_table_of_another_width_is_refused(tmp_path: Path) -> None:
    state = encoder_state_dict(create_vit({"arch": "vit_micro", "patch_size": 4}, 32))
    state["pos_embed"] = state["pos_embed"][:, :-3]  # not a square grid
    torch.save(state, tmp_path / "e.pth")
    with pytest.raises(ConfigError, match="not a square grid"):
        load_encoder(create_vit({"arch": "vit_micro", "patch_size": 4}, 56), str(tmp_path / "e.pth"))


# ---- the audited spec rows -------------------------------------------------------------------------------------------


def _localmim(table: str, label: str) -> Any:
    cfg = _row(table, label, "tiny").pretrain.cfg
    return get_method("localmim")(cfg)


def test_localmim_swin_single_and_global_multiscale_rows() -> None:
    local = _localmim("localmim/t6", "local single-scale, Swin-B")
    top = local.tap_grid[local.stage_ends[-1]]
    assert len(set(local.sources)) == 4  # local: one decoder per stage
    assert local.cells == [local.cells[-1]] * 4 and top * local.cells[-1] == 32  # one grid (the top's) at every tap
    glob = _localmim("localmim/t6", "global multi-scale, Swin-B")
    assert set(glob.sources) == {glob.stage_ends[-1]}  # every decoder on the top stage
    assert [32 // c for c in glob.cells] == [4 * top, 2 * top, top, top]  # 28/14/7/7 targets at paper scale
    multi = _localmim("localmim/t6", "local multi-scale, Swin-B")
    assert multi.cells == glob.cells


def test_paper_rows_resolve_to_the_papers_runs() -> None:
    for table in ("lomar/t5", "lomar/t4"):
        assert get_spec(table).row("BEiT").overrides == {"optim.epochs": 800}
    assert _row("lomar/t5", "BEiT").pretrain.cfg["optim"]["epochs"] == 800
    for table, label in (("localmim/t1", "LocalMIM-Pixel, Swin-B 100"), ("localmim/t4a", "Pixels, Swin-B")):
        row = _row(table, label)
        assert row.pretrain.cfg["optim"]["epochs"] == 100 and row.pretrain.cfg["method"]["target"] == "pixel"
        assert row.evals["finetune"].cfg["recipe"] == "localmim_swin_base_100ep"
        assert row.evals["finetune"].cfg["optim"]["lr"] == 5e-3
    s = _row("extrema/t7", "ExtreMA (22k), ViT-S").evals["finetune"].cfg["optim"]
    assert (s["blr"], s["layer_decay"]) == (5e-4, 0.65)
    s1 = _row("extrema/t7", "ExtreMA (1k), ViT-S").evals["finetune"].cfg["optim"]
    assert (s1["blr"], s1["layer_decay"]) == (1e-3, 0.75)


def test_lomar_supplementary_rpe_ape_rows() -> None:
    rows = {label: _row("lomar/s-t1", label) for label in (
        "MAE, Absolute Position", "MAE, Relative Position", "LoMaR, Absolute Position", "LoMaR, Relative Position")}
    for label, r in rows.items():
        m = r.pretrain.cfg["method"]
        assert m["name"] == "lomar" and m["mask_ratio"] == 0.75 and (m["window_size"], m["num_windows"]) == (7, 4)
        assert m["arch"] == ("encoder_decoder" if label.startswith("MAE") else "encoder")
        assert m["position"] == ("irpe" if "Relative" in label else "sincos")
    assert rows["MAE, Absolute Position"].pretrain.key != _row("lomar/t2", "MAE").pretrain.key
    assert rows["LoMaR, Absolute Position"].pretrain.key == _row("lomar/t6-f4", "encoder 7x7").pretrain.key


# ---- repro tables --check --------------------------------------------------------------------------------------------

_SPEC = {"paper": "lomar", "title": "t", "tables": [{
    "id": "x1", "caption": "c", "source": "s",
    "columns": [{"id": "top1", "title": "Top-1", "measure": "finetune.top1"}],
    "rows": [
        {"label": "a", "values": {"top1": 83.1}, "pretrain": "mae", "overrides": {"optim.epochs": 400}},
        {"label": "b", "values": {"top1": 82.5}, "pretrain": "mae", "overrides": {"optim.epochs": 400}},
        {"label": "c", "values": {"top1": 84.0}, "pretrain": "mae", "overrides": {"optim.epochs": 800},
         "eval_overrides": {"finetune": {"optim.layer_decay": 0.65}}},
    ]}]}


def test_check_finds_shared_stages_and_no_effect_overrides() -> None:
    from repro.pipeline.plan import TablePlan, row_plan

    spec = parse_paper(_SPEC, "x.yaml")[0]
    plan = TablePlan(spec, [row_plan(spec, r, "paper") for r in spec.rows])
    found = same_stage_conflicts([plan])
    assert len(found) == 1 and "'a' (83.1)" in found[0][1] and "'b' (82.5)" in found[0][1]
    spec.rows[1].same_stage_ok = "explained"
    assert not same_stage_conflicts([plan])
    assert [e[1] for e in no_effect_overrides(spec, spec.rows[2])] == [
        "lomar/x1 'c': overrides.optim.epochs changes nothing",  # mae is 800 epochs already
        "lomar/x1 'c': eval_overrides.finetune.optim.layer_decay changes nothing"]  # vit_base's own value
    assert not no_effect_overrides(spec, spec.rows[0])


def test_tables_check_is_clean_for_the_shipped_specs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tables", "--check"]) == 0
    assert capsys.readouterr().out == ""


# ---- results-versions ------------------------------------------------------------------------------------------------


def test_results_version_is_in_the_identity_of_changed_code_only(monkeypatch: pytest.MonkeyPatch) -> None:
    lomar, mae = _row("lomar/t2", "LoMaR", "tiny"), _row("lomar/t2", "MAE", "tiny")
    keys = {k: (r.pretrain.key, r.evals["finetune"].key) for k, r in (("lomar", lomar), ("mae", mae))}
    # pretrain / finetune 2: augmentation seeded per batch (the tiny data path)
    assert results_version("pretrain", lomar.pretrain.cfg) == {"pretrain": 2, "method.lomar": 2}
    assert results_version("semisup", {"kind": "finetune"}) == {"finetune": 2}
    cls = METHODS["lomar"]  # the method's facts (results_version) live on its torch-free spec
    monkeypatch.setattr(cls, "results_version", cls.results_version + 1)
    lomar2, mae2 = _row("lomar/t2", "LoMaR", "tiny"), _row("lomar/t2", "MAE", "tiny")
    assert lomar2.pretrain.key != keys["lomar"][0] and lomar2.evals["finetune"].key != keys["lomar"][1]
    assert (mae2.pretrain.key, mae2.evals["finetune"].key) == keys["mae"]  # unchanged code, unchanged stages
    # A version-1 method keeps the identity it had before versions existed.
    stage = mae.pretrain
    assert stage.key == Stage(stage.kind, stage.cfg).key


def test_results_record_their_code_and_the_report_leaves_out_older_ones() -> None:
    cfg = _row("lomar/t2", "LoMaR", "tiny").pretrain.cfg
    made = provenance(cfg)["results_version"]
    assert made == {"pretrain": 2, "method.lomar": 2}
    result = {"kind": "pretrain", "config": cfg, "provenance": {"results_version": made}}
    assert current_code(result)
    assert not current_code({**result, "provenance": {}})  # made before LoMaR's version 2
    assert not current_code({**result, "provenance": {"results_version": {"pretrain": 1, "method.lomar": 2}}})
    mae = _row("lomar/t2", "MAE", "tiny").pretrain.cfg
    assert current_code({"kind": "pretrain", "config": mae, "provenance": {"results_version": {"pretrain": 2}}})
    assert not current_code({"kind": "pretrain", "config": mae, "provenance": {}})  # before the pretrain kind's v2
