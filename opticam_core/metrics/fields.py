"""The per-image values the metrics produce, by name: the contract between the metrics, the
result rows the job writes, and `aggregate`, which reads them back.

Each entry: name → (kind, description). Kinds: "float", "int", "bool", "floats" (a list of
float32). A value that does not apply to an image (no boxes, not Opti-CAM) is null / NaN.
"""

from __future__ import annotations

FIELDS: dict[str, tuple[str, str]] = {
    # classification (SPEC §4)
    "label": ("int", "target class c (ground truth)"),
    "pred": ("int", "class predicted on the clean image"),
    "p": ("float", "softmax probability of c on the clean image"),
    "o": ("float", "softmax probability of c on x ⊙ S"),
    # insertion / deletion (class = pred)
    "insertion": ("float", "insertion AUC in [0,1], trapezoid over the fraction of pixels"),
    "deletion": ("float", "deletion AUC in [0,1]"),
    "insertion_curve": ("floats", "probability of pred after each insertion step (steps+1 points)"),
    "deletion_curve": ("floats", "probability of pred after each deletion step (steps+1 points)"),
    # localization (needs boxes)
    "has_box": ("bool", "the image has at least one ground-truth box of its class"),
    "boxes_dropped": ("int", "ground-truth boxes that the resize/crop left with no area (transform_boxes)"),
    "loc_iou": ("float", "best IoU of the largest-component box at the mean threshold with a GT box"),
    "pointing": ("bool", "a maximum of S inside the union of GT boxes (tolerance 0; ties: any maximum)"),
    "pointing_tol": ("bool", "a maximum of S within 15 px of the union of GT boxes"),
    "energy": ("float", "energy pointing game Σ_U S / Σ S (= F1's precision)"),
    "recall": ("float", "F1's recall Σ_U S / |U|"),
    "box_iou": ("floats", "best IoU at thresholds η = 0, 0.01, …, 0.99 (box accuracy)"),
    "sm": ("float", "saliency metric log(max(0.05, area)) − log p_c(crop)"),
    # bounding-box study: probabilities of c under four masks
    "o_box_and_map": ("float", "o for S·M (B∩S)"),
    "o_map_minus_box": ("float", "o for S·(1−M) (S∖B)"),
    "o_box": ("float", "o for S := M (method-free)"),
    "o_not_box": ("float", "o for S := 1−M (method-free)"),
    # method diagnostics
    "constant": ("bool", "the raw map was constant and became zeros"),
    "iterations": ("int", "Opti-CAM: optimisation steps run"),
    "objective": ("float", "Opti-CAM: objective of the returned map"),
    "objective_start": ("float", "Opti-CAM: objective at the uniform start"),
    "early_stopped": ("bool", "Opti-CAM: stopped early"),
    "objective_history": ("floats", "Opti-CAM: objective at each step (NaN after stopping)"),
}
