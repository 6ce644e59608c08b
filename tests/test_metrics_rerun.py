"""Metric groups that run the method again (Max-Sensitivity, ADCC, the sanity check) get it as
`batch.rerun`; a method that fails on one image costs that image's values of that group (NaN,
with the reason), never the batch or the row's other metrics."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from opticam_core.fields import PerImage
from opticam_core.methods import REGISTRY
from opticam_core.methods.registry import register
from opticam_core.metrics import GROUPS, METRICS, compute
from opticam_core.metrics.registry import register_group
from opticam_core.metrics.rerun import Rerun

from . import _toys


def _flaky(ctx):
    """A map = the image's mean over channels; refuses any image that is all white."""
    white = ctx.images.flatten(1).amin(1) >= 1.0
    if white.any():
        raise RuntimeError(f"white image at {white.nonzero().flatten().tolist()}")
    return ctx.images.mean(1), {"constant": torch.zeros(len(ctx.images), dtype=torch.bool)}


def _again(batch):
    """The re-run map's mean absolute difference to the given map, and a value that needs no re-run."""
    again = batch.rerun(batch.images, batch.targets)
    return {"_again": (again - batch.maps).abs().flatten(1).mean(1).double(),
            "_count": torch.full((len(batch.maps),), float(batch.rerun.calls), dtype=torch.float64)}


@pytest.fixture(scope="module", autouse=True)
def registered():
    register("_flaky", name="Flaky", family="reference", rank=998)(_flaky)
    register_group("_again", fields=(PerImage("_again", "float64", "test"), PerImage("_count", "float64", "test")),
                   metrics=(), calls_method=True)(_again)
    yield
    del REGISTRY["_flaky"], GROUPS["_again"]
    assert not any(m.startswith("_") for m in METRICS)


@pytest.fixture(scope="module")
def toy():
    return _toys.cnn_bundle(dtype=torch.float32), _toys.images(3, seed=5, dtype=torch.float32), _toys.targets(3)


def test_the_group_gets_the_method_with_its_options(toy):
    bundle, x, t = toy
    maps = x.mean(1)
    out = compute(bundle, x, t, maps, which={"_again": {}, "classification": {}}, method="_flaky")
    assert out["_again"].tolist() == [0.0, 0.0, 0.0] and out["_count"].tolist() == [3.0] * 3
    assert torch.isfinite(out["o"]).all()


def test_a_failure_on_one_image_costs_only_that_images_values(toy):
    bundle, x, t = toy
    x = x.clone()
    x[1] = 1.0
    errors = {}
    out = compute(bundle, x, t, x.mean(1), which={"_again": {}, "classification": {}}, method="_flaky", errors=errors)
    assert out["_again"][0] == 0 and out["_again"][2] == 0 and torch.isnan(out["_again"][1])
    assert torch.isfinite(out["o"]).all()  # the other groups of the same row are untouched
    assert errors["_again"][0] is None and errors["_again"][2] is None
    assert errors["_again"][1].startswith("_flaky re-run failed: RuntimeError: white image")


def test_a_group_that_reruns_needs_the_method(toy):
    bundle, x, t = toy
    with pytest.raises(ValueError, match=r"run the method again: pass method="):
        compute(bundle, x, t, x.mean(1), which={"_again": {}})


def test_rerun_takes_another_bundle(toy):
    bundle, x, t = toy
    calls = []
    rerun = Rerun(bundle, "gradcam")
    other = _toys.cnn_bundle(seed=1, dtype=torch.float32)
    other.model.register_forward_hook(lambda *a: calls.append(1))
    a, b = rerun(x, t), rerun(x, t, bundle=other)
    assert calls and not torch.allclose(a, b) and rerun.calls == 6 and not rerun.failures


def test_the_job_writes_the_reason_beside_the_values():
    """The row keeps its other metrics and no `error`; `metric_error` says which group and why."""
    from pipeline.evaluate import Evaluator
    from pipeline.schema import SAMPLES
    from tests._samples import TOY_MODEL, photo_rows

    first = []

    def second_photo_fails_on_rerun(ctx):  # the job's own call succeeds; re-runs refuse photo 2
        if not first:
            first.append(ctx.images.detach().clone())
        elif any(torch.equal(img, first[0][1]) for img in ctx.images):
            raise RuntimeError("cannot explain photo 2 again")
        return ctx.images.mean(1), {"constant": torch.zeros(len(ctx.images), dtype=torch.bool)}

    register("_once", name="Once", family="reference", rank=997)(second_photo_fails_on_rerun)
    try:
        ev = Evaluator(run_id="r", dataset="toy", model=TOY_MODEL, methods={"_once": {}},
                       metrics={"classification": {}, "_again": {}}, device="cpu")
        table = ev(pa.Table.from_pylist(photo_rows(2), schema=SAMPLES)).to_pylist()
    finally:
        del REGISTRY["_once"]
    assert [r["error"] for r in table] == [None, None]
    assert [r["metric_error"] for r in table] == [
        None, "_again: _once re-run failed: RuntimeError: cannot explain photo 2 again"]
    assert all(r["o"] == r["o"] for r in table)  # (the group's own columns exist only for registered groups
    # at import time; its NaN is checked above on compute)


def test_groups_that_rerun_the_method_are_asked_for_by_name(toy):
    """They multiply a run's cost (Max-Sensitivity ×10): neither compute's nor the run config's
    default includes them."""
    from opticam_core.metrics import default_groups
    from pipeline.config import load_config
    from tests._samples import toy_config

    assert {"sensitivity", "adcc", "sanity", "_again"}.isdisjoint(default_groups())
    assert {"classification", "insertion_deletion", "localization", "box_study"} <= set(default_groups())
    bundle, x, t = toy
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear")  # AOPC's 14-px patches
    out = compute(bundle, x, t, x.mean(1), which=None)  # no method= needed
    assert "o" in out and "_again" not in out and "max_sensitivity" not in out
    spec = toy_config("samples", "out", methods={"gradcam": {}})
    spec.pop("metrics", None)
    assert list(load_config(spec, run_id="r").metrics) == default_groups()


def test_reruns_use_the_class_the_maps_were_made_for(toy):
    """Maps for another class (Table A.9): a re-run makes its maps for that class too, while
    the metrics' own class stays the label."""
    bundle, x, t = toy
    other = (t + 1) % 5
    seen = {}

    def spy(batch):
        seen["made_for"], seen["targets"] = batch.made_for.clone(), batch.targets.clone()
        return {}

    register_group("_spy", fields=(), metrics=(), calls_method=True)(spy)
    try:
        compute(bundle, x, t, x.mean(1), which=["_spy"], method="gradcam", map_targets=other)
        assert torch.equal(seen["made_for"], other) and torch.equal(seen["targets"], t)
        compute(bundle, x, t, x.mean(1), which=["_spy"], method="gradcam")
        assert torch.equal(seen["made_for"], t)
        with pytest.raises(ValueError, match="map_targets"):
            compute(bundle, x, t, x.mean(1), which=["_spy"], method="gradcam", map_targets=other[:2])
    finally:
        del GROUPS["_spy"]
