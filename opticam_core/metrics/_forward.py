"""Forward passes for the metrics: class probabilities of many images, in bounded chunks.

Probabilities are computed as float64 log-softmax of the float32 logits: 1 − p (AG's denominator)
keeps its digits when p is close to 1, and p == 1 exactly happens only for logit gaps over ~37.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..chunking import loop_chunk, run_chunks


def default_batch_size(device: torch.device) -> int:
    """Step images per forward when the caller does not say and the device's memory is not
    known: small on a CPU, where a forward's time per image grows with the batch (cache
    pressure: EfficientNet-Lite0 takes ~19 ms per image in batches of 8 and ~25 ms in batches of
    32 on a 2-core laptop); large on an accelerator (CUDA devices size it from their free memory
    instead, `resolve_batch_size`)."""
    return 8 if torch.device(device).type == "cpu" else 256


def class_log_probs(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """log p(class) per row, float64."""
    return torch.log_softmax(logits.double(), dim=1).gather(1, classes[:, None].long())[:, 0]


@torch.no_grad()
def chunked_log_probs(model, total: int, build: Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
                      batch_size: int, device) -> torch.Tensor:
    """log p for `total` images made chunk by chunk: build(slice) → (images C×3×H×W, classes C)."""
    out = torch.empty(total, dtype=torch.float64, device=device)

    def forward(start: int, stop: int) -> None:
        images, classes = build(slice(start, stop))
        out[start:stop] = class_log_probs(model(images), classes)

    run_chunks(total, batch_size, forward, what="metric forwards")  # out of memory: halved, not failed
    return out


def resolve_batch_size(batch_size: int | None, device, *, model=None, example: torch.Tensor | None = None,
                       copies: float = 3.0, total: int | None = None) -> int:
    """`batch_size` as given; else `default_batch_size`, except on a CUDA device given the model
    and an `example` image batch: what its free memory holds at the model's measured memory per
    image plus `copies` image-sized tensors per item that the caller's build makes
    (`opticam_core.chunking`)."""
    if batch_size is not None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return int(batch_size)
    if model is None or example is None or torch.device(device).type != "cuda" or example.numel() == 0:
        return default_batch_size(device)
    return loop_chunk(model, example, default_batch_size("cpu"), default_batch_size(device), total=total,
                      copies=copies, device=device)
