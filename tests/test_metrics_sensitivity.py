"""Max-Sensitivity: Quantus 0.6 `MaxSensitivity` (its defaults, 10 samples, noise U(−0.2, 0.2)),
the method re-run on all noisy copies in one call. Proven against Quantus itself with the same
noise draws (real EfficientNet-Lite0 weights, real photos, Grad-CAM), and on closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opticam_core import explain, load_model
from opticam_core.methods import REGISTRY
from opticam_core.methods.registry import register
from opticam_core.metrics import GROUPS, aggregate, compute, group_options
from opticam_core.metrics.rerun import Rerun
from opticam_core.metrics.sensitivity import max_sensitivity, sensitivity_noise
from opticam_core.options import OptionsError

from . import _toys
from ._peers import require


def _linear(ctx):
    """Φ(x) = the channel mean of x: linear in x, so MS has a closed form."""
    return ctx.images.mean(1), {"constant": torch.zeros(len(ctx.images), dtype=torch.bool, device=ctx.device)}


@pytest.fixture(scope="module", autouse=True)
def registered():
    register("_linear", name="Linear", family="reference", rank=996)(_linear)
    yield
    del REGISTRY["_linear"]


@pytest.fixture(scope="module")
def toy():
    return _toys.cnn_bundle(dtype=torch.float32), _toys.images(3, seed=3, dtype=torch.float32), _toys.targets(3)


def _closed_form(x, noise, numerator="fro", denominator="fro", clip=False):
    """maxₛ ‖mean_c(x) − mean_c(x + εₛ)‖ / ‖mean_c(x)‖ per image, float64."""
    x64 = x.double()
    noisy = x64[None] + noise.to(torch.float32).double()
    noisy = noisy.clamp(0, 1) if clip else noisy
    diff = (x64.mean(1)[None] - noisy.mean(2)).flatten(2)
    base = x64.mean(1).flatten(1)
    norm = {"fro": lambda t: t.norm(dim=-1), "linf": lambda t: t.abs().amax(-1)}
    return (norm[numerator](diff) / norm[denominator](base)[None]).amax(0)


def test_an_input_independent_map_has_zero_sensitivity(toy):
    bundle, x, t = toy
    maps = explain(bundle, x, t, "fakecam").maps
    out = compute(bundle, x, t, maps, which={"sensitivity": {}}, method="fakecam")
    assert out["max_sensitivity"].dtype == torch.float64 and out["max_sensitivity"].tolist() == [0.0] * 3


@pytest.mark.parametrize("numerator,denominator,clip", [("fro", "fro", False), ("linf", "fro", False),
                                                        ("fro", "linf", True)])
def test_a_linear_map_matches_its_closed_form(toy, numerator, denominator, clip):
    bundle, x, t = toy
    opts = {"samples": 4, "lower_bound": 0.3, "seed": 5, "norm_numerator": numerator,
            "norm_denominator": denominator, "clip": clip}
    out = compute(bundle, x, t, x.mean(1), which={"sensitivity": opts}, method="_linear")
    noise = sensitivity_noise(x, samples=4, lower_bound=0.3, seed=5)
    want = _closed_form(x, noise, numerator, denominator, clip)
    torch.testing.assert_close(out["max_sensitivity"], want, rtol=1e-5, atol=0)


def test_noise_is_uniform_in_bounds_and_depends_only_on_the_image_and_seed(toy):
    _, x, _ = toy
    torch.manual_seed(123)
    a = sensitivity_noise(x, samples=10, lower_bound=0.2, seed=0)
    torch.manual_seed(999)
    np.random.seed(1)
    b = sensitivity_noise(x[[2, 0]], samples=10, lower_bound=0.2, seed=0)  # other batch, other order
    assert a.shape == (10, 3, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a[:, 2], b[:, 0]) and torch.equal(a[:, 0], b[:, 1])
    assert a.abs().max() <= 0.2 and a.abs().max() > 0.19 and abs(float(a.mean())) < 0.01
    assert abs(float(a.var()) - 0.4 ** 2 / 12) < 1e-3  # U(−0.2, 0.2)
    assert not torch.equal(a, sensitivity_noise(x, samples=10, lower_bound=0.2, seed=1))
    assert not torch.equal(a[:, 0], a[:, 1]) and not torch.equal(a[0], a[1])


def test_the_value_does_not_depend_on_the_batch(toy):
    bundle, x, t = toy
    maps = explain(bundle, x, t, "gradcam").maps
    whole = compute(bundle, x, t, maps, which={"sensitivity": {"samples": 3}}, method="gradcam")["max_sensitivity"]
    alone = compute(bundle, x[1:2], t[1:2], maps[1:2], which={"sensitivity": {"samples": 3}},
                    method="gradcam")["max_sensitivity"]
    chunked = compute(bundle, x, t, maps, which={"sensitivity": {"samples": 3, "batch_size": 2}},
                      method="gradcam")["max_sensitivity"]
    assert torch.isfinite(whole).all() and (whole > 0).all()
    torch.testing.assert_close(alone[0], whole[1])
    torch.testing.assert_close(chunked, whole)


def test_copies_go_through_the_rerun_in_chunks_of_batch_size(toy):
    bundle, x, t = toy
    calls = []

    def rerun(images, targets, *, unbounded):
        calls.append((len(images), unbounded, targets.tolist()))
        return images.mean(1)

    max_sensitivity(rerun, x, x.mean(1), t, samples=10, batch_size=30)
    assert calls == [(30, True, t.tolist() * 10)]
    calls.clear()
    max_sensitivity(rerun, x, x.mean(1), t, samples=2)  # CPU default: one draw of every image per call
    assert calls == [(3, True, t.tolist())] * 2
    calls.clear()
    max_sensitivity(rerun, x, x.mean(1), t, samples=2, clip=True, batch_size=4)
    assert calls == [(4, False, t.tolist() + t.tolist()[:1]), (2, False, t.tolist()[1:])]


def test_zero_maps_and_failed_copies():
    x = _toys.images(2, dtype=torch.float32)
    t = torch.tensor([0, 1])
    zeros = torch.zeros(2, 32, 32)

    def same(images, targets, *, unbounded):
        return torch.zeros(len(images), 32, 32)

    def ones(images, targets, *, unbounded):
        return torch.ones(len(images), 32, 32)

    def fails_on_image_1_copy_2(images, targets, *, unbounded):
        out = images.mean(1)
        out[2 * 2 + 1] = float("nan")
        return out

    assert torch.isnan(max_sensitivity(same, x, zeros, t, samples=3)).all()  # 0/0 in every draw (Quantus: NaN)
    assert max_sensitivity(ones, x, zeros, t, samples=3).tolist() == [math.inf, math.inf]
    ms = max_sensitivity(fails_on_image_1_copy_2, x, x.mean(1), t, samples=3, batch_size=6)
    assert torch.isfinite(ms[0]) and torch.isnan(ms[1])


def test_bad_options_name_the_option():
    with pytest.raises(OptionsError, match=r"metrics\.sensitivity\.samples"):
        group_options({"sensitivity": {"samples": 0}})
    with pytest.raises(OptionsError, match=r"metrics\.sensitivity\.lower_bound"):
        group_options({"sensitivity": {"lower_bound": -0.1}})
    with pytest.raises(OptionsError, match=r"metrics\.sensitivity\.norm_numerator"):
        group_options({"sensitivity": {"norm_numerator": "l1"}})


def test_cost_and_aggregate():
    assert GROUPS["sensitivity"].cost_of({"samples": 7}).reruns == 7
    assert GROUPS["sensitivity"].calls_method
    values = {"max_sensitivity": [0.5, 1.5, math.inf, math.nan], "error": [None, None, None, None]}
    ms = aggregate(values)["MS"]
    assert ms.value == 1.0 and ms.n == 2 and ms.excluded == 2  # not ×100; ∞ and NaN left out
    w = np.array([[2, 0, 0, 0], [1, 1, 1, 1]], dtype=float)
    assert aggregate(values, weights=w)["MS"].value.tolist() == [0.5, 1.0]
    assert math.isnan(aggregate({"p": [0.5]})["MS"].value)


# ---------------------------------------------------------------------------------------------
# Parity with Quantus on the same noise draws


def _quantus_ms(quantus, monkeypatch, bundle, x, t, maps, noise, method, **kwargs):
    """Quantus MaxSensitivity with the paper's settings, its numpy draws replaced by `noise`."""
    S, B = noise.shape[:2]
    drawn = []

    def uniform(low, high, size):
        assert (low, high, size) == (-0.2, 0.2, (B, x[0].numel()))  # Quantus's own call, its own bounds
        drawn.append(1)
        return noise[len(drawn) - 1].reshape(B, -1).double().numpy()

    def explain_func(model, inputs, targets, **_):
        return explain(bundle, torch.from_numpy(np.asarray(inputs, dtype=np.float32)), torch.as_tensor(targets),
                       method, unbounded=True).maps.numpy()

    monkeypatch.setattr(np.random, "uniform", uniform)
    metric = quantus.MaxSensitivity(nr_samples=S, lower_bound=0.2, disable_warnings=True, **kwargs)
    got = metric(model=bundle.model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=maps.numpy(),
                 explain_func=explain_func, device="cpu")
    assert len(drawn) == S
    return torch.tensor(np.asarray(got, dtype=np.float64))


def test_quantus_parity_on_a_toy_with_linf(toy, monkeypatch):
    quantus = require("quantus")
    bundle, x, t = toy
    maps = explain(bundle, x, t, "gradcampp").maps
    noise = sensitivity_noise(x, samples=4, lower_bound=0.2, seed=2)
    ours = max_sensitivity(Rerun(bundle, "gradcampp"), x, maps, t, samples=4, seed=2, norm_numerator="linf")
    theirs = _quantus_ms(quantus, monkeypatch, bundle, x, t, maps, noise, "gradcampp",
                         norm_numerator=quantus.functions.norm_func.linf_norm)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_quantus_parity_on_real_weights_and_photos(monkeypatch):
    quantus = require("quantus")
    require("skimage.data")
    bundle = load_model("efficientnet_lite0")
    x = torch.cat([_toys.skimage_photo(n) for n in ("chelsea", "coffee")])
    t = torch.tensor([281, 967])
    maps = explain(bundle, x, t, "gradcam").maps
    ours = compute(bundle, x, t, maps, which={"sensitivity": {}}, method="gradcam")["max_sensitivity"]
    noise = sensitivity_noise(x, samples=10, lower_bound=0.2, seed=0)
    assert (x[None] + noise).min() < -0.1 and (x[None] + noise).max() > 1.1  # unclipped, as in Quantus
    theirs = _quantus_ms(quantus, monkeypatch, bundle, x, t, maps, noise, "gradcam")
    assert (ours > 0.01).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
