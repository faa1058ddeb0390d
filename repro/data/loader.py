"""Deterministic, resumable data order: a sampler that can start mid-epoch, and per-sample seeded augmentation.

Each sample's random augmentation is seeded by (seed, epoch, index), so the stream of batches is the same whatever
the number of loader workers, and a run resumed mid-epoch sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class SeededDataset(Dataset):
    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> Any:
        s = np.random.SeedSequence([self.seed, self.epoch, idx]).generate_state(2)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s[0]))
            random.seed(int(s[1]))
            np.random.seed(int(s[1]))
            try:
                return self.base[idx]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ResumableSampler(Sampler[int]):
    """Epoch-seeded permutation, sharded across ranks (rank r takes every world-th index), that can skip the
    first ``start`` samples of this rank's share (mid-epoch resume)."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        self.n, self.world, self.rank, self.seed, self.shuffle = n, world_size, rank, seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = n // world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[: self.per_rank * self.world][self.rank :: self.world]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
