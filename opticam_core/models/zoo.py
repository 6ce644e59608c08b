"""The built-in models as data (`BUILTIN`, `ALIASES`) and `load_model`, which builds any of them,
or any other torchvision or timm model by name with an explicit `layer=`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import nn

from .bundle import IMAGENET_MEAN, IMAGENET_STD, ModelBundle, wrap_model
from .checkpoints import load_checkpoint
from .errors import ModelError
from .networks import (
    imagenet_classes,
    is_known_arch,
    lite0_net,
    replace_head,
    timm_net,
    timm_normalisation,
    torchvision_net,
)

#: `weights=` default: the model's own pretrained set (the packaged file for efficientnet_lite0).
DEFAULT = "default"


@dataclass(frozen=True)
class ModelConfig:
    source: str  # "torchvision" | "timm" | "lite0"
    arch: str
    layer: str  # dotted path inside the network
    weights: str | None = None  # the pretrained set that DEFAULT means
    tokens: int | None = None  # prefix tokens to drop (transformers); None for CNNs
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: tuple[int, int] = (224, 224)
    resize: int = 256


BUILTIN: dict[str, ModelConfig] = {
    "resnet50": ModelConfig("torchvision", "resnet50", "layer4", weights="IMAGENET1K_V1"),
    "vgg16_bn": ModelConfig("torchvision", "vgg16_bn", "features.42", weights="IMAGENET1K_V1"),
    "vit_base_patch16_224": ModelConfig(
        "timm", "vit_base_patch16_224", "blocks.11.norm1", weights="augreg2_in21k_ft_in1k",
        tokens=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    ),
    "deit_base_patch16_224": ModelConfig(
        "timm", "deit_base_patch16_224", "blocks.11.norm1", weights="fb_in1k", tokens=1,
    ),
    "efficientnet_lite0": ModelConfig("lite0", "efficientnet_lite0", "bn2", weights="packaged"),
}
#: Other names of the built-ins, as the paper and the usual shorthands write them. The paper says
#: VGG16; its layer features[42] exists only in the batch-norm variant.
ALIASES = {
    "vgg16": "vgg16_bn",
    "vit_b": "vit_base_patch16_224", "vit-b": "vit_base_patch16_224", "vit_b16": "vit_base_patch16_224",
    "deit_b": "deit_base_patch16_224", "deit-b": "deit_base_patch16_224",
    "resnet-50": "resnet50",
}


def available_models() -> list[str]:
    return sorted(BUILTIN)


@dataclass(frozen=True)
class Recipe:
    """What `load_model` will build, every default resolved: two recipes that are equal build the
    same model (the job fingerprints runs with it, without building anything)."""

    name: str                      # the canonical name (aliases resolved)
    weights: str | None            # the pretrained set fetched, None when random or from a checkpoint
    checkpoint: str | None
    num_classes: int | None
    layer: str | None              # None only for a non-built-in model given no layer
    resize: int
    input_size: tuple[int, int]
    normalize: bool = True         # False: the network sees [0,1] pixels, no mean/std (paper Table A.14)


def recipe(name: str, *, weights: str | None = DEFAULT, checkpoint=None, num_classes: int | None = None,
           layer: str | None = None, normalize: bool = True) -> Recipe:
    name = ALIASES.get(name, name)
    cfg = BUILTIN.get(name)
    if checkpoint is not None and weights == DEFAULT:
        weights = None  # the checkpoint replaces pretrained weights; do not fetch them
    pretrained = (cfg.weights if cfg else "DEFAULT") if weights == DEFAULT else weights
    geometry = cfg or ModelConfig(source="", arch=name, layer="")  # the defaults for any other model
    return Recipe(name=name, weights=pretrained,
                  checkpoint=None if checkpoint is None or isinstance(checkpoint, Mapping) else str(checkpoint),
                  num_classes=num_classes, layer=layer or (cfg.layer if cfg else None),
                  resize=geometry.resize, input_size=tuple(geometry.input_size), normalize=bool(normalize))


def load_model(
    name: str,
    *,
    weights: str | None = DEFAULT,
    checkpoint=None,
    num_classes: int | None = None,
    layer: str | None = None,
    device=None,
    classes: Sequence[str] | None = None,
    normalize: bool = True,
) -> ModelBundle:
    """Build a frozen, normalised classifier and its saliency target layer.

    name: a built-in (`available_models()`), or any torchvision / timm model name (then `layer=`
    is required). weights: DEFAULT (the model's pretrained set), a torchvision weights enum name or
    a timm pretrained tag, or None for random weights. checkpoint: a local path or fsspec URI
    (`s3://…`) of a state dict, loaded after the head is resized to `num_classes`. normalize:
    False feeds the network [0,1] pixels without its mean/std (the paper's Table A.14 study).
    """
    r = recipe(name, weights=weights, checkpoint=checkpoint, num_classes=num_classes, layer=layer,
               normalize=normalize)
    name, pretrained, layer = r.name, r.weights, r.layer
    cfg = BUILTIN.get(name)
    if layer is None:
        if not is_known_arch(name):
            raise _unknown_model(name)
        raise ModelError(f"{name!r} is not a built-in model: pass layer='dotted.module.path' (the target layer)")

    net, found_classes = _network(name, cfg, pretrained)
    if num_classes is not None:
        replace_head(net, num_classes)
        found_classes = None
    if checkpoint is not None:
        load_checkpoint(net, checkpoint, name)

    mean, std = (cfg.mean, cfg.std) if cfg else timm_normalisation(net)
    if not r.normalize:  # an identity `Normalized`: the bundle's shape stays the one methods expect
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return wrap_model(
        net, layer, name=name, mean=mean, std=std,
        prefix_tokens=cfg.tokens if cfg else "auto",
        input_size=r.input_size,
        resize=r.resize,
        classes=classes if classes is not None else found_classes,
        device=device,
        info={"weights": pretrained if checkpoint is None else None, "checkpoint": r.checkpoint,
              "normalize": r.normalize},
    )


def _network(name: str, cfg: ModelConfig | None, pretrained: str | None) -> tuple[nn.Module, list[str] | None]:
    """The bare network with its pretrained weights, and its class names where they are known."""
    if cfg is not None and cfg.source == "lite0":
        if pretrained in ("packaged", "DEFAULT"):
            return lite0_net(), imagenet_classes()
        return timm_net("efficientnet_lite0", pretrained), None
    source = cfg.source if cfg else None
    arch = cfg.arch if cfg else name
    if source in (None, "torchvision"):
        built = torchvision_net(arch, pretrained)
        if built is not None:
            return built
    if source in (None, "timm"):
        net = timm_net(arch, pretrained)
        if net is not None:
            return net, imagenet_classes() if pretrained and net.num_classes == 1000 else None
    raise _unknown_model(name)


def meta_network(name: str) -> nn.Module | None:
    """The bare network `load_model(name)` would build (a built-in, an alias, or a torchvision/
    timm name), on the meta device: its structure without weights or memory, in a fraction of a
    second, for checks and estimates before anything loads. None when neither library knows the
    name; an architecture that cannot be built on meta raises."""
    import torch

    name = ALIASES.get(name, name)
    cfg = BUILTIN.get(name)
    source, arch = (cfg.source, cfg.arch) if cfg else (None, name)
    with torch.device("meta"):
        if source in (None, "torchvision"):
            built = torchvision_net(arch, None)
            if built is not None:
                return built[0]
        return timm_net(arch, None) if source != "torchvision" else None


def _unknown_model(name: str) -> ModelError:
    return ModelError(
        f"unknown model {name!r}: not a built-in ({', '.join(available_models())}) "
        "and not a torchvision or timm model name"
    )
