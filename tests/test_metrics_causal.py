"""Insertion and deletion: exact curves on a model whose logit is a weighted sum of pixels, the
RISE blur kernel against scipy, the step grid, tie-breaking, batching, and TorchCAM parity."""

from __future__ import annotations

import contextlib
import math
from functools import partial

import numpy as np
import pytest
import torch

from opticam_core import metrics as M
from opticam_core.metrics.causal import blur_images
from tests import _toys
from tests._peers import require
from tests.test_metrics_classification import MEAN, STD, linear_bundle


def test_rise_kernel_matches_scipy_gaussian_filter_of_an_impulse():
    from scipy.ndimage import gaussian_filter

    for size, sigma in ((11, 5.0), (7, 1.5), (5, 3.0)):
        impulse = np.zeros((size, size))
        impulse[size // 2, size // 2] = 1
        want = gaussian_filter(impulse, sigma)
        got = M.rise_kernel(size, sigma).double().numpy()
        assert np.allclose(got, want, atol=1e-7), (size, sigma)
    assert M.rise_kernel().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_step_grid():
    assert M.step_counts(224 * 224).tolist() == [224 * k for k in range(225)]
    assert M.step_counts(10, steps=3).tolist() == [0, 4, 8, 10]  # ceil(10/3) = 4, partial last step
    assert M.step_counts(10, pixels_per_step=3).tolist() == [0, 3, 6, 9, 10]
    assert M.step_counts(10, steps=100).tolist() == list(range(11))


def test_ties_are_broken_in_raster_order():
    fake = torch.ones(1, 3, 4)
    fake[0, 0, 0] = 0  # Fake-CAM
    ranks = M.pixel_ranks(fake)[0].view(3, 4)
    assert ranks.tolist() == [[11, 0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10]]
    s = torch.tensor([[[0.5, 0.9], [0.5, 0.1]]])
    assert M.pixel_ranks(s)[0].tolist() == [1, 0, 2, 3]


def _expected_curves(weight, bias, image, smap, counts, blur=(11, 5.0)):
    """Closed form: with logits (0, z), each pixel adds its own term to z, so a curve is a cumulative
    sum, in rank order, of the change of that term when the pixel is deleted / inserted."""
    from scipy.ndimage import correlate

    m = np.array(MEAN)[:, None, None]
    s = np.array(STD)[:, None, None]
    w, x = weight.numpy(), image.numpy()
    term = lambda v: (w * (v - m) / s).sum(0).ravel()  # per-pixel contribution to z
    if blur is None:
        base = np.zeros_like(x)
    else:
        k = M.rise_kernel(*blur).double().numpy()
        base = np.stack([correlate(c, k, mode="constant") for c in x])
    clean, black, blurred = term(x), term(np.zeros_like(x)), term(base)
    order = np.argsort(-smap.numpy().ravel(), kind="stable")
    z_clean = bias + clean.sum()
    z_del = z_clean + np.concatenate([[0], np.cumsum((black - clean)[order])])[counts]
    z_ins = bias + blurred.sum() + np.concatenate([[0], np.cumsum((clean - blurred)[order])])[counts]
    cls = 1 if z_clean > 0 else 0
    sign = 1 if cls == 1 else -1
    sig = lambda z: 1 / (1 + np.exp(-sign * z))
    return sig(z_ins), sig(z_del), cls


@pytest.fixture(scope="module")
def toy():
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(3, 12, 12, generator=gen, dtype=torch.float64) * 0.2
    images = torch.rand(4, 3, 12, 12, generator=gen, dtype=torch.float64)
    maps = torch.rand(4, 12, 12, generator=gen)
    maps[1] = (maps[1] * 4).round() / 4  # many ties
    maps[2] = 1.0
    maps[2, 0, 0] = 0.0  # Fake-CAM
    return linear_bundle(weight, -0.4), weight, images, maps


@pytest.mark.parametrize("steps,blur", [(7, (11, 5.0)), (144, (5, 1.0)), (5, None)])
def test_curves_and_aucs_are_exact(toy, steps, blur):
    bundle, weight, images, maps = toy
    ins, dele, curves = M.insertion_deletion(bundle, images, maps, steps=steps, blur=blur, batch_size=5)
    counts = M.step_counts(144, steps).numpy()
    fractions = counts / 144
    assert np.allclose(curves["fractions"].numpy(), fractions)
    for b in range(len(images)):
        want_ins, want_del, cls = _expected_curves(weight, -0.4, images[b], maps[b], counts, blur)
        assert curves["classes"][b].item() == cls
        assert np.allclose(curves["insertion"][b].numpy(), want_ins, atol=1e-10)
        assert np.allclose(curves["deletion"][b].numpy(), want_del, atol=1e-10)
        assert ins[b].item() == pytest.approx(np.trapezoid(want_ins, fractions), abs=1e-10)
        assert dele[b].item() == pytest.approx(np.trapezoid(want_del, fractions), abs=1e-10)


def test_batching_does_not_change_anything(toy):
    bundle, _, images, maps = toy
    whole = M.insertion_deletion(bundle, images, maps, steps=9, batch_size=1000)
    for bs in (1, 4, 7):
        again = M.insertion_deletion(bundle, images, maps, steps=9, batch_size=bs)
        assert torch.equal(whole[0], again[0]) and torch.equal(whole[1], again[1])
    alone = M.insertion_deletion(bundle, images[2:3], maps[2:3], steps=9)
    assert torch.allclose(alone[2]["deletion"][0], whole[2]["deletion"][2], atol=1e-14)
    assert torch.allclose(alone[2]["insertion"][0], whole[2]["insertion"][2], atol=1e-14)


def test_given_class_and_clean_logits_are_used(toy):
    bundle, _, images, maps = toy
    ins0, del0, c0 = M.insertion_deletion(bundle, images, maps, steps=4, classes=[0, 0, 0, 0])
    ins1, del1, c1 = M.insertion_deletion(bundle, images, maps, steps=4, classes=[1, 1, 1, 1])
    # two classes: the curves of class 0 are 1 − those of class 1
    assert torch.allclose(c0["deletion"], 1 - c1["deletion"], atol=1e-12)
    assert torch.allclose(ins0 + ins1, torch.ones_like(ins0), atol=1e-12)
    logits = torch.tensor([[5.0, 0.0]] * 4, dtype=torch.float64)  # says class 0, p = σ(5)
    _, _, c = M.insertion_deletion(bundle, images, maps, steps=4, clean_logits=logits)
    assert c["classes"].tolist() == [0] * 4
    assert torch.allclose(c["deletion"][:, 0], torch.sigmoid(torch.tensor(5.0, dtype=torch.float64)).expand(4))


class _FixedMaps:
    """A stand-in for a TorchCAM extractor that hands out our maps."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def test_torchcam_deletion_insertion_agree():
    tcm = require("torchcam.metrics")
    bundle = _toys.cnn_bundle()
    images = _toys.images(3, seed=5)
    maps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    ins, dele, curves = M.insertion_deletion(bundle, images, maps, steps=16, batch_size=50)
    kernel = M.rise_kernel()
    softmax = partial(torch.softmax, dim=-1)
    for b in range(3):
        x, s = images[b:b + 1], maps[b:b + 1].double()
        d = tcm.DeletionInsertionMetric(_FixedMaps(bundle.model, s), softmax, steps=16, batch_size=50)
        d.update(x)
        i = tcm.DeletionInsertionMetric(_FixedMaps(bundle.model, s), softmax, steps=16, batch_size=50,
                                        baseline=lambda t: blur_images(t, kernel))
        i.update(x)
        assert dele[b].item() == pytest.approx(d.summary()["deletion_auc"], abs=1e-9)
        assert ins[b].item() == pytest.approx(i.summary()["insertion_auc"], abs=1e-9)
        assert not math.isclose(ins[b].item(), d.summary()["insertion_auc"], abs_tol=1e-6)  # blur matters
