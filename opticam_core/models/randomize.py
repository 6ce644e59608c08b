"""Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps";
the Opti-CAM paper's App. G / Fig. A6): the network's blocks re-initialised from the top (the
logits) downwards, one more block each time, cumulatively.

`cascade_blocks(net)` lists a network's blocks from the top; `randomized(bundle, n, seed)` is a
new bundle whose top n blocks are re-initialised; the original is never touched.

What a block is, per architecture (N = 1…5 = the top N of these; the paper says "5 layers" and
not which, so this is our choice, following Adebayo's InceptionV3 order: the logits, then the
network's blocks from the top):

| model | blocks from the top | N = 1 … 5 |
|---|---|---|
| ResNet (torchvision) | `fc`, the bottlenecks `layer4.2` … `layer1.0`, the stem `conv1`+`bn1` | fc, layer4.2, layer4.1, layer4.0, layer3.5 |
| VGG (torchvision) | the classifier's Linear layers from the top, then each conv with its BatchNorm from the top | classifier.6, classifier.3, classifier.0, features.40(+41), features.37(+38) |
| ViT / DeiT (timm) | `head` (with the final `norm`, `fc_norm`, DeiT's `head_dist`), `blocks.11` … `blocks.0`, `patch_embed` | head, blocks.11, blocks.10, blocks.9, blocks.8 |
| EfficientNet (timm, Lite0 included) | `classifier`, `conv_head`+`bn2`, the blocks `blocks.6.0` … `blocks.0.0` from the top, the stem `conv_stem`+`bn1` | classifier, conv_head, blocks.6.0, blocks.5.3, blocks.5.2 |

ResNet50 has 18 blocks, VGG16_bn 16, ViT-B and DeiT-B 14, EfficientNet-Lite0 19. ViT's `cls_token`
and `pos_embed` belong to no block (they are the network's own parameters, below every block).

How a block is re-initialised: every module of the block that owns parameters draws them again
from its own default initialisation, `reset_parameters()` (PyTorch's defaults: Kaiming-uniform
for Conv/Linear, weight 1 and bias 0 for the norms, timm's LayerScale its init value). For the
timm networks this is PyTorch's default, not timm's own training init (truncated normal 0.02 for
ViT); both are "a random network", and Adebayo used their framework's defaults too.

BatchNorm running statistics are kept by default (`reset_stats=False`): Adebayo's code
re-initialises TensorFlow's *trainable* variables, and the moving mean/variance are not among
them. `reset_stats=True` resets them as well (mean 0, variance 1: the norm then only applies its
re-drawn affine map).

Determinism: block k (counting from the top, 0-based) draws from the CPU generator seeded with a
number derived from (seed, k) only, on a CPU copy of its modules, so the result is the same on any
device, does not touch the global RNG, and the cascade is consistent: the model with N blocks
randomised equals the one with N − 1 plus block N re-drawn.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .bundle import ModelBundle
from .errors import ModelError

SUPPORTED = ("torchvision ResNet", "torchvision VGG", "timm VisionTransformer (ViT, DeiT)",
             "timm EfficientNet (EfficientNet-Lite0 included)")


@dataclass(frozen=True)
class Block:
    """One unit of the cascade: `name` (for plots and messages) and the module `paths` inside the
    bare network (e.g. a VGG conv and its BatchNorm) that are re-initialised together."""

    name: str
    paths: tuple[str, ...]


def _has_params(net: nn.Module, path: str) -> bool:
    try:
        return any(True for _ in net.get_submodule(path).parameters())
    except AttributeError:
        return False


def _resnet(net) -> list[Block]:
    out = [Block("fc", ("fc",))]
    for stage in ("layer4", "layer3", "layer2", "layer1"):
        for i in reversed(range(len(getattr(net, stage)))):
            out.append(Block(f"{stage}.{i}", (f"{stage}.{i}",)))
    return out + [Block("conv1", ("conv1", "bn1"))]


def _vgg(net) -> list[Block]:
    out = [Block(f"classifier.{i}", (f"classifier.{i}",))
           for i in reversed(range(len(net.classifier))) if isinstance(net.classifier[i], nn.Linear)]
    feats = list(net.features)
    for i in reversed(range(len(feats))):
        if isinstance(feats[i], nn.Conv2d):
            paths = [f"features.{i}"]
            if i + 1 < len(feats) and isinstance(feats[i + 1], nn.modules.batchnorm._BatchNorm):
                paths.append(f"features.{i + 1}")
            out.append(Block(f"features.{i}", tuple(paths)))
    return out


def _vit(net) -> list[Block]:
    head = tuple(p for p in ("norm", "fc_norm", "head", "head_dist") if _has_params(net, p))
    out = [Block("head", head)]
    out += [Block(f"blocks.{i}", (f"blocks.{i}",)) for i in reversed(range(len(net.blocks)))]
    return out + [Block("patch_embed", ("patch_embed",))]


def _efficientnet(net) -> list[Block]:
    out = [Block("classifier", ("classifier",)), Block("conv_head", ("conv_head", "bn2"))]
    for s in reversed(range(len(net.blocks))):
        for b in reversed(range(len(net.blocks[s]))):
            out.append(Block(f"blocks.{s}.{b}", (f"blocks.{s}.{b}",)))
    return out + [Block("conv_stem", ("conv_stem", "bn1"))]


def _family(net: nn.Module) -> Callable[[nn.Module], list[Block]] | None:
    import torchvision

    if isinstance(net, torchvision.models.ResNet):
        return _resnet
    if isinstance(net, torchvision.models.VGG):
        return _vgg
    try:
        from timm.models.efficientnet import EfficientNet
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if isinstance(net, VisionTransformer):
        return _vit
    if isinstance(net, EfficientNet):
        return _efficientnet
    return None


def bare(net_or_bundle) -> nn.Module:
    """The bare network of a bundle (inside its `Normalized` wrapper), or the network itself."""
    model = net_or_bundle.model if isinstance(net_or_bundle, ModelBundle) else net_or_bundle
    return model.net if hasattr(model, "net") and hasattr(model, "mean") else model


def cascade_blocks(net) -> list[Block]:
    """The blocks of `net` (a bare network or a ModelBundle) from the top (logits) down; see the
    module docstring for each architecture. ModelError for an architecture we do not know."""
    net = bare(net)
    family = _family(net)
    if family is None:
        raise ModelError(f"cascading randomisation does not know the blocks of {type(net).__name__}; "
                         f"supported: {', '.join(SUPPORTED)}")
    return family(net)


def block_names(net) -> list[str]:
    return [b.name for b in cascade_blocks(net)]


def _seed_of(seed: int, k: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * k + 1) % (2**63 - 1)


def _reinit(module: nn.Module, reset_stats: bool) -> None:
    """Re-draw every parameter of `module` (and its submodules) from its module's own
    `reset_parameters()`, on a CPU copy with the current CPU generator, then copy into place."""
    for name, m in module.named_modules():
        own = list(m.named_parameters(recurse=False))
        if not own:
            continue
        if not callable(getattr(m, "reset_parameters", None)):
            raise ModelError(f"cannot re-initialise {type(m).__name__} at {name or '(block)'}: it owns parameters "
                             "but has no reset_parameters()")
        shell = copy.copy(m)  # shallow: its own tensors are replaced below, children are not used
        shell._parameters = {k: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                                    requires_grad=False)
                             for k, p in m._parameters.items()}
        shell._buffers = {k: None if b is None else b.detach().to("cpu", copy=True) for k, b in m._buffers.items()}
        shell._modules = {}
        with torch.no_grad():
            shell.reset_parameters()
            for k, p in m._parameters.items():
                if p is not None:
                    p.copy_(shell._parameters[k])
            if reset_stats:
                for k, b in m._buffers.items():
                    if b is not None:
                        b.copy_(shell._buffers[k])


def _copy_callable(fn, memo: dict):
    """A copy of `fn` that refers to the copied network: modules through the deep-copy memo of
    the model, closures (the zoo's tails close over the network) with their cells copied."""
    if fn is None:
        return None
    if isinstance(fn, types.FunctionType) and fn.__closure__:
        cells = tuple(types.CellType(copy.deepcopy(c.cell_contents, memo)) for c in fn.__closure__)
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
        new.__dict__.update(fn.__dict__)
        return new
    return copy.deepcopy(fn, memo)


def randomized(bundle: ModelBundle, n: int, seed: int = 0, *, reset_stats: bool = False) -> ModelBundle:
    """A new bundle (deep copy; `bundle` is untouched) whose top `n` blocks (`cascade_blocks`) are
    re-initialised, frozen and in eval mode like the original. n = 0: an equal copy."""
    blocks = cascade_blocks(bundle)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer ≥ 0, got {n!r}")
    if n > len(blocks):
        raise ValueError(f"{bundle.name} has {len(blocks)} blocks to randomise, not {n}")
    memo: dict = {}
    model = copy.deepcopy(bundle.model, memo)
    tail = _copy_callable(bundle.tail, memo)
    net = bare(model)
    for k, block in enumerate(blocks[:n]):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(seed, k))
            for path in block.paths:
                _reinit(net.get_submodule(path), reset_stats)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = {**bundle.info, "randomized": {"blocks": [b.name for b in blocks[:n]], "seed": int(seed),
                                          "reset_stats": bool(reset_stats)}}
    return dataclasses.replace(bundle, model=model, tail=tail, info=info)


def architecture(model_name: str) -> nn.Module:
    """The bare network of `model_name` (a built-in, alias, or torchvision/timm name; a `@layer`
    suffix ignored) built on the meta device, for checks at `--check` time."""
    from .zoo import BUILTIN, meta_network

    net = meta_network(model_name.split("@", 1)[0])
    if net is None:
        raise ModelError(f"unknown model {model_name!r}: not a built-in ({', '.join(sorted(BUILTIN))}) "
                         "and not a torchvision or timm model name")
    return net


def check_blocks(model_name: str, blocks: int, *, where: str = "metrics.sanity.blocks") -> list[str]:
    """The names of the top `blocks` blocks of `model_name` (built on the meta device); OptionsError
    naming `where` when the model has fewer blocks, ModelError for an architecture that
    cascading randomisation does not know."""
    from ..options import OptionsError

    names = block_names(architecture(model_name))
    if blocks > len(names):
        raise OptionsError([f"{where}: {blocks}, but {model_name} has only {len(names)} blocks to randomise "
                            f"(from the top: {', '.join(names)})"])
    return names[:blocks]


__all__ = ["Block", "SUPPORTED", "architecture", "bare", "block_names", "cascade_blocks", "check_blocks",
           "randomized"]
