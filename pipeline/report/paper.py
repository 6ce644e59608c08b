"""The paper's published numbers as data (paper.csv), and when a run's cell may be set beside them.

paper.csv is a transcription of the full paper's tables (shared/docs/PAPER.md §1; ImageNet
ILSVRC2012 val): ``figure, model, method, metric, value`` with metric keys as `aggregate` returns
them ("AD", "AD@box_and_map", "AD@box", …), methods as the project's keys, and the pseudo-methods
``box`` (S := B) and ``not_box`` (S := I∖B) of Figure 4. fig2: Tables 1–3; fig3: Tables A.7–A.8;
fig4: Table 5; ``timing``: Tables 1–2's seconds per image (per batch of 8, /8; GPU unknown).

The studies (`studies.py`): ``table4`` (AOPC, MS, ADCC), ``table6`` and ``tableA12`` (Opti-CAM's
objective × normalisation, 50 iterations: variant rows are named ``opticam/OBJECTIVE/NORMALIZATION``),
``tableA9`` (maps for other classes: metric ``AD:TARGET`` with TARGET label, top1, top2, least or
misclassified), ``tableA13`` (layers: model ``vgg16_bn@features.42``), ``tableA14`` (no input
normalisation; its T as ``seconds`` per image). Each table's own numbers are kept even where they
repeat another table's (Table 6's baselines, A.12's Mask/Diff rows), so a contradiction between
tables shows as two values.

A cell gets its paper value only when the run's dataset is ImageNet validation and its model one
of the paper's four (by the model's key, aliases accepted): other data or models have no anchor.
"""

from __future__ import annotations

import csv
import re
from functools import lru_cache
from importlib import resources

from opticam_core.models import ALIASES

PAPER_MODELS = ("resnet50", "vgg16_bn", "vit_base_patch16_224", "deit_base_patch16_224")
#: Which figure a table's cell is compared with.
FIGURES = ("fig2", "fig3", "fig4", "timing", "table4", "table6", "tableA9", "tableA12", "tableA13", "tableA14")


@lru_cache(maxsize=1)
def paper_values() -> dict[tuple[str, str, str, str], float]:
    """(figure, model, method, metric) → the paper's value."""
    text = resources.files("pipeline.report").joinpath("paper.csv").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return {(r["figure"], r["model"], r["method"], r["metric"]): float(r["value"]) for r in csv.DictReader(lines)}


def canonical_model(model: str) -> str | None:
    """The paper's model key for a run's model key, or None if it is not one of the paper's."""
    m = str(model).strip().lower()
    m = ALIASES.get(m, m)
    return m if m in PAPER_MODELS else None


def is_imagenet_val(dataset: str, split: str | None = None) -> bool:
    """ImageNet validation by name: "imagenet" in the dataset's name, and a validation split
    (the rows' ``split`` column, or "val" in the name when the split is unknown)."""
    name = str(dataset).lower()
    if "imagenet" not in name.replace("-", "").replace("_", ""):
        return False
    if split:
        return str(split).lower() in ("val", "validation", "valid")
    return re.search(r"val", name) is not None


def paper_value(figure: str, dataset: str, model: str, method: str, metric: str, *,
                split: str | None = None, force_datasets: tuple[str, ...] = ()) -> float | None:
    """The paper's number for this cell, or None when the paper has none for this setting."""
    if dataset not in force_datasets and not is_imagenet_val(dataset, split):
        return None
    key = canonical_model(model)
    if key is None:
        return None
    return paper_values().get((figure, key, method, metric))


#: The suffix `pipeline.config` gives a model run without input normalisation when it has no key.
UNNORMALIZED_SUFFIX = "-unnormalized"


def base_model(model: str) -> str:
    """A run's model key without what the studies add to it: `{key}@{layer}` (Table A.13's
    layers) → key; `{name}-unnormalized` (Table A.14) → name."""
    key = str(model).split("@", 1)[0]
    return key[: -len(UNNORMALIZED_SUFFIX)] if key.endswith(UNNORMALIZED_SUFFIX) else key


def unnormalized_paper_value(figure: str, dataset: str, model: str, method: str, metric: str, **kw) -> float | None:
    """`paper_value` for a model that ran without input normalisation (its key may carry the suffix)."""
    return paper_value(figure, dataset, base_model(model), method, metric, **kw)


def layer_paper_value(figure: str, dataset: str, model: str, layer: str, method: str, metric: str, *,
                      split: str | None = None, force_datasets: tuple[str, ...] = ()) -> float | None:
    """Table A.13's number: paper.csv names the model `{paper model}@{layer}` (torchvision's
    module path, e.g. ``vgg16_bn@features.42``)."""
    if dataset not in force_datasets and not is_imagenet_val(dataset, split):
        return None
    key = canonical_model(base_model(model))
    if key is None or not layer:
        return None
    return paper_values().get((figure, f"{key}@{layer}", method, metric))
