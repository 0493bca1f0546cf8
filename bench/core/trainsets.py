"""Where a training loop reads its minibatches from: images held in memory as one tensor
(every dataset that fits), or decoded from disk as the loop asks for them (ImageNet's
`train/`, bench.core.folders.StreamedFolder).

The loop (bench.engine.train) draws each epoch's seeded permutation and cuts it into
minibatches of indices itself, so the order of the images, the data-parallel shards and
a resumed epoch are the same whichever set serves them; a set only turns index lists
into (images, labels) on the loop's device, in the order asked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class TrainSet(Protocol):
    """The training images a loop reads, by index."""

    augments: bool
    """Whether the set augments its images itself (a streamed folder crops and flips as it
    decodes); the loop's own tensor augmentation (TrainConfig.augment) is then refused."""

    def __len__(self) -> int: ...

    def to(self, device: torch.device | str) -> TrainSet:
        """The set for a training on `device`: held images moved there once; a streamed set
        moves each batch as it comes, and is itself unchanged."""
        ...

    def batches(
        self, indices: Sequence[torch.Tensor], epoch: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float32 images in [0, 1], int64 labels) on `device` for each index list, in order."""
        ...


@dataclass(frozen=True)
class InMemory:
    """The whole split as two tensors, moved to the device once."""

    x: torch.Tensor
    y: torch.Tensor
    augments = False

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device | str) -> InMemory:
        return InMemory(self.x.to(device), self.y.to(device))

    def batches(
        self, indices: Sequence[torch.Tensor], epoch: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in indices:
            yield self.x[idx], self.y[idx]
