"""Forward passes for the metrics: class probabilities of many images, in bounded chunks.

Probabilities are computed as float64 log-softmax of the float32 logits: 1 − p (AG's denominator)
keeps its digits when p is close to 1, and p == 1 exactly happens only for logit gaps over ~37.
"""

from __future__ import annotations

from typing import Callable

import torch


def default_batch_size(device: torch.device) -> int:
    """Step images per forward when the caller does not say: large on a GPU; small on a CPU,
    where a forward's time per image grows with the batch (cache pressure: EfficientNet-Lite0
    takes ~19 ms per image in batches of 8 and ~25 ms in batches of 32 on a 2-core laptop)."""
    return 256 if torch.device(device).type == "cuda" else 8


def class_log_probs(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """log p(class) per row, float64."""
    return torch.log_softmax(logits.double(), dim=1).gather(1, classes[:, None].long())[:, 0]


@torch.no_grad()
def chunked_log_probs(model, total: int, build: Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
                      batch_size: int, device) -> torch.Tensor:
    """log p for `total` images made chunk by chunk: build(slice) → (images C×3×H×W, classes C)."""
    out = torch.empty(total, dtype=torch.float64, device=device)
    for start in range(0, total, batch_size):
        part = slice(start, min(start + batch_size, total))
        images, classes = build(part)
        out[part] = class_log_probs(model(images), classes)
    return out


def resolve_batch_size(batch_size: int | None, device) -> int:
    if batch_size is None:
        return default_batch_size(device)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)
