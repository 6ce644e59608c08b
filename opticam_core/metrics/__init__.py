"""Per-image metrics (SPEC §4) and their aggregation into the paper's numbers.

Each metric group (classification, insertion_deletion, localization, box_study, aopc,
selectivity; and those that re-run the method: sensitivity, adcc, sanity) is registered
with its typed options, the per-image fields it emits and the dataset-level metrics (with their
direction) it feeds (`registry.py`); `compute` runs the groups asked for on one method's maps,
and `aggregate` turns stored rows into the paper's numbers, so a table can be recomputed from
results at any time.
"""

from importlib import import_module

# Registration order is the order of the groups' fields and metrics (rows, tables): fix it here.
for _module in ("classification", "causal", "localization", "box_study", "aopc", "selectivity", "sensitivity",
                "adcc", "sanity"):
    import_module(f".{_module}", __name__)

from ..boxes import best_iou, box_iou, pad_boxes, union_mask, unpad_boxes
from ..transforms import crop_geometry, preprocess, transform_boxes
from .aggregate import Aggregate, aggregate
from .aopc import check_input_size as check_aopc_input_size
from .aopc import region_perturbation
from .box_study import box_study
from .causal import RISE_BLUR, insertion_deletion, pixel_ranks, rise_kernel, step_counts
from .classification import (
    average_drop,
    average_gain,
    average_increase,
    confidence,
    drop_terms,
    gain_terms,
    increase_terms,
)
from .components import largest_component_boxes
from .compute import compute
from .localization import THRESHOLDS, localization
from .registry import (
    GROUPS,
    METRICS,
    Metric,
    MetricGroup,
    default_groups,
    group_options,
    lower_is_better,
    metric,
)
from .sanity import aggregate_sanity
from .selectivity import aggregate_selectivity, selectivity

__all__ = [
    "default_groups",
    "METRICS", "GROUPS", "THRESHOLDS", "RISE_BLUR", "Aggregate", "Metric", "MetricGroup",
    "compute", "aggregate", "group_options", "lower_is_better", "metric",
    "confidence", "average_drop", "average_increase", "average_gain", "drop_terms", "increase_terms", "gain_terms",
    "insertion_deletion", "rise_kernel", "step_counts", "pixel_ranks",
    "localization", "largest_component_boxes", "box_study",
    "pad_boxes", "unpad_boxes", "union_mask", "box_iou", "best_iou",
    "preprocess", "transform_boxes", "crop_geometry",
    "region_perturbation", "check_aopc_input_size", "selectivity", "aggregate_selectivity",
    "aggregate_sanity",
]
