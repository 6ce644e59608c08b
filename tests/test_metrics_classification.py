"""p, o, AD / AI / AG and the box study, against closed forms.

The toy model has two classes with logits (0, z), z = Σ w ⊙ (x − m)/s + b: the probability of
class 1 is σ(z) and of class 0 is σ(−z), exactly, for any masked image. The normalisation inside
(m, s ≠ 0, 1) makes a mask applied after normalisation give different numbers than one applied
to pixels, as SPEC §1 requires.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from opticam_core import metrics as M
from opticam_core import wrap_model

MEAN = (0.25, 0.5, 0.125)  # exact in float32, the dtype of the bundle's buffers
STD = (0.5, 0.25, 2.0)


class PixelLogit(nn.Module):
    """logits = (0, Σ w ⊙ x + b) on normalised inputs."""

    def __init__(self, weight: torch.Tensor, bias: float = 0.0):
        super().__init__()
        self.body = nn.Identity()
        self.weight = nn.Parameter(weight.double())
        self.bias = nn.Parameter(torch.tensor(float(bias), dtype=torch.float64))

    def forward(self, x):
        z = (self.body(x) * self.weight).flatten(1).sum(1) + self.bias
        return torch.stack([torch.zeros_like(z), z], dim=1)


def linear_bundle(weight: torch.Tensor, bias: float = 0.0):
    H, W = weight.shape[-2:]
    return wrap_model(PixelLogit(weight, bias), "body", name="pixel_logit", mean=MEAN, std=STD,
                      prefix_tokens=None, tail=None, input_size=(H, W), resize=H)


def closed_form_logit(weight, bias, x):
    m = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x.double() - m) / s * weight.double()).flatten(1).sum(1) + bias


def prob(z, cls):
    return torch.sigmoid(z) if cls == 1 else torch.sigmoid(-z)


@pytest.fixture(scope="module")
def toy():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 8, 8, generator=gen, dtype=torch.float64) * 0.3
    images = torch.rand(5, 3, 8, 8, generator=gen, dtype=torch.float64)
    maps = torch.rand(5, 8, 8, generator=gen)
    return linear_bundle(weight, 0.2), weight, images, maps


def test_confidence_is_the_closed_form_on_pixel_masks(toy):
    bundle, weight, images, maps = toy
    targets = torch.tensor([1, 0, 1, 1, 0])
    p, o = M.confidence(bundle, images, maps, targets)
    z_clean = closed_form_logit(weight, 0.2, images)
    z_mask = closed_form_logit(weight, 0.2, images * maps[:, None].double())
    for i, c in enumerate(targets.tolist()):
        assert p[i].item() == pytest.approx(prob(z_clean[i], c).item(), abs=1e-12)
        assert o[i].item() == pytest.approx(prob(z_mask[i], c).item(), abs=1e-12)
    assert p.dtype == torch.float64
    # the clean logits, when given, are used instead of a forward
    fake = torch.tensor([[0.0, 0.0]] * 5, dtype=torch.float64)
    p2, o2 = M.confidence(bundle, images, maps, targets, clean_logits=fake)
    assert torch.allclose(p2, torch.full((5,), 0.5, dtype=torch.float64)) and torch.equal(o2, o)


def test_masking_happens_in_pixel_space(toy):
    """A zero map gives the model black pixels (x ⊙ 0 = 0), not a zero normalised input."""
    bundle, weight, images, _ = toy
    _, o = M.confidence(bundle, images, torch.zeros(5, 8, 8), torch.ones(5, dtype=torch.long))
    z_black = closed_form_logit(weight, 0.2, torch.zeros(1, 3, 8, 8))
    assert torch.allclose(o, torch.sigmoid(z_black).expand(5), atol=1e-12)
    assert not torch.allclose(o, torch.sigmoid(torch.tensor(0.2, dtype=torch.float64)).expand(5))


def test_terms_by_hand():
    p = torch.tensor([0.5, 0.5, 0.8, 1.0, 0.2, 0.0, 0.4])
    o = torch.tensor([0.25, 0.5, 0.0, 1.0, 0.6, 0.3, 0.4])
    drop = M.drop_terms(p, o)
    gain = M.gain_terms(p, o)
    inc = M.increase_terms(p, o)
    # p=0.5→0.25: drop ½; p=o: 0 everywhere; o=0: drop 1; p=1: gain undefined; o>p: gain (o−p)/(1−p)
    expected_drop = [0.5, 0.0, 1.0, 0.0, 0.0, math.nan, 0.0]
    expected_gain = [0.0, 0.0, 0.0, math.nan, 0.5, 0.3, 0.0]
    expected_inc = [0, 0, 0, 0, 1, 1, 0]
    for got, want in ((drop, expected_drop), (gain, expected_gain)):
        for g, w in zip(got.tolist(), want):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=1e-7)
    assert inc.tolist() == expected_inc


def test_averages_in_percent_with_undefined_terms():
    p = torch.tensor([0.5, 0.5, 0.8, 1.0])
    o = torch.tensor([0.25, 0.5, 0.0, 1.0])
    # AD: (0.5 + 0 + 1 + 0)/4 ; AG: p=1 is undefined → left out (3 images) or counted as 0
    assert M.average_drop(p, o) == pytest.approx(100 * 1.5 / 4)
    assert M.average_increase(p, o) == 0.0
    assert M.average_gain(torch.tensor([0.2, 1.0]), torch.tensor([0.6, 1.0])) == pytest.approx(50.0)
    assert M.average_gain(torch.tensor([0.2, 1.0]), torch.tensor([0.6, 1.0]), undefined="zero") == pytest.approx(25.0)
    assert M.average_increase(torch.tensor([0.2, 0.5]), torch.tensor([0.6, 0.5])) == pytest.approx(50.0)


def test_box_study_masks(toy):
    bundle, weight, images, maps = toy
    targets = torch.ones(5, dtype=torch.long)
    boxes = [torch.tensor([[1.0, 2.0, 5.0, 7.0]]), torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 2.0, 2.0], [6.0, 6.0, 8.0, 8.0]]),
             torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[3.0, 3.0, 4.0, 4.0]])]
    got = M.box_study(bundle, images, maps, boxes, targets, batch_size=3)
    M_ = torch.zeros(5, 8, 8, dtype=torch.float64)
    M_[0, 2:7, 1:5] = 1
    M_[2, 0:2, 0:2] = 1
    M_[2, 6:8, 6:8] = 1
    M_[3] = 1
    M_[4, 3, 3] = 1
    S = maps.double()
    for name, mask in (("o_box_and_map", S * M_), ("o_map_minus_box", S * (1 - M_)), ("o_box", M_), ("o_not_box", 1 - M_)):
        want = torch.sigmoid(closed_form_logit(weight, 0.2, images * mask[:, None]))
        assert torch.isnan(got[name][1])
        keep = torch.tensor([0, 2, 3, 4])
        assert torch.allclose(got[name][keep], want[keep], atol=1e-12), name
    # the two method-free rows can be skipped; the others do not change
    part = M.box_study(bundle, images, maps, boxes, targets, method_free=False)
    assert set(part) == {"o_box_and_map", "o_map_minus_box"}
    assert torch.allclose(part["o_box_and_map"], got["o_box_and_map"], equal_nan=True)


def test_bad_inputs_are_named(toy):
    bundle, _, images, maps = toy
    with pytest.raises(ValueError, match="B×H×W"):
        M.confidence(bundle, images, maps[:, :4], torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        M.confidence(bundle, images, maps, torch.ones(4, dtype=torch.long))
