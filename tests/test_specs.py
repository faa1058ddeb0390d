"""Paper table specs (repro.spec): every TABLES.md id exists, sampled numbers match the papers, the schema rejects bad
files, and every row's recipe resolves at both scales."""

from __future__ import annotations

import copy

import pytest
import yaml

from repro.config import ConfigError, load_recipe, recipe_kinds
from repro.pipeline.plan import row_status
from repro.resolve import resolve
from repro.spec import get_spec, load_file, load_specs, select, spec_root
from repro.spec.schema import MEASURES, parse_paper

KINDS = recipe_kinds()  # the recipe kinds (was the constant config.KINDS)

# The ids of /work/shared/TABLES.md, in its order (hard-coded: CI does not have ../shared).
EXPECTED_IDS = [
    "lomar/t1", "lomar/t2", "lomar/f3", "lomar/t3", "lomar/t4", "lomar/t5", "lomar/t6-f4", "lomar/f5", "lomar/s-t1",
    "lomar/s-f1", "lomar/lin",
    "localmim/t1", "localmim/f1", "localmim/t2", "localmim/t3", "localmim/t4a", "localmim/t4b", "localmim/t4c",
    "localmim/t4d", "localmim/t4e", "localmim/t4f", "localmim/t5", "localmim/t6", "localmim/t7", "localmim/f3",
    "localmim/f5", "localmim/f6",
    "extrema/t1", "extrema/t2", "extrema/t3", "extrema/f4", "extrema/t4", "extrema/t5", "extrema/t6", "extrema/t7",
    "extrema/t8", "extrema/t9", "extrema/t10", "extrema/t11", "extrema/t12", "extrema/f5",
]


def cell(table: str, label: str, column: str):
    return get_spec(table).cell(label, column)


def test_every_tables_md_id_has_a_spec_in_order():
    # the papers' tables in TABLES.md order, then the suite's own signal table (repro/spec/suite.yaml)
    assert list(load_specs()) == [*EXPECTED_IDS, "suite/signal"]


# (table, row label, column, value as printed in the paper) -- typed from a reading of the papers, 2-4 per table.
SAMPLES = [
    ("lomar/t1", "LoMaR, IN-1K 384", "top1", 84.5), ("lomar/t1", "BEiT, IN-1K 448", "time_h", 595),
    ("lomar/t1", "MAE, iNat 448", "top1", 82.4), ("lomar/t1", "LoMaR, iNat 384", "speedup", 4.2),
    ("lomar/t2", "MAE", "top1", 83.1), ("lomar/t2", "LoMaR 8x8", "time_h", 66), ("lomar/t2", "MoCov3", "epochs", 600),
    ("lomar/t2", "LoMaR 1600ep (text)", "top1", 84.1), ("lomar/t2", "LoMaR 384-FT (text)", "top1", 85.4),
    ("lomar/f3", "MAE (text anchor)", "time_h", 232), ("lomar/f3", "BEiT (text anchor)", "top1", 83.2),
    ("lomar/f3", "LoMaR (text anchor, MAE's accuracy)", "time_h", 66),
    ("lomar/t3", "MAE", "vitdet_box", 51.1), ("lomar/t3", "LoMaR384", "vitae_mask", 46.2),
    ("lomar/t3", "LoMaR", "vitdet_mask", 45.7),
    ("lomar/t4", "supervised", "miou", 47.4), ("lomar/t4", "LoMaR384", "miou", 48.3),
    ("lomar/t4", "LoMaR", "miou", 47.8),
    ("lomar/t5", "BEiT", "time_h", 285), ("lomar/t5", "BEiT+ window masking", "top1", 83.4),
    ("lomar/t5", "BEiT+ window masking", "speedup", 2.8),
    ("lomar/t6-f4", "encoder 5x5", "views", 8), ("lomar/t6-f4", "encoder-decoder 9x9", "views", 3),
    ("lomar/t6-f4", "encoder 14x14", "top1", 83.2), ("lomar/t6-f4", "encoder 7x7", "time_h", 66),
    ("lomar/f5", "75%", "ratio", 75), ("lomar/f5", "30%", "ratio", 30),
    ("lomar/s-t1", "MAE, Absolute Position", "top1", 82.5), ("lomar/s-t1", "LoMaR, Relative Position", "top1", 83.5),
    ("lomar/s-t1", "LoMaR, Absolute Position", "top1", 83.1),
    ("lomar/s-f1", "6 views", "views", 6), ("lomar/s-f1", "1 view", "views", 1),
    ("localmim/t1", "iBOT", "total_h", 4040), ("localmim/t1", "LocalMIM-HOG, ViT-B 100", "h_per_ep", 0.7),
    ("localmim/t1", "GreenMIM, Swin-L", "top1", 85.1), ("localmim/t1", "Scratch, Swin", "h_per_ep", 2.4),
    ("localmim/f1", "BEiT", "accel", 27.4), ("localmim/f1", "GreenMIM", "accel", 6.4),
    ("localmim/f1", "Scratch Swin-B 300 ep (text)", "total_h", 720),
    ("localmim/t2", "LocalMIM-HOG", "miou", 49.5), ("localmim/t2", "MaskFeat", "hours", 6240),
    ("localmim/t2", "MoCo v3", "miou", 47.3),
    ("localmim/t3", "Supervised", "hours", 840), ("localmim/t3", "LocalMIM-HOG", "ap_mask", 44.9),
    ("localmim/t3", "SimMIM192", "ap_box", 50.4),
    ("localmim/t4a", "baselines, Swin-B", "top1", 83.2), ("localmim/t4a", "Pixels, ViT-B", "top1", 83.0),
    ("localmim/t4b", "0.90, Swin-B", "top1", 83.5), ("localmim/t4b", "0.60, ViT-B", "top1", 83.1),
    ("localmim/t4c", "512D - 16H, Swin-B", "h_per_ep", 1.6), ("localmim/t4c", "128D - 4H, ViT-B", "top1", 83.2),
    ("localmim/t4c", "256D - 8H, ViT-B", "h_per_ep", 0.7),
    ("localmim/t4d", "[4, 22, 24]", "top1", 83.6), ("localmim/t4d", "fusion", "top1", 83.5),
    ("localmim/t4e", "[1, 2, 11, 12]", "top1", 82.9), ("localmim/t4e", "[3, 6, 9, 12]", "top1", 83.1),
    ("localmim/t4f", "[7^2, 14^2, 28^2, 56^2]", "top1", 83.1), ("localmim/t4f", "[28^2, 14^2, 7^2, 7^2]", "top1", 83.2),
    ("localmim/t5", "w/ isolated grad, ViT-B", "top1", 83.0), ("localmim/t5", "w/ isolated grad, Swin-B", "top1", 83.7),
    ("localmim/t6", "global multi-scale, ViT-B", "top1", 82.8),
    ("localmim/t6", "local single-scale, Swin-B", "top1", 83.6),
    ("localmim/t6", "global multi-scale, Swin-B", "top1", 82.9),
    ("localmim/t7", "global with fusion, Swin-B", "top1", 83.5), ("localmim/t7", "local, ViT-B", "top1", 83.3),
    ("extrema/t1", "50%", "lin", 36.3), ("extrema/t1", "95%", "ft", 81.6), ("extrema/t1", "85%", "lin", 66.3),
    ("extrema/t2", "75% x4", "lin", 67.7), ("extrema/t2", "90% x10", "ft", 83.0), ("extrema/t2", "80% x5", "lin", 67.1),
    ("extrema/t3", "x8", "lin", 71.4), ("extrema/t3", "x10", "lin", 72.0), ("extrema/t3", "x1", "ft", 82.5),
    ("extrema/t4", "none, 1 aug", "lin", 55.1), ("extrema/t4", "crop + color, 2 augs", "lin", 73.3),
    ("extrema/t4", "shared crop + color, 2 augs", "ft", 83.3), ("extrema/t4", "rand size crop, 2 augs", "ft", 82.2),
    ("extrema/t5", "1", "lin", 66.2), ("extrema/t5", "3", "lin", 68.5),
    ("extrema/t6", "InfoNCE", "ft", 82.8), ("extrema/t6", "BYOL", "lin", 68.8),
    ("extrema/t7", "DINO, ViT-S", "lin", 77.0), ("extrema/t7", "BEiT, ViT-B", "lin", 37.6),
    ("extrema/t7", "ExtreMA (22k), ViT-B", "ft", 83.9), ("extrema/t7", "ExtreMA (1k), ViT-S", "lin", 69.4),
    ("extrema/t8", "MAE", "time_h", 650), ("extrema/t8", "ExtreMA (80% ratio x2)", "time_h", 36),
    ("extrema/t8", "DINO", "epochs", 400),
    ("extrema/t9", "ExtreMA (22k)", "miou", 48.4), ("extrema/t9", "DINO", "miou", 47.2),
    ("extrema/t10", "scratch, 1%", "top1", 9.0), ("extrema/t10", "ExtreMA (1k), 10%", "top1", 76.1),
    ("extrema/t10", "MoCo-v3, 1%", "top1", 57.2),
    ("extrema/t11", "MAE 1600", "ap75_box", 53.1), ("extrema/t11", "ExtreMA (22k)", "ap50_mask", 66.5),
    ("extrema/t11", "BEiT", "ap_mask", 37.8),
    ("extrema/t12", "90%, 1 mask, 600 ep", "time_h", 58), ("extrema/t12", "75%, 2 masks, 300 ep", "lin", 67.2),
    ("extrema/t12", "80%, 1 mask, 600 ep", "lin", 69.1),
]


@pytest.mark.parametrize("table,label,column,value", SAMPLES)
def test_transcribed_numbers(table, label, column, value):
    assert cell(table, label, column).value == value


def test_samples_cover_every_table_with_numbers():
    # Figures whose values exist only in a plot have nothing to sample but their x values or anchors.
    only_plot = {"localmim/f3", "localmim/f5", "localmim/f6", "extrema/f4", "extrema/f5", "lomar/lin"}
    assert {s[0] for s in SAMPLES} | only_plot == set(EXPECTED_IDS)


def test_approximate_missing_and_flagged_cells():
    assert cell("lomar/t1", "BEiT, IN-1K 384", "time_h").approx
    assert not cell("lomar/t1", "BEiT, IN-1K 384", "top1").approx
    assert cell("lomar/t2", "LoMaR", "time_h").approx and cell("lomar/t2", "LoMaR", "time_h").value == 49
    assert cell("lomar/f3", "BEiT (text anchor)", "time_h").approx is False  # "285 pretraining hours", no "~"
    assert cell("lomar/t2", "DINO", "time_h").value is None  # printed "-"
    assert cell("localmim/t1", "PeCo", "total_h").value is None
    assert cell("extrema/t7", "MAE, ViT-S", "ft").value is None
    # LoMaR Fig. 5: garbled point labels -> every point flagged, none guessed.
    for row in get_spec("lomar/f5").rows:
        assert row.cells["top1"].value is None and row.cells["top1"].flag
    # Plot-only figures: values missing, not flagged.
    for tid in ("lomar/s-f1", "extrema/f4", "extrema/f5", "localmim/f3"):
        spec = get_spec(tid)
        measured = [c.id for c in spec.columns if c.measure]
        assert all(r.value(c) is None for r in spec.rows for c in measured), tid
    # Nothing except LoMaR Fig. 5 is flagged.
    flagged = {s.id for s in load_specs().values() for r in s.rows for c in r.cells.values() if c.flag}
    assert flagged == {"lomar/f5"}


def test_row_status_reported_pending_trainable():
    t2 = get_spec("lomar/t2")
    assert not t2.row("DINO").trainable and t2.row("DINO").reported
    assert t2.row("No Pretraining").trainable and t2.row("No Pretraining").init == "random"
    assert t2.row("MAE").overrides == {"optim.epochs": 400}
    assert row_status(get_spec("lomar/t4"), get_spec("lomar/t4").row("LoMaR"))[0] == "trainable"  # segment registered
    # Reported-only systems are never given a recipe; pending rows always need a stage kind the suite lacks.
    for spec in load_specs().values():
        kinds = {MEASURES[c.measure][0] for c in spec.columns if c.measure}
        for row in spec.rows:
            if row.reported is None:
                assert row.pretrain or row.init == "random", (spec.id, row.label)
            if row_status(spec, row)[0] == "pending":
                assert kinds - {"pretrain", "derived", *KINDS}, (spec.id, row.label)
            for name in ("DINO", "MoCo", "iBOT", "data2Vec", "CAE", "PeCo"):
                if row.label.startswith(name):
                    assert row.reported and not row.trainable, (spec.id, row.label)


def test_reference_rows_and_speedups():
    t2 = get_spec("lomar/t2")
    assert t2.reference_row == "BEiT"
    sp = t2.column("speedup")
    assert sp.measure == "derived.speedup" and sp.reference == "time_h"
    # The printed speed-ups are the printed time ratios (rounded): a check on the transcription.
    ref = t2.row("BEiT").value("time_h")
    for label in ("MAE", "LoMaR", "LoMaR 8x8"):
        row = t2.row(label)
        assert abs(ref / row.value("time_h") - row.value("speedup")) < 0.1, label


def test_select_and_get_spec():
    assert [s.id for s in select(["lomar"])] == EXPECTED_IDS[:11]
    assert len(select(["all"])) == len(EXPECTED_IDS) + 1  # + suite/signal
    assert [s.id for s in select(["suite"])] == ["suite/signal"]
    assert [s.id for s in select(["extrema/t2", "lomar/t1", "extrema/t2"])] == ["extrema/t2", "lomar/t1"]
    with pytest.raises(ConfigError, match="valid ids: lomar/t1"):
        get_spec("lomar/t99")
    with pytest.raises(ConfigError, match="unknown table"):
        select(["nope"])


# ---- schema validation ---------------------------------------------------------------------------------------------

GOOD = {
    "paper": "lomar", "title": "x",
    "tables": [{"id": "t9", "kind": "table", "caption": "c", "source": "s",
                "columns": [{"id": "top1", "title": "Top-1", "measure": "finetune.top1"}],
                "rows": [{"label": "A", "values": {"top1": 80.1}, "approx": ["top1"], "pretrain": "mae"}]}],
}


def _bad(path: list, value) -> dict:
    data = copy.deepcopy(GOOD)
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return data


def test_schema_accepts_the_minimal_file():
    (spec,) = parse_paper(copy.deepcopy(GOOD), "x.yaml")
    assert spec.id == "lomar/t9" and spec.cell("A", "top1").approx and spec.cell("A", "top1").value == 80.1


@pytest.mark.parametrize("path,value,match", [
    (["tables", 0, "colour"], 1, "unknown key 'colour'"),
    (["tables", 0, "rows", 0, "pretrian"], "mae", "unknown key 'pretrian'"),
    (["tables", 0, "rows", 0, "values"], {"top5": 1.0}, "unknown column 'top5'"),
    (["tables", 0, "rows", 0, "approx"], ["lin"], "unknown column 'lin'"),
    (["tables", 0, "columns", 0, "measure"], "finetune.top5", "unknown measure"),
    (["tables", 0, "columns", 0, "measure"], "derived.speedup", "needs 'reference'"),
    (["tables", 0, "rows", 0, "values"], {"top1": "83.6"}, "number column"),
    (["tables", 0, "rows", 0, "init"], "random", "exclude each other"),
    (["tables", 0, "rows", 0, "evals"], {"segmentaton": "x"}, "unknown stage kind"),
    (["tables", 0, "reference_row"], "B", "not a row label"),
    (["tables", 0, "plot"], {"x": "x", "y": "lin"}, "plot.y"),
    (["tables", 0, "kind"], "chart", "bad kind"),
    (["paper"], "beit", "'paper' must be one of"),
])
def test_schema_errors(path, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_paper(_bad(path, value), "bad.yaml")
    assert "bad.yaml" in str(e.value) and "\n" not in str(e.value)


def test_duplicate_ids_and_labels_rejected():
    data = copy.deepcopy(GOOD)
    data["tables"].append(copy.deepcopy(data["tables"][0]))
    with pytest.raises(ConfigError, match="duplicate table id 'lomar/t9'"):
        parse_paper(data, "dup.yaml")
    data = copy.deepcopy(GOOD)
    data["tables"][0]["rows"].append(copy.deepcopy(data["tables"][0]["rows"][0]))
    with pytest.raises(ConfigError, match="duplicate row label 'A'"):
        parse_paper(data, "dup.yaml")


def test_load_file_reports_yaml_errors(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("paper: lomar\ntables: [\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_file(p)
    p.write_text(yaml.safe_dump(_bad(["tables", 0, "rows", 0, "values"], {"x": 1})))
    with pytest.raises(ConfigError, match="broken.yaml table 't9' row 'A'"):
        load_file(p)


def test_shipped_files_parse_standalone():
    for paper in ("lomar", "localmim", "extrema"):
        assert all(s.paper == paper for s in load_file(spec_root() / f"{paper}.yaml"))


# ---- recipes -------------------------------------------------------------------------------------------------------

EVAL_KINDS = tuple(k for k in KINDS if k != "pretrain")


def _rows_with_recipes():
    for spec in load_specs().values():
        kinds = [k for k in EVAL_KINDS if any(c.measure and MEASURES[c.measure][0] == k for c in spec.columns)]
        for row in spec.rows:
            if row.pretrain or row.init == "random":
                yield spec, row, kinds


def test_every_row_recipe_resolves_at_both_scales():
    """Each row with a recipe (trainable or pending) resolves its pretraining (+ paper-level overrides) at both
    scales, and each evaluation its table measures resolves. All failures are collected into one message (recipes
    still being written elsewhere show up here by name)."""
    failures: dict[str, str] = {}
    resolved: dict[tuple, str | dict] = {}  # rows share recipes: resolve each (recipe, overrides) once

    def check(name: str, kind: str, pov: dict) -> str | dict:
        key = (name, kind, repr(sorted(pov.items())))
        if key not in resolved:
            try:
                for scale in ("paper", "tiny"):
                    cfg = resolve(name, scale, kind=kind, paper_overrides=pov)
                    if scale == "paper":
                        for dotted, v in pov.items():  # the override reached the paper-scale config
                            node = cfg
                            for p in dotted.split("."):
                                node = node[p]
                            assert node == v, f"{dotted}={node!r}, expected {v!r}"
                resolved[key] = dict(cfg.get("evals") or {})
            except (ConfigError, AssertionError, KeyError) as e:
                resolved[key] = f"{kind} {name}: {e}"
        return resolved[key]

    for spec, row, kinds in _rows_with_recipes():
        where = f"{spec.id} '{row.label}'"
        pre_evals: dict[str, str] = {}
        if row.pretrain:
            out = check(row.pretrain, "pretrain", row.overrides)
            if isinstance(out, str):
                failures[where] = out
                continue
            pre_evals = out
        for kind in kinds:
            recipe = (row.evals or {}).get(kind) or pre_evals.get(kind) or ("default" if kind == "knn" else None)
            if recipe is None:
                failures[where] = f"no {kind} recipe (row evals or the pretrain recipe's evals)"
                continue
            out = check(recipe, kind, row.eval_overrides.get(kind, {}))
            if isinstance(out, str):
                failures[where] = out
        for kind, recipe in (row.evals or {}).items():  # evals named for kinds the suite runs must exist
            if kind in EVAL_KINDS and kind not in kinds:
                try:
                    load_recipe(recipe, kind)
                except ConfigError as e:
                    failures[where] = f"{kind} {recipe}: {e}"
    missing = sorted({m.split(":")[0] for m in failures.values()})
    assert not failures, f"{len(failures)} rows fail ({', '.join(missing)}):\n" + "\n".join(
        f"{k}: {v[:200]}" for k, v in failures.items())


def test_ablation_overrides_change_the_recipe():
    """Rows of one ablation differ only by their paper-level overrides, and those survive the tiny rule."""
    a = resolve("lomar", "tiny", kind="pretrain", paper_overrides=get_spec("lomar/f5").row("30%").overrides)
    b = resolve("lomar", "tiny", kind="pretrain", paper_overrides=get_spec("lomar/f5").row("80%").overrides)
    assert a["method"]["mask_ratio"] == 0.3 and b["method"]["mask_ratio"] == 0.8
    e = resolve("extrema_1mask", "paper", kind="pretrain",
                paper_overrides=get_spec("extrema/t2").row("90% x8").overrides)
    assert (e["method"]["mask_ratio"], e["method"]["num_masks"]) == (0.9, 8)
    t = resolve("lomar", "tiny", kind="pretrain", paper_overrides=get_spec("lomar/t2").row("LoMaR").overrides)
    assert t["optim"]["epochs"] == 4  # 300 paper epochs x 64 images = 150 steps at batch 128 = 4 epochs of 5,000
