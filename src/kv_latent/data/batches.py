"""Step-indexed batches: the batch of an optimizer step is a pure function of (seed, step)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info


def epoch_permutation(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The order of ``n`` blocks in ``epoch``: ``torch.randperm`` seeded by (seed, epoch)."""
    key = hashlib.sha256(f"{seed}/{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "big") >> 1)
    return torch.randperm(n, generator=generator)


class StepBatches(IterableDataset):
    """Batches indexed by optimizer step, for exact resume and DDP.

    The data is an endless stream of epochs, each a permutation of the blocks
    (:func:`epoch_permutation`); global step ``s`` takes stream positions
    ``[s*G, (s+1)*G)`` with ``G = batch_size * world_size`` (a batch may straddle two epochs),
    and rank ``r`` takes the ``r``-th slice of ``batch_size`` of them. So the batch of a step is a
    pure function of (seed, step), resuming at ``start_step`` continues exactly, and 2 ranks of
    ``batch_size`` B see the same data as 1 rank of 2B.

    Yields ``{"input_ids": LongTensor[B, T], "attention_mask": ones}`` for steps
    ``start_step .. num_steps-1``. Use ``DataLoader(dataset, batch_size=None)``; with
    ``num_workers > 0`` the workers take steps round-robin, which the loader returns in order.
    """

    def __init__(
        self,
        blocks: torch.Tensor,
        *,
        batch_size: int,
        seed: int,
        num_steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if blocks.ndim != 2 or len(blocks) == 0:
            raise ValueError(f"blocks must be a non-empty [N, T] tensor, got {tuple(blocks.shape)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not 0 <= start_step <= num_steps:
            raise ValueError(f"need 0 <= start_step ({start_step}) <= num_steps ({num_steps})")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank ({rank}) < world_size ({world_size})")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.num_steps = num_steps
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_steps - self.start_step

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # steps move forward: keep only the current epochs
                del self._perms[min(self._perms)]
            self._perms[epoch] = epoch_permutation(len(self.blocks), seed=self.seed, epoch=epoch)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Block indices of this rank's share of global batch ``step``: ``LongTensor[B]``."""
        n = len(self.blocks)
        first = (step * self.world_size + self.rank) * self.batch_size
        positions = torch.arange(first, first + self.batch_size)
        epochs = positions // n
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[positions[mask] % n]
        return out

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's batch of ``step``."""
        input_ids = self.blocks[self.indices(step)]  # (B, T)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in range(self.start_step + worker_id, self.num_steps, num_workers):
            yield self.batch(step)
