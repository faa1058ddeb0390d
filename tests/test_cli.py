"""The command line, in-process: every refusal is one line on stderr with exit code 2, before any stage starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from repro.cli import main


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs and cache folders that must stay absent when a command is refused."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _refused(argv: list[str], sandbox: Path, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    rc = main([*argv, "--runs-dir", str(sandbox / "runs2")] if argv[0] not in ("show",) else argv)
    out = capsys.readouterr()
    assert rc == 2, out
    err = out.err.strip()
    assert err.startswith("repro: error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    # Refused before any work: no stage folder, no dataset generated.
    for d in ("runs", "runs2", "cache"):
        assert not (sandbox / d).exists(), d
    return err


def test_unknown_recipe_lists_valid(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["show", "nope"], sandbox, capsys, "unknown recipe 'nope'", "pretrain/mae", "knn/default")
    _refused(["pretrain", "nope"], sandbox, capsys, "unknown recipe 'nope'", "pretrain/mae")


def test_unknown_key_lists_valid(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["show", "mae", "model.nope=1"], sandbox, capsys, "unknown key 'model.nope'")
    assert "arch" in err and "patch_size" in err and "drop_path" in err
    _refused(["pretrain", "mae", "nope=1"], sandbox, capsys, "unknown key 'nope'", "optim")
    _refused(["show", "mae", "method.nope=1"], sandbox, capsys, "unknown key 'method.nope'", "mask_ratio")


def test_bad_value_type(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["show", "mae", "optim.epochs=many"], sandbox, capsys, "bad value for 'optim.epochs'", "int")
    _refused(["show", "mae", "optim.blr=fast"], sandbox, capsys, "bad value for 'optim.blr'", "float")
    _refused(["show", "mae", "model.arch=vit_giant"], sandbox, capsys, "model.arch", "vit_base")


def test_numeric_overrides_parse(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 1e-4 without a dot and a fractional warm-up are valid values.
    assert main(["show", "mae", "optim.blr=1e-4", "optim.warmup_epochs=0.5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["blr"] == 1e-4 and cfg["optim"]["warmup_epochs"] == 0.5


def test_mask_ratio_outside_unit_interval(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("1.5", "0", "1.0"):
        _refused(["pretrain", "mae", "--scale", "tiny", f"method.mask_ratio={bad}"], sandbox, capsys,
                 "method.mask_ratio", "outside (0, 1)")


def test_paper_scale_needs_data_path(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["pretrain", "mae", "--scale", "paper"], sandbox, capsys, "data.path is not set", "data.path=")
    _refused(["chain", "mae", "--scale", "paper"], sandbox, capsys, "data.path is not set")
    missing = sandbox / "no-such-imagenet"
    _refused(["pretrain", "mae", "--scale", "paper", f"data.path={missing}"], sandbox, capsys,
             f"data.path={missing} does not exist")
    empty = sandbox / "empty"
    (empty / "train").mkdir(parents=True)
    _refused(["pretrain", "mae", "--scale", "paper", f"data.path={empty}"], sandbox, capsys, "no class folders")


def test_batch_not_divisible_by_devices(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["pretrain", "mae", "--scale", "tiny", "optim.batch_size=128", "--devices", "3"], sandbox, capsys,
             "optim.batch_size=128", "world size 3", "multiple of 3")


def test_init_that_does_not_exist(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for kind, recipe in (("knn", "default"), ("linear", "mae"), ("finetune", "vit_base")):
        _refused([kind, recipe, "--init", str(sandbox / "nope" / "encoder.pth")], sandbox, capsys,
                 "--init", "does not exist")


def test_argparse_errors_exit_2(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["frobnicate"], ["pretrain", "mae", "--bogus"], ["knn", "default"], ["show", "mae", "--bogus=1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert "error" in capsys.readouterr().err
    assert not (sandbox / "runs").exists()
    _refused(["show", "mae", "notakv"], sandbox, capsys, "override 'notakv' is not of the form key.sub=value")


def test_show_paper_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "mae", "--scale", "paper"]) == 0
    text = capsys.readouterr().out
    cfg = yaml.safe_load(text)
    assert cfg["optim"]["blr"] == 0.00015 and "blr: 0.00015" in text
    assert cfg["optim"]["batch_size"] == 4096 and cfg["optim"]["epochs"] == 800
    assert cfg["method"]["decoder_dim"] == 512 and cfg["method"]["mask_ratio"] == 0.75
    assert cfg["model"]["arch"] == "vit_base" and cfg["data"]["img_size"] == 224 and cfg["scale"] == "paper"


def test_show_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "mae", "--scale", "tiny"]) == 0
    text = capsys.readouterr().out
    cfg = yaml.safe_load(text)
    assert "vit_micro" in text and cfg["model"]["arch"] == "vit_micro"
    assert cfg["model"]["patch_size"] == 4 and cfg["data"]["img_size"] == 32 and cfg["data"]["dataset"] == "synthetic"
    assert cfg["optim"]["epochs"] == 11 and cfg["optim"]["batch_size"] == 128  # 800 x 64 images = 400 steps


def test_recipes_lists_mae(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert "mae" in lines["pretrain"].split(", ")
    assert "vit_base" in lines["finetune"].split(", ") and "default" in lines["knn"].split(", ")
    assert main(["recipes", "--kind", "linear"]) == 0
    assert capsys.readouterr().out.startswith("linear: ")


@pytest.mark.parametrize(("cmd", "purpose"), [
    ([], "reproduce"),
    (["recipes"], "list the recipes"),
    (["show"], "resolved configuration"),
    (["pretrain"], "pretrain with a method recipe"),
    (["finetune"], "fine-tuning"),
    (["linear"], "linear probing"),
    (["knn"], "knn"),
    (["chain"], "pretrain a method, then run the evaluations"),
    (["report"], "results.md"),
    (["data"], "generate the procedural shapes dataset"),
])
def test_help(cmd: list[str], purpose: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert out.startswith(f"usage: repro {' '.join(cmd)}".rstrip())
    assert purpose in out.lower(), out
