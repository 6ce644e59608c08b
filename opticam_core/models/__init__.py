"""The model zoo: a frozen network with its normalisation inside, its target layer and its reshape.

`load_model(name, ...)` returns a `ModelBundle`. The bundle's `model` takes images in [0,1] pixel
space and returns logits, so a saliency mask multiplies pixels, never normalised values (SPEC §1).
Built-in configurations are data (`BUILTIN`); any other torchvision or timm model works by name
with an explicit `layer=`.

Modules: zoo (the built-ins, `load_model`), bundle (`ModelBundle`, `wrap_model`), networks
(torchvision / timm / packaged EfficientNet-Lite0 networks), checkpoints (state dicts), tails
(the network after the target layer), errors.
"""

from .bundle import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelBundle,
    Normalized,
    freeze,
    tokens_to_map,
    wrap_model,
)
from .errors import ModelError, WeightsUnavailableError
from .networks import imagenet_classes
from .zoo import (
    ALIASES,
    BUILTIN,
    DEFAULT,
    ModelConfig,
    Recipe,
    available_models,
    load_model,
    meta_network,
    recipe,
)

__all__ = [
    "ALIASES", "BUILTIN", "DEFAULT", "IMAGENET_MEAN", "IMAGENET_STD", "ModelBundle", "ModelConfig", "ModelError",
    "Normalized", "Recipe", "WeightsUnavailableError", "available_models", "freeze", "imagenet_classes",
    "load_model", "meta_network", "recipe", "tokens_to_map", "wrap_model",
]
