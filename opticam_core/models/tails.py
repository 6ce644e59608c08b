"""Tails: the network after the target layer, run on its own (Ablation-CAM)."""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..hooks import capture


def find_tail(net: nn.Module, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function from the layer's output to logits, for the architectures where one exists."""
    import torchvision

    if isinstance(net, torchvision.models.ResNet) and layer == "layer4":
        return lambda a: net.fc(torch.flatten(net.avgpool(a), 1))
    if isinstance(net, torchvision.models.VGG):
        m = re.fullmatch(r"features\.(\d+)", layer)
        if m:
            rest = net.features[int(m.group(1)) + 1:]
            return lambda a: net.classifier(torch.flatten(net.avgpool(rest(a)), 1))
    if hasattr(net, "forward_head") and hasattr(net, "forward_features"):
        return lambda a: net.forward_head(a)  # timm: valid iff the layer ends forward_features
    return None


@torch.no_grad()
def tail_is_exact(model: nn.Module, layer: str, tail, input_size) -> bool:
    """Whether `tail(layer output) == logits` on a probe image: the tail is trusted only if it is exact."""
    param = next(model.parameters())
    probe = torch.rand(1, 3, *input_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=param.device, dtype=param.dtype)
    with capture(model.get_submodule(layer)) as cap:
        logits = model(probe)
    try:
        out = tail(cap.output)
    except Exception:
        return False
    return out.shape == logits.shape and torch.allclose(out, logits, rtol=1e-4, atol=1e-4)
