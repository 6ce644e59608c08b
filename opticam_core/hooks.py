"""Forward hooks that always come off: capture a layer's output, or replace it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class Capture:
    """What a `capture` saw: the layer's output of the last call."""

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None


@contextmanager
def capture(module: nn.Module, *, as_leaf: bool = False) -> Iterator[Capture]:
    """Record `module`'s output while the context is open; the hook is removed on exit, also on error.

    as_leaf: hand the rest of the network a detached copy that requires grad, so that
    `torch.autograd.grad(y, cap.output)` works on a frozen network without backpropagating
    below the layer (the gradient with respect to the output is the same).
    """
    cap = Capture()

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"target layer {type(_module).__name__} returns {type(output).__name__}, not a tensor")
        if as_leaf:
            output = output.detach().requires_grad_(True)
        cap.output = output
        return output if as_leaf else None

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


@contextmanager
def replace_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Run the network with `module`'s output replaced by `fn(output)`; the hook comes off on exit."""
    handle = module.register_forward_hook(lambda _m, _i, output: fn(output))
    try:
        yield
    finally:
        handle.remove()


def hook_count(model: nn.Module) -> int:
    """Hooks registered anywhere in `model` (to check that methods leave none behind)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks)
        + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )
