"""The randomisation sanity check (Adebayo et al. 2018; paper App. G, Fig. A6): the cascade of
blocks per architecture, the randomised copies, the four similarities (against scipy and
scikit-image), the metric group and its aggregation, and the figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from scipy.stats import spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity

from opticam_core.metrics import GROUPS, aggregate_sanity, compute
from opticam_core.metrics.sanity import (
    RANDOMIZED,
    average_ranks,
    hog_similarity,
    similarities,
    spearman,
    ssim,
)
from opticam_core.models import ModelError
from opticam_core.models.randomize import (
    architecture,
    block_names,
    cascade_blocks,
    check_blocks,
    randomized,
)
from opticam_core.options import OptionsError

from . import _toys

FIELDS = ("sanity_spearman", "sanity_spearman_abs", "sanity_ssim", "sanity_hog")


SIZE = 128  # layer4 then has 4×4 cells


def _resnet_bundle():
    """A small torchvision ResNet (one BasicBlock per stage) at 128×128 input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=6)
        for m in net.modules():  # trained-looking BatchNorm: non-trivial statistics and affine maps
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)
    from opticam_core import wrap_model

    return wrap_model(net.eval(), "layer4", name="toy", mean=_toys.TOY_MEAN, std=_toys.TOY_STD, prefix_tokens=None,
                      input_size=(SIZE, SIZE), resize=SIZE)


@pytest.fixture(scope="module")
def resnet():
    return _resnet_bundle()


def _params(bundle):
    return {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Blocks and randomised copies


def test_the_blocks_of_the_papers_models_from_the_top():
    """What N = 1…5 means per model (the README's table), read off the real architectures."""
    expect = {
        "resnet50": (18, ["fc", "layer4.2", "layer4.1", "layer4.0", "layer3.5"]),
        "vgg16_bn": (16, ["classifier.6", "classifier.3", "classifier.0", "features.40", "features.37"]),
        "vit_base_patch16_224": (14, ["head", "blocks.11", "blocks.10", "blocks.9", "blocks.8"]),
        "efficientnet_lite0": (19, ["classifier", "conv_head", "blocks.6.0", "blocks.5.3", "blocks.5.2"]),
    }
    for model, (count, top) in expect.items():
        names = block_names(architecture(model))
        assert len(names) == count and names[:5] == top, model
    vgg = cascade_blocks(architecture("vgg16"))
    assert vgg[3].paths == ("features.40", "features.41")  # a conv goes with its BatchNorm
    vit = cascade_blocks(architecture("deit_base_distilled_patch16_224"))
    assert vit[0].paths == ("norm", "head", "head_dist")
    assert check_blocks("resnet50", 5) == expect["resnet50"][1]


def test_blocks_beyond_the_model_and_unknown_architectures_are_clear_errors():
    with pytest.raises(OptionsError, match=r"metrics\.sanity\.blocks: 19, but resnet50 has only 18 blocks"):
        check_blocks("resnet50", 19)
    with pytest.raises(ModelError, match=r"TinyCNN.*supported: torchvision ResNet"):
        cascade_blocks(_toys.cnn_bundle())


def test_zero_blocks_is_an_equal_copy(resnet):
    before = _params(resnet)
    copy = randomized(resnet, 0)
    assert copy.model is not resnet.model
    after = _params(copy)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_exactly_the_top_blocks_change_and_the_original_is_untouched(resnet):
    blocks = cascade_blocks(resnet)
    assert [b.name for b in blocks] == ["fc", "layer4.0", "layer3.0", "layer2.0", "layer1.0", "conv1"]
    before = _params(resnet)
    copy = randomized(resnet, 2, seed=3)
    assert all(torch.equal(before[k], v) for k, v in _params(resnet).items())  # original untouched
    inside = ("net.fc.", "net.layer4.0.")
    for name, p in copy.model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.startswith(inside), name
        assert not p.requires_grad
    assert not copy.model.training
    stats = [k for k in before if "running_" in k]
    assert all(torch.equal(copy.model.state_dict()[k], before[k]) for k in stats)  # kept, as Adebayo
    reset = randomized(resnet, 2, seed=3, reset_stats=True).model.state_dict()
    assert torch.equal(reset["net.layer4.0.bn1.running_var"], torch.ones_like(before["net.layer4.0.bn1.running_var"]))
    assert torch.equal(reset["net.layer3.0.bn1.running_var"], before["net.layer3.0.bn1.running_var"])
    # the zoo's tail closes over the network: the copy's tail must be the copy's
    x = _toys.images(2, size=SIZE, dtype=torch.float32)
    from opticam_core.hooks import capture

    with torch.no_grad(), capture(copy.target) as cap:
        logits = copy.model(x)
    assert torch.allclose(copy.tail(cap.output), logits, atol=1e-5)


def test_deterministic_per_seed_and_cascading(resnet):
    a, b = randomized(resnet, 3, seed=1), randomized(resnet, 3, seed=1)
    c = randomized(resnet, 3, seed=2)
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["net.fc.weight"], pc["net.fc.weight"])
    one = _params(randomized(resnet, 1, seed=1))  # N = 3 is N = 1 plus two more blocks
    assert torch.equal(one["net.fc.weight"], pa["net.fc.weight"])
    assert not torch.equal(one["net.layer4.0.conv1.weight"], pa["net.layer4.0.conv1.weight"])
    state = torch.random.get_rng_state()
    randomized(resnet, 2, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is untouched


def test_a_timm_vit_randomises_its_head_with_the_final_norm():
    bundle = _toys.vit_bundle()
    assert block_names(bundle) == ["head", "blocks.1", "blocks.0", "patch_embed"]
    before = _params(bundle)
    copy = _params(randomized(bundle, 2))
    changed = {k for k in before if not torch.equal(before[k], copy[k])}
    assert changed == {k for k in before if k.startswith(("net.norm.", "net.head.", "net.blocks.1."))}


# ----------------------------------------------------------------------------------------------
# Similarities


def test_spearman_handles_ties_as_scipy():
    gen = np.random.default_rng(0)
    a = gen.integers(0, 5, size=(4, 300)).astype(float)  # many ties
    b = np.where(gen.random((4, 300)) < 0.6, a, gen.integers(0, 5, size=(4, 300)))
    ours = spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    theirs = [spearmanr(x, y)[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    from scipy.stats import rankdata

    np.testing.assert_array_equal(average_ranks(torch.from_numpy(a)).numpy(), rankdata(a, axis=1))
    const = spearman(torch.ones(1, 10), torch.rand(1, 10))
    assert torch.isnan(const).all()  # scipy: undefined (NaN) for a constant input


@pytest.mark.parametrize("window", ["gaussian", "uniform"])
def test_ssim_equals_scikit_image(window):
    gen = np.random.default_rng(1)
    a = gen.random((3, 40, 36))
    b = np.clip(a + 0.3 * gen.standard_normal(a.shape), 0, 1)
    b[2] = a[2]
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b), window=window).numpy()
    theirs = [structural_similarity(x, y, data_range=1.0, gaussian_weights=window == "gaussian") for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)
    assert ours[2] == 1.0


def test_hog_similarity_is_the_rank_correlation_of_scikit_image_hog():
    gen = np.random.default_rng(2)
    low = torch.from_numpy(gen.random((2, 1, 6, 6)))
    a = torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear")[:, 0]
    b = (a + 0.2 * torch.from_numpy(gen.random(a.shape))).clamp(0, 1)
    ours = hog_similarity(a, b, cell=8).numpy()
    kw = dict(orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3))
    theirs = [spearmanr(hog(x.numpy(), **kw), hog(y.numpy(), **kw))[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert torch.isnan(hog_similarity(a[:, :16, :16], b[:, :16, :16], cell=8)).all()  # too small for a block


def test_a_map_against_itself_is_1_on_every_measure_and_nan_maps_stay_nan():
    maps = _toys.images(3, size=64).mean(1)
    others = torch.stack([maps, maps.flip(-1)], 1)
    others[1, 1] = torch.nan
    sims = similarities(maps, others, hog_cell=8)
    for name, v in sims.items():
        assert torch.allclose(v[:, 0], torch.ones(3, dtype=torch.float64), atol=1e-12), name
        assert torch.isnan(v[1, 1]) and (v[[0, 2], 1] < 1).all(), name
    assert torch.allclose(sims["spearman"], sims["spearman_abs"], rtol=0, atol=0, equal_nan=True)  # [0,1]: |S| = S


# ----------------------------------------------------------------------------------------------
# The metric group


def _run(bundle, method, options, n=3, size=SIZE):
    x = _toys.images(n, size=size, dtype=torch.float32, seed=4)
    t = _toys.targets(n)
    from opticam_core.methods import explain

    maps = explain(bundle, x, t, method).maps
    return compute(bundle, x, t, maps, which={"sanity": options}, method=method)


def test_the_group_with_grad_cam(resnet):
    """On a random toy network Grad-CAM's maps are often constant (every weighted channel sum
    negative, so all zero after the ReLU): those have no ranks, so the rank measures are NaN
    exactly there; SSIM is defined (two all-zero maps are identical: 1)."""
    from opticam_core.maps import constant_maps
    from opticam_core.methods import explain

    RANDOMIZED.clear()
    x, t = _toys.images(4, size=SIZE, dtype=torch.float32, seed=4), _toys.targets(4)
    maps = explain(resnet, x, t, "gradcam").maps
    out = compute(resnet, x, t, maps, which={"sanity": {"blocks": 4, "hog_cell": 8}}, method="gradcam")
    flat = constant_maps(maps)
    assert 0 < flat.sum() < 4
    for f in FIELDS:
        v = out[f]
        assert v.shape == (4, 5), f
        if f == "sanity_ssim":
            assert (v[:, 0] == 1).all() and (v[~flat, 1:] < 1).all() and (v.abs() <= 1).all()
            continue
        assert torch.isnan(v[flat, 0]).all() and (v[~flat, 0] == 1).all(), f
        later = v[:, 1:][torch.isfinite(v[:, 1:])]
        assert len(later) >= 4 and (later < 1 - 1e-6).all() and (later >= -1).all(), f
    assert len(RANDOMIZED.items) == 4
    compute(resnet, x[:2], t[:2], maps[:2], which={"sanity": {"blocks": 4, "hog_cell": 8}}, method="gradcam")
    assert len(RANDOMIZED.items) == 4  # built once, not per batch


def test_similarity_falls_as_more_blocks_are_randomised(resnet):
    """LayerCAM's maps (ReLU'd gradients × activations) are never constant here: every value is
    defined, and the more blocks are randomised, the less the map resembles the original."""
    out = _run(resnet, "layercam", {"blocks": 4, "hog_cell": 8}, n=4)
    for f in FIELDS:
        v = out[f]
        assert torch.isfinite(v).all() and (v[:, 0] == 1).all() and (v[:, 1:] < 1).all(), f
        mean = v.mean(0)
        assert mean[4] < mean[1], (f, mean)
    assert (out["sanity_spearman"].mean(0).diff() < 0).all()


def test_fake_cam_is_the_same_map_on_every_model(resnet):
    """A map that ignores the model scores 1 at every N: what a wrong comparison (e.g. the
    randomised map against another image's) would fail."""
    out = _run(resnet, "fakecam", {"blocks": 3, "hog_cell": 8})
    for f in FIELDS:
        assert torch.allclose(out[f], torch.ones_like(out[f]), atol=1e-9), f


def test_too_many_blocks_names_the_option(resnet):
    with pytest.raises(OptionsError, match=r"metrics\.sanity\.blocks: 7, but toy has only 6 blocks"):
        _run(resnet, "gradcam", {"blocks": 7})
    with pytest.raises(OptionsError, match=r"metrics\.sanity\.blocks"):
        GROUPS["sanity"].kwargs({"blocks": 0})


def test_cost_is_blocks_reruns():
    g = GROUPS["sanity"]
    assert g.cost_of({"blocks": 5}).reruns == 5 and g.cost_of({"blocks": 5}).forwards == 0
    assert g.cost_of({"blocks": 3, "target": "predicted"}).forwards == 3


def test_real_weights_randomising_the_top_changes_the_maps():
    """EfficientNet-Lite0 (real weights) on real photos: Grad-CAM reads the classifier's weights,
    so a random classifier alone already takes its map far from the original (as Adebayo found);
    LayerCAM moves away step by step as more blocks are randomised."""
    from opticam_core import load_model
    from opticam_core.methods import explain

    bundle = load_model("efficientnet_lite0")
    x = torch.cat([_toys.skimage_photo(n) for n in ("chelsea", "coffee")])
    t = bundle.model(x).argmax(1)
    mean = {}
    for method in ("gradcam", "layercam"):
        maps = explain(bundle, x, t, method).maps
        out = compute(bundle, x, t, maps, which={"sanity": {"blocks": 3}}, method=method)
        mean[method] = {f: out[f].nanmean(0) for f in FIELDS}
    RANDOMIZED.clear()
    for f in FIELDS:
        g, lc = mean["gradcam"][f], mean["layercam"][f]
        assert g[0] == 1 and lc[0] == 1, f
        assert (g[1:] < 0.6).all(), (f, g)
        assert lc[3] < lc[1] < 1, (f, lc)


# ----------------------------------------------------------------------------------------------
# Aggregation and the figure


def _rows():
    import pandas as pd

    gen = np.random.default_rng(3)
    rows = []
    for method, fall in (("opticam", 0.2), ("gradcam", 0.1), ("fakecam", 0.0)):
        for i in range(6):
            curve = [1.0] + list(np.clip(1 - fall * np.arange(1, 4) + 0.05 * gen.standard_normal(3), -1, 1))
            rows.append({"model": "resnet50", "method": method, "error": None,
                         **{f: list(np.float32(curve)) for f in FIELDS}})
    rows[1]["sanity_ssim"] = [1.0, np.nan, 0.5, 0.4]
    rows[2]["error"] = "failed"
    return pd.DataFrame(rows)


def test_aggregate_sanity_means_per_n_over_finite_rows():
    df = _rows()
    got = aggregate_sanity(df)
    opti = df[df["method"] == "opticam"]
    ok = opti[opti["error"].isna()]
    arr = np.array(ok["sanity_ssim"].tolist(), dtype=float)
    expect = np.nanmean(arr, axis=0)
    part = aggregate_sanity(opti)
    np.testing.assert_allclose(part["ssim"], expect)
    assert set(got) == {"spearman", "spearman_abs", "ssim", "hog"} and got["hog"].shape == (4,)
    w = np.array([[1, 2, 0, 1, 1, 3]], dtype=float)  # bootstrap counts: a weighted mean per N
    boot = aggregate_sanity(opti, weights=w)["spearman"]
    vals = np.array(opti["sanity_spearman"].tolist(), dtype=float)
    keep = opti["error"].isna().to_numpy()
    np.testing.assert_allclose(boot[0], (w[0, keep] @ vals[keep]) / w[0, keep].sum(), rtol=1e-12)


def test_the_figure(tmp_path):
    from matplotlib.image import imread

    from pipeline.report.sanity import block_labels, sanity_figure

    assert block_labels("resnet50", 4) == ["none", "fc", "layer4.2", "layer4.1"]
    assert block_labels("toy", 3) == ["none", "N=1", "N=2"]
    path = sanity_figure(_rows(), tmp_path / "sanity.png", resamples=50)
    img = imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 800
    assert sanity_figure(_rows().drop(columns=list(FIELDS)), tmp_path / "none.png") is None


def test_the_abs_variant_ranks_magnitudes_of_signed_maps():
    gen = np.random.default_rng(5)
    a = torch.from_numpy(gen.standard_normal((2, 24, 24)))
    b = torch.from_numpy(gen.standard_normal((2, 1, 24, 24)))
    sims = similarities(a, b, hog_cell=8)
    for i in range(2):
        x, y = a[i].numpy().ravel(), b[i, 0].numpy().ravel()
        assert sims["spearman"][i, 0] == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
        assert sims["spearman_abs"][i, 0] == pytest.approx(spearmanr(np.abs(x), np.abs(y))[0], abs=1e-12)
