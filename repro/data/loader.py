"""Deterministic, resumable data order: a sampler that can start mid-epoch, and seeded augmentation.

A batch's random augmentation is seeded once by (seed, epoch, its first index, its size): a DataLoader fetches a
whole batch in one worker (``__getitems__``), so the stream of batches is the same whatever the number of loader
workers, and a run resumed mid-epoch (always at a batch boundary) sees exactly the batches an uninterrupted run
would. A single item (``ds[i]``) is seeded by (seed, epoch, i). The caller's global RNG streams are left as they
were, so drop path and the like draw the same numbers with or without loader workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class SeededDataset(Dataset):
    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> Any:
        return self._seeded([idx], [self.seed, self.epoch, idx])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """A batch, seeded once (the per-item re-seeding cost more than a 32-px image's augmentation)."""
        return self._seeded(indices, [self.seed, self.epoch, int(indices[0]) if indices else 0, len(indices), 1])

    def _seeded(self, indices: list[int], entropy: list[int]) -> list[Any]:
        s = np.random.SeedSequence(entropy).generate_state(2)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(s[0]))
            random.seed(int(s[1]))
            np.random.seed(int(s[1]))
            try:
                return [self.base[i] for i in indices]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ResumableSampler(Sampler[int]):
    """Epoch-seeded permutation, sharded across ranks (rank r takes every world-th index), that can skip the
    first ``start`` samples of this rank's share (mid-epoch resume)."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
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
