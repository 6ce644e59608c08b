"""The metric-group registry: what each group computes per image, from which options, and which
dataset-level numbers (with their direction) `aggregate` makes of it.

A group is a function `fn(batch: MetricBatch, **options) -> {field: B or B×T tensor}` declared
with `register_group`. Its options are the keyword-only parameters of the function that does the
work (`options_from`, e.g. `insertion_deletion`), so their types and defaults are written once;
each group gets only its own options (`batch_size` under `localization` does not touch
insertion/deletion). Its fields are the per-image columns of the results; its metrics the numbers
of the paper's tables, each with its arrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from pydantic import BaseModel

from ..cost import declared
from ..fields import PerImage
from ..options import Configurable, OptionsError, options_model

#: Every compute() call emits these, whatever the groups.
BASE_FIELDS = (
    PerImage("label", "int64", "target class c (ground truth)"),
    PerImage("pred", "int64", "class predicted on the clean image"),
    PerImage("p", "float64", "softmax probability of c on the clean image"),
)


@dataclass(frozen=True)
class Metric:
    """A dataset-level number of the paper: its key in `aggregate`'s result and its direction."""

    key: str
    name: str
    higher_is_better: bool
    percent: bool = True  # ×100 in the tables (all but SM)

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass(frozen=True)
class MetricBatch:
    """What every group of one compute() call shares: one method's maps for one batch."""

    bundle: Any
    images: torch.Tensor       # B×3×H×W on the bundle's device
    targets: torch.Tensor      # B, the class c
    maps: torch.Tensor         # B×H×W in [0,1]
    boxes: torch.Tensor | None  # B×N×4 NaN-padded, when a group needs boxes
    logits: torch.Tensor       # clean logits, B×classes
    method_free: bool = True   # box study: also the rows that do not depend on the map
    rerun: Any = None          # the method that made `maps`, for the groups that call it (`Rerun`)
    map_targets: torch.Tensor | None = None  # the class each map was made for, when not `targets`

    @property
    def made_for(self) -> torch.Tensor:
        """The class the maps were made for (a re-run makes its maps for it too); the metrics'
        own class stays `targets` (the ground truth), as in the paper's Table A.9."""
        return self.targets if self.map_targets is None else self.map_targets

    @property
    def pred(self) -> torch.Tensor:
        return self.logits.argmax(1)


@dataclass(frozen=True)
class MetricGroup(Configurable):
    key: str
    fn: Callable[..., dict[str, torch.Tensor]]
    options: type[BaseModel]
    fields: tuple[PerImage, ...]
    metrics: tuple[Metric, ...]
    needs_boxes: bool
    calls_method: bool = False  # re-runs the method (on noisy copies, masked images, other models)
    cost: Callable | None = None  # (options, ModelInfo | None) → cost.Cost; see `cost_of`

    def cost_of(self, options=None, info=None):
        """Model evaluations per image and method (`opticam_core.cost.Cost`; `reruns`: times
        the method runs again) with these options on a model described by `info`."""
        if self.cost is None:
            raise ValueError(f"metric group {self.key!r} declares no cost; add cost= to its register_group()")
        opts = options if isinstance(options, BaseModel) else self.validate(options)
        return self.cost(opts, info)

    @property
    def where(self) -> str:
        return f"metrics.{self.key}"


GROUPS: dict[str, MetricGroup] = {}
METRICS: dict[str, Metric] = {}


def _no_options():
    pass


def register_group(key: str, *, fields: tuple[PerImage, ...], metrics: tuple[Metric, ...],
                   options_from: Callable = _no_options, skip: tuple[str, ...] = (), needs_boxes: bool = False,
                   calls_method: bool = False, cost=None):
    """Declare `fn(batch, **options)` as metric group `key`; its options are `options_from`'s
    keyword-only parameters minus `skip` (those the group fills in from the batch).
    calls_method: the group runs the method again through `batch.rerun` (compute's `method=`).
    cost: its model evaluations per image (`opticam_core.cost`): a Cost, or a callable of the
    validated options, or of (options, ModelInfo | None); `Cost(reruns=n)` for n method reruns."""

    def wrap(fn: Callable) -> Callable:
        if key in GROUPS:
            raise ValueError(f"metric group {key!r} is registered twice")
        model = options_model(options_from, name=f"{key}_options", skip=skip)
        GROUPS[key] = MetricGroup(key, fn, model, tuple(fields), tuple(metrics), needs_boxes, calls_method,
                                  declared(cost))
        for m in metrics:
            if m.key in METRICS:
                raise ValueError(f"metric {m.key!r} is declared by two groups")
            METRICS[m.key] = m
        return fn

    return wrap


def group_options(which: Sequence[str] | Mapping[str, Mapping | None]) -> dict[str, dict[str, Any]]:
    """group → validated keyword options: `which` names groups (default options) or maps each
    group to its own options. OptionsError lists every unknown group and bad option."""
    items = which.items() if isinstance(which, Mapping) else ((g, None) for g in which)
    out, problems = {}, []
    for key, opts in items:
        if key not in GROUPS:
            problems.append(f"metrics.{key}: unknown metric group; valid: {', '.join(GROUPS)}")
            continue
        try:
            out[key] = GROUPS[key].kwargs(opts)
        except OptionsError as err:
            problems += err.problems
    if problems:
        raise OptionsError(problems)
    return out


def default_groups() -> list[str]:
    """The groups run when none are named: all but those that re-run the method (Max-Sensitivity
    ×10, ADCC, the sanity check), which multiply a run's cost and are asked for by name."""
    return [k for k, g in GROUPS.items() if not g.calls_method]


def metric(key: str) -> Metric:
    try:
        return METRICS[key]
    except KeyError:
        raise ValueError(f"unknown metric {key!r}; valid: {', '.join(METRICS)}") from None


def lower_is_better(key: str) -> bool:
    return not metric(key).higher_is_better


__all__ = ["BASE_FIELDS", "GROUPS", "default_groups", "METRICS", "Metric", "MetricBatch", "MetricGroup", "group_options",
           "lower_is_better", "metric", "register_group"]
