"""Per-image metrics (SPEC §4) and their aggregation into the paper's numbers.

Metrics return per-image tensors named as in FIELDS; `aggregate` turns stored rows into the
paper's numbers, so a table can be recomputed from results at any time.
"""

from ..boxes import best_iou, box_iou, pad_boxes, union_mask, unpad_boxes
from ..transforms import crop_geometry, preprocess, transform_boxes
from .aggregate import METRICS, Aggregate, aggregate
from .causal import RISE_BLUR, insertion_deletion, pixel_ranks, rise_kernel, step_counts
from .classification import (average_drop, average_gain, average_increase, box_study, confidence, drop_terms,
                             gain_terms, increase_terms)
from .components import largest_component_boxes
from .compute import GROUPS, compute
from .fields import FIELDS
from .localization import THRESHOLDS, localization

__all__ = [
    "FIELDS", "METRICS", "GROUPS", "THRESHOLDS", "RISE_BLUR", "Aggregate",
    "compute", "aggregate",
    "confidence", "average_drop", "average_increase", "average_gain", "drop_terms", "increase_terms", "gain_terms",
    "insertion_deletion", "rise_kernel", "step_counts", "pixel_ranks",
    "localization", "largest_component_boxes", "box_study",
    "pad_boxes", "unpad_boxes", "union_mask", "box_iou", "best_iou",
    "preprocess", "transform_boxes", "crop_geometry",
]
