"""Numeric precision and compilation of the network's passes: one place for both.

`precision(name, model, compile=False)` is a context manager that, while open, runs every call
of `model` (the bundle's top module, so every method's and metric's forward and backward go
through it, `ctx.model` and `bundle.model` alike) in the given precision:

- `fp32` (the default): float32 everywhere, exactly today's computation (the context changes
  nothing).
- `tf32`: on CUDA, matrix products and convolutions in TF32 (`torch.backends.cuda.matmul.
  allow_tf32`, `torch.backends.cudnn.allow_tf32`), restored on exit. A CPU has no TF32: there it
  is fp32, bit for bit.
- `bf16`: the network's forward (and so its backward) under `torch.autocast(bfloat16)`, its
  logits cast back to float32 on the way out. Only the network runs in bfloat16: the maps and
  their normalisation, the optimisers' parameters and state (Opti-CAM's Adam, extremal's SGD),
  the metrics' sums and probabilities stay in float32 (float64 for the metrics' log-softmax),
  because autocast covers only the model's call. Activations captured by hooks come out in
  bfloat16; `methods.base.Context` casts them to the images' dtype before any map is made.

compile: the model's forward goes through `torch.compile` (its backward through AOTAutograd):
the Opti-CAM step, the extremal step, the insertion/deletion, Score-CAM and Ablation-CAM chunks
are nearly all network passes. Passes that need a hook on a layer (feature capture, the gradient
CAMs' backward, ablation) run eagerly: a compiled graph does not see hooks registered after it
was traced. Where torch.compile cannot work (no C++ compiler for the CPU backend, an unsupported
platform) the first call fails with `CompileUnavailable`, naming the option, instead of falling
back silently to a speed the user did not ask for.

The context is reentrant: inside an open context (per thread) the default setting (fp32, not
compiled) means "as the enclosing one", so the methods that metrics re-run (Max-Sensitivity,
ADCC, the sanity check's randomised copies) run in the precision of the metrics' call; a
different explicit setting is refused.
"""

from __future__ import annotations

import shutil
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .choices import check_choice
from .hooks import hook_count

PRECISIONS = ("fp32", "tf32", "bf16")
DEFAULT = "fp32"

class CompileUnavailable(RuntimeError):
    """torch.compile cannot run here (the `compile` option asked for it)."""


def check_precision(name: str) -> str:
    check_choice("precision", name, PRECISIONS)
    return name


@contextmanager
def cuda_tf32(enabled: bool = True) -> Iterator[None]:
    """TF32 matmuls and convolutions on CUDA while open; both flags restored on exit (also on error)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_compile_available(device: torch.device) -> None:
    """Raise `CompileUnavailable` where torch.compile's inductor backend cannot build kernels."""
    if sys.platform == "win32":
        raise CompileUnavailable("compile: torch.compile is not supported on Windows here; set compile: false")
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")
                                     or shutil.which("clang")):
        raise CompileUnavailable("compile: torch.compile needs a C++ compiler for the CPU (none on PATH); "
                                 "install gcc or set compile: false")


def _float_out(out):
    # The logits leave in float32 whatever ran inside: every caller's arithmetic stays fp32.
    if isinstance(out, torch.Tensor) and out.dtype in (torch.bfloat16, torch.float16):
        return out.float()
    return out


class _Forward:
    """The replacement of `model.forward` while a precision context is open."""

    def __init__(self, model: nn.Module, name: str, compile: bool):
        self.eager = type(model).forward.__get__(model)
        self.setting = (name, compile)
        self.device_type = _device_of(model).type
        self.model = model
        self.compiled = torch.compile(self.eager, dynamic=None) if compile else None

    def __call__(self, *args, **kwargs):
        # A hook registered anywhere (a capture, an ablation) must fire: such passes run eagerly.
        fn = self.compiled if self.compiled is not None and hook_count(self.model) == 0 else self.eager
        with self.autocast():
            out = fn(*args, **kwargs)
        return _float_out(out)

    def autocast(self):
        if self.setting[0] == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return _nothing()

    def __deepcopy__(self, memo):
        # A copy made inside the context (the sanity check's randomised networks) gets the plain
        # forward of its class: it is not ours to restore on exit. Calls of the copy inside an
        # explain/compute still run in the enclosing precision (`_ACTIVE`).
        return type(self.model).forward.__get__(memo[id(self.model)])


_ACTIVE = threading.local()


def _patched(model: nn.Module) -> _Forward | None:
    fwd = model.__dict__.get("forward")
    return fwd if isinstance(fwd, _Forward) else None


def active() -> tuple[str, bool] | None:
    """(precision, compile) of the innermost open context on this thread, None outside any."""
    return getattr(_ACTIVE, "setting", None)


@contextmanager
def precision(name: str = DEFAULT, model: nn.Module | None = None, *, compile: bool = False,
              device: torch.device | str | None = None) -> Iterator[None]:
    """Run `model`'s calls in precision `name` (`fp32`, `tf32`, `bf16`), compiled when `compile`,
    while the context is open. device: where the tf32 flags apply (default: the model's); tf32
    changes nothing off CUDA. Inside an open context (this thread), the default setting (fp32,
    not compiled) means "as the enclosing context", so the method runs that metrics make again,
    on the model or a copy of it, inherit the metrics' precision; another explicit setting is
    refused. See the module's docstring."""
    check_precision(name)
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be true or false, got {compile!r}")
    outer = active()
    setting = (name, compile)
    if outer is not None and setting != outer:
        if setting != (DEFAULT, False):
            raise ValueError(f"precision {name!r} (compile={compile}) asked inside an open precision "
                             f"{outer[0]!r} (compile={outer[1]}) context")
        setting = outer
    name, compile = setting
    dev = torch.device(device) if device is not None else (_device_of(model) if model is not None
                                                            else torch.device("cpu"))
    if compile:
        if model is None:
            raise ValueError("compile=True needs the model whose forward it compiles")
        check_compile_available(dev)
    held = _patched(model) if model is not None else None
    if held is not None and held.setting != setting:
        raise ValueError(f"the model already runs in precision {held.setting[0]!r} "
                         f"(compile={held.setting[1]}) in another context")
    patch = model is not None and held is None and (name == "bf16" or compile)
    tf32 = cuda_tf32() if name == "tf32" and dev.type == "cuda" else _nothing()
    _ACTIVE.setting = setting
    try:
        with tf32:
            if not patch:
                yield
                return
            model.forward = _Forward(model, name, compile)
            try:
                yield
            finally:
                del model.forward
    finally:
        _ACTIVE.setting = outer


def same_precision(model: nn.Module):
    """A context running other parts of `model` (a tail on captured features) in the precision
    its forward currently runs in (no-op outside a bf16 context)."""
    held = _patched(model)
    return held.autocast() if held is not None else _nothing()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


__all__ = ["PRECISIONS", "DEFAULT", "CompileUnavailable", "active", "check_precision", "cuda_tf32", "precision",
           "same_precision"]
