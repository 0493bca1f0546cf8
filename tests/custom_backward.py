"""Models whose custom autograd.Function says something other than their forward pass:
the cheats the fast path and the admission checks must see through."""

from __future__ import annotations

import torch


class StraightThrough(torch.autograd.Function):
    """A user's hand-written BPDA: rounds to 4 grey levels forward, passes the gradient
    straight back."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 3) / 3

    @staticmethod
    def backward(ctx, grad):
        return grad


class Reversed(torch.autograd.Function):
    """The identity forward with a misleading backward: the gradient reversed."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Zero(torch.autograd.Function):
    """The identity forward with no gradient: what a rewrite that drops a backward gives."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class Wrapped(torch.nn.Module):
    """`net` behind one of the functions above."""

    def __init__(self, net: torch.nn.Module, fn: type[torch.autograd.Function]):
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, x):
        return self.net(self.fn.apply(x))
