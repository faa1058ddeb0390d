"""The training engine: exact resume (mid-epoch, with accumulation and drop path), the lr schedule, accumulation
checks, and safe checkpoint files."""

from __future__ import annotations

import math
import os
import pickle
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import repro.engine.train as train_mod
from repro.config import ConfigError, accumulation
from repro.engine.dist import DistEnv
from repro.engine.fit import fit
from repro.engine.hooks import Preempted
from repro.engine.train import base_lr, build_scheduler, lr_at
from repro.io import CheckpointError, atomic_torch_save, load_checkpoint
from repro.methods.base import StepOutput
from repro.methods.mae import MAE
from repro.resolve import resolve

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
N_IMAGES = 64


def _cfg(**over: Any) -> dict[str, Any]:
    """MAE micro at 32 px; 64 images / batch 16 = 4 optimizer steps per epoch, 2 micro-batches of 8 each."""
    base = {"optim.epochs": 2, "optim.warmup_epochs": 0.5, "optim.batch_size": 16, "train.batch_per_device": 8,
            "data.img_size": 32, "optim.blr": 1.0e-3}
    base.update(over)
    return resolve("mae", "tiny", [f"{k}={v}" for k, v in base.items()])


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N_IMAGES, 3, 32, 32, generator=g), torch.arange(N_IMAGES) % 10)


def _train(cfg: dict[str, Any], out: Path) -> tuple[MAE, dict[str, Any]]:
    torch.manual_seed(123)
    model = MAE(cfg)
    return model, fit(model, _data(), cfg, out, env=CPU, desc="test")


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"


@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_resume_mid_epoch_is_exact(tmp_path: Path, drop_path: float) -> None:
    cfg = _cfg(**{"model.drop_path": drop_path})
    assert accumulation(cfg, 1) == 2
    model_a, acct_a = _train(cfg, tmp_path / "a")
    assert acct_a["completed"] and acct_a["steps"] == 8 and acct_a["steps_per_epoch"] == 4
    assert acct_a["accumulation"] == 2 and acct_a["batch_per_device"] == 8

    stop = _cfg(**{"model.drop_path": drop_path, "train.max_steps": 3})
    _, acct_b1 = _train(stop, tmp_path / "b")
    assert not acct_b1["completed"] and acct_b1["steps"] == 3 and acct_b1["epochs"] == 0
    ck = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pth")
    assert (ck["step"], ck["micro"], ck["epoch"]) == (3, 6, 0)
    model_b, acct_b = _train(cfg, tmp_path / "b")  # fresh model, resumes from checkpoints/last.pth
    assert acct_b["completed"] and acct_b["steps"] == 8

    _assert_same_state(model_a, model_b)
    ha, hb = acct_a["history"], acct_b["history"]
    assert [(r["epoch"], r["step"]) for r in ha] == [(r["epoch"], r["step"]) for r in hb] == [(1, 4), (2, 8)]
    assert [r["lr"] for r in ha] == [r["lr"] for r in hb]
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    # The run really changed the model (the equality above is not trivially true).
    torch.manual_seed(123)
    init = MAE(cfg)
    assert not torch.equal(init.state_dict()["encoder.blocks.0.attn.qkv.weight"],
                           model_a.state_dict()["encoder.blocks.0.attn.qkv.weight"])


def test_resume_at_epoch_boundary_is_exact(tmp_path: Path) -> None:
    cfg = _cfg()
    model_a, _ = _train(cfg, tmp_path / "a")
    _, acct = _train(_cfg(**{"train.max_steps": 4}), tmp_path / "b")
    assert (acct["epochs"], acct["steps"], acct["completed"]) == (1, 4, False)
    model_b, _ = _train(cfg, tmp_path / "b")
    _assert_same_state(model_a, model_b)


class Recorder(nn.Module):
    """A linear regression task that records the optimizer's lr at every micro-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.opt: torch.optim.Optimizer | None = None
        self.lrs: list[float] = []

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        assert self.opt is not None
        self.lrs.append(self.opt.param_groups[0]["lr"])
        x, y = batch
        loss = (self.lin(x).squeeze(1) - y).pow(2).mean()
        return StepOutput(loss)


def mae_lr(step: int, steps_per_epoch: int, blr: float, batch: int, warmup_epochs: float, epochs: int,
           min_lr: float) -> float:
    """facebookresearch/mae util/lr_sched.adjust_learning_rate, at the fractional epoch of optimizer step ``step``."""
    lr = blr * batch / 256
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def _recording_task(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """A Recorder whose ``opt`` is the optimizer the engine builds (to read its lr at every step)."""
    task = Recorder()
    real = train_mod.build_optimizer

    def spy(groups: Any, optim: Any, lr: float, **kw: Any) -> torch.optim.Optimizer:
        task.opt = real(groups, optim, lr, **kw)
        return task.opt

    monkeypatch.setattr(train_mod, "build_optimizer", spy)
    return task


def test_lr_schedule_matches_mae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = _recording_task(monkeypatch)
    cfg = _cfg(**{"optim.epochs": 5, "optim.warmup_epochs": 2, "optim.blr": 0.00015, "optim.min_lr": 1e-6,
                  "optim.batch_size": 8, "train.batch_per_device": 4})
    ds = TensorDataset(torch.randn(32, 4), torch.randn(32))
    acct = fit(task, ds, cfg, tmp_path, env=CPU)
    spe, total = 4, 20
    assert acct["steps_per_epoch"] == spe and acct["steps"] == total
    assert acct["base_lr"] == pytest.approx(0.00015 * 8 / 256)
    per_step = task.lrs[::2]  # 2 micro-batches per optimizer step
    assert task.lrs[1::2] == per_step
    assert len(per_step) == total
    args = (spe, 0.00015, 8, 2, 5, 1e-6)
    expected = [mae_lr(s, *args) for s in range(total)]
    assert per_step[0] == 0.0
    for s in (0, 1, 4, 7, 8, 9, 13, total - 1):
        assert per_step[s] == pytest.approx(expected[s], rel=1e-9, abs=1e-15), s
        assert lr_at(cfg["optim"], spe, s) == pytest.approx(expected[s], rel=1e-9, abs=1e-15), s
    assert per_step == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert max(per_step) == pytest.approx(0.00015 * 8 / 256)  # the peak is at the end of warm-up
    assert per_step[total - 1] > 1e-6  # the last step is just above min_lr...
    sched_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=acct["base_lr"])
    sched = build_scheduler(sched_opt, cfg["optim"], spe)
    sched.step_update(total)
    assert sched_opt.param_groups[0]["lr"] == pytest.approx(1e-6)  # ...and reaches it after the last update


def simmim_lr(step: int, base: float, warm: int, warm_lr: float, milestones: list[int], gamma: float) -> float:
    """microsoft/SimMIM lr_scheduler.MultiStepLRScheduler at update ``step``: linear from warm_lr over ``warm``
    updates, then base x gamma ** (number of milestones <= step)."""
    if step < warm:
        return warm_lr + step * (base - warm_lr) / warm
    return base * gamma ** sum(m <= step for m in milestones)


def test_multistep_schedule_matches_simmim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = _recording_task(monkeypatch)
    cfg = _cfg(**{"optim.epochs": 8, "optim.warmup_epochs": 1, "optim.blr": 0.0001, "optim.batch_size": 8,
                  "train.batch_per_device": 4, "optim.schedule": "multistep", "optim.milestones": "[7]",
                  "optim.warmup_lr": 2e-6})
    acct = fit(task, TensorDataset(torch.randn(32, 4), torch.randn(32)), cfg, tmp_path, env=CPU)
    spe, total, base = 4, 32, 0.0001 * 8 / 256
    per_step = task.lrs[::2]
    assert acct["steps_per_epoch"] == spe and len(per_step) == total
    expected = [simmim_lr(s, base, spe, 2e-6, [7 * spe], 0.1) for s in range(total)]
    assert per_step[0] == pytest.approx(2e-6) and per_step[27] == pytest.approx(base)
    assert per_step[28] == pytest.approx(base * 0.1)  # x0.1 from the first update of epoch 7
    assert per_step == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert [lr_at(cfg["optim"], spe, s) for s in range(total)] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    sched_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_scheduler(sched_opt, {**cfg["optim"], "milestones": [7, 7.5]}, spe)  # a second step: x0.01
    for step, lr in ((2, expected[2]), (29, base * 0.1), (30, base * 0.01)):
        sched.step_update(step)
        assert sched_opt.param_groups[0]["lr"] == pytest.approx(lr), step
    # Paper scale: SimMIM's recipes follow the official multistep schedule; its 100-epoch config is cosine.
    for recipe in ("simmim", "simmim_swin_base", "simmim_swin_large"):
        o = resolve(recipe, "paper")["optim"]
        assert (o["schedule"], o["milestones"], o["decay_rate"], o["epochs"]) == ("multistep", [700], 0.1, 800)
        assert o["warmup_lr"] == pytest.approx(5e-7 * o["batch_size"] / 512)
    assert resolve("simmim", "tiny")["optim"]["milestones"] == [9.625]  # epoch 700 of 800 -> the same fraction of 11
    assert resolve("simmim_swin_base_100ep", "paper")["optim"]["schedule"] == "cosine"
    with pytest.raises(ConfigError, match="milestones"):
        resolve("simmim", "paper", ["optim.milestones=[5]"])  # inside the 10-epoch warm-up
    with pytest.raises(ConfigError, match="milestones"):
        resolve("simmim", "paper", ["optim.milestones=null"])
    short = resolve("simmim", "paper", ["optim.epochs=300"])["optim"]  # a shorter run never reaches epoch 700
    assert lr_at(short, 10, 300 * 10 - 1) == pytest.approx(base_lr(short))


def test_precision_choice_and_fp16_uses_the_grad_scaler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert train_mod.resolve_precision("auto", cpu) == "fp32"
    for arch, expected in (((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):  # V100: fp16; A100, H100: bf16
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, a=arch: a)
        assert train_mod.resolve_precision("auto", gpu) == expected
    assert train_mod.resolve_precision("fp16", cpu) == "fp16" and train_mod.resolve_precision("fp32", gpu) == "fp32"
    cfg = _cfg(**{"train.precision": "fp16", "optim.epochs": 1})
    _, acct = _train(cfg, tmp_path)
    assert acct["precision"] == "fp16"
    scaler = load_checkpoint(tmp_path / "checkpoints" / "last.pth")["scaler"]
    assert scaler and scaler["scale"] > 1.0  # the loss was scaled: a GradScaler ran
    _, acct32 = _train(_cfg(**{"optim.epochs": 1}), tmp_path / "fp32")
    assert acct32["precision"] == "fp32"


def test_accumulation_checks() -> None:
    cfg = {"optim": {"batch_size": 128}, "train": {"batch_per_device": 16}}
    assert accumulation(cfg, 1) == 8
    assert accumulation(cfg, 2) == 4
    assert accumulation({"optim": {"batch_size": 128}, "train": {"batch_per_device": 256}}, 4) == 1
    with pytest.raises(ConfigError, match="not divisible by the world size 3") as e:
        accumulation(cfg, 3)
    assert "multiple of 3" in str(e.value) and "\n" not in str(e.value)
    # A per-device batch that does not divide the share adapts to its largest divisor (128 = 8 x 16), and a paper
    # batch fits an 8-GPU node: 768 / 8 = 96 per device -> 2 x 48 under batch_per_device=64.
    assert accumulation({"optim": {"batch_size": 128}, "train": {"batch_per_device": 24}}, 1) == 8
    assert accumulation({"optim": {"batch_size": 768}, "train": {"batch_per_device": 64}}, 8) == 2


def test_corrupt_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.pth"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"\x00garbage, not a zip file" * 10)
    with pytest.raises(CheckpointError) as e:
        _train(_cfg(), tmp_path)
    assert str(last) in str(e.value) and "delete it" in str(e.value)


def test_missing_checkpoint_names_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


class Arbitrary:
    def __init__(self) -> None:
        self.x = 1


class Unpicklable:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("boom")


def test_atomic_torch_save_and_weights_only_load(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "ck.pth"
    atomic_torch_save({"w": torch.arange(3)}, p)
    assert [f.name for f in p.parent.iterdir()] == ["ck.pth"]
    assert torch.equal(load_checkpoint(p)["w"], torch.arange(3))

    # A failed write leaves the old file as it was and no temp file behind.
    with pytest.raises(pickle.PicklingError):
        atomic_torch_save({"bad": Unpicklable()}, p)
    assert [f.name for f in p.parent.iterdir()] == ["ck.pth"]
    assert torch.equal(load_checkpoint(p)["w"], torch.arange(3))

    # weights_only: a pickle of an arbitrary class is refused (while a plain torch.load would run it).
    q = tmp_path / "evil.pth"
    torch.save({"obj": Arbitrary()}, q)
    assert isinstance(torch.load(q, weights_only=False)["obj"], Arbitrary)
    with pytest.raises(CheckpointError, match=str(q)):
        load_checkpoint(q)


def test_version_1_checkpoint_resumes_and_unknown_version_is_refused(tmp_path: Path) -> None:
    """A checkpoint without the hooks' own states (format 1) resumes exactly; a format this engine does not know
    is refused with one line naming the file."""
    cfg = _cfg(**{"train.grad_norms": True})
    model_a, _ = _train(cfg, tmp_path / "a")
    _train(_cfg(**{"train.grad_norms": True, "train.max_steps": 3}), tmp_path / "b")
    last = tmp_path / "b" / "checkpoints" / "last.pth"
    ck = load_checkpoint(last)
    assert ck["version"] == train_mod.CKPT_VERSION == 2 and {"grad_norms", "log", "rng", "accounting"} <= set(ck)
    v1 = {k: v for k, v in ck.items() if k not in ("grad_norms", "log")}
    v1["version"] = 1
    v1["rng"] = [{k: v for k, v in r.items() if k != "sampler"} for r in ck["rng"]]
    atomic_torch_save(v1, last)
    model_b, acct = _train(cfg, tmp_path / "b")
    assert acct["completed"]
    _assert_same_state(model_a, model_b)

    atomic_torch_save({**v1, "version": 99}, last)
    with pytest.raises(CheckpointError, match="format 99") as e:
        _train(cfg, tmp_path / "b")
    assert str(last) in str(e.value) and "\n" not in str(e.value)


class SignallingMAE(MAE):
    """MAE that sends its own process SIGUSR2 (a Slurm requeue) during micro-batch ``at``."""

    at = 8

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGUSR2)
        return super().forward(batch, generator)


def test_preemption_at_an_epoch_end_keeps_its_grad_norms(tmp_path: Path) -> None:
    """Stopped after the last step of epoch 1, before the epoch was closed: the gradient norms measured at that step
    are in the checkpoint (the GradNorms hook's state), so the resumed history equals an uninterrupted one."""
    cfg = _cfg(**{"train.grad_norms": True})
    _, straight = _train(cfg, tmp_path / "a")
    torch.manual_seed(123)
    with pytest.raises(Preempted):
        fit(SignallingMAE(cfg), _data(), cfg, tmp_path / "b", env=CPU, desc="test")
    ck = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pth")
    assert (ck["step"], ck["micro"], ck["epoch"]) == (4, 8, 0) and ck["grad_norms"]["pending"]
    _, resumed = _train(cfg, tmp_path / "b")
    assert resumed["history"] == straight["history"] and "grad_norms" in resumed["history"][0]


def test_optimizer_registry_matches_the_recipe_rule() -> None:
    from repro.config import RULES

    assert set(train_mod.OPTIMIZERS) == set(RULES["optim.name"].choices)
    p = nn.Parameter(torch.zeros(1))
    base = {"betas": [0.9, 0.95], "weight_decay": 0.05, "momentum": 0.9}
    for name in train_mod.OPTIMIZERS:
        assert isinstance(train_mod.build_optimizer([{"params": [p]}], {**base, "name": name}, 1e-3),
                          torch.optim.Optimizer)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train_mod.build_optimizer([{"params": [p]}], {**base, "name": "adam"}, 1e-3)


class _ReusedBuffers(nn.Module):
    """A task whose forward overwrites the previous forward's loss storage, as CUDA graphs reuse their output
    buffers on the next replay; it counts the engine's ``new_iteration`` calls seen before each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.prev: torch.Tensor | None = None
        self.values: list[float] = []

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        if self.prev is not None:
            self.prev.data.fill_(-1.0)  # the next replay writes where the last loss lives
        x, _ = batch
        loss = (self.w * x.mean()) ** 2
        self.prev = loss
        self.values.append(float(loss.detach()))
        return StepOutput(loss, {"loss": loss.detach()})


def test_cuda_graph_iterations_are_marked_and_step_outputs_copied(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every micro-batch forward starts a CUDA-graph iteration; under CUDA graphs the losses and logs the hooks read
    after the step are copies, not the buffers the next micro-batch overwrites (two micro-batches per step here)."""
    marks: list[int] = []
    task = _ReusedBuffers()
    monkeypatch.setattr(train_mod, "new_iteration", lambda: marks.append(len(task.values)))
    monkeypatch.setattr(train_mod, "uses_cuda_graphs", lambda tcfg, device: True)

    class Seen(train_mod.HookBase):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.logs: list[float] = []

        def after_step(self) -> None:
            self.losses += [float(o.loss) for o in self.trainer.step_outputs]
            self.logs += [float(o.logs["loss"]) for o in self.trainer.step_outputs]

    seen = Seen()
    detached: list[int] = []
    monkeypatch.setattr(train_mod, "detach_grads", lambda t: detached.append(len(task.values)))
    cfg = _cfg(**{"optim.epochs": 1, "train.compile": "false"})
    fit(task, _data(), cfg, tmp_path / "run", env=CPU, desc="test", hooks=[seen])
    assert marks == list(range(len(task.values)))  # one mark before each of the 8 micro-batch forwards
    assert detached == [1, 3, 5, 7]  # after each step's first micro-batch: the second adds into copies
    assert len(task.values) == 8 and len(seen.losses) == 8
    assert seen.losses == pytest.approx(task.values) and seen.logs == pytest.approx(task.values)


def test_uses_cuda_graphs_only_for_compiled_cuda_graph_modes() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train_mod.uses_cuda_graphs({"compile_mode": "reduce-overhead"}, cuda)
    assert train_mod.uses_cuda_graphs({"compile": True, "compile_mode": "max-autotune"}, cuda)
    assert not train_mod.uses_cuda_graphs({"compile_mode": "reduce-overhead", "compile": False}, cuda)
    assert not train_mod.uses_cuda_graphs({"compile_mode": "default"}, cuda)
    assert not train_mod.uses_cuda_graphs({"compile_mode": "max-autotune-no-cudagraphs"}, cuda)
    assert not train_mod.uses_cuda_graphs({"compile_mode": "reduce-overhead"}, cpu)


def test_detach_grads_copies_grads_and_leaves_missing_ones() -> None:
    m = nn.Linear(3, 2)
    m(torch.ones(1, 3)).sum().backward()
    m.bias.grad = None
    before = m.weight.grad
    train_mod.detach_grads(m)
    assert m.weight.grad is not before and m.weight.grad.data_ptr() != before.data_ptr()
    assert torch.equal(m.weight.grad, before) and m.bias.grad is None


def test_a_cuda_graph_failure_names_the_switch_that_turns_them_off(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_mod, "uses_cuda_graphs", lambda tcfg, device: True)

    class Fails(_ReusedBuffers):
        def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
            raise RuntimeError("Error: accessing tensor output of CUDAGraphs that has been overwritten\nmore")

    cfg = _cfg(**{"optim.epochs": 1, "train.compile_mode": "reduce-overhead"})
    with pytest.raises(RuntimeError, match=r"rerun with train.compile_mode=default") as err:
        fit(Fails(), _data(), cfg, tmp_path / "run", env=CPU, desc="test")
    assert "more" not in str(err.value)
