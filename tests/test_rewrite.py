"""The exact graph rewrites change no bit: logits and input gradients of the rewritten
model equal the original's exactly, on inputs full of ties (the digits' flat background),
and so do the attacks and the training adversary that run on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses._parts as parts
from bench.core.cells import make_cell
from bench.core.data import get_spec
from bench.core.models import build_model
from bench.engine.cell import craft
from bench.engine.device import frozen
from bench.engine.fast import FastPath
from bench.engine.rewrite import exact_rewrite, exact_view, max_pool2d_nhwc

DIGITS = get_spec("digits")
MNIST = get_spec("mnist")


class ModulePools(nn.Module):
    """ReLU and max pooling as modules, a pool with padding and stride 1, and a ReLU
    whose output has two users (which must not be moved after the pool)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        h = self.pool(self.act(self.conv1(x)))
        a = F.relu(self.conv2(h))
        p = F.max_pool2d(a, 2) + 0.5 * F.avg_pool2d(a, 2)  # `a` has two users
        return self.head(p.flatten(1))


class InplaceRelu(nn.Module):
    """An in-place ReLU whose input has a second reader: moving it after the pool would
    change what that reader sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 2 * 2, 10)

    def forward(self, x):
        a = self.conv(x)
        h = F.relu(a, inplace=True)
        return self.head(F.max_pool2d(h, 2).flatten(1)) + a.mean((1, 2, 3))[:, None]


class Asserts(nn.Module):
    """Fails under symbolic tracing with an AssertionError, not a TraceError."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        assert isinstance(x, torch.Tensor), "a tensor"
        return F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)


class Branchy(nn.Module):
    """Control flow on the data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        if h.sum() > 0:
            h = h * 2
        return self.head(h.flatten(1))


def _inputs(shape, n=64, seed=0):
    """Images with a flat zero background and a random blob: many exact ties in a window."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, *shape)
    h, w = shape[1:]
    x[..., h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = torch.rand(
        n, shape[0], h - 2 * (h // 4), w - 2 * (w // 4), generator=g
    )
    return x, torch.randint(0, 10, (n,), generator=g)


def _logits_and_grad(model, x, y):
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="none").sum(), xg)
    return logits.detach(), grad


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize(
    "build,shape",
    [
        (lambda: build_model("digits_cnn", DIGITS), DIGITS.shape),
        (lambda: build_model("madry_mnist", MNIST), MNIST.shape),
        (ModulePools, (1, 4, 4)),
        (InplaceRelu, (1, 4, 4)),
    ],
)
def test_rewrite_changes_no_logit_and_no_gradient(build, shape):
    torch.manual_seed(0)
    model = build().eval().requires_grad_(False)
    fast = exact_rewrite(model)
    assert fast is not model and max_pool2d_nhwc in _targets(fast)  # the rewrite did happen
    x, y = _inputs(shape)
    ref_logits, ref_grad = _logits_and_grad(model, x, y)
    logits, grad = _logits_and_grad(fast, x, y)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(grad, ref_grad)
    assert (ref_grad != 0).any()
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_relu_moves_after_the_pool_only_when_the_pool_is_its_one_user():
    gm = exact_rewrite(build_model("digits_cnn", DIGITS).eval())
    order = [t for t in _targets(gm) if t in (F.relu, max_pool2d_nhwc)]
    # conv1 -> pool -> relu, conv2 -> pool -> relu, fc1 -> relu
    assert order == [max_pool2d_nhwc, F.relu, max_pool2d_nhwc, F.relu, F.relu]
    gm = exact_rewrite(ModulePools().eval())
    calls = _targets(gm)
    assert calls.count(max_pool2d_nhwc) == 2
    assert "act" not in {n.target for n in gm.graph.nodes if n.op == "call_module"}  # moved after the module pool
    assert F.relu in calls  # conv2's ReLU has two users: it stays before its pool


def test_models_the_rewrite_does_not_touch_are_returned_as_they_are():
    branchy = Branchy()
    assert exact_rewrite(branchy) is branchy  # untraceable
    asserts = Asserts()
    assert exact_rewrite(asserts) is asserts
    resnet = build_model("resnet8", get_spec("cifar10"))
    assert exact_rewrite(resnet) is resnet  # nothing to rewrite


def test_nhwc_pool_keeps_the_layout_it_was_given():
    x = torch.rand(4, 8, 6, 6)
    assert max_pool2d_nhwc(x, 2).is_contiguous()
    xc = x.contiguous(memory_format=torch.channels_last)
    out = max_pool2d_nhwc(xc, 2)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, F.max_pool2d(x, 2))


def test_view_of_a_model_with_nothing_to_rewrite_does_not_keep_it_alive():
    import gc
    import weakref

    resnet = build_model("resnet8", get_spec("cifar10")).eval()
    assert exact_view(resnet) is resnet
    ref = weakref.ref(resnet)
    del resnet
    gc.collect()
    assert ref() is None


def test_view_is_cached_follows_weights_and_is_retraced_on_a_mode_change():
    model = build_model("digits_cnn", DIGITS).eval()
    view = exact_view(model)
    assert exact_view(model) is view
    x, _ = _inputs(DIGITS.shape)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # in place, as an optimizer step
        assert torch.equal(view(x), model(x))
    model.train()
    assert exact_view(model) is not view
    moved = build_model("digits_cnn", DIGITS).eval()
    first = exact_view(moved)
    moved[0].mean = moved[0].mean.clone()  # new storage for a buffer: a new trace
    assert exact_view(moved) is not first


@pytest.mark.parametrize(
    "params",
    [{"steps": 10}, {"steps": 10, "loss": "cw"}, {"steps": 6, "restarts": 2}, {"steps": 10, "early_stop": False}],
)
def test_attacks_on_the_rewritten_model_are_bit_identical(digits_test, params):
    torch.manual_seed(1)
    model = build_model("digits_cnn", DIGITS)
    x, y = digits_test
    # A briefly trained model so some samples break and some do not.
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    cell = make_cell("pgd", dict({"eps": 0.06, "step_size": 0.015}, **params), DIGITS.threat)
    plain = craft(model, cell, x, y, device="cpu", batch_size=256, seed=5)
    fast = craft(model, cell, x, y, device="cpu", batch_size=256, seed=5, fast=FastPath(exact_rewrites=True))
    assert torch.equal(plain, fast)
    with frozen(model), torch.no_grad():
        broken = (model(plain).argmax(1) != y).float().mean()
    assert 0.05 < float(broken) < 0.95


def test_training_adversary_is_bit_identical(digits_test, monkeypatch):
    torch.manual_seed(2)
    model = build_model("digits_cnn", DIGITS).train()
    x, y = digits_test
    kw = dict(eps=0.3, steps=5, step_size=0.05)
    fast = parts.pgd_adversary(model, x, y, generator=torch.Generator().manual_seed(0), **kw)
    assert model.training  # restored
    monkeypatch.setattr(parts, "exact_view", lambda m: m)
    plain = parts.pgd_adversary(model, x, y, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(fast, plain) and not torch.equal(fast, x)
