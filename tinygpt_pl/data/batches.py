"""Blocks of tokens, served by optimizer step.

Training batches are random blocks (x = block_size tokens, y = x shifted by one) whose start offsets are a pure
function of (seed, optimizer step): the global batch of a step is drawn at once and every DDP rank and every
gradient-accumulation micro-batch takes its own disjoint slice. Resuming at step s therefore replays exactly
the blocks an uninterrupted run would have seen, and nothing but the step needs saving.

Validation covers the whole val split once, in fixed non-overlapping blocks shared out across ranks, so
val/loss is exact and reproducible rather than a random estimate.
"""

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tinygpt_pl.data.conversations import Conversations


def train_batch(
    tokens: np.ndarray, block_size: int, batch_size: int, seed: int, step: int, part: int, num_parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Part `part` of the global batch of optimizer step `step`: batch_size random blocks of tokens.

    The step's num_parts * batch_size start offsets are drawn from a generator seeded by (seed, step) alone,
    so which blocks a step sees depends neither on history nor on how the batch is split into parts.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - block_size, size=num_parts * batch_size)
    starts = starts[part * batch_size : (part + 1) * batch_size]
    chunk = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def val_batch(tokens: np.ndarray, block_size: int, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks number `blocks` of the val split, laid end to end; targets past the split's end are -1."""
    idx = blocks[:, None] * block_size + np.arange(block_size + 1)
    chunk = torch.from_numpy(tokens[np.minimum(idx, len(tokens) - 1)].astype(np.int64))
    chunk[torch.from_numpy(idx >= len(tokens))] = -1
    x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
    x[x < 0] = 0  # padding positions; their targets are ignored
    return x, y


class IndexedBatches(Dataset):
    """Item i is make_batch(indices[i]): a whole batch, already this rank's share. DataLoader workers take items in
    turn, so order is kept."""

    def __init__(self, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], indices: range) -> None:
        self.make_batch = make_batch
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.make_batch(self.indices[i])


class StepLoader(DataLoader):
    """A DataLoader over IndexedBatches. The train loader starts at the run's optimizer step, which the checkpoint
    holds, so it has no state of its own to save: its empty state_dict tells Lightning so, which otherwise warns
    against every resume in mid-epoch (a run is one epoch)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class EveryItemInOrder(DistributedSampler):
    """Every item of an IndexedBatches in order, on every rank: its batches are each rank's own already. It is a
    DistributedSampler so that Lightning, which shards a map-style dataset by putting one in, leaves it as it is."""

    def __init__(self, dataset: IndexedBatches) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.dataset)))


class TrainBatchMaker:
    """Micro-batch i of this rank: step i // accumulate, part (i % accumulate) * world_size + rank."""

    def __init__(self, tokens: np.ndarray | Conversations, block_size: int, batch_size: int, seed: int,
                 accumulate: int, world_size: int, rank: int, draw: Callable = train_batch) -> None:  # fmt: skip
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.accumulate, self.world_size, self.rank, self.draw = accumulate, world_size, rank, draw

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, k = divmod(i, self.accumulate)
        part = k * self.world_size + self.rank
        num_parts = self.accumulate * self.world_size
        return self.draw(self.tokens, self.block_size, self.batch_size, self.seed, step, part, num_parts)


class ValBatchMaker:
    """Batch j of this rank's share (every world_size-th block) of the val split's blocks."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, world_size: int, rank: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        num_blocks = -(-(len(tokens) - 1) // block_size)  # blocks needed to predict every token once
        self.blocks = np.arange(rank, num_blocks, world_size)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.blocks) // self.batch_size)

    def __call__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.blocks[j * self.batch_size : (j + 1) * self.batch_size]
        return val_batch(self.tokens, self.block_size, blocks)
