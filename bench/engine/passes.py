"""What a cell costs, counted at the model: the images that went through its forward and
its backward passes, the same way for every attack plugin.

A forward hook on the module the attack calls counts each forward pass by its batch
size and, where the output carries a graph, hooks the output's gradient, which autograd
calls once per backward pass through the model. So PGD-k without early stop counts k + 1
forward and k backward passes per image (k steps, then the last iterate judged), an
EOT attack counts each of its passes, and an attack that queries without gradients
counts no backward pass. The verifier's own calls of the network (its PGD search and
its fp32 checks) count like an attack's; its bound and MILP arithmetic does not run the
network and is priced by its time.

The hook observes and never changes what the model computes, so the verifier's refusal
of hooks (bench.verify.faithful) lets a `PassCount` through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


class PassCount:
    """A forward hook that counts images through the forward and backward passes."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0
        self.paused = False

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Passes the harness makes to check itself (the fast copy held to the model) are
        not the attack's cost: not counted while this is open."""
        before, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = before

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: object) -> None:
        if self.paused or not torch.is_tensor(output) or output.dim() == 0:
            return
        images = int(output.shape[0])
        self.forward += images
        if output.requires_grad:
            output.register_hook(self._backward(images))

    def _backward(self, images: int):
        def hook(grad: torch.Tensor) -> None:
            if not self.paused:
                self.backward += images

        return hook


@dataclass(frozen=True)
class Passes:
    """A cell's passes per image of the images it ran on."""

    forward: float
    backward: float

    @classmethod
    def per_image(cls, count: PassCount, images: int) -> Passes:
        return cls(count.forward / images, count.backward / images) if images else cls(0.0, 0.0)


@contextlib.contextmanager
def counting(*models: torch.nn.Module, count: PassCount | None = None) -> Iterator[PassCount]:
    """Count the passes through each distinct model (the fast copy an attack calls and the
    model itself, which has the last word) for as long as the context is open, into
    `count` (a new one, unset)."""
    count = count if count is not None else PassCount()
    handles = [m.register_forward_hook(count) for m in {id(m): m for m in models}.values()]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()
