"""``train.compile`` on the visible-only Swin (GreenMIM, LocalMIM-Swin) and on LocalMIM's glue after the encoder
(``LocalMIM.compile_extra``): the compiled step gives the eager losses on the CPU, and fresh masks every step (window
groups of changing count and size) make no new graph after the first step."""

from __future__ import annotations

import copy

import pytest
import torch

from repro.engine.train import compile_blocks
from repro.profile.bench import build_method, dynamo_graphs, random_batch
from repro.resolve import resolve


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(n)


def _steps(method: torch.nn.Module, batch, steps: int) -> tuple[list[float], list[int]]:
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)  # a new mask every step
    losses, graphs = [], []
    for _ in range(steps):
        loss = method(batch, gen).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        graphs.append(dynamo_graphs())
    return losses, graphs


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["localmim_swin_base", "greenmim_swin_base", "localmim"])
def test_compiled_visible_swin_and_glue_match_eager_without_recompiles(recipe: str) -> None:
    """aot_eager (the captured graphs run op for op: fast on 2 cores); 6 steps, each with a new mask. At tiny the
    first two Swin stages pack their windows into groups ('group' mode), whose count and size vary with the mask."""
    from torch._dynamo.utils import counters

    cfg = resolve(recipe, "tiny", kind="pretrain")
    torch.manual_seed(0)
    eager = build_method(cfg)
    eager.train()
    compiled = copy.deepcopy(eager)
    batch = random_batch(eager, cfg, 4, torch.device("cpu"))
    want, _ = _steps(eager, batch, 6)
    compile_blocks(compiled, backend="aot_eager")
    counters.clear()
    start = dynamo_graphs()
    got, graphs = _steps(compiled, batch, 6)
    assert graphs[0] > start, "nothing went through torch.compile"
    assert graphs[1:] == [graphs[0]] * 5, f"recompiled after the first step: graphs {start} -> {graphs}"
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
