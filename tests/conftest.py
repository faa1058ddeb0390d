"""Session defaults for the tests: one CPU thread, in this process and in the subprocesses tests start.

Under CPU contention (several test runs on one machine) unpinned torch threads slowed the in-process overfit tests
66x. Subprocesses inherit ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (set only where the caller has not set them;
a test may still set its own with ``monkeypatch.setenv`` or ``torch.set_num_threads``).
"""

from __future__ import annotations

import os

import pytest

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
