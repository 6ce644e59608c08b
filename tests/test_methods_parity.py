"""Our CAMs against pytorch-grad-cam (the peer the paper's baselines came from), map for map.

Same network (the bundle's model: normalisation inside, [0,1] pixels in), same images, same
per-image targets, same target layer. The peer's maps go through its own pipeline (numpy,
cv2 bilinear resize, min–max scaling before and after resizing); ours through `explain`. After
`n(up(·))` both are the same map, so they must agree to float32 precision (the peer returns
float32). What differs by design and how the test handles it:

- Score-CAM: the peer upsamples the channel masks with `align_corners=True`
  (`nn.UpsamplingBilinear2d`); SPEC §1 says False. Our option `align_corners=True` matches it,
  and a second check shows the default really uses False (the maps then differ).
- Ablation-CAM: the peer zeros a channel only when the layer's minimum activation is exactly 0
  (otherwise it writes min − 1e7, deviating from the paper). The CNN's target is a ReLU; for the
  ViT the parity layer is the ReLU inside the first block's MLP (`blocks.0.mlp.act`; in the last
  block the MLP no longer reaches the class token from the patches), not `norm1`, whose output
  has no zeros. The peer's AblationCAM on `norm1` would not compute the
  paper's formula, so there is nothing to be equal to there.
- The peer needs `requires_grad` somewhere upstream to register its gradient hooks and mutates
  the model (it swaps the ablated layer in and out), so it gets a deep copy with parameters
  unfrozen; our bundle stays frozen.
"""

from __future__ import annotations

import copy

import pytest
import torch

from opticam_core import explain
from opticam_core.maps import normalize, upsample

from . import _toys
from ._peers import require

pgc = require("pytorch_grad_cam")
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

PEERS = {
    "gradcam": pgc.GradCAM,
    "gradcampp": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "hirescam": pgc.HiResCAM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
}
GRADIENT = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"]
#: Our options that reproduce the peer's conventions (see the module docstring).
OURS = {"scorecam": {"align_corners": True}}

N = 4
ATOL = 2e-5  # float32 output of the peer; everything else is float64


@pytest.fixture(scope="module")
def cnn():
    return _toys.cnn_bundle()


@pytest.fixture(scope="module")
def vit():
    return _toys.vit_bundle(layer="blocks.1.norm1")


@pytest.fixture(scope="module")
def vit_relu():
    return _toys.vit_bundle(layer="blocks.0.mlp.act")


@pytest.fixture(scope="module")
def batch():
    return _toys.images(N, seed=3), _toys.targets(N, seed=3)


def peer_maps(bundle, method: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(bundle.model)
    for p in model.parameters():
        p.requires_grad_(True)
    layer = model.get_submodule(bundle.layer)
    kwargs = {"reshape_transform": bundle.reshape}
    if method == "ablationcam":
        kwargs["ablation_layer"] = AblationLayerVit() if bundle.reshape is not None else AblationLayer()
    cam = PEERS[method](model=model, target_layers=[layer], **kwargs)
    try:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(out).to(torch.float64)


def ours(bundle, method, x, t, **extra):
    return explain(bundle, x, t, method, **{**OURS.get(method, {}), **extra})


def assert_informative(maps: torch.Tensor, at_least: int = N):
    """Guard against vacuous agreement: maps are not flat (`at_least` of them) and differ between images."""
    assert torch.isfinite(maps).all()
    spans = maps.flatten(1).amax(1) - maps.flatten(1).amin(1)
    assert (spans > 0.99).sum() >= at_least, spans
    assert (maps[:, None] - maps[None]).abs().flatten(2).amax(2).sum() > 1e-3


@pytest.mark.parametrize("method", list(PEERS))
def test_cnn_matches_pytorch_grad_cam(cnn, batch, method):
    x, t = batch
    mine = ours(cnn, method, x, t)
    assert mine.maps.shape == (N, *x.shape[-2:])
    assert not mine.extras["constant"].any()
    assert_informative(mine.maps)
    torch.testing.assert_close(mine.maps, peer_maps(cnn, method, x, t), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", [m for m in PEERS if m != "ablationcam"])
def test_vit_matches_pytorch_grad_cam(vit, batch, method):
    x, t = batch
    mine = ours(vit, method, x, t)
    assert_informative(mine.maps)
    torch.testing.assert_close(mine.maps, peer_maps(vit, method, x, t), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["ablationcam", "gradcam", "scorecam"])
def test_vit_relu_layer_matches_pytorch_grad_cam(vit_relu, batch, method):
    x, t = batch
    mine = ours(vit_relu, method, x, t)
    # Grad-CAM's relu(Σ_k w_k A_k) is all zero for two of the images at this layer (legitimately:
    # negative weights dominate); the other two carry the comparison.
    assert_informative(mine.maps, at_least=2)
    torch.testing.assert_close(mine.maps, peer_maps(vit_relu, method, x, t), atol=ATOL, rtol=0)


def test_the_five_gradient_methods_differ(cnn, batch):
    """If two formulas collapsed into one (a copy-paste bug), parity alone might not notice."""
    x, t = batch
    res = explain(cnn, x, t, GRADIENT)
    for i, a in enumerate(GRADIENT):
        for b in GRADIENT[i + 1:]:
            assert (res[a].maps - res[b].maps).abs().max() > 1e-3, (a, b)


@pytest.mark.parametrize("bundle_name", ["cnn", "vit"])
def test_methods_together_equal_methods_alone(request, batch, bundle_name):
    """One shared forward/backward serves all gradient methods without changing any of them."""
    bundle = request.getfixturevalue(bundle_name)
    x, t = batch
    keys = [*GRADIENT, "scorecam", "ablationcam"]
    together = explain(bundle, x, t, keys)
    assert list(together) == keys
    for k in keys:
        alone = explain(bundle, x, t, k)
        torch.testing.assert_close(together[k].maps, alone.maps, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bundle_name", ["cnn", "vit", "vit_relu"])
@pytest.mark.parametrize("method", list(PEERS))
def test_batched_equals_per_image(request, batch, bundle_name, method):
    bundle = request.getfixturevalue(bundle_name)
    x, t = batch
    whole = ours(bundle, method, x, t, **({"batch_size": 5} if method in ("scorecam", "ablationcam") else {}))
    for i in range(N):
        one = ours(bundle, method, x[i:i + 1], t[i:i + 1])
        torch.testing.assert_close(whole.maps[i:i + 1], one.maps, atol=1e-9, rtol=0)


def test_scorecam_default_upsamples_masks_without_align_corners(cnn, batch):
    """SPEC §1: up uses align_corners=False. The peer-compatible option changes the maps."""
    x, t = batch
    default = explain(cnn, x, t, "scorecam").maps
    peerlike = explain(cnn, x, t, "scorecam", align_corners=True).maps
    assert (default - peerlike).abs().max() > 1e-4


def test_scorecam_by_hand(cnn, batch):
    """The formula written out on one image, with the baseline term the implementation drops."""
    x, t = batch
    x, c = x[:1], int(t[0])
    with torch.no_grad():
        from opticam_core.hooks import capture

        with capture(cnn.target) as cap:
            cnn.model(x)
        feats = cap.output[0]
        K = feats.shape[0]
        masks = normalize(upsample(feats, x.shape[-2:]))
        y = cnn.model(x * masks[:, None])[:, c]
        y_base = cnn.model(torch.zeros_like(x))[0, c]
        w = torch.softmax(y - y_base, 0)
        cam = (w[:, None, None] * feats).sum(0).clamp_min(0)
        expected = normalize(upsample(cam[None], x.shape[-2:]))
    assert K == 8
    torch.testing.assert_close(explain(cnn, x, [c], "scorecam").maps, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("use_tail", [True, False])
def test_ablationcam_tail_equals_full_forwards(cnn, batch, use_tail):
    """The tail-only path (ResNet/VGG/EfficientNet heads) gives exactly the full-forward result."""
    x, t = batch
    assert cnn.tail is not None
    by_tail = explain(cnn, x, t, "ablationcam", use_tail=True).maps
    full = explain(cnn, x, t, "ablationcam", use_tail=use_tail, batch_size=3).maps
    torch.testing.assert_close(by_tail, full, atol=1e-10, rtol=0)


def test_ablationcam_by_hand(cnn, batch):
    """w_k = (y_c − y_c^(k)) / y_c with channel k zeroed, on one image, written out."""
    x, t = batch
    x, c = x[1:2], int(t[1])
    net = cnn.model.net
    with torch.no_grad():
        a = net.features((x - cnn.model.mean) / cnn.model.std)[0]
        y = net.head(a[None])[0, c]
        ablated = a[None].repeat(a.shape[0], 1, 1, 1)
        for k in range(a.shape[0]):
            ablated[k, k] = 0
        yk = net.head(ablated)[:, c]
        w = (y - yk) / y
        cam = (w[:, None, None] * a).sum(0).clamp_min(0)
        expected = normalize(upsample(cam[None], x.shape[-2:]))
    torch.testing.assert_close(explain(cnn, x, [c], "ablationcam").maps, expected, atol=1e-10, rtol=0)


def test_ablationcam_by_hand_on_transformer_tokens(vit, batch):
    """At `norm1` (the paper's layer, where the peer would write min − 1e7 instead of 0): channel k
    zeroed in every token, class token included, as the peer's AblationLayerVit does at a ReLU."""
    x, t = batch
    x, c = x[2:3], int(t[2])
    layer = vit.target
    with torch.no_grad():
        from opticam_core.hooks import capture

        with capture(layer) as cap:
            y = vit.model(x)[0, c]
        tokens = cap.output
        K = tokens.shape[-1]
        yk = torch.empty(K, dtype=x.dtype)
        for k in range(K):
            def zero(_m, _i, out, k=k):
                out = out.clone()
                out[..., k] = 0
                return out
            handle = layer.register_forward_hook(zero)
            try:
                yk[k] = vit.model(x)[0, c]
            finally:
                handle.remove()
        w = (y - yk) / y
        feats = vit.features(tokens)[0]
        cam = (w[:, None, None] * feats).sum(0).clamp_min(0)
        expected = normalize(upsample(cam[None], x.shape[-2:]))
    mine = explain(vit, x, [c], "ablationcam").maps
    assert_informative(torch.cat([mine, explain(vit, x, [(c + 1) % 6], "ablationcam").maps]), at_least=1)
    torch.testing.assert_close(mine, expected, atol=1e-10, rtol=0)
