"""Bad input, table-driven: each case is refused in-process with exit code 2, ONE line on stderr, no traceback and
nothing written (no stage folder, no result, no generated data set); malicious ``--init`` pickles never run. Also:
every key has a rule, every paper table dry-runs on every shipped cluster profile, the dry run is exactly the script
submitit submits, and the README's commands work as written."""

from __future__ import annotations

import io
import os
import re
import shlex
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from repro.cli import build_parser, main
from repro.config import RULES, flatten
from repro.resolve import OPEN_KEYS, schema

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
PRE = ["pretrain", "mae", "--scale", "tiny"]
KNN = ["knn", "default", "--scale", "tiny"]
DRY = ["chain", "mae", "--scale", "tiny", "--cluster", "local", "--dry-run"]
UNPICKLED = r"corrupt or unreadable|never unpickled"  # a pickle that would run code: refused, never executed
BIG = "x" * 300

# (argv, one-line message pattern). {tmp} is the test's folder; {init:NAME} a prepared --init file (see _inits).
CASES: list[tuple[list[str], str]] = [
    # ---- typed config: types, ranges, enums, nulls, non-finite numbers
    *[([*PRE, f"{k}={v}"], rf"bad value for '{re.escape(k)}'.*allowed") for k, v in [
        ("model.depth", "0"), ("model.depth", "abc"), ("model.depth", "-3"), ("model.depth", "2.5"),
        ("model.embed_dim", "0"), ("model.embed_dim", "big"), ("model.num_heads", "-1"), ("model.mlp_ratio", "0"),
        ("model.window_size", "0"), ("model.drop_path", "2"), ("model.drop_path", "-0.1"), ("model.drop_path", "1.0"),
        ("model.patch_size", "0"), ("model.pos_embed", "cos"), ("model.rel_pos", "rope"), ("model.global_pool", "max"),
        ("model.class_token", "maybe"), ("model.layer_scale", "-1"), ("data.hflip", "5"), ("data.hflip", "-0.5"),
        ("data.img_size", "0"), ("data.img_size", "-32"), ("data.img_size", "abc"), ("data.num_classes", "0"),
        ("data.train_fraction", "0"), ("data.train_fraction", "1.5"), ("data.crop_scale", "[0.9, 0.1]"),
        ("data.crop_scale", "[0.2]"), ("data.crop_scale", "[0.2, 2]"), ("data.interpolation", "cubic"),
        ("data.dataset", "mnist"), ("data.synthetic_train", "0"), ("data.synthetic_classes", "1"),
        ("optim.blr", "nan"), ("optim.blr", ".nan"), ("optim.blr", ".inf"), ("optim.blr", "-1e-3"),
        ("optim.blr", "0"), ("optim.blr", "abc"), ("optim.lr", "-1"), ("optim.lr", "abc"), ("optim.lr", "0"),
        ("optim.min_lr", "-1"), ("optim.epochs", "0"), ("optim.epochs", "-5"), ("optim.epochs", "many"),
        ("optim.warmup_epochs", "-1"), ("optim.batch_size", "0"), ("optim.batch_size", "-8"),
        ("optim.weight_decay", "-0.1"), ("optim.betas", "[0.9]"), ("optim.betas", "[0.9, 1.5]"),
        ("optim.betas", "0.9"), ("optim.momentum", "1.0"), ("optim.clip_grad", "0"), ("optim.clip_grad", "-1"),
        ("optim.layer_decay", "0"), ("optim.layer_decay", "2"), ("optim.name", "adam"), ("seed", "-1"),
        ("seed", "1.5"), ("seed", "abc"), ("train.batch_per_device", "0"), ("train.num_workers", "-1"),
        ("train.precision", "fp8"), ("train.log_every", "0"), ("train.keep_every", "-1"), ("train.max_steps", "0"),
        ("train.compile", "1"), ("optim.warmup_lr", "-1"), ("train.knn_every", "-1"), ("data.path", '"a\\nb"'),
    ]],
    *[([*KNN, "--init", "random", f"{k}={v}"], rf"bad value for '{re.escape(k)}'") for k, v in [
        ("k", "[0]"), ("k", "[]"), ("k", "5"), ("temperature", "0"), ("temperature", "-1"), ("batch_size", "0"),
        ("feature", "mean"), ("aug.eval_crop_pct", "0"), ("aug.eval_crop_pct", "1.5"),
    ]],
    (["finetune", "vit_base", "--scale", "tiny", "--init", "random", "aug.reprob=2"], r"'aug.reprob'"),
    (["finetune", "vit_base", "--scale", "tiny", "--init", "random", "aug.mixup_prob=-1"], r"'aug.mixup_prob'"),
    (["finetune", "vit_base", "--scale", "tiny", "--init", "random", "aug.smoothing=1"], r"'aug.smoothing'"),
    (["finetune", "vit_base", "--scale", "tiny", "--init", "random", "resolution=double"], r"'resolution'"),
    ([*PRE, "method.mask_ratio=1.5"], r"method.mask_ratio"),
    ([*PRE, "method.mask_ratio=.nan"], r"method.mask_ratio"),
    ([*PRE, "method.decoder_depth=abc"], r"method.decoder_depth"),
    # ---- override syntax and conflicts
    ([*PRE, "model=1", "model.depth=2"], r"overrides conflict"),
    ([*PRE, "model.depth=2", "model=1"], r"overrides conflict"),
    ([*PRE, "optim.lr=1", "optim.lr.x=2"], r"overrides conflict"),
    ([*PRE, "model..depth=2"], r"not a dotted name"),
    ([*PRE, "=2"], r"not a dotted name"),
    ([*PRE, "model.depth=[1, 2"], r"cannot parse value"),
    ([*PRE, "model.nope=1"], r"unknown key 'model.nope'"),
    ([*PRE, "model=3"], r"bad value for 'model'"),
    # ---- names and lengths (no OSError 36)
    (["pretrain", BIG, "--scale", "tiny"], r"is not a recipe name"),
    (["pretrain", "../../etc/passwd", "--scale", "tiny"], r"is not a recipe name"),
    (["pretrain", "ma\ne", "--scale", "tiny"], r"is not a recipe name"),
    (["show", "mae", f"data.path=/{BIG}"], r"bad value for 'data.path'|longer than 255"),
    (["show", "mae", "description=" + "y" * 5000], r"bad value for 'description'"),
    (["knn", "default", "--init", f"/tmp/{BIG}/encoder.pth"], r"--init .* longer than 255"),
    # ---- CLI integers and paths
    ([*PRE, "--jobs", "0"], r"--jobs 0 is out of range"),
    ([*PRE, "--jobs", "-2"], r"--jobs -2 is out of range"),
    ([*PRE, "--devices", "0"], r"--devices 0 is out of range"),
    ([*PRE, "--devices", "-1"], r"--devices -1 is out of range"),
    (["run", "lomar/t2", "--jobs", "0"], r"--jobs 0 is out of range"),
    (["run", "lomar/t2", "--devices", "-4"], r"--devices -4 is out of range"),
    (["chain", "mae", "--devices", "0"], r"--devices 0 is out of range"),
    (["profile", "mae", "--steps", "0"], r"--steps 0 is out of range"),
    (["profile", "mae", "--batch", "-1"], r"--batch -1 is out of range"),
    (["profile", "mae", "--warmup", "-1"], r"--warmup -1 is out of range"),
    (["data", "synthetic", "--img-size", "0"], r"--img-size 0 is out of range"),
    ([*PRE, "optim.batch_size=128", "--devices", "3"], r"not divisible by the world size 3"),
    ([*PRE, "--runs-dir", ""], r"--runs-dir '' is not a usable path"),
    ([*PRE, "--runs-dir", "{tmp}/a\nb"], r"--runs-dir .* not a usable path"),
    ([*PRE, "--runs-dir", "{tmp}/afile/runs"], r"run root .* is a file"),
    ([*PRE, "--runs-dir", "/proc/repro-runs"], r"run root /proc/repro-runs is not writable"),
    ([*PRE, "--runs-dir", f"{{tmp}}/{BIG}"], r"longer than 255"),
    (["chain", "mae", "--evals", "knn,segmentation"], r"unknown evaluation\(s\) 'segmentation'"),
    (["chain", "mae", "--evals", ""], r"unknown evaluation"),
    (["report", "--out", "{tmp}/afile/RESULTS.md"], r"report output folder .* is a file"),
    (["report", "--out", "/proc/x/RESULTS.md"], r"report output folder .* not writable"),
    (["plan", "lomar/t2", "model.depth=0"], r"'model.depth'"),
    (["run", "lomar/t2", "--data", "imagenet1k="], r"--data"),
    # ---- Slurm: control characters, resources bounded by the profile
    ([*DRY, "--log-dir", "{tmp}/logs\ntouch /tmp/pwned"], r"--log-dir .* (control character|not a usable path)"),
    ([*DRY, "--log-dir", "{tmp}/logs\r"], r"--log-dir"),
    ([*DRY, "--runs-dir", "{tmp}/runs\n#SBATCH --time=1"], r"--runs-dir .* not a usable path"),
    ([*DRY, "--runs-dir", "{tmp}/runs\tx"], r"--runs-dir"),
    ([*DRY, "--res", "gpus_per_node=abc"], r"bad --res 'gpus_per_node=abc'.*an int"),
    ([*DRY, "--res", "cpus_per_task=-4"], r"bad --res 'cpus_per_task=-4'"),
    ([*DRY, "--res", "mem_gb=-10"], r"bad --res 'mem_gb=-10'"),
    ([*DRY, "--res", "gpus_per_node=0", "--res", "mem_gb=-1"], r"bad --res 'mem_gb=-1'"),
    ([*DRY, "--res", "nodes=0"], r"bad --res 'nodes=0'"),
    ([*DRY, "--res", "nodes=2.5"], r"bad --res 'nodes=2.5'"),
    ([*DRY, "--res", "time_min=0"], r"bad --res 'time_min=0'"),
    ([*DRY, "--res", "tasks_per_node=[1]"], r"bad --res"),
    ([*DRY, "--res", "gpus_per_node=3"], r"asks for 3 GPUs per node"),
    ([*DRY, "--res", "nodes=2"], r"asks for 2 nodes"),
    ([*DRY, "--res", "mem_gb=1000"], r"asks for 1000 GB per node"),
    ([*DRY, "--res", "gpus=2"], r"bad --res 'gpus=2'"),
    (["chain", "mae", "--scale", "tiny", "--cluster", "{profile:partition: \"gpu\\nx\"}", "--dry-run"],
     r"partition .* control characters"),
    (["chain", "mae", "--scale", "tiny", "--cluster", "{profile:setup: [\"module load a\\nrm -rf x\"]}", "--dry-run"],
     r"setup line"),
    (["chain", "mae", "--scale", "tiny", "--cluster", "{profile:python: \"/usr/bin/python\\x1b\"}", "--dry-run"],
     r"python"),
    (["chain", "mae", "--scale", "tiny", "--cluster", "{profile:mem_per_node_gb: -5}", "--dry-run"],
     r"mem_per_node_gb must be a positive number"),
    # ---- --init files: opened weights-only, matched against the target encoder
    *[([*KNN, "--init", f"{{init:{name}}}"], pattern) for name, pattern in [
        ("corrupt", r"corrupt or unreadable"), ("truncated", r"corrupt or unreadable"), ("empty", r"corrupt"),
        ("text", r"corrupt or unreadable"), ("list", r"expected an encoder state dict .* found list"),
        ("number", r"found int"), ("nontensor", r"found a mapping without tensors"),
        ("emptydict", r"found an empty mapping"), ("wrongkey", r"lacks encoder weights"),
        ("wrongshape", r"do not fit|position table"), ("wrongarch", r"do not fit|lacks encoder weights|position table"),
        ("missing", r"does not exist"), ("dir", r"does not exist"),
        # pickles that would run code: refused unexecuted (as unreadable, or as holding Python objects)
        ("evil_open", UNPICKLED), ("evil_system", UNPICKLED), ("evil_nested", UNPICKLED),
    ]],
    (["linear", "mae", "--scale", "tiny", "--init", "{init:wrongarch}"], r"--init"),
    (["finetune", "vit_base", "--scale", "tiny", "--init", "{init:evil_open}"], UNPICKLED),
    # ---- data roots
    (["pretrain", "mae", "--scale", "paper", "data.path={tmp}/nodata"], r"does not exist"),
    (["pretrain", "mae", "--scale", "paper", "data.path={data:noimages}"], r"no decodable image"),
    (["pretrain", "mae", "--scale", "paper", "data.path={data:corrupt}"], r"no decodable image"),
    (["pretrain", "mae", "--scale", "paper", "data.path={data:noval}"], r"no class folders under val"),
]


class Evil:
    """Unpickling this would call ``fn(*args)``: weights-only loading must refuse it."""

    def __init__(self, fn: Any, args: tuple[Any, ...]):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def _inits(tmp: Path) -> dict[str, Path]:
    from repro.models.encoders import create_encoder
    from repro.resolve import resolve

    d = tmp / "inits"
    d.mkdir()
    cfg = resolve("default", "tiny", kind="knn")
    good = create_encoder(cfg["model"], cfg["data"]["img_size"], num_classes=0).state_dict()
    other = resolve("default", "tiny", ["model.arch=vit_mini"], kind="knn")
    wrong_arch = create_encoder(other["model"], other["data"]["img_size"], num_classes=0).state_dict()
    torch.save(good, d / "good.pth")
    blob = (d / "good.pth").read_bytes()
    files: dict[str, Any] = {
        "corrupt": os.urandom(4096), "truncated": blob[: len(blob) // 2], "empty": b"", "text": b"hello\n",
        "list": [torch.zeros(1)], "number": 3, "nontensor": {"a": "b"}, "emptydict": {},
        "wrongkey": {"foo.weight": torch.zeros(3)},
        "wrongshape": {k: torch.zeros(2, 2) if k == "pos_embed" else v for k, v in good.items()},
        "wrongarch": wrong_arch,
        "evil_open": Evil(open, (str(tmp / "PWNED_open"), "w")),
        "evil_system": Evil(os.system, (f"touch {shlex.quote(str(tmp / 'PWNED_system'))}",)),
        "evil_nested": {"encoder": Evil(Path.touch, (tmp / "PWNED_nested",))},
    }
    out = {"missing": d / "missing.pth", "dir": d}
    for name, obj in files.items():
        p = out[name] = d / f"{name}.pth"
        if isinstance(obj, bytes):
            p.write_bytes(obj)
        else:
            torch.save(obj, p)
    return out


def _data(tmp: Path, name: str) -> Path:
    from PIL import Image

    root = tmp / "data" / name
    for split in ("train",) if name == "noval" else ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            if name == "corrupt" and c == "b":
                (root / split / c / "x.jpg").write_bytes(b"\xff\xd8 not a jpeg")
            elif name != "noimages" or c == "a":
                Image.new("RGB", (8, 8)).save(root / split / c / "x.png")
    return root


def _profile(tmp: Path, extra: str) -> str:
    base = (ROOT / "slurm" / "clusters" / "local.yaml").read_text()
    key = extra.split(":", 1)[0]
    text = "\n".join(line for line in base.splitlines() if not line.startswith(f"{key}:")) + f"\n{extra}\n"
    p = tmp / f"prof{abs(hash(extra))}.yaml"
    p.write_text(text)
    return str(p)


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "afile").write_text("")

    def no_submit(*a: object, **k: object) -> None:
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr("repro.pipeline.slurm_sched.sbatch", no_submit)
    return tmp_path


def test_at_least_100_cases() -> None:
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize(("argv", "pattern"), CASES, ids=[f"{i}-{' '.join(a)[:60]}" for i, (a, _) in enumerate(CASES)])
def test_refused_in_one_line_before_any_work(argv: list[str], pattern: str, sandbox: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    inits = _inits(sandbox) if any("{init:" in a for a in argv) else {}

    def fill(a: str) -> str:
        if a.startswith("{profile:"):
            return _profile(sandbox, a[len("{profile:"):-1])
        a = re.sub(r"\{init:(\w+)\}", lambda m: str(inits[m.group(1)]), a)
        a = re.sub(r"\{data:(\w+)\}", lambda m: str(_data(sandbox, m.group(1))), a)
        return a.replace("{tmp}", str(sandbox))

    before = {p for p in sandbox.rglob("*")}
    rc = main([fill(a) for a in argv])
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == 2, (rc, out)
    assert "\n" not in err and err.startswith("repro: error: "), err
    assert "Traceback" not in out.err + out.out
    assert re.search(pattern, err), (pattern, err)
    # Nothing written: no runs folder, no stage, no result, no data set; no pickle payload ran.
    assert not (sandbox / "runs").exists() and not (sandbox / "cache").exists()
    new = {p for p in sandbox.rglob("*")} - before
    assert not [p for p in new if p.name in ("stage.json", "result.json") or "PWNED" in p.name], new
    assert not list(sandbox.glob("PWNED*"))


def test_every_key_has_a_type_and_a_range() -> None:
    from repro.config import recipe_kinds

    for kind in recipe_kinds():  # every registered kind's recipe folder (segment, detect included)
        keys = [k for k in flatten(schema(kind)) if k.split(".")[0] not in OPEN_KEYS]
        missing = [k for k in keys if k not in RULES]
        assert not missing, (kind, missing)


def test_every_recipe_satisfies_the_rules() -> None:
    from repro.config import list_recipes
    from repro.resolve import resolve

    for kind, names in list_recipes().items():
        for name in names:
            for scale in ("paper", "tiny"):
                resolve(name, scale, kind=kind)  # raises on a rule a shipped recipe breaks


def test_batch_per_device_adapts_to_the_world_size() -> None:
    from repro.config import accumulation

    cfg = {"optim": {"batch_size": 768}, "train": {"batch_per_device": 64}}
    assert accumulation(cfg, 8) == 2  # 96 per device: 2 x 48
    assert accumulation(cfg, 1) == 12  # 768: 12 x 64
    assert accumulation({"optim": {"batch_size": 4096}, "train": {"batch_per_device": 64}}, 64) == 1
    assert accumulation({"optim": {"batch_size": 98}, "train": {"batch_per_device": 64}}, 1) == 2  # 2 x 49


def _table_ids() -> list[str]:
    from repro.spec import select

    return [s.id for s in select(["all"])]


def _profiles() -> list[str]:
    return sorted(p.stem for p in (ROOT / "slurm" / "clusters").glob("*.yaml"))


@pytest.mark.parametrize("table", _table_ids())
def test_every_paper_table_dry_runs_on_every_profile(table: str, sandbox: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert len(_table_ids()) == 42  # the papers' 41 + suite/signal
    for prof in _profiles():
        rc = main(["run", table, "--scale", "paper", "--cluster", prof, "--dry-run", "--runs-dir",
                   str(sandbox / "runs")])
        out = capsys.readouterr()
        assert rc == 0, (prof, out.err)
        assert not list((sandbox / "runs").rglob("stage.json"))


def test_dry_run_is_exactly_the_submitted_script(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Submit with a stand-in sbatch (it keeps the script): the same text as the dry run."""
    from repro.pipeline import slurm
    from repro.pipeline.plan import chain

    monkeypatch.undo()  # the real sbatch call
    monkeypatch.chdir(sandbox)
    bin_dir = sandbox / "bin"
    bin_dir.mkdir()
    kept = sandbox / "submitted.sh"
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {shlex.quote(str(kept))}\necho Submitted batch job 4242\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    stages = chain("mae", "tiny", ["model.depth=1"], evals=[])
    runs, logs = sandbox / "ru ns;$(x)", sandbox / "lo gs'"
    ex = slurm.SlurmExecutor(slurm.load_profile("local"), logs, dry_run=True, out=io.StringIO())
    dry = ex.render(stages, runs)
    ex.dry_run, ex.wait = False, False
    monkeypatch.setattr(slurm, "check_partition", lambda prof: None)
    ex.run(stages, runs)
    sent = kept.read_text()
    assert sent.rstrip() in dry, (sent, dry)
    assert shlex.quote(str(logs / "%j")) in sent  # the folder is quoted in the command line


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip().startswith("repro ")]
    cmds += re.findall(r"`(repro run [^`]*optim\.epochs=1[^`]*)`", text)  # the smoke run in the prose
    return cmds


@pytest.mark.parametrize("command", _readme_commands())
def test_readme_commands_work_as_written(command: str, sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each command parses as written; commands that train are checked at plan level (every stage resolves and passes
    the pre-run checks), the others run (cheap ones) or are planned."""
    from repro.cli import _check, _stages_for
    from repro.pipeline.plan import all_stages, plan_tables

    argv = shlex.split(command)[1:]
    args, extra = build_parser().parse_known_args(argv)
    assert all("=" in e for e in extra), extra
    overrides = [*getattr(args, "overrides", []), *extra]
    if args.cmd == "run" and args.cluster:
        rc = main([*argv, "--runs-dir", str(sandbox / "runs")])
        assert rc == 0, capsys.readouterr().err
    elif args.cmd == "run":
        ids = [t for t in args.tables if "=" not in t]
        ov = [*(t for t in args.tables if "=" in t), *overrides]
        stages = all_stages(plan_tables(ids, args.scale, ov))
        assert stages
        _check(stages, args.devices)
    elif args.cmd in ("chain", "pretrain"):
        args.overrides = overrides
        _check(_stages_for(args), args.devices)
    elif args.cmd == "profile":
        from repro.config import load_recipe
        from repro.profile.run import EFFICIENCY_TABLES

        if args.side_by_side:
            assert (ROOT / args.side_by_side / "official.json").is_file()
        if args.import_json:
            assert args.import_json == ["out.json"]  # what `profile --json out.json` writes
        for t in (t for t in args.targets if "=" not in t):
            if t.startswith("pretrain/") or "/" not in t and t not in ("all", "lomar", "localmim", "extrema"):
                load_recipe(t.removeprefix("pretrain/"), "pretrain")  # a recipe that exists
            else:
                assert t in ("all", "lomar", "localmim", "extrema") or t in EFFICIENCY_TABLES, t
    else:  # tables, plan, show, recipes, report, status
        rc = main([*argv, *(["--runs-dir", str(sandbox / "runs")] if args.cmd in ("plan", "status") else []),
                   *(["--out", str(sandbox / "R.md"), "--runs-dir", str(sandbox / "runs")]
                     if args.cmd == "report" else [])])
        assert rc == 0, capsys.readouterr().err


def test_corrupt_image_in_training_is_skipped_and_counted(tmp_path: Path) -> None:
    from repro.data.datasets import SkippingImageFolder

    root = _data(tmp_path, "ok") / "train"
    (root / "a" / "y.png").write_bytes(b"\x89PNG broken")
    ds = SkippingImageFolder(str(root))
    images = [ds[i] for i in range(len(ds))]
    assert len(images) == 3 and all(img.size == (8, 8) for img, _ in images)
    assert ds.skipped == {str(root / "a" / "y.png")}
