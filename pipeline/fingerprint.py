"""One run id = one configuration.

A row's meaning is fixed by what produced it: the method and its options, the model (name,
weights, checkpoint, classes, layer), the preprocessing, the metric groups and their options,
and the version of opticam_core. The manifest records that, flattened to field paths, per
(dataset, model, method, target); a rerun of the same run id whose configuration changed for a
plan that the run already holds is refused before any work, naming each changed field with its
old and new value. Adding a dataset, a model, a method or a target is not a change. Defaults are
filled in first, so writing a default out explicitly changes nothing; settings added after runs
were recorded (no normalisation, a subset) enter only when they are not the default, so that
those runs stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import opticam_core
from opticam_core.models import recipe

from .config import ConfigError, ModelSpec, RunConfig


class RunConflict(ConfigError):
    """A rerun whose configuration differs from the one the run's rows were made with."""


def plan_key(dataset: str, model: str, method: str, target: str = "label") -> str:
    """`dataset/model/method`, and `/target` for a map made for another class than the label (the
    label's key is the one runs recorded before targets existed). Names hold no '/'."""
    return f"{dataset}/{model}/{method}" + ("" if target == "label" else f"/{target}")


def plan_method(plan: str) -> str:
    return plan.split("/")[2]


def _model_fields(model: ModelSpec) -> dict[str, Any]:
    """The model as `load_model` will build it: aliases, the default layer and weights resolved."""
    r = recipe(model.name, **model.load_kwargs())
    where = f"models[{model.key}]"
    extra = {} if r.normalize else {f"{where}.normalize": False}
    return {**extra,
        f"{where}.name": r.name,
        f"{where}.weights": r.weights,
        f"{where}.checkpoint": r.checkpoint,
        f"{where}.num_classes": r.num_classes,
        f"{where}.layer": r.layer,
        "preprocessing.resize": r.resize,
        "preprocessing.size": list(r.input_size),
    }


def fingerprints(config: RunConfig) -> dict[str, dict[str, Any]]:
    """plan key → {field path: value} for every (dataset, model, method) of the config."""
    methods = config.resolved_methods()
    metrics = config.resolved_metrics()
    shared = {"opticam_core": opticam_core.__version__, "metrics": sorted(metrics)}
    if config.compute.precision != "fp32":  # the network's precision moves the values (README
        # "Precision"); recorded only when not the default, so runs made before it stay valid.
        # compile is not recorded: it changes float rounding only, like another batch size.
        shared["compute.precision"] = config.compute.precision
    for group, options in metrics.items():
        shared.update({f"metrics.{group}.{k}": v for k, v in options.items()})
    out = {}
    for dataset, model, run_methods in config.plans():
        model_fields = _model_fields(model)
        if dataset.subset is not None:  # which samples the run holds
            model_fields = {**model_fields, **{f"datasets[{dataset.name}].subset.{k}": v
                                               for k, v in dataset.subset.model_dump().items()}}
        if dataset.preprocess is not None:  # the dataset's geometry replaces the model's (same fields:
            # writing out the default, {resize: 256, crop: 224}, changes nothing)
            model_fields = {**model_fields, **dataset.preprocess.fingerprint()}
        for method in run_methods:
            options = methods[method]
            fields = {**shared, **model_fields, **{f"methods.{method}.{k}": v for k, v in options.items()}}
            for target in config.targets:
                out[plan_key(dataset.name, model.key, method, target)] = fields
    return out


@dataclass(frozen=True)
class Change:
    plan: str
    field: str
    old: Any
    new: Any


_ABSENT = object()


def changes(recorded: Mapping[str, Mapping], current: Mapping[str, Mapping], *,
            ignore_methods: set[str] = frozenset()) -> list[Change]:
    """What differs for the plans both hold (plans only one of them holds are additions)."""
    out = []
    for plan in sorted(set(recorded) & set(current)):
        if plan_method(plan) in ignore_methods:
            continue
        old, new = recorded[plan], current[plan]
        for field in sorted(set(old) | set(new)):
            a, b = old.get(field, _ABSENT), new.get(field, _ABSENT)
            if a != b:
                out.append(Change(plan, field, None if a is _ABSENT else a, None if b is _ABSENT else b))
    return out


def conflict_message(run_id: str, found: list[Change]) -> str:
    """Each changed field once, with its old and new value and the plans it touches, then the
    two ways out."""
    by_field: dict[tuple, list[str]] = {}
    for c in found:
        by_field.setdefault((c.field, repr(c.old), repr(c.new)), []).append(c.plan)
    methods = sorted({plan_method(c.plan) for c in found})
    lines = [f"run {run_id!r} already holds rows made with another configuration; nothing was changed:"]
    for (field, old, new), plans in by_field.items():
        where = plans[0] if len(plans) == 1 else f"{plans[0]} and {len(plans) - 1} more"
        lines.append(f"  {field}: {old} -> {new}   ({where})")
    lines.append("Either start a new run (--run-id NEW_ID), or recompute what changed: "
                 + " ".join(f"--replace {m}" for m in methods)
                 + " (deletes those methods' rows of this run and computes them again).")
    return "\n".join(lines)
