"""The model zoo: built-in layers and map sizes, freezing, normalisation inside, the packaged
EfficientNet-Lite0 weights, checkpoints, offline behaviour and error messages.

Big networks are built with weights=None (no network, ever); one at a time, so memory stays low.
"""

from __future__ import annotations

import urllib.error

import pytest
import torch

from opticam_core import (
    BUILTIN,
    ModelError,
    WeightsUnavailableError,
    load_model,
    wrap_model,
)
from opticam_core.hooks import capture, hook_count

from . import _toys


def layer_output(bundle, x):
    with torch.no_grad(), capture(bundle.target) as cap:
        logits = bundle.model(x)
    return cap.output, logits


def forward_seen_by_net(bundle, x):
    """(layer output, logits, the tensor the bare network received) from one forward."""
    seen = {}
    handle = bundle.model.net.register_forward_pre_hook(lambda _m, args: seen.setdefault("input", args[0]))
    try:
        raw, logits = layer_output(bundle, x)
    finally:
        handle.remove()
    return raw, logits, seen["input"]


def reference_normalisation(name: str):
    """Mean/std as the weights' own metadata states them (torchvision enum / timm pretrained cfg)."""
    cfg = BUILTIN[name]
    if cfg.source == "torchvision":
        import torchvision

        tf = torchvision.models.get_model_weights(cfg.arch)[cfg.weights].transforms()
        return tuple(tf.mean), tuple(tf.std), tf.crop_size[0], tf.resize_size[0]
    import timm

    arch = "efficientnet_lite0" if cfg.source == "lite0" else cfg.arch
    tag = "ra_in1k" if cfg.source == "lite0" else cfg.weights
    pc = timm.models.get_pretrained_cfg(f"{arch}.{tag}")
    return tuple(pc.mean), tuple(pc.std), pc.input_size[-1], None


# name → (layer inside the network, feature map K×h×w at 224, whether a tail must exist)
PAPER_LAYERS = {
    "resnet50": ("layer4", (2048, 7, 7), True),
    "vgg16_bn": ("features.42", (512, 14, 14), True),
    "vit_base_patch16_224": ("blocks.11.norm1", (768, 14, 14), False),
    "deit_base_patch16_224": ("blocks.11.norm1", (768, 14, 14), False),
}


@pytest.mark.parametrize("name", list(PAPER_LAYERS))
def test_builtin_paper_models(name):
    layer, shape, has_tail = PAPER_LAYERS[name]
    bundle = load_model(name, weights=None)
    assert bundle.layer_name == layer and bundle.layer == f"net.{layer}"
    assert bundle.input_size == (224, 224) and bundle.resize == 256
    # frozen
    assert not bundle.model.training
    assert all(not p.requires_grad for p in bundle.model.parameters())
    # the layer's map, after the token reshape for transformers
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    raw, logits, seen = forward_seen_by_net(bundle, x)
    assert tuple(bundle.features(raw).shape[1:]) == shape
    if not has_tail:
        assert raw.shape == (1, 1 + 14 * 14, 768)  # the class token is there before the reshape …
        torch.testing.assert_close(bundle.features(raw)[0, :, 0, 0], raw[0, 1])  # … and dropped after
    # normalisation inside, with the constants the weights' own metadata states: the bare network
    # receives the normalised image (so the logits are its logits on it)
    mean, std, crop, resize = reference_normalisation(name)
    assert (BUILTIN[name].mean, BUILTIN[name].std) == (mean, std)
    assert crop == 224 and resize in (None, 256)
    torch.testing.assert_close(seen, (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    # the tail: exact where it exists, absent for transformers
    if has_tail:
        assert bundle.tail is not None
        torch.testing.assert_close(bundle.tail(raw), logits, atol=1e-5, rtol=1e-5)
    else:
        assert bundle.tail is None
    assert hook_count(bundle.model) == 0


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet_lite0")


def test_efficientnet_lite0_packaged_weights_classify_real_photos(lite0):
    x = torch.cat([_toys.skimage_photo("chelsea"), _toys.skimage_photo("coffee")])
    with torch.no_grad():
        logits = lite0.model(x)
    top = logits.argmax(1).tolist()
    assert top[0] in (281, 282, 285), [lite0.classes[i] for i in top]  # tabby / tiger cat / Egyptian cat
    assert top[1] == 967, [lite0.classes[i] for i in top]  # espresso
    assert logits.softmax(1)[1, 967] > 0.5
    assert len(lite0.classes) == 1000 and "tabby" in lite0.classes[281] and "espresso" in lite0.classes[967]


def test_efficientnet_lite0_layer_tail_and_normalisation(lite0):
    assert lite0.layer_name == "bn2" and lite0.reshape is None
    assert all(not p.requires_grad for p in lite0.model.parameters()) and not lite0.model.training
    x = _toys.skimage_photo("chelsea")
    raw, logits = layer_output(lite0, x)
    assert raw.shape == (1, 1280, 7, 7)
    assert raw.min() >= 0 and raw.max() <= 6  # bn2 includes ReLU6: maps after the activation
    torch.testing.assert_close(lite0.tail(raw), logits, atol=1e-5, rtol=1e-5)
    mean, std, _, _ = reference_normalisation("efficientnet_lite0")
    with torch.no_grad():
        expected = lite0.model.net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(logits, expected)


# --------------------------------------------------------------------------------------------
# Errors that name the problem and the valid choices


def test_unknown_model_name():
    with pytest.raises(ModelError) as err:
        load_model("resnet5000")
    msg = str(err.value)
    assert "resnet5000" in msg and "unknown model" in msg
    assert all(name in msg for name in BUILTIN)


def test_known_architecture_needs_a_layer():
    with pytest.raises(ModelError, match="layer="):
        load_model("resnet18", weights=None)


@pytest.mark.parametrize("name, layer", [("resnet18", "layer9"), ("efficientnet_lite0", "bn3")])
def test_missing_layer(name, layer):
    with pytest.raises(ModelError) as err:
        load_model(name, weights=None, layer=layer)
    msg = str(err.value)
    assert repr(layer) in msg and "does not exist" in msg
    assert "named_modules" in msg and ("fc" in msg or "classifier" in msg)  # the real modules are listed


def test_unknown_weights_names_valid_ones():
    with pytest.raises(ModelError) as err:
        load_model("resnet18", weights="IMAGENET9", layer="layer4")
    assert "IMAGENET9" in str(err.value) and "IMAGENET1K_V1" in str(err.value)
    with pytest.raises(ModelError, match="nonsense"):
        load_model("vit_tiny_patch16_224", weights="nonsense", layer="blocks.11.norm1")


# --------------------------------------------------------------------------------------------
# Checkpoints


def _logits(bundle, seed=2):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return bundle.model(x)


@pytest.fixture(scope="module")
def resnet18():
    return load_model("resnet18", weights=None, layer="layer4")


def test_checkpoint_round_trip(tmp_path, resnet18):
    path = tmp_path / "r18.pt"
    torch.save(resnet18.model.net.state_dict(), path)
    again = load_model("resnet18", checkpoint=str(path), layer="layer4")
    torch.testing.assert_close(_logits(again), _logits(resnet18))
    assert again.info["checkpoint"] == str(path) and again.info["weights"] is None
    # the whole wrapper's state dict (net.* keys plus the normalisation buffers) loads too
    torch.save(resnet18.model.state_dict(), path)
    torch.testing.assert_close(_logits(load_model("resnet18", checkpoint=path, layer="layer4")), _logits(resnet18))
    # a training checkpoint {"state_dict": {"module.…": …}} as DataParallel writes it
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in resnet18.model.net.state_dict().items()}}, path)
    torch.testing.assert_close(_logits(load_model("resnet18", checkpoint=path, layer="layer4")), _logits(resnet18))


def test_checkpoint_without_num_batches_tracked(tmp_path, resnet18):
    """torchvision's own ImageNet files predate BatchNorm's num_batches_tracked: they must load."""
    state = {k: v for k, v in resnet18.model.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    torch.testing.assert_close(_logits(load_model("resnet18", checkpoint=path, layer="layer4")), _logits(resnet18))


def test_checkpoint_with_new_head(tmp_path):
    """The medical models: a fine-tuned ResNet/VGG with num_classes outputs, saved and reloaded."""
    tuned = load_model("resnet18", weights=None, num_classes=8, layer="layer4")
    assert tuned.classes is None and tuned.tail is not None
    path = tmp_path / "tuned.pt"
    torch.save(tuned.model.net.state_dict(), path)
    again = load_model("resnet18", checkpoint=path, num_classes=8, layer="layer4")
    out = _logits(again)
    assert out.shape == (2, 8)
    torch.testing.assert_close(out, _logits(tuned))
    # without num_classes the head does not fit: the message says so and suggests the fix
    with pytest.raises(ModelError) as err:
        load_model("resnet18", checkpoint=path, layer="layer4")
    msg = str(err.value)
    assert "fc.weight" in msg and "(8, 512)" in msg and "(1000, 512)" in msg and "num_classes=" in msg


def test_checkpoint_with_new_head_builtin(tmp_path, lite0):
    """A built-in (EfficientNet-Lite0) fine-tuned to 3 classes: the checkpoint replaces the
    packaged weights, its layer and tail are the built-in's."""
    tuned = load_model("efficientnet_lite0", weights=None, num_classes=3)
    path = tmp_path / "lite0.pt"
    torch.save(tuned.model.net.state_dict(), path)
    again = load_model("efficientnet_lite0", checkpoint=path, num_classes=3)
    assert again.layer_name == "bn2" and again.tail is not None
    torch.testing.assert_close(_logits(again), _logits(tuned))


def test_checkpoint_missing_and_unexpected_keys(tmp_path, resnet18):
    state = resnet18.model.net.state_dict()
    broken = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    broken["extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(ModelError) as err:
        load_model("resnet18", checkpoint=path, layer="layer4")
    msg = str(err.value)
    assert "missing" in msg and "layer4.1." in msg and "unexpected" in msg and "extra.weight" in msg


def test_checkpoint_unreadable(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model("resnet18", checkpoint=tmp_path / "nope.pt", layer="layer4")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        load_model("resnet18", checkpoint=junk, layer="layer4")
    torch.save([torch.zeros(1)], junk)
    with pytest.raises(ModelError, match="not a state dict"):
        load_model("resnet18", checkpoint=junk, layer="layer4")


# --------------------------------------------------------------------------------------------
# Offline: pretrained weights that cannot be fetched


def _offline(*_args, **_kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize("name, layer", [("resnet18", "layer4"), ("resnet50", None)])
def test_torchvision_weights_offline(monkeypatch, name, layer):
    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url", _offline)
    with pytest.raises(WeightsUnavailableError) as err:
        load_model(name, weights="DEFAULT", layer=layer) if layer else load_model(name)
    msg = str(err.value)
    assert "could not fetch" in msg and "checkpoint=" in msg and "URLError" in msg
    assert isinstance(err.value, ModelError)  # callers catching ModelError catch this too


def test_timm_weights_offline(monkeypatch):
    import timm.models._builder as builder

    def no_hub(*_args, **_kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, fn, no_hub)
    with pytest.raises(WeightsUnavailableError, match="checkpoint="):
        load_model("vit_tiny_patch16_224", weights="DEFAULT", layer="blocks.11.norm1")


# --------------------------------------------------------------------------------------------
# Any model by name, and wrap_model for one's own network


def test_any_timm_model_by_name_with_layer():
    """A timm transformer that is not built in: prefix tokens found by itself, 14×14 map."""
    bundle = load_model("vit_tiny_patch16_224", weights=None, layer="blocks.11.norm1")
    assert bundle.reshape is not None and bundle.tail is None
    raw, _ = layer_output(bundle, torch.rand(1, 3, 224, 224))
    assert bundle.features(raw).shape == (1, 192, 14, 14)


def test_wrap_model_checks_an_explicit_tail():
    net = _toys.tiny_cnn()
    bundle = _toys.bundle_for(net, "features.10", tail=net.head, prefix_tokens=None)
    assert bundle.tail is net.head
    with pytest.raises(ModelError, match="tail"):
        _toys.bundle_for(net, "features.10", tail=lambda a: net.head(a) + 1, prefix_tokens=None)
    with pytest.raises(ModelError, match="does not exist"):
        wrap_model(net, "features.99")
    # float64 networks keep float64 normalisation buffers
    assert bundle.model.mean.dtype == torch.float64


def test_meta_network_is_the_architecture_load_model_builds_without_weights():
    """One builder serves every check before loading (layers at --check, sanity blocks, attention
    requirement, costs): the same network as load_model, on the meta device, aliases resolved."""
    from opticam_core.models import meta_network

    vgg = meta_network("vgg16")  # alias of the built-in vgg16_bn (torchvision)
    assert type(vgg).__name__ == "VGG" and any(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules())
    lite0 = meta_network("efficientnet_lite0")  # the packaged built-in: timm's architecture
    assert type(lite0).__name__ == "EfficientNet"
    assert type(meta_network("deit_tiny_patch16_224")).__name__ == "VisionTransformer"  # any timm name
    for net in (vgg, lite0):
        assert all(p.is_meta for p in net.parameters())
    assert meta_network("no_such_network") is None


@pytest.mark.parametrize("name, path, features", [("resnet50", "fc", 2048), ("vgg16", "classifier.6", 4096),
                                                  ("vit_b_16", "heads.head", 768), ("densenet121", "classifier", 1024)])
def test_the_head_found_and_replaced_is_the_last_linear_layer(name, path, features):
    """One lookup serves the resize (`replace_head`) and fine-tuning's head-only stage (`classifier`)."""
    from opticam_core.models.networks import classifier, head_path, replace_head
    from opticam_core.models.zoo import meta_network

    net = meta_network(name)
    assert head_path(net) == path and classifier(net) is net.get_submodule(path)
    with torch.device("meta"):
        replace_head(net, 7)
    assert classifier(net).out_features == 7 and classifier(net).in_features == features
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert classifier(net) is last
    with pytest.raises(Exception, match="cannot find a linear classifier head in Sequential"):
        replace_head(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), 2)
