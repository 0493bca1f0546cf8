"""BPDA's mirror: the forward is the truth, the backward is not trusted.

BPDA (Athalye et al. 2018) keeps a step's exact forward and replaces its backward by a
differentiable stand-in. A model whose custom `torch.autograd.Function` writes its own
backward does the opposite to an attacker: its backward may say anything (a reversed,
rescaled or batch-dependent gradient) while its forward is what the model computes. The
view here differentiates each such Function through its own forward pass instead: the
forward runs under autograd, with a stand-in for `ctx`, so the gradient is the one of the
operations the forward really performs, and the hand-written backward is never called.

- `through_forward()`: a context manager; inside it, in this thread, every user-defined
  Function (one defined outside torch; torch's own are torch's business) is applied
  through its forward. Where that forward is not differentiable (its outputs leave the
  graph: computed under no_grad, detached, in NumPy) or cannot run under autograd (an
  in-place change of an input that needs a gradient), the Function runs as it is, with
  its own backward: the forward's gradient is taken only where it exists.
- `ThroughForward`: the view of a model as a module; a cell crafted through it
  (bench.core.cells.Cell.view) records `TAG` in its key, and is judged, like every cell,
  on the model itself (bench.engine.cell).
- `custom_functions`: the user-defined Functions one forward pass applies, by name.

Function.apply is looked up on the class at each call, so replacing it on the base
class for the length of a `with` block reaches every subclass that does not override it
(bench.engine.rewrite's tracer does the same to keep such Functions opaque). Written here
because torch offers no switch to ignore a Function's backward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.function as autograd_function
from torch import nn

_state = threading.local()
"""`mode` of this thread: None (Functions run as they are), "forward" (through their
forward), or a set (their names are recorded, and they run as they are)."""
_lock = threading.Lock()
_users = 0
_previous: Any = None


def user_defined(fn: type) -> bool:
    """A Function subclass written outside torch: its backward is someone's claim."""
    module = getattr(fn, "__module__", None) or ""
    return not (module == "torch" or module.startswith("torch."))


def _name(fn: type) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


class _Ctx:
    """What a Function's forward may call on `ctx`; nothing kept is ever used, since the
    backward that would read it never runs."""

    def __init__(self, args: tuple):
        self.needs_input_grad = tuple(torch.is_tensor(a) and a.requires_grad for a in args)
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors):
        pass

    def mark_dirty(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value: bool):
        pass


def _forward_of(fn: type[torch.autograd.Function], apply, args: tuple, kwargs: dict):
    """`fn` applied to args with autograd differentiating its forward; `apply` (the
    Function as it is) where the forward leaves the graph or cannot run under autograd."""
    inputs = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return apply(*args, **kwargs)
    try:
        if fn.setup_context is not torch.autograd.Function.setup_context:
            out = fn.forward(*args, **kwargs)  # the newer style: forward takes no ctx
        else:
            out = fn.forward(_Ctx(args), *args, **kwargs)
    # A forward written for no_grad can fail under autograd (an in-place change of an input
    # that needs a gradient); then the Function runs as its author wrote it.
    except RuntimeError:
        return apply(*args, **kwargs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not any(torch.is_tensor(o) and o.requires_grad for o in outs):
        return apply(*args, **kwargs)  # nothing of the forward to differentiate
    return out


def _dispatch(fn: type[torch.autograd.Function], *args, **kwargs):
    apply = _previous.__get__(None, fn)
    mode = getattr(_state, "mode", None)
    if mode is None or not user_defined(fn):
        return apply(*args, **kwargs)
    if isinstance(mode, set):
        mode.add(_name(fn))
        return apply(*args, **kwargs)
    return _forward_of(fn, apply, args, kwargs)


@contextlib.contextmanager
def _mode(mode) -> Iterator[None]:
    """Function.apply replaced while any thread is inside; `mode` for this thread."""
    global _users, _previous
    outer = getattr(_state, "mode", None)
    with _lock:
        if _users == 0:
            _previous = autograd_function.Function.__dict__["apply"]
            autograd_function.Function.apply = classmethod(_dispatch)
        _users += 1
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = outer
        with _lock:
            _users -= 1
            if _users == 0:
                autograd_function.Function.apply = _previous


def through_forward() -> contextlib.AbstractContextManager:
    """Inside: user-defined autograd.Functions are differentiated through their forward."""
    return _mode("forward")


def custom_functions(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The user-defined autograd.Functions one forward pass of `model` on x applies (with
    its input needing a gradient, as under attack), by module and name."""
    found: set[str] = set()
    with _mode(found), torch.enable_grad():
        model(x.detach().clone().requires_grad_(True))
    return sorted(found)


class ThroughForward(nn.Module):
    """`model` whose user-defined autograd.Functions are differentiated through their own
    forward pass: the same outputs, the gradient of what the forward computes."""

    TAG = "grad=forward"
    """What a cell crafted through this view adds to its key."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with through_forward():
            return self.model(*args, **kwargs)
