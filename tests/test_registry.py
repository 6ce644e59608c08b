"""One registry per kind: a method's (or metric group's) declaration is the single source of its
key, name, family, order, typed options and per-image fields; everything else derives from it,
and a value a method emits without declaring it is an error, never a silent drop."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from opticam_core import explain
from opticam_core.fields import PerImage, merge, per_image_fields
from opticam_core.methods import GRADIENT_METHODS, METHODS, REGISTRY, method_spec
from opticam_core.methods.registry import register
from opticam_core.metrics import GROUPS, METRICS, lower_is_better
from pipeline.report.tables import method_name, method_order
from pipeline.schema import ARROW_TYPES, RESULTS

from . import _toys

#: Cheap settings so every method runs on the toy model in a second or two.
CHEAP = {"extremal": {"iterations": 2, "areas": [0.1, 0.3]}, "opticam": {"iterations": 2}}


@pytest.fixture(scope="module")
def toy():
    return _toys.cnn_bundle(), _toys.images(2, seed=3), _toys.targets(2)


@pytest.fixture(scope="module")
def toy_vit():
    return _toys.vit_bundle(), _toys.images(2, seed=3), _toys.targets(2)


def test_the_registry_is_the_source_of_keys_families_and_order():
    assert set(METHODS) == set(REGISTRY)
    assert list(METHODS) == sorted(METHODS, key=lambda k: REGISTRY[k].rank)
    assert set(GRADIENT_METHODS) == {k for k, s in REGISTRY.items() if s.family == "gradient"}
    assert METHODS[0] == "fakecam" and METHODS[-1] == "opticam"  # the paper's first and last rows
    # the report's rows follow the declarations
    assert method_order(list(reversed(METHODS)) + ["box", "zzz"]) == [*METHODS, "box", "zzz"]
    assert method_name("extremal") == method_spec("extremal").name and method_spec("extremal").paper_name == "ExPert"


@pytest.mark.parametrize("key", METHODS)
def test_every_method_emits_only_declared_extras(toy, toy_vit, key):
    bundle, images, targets = toy if method_spec(key).serves(toy[0]) else toy_vit  # attention: ViT only
    ex = explain(bundle, images, targets, key, **CHEAP.get(key, {}))
    declared = {e.name: e for e in method_spec(key).extras}
    assert set(ex.extras) <= set(declared) and "constant" in ex.extras
    for name, value in ex.extras.items():
        assert value.shape[0] == len(images), name
        kind = declared[name].kind
        if kind == "bool":
            assert value.dtype == torch.bool, name
        elif kind == "int64":
            assert value.dtype == torch.int64, name
        elif kind == "list<float32>":
            assert value.dim() == 2 and value.is_floating_point(), name
        elif kind == "float64":
            assert value.dim() == 1 and value.is_floating_point(), name


def test_an_undeclared_extra_is_an_error(toy):
    bundle, images, targets = toy

    @register("_sneaky", name="Sneaky", family="reference", rank=999)
    def sneaky(ctx):
        B = len(ctx.images)
        return torch.ones(B, *ctx.size), {"constant": torch.zeros(B, dtype=torch.bool), "surprise": torch.ones(B)}

    try:
        with pytest.raises(RuntimeError, match=r"'_sneaky' emits undeclared extras \['surprise'\]"):
            explain(bundle, images, targets, "_sneaky")
    finally:
        del REGISTRY["_sneaky"]


def test_an_option_needs_a_type_and_a_default():
    with pytest.raises(TypeError, match="option 'steps' needs a type annotation and a default"):
        @register("_untyped", name="Untyped", family="reference", rank=999)
        def untyped(ctx, *, steps=3):
            pass
    assert "_untyped" not in REGISTRY


def test_every_stored_field_is_a_results_column_of_its_declared_type():
    fields = per_image_fields()
    for spec in REGISTRY.values():
        for extra in spec.extras:
            if extra.stored:
                assert RESULTS.field(extra.name).type == ARROW_TYPES[extra.kind], (spec.key, extra.name)
            else:
                assert extra.name not in RESULTS.names and extra.name not in fields
    for group in GROUPS.values():
        for f in group.fields:
            assert RESULTS.field(f.name).type == ARROW_TYPES[f.kind], (group.key, f.name)
    assert RESULTS.field("area_in_image").type == pa.list_(pa.float32())  # extremal's extras are no longer dropped


def test_a_field_declared_twice_must_mean_the_same():
    a, b = PerImage("x", "float64", "one"), PerImage("x", "bool", "two")
    assert merge({"m1": (a,), "m2": (PerImage("x", "float64", "same kind"),)})["x"] is a
    with pytest.raises(TypeError, match="'x' is float64 in m1 but bool in m2"):
        merge({"m1": (a,), "m2": (b,)})


def test_metric_directions_are_declared_in_the_core():
    down = {k for k in METRICS if lower_is_better(k)}
    assert {"AD", "D", "OM", "LE", "SM"} <= down and not {"AG", "AI", "I", "F1", "BA", "SP", "EP"} & down
    assert lower_is_better("AD@box_and_map") and not lower_is_better("AI@not_box")
    with pytest.raises(ValueError, match="unknown metric 'XY'"):
        lower_is_better("XY")
