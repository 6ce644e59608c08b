"""The bundle the saliency methods take: a frozen network with its normalisation inside, its
target layer, the reshape of that layer's output into maps, and (where exact) the network's tail.
`wrap_model` makes one from any classifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import ModelError
from .tails import find_tail, tail_is_exact

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """[0,1] pixels → mean/std normalisation → the wrapped network."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # Convolutions run markedly faster in channels-last layout on CPUs (oneDNN) and GPUs
        # (tensor cores); the values are the same, only the memory order changes.
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in net.modules())
        if self.channels_last:
            net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def tokens_to_map(prefix_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """B×(p+hw)×K tokens → B×K×h×w, dropping the p prefix (class/distillation) tokens."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:
            raise ModelError(f"expected B×N×K tokens at the target layer, got shape {tuple(tokens.shape)}")
        patches = tokens[:, prefix_tokens:]
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ModelError(
                f"{patches.shape[1]} patch tokens after dropping {prefix_tokens} prefix tokens "
                "do not form a square grid; pass a reshape for this model"
            )
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)

    reshape.prefix_tokens = prefix_tokens  # type: ignore[attr-defined]
    return reshape


@dataclass
class ModelBundle:
    """A frozen classifier ready for saliency methods.

    `model` maps B×3×H×W images in [0,1] to logits. `layer` is the dotted path of the target layer
    inside `model`; `reshape` turns that layer's output into B×K×h×w feature maps (None: already
    maps). `tail`, when known, maps the layer's output to logits without the rest of the network.
    """

    name: str
    model: nn.Module
    layer: str
    input_size: tuple[int, int] = (224, 224)
    resize: int = 256
    classes: list[str] | None = None
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None
    tail: Callable[[torch.Tensor], torch.Tensor] | None = None
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def target(self) -> nn.Module:
        return self.model.get_submodule(self.layer)

    @property
    def layer_name(self) -> str:
        """The layer path inside the wrapped network, as users name it (`layer4`)."""
        return self.layer.removeprefix("net.")

    def features(self, raw: torch.Tensor) -> torch.Tensor:
        return raw if self.reshape is None else self.reshape(raw)

    def to(self, device) -> "ModelBundle":
        self.model.to(device)
        return self


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def wrap_model(
    net: nn.Module,
    layer: str,
    *,
    name: str = "custom",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    prefix_tokens: int | None | str = "auto",
    tail="auto",
    input_size: tuple[int, int] = (224, 224),
    resize: int = 256,
    classes: Sequence[str] | None = None,
    device=None,
    info: dict | None = None,
) -> ModelBundle:
    """Bundle any classifier `net` (normalised images → logits) for the saliency methods.

    The network is frozen (eval mode, no parameter gradients) and wrapped so that it takes [0,1]
    pixels, normalising with `mean`/`std` inside. layer: dotted path of the target layer in `net`.
    prefix_tokens: for transformers, the number of leading tokens (class/distillation) to drop
    before reshaping tokens to a square map; None for CNNs; "auto" reads timm's
    `num_prefix_tokens`. tail: a function from the layer's output to logits (Ablation-CAM then runs
    only it); "auto" finds one for torchvision ResNet/VGG and timm networks whose layer ends
    `forward_features`; None for none. A tail is kept only if it reproduces the logits exactly on a
    probe image; a tail passed explicitly that does not raises ModelError.
    """
    try:
        net.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in net.named_modules() if n]
        raise ModelError(
            f"layer {layer!r} does not exist in {name!r}; its last modules are {names[-12:]} "
            f"({len(names)} in all: list them with [n for n, _ in model.net.named_modules()])"
        ) from None
    model = freeze(Normalized(net, mean, std))
    dtype = next(net.parameters()).dtype  # the normalisation follows e.g. a float64 network
    model.mean, model.std = model.mean.to(dtype), model.std.to(dtype)
    if device is not None:
        model.to(device)
    tokens = _prefix_tokens(net) if prefix_tokens == "auto" else prefix_tokens
    bundle = ModelBundle(
        name=name,
        model=model,
        layer=f"net.{layer}",
        input_size=tuple(input_size),
        resize=resize,
        classes=list(classes) if classes is not None else None,
        reshape=tokens_to_map(tokens) if tokens is not None else None,
        info=dict(info or {}),
    )
    explicit = tail not in ("auto", None)
    candidate = find_tail(net, layer) if tail == "auto" else tail
    if candidate is not None and tokens is None:
        if tail_is_exact(model, bundle.layer, candidate, bundle.input_size):
            bundle.tail = candidate
        elif explicit:
            raise ModelError(f"the tail given for {name!r} does not reproduce the logits from layer {layer!r}")
    return bundle


def _prefix_tokens(net: nn.Module) -> int | None:
    """Transformers that keep prefix tokens (timm ViT/DeiT); None for convolutional networks."""
    n = getattr(net, "num_prefix_tokens", None)
    return int(n) if n is not None else None
