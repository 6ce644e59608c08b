"""The method that made a batch's maps, run again on other inputs: Max-Sensitivity's noisy copies,
ADCC's masked images, the sanity check's randomised models.

A failure must cost only the images it belongs to, never the batch (nor the other metrics of the
row): a failed batched call is retried one image at a time, an image that still fails gets a NaN
map (so every value computed from it is NaN), and the first message per image is kept in
`failures` for the row's `metric_error`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)


class Rerun:
    """`rerun(images, targets, *, bundle=None, unbounded=False) -> maps B×H×W`: `method` with
    `options` on `bundle` (default: the bundle that made the maps); `unbounded`: the images may
    leave [0,1] (noisy copies), see `explain`. Calls are counted in `calls` (how many
    images went through the method), failures in `failures` (message per failed call)."""

    def __init__(self, bundle, method: str, options: Mapping[str, Any] | None = None):
        self.bundle, self.method, self.options = bundle, method, dict(options or {})
        self.failures: list[str] = []
        self.calls = 0

    def _explain(self, bundle, images, targets, unbounded: bool) -> torch.Tensor:
        from ..methods import explain

        return explain(bundle, images, targets, self.method, unbounded=unbounded, **self.options).maps

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, *, bundle=None,
                 unbounded: bool = False) -> torch.Tensor:
        bundle = bundle or self.bundle
        self.calls += len(images)
        try:
            return self._explain(bundle, images, targets, unbounded)
        except Exception as err:  # noqa: BLE001  (any failure of the method: retried per image)
            log.warning("re-running %s on %d images together failed (%s: %s); retrying one by one",
                        self.method, len(images), type(err).__name__, err)
        maps = torch.full((len(images), *images.shape[-2:]), float("nan"), device=images.device)
        for j in range(len(images)):
            try:
                maps[j] = self._explain(bundle, images[j:j + 1], targets[j:j + 1], unbounded)[0]
            except Exception as err:  # noqa: BLE001
                self.failures.append(f"{self.method} re-run failed: {type(err).__name__}: {err}")
        return maps


__all__ = ["Rerun"]
