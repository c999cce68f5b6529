"""Which pairs each worker trains on at each step: a pure function of (seed, epoch, step).

Each epoch is a seeded permutation of the pair ids; global step s of an epoch takes the slice
[s·G, (s+1)·G) of it, and that slice is cut into accumulation micro-batches and ranks. Because the
position is just the step number, a resumed run trains exactly the batches an uninterrupted run
would have, every pair once per epoch (the last incomplete global batch of an epoch is dropped).
"""

from __future__ import annotations

import torch


class PairSampler:
    def __init__(self, num_pairs: int, *, global_batch_size: int, micro_batch_size: int,
                 world_size: int, rank: int, seed: int):
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError("global_batch_size must be a multiple of micro_batch_size × world_size")
        if num_pairs < global_batch_size:
            raise ValueError(
                f"only {num_pairs} training pairs, fewer than one global batch of {global_batch_size}: "
                "lower train.global_batch_size or add data"
            )
        self.num_pairs = num_pairs
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.accumulation_steps = global_batch_size // (micro_batch_size * world_size)
        self.steps_per_epoch = num_pairs // global_batch_size
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.num_pairs, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int, micro_step: int) -> list[int]:
        """Pair indices for this rank at global optimizer step `step` (0-based, across epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        start += (micro_step * self.world_size + self.rank) * self.micro_batch_size
        return self._permutation(epoch)[start : start + self.micro_batch_size].tolist()

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def rank_batches(n: int, *, rank: int, world_size: int, micro_batch_size: int):
    """This rank's strided share of `n` held-out rows in micro-batches, as (indices, real).

    Every rank gets the same number of batches, ceil(ceil(n / world_size) / micro_batch_size):
    under ZeRO-3 a forward is collective (each layer's parameters are gathered from all ranks),
    so a rank with one batch fewer would leave the others waiting forever. A rank whose share
    runs out first gets padding batches of row 0, marked not real: run them, discard their
    results. Every row is in exactly one real batch of one rank."""
    mine = list(range(rank, n, world_size))
    per_rank = -(-n // world_size)
    for b in range(-(-per_rank // micro_batch_size)):
        idx = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
        yield (idx, True) if idx else ([0], False)
