"""The model as a cell's fast path runs it (`fast_model`), the check that it is the
model's own (`faithful`), and the reported model's last word on what it broke
(`last_word`): what bench.engine.cell crafts through."""

from __future__ import annotations

import contextlib
import copy
import itertools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.core.cells import Cell
from bench.engine import rewrite
from bench.engine.device import full_fp32, memory_format
from bench.engine.fast import PLAIN, FastPath

FAITHFUL_BATCH = 8
"""Inputs on which the fast model is compared with the model before a cell uses it."""

_PREPARED: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()


def _weights_key(model: torch.nn.Module) -> tuple:
    """Changes whenever a weight or buffer is replaced or updated in place."""
    return tuple(
        (t.data_ptr(), t._version, tuple(t.stride())) for t in itertools.chain(model.parameters(), model.buffers())
    )


@contextlib.contextmanager
def fast_model(model: torch.nn.Module, fast: FastPath = PLAIN):
    """The frozen model as the fast path runs it, built once and kept per model.

    Plain, channels-last or exactly rewritten only: the model itself or a traced graph
    that shares its parameters (weights converted to channels-last for the duration).
    With folding or compiling: a private copy, rebuilt when the model's weights change.
    """
    if not fast.copies_model:
        net = rewrite.exact_view(model) if fast.exact_rewrites else model
        with memory_format(model, fast.channels_last):
            yield net
        return
    key = (fast.channels_last, fast.fold_bn, fast.compile, fast.exact_rewrites, _weights_key(model))
    cached = _PREPARED.get(model)
    if cached is None or cached[0] != key:
        net = rewrite.fold_bn(model) if fast.fold_bn else copy.deepcopy(model)
        if fast.exact_rewrites:
            net = rewrite.exact_rewrite(net)
        net.eval().requires_grad_(False)
        if fast.channels_last:
            net = net.to(memory_format=torch.channels_last)
        prepared: Callable = net
        if fast.compile:  # dynamic batch: early stop shrinks the working batch
            prepared = torch.compile(net, dynamic=True)
        cached = _PREPARED[model] = (key, prepared)
    yield cached[1]


FAITHFUL_RTOL, FAITHFUL_ATOL = 1e-4, 1e-5
"""How close the fast model's logits and input gradients must stay to the model's own
(batch norm folding changes them in the last bits only)."""


def faithful(model, net, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether `net` (the fast path's copy or rewrite of `model`) computes the model's own
    logits and input gradients on a batch. A graph rewrite can silently drop what torch.fx
    cannot see, a custom autograd.Function's backward among them: the attack would then
    follow a gradient the model never gives."""
    if net is model:
        return True

    def logits_and_grad(m):
        xg = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False), full_fp32():
            z = m(xg).float()
            (g,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), xg)
        return z.detach(), g

    (z0, g0), (z1, g1) = logits_and_grad(model), logits_and_grad(net)
    return bool(
        torch.allclose(z1, z0, rtol=FAITHFUL_RTOL, atol=FAITHFUL_ATOL)
        and torch.allclose(g1, g0, rtol=FAITHFUL_RTOL * 10, atol=FAITHFUL_ATOL)
    )


def last_word(model, net, perturb, cell: Cell, x, y, x_adv, generator) -> torch.Tensor:
    """x_adv with the reported model's last word: a sample the fast model misclassifies
    but the model itself classifies correctly (in true fp32) was let go by the attack on a
    break that is not one, so it is attacked again on the model itself."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), full_fp32():
        redo = (net(x_adv).argmax(1) != y) & (model(x_adv).argmax(1) == y)
    idx = redo.nonzero().squeeze(1)
    if len(idx):
        with torch.autocast(x.device.type, enabled=False), full_fp32():
            x_adv = x_adv.index_put(
                (idx,), perturb(model, x[idx], y[idx], cell.config, generator=generator).x_adv.detach().float()
            )
    return x_adv
