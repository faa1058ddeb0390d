"""Run-level progress lines (repro.pipeline.execute.Progress): counts per table, an ETA from the finished stages of
the same kind, the longest chain of inputs, and plain lines (no carriage return)."""

from __future__ import annotations

import io

from repro.pipeline.execute import Progress, duration
from repro.pipeline.stage import Stage


def test_progress_lines_and_eta() -> None:
    now = [0.0]
    pre = Stage("pretrain", {"recipe": "mae", "n": 1})
    knn = Stage("knn", {"recipe": "default", "n": 2}, {"init": pre})
    lin = Stage("linear", {"recipe": "mae", "n": 3}, {"init": pre})
    rnd = Stage("knn", {"recipe": "default", "n": 4})
    out = io.StringIO()
    p = Progress([pre, knn, lin, rnd], {"t/a": [pre, knn], "t/b": [pre, lin, rnd]}, jobs=2, out=out,
                 clock=lambda: now[0])
    p.report()
    assert out.getvalue() == "progress: 0/4 stages | tables t/a 0/2, t/b 0/3 | 0s elapsed, ETA -\n"
    p.start(pre)
    now[0] = 100.0
    p.finish(pre, "done")  # 100 s: the only measure, used for every kind until its own kind has one
    assert p.eta() == 150.0  # three stages of 100 s on 2 slots
    p.start(rnd)
    now[0] = 120.0
    p.finish(rnd, "done")  # a kNN: 20 s
    p.start(knn)
    p.start(lin)
    assert p.expected(knn) == 20.0 and p.expected(lin) == 60.0  # same kind, else the mean of all
    assert p.eta() == 60.0  # the linear probe
    now[0] = 130.0
    p.finish(knn, "failed")
    p.report()
    lines = out.getvalue().splitlines()[1:]
    assert lines == ["table t/a: finished, 2 stage(s) (1 done, 1 failed)",
                     "progress: 3/4 stages (2 done, 1 failed), 1 active | tables t/b 2/3 | 2m10s elapsed, ETA 50s"]
    now[0] = 200.0
    p.finish(lin, "done")
    p.report()
    assert out.getvalue().splitlines()[-2:] == ["table t/b: finished, 3 stage(s) (3 done)",
                                                "progress: 4/4 stages (3 done, 1 failed) | 3m20s elapsed"]
    assert "\r" not in out.getvalue()


def test_eta_follows_the_chain_of_inputs() -> None:
    """Many slots do not make a chain shorter: an evaluation waits for its pretraining."""
    now = [0.0]
    done = Stage("pretrain", {"recipe": "mae", "n": 0})
    pre = Stage("pretrain", {"recipe": "mae", "n": 1})
    evals = [Stage("knn", {"recipe": "default", "n": i}, {"init": pre}) for i in range(2, 6)]
    p = Progress([done, pre, *evals], jobs=100, clock=lambda: now[0])
    p.start(done)
    now[0] = 50.0
    p.finish(done, "done")
    assert p.eta() == 100.0  # the pretraining (50 s), then the evaluations side by side (50 s)


def test_duration_format() -> None:
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600, 7322)] == ["0s", "59s", "1m01s", "59m59s", "1h00m",
                                                                      "2h02m"]
