"""GradientSHAP against Captum's `GradientShap` on real weights and real photos, against closed
forms on toys, and its options refused at validation.

Parity: Captum draws the baseline indices and α from numpy's global RNG and the noise from torch's,
for every (image, sample); we draw them once per batch from our own generator (the module's
docstring says why). So Captum runs on one photo at a time from a known seed, and the test
replays Captum's draws from that seed, in Captum's order, and hands them to ours: the same
pixel-space model (the bundle's, normalisation inside), the same baselines, the same draws, so
the attributions must agree to float32 rounding before any reduction to a map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from opticam_core import explain, wrap_model
from opticam_core.maps import normalize
from opticam_core.methods import gradshap as gs_module
from opticam_core.methods.gradshap import attributions, draw, reduce
from opticam_core.options import OptionsError

from . import _toys
from ._peers import require

PHOTOS = ("chelsea", "coffee", "astronaut")


def captum_draws(seed: int, n: int, k: int, stdevs: float, shape):
    """Captum 0.9's draws for one image and n samples, in its order: baseline indices
    (np.random.choice, `_expand_and_update_baselines`), noise (torch.normal,
    `NoiseTunnel._add_noise_to_input`), α (np.random.uniform, `InputBaselineXGradient`)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    index = np.random.choice(k, n).tolist()
    noise = torch.normal(0, torch.tensor(stdevs).repeat((n, *shape)))
    alpha = torch.tensor(np.random.uniform(0.0, 1.0, n), dtype=torch.float32)
    return index, noise, alpha


def captum_per_photo(attr, model, x, targets, baselines, n, stdevs, seed):
    gs = attr.GradientShap(model)
    out = []
    for i in range(len(x)):
        np.random.seed(seed)
        torch.manual_seed(seed)
        out.append(gs.attribute(x[i:i + 1], baselines=baselines, n_samples=n, stdevs=stdevs, target=int(targets[i])))
    return torch.cat(out)


@pytest.fixture(scope="module")
def real():
    return _toys.lite0_on_photos(PHOTOS)


def report(ours, theirs, what):
    diff = (ours - theirs).abs()
    scale = theirs.abs().max()
    big = theirs.abs() > 0.01 * scale
    rel = (diff[big] / theirs.abs()[big]).max()
    print(f"{what}: max |Δ| {diff.max():.2e} (max |φ| {scale:.3f}, relative to it {diff.max() / scale:.2e}); "
          f"max relative Δ where |φ| > 1% of max: {rel:.2e}")


@pytest.mark.parametrize("k, stdevs", [(1, 0.0), (4, 0.1)], ids=["black-no-noise", "4-baselines-noise"])
def test_attributions_equal_captum_on_real_weights_and_photos(real, k, stdevs):
    """Lite0's ImageNet weights, three scikit-image photos, their predicted classes, n_samples 5:
    the default setting (one black baseline, no noise) and a distribution of four random
    baselines with noise, which exercises Captum's index and noise draws."""
    attr = require("captum.attr")

    bundle, x, targets = real
    n, seed = 5, 7
    shape = tuple(x.shape[1:])
    baselines = torch.zeros(1, *shape) if k == 1 else torch.rand(k, *shape, generator=torch.Generator().manual_seed(1))
    theirs = captum_per_photo(attr, bundle.model, x, targets, baselines, n, stdevs, seed)
    index, noise, alpha = captum_draws(seed, n, k, stdevs, shape)
    # chunk 4 over 3 × 5 pairs: chunks straddle photos
    ours = attributions(bundle.model, x, targets, baselines[index], alpha, noise if stdevs else None, chunk=4)
    report(ours, theirs, f"{k} baseline(s), stdevs {stdevs}")
    torch.testing.assert_close(ours, theirs, atol=1e-6 * float(theirs.abs().max()), rtol=1e-4)


def test_explain_is_captum_reduced_then_min_max(real, monkeypatch):
    """The whole method: with Captum's draws in place of ours, `explain`'s default maps are
    Captum's attributions, |Σ_c φ_c|, min–max normalised."""
    attr = require("captum.attr")

    bundle, x, targets = real
    seed, shape = 3, tuple(x.shape[1:])
    index, _, alpha = captum_draws(seed, 5, 1, 0.0, shape)

    def replay(shape_, *, n_samples, **_):
        return torch.zeros(n_samples, *shape_), alpha, None

    monkeypatch.setattr(gs_module, "draw", replay)
    res = explain(bundle, x, targets, "gradshap")
    theirs = captum_per_photo(attr, bundle.model, x, targets, torch.zeros(1, *shape), 5, 0.0, seed)
    expected = normalize(theirs.sum(1).abs())
    assert res.maps.shape == (3, 224, 224) and not res.extras["constant"].any()
    torch.testing.assert_close(res.maps, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Closed forms on toys (float64): a linear and a separable quadratic logit in pixel space


SIZE, CLASSES = 6, 3
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


class Einsum(nn.Module):
    """Logits from the (normalised) input z: Σ w_k ⊙ z (linear) or ½ Σ w_k ⊙ z² (quadratic)."""

    def __init__(self, w: torch.Tensor, quadratic: bool):
        super().__init__()
        self.body = nn.Identity()
        self.w = nn.Parameter(w)
        self.quadratic = quadratic

    def forward(self, z):
        z = self.body(z)
        return 0.5 * torch.einsum("bchw,kchw->bk", z * z, self.w) if self.quadratic else \
            torch.einsum("bchw,kchw->bk", z, self.w)


def toy(quadratic=False, normalised=True, signs=False):
    w = torch.rand(CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    if signs:  # channels of opposite sign: |Σ_c|, Σ_c|·|, relu(Σ_c) and Σ_c then all differ
        w[:, 1] *= -1.5
    mean, std = (MEAN, STD) if normalised else ((0.0,) * 3, (1.0,) * 3)
    bundle = wrap_model(Einsum(w, quadratic), "body", name="toy", mean=mean, std=std, prefix_tokens=None,
                        tail=None, input_size=(SIZE, SIZE), resize=SIZE)
    return bundle, w


def toy_images(n=3):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def pixel_weights(bundle, w, targets):
    """∂y/∂x of the linear toy in pixel space: w / std (the bundle normalises inside; its std
    was stored in float32)."""
    return w[targets] / bundle.model.std


@pytest.mark.parametrize("baselines", ["black", "mean", "uniform"])
@pytest.mark.parametrize("stdevs", [0.0, 0.2])
def test_linear_model_closed_form(baselines, stdevs):
    """A linear logit has the same gradient w everywhere, so φ = w ⊙ mean_s(x + ε_s − b_s),
    whatever α: with one black baseline and no noise exactly w ⊙ x. The gradient is taken with
    respect to pixels (w / std), the noisy input is the one multiplied."""
    bundle, w = toy()
    x, t = toy_images(), torch.tensor([0, 2, 1])
    base, alpha, noise = draw((3, SIZE, SIZE), n_samples=7, baselines=baselines, n_baselines=4, stdevs=stdevs,
                              seed=1, mean=torch.tensor(MEAN), dtype=torch.float64)
    phi = attributions(bundle.model, x, t, base, alpha, noise, chunk=5)
    shift = base.mean(0) - (noise.mean(0) if noise is not None else 0)
    torch.testing.assert_close(phi, pixel_weights(bundle, w, t) * (x - shift), atol=1e-12, rtol=1e-10)
    if baselines == "black" and stdevs == 0:
        torch.testing.assert_close(phi, pixel_weights(bundle, w, t) * x, atol=1e-12, rtol=1e-10)
    if baselines == "mean":
        assert torch.equal(base, torch.tensor(MEAN).double().view(1, 3, 1, 1).expand_as(base))


def test_quadratic_model_closed_form_and_shapley_value():
    """y = ½ Σ q ⊙ x²: the gradient at p = αx + (1 − α)b is q ⊙ p, so with the drawn α
    φ = q ⊙ (x − b) ⊙ mean_s(α_s x + (1 − α_s) b) exactly (a swapped α or a gradient taken at x
    fails this); over many α it tends to the Shapley value q/2 ⊙ (x² − b²), and Σφ → y(x) − y(b)."""
    bundle, q = toy(quadratic=True, normalised=False)
    x, t = toy_images(), torch.tensor([1, 0, 2])
    base, alpha, _ = draw((3, SIZE, SIZE), n_samples=5, baselines="uniform", n_baselines=1, seed=4,
                          dtype=torch.float64)
    b = base[0]
    phi = attributions(bundle.model, x, t, base, alpha, chunk=4)
    a = alpha.view(-1, 1, 1, 1, 1)
    exact = (q[t] * (a * x + (1 - a) * b) * (x - b)).mean(0)
    torch.testing.assert_close(phi, exact, atol=1e-12, rtol=1e-10)

    base, alpha, _ = draw((3, SIZE, SIZE), n_samples=4000, baselines="black", seed=4, dtype=torch.float64)
    phi = attributions(bundle.model, x, t, base, alpha, chunk=4000)
    torch.testing.assert_close(phi, 0.5 * q[t] * x * x, rtol=0.03, atol=0)
    with torch.no_grad():
        gain = bundle.model(x).gather(1, t[:, None])[:, 0] - bundle.model(torch.zeros_like(x))[:, 0]
    torch.testing.assert_close(phi.sum((1, 2, 3)), gain, rtol=0.03, atol=0)


@pytest.mark.parametrize("reduction", ["abs_of_sum", "sum_of_abs", "positive", "sum"])
def test_reductions_on_the_linear_closed_form(reduction):
    bundle, w = toy(signs=True)
    x, t = toy_images(), torch.tensor([0, 1, 2])
    phi = pixel_weights(bundle, w, t) * x  # black baseline, no noise: exact
    raw = {"abs_of_sum": phi.sum(1).abs(), "sum_of_abs": phi.abs().sum(1),
           "positive": phi.sum(1).clamp_min(0), "sum": phi.sum(1)}[reduction]
    res = explain(bundle, x, t, "gradshap", reduction=reduction)
    torch.testing.assert_close(res.maps, normalize(raw), atol=1e-12, rtol=0)
    assert res.maps.min() == 0 and res.maps.max() == 1 and not res.extras["constant"].any()
    others = [r for r in ("abs_of_sum", "sum_of_abs", "positive", "sum") if r != reduction]
    for other in others:  # the four really differ on this model
        assert (normalize(reduce(phi, other)) - res.maps).abs().max() > 1e-3, other


def test_batch_independent_and_seeded():
    """The draws are shared by the batch's images: each image's map is the one it gets alone.
    The seed fixes them; another seed changes the map of a network whose gradient varies."""
    bundle = _toys.cnn_bundle()
    x, t = _toys.images(3, seed=2), _toys.targets(3, seed=2)
    opts = dict(baselines="uniform", n_baselines=3, stdevs=0.05)
    whole = explain(bundle, x, t, "gradshap", batch_size=4, **opts).maps
    for i in range(3):
        one = explain(bundle, x[i:i + 1], t[i:i + 1], "gradshap", **opts).maps
        torch.testing.assert_close(whole[i:i + 1], one, atol=1e-12, rtol=0)
    assert torch.equal(whole, explain(bundle, x, t, "gradshap", **opts).maps)
    assert (whole - explain(bundle, x, t, "gradshap", seed=1, **opts).maps).abs().max() > 1e-3


def test_draws():
    base, alpha, noise = draw((3, 8, 8), n_samples=500, baselines="uniform", n_baselines=4, stdevs=0.3, seed=0)
    assert base.shape == noise.shape == (500, 3, 8, 8) and alpha.shape == (500,)
    assert 0 <= alpha.min() and alpha.max() < 1 and abs(alpha.mean() - 0.5) < 0.05
    assert len(torch.unique(base.flatten(1), dim=0)) == 4  # with replacement from 4 baselines
    assert 0 <= base.min() and base.max() <= 1
    assert abs(noise.std() - 0.3) < 0.01 and abs(noise.mean()) < 0.01
    again = draw((3, 8, 8), n_samples=500, baselines="uniform", n_baselines=4, stdevs=0.3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((base, alpha, noise), again))
    assert draw((3, 8, 8), n_samples=5, stdevs=0.0)[2] is None


# --------------------------------------------------------------------------------------------
# Bad options: refused at validation, before the network runs


@pytest.mark.parametrize("options, expected", [
    ({"stdevs": -0.1}, "gradshap.stdevs: Input should be greater than or equal to 0, got -0.1 (allowed: number ≥ 0)"),
    ({"n_samples": 0}, "gradshap.n_samples: Input should be greater than or equal to 1, got 0"),
    ({"n_baselines": 0}, "gradshap.n_baselines: Input should be greater than or equal to 1"),
    ({"baselines": "white"}, "gradshap.baselines: Input should be 'black', 'mean' or 'uniform', got 'white'"),
    ({"reduction": "abs"}, "gradshap.reduction: Input should be 'abs_of_sum', 'sum_of_abs', 'positive' or 'sum'"),
    ({"seed": -1}, "gradshap.seed: Input should be greater than or equal to 0"),
    ({"batch_size": 0}, "gradshap.batch_size: Input should be greater than or equal to 1"),
])
def test_bad_options_fail_at_validation(options, expected):
    bundle = _toys.cnn_bundle()
    counting = _toys.Counting(bundle.model)
    bundle.model = counting
    with pytest.raises(OptionsError) as info:
        explain(bundle, _toys.images(2), _toys.targets(2), "gradshap", **options)
    assert expected in str(info.value), str(info.value)
    assert counting.calls == 0


def test_negative_stdevs_fail_at_the_run_config_check():
    from pipeline.config import ConfigError, load_config

    config = {"output": "/tmp/out", "datasets": [{"name": "d", "uri": "/data/d"}],
              "models": [{"name": "efficientnet_lite0"}], "methods": {"gradshap": {"stdevs": -1.0}},
              "metrics": ["classification"]}
    with pytest.raises(ConfigError, match=r"methods\.gradshap\.stdevs: Input should be greater than or equal to 0"):
        load_config(config)
    assert load_config({**config, "methods": {"gradshap": {"stdevs": 0.1}}}).methods["gradshap"]["stdevs"] == 0.1
