"""Small models and inputs for tests: fast on a CPU, yet real enough that a wrong formula shows.

Every builder is deterministic (its own seed, the global RNG untouched) and returns networks in
float64 by default, so that batched and per-image computations, or ours and a peer's, can be
compared to ~1e-10 instead of float32 noise.

- `tiny_cnn()`: conv/BN/ReLU/pool ×3 → 8×8 maps of `width` channels at 32×32 input, then a head
  with a nonlinearity (1×1 conv, ReLU, global average pool, linear), so that ∂y/∂A varies over
  space and the gradient CAMs really differ from one another. Target layer: `features.10` (a ReLU,
  minimum 0: pytorch-grad-cam's Ablation-CAM zeros channels only there). Its head is `net.head`.
- `tiny_vit()`: a timm VisionTransformer (32×32 input, 8-px patches → 4×4 tokens + class token,
  ReLU MLPs). Target layers: `blocks.1.norm1` (the paper's choice for transformers) and
  `blocks.0.mlp.act` (a ReLU, for Ablation-CAM parity with pytorch-grad-cam).
- `cnn_bundle()`, `vit_bundle()`, `bundle_for()`: a `ModelBundle` around such a network, with
  normalisation inside (a non-trivial mean/std, so a test that forgets it fails).
- `images()`, `targets()`: inputs in [0,1] pixel space with some spatial structure.
- `skimage_photo()`: a real photo shipped with scikit-image, preprocessed like the pipeline
  (Resize 256 → CenterCrop 224), for the real-weights tests.
"""

from __future__ import annotations

import torch
from torch import nn

from opticam_core import ModelBundle, wrap_model

#: Normalisation used by the toy bundles (deliberately not ImageNet's, nor the identity).
TOY_MEAN = (0.4, 0.5, 0.6)
TOY_STD = (0.2, 0.25, 0.3)
TOY_SIZE = 32
NUM_CLASSES = 6


class TinyCNN(nn.Module):
    """A small VGG-like classifier: `features` (ends in a ReLU) → `head` (→ logits)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8):
        super().__init__()

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.features = nn.Sequential(*block(3, 6, True), *block(6, 8, True), *block(8, width, False))
        self.head = nn.Sequential(
            nn.Conv2d(width, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _calibrate_batchnorm(net: nn.Module, gen: torch.Generator) -> None:
    """Running statistics from a batch of toy images (as training would leave them), then random
    affine parameters: every channel varies over the image instead of being dead or saturated."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    net.train()
    with torch.no_grad():
        net(images(16, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)), dtype=torch.float32))
    net.eval()
    for m in bns:
        n = m.num_features
        m.momentum = 0.1
        m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
        m.bias.data.copy_(torch.randn(n, generator=gen) * 0.3)


def tiny_cnn(*, num_classes: int = NUM_CLASSES, width: int = 8, seed: int = 0,
             dtype: torch.dtype = torch.float64) -> TinyCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyCNN(num_classes, width)
        _calibrate_batchnorm(net, torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():  # logits on a scale of a few units, as in a trained classifier
            nn.init.normal_(net.head[-1].weight, std=0.5)
    return net.to(dtype).eval()


def tiny_vit(*, num_classes: int = NUM_CLASSES, seed: int = 0, dtype: torch.dtype = torch.float64,
             embed_dim: int = 16, depth: int = 2):
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = VisionTransformer(
            img_size=TOY_SIZE, patch_size=8, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
            num_heads=2, mlp_ratio=2.0, act_layer=nn.ReLU,
        )
        # timm's init gives near-zero heads and tiny logits; scale up so that classes differ.
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() >= 2:
                    p.mul_(8.0)
            nn.init.normal_(net.head.weight, std=1.0)
            nn.init.normal_(net.head.bias, std=0.1)
            # Trained LayerNorms have non-trivial affine parameters. With timm's (1, 0) the channel
            # mean of every token is exactly 0, so Σ_k A_k/K (Opti-CAM's uniform start) would vanish.
            for m in net.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.3)
    return net.to(dtype).eval()


class Counting(nn.Module):
    """`net`, counting its forwards (`calls`) and the batch size of each (`sizes`)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls, self.sizes = net, 0, []

    def forward(self, x):
        self.calls += 1
        self.sizes.append(x.shape[0])
        return self.net(x)


def bundle_for(net: nn.Module, layer: str, *, name: str = "toy", tail="auto",
               prefix_tokens="auto") -> ModelBundle:
    """A `ModelBundle` for a toy network taking TOY_SIZE images (normalisation TOY_MEAN/TOY_STD inside)."""
    return wrap_model(net, layer, name=name, mean=TOY_MEAN, std=TOY_STD, prefix_tokens=prefix_tokens,
                      tail=tail, input_size=(TOY_SIZE, TOY_SIZE), resize=TOY_SIZE)


def cnn_bundle(*, seed: int = 0, dtype: torch.dtype = torch.float64, width: int = 8,
               layer: str = "features.10", with_tail: bool = True) -> ModelBundle:
    """TinyCNN in a bundle; its head is the (verified) tail when the layer is `features.10`."""
    net = tiny_cnn(seed=seed, dtype=dtype, width=width)
    tail = net.head if with_tail and layer == "features.10" else None
    return bundle_for(net, layer, name="tiny_cnn", tail=tail, prefix_tokens=None)


def vit_bundle(*, seed: int = 0, dtype: torch.dtype = torch.float64, layer: str = "blocks.1.norm1") -> ModelBundle:
    """tiny_vit in a bundle; the class token is dropped and 16 tokens become a 4×4 map."""
    return bundle_for(tiny_vit(seed=seed, dtype=dtype), layer, name="tiny_vit", tail=None, prefix_tokens=1)


def images(n: int, *, size: int = TOY_SIZE, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n×3×size×size images in [0,1]: smooth blobs plus noise, so that maps have structure."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    noise = torch.rand(n, 3, size, size, generator=gen, dtype=torch.float64)
    return (0.7 * smooth + 0.3 * noise).clamp(0, 1).to(dtype)


def targets(n: int, *, num_classes: int = NUM_CLASSES, seed: int = 0) -> torch.Tensor:
    """n class indices, not all equal (per-image targets are part of what is tested)."""
    gen = torch.Generator().manual_seed(seed + 7)
    t = torch.randint(0, num_classes, (n,), generator=gen)
    if n > 1 and (t == t[0]).all():
        t[1] = (t[0] + 1) % num_classes
    return t


def skimage_photo(name: str = "chelsea", *, size: int = 224, resize: int = 256) -> torch.Tensor:
    """A photo from `skimage.data` as a 1×3×size×size float tensor in [0,1] (Resize → CenterCrop)."""
    import skimage.data
    import torchvision.transforms.v2.functional as TF

    img = torch.from_numpy(getattr(skimage.data, name)().copy()).permute(2, 0, 1)[:3]
    img = TF.resize(img, [resize], antialias=True)
    img = TF.center_crop(img, [size, size])
    return (img.float() / 255).unsqueeze(0)


def lite0_on_photos(names) -> tuple[ModelBundle, torch.Tensor, torch.Tensor]:
    """The real EfficientNet-Lite0, `skimage_photo`s of `names`, and its predicted class for each."""
    from opticam_core import load_model

    bundle = load_model("efficientnet_lite0")
    x = torch.cat([skimage_photo(name) for name in names])
    with torch.no_grad():
        predicted = bundle.model(x).argmax(1)
    return bundle, x, predicted
