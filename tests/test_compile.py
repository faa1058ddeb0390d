"""The engine's speed switches: ``train.compile`` (torch.compile of every transformer block) and
``train.fused_optim`` (fused AdamW) give the eager training step's losses on the CPU, compile once per block shape
(no recompiles after the first step, also where the visible-only Swin's window groups change with every mask), are
on for CUDA and off on the CPU by default, and leave stage keys alone."""

from __future__ import annotations

import copy

import pytest
import torch

from repro.engine.train import auto_switch, build_optimizer, compile_blocks
from repro.profile.bench import build_method, dynamo_graphs, random_batch
from repro.resolve import resolve

# drop path off: inside an inductor graph it draws from inductor's own RNG, not the eager stream.
MICRO = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path=0.0"]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(n)


def _method(recipe: str) -> tuple[torch.nn.Module, dict]:
    cfg = resolve(recipe, "tiny", MICRO, kind="pretrain")
    torch.manual_seed(0)
    method = build_method(cfg)
    method.train()
    return method, cfg


def _steps(method: torch.nn.Module, batch, steps: int, fused: bool = False) -> tuple[list[float], list[int]]:
    """``steps`` engine steps (forward, backward, AdamW, after_step) from fixed seeds: each step's loss and the number
    of graphs torch.compile has made after it."""
    opt = build_optimizer([{"params": [p for p in method.parameters() if p.requires_grad]}],
                          {"name": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.05}, 1e-3, fused=fused)
    assert bool(opt.defaults["fused"]) == fused
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    losses, graphs = [], []
    for i in range(steps):
        loss = method(batch, gen).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(i + 1, 100)
        losses.append(loss.item())
        graphs.append(dynamo_graphs())
    return losses, graphs


def _compiled_matches_eager(eager: torch.nn.Module, cfg: dict, steps: int, scope: str | None = None) -> int:
    """``steps`` steps of ``eager`` and of a copy whose blocks are compiled (aot_eager: the captured graphs run op for
    op; ``scope``: ``train.compile_scope``): equal losses, graphs made in the first step only, no graph break.
    Returns how many units were compiled."""
    from torch._dynamo.utils import counters

    compiled = copy.deepcopy(eager)
    batch = random_batch(eager, cfg, 4, torch.device("cpu"))
    want, _ = _steps(eager, batch, steps)
    n = compile_blocks(compiled, backend="aot_eager", scope=scope)
    counters.clear()
    start = dynamo_graphs()
    got, graphs = _steps(compiled, batch, steps)
    assert graphs[0] > start, "nothing went through torch.compile"
    assert graphs[1:] == [graphs[0]] * (steps - 1), f"recompiled after the first step: graphs {start} -> {graphs}"
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    return n


@pytest.mark.parametrize(("recipe", "scope"), [("mae", None), ("mae", "all"), ("lomar", None), ("extrema", None)])
def test_compiled_blocks_match_eager_and_do_not_recompile(recipe, scope):
    """Dynamo captures every block without a graph break (aot_eager backend: the captured forward and backward graphs
    run op for op, so this is fast on 2 cores), three steps with updated weights (ExtreMA's EMA teacher, LoMaR's
    relative positions set per forward) give the eager losses, and no graph is made after the first step."""
    eager, cfg = _method(recipe)
    assert _compiled_matches_eager(eager, cfg, 3, scope) >= 2 + (scope == "all")  # + MAE's decoder and loss


def test_fused_adamw_matches_the_default_adamw():
    eager, cfg = _method("mae")
    fused = copy.deepcopy(eager)
    batch = random_batch(eager, cfg, 4, torch.device("cpu"))
    want, _ = _steps(eager, batch, 3)
    got, _ = _steps(fused, batch, 3, fused=True)
    assert want[1] != want[0]  # the updates changed the model
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager():
    """The default backend (inductor: generated C++ kernels on the CPU, Triton on a GPU) as the engine runs it: the
    same losses up to float reassociation. Slow: a CPU compile takes about a minute on 2 cores."""
    eager, cfg = _method("mae")
    compiled = copy.deepcopy(eager)
    batch = random_batch(eager, cfg, 4, torch.device("cpu"))
    want, _ = _steps(eager, batch, 2)
    compile_blocks(compiled, scope="all")  # the blocks and MAE's decoder + loss unit
    got, graphs = _steps(compiled, batch, 2)
    assert graphs[1] == graphs[0] > 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6)


def test_switches_default_to_cuda_at_paper_scale_and_stay_out_of_stage_keys():
    from repro.pipeline.stage import Stage

    paper = resolve("mae", "paper", kind="pretrain")
    assert paper["train"]["compile"] is None and paper["train"]["fused_optim"] is None  # auto: on for CUDA
    cfg = resolve("mae", "tiny", kind="pretrain")
    assert cfg["train"]["compile"] is False  # tiny stages are too short to repay a compile
    assert resolve("mae", "tiny", ["train.compile=true"], kind="pretrain")["train"]["compile"] is True
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (auto_switch(None, cpu), auto_switch(None, cuda)) == (False, True)
    assert (auto_switch(True, cpu), auto_switch(False, cuda)) == (True, False)
    on = copy.deepcopy(cfg)
    on["train"].update(compile=True, fused_optim=True, compile_mode="reduce-overhead")
    assert Stage("pretrain", on).key == Stage("pretrain", cfg).key
    other = copy.deepcopy(cfg)
    other["train"]["precision"] = "bf16"
    assert Stage("pretrain", other).key != Stage("pretrain", cfg).key


def test_compile_mode_validated_and_passed_to_torch_compile(monkeypatch):
    from repro.config import ConfigError

    assert resolve("mae", "paper", kind="pretrain")["train"]["compile_mode"] is None  # torch's default mode
    cfg = resolve("mae", "paper", ["train.compile_mode=reduce-overhead"], kind="pretrain")
    assert cfg["train"]["compile_mode"] == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_mode"):
        resolve("mae", "paper", ["train.compile_mode=fastest"], kind="pretrain")
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    method, _ = _method("mae")
    n = compile_blocks(method, mode="max-autotune-no-cudagraphs", scope="all")
    assert n == len(seen) + len(method.compiled_units) and len(seen) >= 2  # the blocks, then MAE's decoder + loss
    assert all(kw["mode"] == "max-autotune-no-cudagraphs" for kw in seen)
    assert method.unit_compile == ("inductor", "max-autotune-no-cudagraphs")
    seen.clear()
    compile_blocks(method, scope="all")
    assert seen and all("mode" not in kw for kw in seen)  # None: torch.compile's default
    assert method.unit_compile == ("inductor", None)
    seen.clear()
    fresh, _ = _method("mae")
    assert compile_blocks(fresh) == len(seen) and fresh.unit_compile is None  # train.compile_scope null: blocks


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["localmim_swin_base", "greenmim_swin_base", "localmim"])
def test_compiled_visible_swin_and_glue_match_eager_without_recompiles(recipe: str) -> None:
    """The visible-only Swin (GreenMIM, LocalMIM-Swin) and LocalMIM's glue after the encoder (``compile_extra``),
    aot_eager (the captured graphs run op for op: fast on 2 cores); 6 steps, each with a new mask. At tiny the
    first two Swin stages pack their windows into groups ('group' mode), whose count and size vary with the mask."""
    cfg = resolve(recipe, "tiny", kind="pretrain")
    torch.manual_seed(0)
    eager = build_method(cfg)
    eager.train()
    _compiled_matches_eager(eager, cfg, 6, scope="all")


def test_every_compiled_unit_is_a_method_of_its_implementation() -> None:
    """``compiled_units`` is a spec fact (the side-by-side renderer reads it without torch); each name must be a
    method of the ``nn.Module`` that runs it, or ``run_unit`` fails only under ``train.compile_scope=all``."""
    from repro.methods import METHODS

    units = {name: spec.compiled_units for name, spec in METHODS.items()}
    assert units["mae"] and units["localmim"]  # the two methods with glue worth one graph
    for name, spec in METHODS.items():
        impl = spec.implementation()
        assert impl.compiled_units == spec.compiled_units
        for unit in spec.compiled_units:
            assert callable(getattr(impl, unit, None)), f"{name}: compiled unit '{unit}' is not a method"
