"""LIME (`lime`): the official `lime` package's `LimeImageExplainer`, reproduced and batched.

- Parity on real weights and real photos: EfficientNet-Lite0, three `skimage.data` photos at
  224×224, lime's defaults but fewer samples, the same seed: the same superpixels, and the same
  superpixel weights (allclose; corr ≥ 0.99 per image is the issue's bar).
- The formula on a toy whose output is a known function of which superpixels are shown: a linear
  one is recovered, and with an interaction the weights are sklearn's weighted Ridge under lime's
  kernel, which a wrong kernel would miss.
- Feature selection (num_features below the superpixel count) and hide_color against lime.
- Batches: an image's weights do not depend on the images beside it (padded superpixel counts).
- Bad options fail at validation, before any forward, in `explain` and in a run config.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from opticam_core import explain
from opticam_core.models import wrap_model
from opticam_core.options import OptionsError
from pipeline.config import ConfigError, load_config

from . import _toys
from ._peers import require

lime = require("lime")
from lime import lime_base, lime_image  # noqa: E402

SEED = 3
PHOTOS = ("chelsea", "coffee", "astronaut")
REAL_SAMPLES = 64


def superpixel_weights(expl, i: int) -> np.ndarray:
    """Image i's weight per superpixel, read back from the painted `lime_weights`."""
    segments = expl.extras["lime_segments"][i].numpy()
    painted = expl.extras["lime_weights"][i].numpy()
    F = int(expl.extras["lime_superpixels"][i])
    first = np.array([np.flatnonzero(segments.ravel() == f)[0] for f in range(F)])
    return painted.ravel()[first]


def theirs_weights(exp, label: int, F: int) -> np.ndarray:
    out = np.zeros(F)
    for f, w in exp.local_exp[label]:
        out[f] = w
    return out


def lime_explain(bundle, image_chw: torch.Tensor, label: int, **kwargs):
    """lime_image as a user calls it on one image: H×W×3 in [0,1], softmax probabilities out."""

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(image_chw.dtype)
            return torch.softmax(bundle.model(x), dim=1).numpy()

    explainer = lime_image.LimeImageExplainer(random_state=SEED)
    return explainer.explain_instance(image_chw.permute(1, 2, 0).numpy(), classifier_fn, labels=(label,),
                                      top_labels=None, **kwargs)


# --------------------------------------------------------------------------------------------
# Real weights, real photos


@pytest.fixture(scope="module")
def lite0_photos():
    return _toys.lite0_on_photos(PHOTOS)


def test_parity_with_lime_on_real_weights_and_photos(lite0_photos):
    bundle, x, labels = lite0_photos
    ours = explain(bundle, x, labels, "lime", num_samples=REAL_SAMPLES, random_state=SEED)
    corrs, diffs = [], []
    for i, name in enumerate(PHOTOS):
        exp = lime_explain(bundle, x[i], int(labels[i]), num_samples=REAL_SAMPLES)
        np.testing.assert_array_equal(ours.extras["lime_segments"][i].numpy(), exp.segments, err_msg=name)
        F = int(exp.segments.max()) + 1
        assert ours.extras["lime_superpixels"][i] == F
        mine, theirs = superpixel_weights(ours, i), theirs_weights(exp, int(labels[i]), F)
        corrs.append(np.corrcoef(mine, theirs)[0, 1])
        diffs.append(np.abs(mine - theirs).max())
        print(f"{name}: {F} superpixels, corr {corrs[-1]:.10f}, max |Δw| {diffs[-1]:.2e} "
              f"(max |w| {np.abs(theirs).max():.3f}), R² ours {ours.extras['lime_score'][i]:.6f} lime {exp.score:.6f}")
        # float32 forwards in other batch compositions: agreement to float32 noise, not bits
        np.testing.assert_allclose(mine, theirs, atol=1e-5 * max(1.0, np.abs(theirs).max()), err_msg=name)
        assert ours.extras["lime_score"][i].item() == pytest.approx(exp.score, abs=1e-5)
    print(f"min corr {min(corrs):.10f} (1 − corr {1 - min(corrs):.1e}), max |Δw| {max(diffs):.2e}")
    assert min(corrs) >= 0.99
    maps = ours.maps
    assert maps.shape == (3, 224, 224) and maps.min() >= 0 and maps.max() <= 1
    assert not ours.extras["constant"].any()
    # the map is the positive weights painted on their superpixels, min–max normalised
    positive = ours.extras["lime_weights"].clamp_min(0)
    lo, hi = positive.flatten(1).amin(1), positive.flatten(1).amax(1)
    torch.testing.assert_close(maps, ((positive - lo[:, None, None]) / (hi - lo)[:, None, None]).float())


# --------------------------------------------------------------------------------------------
# The formula, on a toy whose output is a known function of the shown superpixels


def toy_photo(name: str, size: int = 64) -> torch.Tensor:
    """A real photo at size×size, lifted to [0.2, 1] so that every superpixel has some light."""
    return _toys.skimage_photo(name, size=size, resize=size).double() * 0.8 + 0.2


#: Superpixels small enough for ~12–16 of them on a 64×64 photo.
TOY_SEGMENTATION = {"quickshift_kernel_size": 2}


def quickshift_labels(x: torch.Tensor) -> np.ndarray:
    from skimage.segmentation import quickshift

    return quickshift(x[0].permute(1, 2, 0).numpy(), kernel_size=2, max_dist=200, ratio=0.2)


class ShownSuperpixels(nn.Module):
    """Output 0 = Σ_f a_f z_f + γ z_p z_q, where z_f is 1 when superpixel f of `image` is shown and
    0 when it is black: z_f is a linear readout of the image, its pixels' sum over their sum in
    `image`. Outputs 1 and 2 are zero."""

    def __init__(self, image: torch.Tensor, segments: np.ndarray, a: np.ndarray, gamma: float = 0.0, pair=(0, 1)):
        super().__init__()
        onehot = torch.nn.functional.one_hot(torch.from_numpy(segments).flatten().long(), len(a)).T.double()
        readout = onehot.repeat(1, 3)                          # F × (3·H·W), channel-major like flatten
        readout = readout / (readout @ image.flatten())[:, None]
        self.register_buffer("readout", readout)
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float64))
        self.gamma, self.pair = gamma, pair
        self.pixels = nn.Identity()

    def forward(self, x):
        z = self.pixels(x).flatten(1) @ self.readout.T
        out = z @ self.a + self.gamma * z[:, self.pair[0]] * z[:, self.pair[1]]
        return torch.stack([out, torch.zeros_like(out), torch.zeros_like(out)], 1)


def toy_bundle(net: nn.Module, size: int = 64):
    return wrap_model(net.eval(), "pixels", name="shown_superpixels", mean=(0, 0, 0), std=(1, 1, 1),
                      prefix_tokens=None, tail=None, input_size=(size, size), resize=size)


def lime_samples(F: int, num_samples: int, seed: int) -> np.ndarray:
    """lime_image's on/off rows, written out from its source: a fresh RandomState, the
    segmentation seed drawn first, then the bits, row 0 all on."""
    rs = np.random.RandomState(seed)
    rs.randint(0, high=1000)
    bits = rs.randint(0, 2, num_samples * F).reshape(num_samples, F)
    bits[0] = 1
    return bits


@pytest.fixture(scope="module")
def coffee():
    x = toy_photo("coffee")
    segments = quickshift_labels(x)
    F = int(segments.max()) + 1
    assert F >= 10, F  # enough superpixels for the selections below to choose
    a = np.random.default_rng(0).normal(size=F)
    return x, segments, a


def test_a_linear_function_of_the_superpixels_is_recovered(coffee):
    x, segments, a = coffee
    bundle = toy_bundle(ShownSuperpixels(x[0], segments, a))
    res = explain(bundle, x, [0], "lime", num_samples=300, hide_color=0.0, output="logit", ridge_alpha=1e-9,
                  **TOY_SEGMENTATION)
    np.testing.assert_array_equal(res.extras["lime_segments"][0].numpy(), segments)
    np.testing.assert_allclose(superpixel_weights(res, 0), a, atol=1e-6)
    assert res.extras["lime_score"].item() == pytest.approx(1.0, abs=1e-9)


def test_kernel_and_ridge_are_limes(coffee):
    """With an interaction the fit is no longer exact, so the weights depend on the kernel and
    the ridge: they must be sklearn's Ridge(alpha=1) under sqrt(exp(−d²/0.25²)) of the cosine
    distance, and are far from what a kernel without the square root would give."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import pairwise_distances

    x, segments, a = coffee
    gamma, N = 3.0, 400
    bundle = toy_bundle(ShownSuperpixels(x[0], segments, a, gamma=gamma))
    res = explain(bundle, x, [0], "lime", num_samples=N, hide_color=0.0, output="logit", random_state=SEED,
                  **TOY_SEGMENTATION)
    ours = superpixel_weights(res, 0)

    bits = lime_samples(len(a), N, SEED)
    y = bits @ a + gamma * bits[:, 0] * bits[:, 1]
    d = pairwise_distances(bits, bits[:1], metric="cosine").ravel()

    def fit(weights):
        return Ridge(alpha=1.0).fit(bits, y, sample_weight=weights).coef_

    np.testing.assert_allclose(ours, fit(np.sqrt(np.exp(-d ** 2 / 0.25 ** 2))), atol=1e-9)
    assert np.abs(ours - fit(np.exp(-d ** 2 / 0.25 ** 2))).max() > 1e-3       # a wrong kernel shows
    assert np.abs(ours - Ridge(alpha=0.01).fit(bits, y, sample_weight=np.sqrt(np.exp(-d ** 2 / 0.0625))).coef_
                  ).max() > 1e-3                                                 # a wrong alpha shows
    # other kernel widths and the euclidean distance, as lime computes them
    res = explain(bundle, x, [0], "lime", num_samples=N, hide_color=0.0, output="logit", random_state=SEED,
                  kernel_width=0.6, distance="euclidean", **TOY_SEGMENTATION)
    d = pairwise_distances(bits, bits[:1], metric="euclidean").ravel()
    np.testing.assert_allclose(superpixel_weights(res, 0), fit(np.sqrt(np.exp(-d ** 2 / 0.6 ** 2))), atol=1e-9)


@pytest.mark.parametrize("num_features, selection", [(3, "auto"), (9, "auto"), (4, "highest_weights"),
                                                      (8, "forward_selection"), (5, "none")])
def test_feature_selection_is_lime_bases(coffee, num_features, selection):
    """auto is forward selection up to 6 features, 'highest_weights' beyond; the weights of the
    features kept are lime_base's, the others are zero."""
    from sklearn.metrics import pairwise_distances

    x, segments, a = coffee
    N = 200
    bundle = toy_bundle(ShownSuperpixels(x[0], segments, a, gamma=3.0, pair=(2, 5)))
    res = explain(bundle, x, [0], "lime", num_samples=N, hide_color=0.0, output="logit", random_state=SEED,
                  num_features=num_features, feature_selection=selection, **TOY_SEGMENTATION)
    bits = lime_samples(len(a), N, SEED)
    y = bits @ a + 3.0 * bits[:, 2] * bits[:, 5]
    d = pairwise_distances(bits, bits[:1], metric="cosine").ravel()
    base = lime_base.LimeBase(lambda d: np.sqrt(np.exp(-d ** 2 / 0.25 ** 2)), random_state=SEED)
    _, exp, score, _ = base.explain_instance_with_data(bits, y[:, None], d, 0, num_features,
                                                      feature_selection=selection)
    theirs = np.zeros(len(a))
    for f, w in exp:
        theirs[f] = w
    kept = len(a) if selection == "none" else num_features
    assert np.count_nonzero(theirs) == kept
    np.testing.assert_allclose(superpixel_weights(res, 0), theirs, atol=1e-9)
    assert res.extras["lime_score"].item() == pytest.approx(score, abs=1e-9)


def test_hide_color_and_feature_selection_against_lime_image_on_a_toy_cnn():
    """lime's whole explain_instance (float64 toy CNN, so the outputs agree to rounding): a grey
    hide_color, an RGB one, and auto selection of 4 superpixels."""
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    bundle = _toys.bundle_for(_toys.tiny_cnn(), "features.10", tail=None, prefix_tokens=None)
    x = toy_photo("astronaut")
    label = 1
    segmentation = SegmentationAlgorithm("quickshift", kernel_size=2, max_dist=200, ratio=0.2)
    for options, lime_kwargs in [({"hide_color": 0.3}, {"hide_color": 0.3}),
                                 ({"hide_color": [0.9, 0.1, 0.5]}, {"hide_color": (0.9, 0.1, 0.5)}),
                                 ({"num_features": 4}, {"num_features": 4})]:
        ours = explain(bundle, x, [label], "lime", num_samples=120, random_state=SEED, **options, **TOY_SEGMENTATION)
        exp = lime_explain(bundle, x[0], label, num_samples=120, segmentation_fn=segmentation, **lime_kwargs)
        F = int(exp.segments.max()) + 1
        np.testing.assert_array_equal(ours.extras["lime_segments"][0].numpy(), exp.segments)
        theirs = theirs_weights(exp, label, F)
        assert np.count_nonzero(theirs) == lime_kwargs.get("num_features", F)
        np.testing.assert_allclose(superpixel_weights(ours, 0), theirs, atol=1e-9, err_msg=str(options))


# --------------------------------------------------------------------------------------------
# Batches, the constant-map rule, options


def test_an_image_does_not_depend_on_its_batch():
    """Two photos with different superpixel counts (the shorter one padded) and a chunk that
    straddles them: each image's weights and map are what it gets alone."""
    bundle = _toys.bundle_for(_toys.tiny_cnn(), "features.10", tail=None, prefix_tokens=None)
    x = torch.cat([toy_photo("coffee"), toy_photo("astronaut")])
    t = [2, 5]
    options = dict(num_samples=40, batch_size=7, **TOY_SEGMENTATION)
    both = explain(bundle, x, t, "lime", **options)
    counts = both.extras["lime_superpixels"].tolist()
    assert counts[0] != counts[1], counts
    for i in range(2):
        alone = explain(bundle, x[i:i + 1], t[i:i + 1], "lime", **options)
        torch.testing.assert_close(both.extras["lime_weights"][i:i + 1], alone.extras["lime_weights"])
        torch.testing.assert_close(both.maps[i:i + 1], alone.maps)


def test_signed_weights_and_a_flat_response(coffee):
    x, segments, a = coffee
    net = ShownSuperpixels(x[0], segments, a)
    res = explain(toy_bundle(net), x, [0], "lime", num_samples=100, hide_color=0.0, output="logit",
                  positive_only=False, **TOY_SEGMENTATION)
    w = res.extras["lime_weights"]
    torch.testing.assert_close(res.maps, (w - w.min()) / (w.max() - w.min()))
    assert (res.maps[w < 0] < res.maps[w > 0].min()).all()
    # a network that ignores the image: every weight 0, the map zeros and flagged constant
    flat = toy_bundle(ShownSuperpixels(x[0], segments, np.zeros_like(a)))
    res = explain(flat, x, [0], "lime", num_samples=50, **TOY_SEGMENTATION)
    assert (res.maps == 0).all() and res.extras["constant"].all()


@pytest.mark.parametrize("options, expected", [
    ({"num_samples": 0}, "lime.num_samples: Input should be greater than or equal to 1, got 0"),
    ({"kernel_width": -0.25}, "lime.kernel_width: Input should be greater than 0, got -0.25"),
    ({"hide_color": [0.1, 0.2]}, "lime.hide_color: a colour is one grey value or three (R, G, B), got [0.1, 0.2]"),
    ({"hide_color": 255}, "lime.hide_color[0]: Input should be less than or equal to 1, got 255"),
    ({"random_state": -1}, "lime.random_state: Input should be greater than or equal to 0, got -1"),
    ({"quickshift_kernel_size": 0.5}, "lime.quickshift_kernel_size: Input should be greater than or equal to 1"),
    ({"feature_selection": "lasso_path"}, "lime.feature_selection: Input should be"),
    ({"batch_size": 0}, "lime.batch_size: Input should be greater than or equal to 1, got 0"),
])
def test_bad_options_fail_at_validation_before_any_forward(options, expected):
    counting = _toys.Counting(_toys.tiny_cnn())
    bundle = _toys.bundle_for(counting, "net.features.10", tail=None, prefix_tokens=None)
    with pytest.raises(OptionsError) as info:
        explain(bundle, _toys.images(1), [0], "lime", **options)
    assert expected in str(info.value), str(info.value)
    assert counting.calls == 0


def test_a_run_config_refuses_zero_samples_at_check():
    config = {"output": "/tmp/out", "datasets": [{"name": "demo", "uri": "demo"}],
              "models": [{"name": "efficientnet_lite0"}], "methods": {"lime": {"num_samples": 0}},
              "metrics": ["classification"]}
    with pytest.raises(ConfigError, match="methods.lime.num_samples: Input should be greater than or equal to 1"):
        load_config(config)
