"""How many items a chunked loop hands the network at once, and what happens when that is too many.

Every loop that pushes many perturbed images through the network (Score-CAM's and Ablation-CAM's
(image, channel) pairs, LIME's samples, GradientSHAP's (image, sample) pairs, the insertion/
deletion steps, AOPC's and selectivity's forwards, extremal's pooling blocks) sizes its chunks
here and runs them through `run_chunks`:

- On the CPU a chunk has a fixed size per loop (measured: there a forward's time per image grows
  with the batch, cache pressure, so small chunks are fastest; see each constant's comment).
- On a CUDA device the size comes from the memory it has: `MEMORY_FRACTION` of the free memory
  (`torch.cuda.mem_get_info`) divided by what one item costs, i.e. the model's activation
  memory per image (the peak a forward of one image adds, measured once per model, input shape,
  dtype, autocast and gradient mode, and cached) plus what the loop itself allocates per item
  (its perturbed input and masks). A constant would be either too small for a large GPU and a
  small model, or fail for a small GPU and a large one.
- Other accelerators (no memory query) use the loop's fallback constant.
- An out-of-memory error on a chunk halves the chunk and runs the same items again (each loop
  writes its results by index, so a retried range overwrites nothing else); at a chunk of 1 the
  error is raised. The smaller chunk is kept for the rest of the loop.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch
from torch import nn

from .precision import active

log = logging.getLogger(__name__)

#: Share of the device's free memory one chunk may take. The rest is headroom for what the
#: estimate leaves out (allocator fragmentation, cuDNN workspaces that grow with the batch, a
#: second actor on a shared GPU measuring the same free memory); an estimate that is still too
#: large costs one halving, not the batch.
MEMORY_FRACTION = 0.5
#: The largest chunk derived from memory: past a few hundred images per forward a GPU is
#: saturated and a larger chunk only holds more memory (a bound, not a tuned value).
MAX_CHUNK = 4096

OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# model → {(what, shape, dtype, device, grad, autocast): bytes}; dropped with the model
_MEASURED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, OutOfMemory)


def free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device (the driver's view: other processes' use counted) plus what
    this process's allocator caches and can hand out again."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _autocast_state(device: torch.device):
    kind = device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None


def measure_peak(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, *, grad: bool) -> int:
    """Peak bytes that `fn(example)` (and, with `grad`, the backward to the example) adds on a
    CUDA device, beyond what was allocated before (the example included)."""
    device = example.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    if grad:
        x = example.detach().requires_grad_(True)
        with torch.enable_grad():
            out = fn(x)
            torch.autograd.grad(out.float().sum(), x)
    else:
        with torch.no_grad():
            out = fn(example)
    del out
    torch.cuda.synchronize(device)
    return max(0, int(torch.cuda.max_memory_allocated(device) - before))


def item_bytes(model: nn.Module, example: torch.Tensor, *, fn: Callable | None = None, what: str = "forward",
               grad: bool = False) -> int:
    """The memory one item costs `fn` (default: `model`) on the example's device: measured once
    (`measure_peak` on `example`, one item) per model, `what`, item shape, dtype, autocast,
    precision setting and gradient mode, then served from the cache."""
    device = example.device
    # `opticam_core.precision` runs bf16 inside the model's forward, where `_autocast_state`
    # cannot see it: its setting (`active()`) is part of what a measurement measured
    key = (what, tuple(example.shape[1:]), example.dtype, str(device), bool(grad), _autocast_state(device),
           active())
    cache = _MEASURED.setdefault(model, {})
    if key not in cache:
        cache[key] = measure_peak(fn or model, example[:1], grad=grad)
        log.debug("measured %s of %s: %d bytes per item", what, type(model).__name__, cache[key])
    return cache[key]


def by_memory(device, per_item: int, *, fraction: float = MEMORY_FRACTION, limit: int = MAX_CHUNK) -> int:
    """Items of `per_item` bytes that fit in `fraction` of the device's free memory (≥ 1, ≤ limit)."""
    fits = int(free_bytes(torch.device(device)) * fraction) // max(1, int(per_item))
    return max(1, min(int(limit), fits))


def chunk_size(model: nn.Module, example: torch.Tensor, *, cpu: int, fallback: int, requested: int | None = None,
               grad: bool = False, extra_bytes: int = 0, fn: Callable | None = None, what: str = "forward",
               limit: int | None = None, device=None) -> int:
    """Items per chunk for a loop that runs `fn` (default `model`) on items shaped like `example`
    (≥ 1 item; its first row is measured). requested: the caller's explicit size (kept as given).
    cpu: the CPU's size; fallback: other accelerators'. extra_bytes: what the loop allocates per
    item besides the forward (its perturbed input, masks). limit: the number of items (a larger
    chunk is pointless). device: where the loop runs (default: the example's)."""
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"batch_size must be >= 1, got {requested}")
        return int(requested)
    device = torch.device(device) if device is not None else example.device
    if device.type == "cpu":
        size = cpu
    elif device.type == "cuda":
        per_item = item_bytes(model, example, fn=fn, what=what, grad=grad) + int(extra_bytes)
        size = by_memory(device, per_item)
    else:
        size = fallback
    return max(1, min(size, limit)) if limit else max(1, size)


def loop_chunk(model, example: torch.Tensor, default_cpu: int, default_gpu: int, requested: int | None = None, *,
               total: int | None = None, copies: float = 2.0, grad: bool = False, fn=None,
               what: str = "forward", device=None) -> int:
    """Items per chunk of a loop over perturbed copies of `example`: `requested` as given;
    `default_cpu` on the CPU; on a CUDA device, what fits in its free memory at the model's
    measured memory per image (`grad`: with a backward to the input) plus `copies` image-sized
    tensors the loop makes per item; `default_gpu` on other accelerators. fn: a pass other than
    the model's (Ablation-CAM's tail on features). total: the loop's items (no chunk exceeds
    it). device: where the loop runs (default: the example's). The methods, the metrics and the
    benchmarks' floors size their chunks with it."""
    extra = int(copies * example[0].numel() * example.element_size())
    return chunk_size(model, example, cpu=default_cpu, fallback=default_gpu, requested=requested,
                      grad=grad, extra_bytes=extra, fn=fn, what=what, limit=total, device=device)


def with_halving(fn: Callable[[int], object], size: int, *, what: str = "chunk"):
    """fn(size); on an out-of-memory error, fn(size // 2), and so on down to 1, then the error.
    Returns (fn's result, the size that worked)."""
    size = max(1, int(size))
    while True:
        try:
            return fn(size), size
        except OutOfMemory:
            if size <= 1:
                raise
        # Outside the handler: the failed attempt's frames (and their tensors) are released.
        _release()
        log.warning("out of memory in %s at %d; retrying at %d", what, size, size // 2)
        size //= 2


def run_chunks(total: int, chunk: int, body: Callable[[int, int], None], *, what: str = "chunk") -> int:
    """body(start, stop) over [0, total) in chunks of `chunk`; an out-of-memory error halves the
    chunk and runs the same range again (body must write its results by index). Returns the
    chunk size the loop ended with."""
    start, chunk = 0, max(1, int(chunk))
    while start < total:
        stop = min(start + chunk, total)
        try:
            body(start, stop)
        except OutOfMemory:
            if stop - start <= 1:
                raise
            failed = stop - start
        else:
            start = stop
            continue
        _release()
        chunk = max(1, failed // 2)
        log.warning("out of memory in %s at a chunk of %d; retrying at %d", what, failed, chunk)
    return chunk


def _release() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


__all__ = ["MAX_CHUNK", "MEMORY_FRACTION", "OutOfMemory", "by_memory", "chunk_size", "free_bytes",
           "is_out_of_memory", "item_bytes", "loop_chunk", "measure_peak", "run_chunks", "with_halving"]
